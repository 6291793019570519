"""TP-aware LoRA around megatron-core's column- and row-parallel linears (experts included).

Column-parallel base (W split on its output): A is replicated, B is split like W's output rows.
Row-parallel base (W split on its input): A is split on its input columns, B is replicated.
The rank-r activation `x @ A^T`, not x, goes through the tensor-parallel region op (gather under
sequence parallelism, copy otherwise for column; reduce-scatter / all-reduce for row), which is
what makes A's gradient complete. Expert linears communicate through the MoE dispatcher, so their
adapters do no communication of their own: a row-parallel expert's partial sum passes through B
linearly and is reduced with the base output.
"""

from __future__ import annotations

import math
import zlib
from typing import TYPE_CHECKING, Literal, cast

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)
from torch import nn

from lora_trainer.bridge.transforms import Transform
from lora_trainer.lora.layout import (
    TargetSpan,
    inverse_order,
    shard_positions,
    span_rows,
    target_spans,
)
from lora_trainer.parallel.attributes import set_parallel_attributes
from lora_trainer.parallel.groups import SplitGroup, group_rank_size

if TYPE_CHECKING:
    from lora_trainer.lora.experts import ExpertLoraView

ParallelKind = Literal["column", "row"]


def seeded_kaiming(shape: tuple[int, ...], seed: int, name: str) -> torch.Tensor:
    """PEFT's `kaiming_uniform_(a=sqrt(5))` for A, drawn from a generator keyed by the module
    name, so every rank and every parallel layout draws the same full matrix. Drawn on the CPU
    whatever device context is active (Lightning builds the model under `with root_device:`)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    bound = 1.0 / math.sqrt(shape[-1])
    return torch.empty(shape, device="cpu").uniform_(-bound, bound, generator=generator)


class LoraLinear(nn.Module):
    """`base(x) + scale * B @ A x` for one megatron linear, with one adapter per target in the
    canonical style or one over the whole fused weight in the fused style. `name` identifies the
    adapter independently of the parallel layout and keys its initialisation."""

    positions: torch.Tensor
    perm: torch.Tensor

    def __init__(
        self,
        base: nn.Module,
        *,
        name: str,
        parallel_kind: ParallelKind,
        transform: Transform,
        group: SplitGroup,
        r: int,
        scale: float,
        dropout: float,
        canonical: bool,
        seed: int,
    ) -> None:
        super().__init__()
        self.base = base
        self.name = name
        self.parallel_kind = parallel_kind
        self.transform = transform
        self.group = group
        rank_in_group, self.group_size = group_rank_size(group)
        self.r = r
        self.scale = scale
        self.is_expert = group == "etp"
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        split_dim = 0 if parallel_kind == "column" else 1
        self.spans: list[TargetSpan] = target_spans(transform, split_dim)
        weight = cast(torch.Tensor, base.weight)
        device = weight.device
        positions = shard_positions(transform, rank_in_group, self.group_size, split_dim)
        self.register_buffer("positions", positions.to(device), persistent=False)
        self.num_adapters = len(self.spans) if canonical and parallel_kind == "column" else 1
        full_in = (
            sum(span.size for span in self.spans) if parallel_kind == "row" else weight.shape[1]
        )
        a_full = seeded_kaiming((self.num_adapters, r, full_in), seed, name)
        self.lora_A = nn.Parameter(
            (a_full if parallel_kind == "column" else a_full[:, :, positions]).to(device)
        )
        self.lora_B = nn.ParameterList(
            nn.Parameter(torch.zeros(rows, r, device=device))
            for rows in self._local_rows(weight.shape[0])
        )
        if self.num_adapters > 1:
            cat_order = torch.cat([span_rows(self.positions, span) for span in self.spans])
            self.register_buffer("perm", inverse_order(cat_order, self.positions), persistent=False)
        self._mark_parallel_attributes()

    def _local_rows(self, out_local: int) -> list[int]:
        """The rows of each lora_B on this rank, whose shard of the base weight has `out_local`
        output rows."""
        if self.parallel_kind == "row" or self.num_adapters == 1:
            return [out_local]
        return [len(span_rows(self.positions, span)) for span in self.spans]

    def _mark_parallel_attributes(self) -> None:
        """Tell megatron's DDP and grad-norm code how each factor is split and reduced."""
        sequence_parallel = (
            bool(getattr(self.base, "sequence_parallel", False)) and not self.is_expert
        )
        split, replicated = (
            (self.lora_B, [self.lora_A])
            if self.parallel_kind == "column"
            else ([self.lora_A], self.lora_B)
        )
        for param in split:
            set_parallel_attributes(
                param,
                tensor_model_parallel=self.group_size > 1,
                partition_dim=0 if self.parallel_kind == "column" else 2,
                partition_stride=1,
            )
        for param in replicated:
            set_parallel_attributes(param, sequence_parallel=sequence_parallel)
        for param in [self.lora_A, *self.lora_B]:
            set_parallel_attributes(param, allreduce=not self.is_expert)

    def _communicate(self, h: torch.Tensor) -> torch.Tensor:
        base = self.base
        if self.is_expert or getattr(base, "explicit_expert_comm", False) or self.group_size == 1:
            return h
        group = base.tp_group
        if self.parallel_kind == "column":
            if base.sequence_parallel:
                return gather_from_sequence_parallel_region(h, group=group)
            return copy_to_tensor_model_parallel_region(h, group=group)
        if base.sequence_parallel:
            return reduce_scatter_to_sequence_parallel_region(h, group=group)
        return reduce_from_tensor_model_parallel_region(h, group=group)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """scale * B @ A x for this rank's part of the output, computed in x's dtype (the factors
        are kept in fp32 and cast on use, so bf16 training keeps fp32 master factors)."""
        h = F.linear(
            self.dropout(x), self.lora_A.reshape(self.num_adapters * self.r, -1).to(x.dtype)
        )
        h = self._communicate(h)
        if self.num_adapters == 1:
            return self.scale * F.linear(h, self.lora_B[0].to(h.dtype))
        parts = [
            F.linear(h_i, b.to(h.dtype))
            for h_i, b in zip(h.split(self.r, dim=-1), self.lora_B, strict=True)
        ]
        return self.scale * torch.cat(parts, dim=-1)[..., self.perm]

    def forward(
        self, x: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        out, bias = self.base(x, *args, **kwargs)
        return out + self.delta(x).to(out.dtype), bias

    def local_b_fused_order(self) -> torch.Tensor:
        """This rank's B rows in the order of its shard of the fused weight."""
        if self.num_adapters == 1:
            return self.lora_B[0]
        return torch.cat(list(self.lora_B), dim=0)[self.perm]

    def set_full(self, a_full: torch.Tensor, b_full: torch.Tensor) -> None:
        """Set factors from full, unsharded ones: a_full [adapters, r, in], b_full [out, r] with
        rows in target-concatenation order. The inverse of the export's gather."""
        copy_full_factors(self, a_full, b_full)


def copy_full_factors(
    adapter: LoraLinear | ExpertLoraView, a_full: torch.Tensor, b_full: torch.Tensor
) -> None:
    """Copy full, unsharded factors (a_full [adapters, r, in], b_full [out, r] in
    target-concatenation order) into `adapter`'s shard of them."""
    a_full, b_full = a_full.to(adapter.lora_A.device), b_full.to(adapter.lora_A.device)
    with torch.no_grad():
        adapter.lora_A.copy_(
            a_full if adapter.parallel_kind == "column" else a_full[:, :, adapter.positions]
        )
        if adapter.parallel_kind == "row":
            adapter.lora_B[0].copy_(b_full)
        elif adapter.num_adapters == 1:
            adapter.lora_B[0].copy_(b_full[adapter.positions])
        else:
            for span, b in zip(adapter.spans, adapter.lora_B, strict=True):
                b.copy_(b_full[span_rows(adapter.positions, span)])
