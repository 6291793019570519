"""The training bar counts optimizer steps across epochs, from the step a run starts at."""

from __future__ import annotations

from types import SimpleNamespace

from callbacks.step_progress import StepProgressBar


def test_the_bar_counts_steps_across_epochs_from_the_resumed_step() -> None:
    """A run resumed at step 20 of 40, with 4 steps an epoch: the bar starts at 20 of 40 with no
    rate counted for those 20, and the next epoch neither restarts it nor its clock."""
    trainer = SimpleNamespace(
        max_steps=40,
        max_epochs=None,
        global_step=20,
        current_epoch=5,
        num_training_batches=4,
        progress_bar_metrics={},
        loggers=[],
    )
    progress = StepProgressBar()
    progress._trainer = trainer  # what Lightning's setup would set
    progress.on_train_start(trainer)
    progress.on_train_epoch_start(trainer)
    bar = progress.train_progress_bar
    assert (bar.n, bar.total, bar.desc) == (20, 40, "Training steps: ")
    assert bar.format_dict["n"] - bar.format_dict["initial"] == 0
    started = bar.start_t

    for step in (21, 22, 23, 24):
        trainer.global_step = step
        progress.on_train_batch_end(trainer, None)
    trainer.current_epoch = 6
    progress.on_train_epoch_start(trainer)
    assert progress.train_progress_bar is bar
    assert (bar.n, bar.total, bar.desc, bar.start_t) == (24, 40, "Training steps: ", started)
    assert bar.format_dict["n"] - bar.format_dict["initial"] == 4
