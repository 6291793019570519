"""Causal softmax attention with grouped-query heads (the full-attention layers of Qwen3.5).

One signature, two backends: flash-attn (`flash_attn_func`, `flash_attn_varlen_func`) when the
tensors are fp16/bf16 on CUDA and `flash_attn` is importable, otherwise
`F.scaled_dot_product_attention`, which runs packed samples one segment at a time (causal, no
mask), so that packing costs what the samples cost alone: never one masked [T, T] product over
the whole packed sequence.

Shape letters: B batch, T tokens, Hq query heads, Hkv key/value heads (Hq a multiple of Hkv;
query head i reads kv head i // (Hq // Hkv)), D head dim, S packed samples.
"""

from __future__ import annotations

import functools
import importlib.util
import itertools

import torch
import torch.nn.functional as F
from torch import Tensor

FLASH_DTYPES = (torch.float16, torch.bfloat16)


@functools.cache
def _flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def causal_attention(
    q: Tensor, k: Tensor, v: Tensor, *, scale: float, cu_seqlens: Tensor | None = None
) -> Tensor:
    """softmax(scale * q k^T + causal mask) v per head.

    q: [B, T, Hq, D]; k, v: [B, T, Hkv, D]. `cu_seqlens` (int64 [S + 1], needs B == 1) packs
    samples along T: a token attends only to earlier tokens of its own sample.
    Returns [B, T, Hq, D] in q's dtype.
    """
    if q.dim() != 4 or k.shape != v.shape or k.shape[:2] != q.shape[:2] or q.shape[2] % k.shape[2]:
        raise ValueError(
            f"q must be [B, T, Hq, D] and k, v [B, T, Hkv, D] with Hq a multiple of Hkv, "
            f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if cu_seqlens is not None and q.shape[0] != 1:
        raise ValueError(
            f"cu_seqlens packs samples along T and needs batch size 1, got {q.shape[0]}"
        )
    if q.is_cuda and q.dtype in FLASH_DTYPES and _flash_attn_available():
        return _flash_causal_attention(q, k, v, scale, cu_seqlens)
    return _sdpa_causal_attention(q, k, v, scale, cu_seqlens)


def _flash_causal_attention(
    q: Tensor, k: Tensor, v: Tensor, scale: float, cu_seqlens: Tensor | None
) -> Tensor:
    """flash-attn takes the [B, T, H, D] layout and grouped kv heads as they are."""
    from flash_attn import flash_attn_func, flash_attn_varlen_func

    if cu_seqlens is None:
        return flash_attn_func(q, k, v, softmax_scale=scale, causal=True)
    cu_seqlens = cu_seqlens.to(device=q.device, dtype=torch.int32)
    max_seqlen = int(cu_seqlens.diff().max())
    out = flash_attn_varlen_func(
        q[0],
        k[0],
        v[0],
        cu_seqlens,
        cu_seqlens,
        max_seqlen,
        max_seqlen,
        softmax_scale=scale,
        causal=True,
    )
    return out.unsqueeze(0)


def _sdpa_causal_attention(
    q: Tensor, k: Tensor, v: Tensor, scale: float, cu_seqlens: Tensor | None
) -> Tensor:
    """SDPA in the [B, H, T, D] layout; packed samples run one causal SDPA each."""
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    if cu_seqlens is None:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
        return out.transpose(1, 2).contiguous()
    bounds = cu_seqlens.tolist()
    segments = [
        F.scaled_dot_product_attention(
            q[:, :, start:end],
            k[:, :, start:end],
            v[:, :, start:end],
            is_causal=True,
            scale=scale,
            enable_gqa=True,
        )
        for start, end in itertools.pairwise(bounds)
        if end > start
    ]
    return torch.cat(segments, dim=2).transpose(1, 2).contiguous()
