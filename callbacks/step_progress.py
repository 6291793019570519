"""A training progress bar counted in optimizer steps (`trainer.max_steps`), not in the
micro-batches each step pulls from the data loader."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import TQDMProgressBar


class StepProgressBar(TQDMProgressBar):
    def on_train_epoch_start(self, trainer: pl.Trainer, *_: Any) -> None:
        super().on_train_epoch_start(trainer)
        self.train_progress_bar.reset(total=trainer.max_steps)
        self.train_progress_bar.update(trainer.global_step)
        self.train_progress_bar.set_description("Training steps")

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *_: Any
    ) -> None:
        bar = self.train_progress_bar
        bar.update(trainer.global_step - bar.n)
        bar.set_postfix(self.get_metrics(trainer, pl_module))
