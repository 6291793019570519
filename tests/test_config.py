"""conf/ + Hydra schema, validate_config, the tiny checkpoint builder and train.py's failure path."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

from lora_trainer.data.tokenizer_builder import TINY_SFT_PATH
from lora_trainer.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    LoraTrainerError,
    ParallelConfigError,
)
from lora_trainer.lora.config import LoraConfigError
from lora_trainer.qwen35 import tiny
from lora_trainer.qwen35.tiny import ensure_tiny_checkpoint, tiny_checkpoint_path
from lora_trainer.training.config import TrainConfig
from lora_trainer.training.hydra_schema import register_schema, to_train_config
from lora_trainer.training.launch import is_relaunched_rank
from lora_trainer.training.validate import is_complete_save, resolve_run, validate_config

ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = ROOT / "conf"
PRESETS = sorted(path.stem for path in (CONF_DIR / "model").glob("qwen3_5_*.yaml"))

register_schema()


def compose_config(*overrides: str) -> TrainConfig:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return to_train_config(compose(config_name="train", overrides=list(overrides)))


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache directory holding both tiny checkpoints, built once for the whole session."""
    cache = tmp_path_factory.mktemp("tiny_models")
    for kind in tiny.TINY_KINDS:
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


GOOD_LINE = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})


# ---------------------------------------------------------------------------------- composition


def test_default_is_the_embedded_tiny_moe_run() -> None:
    config = compose_config()
    assert isinstance(config, TrainConfig)
    assert (config.model.hf_path, config.model.tiny) == (None, "moe")
    assert (config.parallel.tp, config.parallel.pp, config.parallel.ep, config.parallel.sp) == (1, 1, 2, False)
    assert (config.trainer.devices, config.trainer.num_nodes) == (2, 1)
    assert config.trainer.max_steps == 40
    assert (config.trainer.global_batch_size, config.trainer.micro_batch_size) == (8, 2)
    assert config.data.max_seq_len == 128 and config.data.train_path is None
    assert config.checkpoint.every_n_steps == 20
    assert config.export.adapter and config.export.merged and config.export.profile == "peft"
    assert config.logger.kind == "wandb"
    assert config.resume is None


def test_hydra_keeps_the_working_directory_and_writes_under_output_dir() -> None:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose(config_name="train", overrides=["output_dir=/runs/a"], return_hydra_config=True)
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
    ("output_dir=/runs/b", "output_dir", "/runs/b"),
    ("resume=latest", "resume", "latest"),
    ("logger=none", "logger.kind", "none"),
    ("logger=wandb", "logger.kind", "wandb"),
]


@pytest.mark.parametrize(("override", "key", "expected"), OVERRIDES, ids=[o[0] for o in OVERRIDES])
def test_every_public_key_lands_in_the_train_config(override: str, key: str, expected: object) -> None:
    value: object = compose_config(override)
    for part in key.split("."):
        value = getattr(value, part)
    assert value == expected


@pytest.mark.parametrize("override", ["trainer.max_step=3", "trainer.max_steps=abc", "logger=nope", "lora.rank=4"])
def test_a_wrong_key_or_value_fails_in_hydra(override: str) -> None:
    with pytest.raises(ConfigCompositionException):
        compose_config(override)


@pytest.mark.parametrize("preset", PRESETS)
def test_a_model_preset_requires_hf_path(preset: str) -> None:
    with pytest.raises(ConfigError, match="model.hf_path"):
        compose_config(f"model={preset}")
    config = compose_config(f"model={preset}", "model.hf_path=/models/q")
    assert (config.model.hf_path, config.model.tiny) == ("/models/q", None)


def test_presets_cover_the_published_sizes() -> None:
    assert {"qwen3_5_35b_a3b", "qwen3_5_27b", "qwen3_5_397b_a17b"} <= set(PRESETS)


# ---------------------------------------------------------------------------------- validate_config


def test_default_config_resolves(config_with, tiny_cache: Path) -> None:
    config = config_with()
    run = validate_config(config)
    assert run.hf_path == tiny_checkpoint_path("moe", tiny_cache)
    assert run.spec.is_moe and run.spec.vocab_size == 512
    assert (run.world_size, run.dp_size, run.expert_dp_size, run.num_microbatches) == (2, 2, 1, 2)
    assert run.parallel.ep == 2 and run.lora.r == 16
    assert run.train_path == TINY_SFT_PATH and run.val_path is None
    assert run.resume_path is None
    assert run.save_dir(20) == run.output_dir / "checkpoints" / "step-20"
    assert resolve_run(config) == run


