"""The training side of background exports: at most one export in flight, its worker on every
rank, and a failure turned into the same error on every rank at the same step.

Every method that looks at the workers is collective while an export is in flight (one small
all-reduce of [running, failed] over all ranks), so every rank takes the same decision at the same
step; when no export is in flight nothing is communicated.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.distributed as dist

from lora_trainer.errors import ExportError
from lora_trainer.export.background import (
    ExportWorker,
    discard_snapshot,
    failure_messages,
    reset_export,
)

log = logging.getLogger(__name__)

_WAIT_POLL_S = 0.2
# How long a failed export's workers get to exit by themselves before they are killed.
_SETTLE_S = 10.0


class BackgroundExports:
    """This rank's view of the export in flight and of the saves whose export is still to start.
    `on_finished(save_dir)` runs on global rank 0 after each export finished."""

    def __init__(self, on_finished: Callable[[Path], None]) -> None:
        self.on_finished = on_finished
        self.worker: ExportWorker | None = None
        self.queue: list[Path] = []

    @property
    def exporting(self) -> Path | None:
        """The save whose export is in flight."""
        return None if self.worker is None else self.worker.save_dir

    def start(self, trainer: pl.Trainer, save_dir: Path) -> None:
        """Start this rank's worker for `save_dir` (every rank, no export in flight)."""
        self.worker = ExportWorker(save_dir, trainer.global_rank, trainer.world_size)

    def complete_later(self, trainer: pl.Trainer, saves: list[Path]) -> None:
        """Export `saves` (kept saves of an earlier run whose export did not finish), one after
        the other, in the background. Collective."""
        if saves:
            if trainer.is_global_zero:
                log.info(
                    "Completing the HF export of %s in the background",
                    ", ".join(s.name for s in saves),
                )
            self.queue.extend(saves)
            self.poll(trainer)

    def poll(self, trainer: pl.Trainer) -> bool:
        """True while an export is in flight or queued; starts the next queued export once none is
        in flight; raises ExportError on every rank when a worker failed. Collective."""
        if self.worker is None and not self.queue:
            return False
        running, failed = _sum_over_ranks(trainer, self._local_status())
        if failed:
            self._fail(trainer)
        if running:
            return True
        if self.worker is not None:
            finished, self.worker = self.worker.save_dir, None
            if trainer.is_global_zero:
                discard_snapshot(finished)
                log.info("HF export of %s finished", finished)
                self.on_finished(finished)
        if self.queue:
            save_dir = self.queue.pop(0)
            if trainer.is_global_zero:
                reset_export(save_dir)
            trainer.strategy.barrier("export:reset")
            self.start(trainer, save_dir)
            return True
        return False

    def wait(self, trainer: pl.Trainer, reason: str) -> None:
        """Block until no export is in flight or queued; logs how long when it had to wait."""
        started = time.perf_counter()
        exporting = self.exporting
        while self.poll(trainer):
            time.sleep(_WAIT_POLL_S)
        waited = time.perf_counter() - started
        if exporting is not None and trainer.is_global_zero and waited >= 0.05:
            log.info("%s waited %.1f s for the HF export of %s", reason, waited, exporting.name)

    def stop(self) -> None:
        """Kill this rank's worker (after an error elsewhere); its save can be completed later."""
        if self.worker is not None:
            self.worker.stop()
            self.worker = None
        self.queue.clear()

    def _local_status(self) -> list[int]:
        if self.worker is None:
            return [0, 0]
        return [int(self.worker.running()), int(self.worker.failure() is not None)]

    def _fail(self, trainer: pl.Trainer) -> None:
        """Every rank lets its worker finish recording why it stopped, so the root cause (not a
        peer's "another worker failed") is what every rank reports."""
        if self.worker is not None:
            self.worker.settle(_SETTLE_S)
        trainer.strategy.barrier("export:failed")
        save_dir = self.worker.save_dir if self.worker is not None else None
        own = self.worker.failure() if self.worker is not None else None
        self.stop()
        messages = failure_messages(save_dir) if save_dir is not None else []
        cause = (
            messages[0]
            if messages
            else own or "a background export worker failed (see its output above)"
        )
        raise ExportError(
            f"the background HF export of {save_dir} failed: {cause}. Training stopped at step "
            f"{trainer.global_step}; the save's training state is intact: fix the cause, then "
            f"complete the export with `python -m lora_trainer.export {save_dir}`, or resume with "
            "resume=latest"
        )


def _sum_over_ranks(trainer: pl.Trainer, values: list[int]) -> list[int]:
    tensor = torch.tensor(values, dtype=torch.int64, device=trainer.strategy.root_device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
    return [int(v) for v in tensor.tolist()]
