"""The feed-forward block of a Qwen3.5 layer: megatron-core's dense MLP or its MoELayer.

Dense: `linear_fc1` holds `[gate_t; up_t]` per TP rank, silu-gated, then row-parallel `linear_fc2`.
MoE: megatron's top-k softmax router (top-k over logits then softmax over the k, which equals HF's
softmax -> top-k -> renormalise, `norm_topk_prob`), alltoall token dispatcher, the routed experts
of this expert-parallel rank as grouped GEMMs (`GroupedExperts`: `experts.linear_fc1.weight`
[E_local, 2I, H], `experts.linear_fc2.weight` [E_local, H, I]), and the shared expert scaled by
`sigmoid(shared_experts.gate_weight @ x)`.
"""

from __future__ import annotations

from dataclasses import replace

from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import nn

from lora_trainer.qwen35.experts import GroupedExperts
from lora_trainer.qwen35.spec import Qwen35Spec


def build_mlp(spec: Qwen35Spec, config: TransformerConfig) -> nn.Module:
    """A module mapping [S, B, H] -> ([S, B, H], bias), dense or MoE per the spec."""
    if spec.is_moe:
        moe_spec = get_moe_module_spec(
            use_te=False, num_experts=spec.num_experts, moe_grouped_gemm=False
        )
        moe_spec.submodules = replace(
            moe_spec.submodules, experts=ModuleSpec(module=GroupedExperts)
        )
        return build_module(moe_spec, config=config)
    submodules = MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
    return MLP(config, submodules, ffn_hidden_size=spec.intermediate_size)
