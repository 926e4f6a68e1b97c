"""MultiheadAttention on fastdl's attention kernels, and the `attn_implementation="fastdl"`
entry for Hugging Face transformers models."""
from __future__ import annotations

import sys
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastdl._ops import attention as _attn


def _additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A MultiheadAttention mask (bool True = masked out, or additive) as an additive float mask."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
    return mask.to(dtype)


class MultiheadAttention(nn.MultiheadAttention):
    """torch.nn.MultiheadAttention (same arguments, parameters and state_dict)
    whose attention runs on fastdl's kernels.

    need_weights=True (torch's default) needs the attention matrix, which a
    flash kernel never forms: such calls run torch's implementation, with a
    warning the first time. Pass need_weights=False for the fast path.
    Masks follow torch's MultiheadAttention: a bool attn_mask or
    key_padding_mask is True where attention is NOT allowed; float masks are
    added to the scores. is_causal=True is the hint that attn_mask is the
    top-left causal mask: the kernels then apply it themselves.
    """

    _warned_need_weights = False

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor] = None,
                need_weights: bool = True, attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Optional[Tensor]]:
        if need_weights:
            if not MultiheadAttention._warned_need_weights:
                MultiheadAttention._warned_need_weights = True
                warnings.warn("fastdl.nn.MultiheadAttention: need_weights=True runs torch's implementation "
                              "(flash kernels never form the attention weights); pass need_weights=False",
                              RuntimeWarning, stacklevel=2)
            return super().forward(query, key, value, key_padding_mask=key_padding_mask, need_weights=True,
                                   attn_mask=attn_mask, average_attn_weights=average_attn_weights,
                                   is_causal=is_causal)
        if is_causal and attn_mask is None:
            raise RuntimeError("fastdl: is_causal=True is a hint that attn_mask is the causal mask; "
                               "pass attn_mask too (as torch.nn.MultiheadAttention requires)")
        batched = query.dim() == 3
        if not batched:  # (L, E): a batch of one
            shared = query is key and key is value
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if shared:
                key = value = query
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:  # (L, B, E) -> (B, L, E), keeping self-attention's shared input shared
            q_t = query.transpose(0, 1)
            k_t = q_t if key is query else key.transpose(0, 1)
            value = q_t if value is query else k_t if value is key else value.transpose(0, 1)
            query, key = q_t, k_t
        out = self._attend(query, key, value, key_padding_mask, attn_mask, is_causal)
        if not batched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, None

    def _project(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        e = self.embed_dim
        b = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None, None, None)
        if self._qkv_same_embed_dim:
            if query is key and key is value:  # self-attention: one matmul
                return F.linear(query, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
            w = self.in_proj_weight
            return F.linear(query, w[:e], b[0]), F.linear(key, w[e:2 * e], b[1]), F.linear(value, w[2 * e:], b[2])
        return (F.linear(query, self.q_proj_weight, b[0]), F.linear(key, self.k_proj_weight, b[1]),
                F.linear(value, self.v_proj_weight, b[2]))

    def _attend(self, query, key, value, key_padding_mask, attn_mask, is_causal) -> Tensor:
        bsz, tgt_len, _ = query.shape
        h, hd = self.num_heads, self.head_dim
        q, k, v = self._project(query, key, value)
        if self.bias_k is not None:  # one learned key/value appended to every sequence
            k = torch.cat([k, self.bias_k.expand(bsz, 1, -1)], dim=1)
            v = torch.cat([v, self.bias_v.expand(bsz, 1, -1)], dim=1)
            attn_mask = F.pad(attn_mask, (0, 1)) if attn_mask is not None else None
            key_padding_mask = F.pad(key_padding_mask, (0, 1)) if key_padding_mask is not None else None
        heads = lambda t: t.reshape(bsz, t.shape[1], h, hd).transpose(1, 2)  # noqa: E731
        q, k, v = heads(q), heads(k), heads(v)
        if self.add_zero_attn:  # and one all-zero key/value
            k = torch.cat([k, k.new_zeros(bsz, h, 1, hd)], dim=2)
            v = torch.cat([v, v.new_zeros(bsz, h, 1, hd)], dim=2)
            attn_mask = F.pad(attn_mask, (0, 1)) if attn_mask is not None else None
            key_padding_mask = F.pad(key_padding_mask, (0, 1)) if key_padding_mask is not None else None
        src_len = k.shape[2]
        causal = "none"
        if is_causal and key_padding_mask is None:
            causal, attn_mask = "top_left", None
        mask = None
        if attn_mask is not None:  # (L, S) or (B * H, L, S)
            mask = attn_mask.reshape(*((1, 1) if attn_mask.dim() == 2 else (bsz, h)), tgt_len, src_len)
        if key_padding_mask is not None:
            kpm = key_padding_mask.reshape(bsz, 1, 1, src_len)
            if mask is None:
                mask = kpm
            elif mask.dtype == torch.bool and kpm.dtype == torch.bool:
                mask = mask | kpm
            else:
                mask = _additive(mask, q.dtype) + _additive(kpm, q.dtype)
        if mask is not None:
            mask = ~mask if mask.dtype == torch.bool else mask.to(q.dtype)  # kernels: True = attend
            mask = mask.expand(bsz, h, tgt_len, src_len)
        dropout = self.dropout if self.training else 0.0
        out, _ = _attn.attention(q, k, v, mask, causal, None, dropout)
        out = out.transpose(1, 2).reshape(bsz, tgt_len, self.embed_dim)
        return F.linear(out, self.out_proj.weight, self.out_proj.bias)


# torch modules a fastdl module replaces one for one (used by fastdl.patch).
REPLACES = {nn.MultiheadAttention: MultiheadAttention}


# --- Hugging Face transformers ---------------------------------------------------------------
def transformers_attention_forward(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                                   attention_mask: Optional[Tensor], dropout: float = 0.0,
                                   scaling: Optional[float] = None, is_causal: Optional[bool] = None,
                                   **kwargs) -> tuple[Tensor, None]:
    """transformers' attention-function signature: query (B, Hq, L, D), key/value
    (B, Hkv, S, D), attention_mask in SDPA form (bool True = attend, or
    additive; (B, 1, L, >= S)); returns ((B, L, Hq, D), None). Causal without
    a mask aligns bottom-right (the KV-cache convention; the same as
    transformers' top-left whenever L == S, the only case it skips the mask)."""
    for name in ("softcap", "s_aux", "position_bias"):
        if kwargs.get(name) is not None:
            raise ValueError(f"fastdl attention: transformers passed {name}, which fastdl's kernels do not "
                             f"implement; use attn_implementation='sdpa' for this model")
    if attention_mask is not None:
        attention_mask = _attn._expand_mask(attention_mask[..., :key.shape[-2]], query, key.shape[-2],
                                            "attention_mask")
    if is_causal is None:
        is_causal = query.shape[2] > 1 and attention_mask is None and getattr(module, "is_causal", True)
    causal = "bottom_right" if is_causal else "none"
    out, _ = _attn.attention(query, key, value, attention_mask, causal, scaling,
                             dropout if module.training else 0.0)
    return out.transpose(1, 2).contiguous(), None


def register_transformers_attention() -> bool:
    """Register "fastdl" with transformers' AttentionInterface (and SDPA-style
    masks for it with AttentionMaskInterface where that exists), so
    `from_pretrained(..., attn_implementation="fastdl")` runs these kernels.
    Returns False when transformers (or its AttentionInterface) is missing."""
    try:
        from transformers import AttentionInterface
    except ImportError:
        return False
    AttentionInterface.register("fastdl", transformers_attention_forward)
    try:  # transformers >= 4.53 builds masks per implementation; unknown names get none
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError:
        return True
    AttentionMaskInterface.register("fastdl", sdpa_mask)
    return True


# Importing transformers takes seconds: register now only if the program has
# already imported it; otherwise call register_transformers_attention().
if "transformers" in sys.modules:
    register_transformers_attention()
