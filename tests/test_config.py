"""conf/ + Hydra schema, validate_config, the tiny checkpoint builder and train.py's failure
path."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from dataclasses import fields, replace
from pathlib import Path
from typing import get_args

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

from callbacks.checkpoint_export import CheckpointExportCallback
from callbacks.step_progress import StepProgressBar
from lora_trainer.data.formats import Columns
from lora_trainer.data.pipeline import SourceSpec
from lora_trainer.demo import model as demo_model
from lora_trainer.demo.model import ensure_tiny_checkpoint, tiny_checkpoint_path
from lora_trainer.demo.tokenizer import TINY_SFT_PATH
from lora_trainer.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    LoraTrainerError,
    ParallelConfigError,
)
from lora_trainer.export.peft_adapter import Profile
from lora_trainer.lora import config as lora_config
from lora_trainer.lora.config import LoraConfigError
from lora_trainer.saves import write_state_manifest
from lora_trainer.training import choices
from lora_trainer.training.config import ExportSection, LoggerSection, ModelConfig, TrainConfig
from lora_trainer.training.hydra_schema import config_keys, register_schema, to_train_config
from lora_trainer.training.instantiate import instantiate_callbacks
from lora_trainer.training.launch import is_relaunched_rank
from lora_trainer.training.resume import run_settings
from lora_trainer.training.validate import is_complete_save, resolve_run, validate_config
from tests import fs_events
from tests.callback_probe import StepRecorder

ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = ROOT / "conf"
PRESETS = sorted(path.stem for path in (CONF_DIR / "model").glob("qwen3_5_*.yaml"))
LAYOUTS = sorted(path.stem for path in (CONF_DIR / "layout").glob("*.yaml"))

register_schema()


def compose_config(*overrides: str) -> TrainConfig:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return to_train_config(compose(config_name="train", overrides=list(overrides)))


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache directory holding both tiny checkpoints, built once for the whole session."""
    cache = tmp_path_factory.mktemp("tiny_models")
    for kind in demo_model.TINY_KINDS:
        ensure_tiny_checkpoint(kind, cache)  # type: ignore[arg-type]
    return cache


@pytest.fixture
def config_with(tiny_cache: Path, tmp_path: Path):
    """Compose with overrides, on the session's tiny cache and a per-test output_dir."""

    def make(*overrides: str) -> TrainConfig:
        return compose_config(
            f"model.tiny_cache_dir={tiny_cache}", f"output_dir={tmp_path / 'out'}", *overrides
        )

    return make


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


GOOD_LINE = json.dumps(
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
)


# ---------------------------------------------------------------------------------- composition


def test_default_is_the_embedded_tiny_moe_run() -> None:
    config = compose_config()
    assert isinstance(config, TrainConfig)
    assert (config.model.hf_path, config.model.tiny) == (None, "moe")
    assert (config.parallel.tp, config.parallel.pp, config.parallel.ep, config.parallel.sp) == (
        1,
        1,
        2,
        False,
    )
    assert (config.trainer.devices, config.trainer.num_nodes) == (2, 1)
    assert config.trainer.max_steps == 40
    assert (config.trainer.global_batch_size, config.trainer.micro_batch_size) == (8, 2)
    assert config.data.max_seq_len == 128 and config.data.train_path is None
    assert config.checkpoint.every_n_steps == 20
    assert config.export.adapter and config.export.merged and config.export.profile == "peft"
    assert config.logger.kind == "wandb"
    assert config.resume is None


def test_no_overrides_compose_to_train_config_defaults() -> None:
    """conf/ holds no second copy of a default: `python train.py` with no overrides is
    TrainConfig()."""
    composed, default = compose_config(), TrainConfig()
    differences = [
        f"{section.name}.{key.name}: conf {getattr(getattr(composed, section.name), key.name)!r} "
        f"!= TrainConfig() {getattr(getattr(default, section.name), key.name)!r}"
        for section in fields(TrainConfig)
        if hasattr(getattr(default, section.name), "__dataclass_fields__")
        for key in fields(getattr(default, section.name))
        if getattr(getattr(composed, section.name), key.name)
        != getattr(getattr(default, section.name), key.name)
    ]
    differences += [
        f"{key.name}: conf {getattr(composed, key.name)!r} != TrainConfig() "
        f"{getattr(default, key.name)!r}"
        for key in fields(TrainConfig)
        if not hasattr(getattr(default, key.name), "__dataclass_fields__")
        and getattr(composed, key.name) != getattr(default, key.name)
    ]
    assert differences == []
    assert composed == default


