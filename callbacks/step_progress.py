"""A training progress bar counted in optimizer steps (`trainer.max_steps`), not in the
micro-batches each step pulls from the data loader."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import TQDMProgressBar
from tqdm import tqdm


class StepProgressBar(TQDMProgressBar):
    """Lightning restarts its bar at every epoch, as "Epoch N"; this one runs across epochs. It is
    set up at the first epoch of the run, at the step the run starts from (a resume's rate counts
    from there), and left alone at the next ones."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._counting_steps: tqdm | None = None

    def on_train_epoch_start(self, trainer: pl.Trainer, *_: Any) -> None:
        bar = self.train_progress_bar
        if bar is self._counting_steps:
            return
        bar.set_description("Training steps", refresh=False)
        bar.reset(total=trainer.max_steps)
        bar.n = bar.last_print_n = bar.initial = trainer.global_step
        bar.refresh()
        self._counting_steps = bar

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *_: Any
    ) -> None:
        bar = self.train_progress_bar
        bar.update(trainer.global_step - bar.n)
        bar.set_postfix(self.get_metrics(trainer, pl_module))
