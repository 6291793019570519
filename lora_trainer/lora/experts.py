"""LoRA on the routed experts of one MoE layer, every local expert at once, as grouped GEMMs.

Each expert keeps its own A_e and B_e (the HF PEFT format stores exactly that), held as 3D factors
over the local experts: the delta is `scale * B_e (A_e x)` per expert, two grouped GEMMs through
the rank-r activation (never the product B_e A_e). Expert tensor parallelism splits the factors
like a column- or row-parallel LoraLinear (B on fc1's output rows, A on fc2's input columns), and
as there, the experts' communication is the dispatcher's. `ExpertLoraView` shows one expert's
factors with LoraLinear's interface, for the adapter gather and for setting factors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lora_trainer.bridge.transforms import Transform
from lora_trainer.kernels.grouped_gemm import grouped_linear
from lora_trainer.lora.layers import LoraLinear, copy_full_factors, seeded_kaiming
from lora_trainer.lora.layout import inverse_order, shard_positions, span_rows, target_spans
from lora_trainer.parallel.attributes import set_parallel_attributes
from lora_trainer.parallel.groups import SplitGroup, group_rank_size
from lora_trainer.qwen35.experts import GroupedLinear


class GroupedLoraLinear(nn.Module):
    """`base(x, offs) + scale * B_e A_e x` for every local expert e of one grouped projection.

    `names[e]` and `transforms[e]` are local expert e's adapter identity and base-weight transform;
    lora_A is [E_local, adapters, r, in_local], lora_B one [E_local, rows, r] per adapter."""

    positions: torch.Tensor
    perm: torch.Tensor

    def __init__(
        self,
        base: GroupedLinear,
        *,
        names: Sequence[str],
        transforms: Sequence[Transform],
        r: int,
        scale: float,
        canonical: bool,
        seed: int,
    ) -> None:
        super().__init__()
        self.base = base
        self.names = list(names)
        self.transforms = list(transforms)
        self.parallel_kind = base.parallel_kind
        self.group: SplitGroup = "etp"
        self.r = r
        self.scale = scale
        rank_in_group, self.group_size = group_rank_size(self.group)
        split_dim = 0 if self.parallel_kind == "column" else 1
        self.expert_spans = [target_spans(t, split_dim) for t in self.transforms]
        spans = self.expert_spans[0]
        # Every expert's weight has the same shape, so one map of row positions serves them all.
        positions = shard_positions(self.transforms[0], rank_in_group, self.group_size, split_dim)
        device = base.weight.device
        self.register_buffer("positions", positions.to(device), persistent=False)
        self.num_adapters = len(spans) if canonical and self.parallel_kind == "column" else 1
        full_in = (
            sum(span.size for span in spans)
            if self.parallel_kind == "row"
            else base.weight.shape[2]
        )
        a_full = torch.stack(
            [seeded_kaiming((self.num_adapters, r, full_in), seed, name) for name in self.names]
        )
        self.lora_A = nn.Parameter(
            (a_full if self.parallel_kind == "column" else a_full[..., positions]).to(device)
        )
        experts, out_local = base.weight.shape[:2]
        rows = (
            [out_local]
            if self.num_adapters == 1
            else [len(span_rows(positions, span)) for span in spans]
        )
        self.lora_B = nn.ParameterList(
            nn.Parameter(torch.zeros(experts, n, r, device=device)) for n in rows
        )
        if self.num_adapters > 1:
            cat_order = torch.cat([span_rows(positions, span) for span in spans])
            self.register_buffer(
                "perm", inverse_order(cat_order, positions).to(device), persistent=False
            )
        self._mark_parallel_attributes()

    def _mark_parallel_attributes(self) -> None:
        """Expert factors are reduced over the expert data-parallel group (`allreduce=False`); the
        factor split by expert tensor parallelism says so for the grad-norm code."""
        split = list(self.lora_B) if self.parallel_kind == "column" else [self.lora_A]
        for param in split:
            set_parallel_attributes(
                param,
                tensor_model_parallel=self.group_size > 1,
                partition_dim=1 if self.parallel_kind == "column" else 3,
                partition_stride=1,
            )
        for param in [self.lora_A, *self.lora_B]:
            set_parallel_attributes(param, allreduce=False)

    def delta(self, x: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        """scale * B_e A_e x per expert, in x's dtype (fp32 factors are cast on use)."""
        experts = self.lora_A.shape[0]
        a = self.lora_A.reshape(experts, self.num_adapters * self.r, -1).to(x.dtype)
        h = grouped_linear(x, a, offs)
        if self.num_adapters == 1:
            return self.scale * grouped_linear(h, self.lora_B[0].to(x.dtype), offs)
        parts = [
            grouped_linear(h_i, b.to(x.dtype), offs)
            for h_i, b in zip(h.split(self.r, dim=-1), self.lora_B, strict=True)
        ]
        return self.scale * torch.cat(parts, dim=-1)[..., self.perm]

    def forward(self, x: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        out = self.base(x, offs)
        return out + self.delta(x, offs).to(out.dtype)

    def expert_views(self) -> list[ExpertLoraView]:
        return [ExpertLoraView(self, e) for e in range(len(self.names))]


class ExpertLoraView:
    """Local expert `index` of a GroupedLoraLinear with the interface of a LoraLinear: its name,
    transform, spans and factors (views into the grouped ones)."""

    def __init__(self, grouped: GroupedLoraLinear, index: int) -> None:
        self.grouped = grouped
        self.index = index
        self.name = grouped.names[index]
        self.transform = grouped.transforms[index]
        self.spans = grouped.expert_spans[index]
        self.parallel_kind = grouped.parallel_kind
        self.group = grouped.group
        self.r = grouped.r
        self.num_adapters = grouped.num_adapters
        self.positions = grouped.positions

    @property
    def lora_A(self) -> torch.Tensor:
        return self.grouped.lora_A[self.index]

    @property
    def lora_B(self) -> list[torch.Tensor]:
        return [b[self.index] for b in self.grouped.lora_B]

    def local_b_fused_order(self) -> torch.Tensor:
        """This rank's B rows in the order of its shard of the fused weight."""
        if self.num_adapters == 1:
            return self.lora_B[0]
        return torch.cat(self.lora_B, dim=0)[self.grouped.perm]

    def set_full(self, a_full: torch.Tensor, b_full: torch.Tensor) -> None:
        """Set this expert's factors from full, unsharded ones (see `LoraLinear.set_full`)."""
        copy_full_factors(self, a_full, b_full)


Adapter = LoraLinear | GroupedLoraLinear


def linear_adapters(adapters: Sequence[Adapter]) -> list[LoraLinear | ExpertLoraView]:
    """Every adapter as one linear's: grouped expert adapters become one view per local expert."""
    out: list[LoraLinear | ExpertLoraView] = []
    for adapter in adapters:
        out.extend(adapter.expert_views() if isinstance(adapter, GroupedLoraLinear) else [adapter])
    return out
