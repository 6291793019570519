"""Hydra structured-config schema for `conf/train.yaml`, the command-line checks, and the
conversion of the composed config to `TrainConfig`.

`register_schema()` stores the schema in Hydra's ConfigStore as `train_schema`; `conf/train.yaml`
lists it first in its defaults, so every preset and every command-line override is merged into
the typed dataclass tree: a wrongly typed value (`trainer.max_steps=abc`) or a value outside a
closed set (`export.profile=packed`, the enums of `choices.py`) fails in Hydra's composition.

The schema holds each section's global defaults (`ParallelSection()`, `TrainerSection()`), not
`TrainConfig()`'s demo layout, which the `model=tiny_moe` preset sets, so any other model starts
from ep=1 on one device. `model.hf_path` is `???` (mandatory) instead of None: a published model
preset needs a checkpoint, and the tiny presets set it to null.

`check_command_line` runs before Hydra in the process the user started. It refuses `-m` /
`--multirun` (one process runs one job: megatron's parallel state is set once per process, and
Lightning relaunches the ranks with the same command line) and any override key that is not a
config key, with or without Hydra's `+`, suggesting the nearest key; and it composes once so that
Hydra's own errors end in one line too. `to_train_config` refuses unknown keys as well, for
configs composed through Hydra's API. Keys under `callbacks.` are open: a user adds a callback
(`+callbacks.NAME._target_=...`) or its arguments, which `lora_trainer.training.instantiate`
checks before launch. `to_train_config` keeps the `callbacks` entries as written: their
interpolations are resolved when the callbacks are made, against the final configuration.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra._internal.utils import get_args_parser
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lora_trainer.errors import ConfigError
from lora_trainer.training.config import ModelConfig, ParallelSection, TrainConfig, TrainerSection

SCHEMA_NAME = "train_schema"
CONFIG_NAME = "train"
# Sections whose keys are not fixed by the schema (each entry names its own class and arguments).
OPEN_SECTIONS = ("callbacks",)

MISSING_HINTS: dict[str, str] = {
    "model.hf_path": (
        "the model preset{preset} needs a local Hugging Face checkpoint directory (config.json, "
        "*.safetensors, tokenizer files): add model.hf_path=/path/to/checkpoint"
    ),
}

SWEEPS_REFUSED = (
    "Hydra sweeps are not supported: each run needs its own process (megatron's parallel state is "
    "set once per process) and its own output_dir. Run one `python train.py` per setting, e.g. "
    "`for ep in 1 2; do python train.py parallel.ep=$ep output_dir=outputs/ep$ep; done`"
)


def register_schema() -> None:
    """Store the schema in Hydra's ConfigStore under `SCHEMA_NAME` (idempotent)."""
    schema = TrainConfig(
        model=ModelConfig(hf_path=MISSING), parallel=ParallelSection(), trainer=TrainerSection()
    )
    ConfigStore.instance().store(name=SCHEMA_NAME, node=schema)


def config_keys() -> list[str]:
    """Every key of the run configuration, dotted (`trainer`, `trainer.max_steps`, ...)."""
    return list(_paths(OmegaConf.structured(TrainConfig)))


def check_command_line(argv: list[str], config_dir: Path) -> None:
    """Raise ConfigError for a multirun, an unknown override key or a config Hydra cannot
    compose."""
    args = get_args_parser().parse_args(argv)
    if args.multirun:
        raise ConfigError(f"-m/--multirun: {SWEEPS_REFUSED}")
    try:
        overrides = OverridesParser.create().parse_overrides(args.overrides)
    except HydraException as err:
        raise ConfigError(_one_line(err)) from err
    known = set(config_keys()) | {path.name for path in config_dir.iterdir() if path.is_dir()}
    for override in overrides:
        key = override.key_or_group
        if not key.startswith(("hydra.", "hydra/")) and key not in known and not _is_open(key):
            raise unknown_key_error(key, sorted(known))
        if override.is_sweep_override():
            raise ConfigError(
                f"{override.input_line} sweeps over several values (for a list write "
                f"key=[a,b]): {SWEEPS_REFUSED}"
            )
    try:
        with initialize_config_dir(config_dir=str(config_dir.absolute()), version_base=None):
            cfg = compose(
                args.config_name or CONFIG_NAME, overrides=args.overrides, return_hydra_config=True
            )
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(_one_line(err)) from err
    if cfg.hydra.mode == RunMode.MULTIRUN:
        raise ConfigError(f"hydra.mode=MULTIRUN: {SWEEPS_REFUSED}")


