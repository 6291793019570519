"""Runs that never lose, mix up or silently change work: weights-only training states, intact
saves, branching resumes, the output_dir lock, resume checks before launch, one error line when
a rank fails, the learning-rate log and the final message."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from lora_trainer.errors import CheckpointError, ConfigError
from lora_trainer.parallel.config import ParallelConfig
from lora_trainer.saves import (
    STATE_MANIFEST,
    TRAINING_STATE,
    clear_leftovers,
    complete_saves,
    saves_to_prune,
    scan_saves,
)
from lora_trainer.training.app import auto_class, final_message
from lora_trainer.training.config import OptimSection, TrainConfig
from lora_trainer.training.hydra_schema import register_schema, to_train_config
from lora_trainer.training.optim import warmup_cosine
from lora_trainer.training.output_lock import LOCK_FILE, OutputDirLock
from lora_trainer.training.prepare import check_writable, prepared_run
from lora_trainer.training.strategy import MegatronStrategy
from lora_trainer.training.validate import validate_config
from tests.multirank import free_port

REPO = Path(__file__).resolve().parent.parent
TINY_CACHE = REPO / ".cache" / "tiny_models"
COMMON = [
    "data.max_seq_len=64",
    "trainer.global_batch_size=4",
    "trainer.micro_batch_size=1",
    f"model.tiny_cache_dir={TINY_CACHE}",
    "logger=none",
    "checkpoint.every_n_steps=2",
    "optim.warmup_steps=1",
    "optim.lr=1e-3",
    "optim.min_lr=1e-4",
]

DEAD_PID = 99_999_999  # above the kernel's pid_max, so never a running process

register_schema()


def train(output_dir: Path, *overrides: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "HYDRA_FULL_ERROR"))}
    env.update(TORCHDYNAMO_DISABLE="1")
    return subprocess.run(
        [sys.executable, "train.py", f"output_dir={output_dir}", *COMMON, *overrides],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def succeeded(run: subprocess.CompletedProcess[str]) -> str:
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    return run.stdout + run.stderr


def error_lines(run: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("error:")]


def config_for(output_dir: Path, *overrides: str) -> TrainConfig:
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        return to_train_config(
            compose(
                config_name="train", overrides=[f"output_dir={output_dir}", *COMMON, *overrides]
            )
        )


def log_records(output_dir: Path) -> list[dict[str, float]]:
    return [json.loads(line) for line in (output_dir / "train_log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def branched(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """Run 1: 4 steps without the merged export (saves step-2, step-4). Run 2: resume from
    step-2 (a new line of training) with trainer.max_steps raised to 6 and keep_last=1."""
    out = tmp_path_factory.mktemp("branched")
    first = train(out, "trainer.max_steps=4", "checkpoint.keep_last=2", "export.merged=false")
    first_text = succeeded(first)
    second = train(
        out,
        "trainer.max_steps=6",
        "checkpoint.keep_last=1",
        f"resume={out / 'checkpoints' / 'step-2'}",
    )
    return {
        "out": out,
        "first": first_text,
        "first_stdout": first.stdout,
        "second": succeeded(second),
    }


# ----------------------------------------------------------------------- branching and the log


def test_a_branching_resume_keeps_its_source_and_sets_the_other_line_aside(
    branched: dict[str, object],
) -> None:
    out = branched["out"]
    checkpoints = out / "checkpoints"
    assert [p.name for p in complete_saves(checkpoints)] == ["step-2", "step-6"]
    (aside,) = (checkpoints / "abandoned").iterdir()
    assert [p.name for p in aside.iterdir() if p.is_dir()] == ["step-4"]
    assert [
        r["step"] for r in map(json.loads, (aside / "train_log.jsonl").read_text().splitlines())
    ] == [3, 4]
    assert "moved the later saves step-4" in branched["second"] and str(aside) in branched["second"]
    assert f"Latest save: {checkpoints / 'step-6'}" in branched["second"]


def test_the_log_has_one_line_per_step_with_the_rate_that_step_used(
    branched: dict[str, object],
) -> None:
    records = log_records(branched["out"])
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    optim = OptimSection(lr=1e-3, min_lr=1e-4, warmup_steps=1)
    expected = [1e-3 * warmup_cosine(optim, 4)(step - 1) for step in (1, 2)]
    expected += [1e-3 * warmup_cosine(optim, 6)(step - 1) for step in (3, 4, 5, 6)]
    assert [r["train/lr"] for r in records] == pytest.approx(expected, rel=1e-12)
    assert "schedule is recomputed over 6 steps" in branched["second"]
    assert f"{expected[1]:.3g} at step 2 to {expected[2]:.3g} at step 3" in branched["second"]


def test_final_message_lists_only_what_was_exported(
    branched: dict[str, object], tmp_path: Path
) -> None:
    message = branched["first_stdout"].split("Training done.")[1]
    assert "merged" not in message and "hf_adapter" in message
    vision = tmp_path / "vl"
    vision.mkdir()
    (vision / "config.json").write_text(
        json.dumps({"architectures": ["Qwen3_5MoeForConditionalGeneration"]})
    )
    message = final_message(tmp_path / "step-8", vision, adapter=True, merged=True)
    assert (
        "AutoModelForImageTextToText.from_pretrained" in message
        and "AutoModelForCausalLM" not in message
    )
    assert (
        auto_class(Path(branched["out"] / "checkpoints" / "step-6" / "hf_merged"))
        == "AutoModelForCausalLM"
    )


# --------------------------------------------------------------- what resume accepts, before launch


@pytest.fixture
def copied(branched: dict[str, object], tmp_path: Path) -> Path:
    """A fresh output_dir holding copies of the branched run's intact saves step-2 and step-6."""
    out = tmp_path / "out"
    shutil.copytree(branched["out"] / "checkpoints" / "step-2", out / "checkpoints" / "step-2")
    shutil.copytree(branched["out"] / "checkpoints" / "step-6", out / "checkpoints" / "step-6")
    return out