def test_data_columns_are_set_from_the_command_line() -> None:
    """`data.columns` is the data formats' own `Columns`, and overrides set its fields."""
    composed = compose_config("data.columns.prompt=instruction", "data.columns.completion=output")
    assert composed.data.columns == Columns(prompt="instruction", completion="output")
    with pytest.raises(ConfigCompositionException):
        compose_config("data.columns.answer=output")


def test_the_demo_layout_belongs_to_the_demo_preset_only() -> None:
    """Only model=tiny_moe (the default) splits experts over 2 ranks; every other model starts at
    ep=1, 1 device."""
    for overrides in (
        ["model=tiny_dense"],
        *[[f"model={p}", "model.hf_path=/models/q"] for p in PRESETS],
    ):
        config = compose_config(*overrides)
        assert (config.parallel.ep, config.trainer.devices) == (1, 1), overrides
    assert config.parallel == replace(TrainConfig().parallel, ep=1)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_fits_its_ranks(layout: str) -> None:
    preset = next((p for p in PRESETS if layout.startswith(p)), "qwen3_5_9b")
    config = compose_config(f"model={preset}", "model.hf_path=/models/q", f"layout={layout}")
    world = config.trainer.devices * config.trainer.num_nodes
    parallel = config.parallel.to_parallel_config()
    parallel.validate(world)
    assert world >= 8 and parallel.dp_size(world) >= 2


def test_published_layouts_are_selectable() -> None:
    config = compose_config(
        "model=qwen3_5_35b_a3b", "model.hf_path=/models/q", "layout=qwen3_5_35b_a3b_8gpu"
    )
    assert (config.parallel.ep, config.parallel.tp, config.trainer.devices) == (8, 1, 8)
    config = compose_config(
        "model=qwen3_5_397b_a17b", "model.hf_path=/m", "layout=qwen3_5_397b_a17b_4x8gpu"
    )
    assert (
        config.parallel.pp,
        config.parallel.ep,
        config.trainer.devices,
        config.trainer.num_nodes,
    ) == (4, 8, 8, 4)
    config = compose_config("model=qwen3_5_27b", "model.hf_path=/m", "layout=qwen3_5_27b_8gpu_tp4")
    assert (config.parallel.tp, config.parallel.sp, config.parallel.ep) == (4, True, 1)
    suggested = {
        preset: re.findall(r"layout=(\w+)", (CONF_DIR / "model" / f"{preset}.yaml").read_text())
        for preset in PRESETS
    }
    assert all(names and set(names) <= set(LAYOUTS) for names in suggested.values()), suggested
    assert set(LAYOUTS) == {name for names in suggested.values() for name in names}


def test_hydra_keeps_the_working_directory_and_writes_under_output_dir() -> None:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose(
            config_name="train", overrides=["output_dir=/runs/a"], return_hydra_config=True
        )
    assert cfg.hydra.job.chdir is False
    assert cfg.hydra.run.dir.startswith("/runs/a/hydra/")


