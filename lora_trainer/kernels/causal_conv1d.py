"""Depthwise causal 1-D convolution (the short convolution in front of Gated DeltaNet).

One signature, two backends: `causal_conv1d_fn` from the `causal_conv1d` package when the
tensors are on CUDA and the package is importable, otherwise `F.conv1d`.

Shape letters: B batch, C channels, T tokens, K kernel width, S packed samples.
"""

from __future__ import annotations

import functools
import importlib.util

import torch
import torch.nn.functional as F
from torch import Tensor

ACTIVATIONS = (None, "silu")


@functools.cache
def _causal_conv1d_available() -> bool:
    return importlib.util.find_spec("causal_conv1d") is not None


def causal_conv1d(
    x: Tensor, weight: Tensor, *, activation: str | None = "silu", cu_seqlens: Tensor | None = None
) -> Tensor:
    """Left-padded depthwise convolution, no bias: out[:, c, t] = sum_j weight[c, j] * x[:, c, t - K + 1 + j].

    x: [B, C, T]; weight: [C, K]; activation: "silu" or None. `cu_seqlens` (int64 [S + 1],
    needs B == 1) packs samples along T: the window of a token never reaches into the sample
    before it. Returns [B, C, T] in x's dtype.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if x.dim() != 3 or weight.dim() != 2 or weight.shape[0] != x.shape[1]:
        raise ValueError(
            f"x must be [B, C, T] and weight [C, K], got {tuple(x.shape)} and {tuple(weight.shape)}"
        )
    if cu_seqlens is not None and x.shape[0] != 1:
        raise ValueError(f"cu_seqlens packs samples along T and needs batch size 1, got {x.shape[0]}")
    if x.is_cuda and _causal_conv1d_available():
        return _cuda_causal_conv1d(x, weight, activation, cu_seqlens)
    return _torch_causal_conv1d(x, weight, activation, cu_seqlens)


def _cuda_causal_conv1d(
    x: Tensor, weight: Tensor, activation: str | None, cu_seqlens: Tensor | None
) -> Tensor:
    """The CUDA kernel; packed samples go in as `seq_idx`, which it reads only channel-last."""
    from causal_conv1d import causal_conv1d_fn

    if cu_seqlens is None:
        return causal_conv1d_fn(x, weight, activation=activation)
    seq_idx = packed_sample_index(cu_seqlens, x.shape[-1], x.device).to(torch.int32).unsqueeze(0)
    channel_last = x.transpose(1, 2).contiguous().transpose(1, 2)
    return causal_conv1d_fn(channel_last, weight, seq_idx=seq_idx, activation=activation)


def _torch_causal_conv1d(
    x: Tensor, weight: Tensor, activation: str | None, cu_seqlens: Tensor | None
) -> Tensor:
    """`F.conv1d` in the weight's dtype. Packed samples each get their own K - 1 zeros of left
    padding: the tokens are spread into a longer zero sequence, convolved once, and gathered back."""
    channels, width = weight.shape
    seq_len = x.shape[-1]
    kernel = weight.unsqueeze(1)
    inputs = x.to(weight.dtype)
    if cu_seqlens is None:
        out = F.conv1d(inputs, kernel, padding=width - 1, groups=channels)[..., :seq_len]
    else:
        sample = packed_sample_index(cu_seqlens, seq_len, x.device)
        slots = torch.arange(seq_len, device=x.device) + (width - 1) * (sample + 1)
        spread = inputs.new_zeros(*inputs.shape[:-1], seq_len + (width - 1) * (len(cu_seqlens) - 1))
        spread = spread.index_copy(-1, slots, inputs)
        out = F.conv1d(spread, kernel, groups=channels).index_select(-1, slots - (width - 1))
    if activation == "silu":
        out = F.silu(out)
    return out.to(x.dtype)


def packed_sample_index(cu_seqlens: Tensor, seq_len: int, device: torch.device) -> Tensor:
    """The packed sample each of the T tokens belongs to: int64 [T] on `device`."""
    cu_seqlens = cu_seqlens.to(device=device, dtype=torch.long)
    samples = torch.arange(len(cu_seqlens) - 1, device=device)
    return torch.repeat_interleave(samples, cu_seqlens.diff(), output_size=seq_len)
