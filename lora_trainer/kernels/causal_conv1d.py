"""Depthwise causal 1-D convolution (the short convolution in front of Gated DeltaNet).

One signature, two backends: `causal_conv1d_fn` from the `causal_conv1d` package when the
tensors are on CUDA, the package is importable and the call fits the kernel's rules (kernel
width 2 to 4, fp32/fp16/bf16; its channel-last layout, the only one that takes packed samples,
needs a channel count divisible by 8), otherwise torch.

Shape letters: B batch, C channels, T tokens, K kernel width, S packed samples.
"""

from __future__ import annotations

import functools
import importlib.util

import torch
import torch.nn.functional as F
from torch import Tensor

ACTIVATIONS = (None, "silu")
KERNEL_WIDTHS = range(2, 5)
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CHANNEL_LAST_MULTIPLE = 8


@functools.cache
def _causal_conv1d_available() -> bool:
    return importlib.util.find_spec("causal_conv1d") is not None


def causal_conv1d(
    x: Tensor, weight: Tensor, *, activation: str | None = "silu", cu_seqlens: Tensor | None = None
) -> Tensor:
    """Left-padded depthwise convolution, no bias:
    out[:, c, t] = sum_j weight[c, j] * x[:, c, t - K + 1 + j].

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
        raise ValueError(
            f"cu_seqlens packs samples along T and needs batch size 1, got {x.shape[0]}"
        )
    if _use_cuda_kernel(x) and _kernel_fits(x, weight, cu_seqlens):
        return _cuda_causal_conv1d(x, weight, activation, cu_seqlens)
    return _torch_causal_conv1d(x, weight, activation, cu_seqlens)


def _use_cuda_kernel(x: Tensor) -> bool:
    return x.is_cuda and _causal_conv1d_available()


def _kernel_fits(x: Tensor, weight: Tensor, cu_seqlens: Tensor | None) -> bool:
    """Whether causal-conv1d takes this call: its width and dtypes, and a channel count divisible
    by 8 for packed samples (`seq_idx` is read in the channel-last layout only)."""
    supported = weight.shape[1] in KERNEL_WIDTHS and {x.dtype, weight.dtype} <= set(KERNEL_DTYPES)
    return supported and (cu_seqlens is None or x.shape[1] % CHANNEL_LAST_MULTIPLE == 0)


def _cuda_causal_conv1d(
    x: Tensor, weight: Tensor, activation: str | None, cu_seqlens: Tensor | None
) -> Tensor:
    """The CUDA kernel, channel-last (contiguous [B, T, C] memory) when the channel count is a
    multiple of 8, channel-first (contiguous [B, C, T]) otherwise; packed samples go in as
    `seq_idx`."""
    from causal_conv1d import causal_conv1d_fn

    weight = weight.contiguous()
    if x.shape[1] % CHANNEL_LAST_MULTIPLE:
        return causal_conv1d_fn(x.contiguous(), weight, activation=activation)
    channel_last = x.transpose(1, 2).contiguous().transpose(1, 2)
    if cu_seqlens is None:
        return causal_conv1d_fn(channel_last, weight, activation=activation)
    seq_idx = packed_sample_index(cu_seqlens, x.shape[-1], x.device).to(torch.int32).unsqueeze(0)
    return causal_conv1d_fn(channel_last, weight, seq_idx=seq_idx, activation=activation)


def _torch_causal_conv1d(
    x: Tensor, weight: Tensor, activation: str | None, cu_seqlens: Tensor | None
) -> Tensor:
    """`F.conv1d` in the weight's dtype over the whole sequence, channel-first (several times
    faster on CPU than the channel-last view the GDN layer passes). With packed samples, the first
    K - 1 outputs of each sample (the only ones whose window reaches into the sample before) are
    recomputed from their own sample's tokens: a gather of S * (K - 1) windows, not of the
    sequence."""
    channels, width = weight.shape
    seq_len = x.shape[-1]
    inputs = x.to(weight.dtype, memory_format=torch.contiguous_format)
    out = F.conv1d(inputs, weight.unsqueeze(1), padding=width - 1, groups=channels)[..., :seq_len]
    if cu_seqlens is not None:
        cu_seqlens = cu_seqlens.to(device=x.device, dtype=torch.long)
        starts = cu_seqlens[packed_sample_index(cu_seqlens, seq_len, x.device)]
        heads = (torch.arange(seq_len, device=x.device) - starts < width - 1).nonzero().squeeze(-1)
        sources = heads.unsqueeze(-1) + torch.arange(1 - width, 1, device=x.device)
        inside = (sources >= starts[heads].unsqueeze(-1)).to(inputs.dtype)
        windows = (
            inputs.index_select(-1, sources.clamp(min=0).flatten()).unflatten(-1, sources.shape)
            * inside
        )
        out = out.index_copy(-1, heads, (windows * weight.unsqueeze(1)).sum(-1))
    if activation == "silu":
        out = F.silu(out)
    return out.to(x.dtype)


def packed_sample_index(cu_seqlens: Tensor, seq_len: int, device: torch.device) -> Tensor:
    """The packed sample each of the T tokens belongs to: int64 [T] on `device`."""
    cu_seqlens = cu_seqlens.to(device=device, dtype=torch.long)
    samples = torch.arange(len(cu_seqlens) - 1, device=device)
    return torch.repeat_interleave(samples, cu_seqlens.diff(), output_size=seq_len)