OVERRIDES: list[tuple[str, str, object]] = [
    ("model.hf_path=/models/q", "model.hf_path", "/models/q"),
    ("data.train_path=train.jsonl", "data.train_path", "train.jsonl"),
    ("data.val_path=val.jsonl", "data.val_path", "val.jsonl"),
    ("data.max_seq_len=64", "data.max_seq_len", 64),
    ("parallel.tp=2", "parallel.tp", 2),
    ("parallel.pp=2", "parallel.pp", 2),
    ("parallel.ep=1", "parallel.ep", 1),
    ("parallel.sp=true", "parallel.sp", True),
    ("trainer.devices=8", "trainer.devices", 8),
    ("trainer.num_nodes=2", "trainer.num_nodes", 2),
    ("trainer.max_steps=7", "trainer.max_steps", 7),
    ("trainer.global_batch_size=16", "trainer.global_batch_size", 16),
    ("trainer.micro_batch_size=4", "trainer.micro_batch_size", 4),
    ("optim.lr=3e-4", "optim.lr", 3e-4),
    ("lora.r=8", "lora.r", 8),
    ("lora.alpha=16", "lora.alpha", 16.0),
    ("lora.targets=[linear_qkv,in_proj]", "lora.targets", ["linear_qkv", "in_proj"]),
    ("lora.style=canonical", "lora.style", "canonical"),
    ("checkpoint.every_n_steps=5", "checkpoint.every_n_steps", 5),
    ("checkpoint.keep_last=3", "checkpoint.keep_last", 3),
    ("export.adapter=false", "export.adapter", False),
    ("export.merged=false", "export.merged", False),
    ("export.profile=per_expert", "export.profile", "per_expert"),
    ("export.check=true", "export.check", True),
    ("export.background=false", "export.background", False),
    ("model.recompute=selective", "model.recompute", "selective"),
    ("export.check_memory_gb=2.5", "export.check_memory_gb", 2.5),
    ("output_dir=/runs/b", "output_dir", "/runs/b"),
    ("resume=latest", "resume", "latest"),
    ("logger=none", "logger.kind", "none"),
    ("logger=wandb", "logger.kind", "wandb"),
    ("logger.kind=none", "logger.kind", "none"),
    ("model.dtype=bfloat16", "model.dtype", "bfloat16"),
    ("model=tiny_dense", "model.tiny", "dense"),
    ("layout=dp_8gpu", "trainer.devices", 8),
]


@pytest.mark.parametrize(("override", "key", "expected"), OVERRIDES, ids=[o[0] for o in OVERRIDES])
def test_every_public_key_lands_in_the_train_config(
    override: str, key: str, expected: object
) -> None:
    value: object = compose_config(override)
    for part in key.split("."):
        value = getattr(value, part)
    assert value == expected


@pytest.mark.parametrize(
    "override", ["trainer.max_step=3", "trainer.max_steps=abc", "logger=nope", "lora.rank=4"]
)
def test_a_wrong_key_or_value_fails_in_hydra(override: str) -> None:
    with pytest.raises(ConfigCompositionException):
        compose_config(override)


@pytest.mark.parametrize(
    ("override", "nearest"),
    [
        ("+trainer.max_step=3", "trainer.max_steps"),
        ("+lora.rank=4", "lora.r"),
        ("++optim.warmup=1", "optim.warmup_steps"),
    ],
)
def test_an_added_unknown_key_fails_naming_the_nearest(override: str, nearest: str) -> None:
    key = override.lstrip("+").split("=")[0]
    with pytest.raises(ConfigError, match=rf"^{key} is not a config key.*did you mean {nearest}\?"):
        compose_config(override)


CLOSED_SETS: list[tuple[str, str]] = [
    ("export.profile=packed", "[peft, per_expert]"),
    ("logger.kind=tensorboard", "[wandb, none]"),
    ("model.dtype=fp8", "[auto, float32, bfloat16]"),
    ("lora.style=split", "[fused, canonical]"),
    ("model.tiny=large", "[moe, dense]"),
    ("model.recompute=sometimes", "[none, selective, full]"),
]


@pytest.mark.parametrize(("override", "choices"), CLOSED_SETS, ids=[c[0] for c in CLOSED_SETS])
def test_hydra_rejects_a_value_outside_a_closed_set_naming_the_choices(
    override: str, choices: str
) -> None:
    with pytest.raises(ConfigCompositionException) as caught:
        compose_config(override)
    assert f"expected one of {choices}" in str(caught.value.__cause__)


