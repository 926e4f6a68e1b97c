"""fp64 references for every op, written with torch's own functions and kept
apart from fastdl's code (the 'torch' backend is tested against these too)."""
import torch
import torch.nn.functional as F


def act(x: torch.Tensor, name: str, negative_slope: float = 0.01) -> torch.Tensor:
    return {
        "gelu": lambda: F.gelu(x),
        "gelu_tanh": lambda: F.gelu(x, approximate="tanh"),
        "relu": lambda: F.relu(x),
        "leaky_relu": lambda: F.leaky_relu(x, negative_slope),
        "silu": lambda: F.silu(x),
        "sigmoid": lambda: torch.sigmoid(x),
        "tanh": lambda: torch.tanh(x),
    }[name]()


def bias_act(x, bias, name, negative_slope=0.01):
    """act(x + bias) in fp64."""
    x = x.double()
    if bias is not None:
        x = x + bias.double()
    return act(x, name, negative_slope)


def gated(x, name, negative_slope=0.01):
    """act(a) * b, a, b = x.chunk(2, -1), in fp64."""
    a, b = x.double().chunk(2, dim=-1)
    return act(a, name, negative_slope) * b
