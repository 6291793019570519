"""A Lightning callback that tests add from the command line (`+callbacks.probe._target_=
tests.callback_probe.StepRecorder +callbacks.probe.path=DIR`): each rank writes the optimizer
steps it saw end, and the `every` it was made with, to `DIR/rank-R.json`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl


class StepRecorder(pl.Callback):
    def __init__(self, path: str, every: int = 1) -> None:
        self.path = Path(path)
        self.every = every
        self.steps: list[int] = []

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self.steps.append(trainer.global_step)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        record = {"every": self.every, "steps": self.steps}
        (self.path / f"rank-{trainer.global_rank}.json").write_text(json.dumps(record))
