"""What the launching process does before any rank starts, while it holds the output_dir lock:
check that the checkpoint folder is writable, clear the leftovers of a killed run, validate the
whole configuration (including the resume checks), and set aside what a run starting at the
resume step must not see (`lora_trainer.training.resume.start_at`)."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from lora_trainer.errors import ConfigError
from lora_trainer.saves import checkpoints_dir, clear_leftovers, step_of
from lora_trainer.training.config import TrainConfig
from lora_trainer.training.failures import clear_marker
from lora_trainer.training.output_lock import OutputDirLock
from lora_trainer.training.resume import start_at
from lora_trainer.training.validate import ResolvedRun, validate_config

log = logging.getLogger(__name__)


def check_writable(directory: Path) -> None:
    probe = directory / f".write-test-{os.getpid()}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ConfigError(
            f"output_dir: {directory} is not writable ({err}): make it writable or choose another "
            "output_dir"
        ) from err


class OutputDirCheck(Callback):
    """Hydra callback (conf/train.yaml): before Hydra creates its log folder under output_dir,
    refuse an output_dir that cannot be written with one `error:` line."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            check_writable(Path(str(config.output_dir)).expanduser().absolute())
        except ConfigError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)


@contextmanager
def prepared_run(config: TrainConfig, first: bool) -> Iterator[ResolvedRun]:
    """The validated run; in the first process also the lock and the preparation (module doc)."""
    if not first:
        yield validate_config(config)
        return
    output_dir = Path(config.output_dir).expanduser().absolute()
    with OutputDirLock(output_dir):
        checkpoints = checkpoints_dir(output_dir)
        check_writable(checkpoints)
        clear_marker(output_dir)
        for note in clear_leftovers(checkpoints):
            log.info("%s: %s (left by a killed run)", checkpoints, note)
        run = validate_config(config)
        start_at(output_dir, checkpoints, (step_of(run.resume_path) or 0) if run.resume_path else 0)
        yield run
