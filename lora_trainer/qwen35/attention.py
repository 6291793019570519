"""Gated full attention of Qwen3.5, tensor-parallel over query groups.

`linear_qkv` fuses q_proj (with its per-head gate rows), k_proj and v_proj. A TP rank holds whole
query groups; per local group its output rows are `[q heads | gate heads | k | v]`, each head `d`
wide. After attention the output is multiplied by `sigmoid(gate)` and goes through the
row-parallel `linear_proj` (HF o_proj).
"""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import nn

from lora_trainer.kernels import causal_attention
from lora_trainer.qwen35.norms import ZeroCenteredRMSNorm
from lora_trainer.qwen35.rope import apply_partial_rotary
from lora_trainer.qwen35.spec import Qwen35Spec


def _no_init(_: torch.Tensor) -> None:
    """Weights are loaded from the checkpoint, never initialised."""


class GatedAttention(nn.Module):
    def __init__(self, spec: Qwen35Spec, config: TransformerConfig) -> None:
        super().__init__()
        tp = config.tensor_model_parallel_size
        self.head_dim = spec.head_dim
        self.local_groups = spec.num_key_value_heads // tp
        self.heads_per_group = spec.num_attention_heads // spec.num_key_value_heads
        d = spec.head_dim
        qkv_out = 2 * spec.num_attention_heads * d + 2 * spec.num_key_value_heads * d
        self.linear_qkv = ColumnParallelLinear(
            spec.hidden_size,
            qkv_out,
            config=config,
            init_method=_no_init,
            bias=spec.attention_bias,
            gather_output=False,
        )
        self.q_layernorm = ZeroCenteredRMSNorm(d, spec.rms_norm_eps)
        self.k_layernorm = ZeroCenteredRMSNorm(d, spec.rms_norm_eps)
        self.linear_proj = RowParallelLinear(
            spec.num_attention_heads * d,
            spec.hidden_size,
            config=config,
            init_method=_no_init,
            bias=spec.attention_bias,
            input_is_parallel=True,
            skip_bias_add=False,
        )

    def forward(
        self,
        hidden: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        cu_seqlens: torch.Tensor | None,
    ) -> torch.Tensor:
        """hidden [S, B, H] (S split over TP under sequence parallel) -> [S, B, H]."""
        qkv, _ = self.linear_qkv(hidden)
        seq, batch = qkv.shape[:2]
        d, n = self.head_dim, self.heads_per_group
        qkv = qkv.transpose(0, 1).reshape(batch, seq, self.local_groups, (2 * n + 2) * d)
        q, gate, k, v = torch.split(qkv, [n * d, n * d, d, d], dim=-1)
        heads = self.local_groups * n
        q = self.q_layernorm(q.reshape(batch, seq, heads, d))
        k = self.k_layernorm(k.reshape(batch, seq, self.local_groups, d))
        v = v.reshape(batch, seq, self.local_groups, d)
        cos, sin = rotary
        q, k = apply_partial_rotary(q, cos, sin), apply_partial_rotary(k, cos, sin)
        if cu_seqlens is not None:
            q, k, v = (x.reshape(1, batch * seq, *x.shape[2:]) for x in (q, k, v))
        out = causal_attention(q, k, v, scale=d**-0.5, cu_seqlens=cu_seqlens)
        out = out.reshape(batch, seq, heads * d) * torch.sigmoid(
            gate.reshape(batch, seq, heads * d)
        )
        out, _ = self.linear_proj(out.transpose(0, 1).contiguous())
        return out
