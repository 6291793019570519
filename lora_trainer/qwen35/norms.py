"""RMSNorms of Qwen3.5: zero-centred (`x * (1 + w)`) and the GDN output norm gated by `silu(z)`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


class ZeroCenteredRMSNorm(nn.Module):
    """`normalize(x) * (1 + weight)` in fp32, cast back to x's dtype (HF `Qwen3_5RMSNorm`).

    `sequence_parallel` marks the weight so megatron's `finalize_model_grads` sums its gradient
    over the tensor-parallel group when each rank sees only a slice of the sequence.
    """

    def __init__(self, size: int, eps: float, sequence_parallel: bool = False) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(size))
        # megatron all-reduces the gradients of parameters so flagged over the tensor-parallel group
        self.weight.sequence_parallel = sequence_parallel  # type: ignore[attr-defined]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (_rms_normalize(x, self.eps) * (1.0 + self.weight.float())).type_as(x)


class GatedRMSNorm(nn.Module):
    """`normalize(x) * weight * silu(gate)` (HF `Qwen3_5RMSNormGated`, the GDN output norm)."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        normed = self.weight * _rms_normalize(x, self.eps).to(x.dtype)
        return (normed * F.silu(gate.float())).to(x.dtype)
