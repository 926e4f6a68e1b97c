"""BatchNorm modules: torch's BatchNorm1d/2d (same arguments, state_dict and
forward semantics, num_batches_tracked included) on fastdl's kernels, and
BatchNormAct2d, which fuses an activation and an optional residual add."""
from typing import Optional

from torch import Tensor, nn

from fastdl import functional as F


def _forward(bn: nn.modules.batchnorm._BatchNorm, input: Tensor, act: Optional[str] = None,
             negative_slope: float = 0.01, residual: Optional[Tensor] = None) -> Tensor:
    # torch's _BatchNorm.forward, step for step, with fastdl's batch_norm.
    bn._check_input_dim(input)
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        # momentum=None: cumulative moving average.
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    # Batch statistics in training, and in eval when there are no running ones.
    use_batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
    # Running statistics are passed only to be updated (training and tracked) or used (eval).
    pass_running = not bn.training or bn.track_running_stats
    return F.batch_norm(input, bn.running_mean if pass_running else None,
                        bn.running_var if pass_running else None, bn.weight, bn.bias, use_batch_stats,
                        factor, bn.eps, act=act, residual=residual, negative_slope=negative_slope)


class BatchNorm1d(nn.BatchNorm1d):
    def forward(self, input: Tensor) -> Tensor:
        return _forward(self, input)


class BatchNorm2d(nn.BatchNorm2d):
    def forward(self, input: Tensor) -> Tensor:
        return _forward(self, input)


class BatchNormAct2d(BatchNorm2d):
    """act(BatchNorm2d(input) + residual) in one pass: ResNet's bn -> add -> relu.

    act (keyword): None or a bias_act name (relu, leaky_relu with
    negative_slope, gelu, gelu_tanh, silu, sigmoid, tanh).
    forward(input, residual=None).
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None, dtype=None, *,
                 act: Optional[str] = "relu", negative_slope: float = 0.01, **kwargs):
        # kwargs: keyword arguments of newer torch versions (e.g. bias=False).
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, **kwargs)
        self.act = act
        self.negative_slope = negative_slope

    def forward(self, input: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        return _forward(self, input, self.act, self.negative_slope, residual)

    def extra_repr(self) -> str:
        slope = f", negative_slope={self.negative_slope}" if self.act == "leaky_relu" else ""
        return f"{super().extra_repr()}, act={self.act!r}{slope}"


# torch modules a fastdl module replaces one for one (used by fastdl.patch).
REPLACES = {nn.BatchNorm1d: BatchNorm1d, nn.BatchNorm2d: BatchNorm2d}
