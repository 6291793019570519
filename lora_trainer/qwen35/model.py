"""The Megatron-parallel Qwen3.5 text model: one pipeline stage of it per rank.

Tensors between blocks are sequence-first, [S, B, H], as in megatron-core; under sequence
parallelism S is split over the tensor-parallel ranks between blocks. The first stage embeds
token ids, the last applies the final norm and the vocab-parallel output layer.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    VocabParallelEmbedding,
    gather_from_tensor_model_parallel_region,
    scatter_to_sequence_parallel_region,
)
from megatron.core.transformer.enums import ModelType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import nn

from lora_trainer.qwen35.attention import _no_init
from lora_trainer.qwen35.layer import DecoderLayer
from lora_trainer.qwen35.norms import ZeroCenteredRMSNorm
from lora_trainer.qwen35.recompute import run_with_recompute
from lora_trainer.qwen35.recompute_mode import Recompute
from lora_trainer.qwen35.rope import PartialRotaryEmbedding
from lora_trainer.qwen35.spec import Qwen35Spec


def stage_layer_range(num_layers: int, pp_rank: int, pp_size: int) -> range:
    """Global indices of the decoder layers that pipeline stage `pp_rank` holds."""
    per_stage = num_layers // pp_size
    return range(pp_rank * per_stage, (pp_rank + 1) * per_stage)


class Qwen35Model(MegatronModule):
    """This rank's pipeline stage of the Qwen3.5 text model.

    `layers` is a ModuleDict keyed by the global layer index, so names are the same at every
    pipeline size (`layers.5.self_attention.in_proj.weight`). `recompute` says which activations
    the layers keep for backward (see `lora_trainer.qwen35.recompute`).
    """

    def __init__(
        self, spec: Qwen35Spec, config: TransformerConfig, recompute: Recompute = Recompute.none
    ) -> None:
        super().__init__(config=config)
        self.recompute = Recompute(recompute)
        self.model_type = ModelType.encoder_or_decoder
        # With tied HF embeddings the output layer holds its own copy of the (frozen) table, so
        # megatron's finalize_model_grads has no shared embedding to synchronise.
        self.share_embeddings_and_output_weights = False
        self.spec = spec
        self.pre_process = parallel_state.is_pipeline_first_stage()
        self.post_process = parallel_state.is_pipeline_last_stage()
        self.layer_indices = stage_layer_range(
            spec.num_layers,
            parallel_state.get_pipeline_model_parallel_rank(),
            parallel_state.get_pipeline_model_parallel_world_size(),
        )
        self.input_tensor: torch.Tensor | None = None
        if self.pre_process:
            self.embedding = VocabParallelEmbedding(
                spec.vocab_size, spec.hidden_size, init_method=_no_init, config=config
            )
        self.rotary = PartialRotaryEmbedding(spec.rotary_dim, spec.rope_theta)
        self.layers = nn.ModuleDict(
            {str(i): DecoderLayer(spec, config, spec.layer_types[i]) for i in self.layer_indices}
        )
        if self.post_process:
            self.final_layernorm = ZeroCenteredRMSNorm(
                spec.hidden_size, spec.rms_norm_eps, config.sequence_parallel
            )
            self.output_layer = ColumnParallelLinear(
                spec.hidden_size,
                spec.vocab_size,
                config=config,
                init_method=_no_init,
                bias=False,
                gather_output=False,
            )

    def set_input_tensor(self, input_tensor: torch.Tensor | list[torch.Tensor] | None) -> None:
        """Called by megatron's pipeline schedule with the activation from the previous stage."""
        if isinstance(input_tensor, list):
            input_tensor = input_tensor[0]
        self.input_tensor = input_tensor

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids [B, S]; position_ids [B, S] (restarting per packed sample); cu_seqlens: sample
        boundaries over the flattened B*S tokens, when samples are packed.

        Returns vocab-parallel logits [B, S, V/tp] on the last stage, else hidden [S, B, H]."""
        batch, seq = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(seq, device=input_ids.device).expand(batch, seq)
        if self.pre_process:
            hidden = self.embedding(input_ids).transpose(0, 1).contiguous()
            if self.config.sequence_parallel:
                hidden = scatter_to_sequence_parallel_region(hidden)
        else:
            hidden = self.input_tensor
        rotary = self.rotary(position_ids)
        for layer in self.layers.values():
            hidden = run_with_recompute(self.recompute, layer, hidden, rotary, cu_seqlens)
        if not self.post_process:
            return hidden
        logits, _ = self.output_layer(self.final_layernorm(hidden))
        return logits.transpose(0, 1).contiguous()


def gather_vocab_logits(logits: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary logits from the vocab-parallel shards (for checks, not for the loss)."""
    return gather_from_tensor_model_parallel_region(logits)