def test_the_enums_are_the_library_closed_sets() -> None:
    assert set(choices.ExportProfile) == set(get_args(Profile))
    assert set(choices.LoraStyle) == set(get_args(lora_config.LoraStyle))
    assert set(choices.TinyKind) == set(demo_model.TINY_KINDS)
    assert "trainer.max_steps" in config_keys() and "lora" in config_keys()


@pytest.mark.parametrize("preset", PRESETS)
def test_a_model_preset_requires_hf_path(preset: str) -> None:
    with pytest.raises(ConfigError, match=r"model\.hf_path"):
        compose_config(f"model={preset}")
    config = compose_config(f"model={preset}", "model.hf_path=/models/q")
    assert (config.model.hf_path, config.model.tiny) == ("/models/q", None)


def test_presets_cover_the_published_sizes() -> None:
    assert {"qwen3_5_35b_a3b", "qwen3_5_27b", "qwen3_5_397b_a17b"} <= set(PRESETS)


# ---------------------------------------------------------------------------------- callbacks


def test_the_callbacks_are_made_from_the_config_with_its_values(tmp_path: Path) -> None:
    config = compose_config(
        f"output_dir={tmp_path}",
        "checkpoint.every_n_steps=5",
        "checkpoint.keep_last=3",
        "export.profile=per_expert",
        "export.background=false",
        "+callbacks.probe._target_=tests.callback_probe.StepRecorder",
        f"+callbacks.probe.path={tmp_path / 'probe'}",
        "+callbacks.probe.every=${checkpoint.every_n_steps}",
    )
    assert config.callbacks["save"]["every_n_steps"] == "${checkpoint.every_n_steps}"
    save, progress, probe = instantiate_callbacks(config)
    assert isinstance(save, CheckpointExportCallback) and isinstance(progress, StepProgressBar)
    assert (save.root, save.every_n_steps, save.keep_last) == (tmp_path / "checkpoints", 5, 3)
    assert (save.profile, save.in_background) == ("per_expert", False)
    assert isinstance(probe, StepRecorder) and (probe.path, probe.every) == (tmp_path / "probe", 5)
    changed = replace(config, checkpoint=replace(config.checkpoint, every_n_steps=7))
    assert [cb.every for cb in instantiate_callbacks(changed) if isinstance(cb, StepRecorder)] == [
        7
    ]


@pytest.mark.parametrize(
    "overrides", [["~callbacks.progress"], ["callbacks.progress=null"]], ids=["deleted", "null"]
)
def test_a_callback_is_left_out_by_deleting_or_nulling_it(overrides: list[str]) -> None:
    callbacks = instantiate_callbacks(compose_config(*overrides))
    assert [type(callback) for callback in callbacks] == [CheckpointExportCallback]


CALLBACK_ERRORS: list[tuple[str, str]] = [
    (
        "+callbacks.probe._target_=nowhere.Probe",
        "callbacks.probe (_target_=nowhere.Probe) cannot be made: ModuleNotFoundError: No module "
        "named 'nowhere'",
    ),
    (
        "+callbacks.save.keep=3",
        "callbacks.save (_target_=callbacks.checkpoint_export.CheckpointExportCallback) cannot be "
        "made: TypeError: CheckpointExportCallback.__init__() got an unexpected keyword argument "
        "'keep'",
    ),
    (
        "callbacks.save.every_n_steps=${checkpoint.every}",
        "callbacks.save (_target_=callbacks.checkpoint_export.CheckpointExportCallback) cannot be "
        "made: InterpolationKeyError: Interpolation key 'checkpoint.every' not found",
    ),
    (
        "+callbacks.probe._target_=builtins.dict",
        "callbacks.probe._target_=builtins.dict makes a dict, not a Lightning callback",
    ),
    ("+callbacks.probe.path=/tmp", "callbacks.probe has no _target_"),
]


