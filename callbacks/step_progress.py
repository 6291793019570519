"""A training progress bar counted in optimizer steps (`trainer.max_steps`), not in the
micro-batches each step pulls from the data loader."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import TQDMProgressBar


class StepProgressBar(TQDMProgressBar):
    """One bar for the whole run. It is set up when training starts, at the step the run starts
    from (a resume's rate counts from there; Lightning has restored the step by then), and runs on
    across epochs, where Lightning restarts its own bar as "Epoch N"."""

    def on_train_start(self, trainer: pl.Trainer, *_: Any) -> None:
        super().on_train_start(trainer)
        bar = self.train_progress_bar
        bar.set_description("Training steps", refresh=False)
        bar.reset(total=trainer.max_steps)
        bar.n = bar.last_print_n = bar.initial = trainer.global_step
        bar.refresh()

    def on_train_epoch_start(self, trainer: pl.Trainer, *_: Any) -> None:
        """No restart: the bar counts the run's steps, not an epoch's batches."""

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *_: Any
    ) -> None:
        bar = self.train_progress_bar
        bar.update(trainer.global_step - bar.n)
        bar.set_postfix(self.get_metrics(trainer, pl_module))
