"""Fused optimizers: drop-ins for torch.optim.Adam / AdamW (fastdl/optim/adamw.py)."""
from fastdl.optim.adamw import Adam, AdamW

__all__ = ["Adam", "AdamW"]