@pytest.mark.parametrize(
    ("override", "message"), CALLBACK_ERRORS, ids=[c[0] for c in CALLBACK_ERRORS]
)
def test_a_callback_that_cannot_be_made_is_refused_naming_its_key(
    override: str, message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        instantiate_callbacks(compose_config(override))
    assert str(caught.value).startswith(message)


# ---------------------------------------------------------------------------------- validate_config


def test_default_config_resolves(config_with, tiny_cache: Path) -> None:
    config = config_with()
    run = validate_config(config)
    assert run.hf_path == tiny_checkpoint_path("moe", tiny_cache)
    assert run.spec.is_moe and run.spec.vocab_size == 512
    assert (run.world_size, run.dp_size, run.expert_dp_size, run.num_microbatches) == (2, 2, 1, 2)
    assert run.parallel.ep == 2 and run.lora.r == 16
    assert run.train_sources == (SourceSpec(TINY_SFT_PATH),) and run.val_sources is None
    assert run.resume_path is None
    assert run.save_dir(20) == run.output_dir / "checkpoints" / "step-20"
    assert resolve_run(config) == run


def test_resolve_run_does_not_build_the_tiny_model(tmp_path: Path) -> None:
    config = compose_config(f"model.tiny_cache_dir={tmp_path}")
    with pytest.raises(CheckpointError, match="has not been built"):
        resolve_run(config)


ERROR_CASES: list[tuple[list[str], type[LoraTrainerError], str]] = [
    (["model.tiny=null"], ConfigError, "model.hf_path"),
    (["export.check_memory_gb=0"], ConfigError, "export.check_memory_gb"),
    (["model.hf_path=/nonexistent/model"], CheckpointError, "model.hf_path"),
    (
        ["parallel.tp=4", "parallel.ep=1", "parallel.sp=true", "trainer.devices=4"],
        ParallelConfigError,
        "parallel.tp",
    ),
    (
        ["parallel.tp=2", "parallel.ep=1", "trainer.devices=3"],
        ParallelConfigError,
        "dp would be 3/2",
    ),
    (["trainer.devices=3"], ParallelConfigError, "parallel."),
    (["parallel.sp=true"], ParallelConfigError, "sp=true"),
    (["parallel.tp=2", "parallel.ep=1"], ParallelConfigError, "parallel.sp=true"),
    (["trainer.num_nodes=0"], ConfigError, "trainer.num_nodes"),
    (["trainer.global_batch_size=6"], ConfigError, "trainer.global_batch_size"),
    (["export.profile=per_expert", "export.check=true"], ConfigError, "export.profile=peft"),
    (["lora.r=0"], LoraConfigError, "lora.r"),
    (["lora.targets=[router]"], LoraConfigError, "lora.targets"),
    (["lora.dropout=0.1"], LoraConfigError, "lora.dropout"),
    (
        ["parallel.tp=2", "parallel.sp=true", "parallel.ep=1", "data.max_seq_len=127"],
        ConfigError,
        "data.max_seq_len",
    ),
    (["checkpoint.every_n_steps=0"], ConfigError, "checkpoint.every_n_steps"),
    (["resume=/nonexistent/step-3"], CheckpointError, "resume"),
]


@pytest.mark.parametrize(
    ("overrides", "error", "key"), ERROR_CASES, ids=[" ".join(c[0]) for c in ERROR_CASES]
)
def test_validate_config_names_the_key(
    config_with, overrides: list[str], error: type, key: str
) -> None:
    with pytest.raises(error, match=key.replace(".", r"\.").replace("*", r"\*")):
        validate_config(config_with(*overrides))


LIBRARY_CHECKS: list[tuple[dict[str, object], type[LoraTrainerError], str]] = [
    (
        {"export": ExportSection(profile="packed")},
        ConfigError,
        "export.profile='packed' is unknown; use one of peft, per_expert",
    ),
    (
        {"logger": LoggerSection(kind="tensorboard")},
        ConfigError,
        "logger.kind='tensorboard' is unknown",
    ),
    (
        {"model": ModelConfig(tiny="moe", dtype="fp8")},
        ConfigError,
        "model.dtype='fp8' is unknown; use one of auto, float32, bfloat16",
    ),
    (
        {"model": ModelConfig(tiny="large")},
        ConfigError,
        "model.tiny='large' is not a tiny model kind",
    ),
]


@pytest.mark.parametrize(
    ("changes", "error", "message"),
    LIBRARY_CHECKS,
    ids=[c[2].split("=")[0] for c in LIBRARY_CHECKS],
)
def test_a_train_config_built_in_python_is_still_checked(
    changes: dict[str, object], error: type, message: str, tiny_cache: Path, tmp_path: Path
) -> None:
    config = replace(TrainConfig(output_dir=str(tmp_path / "out")), **changes)
    config.model.tiny_cache_dir = str(tiny_cache)
    with pytest.raises(error, match=message.replace(".", r"\.").replace("[", r"\[")):
        validate_config(config)
    config = replace(TrainConfig(), lora=replace(TrainConfig().lora, style="split"))
    with pytest.raises(LoraConfigError, match=r"lora\.style='split'"):
        config.lora.to_lora_config()


@pytest.mark.parametrize("kind", ["tiny", "hf_path"])
def test_expert_parallelism_does_not_constrain_a_dense_model(
    config_with, tiny_cache: Path, kind: str
) -> None:
    """`model.hf_path=DENSE parallel.pp=2 trainer.devices=2` fits, on the demo preset (ep=2) too."""
    model = (
        "model=tiny_dense"
        if kind == "tiny"
        else f"model.hf_path={tiny_checkpoint_path('dense', tiny_cache)}"
    )
    config = config_with(model, "parallel.pp=2", "trainer.devices=2")
    assert config.parallel.ep == (1 if kind == "tiny" else 2)
    run = validate_config(config)
    assert not run.spec.is_moe
    assert (run.parallel.pp, run.parallel.ep, run.parallel.etp) == (2, 1, 1)
    assert (run.world_size, run.dp_size, run.expert_dp_size) == (2, 1, 1)
    moe = validate_config(config_with(f"model.hf_path={tiny_checkpoint_path('moe', tiny_cache)}"))
    assert (moe.parallel.ep, moe.world_size, moe.expert_dp_size) == (2, 2, 1)


def test_hf_path_without_config_json(config_with, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"config\.json"):
        validate_config(config_with(f"model.hf_path={tmp_path / 'empty'}"))


def test_unreadable_and_bad_data_files(config_with, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"data\.train_path.*missing\.jsonl"):
        validate_config(config_with(f"data.train_path={tmp_path / 'missing.jsonl'}"))
    bad = write_jsonl(tmp_path / "bad.jsonl", [GOOD_LINE, '{"messages": [}'])
    with pytest.raises(DataError, match=r"data\.train_path.*bad\.jsonl:2"):
        validate_config(config_with(f"data.train_path={bad}"))
    good = write_jsonl(tmp_path / "good.jsonl", [GOOD_LINE])
    no_assistant = write_jsonl(
        tmp_path / "val.jsonl",
        [GOOD_LINE, json.dumps({"messages": [{"role": "user", "content": "x"}]})],
    )
    with pytest.raises(DataError, match=r"data\.val_path.*val\.jsonl:2"):
        validate_config(config_with(f"data.train_path={good}", f"data.val_path={no_assistant}"))
    run = validate_config(config_with(f"data.train_path={good}", f"data.val_path={good}"))
    assert run.train_sources == run.val_sources == (SourceSpec(good),)


def make_save(directory: Path, config: TrainConfig, complete: bool = True) -> Path:
    """A save whose manifests list two (empty) rank files and no exports."""
    state = directory / "training_state"
    state.mkdir(parents=True)
    for rank in range(2):
        torch.save({}, state / f"rank-{rank:05d}.pt")
    run = resolve_run(config)
    write_state_manifest(
        state, step=1, world_size=2, settings=run_settings(config, run.hf_path, 2, run.parallel)
    )
    if complete:
        (directory / "export_manifest.json").write_text('{"files": {}, "sizes_bytes": {}}')
    return directory


def test_resume_latest_picks_the_newest_complete_save(config_with, tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="lora_trainer.training.resume")
    assert validate_config(config_with("resume=latest")).resume_path is None
    assert "starting fresh" in caplog.text
    checkpoints = tmp_path / "out" / "checkpoints"
    for step in (5, 10, 20):
        make_save(checkpoints / f"step-{step}", config_with())
    make_save(checkpoints / "step-30", config_with(), complete=False)
    make_save(checkpoints / "step-40-old", config_with())
    assert validate_config(config_with("resume=latest")).resume_path == checkpoints / "step-20"
    assert (
        validate_config(config_with(f"resume={checkpoints / 'step-5'}")).resume_path
        == checkpoints / "step-5"
    )
    assert not is_complete_save(checkpoints / "step-30")
    with pytest.raises(CheckpointError, match=r"resume=.*not an intact save"):
        validate_config(config_with(f"resume={checkpoints / 'step-30'}"))


def test_relaunched_rank_detection() -> None:
    assert not is_relaunched_rank({})
    assert not is_relaunched_rank({"LOCAL_RANK": "0"})
    assert is_relaunched_rank({"LOCAL_RANK": "1", "WORLD_SIZE": "2"})
    assert not is_relaunched_rank({"LOCAL_RANK": "3", "RANK": "3", "GROUP_RANK": "0"})


# --------------------------------------------------------------------------------- tiny checkpoints


@pytest.mark.parametrize("kind", demo_model.TINY_KINDS)
def test_tiny_checkpoint_loads_with_transformers(tiny_cache: Path, kind: str, monkeypatch) -> None:
    import torch
    import transformers

    path = ensure_tiny_checkpoint(kind, tiny_cache)  # type: ignore[arg-type]
    model = transformers.AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    expected = (
        transformers.Qwen3_5MoeForCausalLM if kind == "moe" else transformers.Qwen3_5ForCausalLM
    )
    assert type(model) is expected
    assert len(tokenizer) == model.config.vocab_size == 512
    assert (
        model.config.layer_types.count("linear_attention")
        == model.config.layer_types.count("full_attention")
        == 2
    )
    messages = [
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "5."},
    ]
    ids = tokenizer.apply_chat_template(messages, return_tensors="pt", return_dict=True)[
        "input_ids"
    ]
    with torch.no_grad():
        loss = model(ids, labels=ids).loss
    assert torch.isfinite(loss) and 4.0 < loss.item() < 12.0

    monkeypatch.setattr(
        demo_model, "_build", lambda *args: pytest.fail("a cached checkpoint was rebuilt")
    )
    assert ensure_tiny_checkpoint(kind, tiny_cache) == path  # type: ignore[arg-type]


