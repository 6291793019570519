"""The megatron-core `TransformerConfig` for a Qwen3.5 spec and a parallel layout."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

from lora_trainer.parallel.config import ParallelConfig
from lora_trainer.qwen35.spec import Qwen35Spec


def build_transformer_config(
    spec: Qwen35Spec, parallel: ParallelConfig, params_dtype: torch.dtype = torch.float32
) -> TransformerConfig:
    """Sizes from the spec, parallel sizes from `parallel`; every fusion off so CPU and GPU share
    one code path (the fast paths live in `lora_trainer.kernels`). Weights are not initialised:
    they are always loaded from a Hugging Face checkpoint."""
    on_gpu = torch.cuda.is_available()
    moe = spec.is_moe
    return TransformerConfig(
        num_layers=spec.num_layers,
        hidden_size=spec.hidden_size,
        num_attention_heads=spec.num_attention_heads,
        num_query_groups=spec.num_key_value_heads,
        kv_channels=spec.head_dim,
        ffn_hidden_size=spec.moe_intermediate_size if moe else spec.intermediate_size,
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        expert_model_parallel_size=parallel.ep,
        expert_tensor_parallel_size=parallel.etp,
        sequence_parallel=parallel.sp,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        normalization="RMSNorm",
        layernorm_epsilon=spec.rms_norm_eps,
        qk_layernorm=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        use_cpu_initialization=not on_gpu,
        perform_initialization=False,
        gradient_accumulation_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        batch_p2p_sync=on_gpu,
        num_moe_experts=spec.num_experts if moe else None,
        moe_router_topk=spec.num_experts_per_tok if moe else 2,
        moe_ffn_hidden_size=spec.moe_intermediate_size if moe else None,
        moe_shared_expert_intermediate_size=(spec.shared_expert_intermediate_size or None)
        if moe
        else None,
        moe_shared_expert_gate=moe and spec.shared_expert_intermediate_size > 0,
        moe_router_score_function="softmax",
        moe_router_pre_softmax=False,
        moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0,
        moe_router_dtype="fp32",
        moe_token_dispatcher_type="alltoall",
        moe_grouped_gemm=False,
    )