def test_resolve_run_does_not_build_the_tiny_model(tmp_path: Path) -> None:
    config = compose_config(f"model.tiny_cache_dir={tmp_path}")
    with pytest.raises(CheckpointError, match="has not been built"):
        resolve_run(config)


ERROR_CASES: list[tuple[list[str], type[LoraTrainerError], str]] = [
    (["model.tiny=null"], ConfigError, "model.hf_path"),
    (["model.tiny=large"], ConfigError, "model.tiny"),
    (["model.hf_path=/nonexistent/model"], CheckpointError, "model.hf_path"),
    (["parallel.tp=4", "parallel.ep=1", "parallel.sp=true", "trainer.devices=4"], ParallelConfigError, "parallel.tp"),
    (["parallel.tp=2", "parallel.ep=1", "trainer.devices=3"], ParallelConfigError, "dp would be 3/2"),
    (["trainer.devices=3"], ParallelConfigError, "parallel."),
    (["parallel.sp=true"], ParallelConfigError, "sp=true"),
    (["parallel.tp=2", "parallel.ep=1"], ParallelConfigError, "parallel.sp=true"),
    (["model=tiny_dense"], ParallelConfigError, "parallel.ep"),
    (["trainer.num_nodes=0"], ConfigError, "trainer.num_nodes"),
    (["trainer.global_batch_size=6"], ConfigError, "trainer.global_batch_size"),
    (["export.profile=packed"], ConfigError, "export.profile"),
    (["export.profile=per_expert", "export.check=true"], ConfigError, "export.profile=peft"),
    (["logger.kind=tensorboard"], ConfigError, "logger.kind"),
    (["model.dtype=fp8"], ConfigError, "model.dtype"),
    (["lora.r=0"], LoraConfigError, "lora.r"),
    (["lora.targets=[router]"], LoraConfigError, "lora.targets"),
    (["lora.style=split"], LoraConfigError, "lora.style"),
    (["lora.dropout=0.1"], LoraConfigError, "lora.dropout"),
    (
        ["parallel.tp=2", "parallel.sp=true", "parallel.ep=1", "data.max_seq_len=127"],
        ConfigError,
        "data.max_seq_len",
    ),
    (["checkpoint.every_n_steps=0"], ConfigError, "checkpoint.every_n_steps"),
    (["resume=/nonexistent/step-3"], CheckpointError, "resume"),
]


@pytest.mark.parametrize(("overrides", "error", "key"), ERROR_CASES, ids=[" ".join(c[0]) for c in ERROR_CASES])
def test_validate_config_names_the_key(config_with, overrides: list[str], error: type, key: str) -> None:
    with pytest.raises(error, match=key.replace(".", r"\.").replace("*", r"\*")):
        validate_config(config_with(*overrides))


