"""Token-weighted causal-LM loss over vocab-parallel logits."""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

IGNORE_INDEX = -100


def masked_token_loss(
    logits: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of per-token cross entropies over trained tokens, and their count.

    logits [B, S, V/tp] (this rank's vocabulary slice), labels [B, S] with IGNORE_INDEX where a
    token is not trained. Summing (not averaging) lets the caller weight by tokens across
    micro-batches and data-parallel ranks."""
    mask = labels != IGNORE_INDEX
    targets = torch.where(mask, labels, torch.zeros_like(labels))
    per_token = vocab_parallel_cross_entropy(logits.float(), targets)
    return (per_token * mask).sum(), mask.sum()
