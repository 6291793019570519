"""The one declarative table between HF Qwen3.5 tensor names and Megatron parameter names.

Each rule names a Megatron parameter (relative to `layers.{L}.` for layer rules), the
group that splits it (`tp`, the expert tensor-parallel group `etp`, or none), and a transform
built from the model's sizes. HF names are relative to the text prefix (`model.` for
ForCausalLM checkpoints, `model.language_model.` for ForConditionalGeneration) except `lm_head`.
Routed experts exist on disk packed (`mlp.experts.gate_up_proj` [E, 2I, H], `down_proj`
[E, H, I]) or per expert (`mlp.experts.{e}.gate_proj.weight`, ...); both map to slice i of the
3D `mlp.experts.linear_fc1.weight` / `linear_fc2.weight`, with i the expert's index on its
expert-parallel rank (`ParamMapping.expert_slot`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Literal

import torch

from lora_trainer.bridge.transforms import (
    Block,
    GatedQKV,
    HFRef,
    Replicated,
    SplitBlocks,
    Transform,
)
from lora_trainer.parallel.groups import SplitGroup
from lora_trainer.qwen35.spec import Qwen35Spec

ExpertLayout = Literal["packed", "per_expert"]


class Where(Enum):
    """Which layers a rule applies to."""

    ATTENTION = "full_attention"
    GDN = "linear_attention"
    EVERY_LAYER = "every_layer"
    DENSE = "dense"
    MOE = "moe"
    EXPERT = "expert"


@dataclass(frozen=True)
class ParamMapping:
    """One Megatron parameter of this rank, where it comes from, and how it is split."""

    megatron_name: str
    group: SplitGroup
    transform: Transform
    exported: bool = True
    expert_slot: int | None = None

    def local_tensor(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """This mapping's tensor among a rank's parameters (one expert's slice for routed
        experts)."""
        tensor = tensors[self.megatron_name]
        return tensor if self.expert_slot is None else tensor[self.expert_slot]


@dataclass(frozen=True)
class Names:
    """Turns rule-relative HF names into full checkpoint names for one layer / expert."""

    spec: Qwen35Spec
    layer: int = -1
    expert: int = -1
    layout: ExpertLayout = "packed"

    def text(self, suffix: str) -> HFRef:
        return HFRef(self.spec.text_prefix + suffix)

    def layer_ref(self, suffix: str) -> HFRef:
        return self.text(f"layers.{self.layer}.{suffix}")

    def expert_ref(self, projection: str) -> HFRef:
        """`projection` is gate_up_proj or down_proj; per expert, gate_up is two tensors."""
        if self.layout == "packed":
            return HFRef(self.layer_ref(f"mlp.experts.{projection}").name, expert=self.expert)
        return self.layer_ref(f"mlp.experts.{self.expert}.{projection}.weight")


def _whole(ref: HFRef, shape: tuple[int, ...], dim: int = 0) -> Block:
    return Block(ref, shape, 0, shape[dim])


def _rows(n: Names, suffix: str, rows: int, cols: int) -> Block:
    return _whole(n.layer_ref(suffix), (rows, cols))


def _gated_qkv(s: Qwen35Spec, n: Names) -> Transform:
    d, h = s.head_dim, s.hidden_size
    return GatedQKV(
        q=_rows(n, "self_attn.q_proj.weight", 2 * s.num_attention_heads * d, h),
        k=_rows(n, "self_attn.k_proj.weight", s.num_key_value_heads * d, h),
        v=_rows(n, "self_attn.v_proj.weight", s.num_key_value_heads * d, h),
        groups=s.num_key_value_heads,
        heads_per_group=s.num_attention_heads // s.num_key_value_heads,
        head_dim=d,
    )


def _gdn_qkv_blocks(s: Qwen35Spec, ref: HFRef, shape: tuple[int, ...]) -> list[Block]:
    """q, k and v channels of the GDN qkv projection / conv: each split by heads."""
    kd, vd = s.gdn_key_dim, s.gdn_value_dim
    return [Block(ref, shape, 0, kd), Block(ref, shape, kd, kd), Block(ref, shape, 2 * kd, vd)]


def _gdn_in_proj(s: Qwen35Spec, n: Names) -> Transform:
    h, vh = s.hidden_size, s.linear_num_value_heads
    qkv = n.layer_ref("linear_attn.in_proj_qkv.weight")
    return SplitBlocks(
        (
            *_gdn_qkv_blocks(s, qkv, (s.gdn_conv_dim, h)),
            _rows(n, "linear_attn.in_proj_z.weight", s.gdn_value_dim, h),
            _rows(n, "linear_attn.in_proj_b.weight", vh, h),
            _rows(n, "linear_attn.in_proj_a.weight", vh, h),
        )
    )


def _gdn_conv(s: Qwen35Spec, n: Names) -> Transform:
    ref = n.layer_ref("linear_attn.conv1d.weight")
    return SplitBlocks(
        tuple(_gdn_qkv_blocks(s, ref, (s.gdn_conv_dim, 1, s.linear_conv_kernel_dim)))
    )


def _heads(suffix: str) -> Callable[[Qwen35Spec, Names], Transform]:
    return lambda s, n: SplitBlocks((_whole(n.layer_ref(suffix), (s.linear_num_value_heads,)),))


def _norm(
    suffix: str, size: Callable[[Qwen35Spec], int]
) -> Callable[[Qwen35Spec, Names], Transform]:
    return lambda s, n: Replicated(_whole(n.layer_ref(suffix), (size(s),)))


def _row(
    suffix: str, cols: Callable[[Qwen35Spec], int]
) -> Callable[[Qwen35Spec, Names], Transform]:
    return lambda s, n: SplitBlocks(
        (_whole(n.layer_ref(suffix), (s.hidden_size, cols(s)), dim=1),), dim=1
    )


def _gated_fc1(
    prefix: str, width: Callable[[Qwen35Spec], int]
) -> Callable[[Qwen35Spec, Names], Transform]:
    return lambda s, n: SplitBlocks(
        (
            _rows(n, f"{prefix}.gate_proj.weight", width(s), s.hidden_size),
            _rows(n, f"{prefix}.up_proj.weight", width(s), s.hidden_size),
        )
    )


def _expert_fc1(s: Qwen35Spec, n: Names) -> Transform:
    i, h = s.moe_intermediate_size, s.hidden_size
    if n.layout == "packed":
        ref = n.expert_ref("gate_up_proj")
        shape = (s.num_experts, 2 * i, h)
        return SplitBlocks((Block(ref, shape, 0, i), Block(ref, shape, i, i)))
    gate = n.layer_ref(f"mlp.experts.{n.expert}.gate_proj.weight")
    up = n.layer_ref(f"mlp.experts.{n.expert}.up_proj.weight")
    return SplitBlocks((_whole(gate, (i, h)), _whole(up, (i, h))))


def _expert_fc2(s: Qwen35Spec, n: Names) -> Transform:
    i, h = s.moe_intermediate_size, s.hidden_size
    ref = n.expert_ref("down_proj")
    shape = (s.num_experts, h, i) if n.layout == "packed" else (h, i)
    return SplitBlocks((Block(ref, shape, 0, i),), dim=1)


_SHARED = lambda s: s.shared_expert_intermediate_size  # noqa: E731
_DENSE = lambda s: s.intermediate_size  # noqa: E731
_H = lambda s: s.hidden_size  # noqa: E731

# (where, megatron name relative to the layer, split group, transform factory)
LAYER_RULES: tuple[tuple[Where, str, SplitGroup, Callable[[Qwen35Spec, Names], Transform]], ...] = (
    (Where.EVERY_LAYER, "input_layernorm.weight", "none", _norm("input_layernorm.weight", _H)),
    (
        Where.EVERY_LAYER,
        "pre_mlp_layernorm.weight",
        "none",
        _norm("post_attention_layernorm.weight", _H),
    ),
    (Where.ATTENTION, "self_attention.linear_qkv.weight", "tp", _gated_qkv),
    (
        Where.ATTENTION,
        "self_attention.q_layernorm.weight",
        "none",
        _norm("self_attn.q_norm.weight", lambda s: s.head_dim),
    ),
    (
        Where.ATTENTION,
        "self_attention.k_layernorm.weight",
        "none",
        _norm("self_attn.k_norm.weight", lambda s: s.head_dim),
    ),
    (
        Where.ATTENTION,
        "self_attention.linear_proj.weight",
        "tp",
        _row("self_attn.o_proj.weight", lambda s: s.num_attention_heads * s.head_dim),
    ),
    (Where.GDN, "self_attention.in_proj.weight", "tp", _gdn_in_proj),
    (Where.GDN, "self_attention.conv1d_weight", "tp", _gdn_conv),
    (Where.GDN, "self_attention.A_log", "tp", _heads("linear_attn.A_log")),
    (Where.GDN, "self_attention.dt_bias", "tp", _heads("linear_attn.dt_bias")),
    (
        Where.GDN,
        "self_attention.out_norm.weight",
        "none",
        _norm("linear_attn.norm.weight", lambda s: s.linear_value_head_dim),
    ),
    (
        Where.GDN,
        "self_attention.out_proj.weight",
        "tp",
        _row("linear_attn.out_proj.weight", lambda s: s.gdn_value_dim),
    ),
    (Where.DENSE, "mlp.linear_fc1.weight", "tp", _gated_fc1("mlp", _DENSE)),
    (Where.DENSE, "mlp.linear_fc2.weight", "tp", _row("mlp.down_proj.weight", _DENSE)),
    (
        Where.MOE,
        "mlp.router.weight",
        "none",
        lambda s, n: Replicated(
            _whole(n.layer_ref("mlp.gate.weight"), (s.num_experts, s.hidden_size))
        ),
    ),
    (
        Where.MOE,
        "mlp.shared_experts.linear_fc1.weight",
        "tp",
        _gated_fc1("mlp.shared_expert", _SHARED),
    ),
    (
        Where.MOE,
        "mlp.shared_experts.linear_fc2.weight",
        "tp",
        _row("mlp.shared_expert.down_proj.weight", _SHARED),
    ),
    (
        Where.MOE,
        "mlp.shared_experts.gate_weight",
        "none",
        lambda s, n: Replicated(
            _whole(n.layer_ref("mlp.shared_expert_gate.weight"), (1, s.hidden_size))
        ),
    ),
    (Where.EXPERT, "mlp.experts.linear_fc1.weight", "etp", _expert_fc1),
    (Where.EXPERT, "mlp.experts.linear_fc2.weight", "etp", _expert_fc2),
)


def _layer_applies(where: Where, spec: Qwen35Spec, layer: int) -> bool:
    if where in (Where.ATTENTION, Where.GDN):
        return spec.layer_types[layer] == where.value
    if where == Where.DENSE:
        return not spec.is_moe
    if where in (Where.MOE, Where.EXPERT):
        return spec.is_moe
    return where == Where.EVERY_LAYER


def build_mapping(
    spec: Qwen35Spec,
    layers: range,
    *,
    first_stage: bool,
    last_stage: bool,
    local_experts: range = range(0),
    expert_layout: ExpertLayout = "packed",
) -> list[ParamMapping]:
    """Every Megatron parameter one rank holds: its pipeline stage's `layers` and, on MoE models,
    the global expert indices `local_experts` of its expert-parallel rank."""
    names = Names(spec, layout=expert_layout)
    mappings: list[ParamMapping] = []
    embed = _whole(names.text("embed_tokens.weight"), (spec.vocab_size, spec.hidden_size))
    if first_stage:
        mappings.append(ParamMapping("embedding.weight", "tp", SplitBlocks((embed,))))
    for layer in layers:
        for where, name, group, factory in LAYER_RULES:
            if not _layer_applies(where, spec, layer):
                continue
            if where != Where.EXPERT:
                mappings.append(
                    ParamMapping(f"layers.{layer}.{name}", group, factory(spec, Names(spec, layer)))
                )
                continue
            for slot, expert in enumerate(local_experts):
                n = Names(spec, layer, expert, expert_layout)
                mappings.append(
                    ParamMapping(
                        f"layers.{layer}.{name}", group, factory(spec, n), expert_slot=slot
                    )
                )
    if last_stage:
        final_norm = _whole(names.text("norm.weight"), (spec.hidden_size,))
        mappings.append(ParamMapping("final_layernorm.weight", "none", Replicated(final_norm)))
        head = embed if spec.tie_word_embeddings else _whole(HFRef("lm_head.weight"), embed.shape)
        mappings.append(
            ParamMapping(
                "output_layer.weight",
                "tp",
                SplitBlocks((head,)),
                exported=not spec.tie_word_embeddings,
            )
        )
    return mappings


def is_skipped_hf_name(name: str) -> bool:
    """Checkpoint tensors outside the text model, recognised and left alone on load: the vision
    tower and the multi-token-prediction head. The merged export copies them through."""
    return name.startswith(("model.visual.", "visual.", "mtp.", "model.mtp."))