def test_tiny_checkpoint_is_deterministic_and_keyed_by_recipe(
    tiny_cache: Path, tmp_path: Path, monkeypatch
) -> None:
    again = ensure_tiny_checkpoint("moe", tmp_path)
    first = tiny_checkpoint_path("moe", tiny_cache)
    assert again.name == first.name
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        assert (again / name).read_bytes() == (first / name).read_bytes()
    assert [p.name for p in tmp_path.iterdir()] == [again.name]
    monkeypatch.setattr(demo_model, "RECIPE_VERSION", demo_model.RECIPE_VERSION + 1)
    assert tiny_checkpoint_path("moe", tiny_cache) != first


def test_tiny_build_that_loses_a_race_keeps_the_winner(tmp_path: Path, monkeypatch) -> None:
    final = tiny_checkpoint_path("dense", tmp_path)

    def build_while_another_process_finishes(kind: str, directory: Path) -> None:
        (directory / "ours").write_text("")
        final.mkdir(parents=True)
        (final / "theirs").write_text("")

    monkeypatch.setattr(demo_model, "_build", build_while_another_process_finishes)
    assert ensure_tiny_checkpoint("dense", tmp_path) == final
    assert [p.name for p in final.iterdir()] == ["theirs"]
    assert [p.name for p in tmp_path.iterdir()] == [final.name]


