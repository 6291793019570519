"""Resume rules, applied before any rank starts.

- `resume=latest` takes the intact save with the highest step (damaged ones are skipped and
  named); `resume=<path>` must name an intact save.
- The settings that define the adapter and the layout (`RESUME_KEYS`: the base model's config.json,
  lora.r / alpha / rslora / targets / style, the number of ranks and parallel.*) must equal the
  save's; a difference is refused naming both values. Every rank file is opened with
  `weights_only=True` (memory-mapped, so only its structure is read).
- A different `trainer.max_steps` is allowed: the warmup + cosine schedule is recomputed over the
  new number of steps, and the run says what that does to the learning rate.
- A run that starts at step K (0 when fresh) moves the saves after K, which belong to another line
  of training, under `checkpoints/abandoned/`, with their lines of `train_log.jsonl`; lines after K
  of the same line (steps trained again) are dropped, so the log keeps one line per step.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from lora_trainer.errors import CheckpointError, ConfigError
from lora_trainer.export.manifest import sha256_file
from lora_trainer.files.atomic import atomic_write_text
from lora_trainer.parallel.config import ParallelConfig
from lora_trainer.saves import (
    TRAINING_STATE,
    describe_damaged,
    load_rank_state,
    read_state_manifest,
    save_problems,
    scan_saves,
    set_aside_after,
    step_of,
)
from lora_trainer.training.config import OptimSection, TrainConfig

log = logging.getLogger(__name__)

RESUME_LATEST = "latest"
TRAIN_LOG = "train_log.jsonl"
RANKS = "trainer.devices * trainer.num_nodes"
RESUME_KEYS = (
    "lora.r",
    "lora.alpha",
    "lora.rslora",
    "lora.targets",
    "lora.style",
    RANKS,
    "parallel.tp",
    "parallel.pp",
    "parallel.ep",
    "parallel.etp",
    "parallel.sp",
)


def run_settings(
    config: TrainConfig, hf_path: Path, world_size: int, parallel: ParallelConfig
) -> dict[str, Any]:
    """What a save records of its run (`parallel`: the layout it trains with), to check a resume
    against (`check_resume`)."""
    lora = config.lora
    return {
        "model.hf_path": str(hf_path),
        "model.config_sha256": sha256_file(hf_path / "config.json"),
        "lora.r": lora.r,
        "lora.alpha": float(lora.alpha),
        "lora.rslora": lora.rslora,
        "lora.targets": sorted(lora.targets),
        "lora.style": lora.style,
        RANKS: world_size,
        "parallel.tp": parallel.tp,
        "parallel.pp": parallel.pp,
        "parallel.ep": parallel.ep,
        "parallel.etp": parallel.etp,
        "parallel.sp": parallel.sp,
        "trainer.max_steps": config.trainer.max_steps,
    }


def find_resume(resume: str | None, checkpoints: Path, announce: bool) -> Path | None:
    """The save to resume from (None: start fresh); `announce` logs the choice and skipped saves."""
    if resume is None:
        return None
    if resume == RESUME_LATEST:
        intact, damaged = scan_saves(checkpoints)
        latest = intact[-1] if intact else None
        if announce and damaged:
            log.warning("resume=latest: skipping damaged saves (%s)", describe_damaged(damaged))
        if announce:
            if latest is None:
                log.info("resume=latest: no intact save under %s, starting fresh", checkpoints)
            else:
                log.info("resume=latest: resuming from %s", latest)
        return latest
    path = Path(resume).expanduser().absolute()
    if not path.is_dir():
        raise CheckpointError(
            f"resume={resume}: {path} is not a directory; pass a save directory "
            "(output_dir/checkpoints/step-N), resume=latest or resume=null"
        )
    problems = (
        save_problems(path) if step_of(path) is not None else [f"{path.name} is not named step-N"]
    )
    if problems:
        raise CheckpointError(
            f"resume={resume}: {path} is not an intact save ({'; '.join(problems[:3])}); pass "
            "another save or resume=latest"
        )
    return path


def _shown(key: str, value: Any) -> str:
    return f"{key}={value}" if key != RANKS else f"{key} = {value} ranks"


def check_resume(
    save: Path, config: TrainConfig, hf_path: Path, world_size: int, parallel: ParallelConfig
) -> None:
    """Refuse a resume whose adapter or layout settings differ from the save's; read every rank
    file's structure with weights_only; say what a changed trainer.max_steps does."""
    saved = read_state_manifest(save)["settings"]
    now = run_settings(config, hf_path, world_size, parallel)
    if saved.get("model.config_sha256") != now["model.config_sha256"]:
        raise ConfigError(
            f"resume={save}: model.hf_path={hf_path} is not the model this save was trained on "
            f"({saved.get('model.hf_path')}; their config.json differ): resume with "
            f"model.hf_path={saved.get('model.hf_path')}"
        )
    differences = [key for key in RESUME_KEYS if saved.get(key) != now[key]]
    if differences:
        pairs = ", ".join(
            f"{_shown(key, now[key])} (the save has {saved.get(key)})" for key in differences
        )
        fix = " ".join(f"{key}={saved.get(key)}" for key in differences if key != RANKS)
        raise ConfigError(
            f"resume={save} was trained with other settings: {pairs}; resume with the save's "
            f"settings ({fix or 'the same number of ranks'}), or start fresh in another output_dir"
        )
    for name in read_state_manifest(save)["files"]:
        load_rank_state(save / TRAINING_STATE / name, mmap=True)
    note = schedule_note(
        config.optim, saved.get("trainer.max_steps"), config.trainer.max_steps, step_of(save) or 0
    )
    if note:
        log.warning(note)