def unknown_key_error(key: str, known: list[str]) -> ConfigError:
    """`key is not a config key`, with the nearest known key (difflib) when there is one."""
    nearest = difflib.get_close_matches(key, known, n=1)
    hint = (
        f"did you mean {nearest[0]}?"
        if nearest
        else "the keys are in README.md's configuration table"
    )
    return ConfigError(f"{key} is not a config key (with or without +); {hint}")


def to_train_config(cfg: DictConfig) -> TrainConfig:
    """The composed config as a `TrainConfig`; raises ConfigError naming every unset `???` key
    and any key the schema does not have. `callbacks` stays as written (unresolved)."""
    known = config_keys()
    unknown = [
        path
        for path in _paths(cfg)
        if path not in known and not path.startswith("hydra") and not _is_open(path)
    ]
    if unknown:
        raise unknown_key_error(unknown[0], known)
    fixed = OmegaConf.masked_copy(cfg, [str(key) for key in cfg if key not in OPEN_SECTIONS])
    missing = sorted(key for key in OmegaConf.missing_keys(fixed) if not key.startswith("hydra."))
    if missing:
        preset = f" model={_model_choice()}" if _model_choice() else ""
        reasons = [
            f"{key} is required: "
            + MISSING_HINTS.get(key, f"add {key}=<value>").format(preset=preset)
            for key in missing
        ]
        raise ConfigError("; ".join(reasons))
    if OmegaConf.get_type(cfg) is not TrainConfig:
        raise ConfigError(
            f"the composed config is a {OmegaConf.get_type(cfg)}, not a TrainConfig: "
            f"conf/train.yaml must list {SCHEMA_NAME!r} first in its defaults"
        )
    values: dict[str, Any] = {}
    for item in fields(TrainConfig):
        node = cfg._get_node(item.name)
        if item.name in OPEN_SECTIONS:
            values[item.name] = OmegaConf.to_container(node, resolve=False)
        elif isinstance(node, DictConfig):
            values[item.name] = OmegaConf.to_object(node)
        else:
            values[item.name] = cfg[item.name]
    return TrainConfig(**values)


def _is_open(key: str) -> bool:
    return key.startswith(tuple(f"{section}." for section in OPEN_SECTIONS))


def _paths(node: DictConfig, prefix: str = "") -> Iterator[str]:
    for key in node:
        path = prefix + str(key)
        yield path
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_missing() and not child._is_none():
            yield from _paths(child, f"{path}.")


def _one_line(err: Exception) -> str:
    """Hydra's message and its cause's on one line, without OmegaConf's `full_key:` /
    `object_type=` lines and Hydra's config search path."""
    parts = [str(err)] + ([str(err.__cause__)] if err.__cause__ is not None else [])
    message = ""
    for part in parts:
        for raw in part.split("Config search path:")[0].splitlines():
            line = raw.strip()
            if (
                not line
                or line.startswith(("full_key:", "object_type=", "reference_type="))
                or line in message
            ):
                continue
            listed = raw[:1].isspace() and not message.endswith(":")
            message += (
                " " if message.endswith(":") else ", " if listed else ": " if message else ""
            ) + line
    return message


def _model_choice() -> str | None:
    """The `model` group option Hydra composed (None outside a Hydra app)."""
    if not HydraConfig.initialized():
        return None
    return HydraConfig.get().runtime.choices.get("model")
