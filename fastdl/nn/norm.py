"""Norm modules: subclasses of torch's, same constructor arguments and
state_dict, running fastdl's fused kernels in forward."""
from torch import Tensor, nn

from fastdl import functional as F


class LayerNorm(nn.LayerNorm):
    def forward(self, input: Tensor) -> Tensor:
        return F.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)


class RMSNorm(nn.RMSNorm):
    def forward(self, input: Tensor) -> Tensor:
        return F.rms_norm(input, self.normalized_shape, self.weight, self.eps)


# torch modules a fastdl module replaces one for one (used by fastdl.patch).
REPLACES = {nn.LayerNorm: LayerNorm, nn.RMSNorm: RMSNorm}