def test_resume_with_other_adapter_settings_is_refused_naming_both_values(copied: Path) -> None:
    save = copied / "checkpoints" / "step-6"
    with pytest.raises(ConfigError, match=r"lora\.r=8 \(the save has 16\).*lora\.r=16"):
        validate_config(config_for(copied, f"resume={save}", "lora.r=8"))
    with pytest.raises(ConfigError, match=r"lora\.alpha=8\.0 \(the save has 32\.0\)"):
        validate_config(config_for(copied, "resume=latest", "lora.alpha=8"))
    with pytest.raises(ConfigError, match=r"parallel\.ep=1 \(the save has 2\)"):
        validate_config(config_for(copied, "resume=latest", "parallel.ep=1"))
    assert (
        validate_config(config_for(copied, "resume=latest", "trainer.max_steps=8")).resume_path
        == save
    )


class _Payload:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("touch PWNED",))


def test_a_planted_pickle_is_refused_not_run(copied: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(copied)
    state = copied / "checkpoints" / "step-6" / TRAINING_STATE
    torch.save({"state_dict": {}, "payload": _Payload()}, state / "rank-00000.pt")
    manifest = json.loads((state / STATE_MANIFEST).read_text())
    manifest["files"]["rank-00000.pt"] = (state / "rank-00000.pt").stat().st_size
    (state / STATE_MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(
        CheckpointError, match=r"rank-00000\.pt holds objects other than tensors.*system"
    ):
        MegatronStrategy(ParallelConfig(ep=2), seed=0).load_checkpoint(state)
    with pytest.raises(CheckpointError, match=r"holds objects other than tensors"):
        validate_config(config_for(copied, "resume=latest"))
    assert not (copied / "PWNED").exists()


def test_damaged_saves_are_skipped_named_and_not_counted(
    copied: Path, caplog: pytest.LogCaptureFixture
) -> None:
    checkpoints = copied / "checkpoints"
    shutil.rmtree(checkpoints / "step-6" / "hf_merged")
    intact, damaged = scan_saves(checkpoints)
    assert intact == [checkpoints / "step-2"]
    assert (
        list(damaged) == [checkpoints / "step-6"]
        and "hf_merged/" in damaged[checkpoints / "step-6"][0]
    )
    assert saves_to_prune(checkpoints, keep_last=1) == []
    assert (
        validate_config(config_for(copied, "resume=latest")).resume_path == checkpoints / "step-2"
    )
    assert "skipping damaged saves (step-6: hf_merged/" in caplog.text
    rank_file = checkpoints / "step-2" / TRAINING_STATE / "rank-00001.pt"
    rank_file.write_bytes(rank_file.read_bytes()[:1000])
    assert scan_saves(checkpoints)[0] == []
    with pytest.raises(
        CheckpointError, match=r"not an intact save \(training_state/rank-00001\.pt has 1000 bytes"
    ):
        validate_config(config_for(copied, f"resume={checkpoints / 'step-2'}"))


def test_leftovers_of_a_killed_save_are_cleared(tmp_path: Path) -> None:
    (tmp_path / f".step-8.tmp-{DEAD_PID}-ab12" / TRAINING_STATE).mkdir(parents=True)
    (tmp_path / f".step-4.old-{DEAD_PID}-cd34").mkdir()
    (tmp_path / "step-4").mkdir()
    (tmp_path / f".step-6.old-{DEAD_PID}-ef56" / TRAINING_STATE).mkdir(parents=True)
    (tmp_path / f".step-10.tmp-{os.getpid()}-gh78").mkdir()
    notes = clear_leftovers(tmp_path)
    assert notes == [
        f"removed .step-4.old-{DEAD_PID}-cd34",
        f"restored step-6 from .step-6.old-{DEAD_PID}-ef56",
        f"removed .step-8.tmp-{DEAD_PID}-ab12",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        f".step-10.tmp-{os.getpid()}-gh78",
        "step-4",
        "step-6",
    ]
    assert (tmp_path / "step-6" / TRAINING_STATE).is_dir()


def test_a_fresh_start_clears_leftovers_and_sets_earlier_saves_aside_under_the_lock(
    copied: Path,
) -> None:
    checkpoints = copied / "checkpoints"
    (checkpoints / f".step-8.tmp-{DEAD_PID}-ab12" / TRAINING_STATE).mkdir(parents=True)
    (copied / "train_log.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in (1, 2)))
    with prepared_run(config_for(copied), first=True) as run:
        assert run.resume_path is None
        assert json.loads((copied / LOCK_FILE).read_text())["pid"] == os.getpid()
        assert sorted(p.name for p in checkpoints.iterdir()) == ["abandoned"]
    assert not (copied / LOCK_FILE).exists()
    (aside,) = (checkpoints / "abandoned").iterdir()
    assert aside.name.endswith("-after-step-0") and sorted(p.name for p in aside.iterdir()) == [
        "step-2",
        "step-6",
        "train_log.jsonl",
    ]
    assert (copied / "train_log.jsonl").read_text() == ""


def test_a_truncated_shard_and_an_unwritable_output_are_refused_before_launch(
    tmp_path: Path,
) -> None:
    model = tmp_path / "model"
    shutil.copytree(validate_config(config_for(tmp_path / "out")).hf_path, model)
    shard = model / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"model\.safetensors .*truncated or corrupt"):
        validate_config(config_for(tmp_path / "out", f"model.hf_path={model}"))
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match=r"output_dir: .*file.* is not writable"):
        check_writable(tmp_path / "file" / "checkpoints")


# ------------------------------------------------------------------------------------- the lock


def test_the_output_dir_lock_refuses_a_live_holder_and_takes_over_a_stale_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with OutputDirLock(tmp_path):
        holder = json.loads((tmp_path / LOCK_FILE).read_text())
        assert (holder["host"], holder["pid"]) == (socket.gethostname(), os.getpid())
        with pytest.raises(
            ConfigError,
            match=rf"in use by a running training \(host {socket.gethostname()}, pid {os.getpid()}",
        ):
            OutputDirLock(tmp_path).acquire()
    assert not (tmp_path / LOCK_FILE).exists()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / LOCK_FILE).write_text(
        json.dumps({"host": socket.gethostname(), "pid": dead.pid, "started": 0})
    )
    with OutputDirLock(tmp_path):
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert (
        f"taking over the lock {tmp_path / LOCK_FILE} of a run that is no longer running (host"
        in caplog.text
    )
    reused = {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": "1", "started": 0}
    (tmp_path / LOCK_FILE).write_text(json.dumps(reused))
    with OutputDirLock(tmp_path):
        pass
    (tmp_path / LOCK_FILE).write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": 0}))
    with pytest.raises(ConfigError, match=rf"host elsewhere, pid 1.*delete {tmp_path / LOCK_FILE}"):
        OutputDirLock(tmp_path).acquire()


def test_a_second_run_into_a_locked_output_dir_is_refused_with_one_line(tmp_path: Path) -> None:
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        tmp_path.mkdir(exist_ok=True)
        (tmp_path / LOCK_FILE).write_text(
            json.dumps({"host": socket.gethostname(), "pid": holder.pid, "started": 0})
        )
        run = train(tmp_path, "trainer.max_steps=2")
    finally:
        holder.kill()
        holder.wait()
    assert run.returncode == 2 and "Traceback" not in run.stdout + run.stderr
    (line,) = error_lines(run)
    assert f"pid {holder.pid}" in line and "in use by a running training" in line
    assert not (tmp_path / "checkpoints").exists()


# ------------------------------------------------------------------------- failures after launch


@pytest.mark.parametrize("mode", ["one", "all"])
def test_a_rank_failing_after_launch_ends_every_rank_with_one_error_line(
    tmp_path: Path, mode: str
) -> None:
    """Rank 1 fails while rank 0 waits in a collective (`one`), or both fail alike (`all`)."""
    port = str(free_port())
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("HYDRA_FULL_ERROR", None)
    ranks = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.failure_runner", str(rank), port, str(tmp_path), mode],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    outputs = [rank.communicate(timeout=120) for rank in ranks]
    text = "".join(out + err for out, err in outputs)
    assert [rank.returncode for rank in ranks] == [2, 2], text
    (line,) = [line for line in text.splitlines() if line.strip()]
    assert (
        line == f"error: rank {1 if mode == 'one' else line[12]}: "
        "step-2/training_state/rank-00001.pt cannot be read; resume from another save"
    )
