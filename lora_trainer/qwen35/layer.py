"""One Qwen3.5 decoder layer: pre-norm token mixer (GDN or gated attention), pre-norm MLP/MoE."""

from __future__ import annotations

import torch
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import nn

from lora_trainer.qwen35.attention import GatedAttention
from lora_trainer.qwen35.gated_delta_net import GatedDeltaNet
from lora_trainer.qwen35.mlp import build_mlp
from lora_trainer.qwen35.norms import ZeroCenteredRMSNorm
from lora_trainer.qwen35.spec import LayerKind, Qwen35Spec


class DecoderLayer(nn.Module):
    def __init__(self, spec: Qwen35Spec, config: TransformerConfig, kind: LayerKind) -> None:
        super().__init__()
        self.kind = kind
        sp = config.sequence_parallel
        self.input_layernorm = ZeroCenteredRMSNorm(spec.hidden_size, spec.rms_norm_eps, sp)
        self.self_attention: nn.Module = (
            GatedAttention(spec, config)
            if kind == "full_attention"
            else GatedDeltaNet(spec, config)
        )
        self.pre_mlp_layernorm = ZeroCenteredRMSNorm(spec.hidden_size, spec.rms_norm_eps, sp)
        self.mlp = build_mlp(spec, config)

    def forward(
        self,
        hidden: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        cu_seqlens: torch.Tensor | None,
    ) -> torch.Tensor:
        normed = self.input_layernorm(hidden)
        if self.kind == "full_attention":
            mixed = self.self_attention(normed, rotary, cu_seqlens)
        else:
            mixed = self.self_attention(normed, cu_seqlens)
        hidden = hidden + mixed
        out, _ = self.mlp(self.pre_mlp_layernorm(hidden))
        return hidden + out