def test_hf_path_without_config_json(config_with, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        validate_config(config_with(f"model.hf_path={tmp_path / 'empty'}"))


def test_unreadable_and_bad_data_files(config_with, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"data\.train_path.*missing\.jsonl"):
        validate_config(config_with(f"data.train_path={tmp_path / 'missing.jsonl'}"))
    bad = write_jsonl(tmp_path / "bad.jsonl", [GOOD_LINE, '{"messages": [}'])
    with pytest.raises(DataError, match=r"data\.train_path.*bad\.jsonl:2"):
        validate_config(config_with(f"data.train_path={bad}"))
    good = write_jsonl(tmp_path / "good.jsonl", [GOOD_LINE])
    no_assistant = write_jsonl(tmp_path / "val.jsonl", [GOOD_LINE, json.dumps({"messages": [{"role": "user", "content": "x"}]})])
    with pytest.raises(DataError, match=r"data\.val_path.*val\.jsonl:2"):
        validate_config(config_with(f"data.train_path={good}", f"data.val_path={no_assistant}"))
    run = validate_config(config_with(f"data.train_path={good}", f"data.val_path={good}"))
    assert run.train_path == run.val_path == good


def make_save(directory: Path, complete: bool = True) -> Path:
    (directory / "training_state").mkdir(parents=True)
    if complete:
        (directory / "export_manifest.json").write_text("{}")
    return directory


def test_resume_latest_picks_the_newest_complete_save(config_with, tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="lora_trainer.training.validate")
    assert validate_config(config_with("resume=latest")).resume_path is None
    assert "starting fresh" in caplog.text
    checkpoints = tmp_path / "out" / "checkpoints"
    for step in (5, 10, 20):
        make_save(checkpoints / f"step-{step}")
    make_save(checkpoints / "step-30", complete=False)
    make_save(checkpoints / "step-40-old")
    assert validate_config(config_with("resume=latest")).resume_path == checkpoints / "step-20"
    assert validate_config(config_with(f"resume={checkpoints / 'step-5'}")).resume_path == checkpoints / "step-5"
    assert not is_complete_save(checkpoints / "step-30")
    with pytest.raises(CheckpointError, match=r"resume=.*not a complete save"):
        validate_config(config_with(f"resume={checkpoints / 'step-30'}"))


def test_relaunched_rank_detection() -> None:
    assert not is_relaunched_rank({})
    assert not is_relaunched_rank({"LOCAL_RANK": "0"})
    assert is_relaunched_rank({"LOCAL_RANK": "1", "WORLD_SIZE": "2"})
    assert not is_relaunched_rank({"LOCAL_RANK": "3", "RANK": "3", "GROUP_RANK": "0"})


# ---------------------------------------------------------------------------------- tiny checkpoints


@pytest.mark.parametrize("kind", tiny.TINY_KINDS)
def test_tiny_checkpoint_loads_with_transformers(tiny_cache: Path, kind: str, monkeypatch) -> None:
    import torch
    import transformers

    path = ensure_tiny_checkpoint(kind, tiny_cache)  # type: ignore[arg-type]
    model = transformers.AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    expected = transformers.Qwen3_5MoeForCausalLM if kind == "moe" else transformers.Qwen3_5ForCausalLM
    assert type(model) is expected
    assert len(tokenizer) == model.config.vocab_size == 512
    assert model.config.layer_types.count("linear_attention") == model.config.layer_types.count("full_attention") == 2
    messages = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5."}]
    ids = tokenizer.apply_chat_template(messages, return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        loss = model(ids, labels=ids).loss
    assert torch.isfinite(loss) and 4.0 < loss.item() < 12.0

    monkeypatch.setattr(tiny, "_build", lambda *args: pytest.fail("a cached checkpoint was rebuilt"))
    assert ensure_tiny_checkpoint(kind, tiny_cache) == path  # type: ignore[arg-type]


def test_tiny_checkpoint_is_deterministic_and_keyed_by_recipe(tiny_cache: Path, tmp_path: Path, monkeypatch) -> None:
    again = ensure_tiny_checkpoint("moe", tmp_path)
    first = tiny_checkpoint_path("moe", tiny_cache)
    assert again.name == first.name
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        assert (again / name).read_bytes() == (first / name).read_bytes()
    assert [p.name for p in tmp_path.iterdir()] == [again.name]
    monkeypatch.setattr(tiny, "RECIPE_VERSION", tiny.RECIPE_VERSION + 1)
    assert tiny_checkpoint_path("moe", tiny_cache) != first


def test_tiny_build_that_loses_a_race_keeps_the_winner(tmp_path: Path, monkeypatch) -> None:
    final = tiny_checkpoint_path("dense", tmp_path)

    def build_while_another_process_finishes(kind: str, directory: Path) -> None:
        (directory / "ours").write_text("")
        final.mkdir(parents=True)
        (final / "theirs").write_text("")

    monkeypatch.setattr(tiny, "_build", build_while_another_process_finishes)
    assert ensure_tiny_checkpoint("dense", tmp_path) == final
    assert [p.name for p in final.iterdir()] == ["theirs"]
    assert [p.name for p in tmp_path.iterdir()] == [final.name]


# ---------------------------------------------------------------------------------- train.py


def run_train(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, WANDB_MODE="disabled")
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), f"output_dir={tmp_path / 'out'}", *overrides],
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


def test_train_py_bad_data_line_is_one_line_with_file_and_line(tmp_path: Path, tiny_cache: Path) -> None:
    bad = write_jsonl(tmp_path / "bad.jsonl", [GOOD_LINE, GOOD_LINE, "not json"])
    result = run_train(tmp_path, f"model.tiny_cache_dir={tiny_cache}", f"data.train_path={bad}")
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"{bad}:3" in errors[0] and "data.train_path" in errors[0]
    assert "Traceback" not in result.stdout + result.stderr
