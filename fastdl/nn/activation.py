"""Activation modules. `inplace=True` is accepted for compatibility; fastdl
returns a new tensor (its backward needs the input intact)."""
from torch import Tensor, nn

from fastdl import functional as F


class GELU(nn.GELU):
    def forward(self, input: Tensor) -> Tensor:
        return F.gelu(input, approximate=self.approximate)


class ReLU(nn.ReLU):
    def forward(self, input: Tensor) -> Tensor:
        return F.relu(input)


class LeakyReLU(nn.LeakyReLU):
    def forward(self, input: Tensor) -> Tensor:
        return F.leaky_relu(input, self.negative_slope)


class SiLU(nn.SiLU):
    def forward(self, input: Tensor) -> Tensor:
        return F.silu(input)


class Sigmoid(nn.Sigmoid):
    def forward(self, input: Tensor) -> Tensor:
        return F.sigmoid(input)


class Tanh(nn.Tanh):
    def forward(self, input: Tensor) -> Tensor:
        return F.tanh(input)


class GEGLU(nn.Module):
    """gelu(a) * b for a, b = input.chunk(2, -1); halves the last dim."""

    def __init__(self, approximate: str = "none"):
        super().__init__()
        if approximate not in ("none", "tanh"):
            raise ValueError(f"fastdl: approximate must be 'none' or 'tanh', got {approximate!r}")
        self.approximate = approximate

    def forward(self, input: Tensor) -> Tensor:
        return F.geglu(input, self.approximate)

    def extra_repr(self) -> str:
        return f"approximate={self.approximate!r}"


class SwiGLU(nn.Module):
    """silu(a) * b for a, b = input.chunk(2, -1); halves the last dim."""

    def forward(self, input: Tensor) -> Tensor:
        return F.swiglu(input)


# torch modules a fastdl module replaces one for one (used by fastdl.patch).
REPLACES = {nn.GELU: GELU, nn.ReLU: ReLU, nn.LeakyReLU: LeakyReLU, nn.SiLU: SiLU,
            nn.Sigmoid: Sigmoid, nn.Tanh: Tanh}
