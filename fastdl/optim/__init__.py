"""Fused optimizers (fastdl.optim.AdamW lands with its op)."""
