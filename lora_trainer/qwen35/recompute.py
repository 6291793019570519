"""Activation recompute of the decoder layers (`model.recompute`), on CPU and CUDA alike.

- `none`: every activation is kept for backward.
- `full`: each layer keeps only its input; backward runs the layer's forward again.
- `selective`: each layer keeps the outputs of its weight matmuls (the linear projections, the
  grouped expert GEMMs) and recomputes everything between them: the RMSNorms, RoPE, the causal
  conv, core attention, the Gated DeltaNet chunk intermediates, the silu-gated expert and MLP
  activations, the routing, and the layer's communication (the MoE all-to-all and the
  sequence-parallel gathers run again in backward, as megatron's own MoE recompute does: torch
  cannot replay a saved result into a collective's preallocated output).

Both use torch's non-reentrant checkpoint, which needs no input that requires grad (with a frozen
base the first layer's input does not, and a reentrant checkpoint would then silently skip the
LoRA gradients) and restores the CPU and CUDA RNG states, so LoRA dropout draws the same masks
when recomputed. `selective` is torch's selective activation checkpointing with the policy below.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
    noop_context_fn,
)

from lora_trainer.qwen35.recompute_mode import Recompute

_SAVED_OPS = frozenset(
    op.name()
    for op in (
        torch.ops.aten.mm.default,
        torch.ops.aten.addmm.default,
        torch.ops.aten._grouped_mm.default,
    )
)


def _selective_policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    """Keep the weight matmuls' outputs, recompute the rest."""
    return (
        CheckpointPolicy.MUST_SAVE if op.name() in _SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE
    )


def run_with_recompute(
    mode: Recompute, fn: Callable[..., torch.Tensor], *args: Any
) -> torch.Tensor:
    """`fn(*args)`, keeping for backward what `mode` says (everything outside autograd)."""
    if mode == Recompute.none or not torch.is_grad_enabled():
        return fn(*args)
    context_fn = (
        functools.partial(create_selective_checkpoint_contexts, _selective_policy)
        if mode == Recompute.selective
        else noop_context_fn
    )
    return checkpoint(
        fn, *args, use_reentrant=False, preserve_rng_state=True, context_fn=context_fn
    )