def test_tiny_build_is_fsynced_before_it_is_published_and_a_failed_one_leaves_nothing(
    tmp_path: Path, monkeypatch
) -> None:
    def build(kind: str, directory: Path) -> None:
        (directory / "tokenizer").mkdir()
        (directory / "tokenizer" / "vocab.json").write_text("{}")
        (directory / "model.safetensors").write_bytes(b"weights")

    def failing_build(kind: str, directory: Path) -> None:
        build(kind, directory)
        raise RuntimeError("killed mid-build")

    cache = tmp_path / "cache"
    monkeypatch.setattr(demo_model, "_build", failing_build)
    with pytest.raises(RuntimeError, match="killed mid-build"):
        ensure_tiny_checkpoint("dense", cache)
    assert list(cache.iterdir()) == []

    log = tmp_path / "events.log"
    fs_events.record(monkeypatch, log)
    monkeypatch.setattr(demo_model, "_build", build)
    final = ensure_tiny_checkpoint("dense", cache)
    fs_events.assert_synced_then_published(fs_events.read(log), final)
    assert [p.name for p in cache.iterdir()] == [final.name]


# ---------------------------------------------------------------------------------- train.py


def run_train(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, WANDB_MODE="disabled")
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *overrides, f"output_dir={tmp_path / 'out'}"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_train_py_preset_without_hf_path_fails_before_ranks_start(tmp_path: Path) -> None:
    result = run_train(tmp_path, "model=qwen3_5_35b_a3b")
    assert result.returncode == 2, result.stderr
    assert "model.hf_path" in result.stderr and "model=qwen3_5_35b_a3b" in result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert not (tmp_path / ".cache").exists()


