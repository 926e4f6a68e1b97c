"""Linear followed by an activation, with the bias add fused into the
activation: the matmul runs without bias and fastdl.functional.bias_act
computes act(x W^T + b) in one pass over the output (forward and backward).

fastdl.patch builds these from `Linear, activation` pairs inside nn.Sequential:
the Linear slot becomes a LinearAct holding the same weight and bias, the
activation slot an nn.Identity, so the state_dict keys stay the same.
"""
from __future__ import annotations

from typing import Optional

import torch.nn.functional as TF
from torch import Tensor, nn

from fastdl import functional as F
from fastdl._ops.activation import ACTS


def act_spec(module: nn.Module) -> Optional[tuple[str, float]]:
    """(act, negative_slope) of bias_act computing what `module` computes, or
    None when bias_act has no such activation. Subclasses with their own
    forward are not recognised: only the exact torch classes and fastdl's
    drop-ins (whose forward is the torch math)."""
    from fastdl.nn import activation as A
    kind = type(module)
    if kind in (nn.GELU, A.GELU):
        return ("gelu" if module.approximate == "none" else "gelu_tanh"), 0.0
    if kind in (nn.LeakyReLU, A.LeakyReLU):
        return "leaky_relu", float(module.negative_slope)
    simple = {nn.ReLU: "relu", A.ReLU: "relu", nn.SiLU: "silu", A.SiLU: "silu",
              nn.Sigmoid: "sigmoid", A.Sigmoid: "sigmoid", nn.Tanh: "tanh", A.Tanh: "tanh"}
    return (simple[kind], 0.0) if kind in simple else None


class LinearAct(nn.Linear):
    """act(input @ weight.T + bias); parameters and state_dict of nn.Linear."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, act: str = "gelu",
                 negative_slope: float = 0.01, device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device, dtype)
        if act not in ACTS:
            raise ValueError(f"fastdl: act must be one of {', '.join(ACTS)}; got {act!r}")
        self.act = act
        self.negative_slope = float(negative_slope)

    def forward(self, input: Tensor) -> Tensor:
        return F.bias_act(TF.linear(input, self.weight), self.bias, self.act, self.negative_slope)

    def extra_repr(self) -> str:
        slope = f", negative_slope={self.negative_slope}" if self.act == "leaky_relu" else ""
        return f"{super().extra_repr()}, act={self.act}{slope}"
