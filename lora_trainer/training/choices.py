"""The closed sets of the run configuration, one `StrEnum` each.

A config field typed with one of these enums takes only its members: Hydra rejects any other
value while composing, naming the choices (`Invalid value 'packed', expected one of [peft,
per_expert]`). Members compare equal to their string values, so library code keeps using plain
strings. Member names equal their values because OmegaConf converts `key=value` by member name.

To add a closed set: define a `StrEnum` here and type the field in `config.py` with it.
"""

from __future__ import annotations

from enum import StrEnum


class TinyKind(StrEnum):
    """`model.tiny`: which embedded tiny random model to build when `model.hf_path` is null."""

    moe = "moe"
    dense = "dense"


class ModelDtype(StrEnum):
    """`model.dtype`: parameter dtype; auto is bfloat16 on GPU, float32 on CPU."""

    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"


class LoraStyle(StrEnum):
    """`lora.style`: fused (one adapter per fused Megatron weight) or canonical (one per HF
    projection)."""

    fused = "fused"
    canonical = "canonical"


class ExportProfile(StrEnum):
    """`export.profile`: routed-expert layout of the exported adapter."""

    peft = "peft"
    per_expert = "per_expert"


class LoggerKind(StrEnum):
    """`logger.kind`: the experiment logger."""

    wandb = "wandb"
    none = "none"


class TrainOn(StrEnum):
    """`data.train_on`: which assistant turns of a conversation are trained."""

    all_assistant = "all_assistant"
    last_assistant = "last_assistant"


class Overlong(StrEnum):
    """`data.overlong`: what becomes of a sample longer than `data.max_seq_len` tokens."""

    drop = "drop"
    truncate = "truncate"
    error = "error"
