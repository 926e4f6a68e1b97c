"""The course's models, written from the architectures its chapters describe,
plus a ResNet-50 for machines without timm. Shared by tests/test_patch.py and
benchmarks/bench_e2e.py; every size is a constructor argument so the tests
build tiny ones and the benchmark realistic ones.

    MLP            ch. 1   Linear-ReLU-Linear-ReLU-Linear (MNIST: 784 -> 10)
    CNN            ch. 8   three Conv-BN-ReLU blocks, max-pool, global average pool, Linear
    SimpleResNet   ch. 11  7x7 stem, BN, max-pool, ResidualBlocks (Conv-BN-ReLU-Conv-BN + x, ReLU)
    UNet           ch. 12  two-level encoder/decoder with skip concatenation, ConvTranspose2d up
    GPT            ch. 10  pre-LN decoder blocks around the course's SelfAttention (causally masked,
                           the exercise 10.3 variant) and a Linear-GELU-Linear MLP
    ResNet50       torchvision-style bottleneck ResNet-50 (v1.5: stride in the 3x3)
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class MLP(nn.Module):
    def __init__(self, input_dim: int = 784, hidden_dim: int = 256, output_dim: int = 10):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(input_dim, hidden_dim), nn.ReLU(),
            nn.Linear(hidden_dim, hidden_dim), nn.ReLU(),
            nn.Linear(hidden_dim, output_dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.flatten(1))


class CNN(nn.Module):
    def __init__(self, num_classes: int = 10, in_ch: int = 1, width: int = 32):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(in_ch, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.BatchNorm2d(4 * w), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1))
        self.classifier = nn.Linear(4 * w, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x).flatten(1))


class ResidualBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels))
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.block(x) + x)


class SimpleResNet(nn.Module):
    def __init__(self, num_classes: int = 10, width: int = 64, blocks: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3)
        self.bn1 = nn.BatchNorm2d(width)
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = nn.Sequential(*[ResidualBlock(width) for _ in range(blocks)])
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        # The course's stem applies relu functionally: fastdl.patch cannot
        # reach it, and the report says nothing about it.
        x = self.pool(nn.functional.relu(self.bn1(self.conv1(x))))
        x = self.layer1(x)
        return self.fc(self.avgpool(x).flatten(1))


class UNet(nn.Module):
    def __init__(self, in_ch: int = 1, out_ch: int = 1, width: int = 64):
        super().__init__()
        w = width
        self.enc1 = self._block(in_ch, w)
        self.enc2 = self._block(w, 2 * w)
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = self._block(2 * w, 4 * w)
        self.up2 = nn.ConvTranspose2d(4 * w, 2 * w, 2, stride=2)
        self.dec2 = self._block(4 * w, 2 * w)  # 4w: the skip concatenation
        self.up1 = nn.ConvTranspose2d(2 * w, w, 2, stride=2)
        self.dec1 = self._block(2 * w, w)
        self.final = nn.Conv2d(w, out_ch, 1)

    @staticmethod
    def _block(in_c: int, out_c: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(in_c, out_c, 3, padding=1), nn.ReLU(),
                             nn.Conv2d(out_c, out_c, 3, padding=1), nn.ReLU())

    def forward(self, x: Tensor) -> Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(self.pool(e1))
        b = self.bottleneck(self.pool(e2))
        d2 = self.dec2(torch.cat([self.up2(b), e2], dim=1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], dim=1))
        return self.final(d1)


class SelfAttention(nn.Module):
    """The course's multi-head self-attention: softmax(QK^T / sqrt(d_k)) V,
    with the causal mask of exercise 10.3 (upper triangle set to -inf)."""

    def __init__(self, d_model: int, n_heads: int, causal: bool = True):
        super().__init__()
        self.d_model, self.n_heads, self.d_k = d_model, n_heads, d_model // n_heads
        self.causal = causal
        self.W_q = nn.Linear(d_model, d_model)
        self.W_k = nn.Linear(d_model, d_model)
        self.W_v = nn.Linear(d_model, d_model)
        self.W_o = nn.Linear(d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        Q = self.W_q(x).view(B, T, self.n_heads, self.d_k).transpose(1, 2)
        K = self.W_k(x).view(B, T, self.n_heads, self.d_k).transpose(1, 2)
        V = self.W_v(x).view(B, T, self.n_heads, self.d_k).transpose(1, 2)
        scores = (Q @ K.transpose(-2, -1)) / math.sqrt(self.d_k)
        if self.causal:
            future = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
            scores = scores.masked_fill(future, float("-inf"))
        out = torch.softmax(scores, dim=-1) @ V
        return self.W_o(out.transpose(1, 2).contiguous().view(B, T, C))


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = SelfAttention(d_model, n_heads)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """Token + learned position embeddings, pre-LN blocks, final LayerNorm,
    LM head tied to the token embedding (as GPT-2)."""

    def __init__(self, vocab_size: int = 8192, d_model: int = 512, n_heads: int = 8, n_layers: int = 8,
                 max_len: int = 1024):
        super().__init__()
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.pos_emb = nn.Embedding(max_len, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_heads) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        self.head.weight = self.tok_emb.weight
        nn.init.normal_(self.tok_emb.weight, std=0.02)
        nn.init.normal_(self.pos_emb.weight, std=0.02)

    def forward(self, idx: Tensor) -> Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.tok_emb(idx) + self.pos_emb(pos)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_ch: int, width: int, stride: int = 1):
        super().__init__()
        out_ch = width * self.expansion
        self.conv1 = nn.Conv2d(in_ch, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(out_ch))

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class ResNet50(nn.Module):
    """ResNet-50 (stages of 3, 4, 6, 3 bottlenecks); `base` scales the widths
    so tests can build a tiny one with the same structure."""

    def __init__(self, num_classes: int = 1000, base: int = 64, layers: tuple = (3, 4, 6, 3)):
        super().__init__()
        self.conv1 = nn.Conv2d(3, base, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(base)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        stages, in_ch = [], base
        for i, n in enumerate(layers):
            width = base * 2**i
            blocks = [Bottleneck(in_ch, width, stride=1 if i == 0 else 2)]
            in_ch = width * Bottleneck.expansion
            blocks += [Bottleneck(in_ch, width) for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))
