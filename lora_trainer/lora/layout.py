"""Where a LoRA factor's rows live: from the bridge's transform of the base weight.

A fused Megatron weight concatenates several HF targets (q_proj/k_proj/v_proj, ...) in a
rank-interleaved order. Running the weight's own transform over index tensors instead of weights
gives, for each rank, the position of each of its rows (or input columns) in the concatenation of
the HF targets; LoRA layers, their initialisation and the export all use that one map.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lora_trainer.bridge.transforms import Block, HFRef, Transform


@dataclass(frozen=True)
class TargetSpan:
    """One HF target inside a fused weight: rows [offset, offset + size) of the concatenation
    (along the split dim: output rows for column-parallel, input columns for row-parallel)."""

    ref: HFRef
    offset: int
    size: int


def _ref_extent(block: Block, dim: int) -> int:
    """Size along `dim` of the HF matrix a block reads (one expert's matrix for packed experts)."""
    shape = block.shape[1:] if block.ref.expert is not None else block.shape
    return shape[dim]


def target_spans(transform: Transform, dim: int) -> list[TargetSpan]:
    """The distinct HF targets of a transform, in order, with their place in the concatenation."""
    spans: list[TargetSpan] = []
    seen: set[HFRef] = set()
    offset = 0
    for block in transform.blocks():
        if block.ref in seen:
            continue
        seen.add(block.ref)
        size = _ref_extent(block, dim)
        spans.append(TargetSpan(block.ref, offset, size))
        offset += size
    return spans


class _IndexSource:
    """A SliceSource whose tensors hold their own position in the target concatenation."""

    def __init__(self, spans: list[TargetSpan], dim: int) -> None:
        self.offsets = {span.ref: span.offset for span in spans}
        self.dim = dim

    def read_rows(self, ref: HFRef, start: int, stop: int, dim: int) -> torch.Tensor:
        index = torch.arange(start, stop, device="cpu") + self.offsets[ref]
        shape = [1, 1]
        shape[dim] = stop - start
        return index.reshape(shape)


def shard_positions(transform: Transform, rank: int, size: int, dim: int) -> torch.Tensor:
    """For each row (dim 0) or input column (dim 1) of this rank's shard, its position in the
    concatenation of the transform's HF targets (a CPU tensor under any device context)."""
    spans = target_spans(transform, dim)
    layout = transform.shard(_IndexSource(spans, dim), rank, size)
    return layout.reshape(-1)


def span_rows(positions: torch.Tensor, span: TargetSpan) -> torch.Tensor:
    """The rows of one target among a rank's `positions`, in HF order."""
    inside = (positions >= span.offset) & (positions < span.offset + span.size)
    return torch.sort(positions[inside]).values


def inverse_order(order: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """For each of `values`, its index in `order` (a permutation of the same distinct values),
    with tensor ops only: no per-element host sync on a GPU."""
    sort = torch.argsort(order)
    return sort[torch.searchsorted(order[sort], values)]
