"""Hydra structured-config schema for `conf/train.yaml`, and the conversion to `TrainConfig`.

`register_schema()` stores `TrainConfig` in Hydra's ConfigStore as `train_schema`; `conf/train.yaml`
lists it first in its defaults, so every group file and every command-line override is merged
into the typed dataclass tree: an unknown key (`trainer.max_step=3`) or a wrongly typed value
(`trainer.max_steps=abc`) fails in Hydra's composition with its own message, before any code of
the run starts.

In the stored schema `model.hf_path` is `???` (mandatory) instead of the dataclass default None:
OmegaConf ignores a `???` merged over a set value, so only a schema without a default lets a model
preset's `hf_path: ???` stay mandatory. Every file of `conf/model/` therefore sets `hf_path`
(null for the tiny models).
"""

from __future__ import annotations

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import MISSING, DictConfig, OmegaConf

from lora_trainer.errors import ConfigError
from lora_trainer.training.config import ModelConfig, TrainConfig

SCHEMA_NAME = "train_schema"

MISSING_HINTS: dict[str, str] = {
    "model.hf_path": (
        "the model preset{preset} needs a local Hugging Face checkpoint directory (config.json, "
        "*.safetensors, tokenizer files): add model.hf_path=/path/to/checkpoint"
    ),
}


def register_schema() -> None:
    """Store `TrainConfig` in Hydra's ConfigStore under `SCHEMA_NAME` (idempotent)."""
    schema = TrainConfig(model=ModelConfig(hf_path=MISSING))
    ConfigStore.instance().store(name=SCHEMA_NAME, node=schema)


def to_train_config(cfg: DictConfig) -> TrainConfig:
    """The composed config as a `TrainConfig`; raises ConfigError naming every unset `???` key."""
    missing = sorted(key for key in OmegaConf.missing_keys(cfg) if not key.startswith("hydra."))
    if missing:
        preset = f" model={_model_choice()}" if _model_choice() else ""
        reasons = [
            f"{key} is required: " + MISSING_HINTS.get(key, f"add {key}=<value>").format(preset=preset)
            for key in missing
        ]
        raise ConfigError("; ".join(reasons))
    config = OmegaConf.to_object(cfg)
    if not isinstance(config, TrainConfig):
        raise ConfigError(
            f"the composed config is a {type(config).__name__}, not a TrainConfig: "
            f"conf/train.yaml must list {SCHEMA_NAME!r} first in its defaults"
        )
    return config


def _model_choice() -> str | None:
    """The `model` group option Hydra composed (None outside a Hydra app)."""
    if not HydraConfig.initialized():
        return None
    return HydraConfig.get().runtime.choices.get("model")
