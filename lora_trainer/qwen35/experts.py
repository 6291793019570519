"""The routed experts of one MoE layer as grouped GEMMs (the `experts` module of megatron's
MoELayer).

megatron's token dispatcher hands over this rank's tokens already sorted by local expert, with the
count per expert; the row offsets are computed once per layer and shared by every grouped GEMM
(base gate/up, base down, and the expert LoRA around them). Weights are 3D, one slice per local
expert: `linear_fc1.weight` [E_local, 2I/etp, H] holds `[gate; up]` rows of each expert's shard,
`linear_fc2.weight` [E_local, H, I/etp] its shard of the down projection's input columns. Under
expert tensor parallelism fc2's output is a partial sum that the dispatcher reduces, so the
experts do no communication of their own.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import nn

from lora_trainer.kernels.grouped_gemm import grouped_backend, grouped_linear
from lora_trainer.parallel.attributes import set_parallel_attributes


class GroupedLinear(nn.Module):
    """One projection of every local expert: [T, in] -> [T, out] with rows grouped by expert.
    `parallel_kind` says how expert tensor parallelism splits it: `column` on the output, `row`
    on the input."""

    def __init__(
        self,
        num_experts: int,
        in_features: int,
        out_features: int,
        config: TransformerConfig,
        parallel_kind: Literal["column", "row"],
    ) -> None:
        super().__init__()
        self.parallel_kind = parallel_kind
        device = torch.cuda.current_device() if not config.use_cpu_initialization else "cpu"
        self.weight = nn.Parameter(
            torch.empty(
                num_experts, out_features, in_features, dtype=config.params_dtype, device=device
            )
        )
        # An expert parameter: reduced over the expert data-parallel group.
        set_parallel_attributes(self.weight, allreduce=False)

    def forward(self, x: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        return grouped_linear(x, self.weight, offs)


class GroupedExperts(MegatronModule):
    """silu(gate x) * up x, scaled by the routing probability, then down; every expert at once.
    Built by megatron's MoELayer like its own experts modules (`pg_collection` is part of that
    interface; the experts need no group of their own)."""

    def __init__(
        self,
        num_local_experts: int,
        config: TransformerConfig,
        pg_collection: ProcessGroupCollection | None = None,
    ) -> None:
        super().__init__(config=config)
        etp = config.expert_tensor_parallel_size
        width = config.moe_ffn_hidden_size // etp
        self.num_local_experts = num_local_experts
        # Decide (and log) the grouped-matmul backend now, outside any activation checkpoint:
        # selective recompute replays every grouped matmul of the forward, the probe included.
        grouped_backend("cuda" if not config.use_cpu_initialization else "cpu", config.params_dtype)
        self.linear_fc1 = GroupedLinear(
            num_local_experts, config.hidden_size, 2 * width, config, "column"
        )
        self.linear_fc2 = GroupedLinear(num_local_experts, width, config.hidden_size, config, "row")

    def forward(
        self, hidden: torch.Tensor, tokens_per_expert: torch.Tensor, probs: torch.Tensor
    ) -> tuple[torch.Tensor, None]:
        """hidden [T, H] sorted by local expert, tokens_per_expert [E_local], probs [T]."""
        offs = torch.cumsum(tokens_per_expert.to(hidden.device), 0, dtype=torch.int32)
        gate, up = self.linear_fc1(hidden, offs).chunk(2, dim=-1)
        intermediate = F.silu(gate) * up
        intermediate = (intermediate * probs.unsqueeze(-1)).to(hidden.dtype)
        return self.linear_fc2(intermediate, offs), None
