"""Drop-in modules: each subclasses its torch counterpart (same constructor
arguments, same state_dict) and runs fastdl's kernels in forward."""
from fastdl.nn.activation import GEGLU, GELU, LeakyReLU, ReLU, Sigmoid, SiLU, SwiGLU, Tanh
from fastdl.nn.attention import MultiheadAttention, register_transformers_attention
from fastdl.nn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNormAct2d
from fastdl.nn.conv_block import ConvBNAct2d, FuseReport, fuse_conv_bn
from fastdl.nn.linear_act import LinearAct
from fastdl.nn.norm import LayerNorm, RMSNorm

__all__ = ["LinearAct", "GELU", "ReLU", "LeakyReLU", "SiLU", "Sigmoid", "Tanh", "GEGLU", "SwiGLU", "LayerNorm", "RMSNorm",
           "BatchNorm1d", "BatchNorm2d", "BatchNormAct2d", "ConvBNAct2d", "fuse_conv_bn", "FuseReport", "MultiheadAttention", "register_transformers_attention"]