def schedule_note(
    optim: OptimSection, saved_max: int | None, max_steps: int, step: int
) -> str | None:
    """What the learning rate does when a resume changes trainer.max_steps (None when it does
    not)."""
    if saved_max is None or saved_max == max_steps:
        return None
    from lora_trainer.training.optim import warmup_cosine

    before = optim.lr * warmup_cosine(optim, saved_max)(step - 1) if step else optim.lr
    after = optim.lr * warmup_cosine(optim, max_steps)(step)
    return (
        f"trainer.max_steps={max_steps} differs from the save's {saved_max}: the warmup + cosine "
        f"schedule is recomputed over {max_steps} steps, so the learning rate goes from "
        f"{before:.3g} at step {step} to {after:.3g} at step {step + 1}"
    )


def start_at(output_dir: Path, checkpoints: Path, step: int) -> None:
    """Before a run that starts at `step`: set aside the saves of another line after it, and
    keep one line per step in train_log.jsonl (see the module docstring)."""
    moved = set_aside_after(checkpoints, step)
    aside = moved[0] if moved else None
    dropped = trim_train_log(output_dir / TRAIN_LOG, step, aside)
    if moved:
        log.warning(
            "Starting at step %d: moved the later saves %s (another line of training) and %d lines "
            "of %s to %s; resume=latest, checkpoint.keep_last and the final message no longer see "
            "them",
            step,
            ", ".join(path.name for path in moved[1]),
            dropped,
            TRAIN_LOG,
            aside,
        )
    elif dropped:
        log.info(
            "%s: dropped %d lines after step %d (those steps are trained again)",
            TRAIN_LOG,
            dropped,
            step,
        )


def trim_train_log(path: Path, step: int, aside: Path | None) -> int:
    """Keep the lines of `path` up to `step`; the others go to `aside/train_log.jsonl` (or are
    dropped without `aside`). Returns how many lines were removed."""
    if not path.is_file():
        return 0
    kept: list[str] = []
    removed: list[str] = []
    for line in path.read_text().splitlines(keepends=True):
        try:
            record_step = json.loads(line).get("step", 0)
        except ValueError:
            record_step = 0
        (removed if record_step > step else kept).append(line)
    if removed:
        if aside is not None:
            (aside / TRAIN_LOG).write_text("".join(removed))
        atomic_write_text(path, "".join(kept))
    return len(removed)
