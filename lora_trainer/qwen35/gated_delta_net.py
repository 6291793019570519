"""Gated DeltaNet (linear attention) of Qwen3.5, tensor-parallel over key heads.

`in_proj` fuses HF in_proj_qkv, in_proj_z, in_proj_b and in_proj_a. A TP rank's output rows are
`[q_t | k_t | v_t | z_t | b_t | a_t]`, each block that rank's contiguous share of heads; value
heads are grouped under their key head, so a rank's value heads use its own key heads.
`conv1d_weight` ([channels_t, 1, K], channels `[q_t | k_t | v_t]`), `A_log` and `dt_bias` hold
the rank's share too; `out_norm` is shared by all heads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import nn

from lora_trainer.kernels import causal_conv1d, chunk_gated_delta_rule
from lora_trainer.qwen35.attention import _no_init
from lora_trainer.qwen35.norms import GatedRMSNorm
from lora_trainer.qwen35.spec import Qwen35Spec


class GatedDeltaNet(nn.Module):
    def __init__(self, spec: Qwen35Spec, config: TransformerConfig) -> None:
        super().__init__()
        tp = config.tensor_model_parallel_size
        self.key_heads = spec.linear_num_key_heads // tp
        self.value_heads = spec.linear_num_value_heads // tp
        self.key_dim = spec.linear_key_head_dim
        self.value_dim = spec.linear_value_head_dim
        in_out = 2 * spec.gdn_key_dim + 2 * spec.gdn_value_dim + 2 * spec.linear_num_value_heads
        self.in_proj = ColumnParallelLinear(
            spec.hidden_size,
            in_out,
            config=config,
            init_method=_no_init,
            bias=False,
            gather_output=False,
        )
        channels = 2 * self.key_heads * self.key_dim + self.value_heads * self.value_dim
        dtype = config.params_dtype
        self.conv1d_weight = nn.Parameter(
            torch.empty(channels, 1, spec.linear_conv_kernel_dim, dtype=dtype)
        )
        self.A_log = nn.Parameter(torch.empty(self.value_heads, dtype=dtype))
        self.dt_bias = nn.Parameter(torch.empty(self.value_heads, dtype=dtype))
        self.out_norm = GatedRMSNorm(self.value_dim, spec.rms_norm_eps)
        self.out_proj = RowParallelLinear(
            spec.gdn_value_dim,
            spec.hidden_size,
            config=config,
            init_method=_no_init,
            bias=False,
            input_is_parallel=True,
            skip_bias_add=False,
        )

    def forward(self, hidden: torch.Tensor, cu_seqlens: torch.Tensor | None) -> torch.Tensor:
        """hidden [S, B, H] (S split over TP under sequence parallel) -> [S, B, H]."""
        projected, _ = self.in_proj(hidden)
        seq, batch = projected.shape[:2]
        projected = projected.transpose(0, 1)
        kd, vd = self.key_heads * self.key_dim, self.value_heads * self.value_dim
        qkv, z, b, a = torch.split(
            projected, [2 * kd + vd, vd, self.value_heads, self.value_heads], dim=-1
        )
        if cu_seqlens is not None:
            qkv, b, a = (x.reshape(1, batch * seq, x.shape[-1]) for x in (qkv, b, a))
        conv_out = causal_conv1d(
            qkv.transpose(1, 2),
            self.conv1d_weight.squeeze(1),
            activation="silu",
            cu_seqlens=cu_seqlens,
        ).transpose(1, 2)
        q, k, v = torch.split(conv_out, [kd, kd, vd], dim=-1)
        rows, tokens = q.shape[:2]
        q = q.reshape(rows, tokens, self.key_heads, self.key_dim)
        k = k.reshape(rows, tokens, self.key_heads, self.key_dim)
        v = v.reshape(rows, tokens, self.value_heads, self.value_dim)
        beta = b.sigmoid()
        g = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias)
        out, _ = chunk_gated_delta_rule(q, k, v, g, beta, cu_seqlens=cu_seqlens, use_qk_l2norm=True)
        out = self.out_norm(
            out.reshape(batch, seq, self.value_heads, self.value_dim),
            z.reshape(batch, seq, self.value_heads, self.value_dim),
        )
        out, _ = self.out_proj(out.reshape(batch, seq, vd).transpose(0, 1).contiguous())
        return out