def test_train_py_bad_data_line_is_one_line_with_file_and_line(
    tmp_path: Path, tiny_cache: Path
) -> None:
    bad = write_jsonl(tmp_path / "bad.jsonl", [GOOD_LINE, GOOD_LINE, "not json"])
    result = run_train(tmp_path, f"model.tiny_cache_dir={tiny_cache}", f"data.train_path={bad}")
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"{bad}:3" in errors[0] and "data.train_path" in errors[0]
    assert "Traceback" not in result.stdout + result.stderr


def test_train_py_bad_callback_target_is_one_line_naming_the_key(tmp_path: Path) -> None:
    result = run_train(tmp_path, "+callbacks.probe._target_=nowhere.Probe")
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        "error: callbacks.probe (_target_=nowhere.Probe) cannot be made: ModuleNotFoundError: "
        "No module named 'nowhere'"
    ]
    assert not (tmp_path / ".cache").exists()


COMMAND_LINE_ERRORS: list[tuple[list[str], str]] = [
    (
        ["+trainer.max_step=3"],
        "trainer.max_step is not a config key (with or without +); did you mean trainer.max_steps?",
    ),
    (
        ["trainer.max_step=3"],
        "trainer.max_step is not a config key (with or without +); did you mean trainer.max_steps?",
    ),
    (["-m", "parallel.ep=2,1"], "-m/--multirun: Hydra sweeps are not supported"),
    (["parallel.ep=2,1"], "parallel.ep=2,1 sweeps over several values"),
    (["export.profile=packed"], "Invalid value 'packed', expected one of [peft, per_expert]"),
]


@pytest.mark.parametrize(
    ("overrides", "message"), COMMAND_LINE_ERRORS, ids=[" ".join(c[0]) for c in COMMAND_LINE_ERRORS]
)
def test_train_py_refuses_before_hydra_runs(
    tmp_path: Path, overrides: list[str], message: str
) -> None:
    result = run_train(tmp_path, *overrides)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        line for line in result.stderr.splitlines() if line.startswith("error:")
    ]
    assert len(result.stderr.splitlines()) == 1 and message in result.stderr
    if "multirun" in message or "sweeps" in message:
        assert (
            "one `python train.py` per setting" in result.stderr and "output_dir" in result.stderr
        )
    assert result.stdout == "" and not (tmp_path / "out").exists()
