"""The save callback: every `checkpoint.every_n_steps` steps (and at the last step) it writes
`OUT/checkpoints/step-N/` with the training state of every rank, the HF adapter and/or merged
checkpoint and the export manifest, atomically: everything goes into a temporary sibling (rank 0
makes it with `temporary_directory` and tells the others its name) that is fsynced and renamed to
`step-N` only when complete (`publish_directory`). Then it prunes old saves down to
`checkpoint.keep_last`, never deleting the newest exported one, the ones being exported, nor the
one the run resumed from; only intact saves count (`saves_to_prune`).

With `export.background=true` (`_save_in_background`) the save holds the training state and the
export snapshot when it is renamed to `step-N`; the HF export is then made inside it by background
workers (`background_export.py`) while training goes on. With `export.check=true` every rank first
records what the model computes in each of its layers on the check batch into the export snapshot
(`record_trained_layers`), which the check compares the export with."""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from callbacks.background_export import BackgroundExports
from lora_trainer.errors import ExportError
from lora_trainer.export.agreement import raise_on_every_rank
from lora_trainer.export.background import is_exported, pending_exports
from lora_trainer.export.gather_adapter import distributed_hf_adapter, local_hf_factors
from lora_trainer.export.hf_export import export_hf
from lora_trainer.export.snapshot import snapshot_dir, write_factors, write_job
from lora_trainer.export.trained_layers import record_trained_layers
from lora_trainer.files.atomic import publish_directory, temporary_directory
from lora_trainer.training.checkpoints import complete_saves, save_dir_name, saves_to_prune
from lora_trainer.training.config import TrainConfig
from lora_trainer.training.module import LoraTrainingModule

log = logging.getLogger(__name__)


def _directory_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _staging(trainer: pl.Trainer, final: Path) -> Path:
    """The temporary directory of the save `final`: rank 0 makes it, every rank gets its path."""
    made = str(temporary_directory(final)) if trainer.is_global_zero else ""
    return Path(trainer.strategy.broadcast(made))


class CheckpointExportCallback(pl.Callback):
    def __init__(
        self,
        config: TrainConfig,
        check_input_ids: torch.Tensor | None,
        resumed_from: Path | None = None,
    ) -> None:
        self.config = config
        self.resumed_from = resumed_from
        self.root = Path(config.output_dir) / "checkpoints"
        self.check_input_ids = check_input_ids
        self.last_saved_step = -1
        self.background = BackgroundExports(on_finished=lambda _: self._prune())

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Saves an earlier run left without their export (killed meanwhile) get it now."""
        pending = pending_exports(self.root) if trainer.is_global_zero else None
        self.background.complete_later(trainer, trainer.strategy.broadcast(pending))

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        self.background.poll(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.background.wait(trainer, "The end of training")

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self.background.stop()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any
    ) -> None:
        step = trainer.global_step
        every = self.config.checkpoint.every_n_steps
        if step % every == 0 or step >= self.config.trainer.max_steps:
            self.save(trainer, pl_module, step)

    def save(self, trainer: pl.Trainer, module: LoraTrainingModule, step: int) -> Path:
        if step == self.last_saved_step:
            return self.root / save_dir_name(step)
        if self.config.export.background:
            return self._save_in_background(trainer, module, step)
        strategy = trainer.strategy
        final = self.root / save_dir_name(step)
        staging = _staging(trainer, final)
        started = time.perf_counter()
        trainer.save_checkpoint(staging / "training_state", weights_only=False)
        export = self.config.export
        failure: Exception | None = None
        try:
            trained = self._record_trained_layers(module, staging)
            adapter = distributed_hf_adapter(
                module.adapters,
                module.loaded.spec,
                self.config.lora.to_lora_config(),
                str(module.hf_path),
            )
            manifest = export_hf(
                adapter,
                Path(module.hf_path),
                staging,
                step=step,
                write_adapter=export.adapter,
                write_merged=export.merged,
                profile=export.profile,
                check_input_ids=self.check_input_ids if export.check else None,
                check_memory_gb=export.check_memory_gb,
                check_trained_layers=trained,
                rank=trainer.global_rank,
                world_size=trainer.world_size,
                barrier=strategy.barrier,
            )
            check = manifest.get("check")
            if trainer.is_global_zero and export.check and not (check and check.get("passed")):
                failure = ExportError(
                    f"{check['message'] if check else 'the export check did not run'} "
                    f"(step {step}); the save stays unpublished at {staging} for inspection, "
                    "the previous saves are untouched"
                )
        except Exception as error:
            failure = error
        raise_on_every_rank(failure)
        if trainer.is_global_zero:
            shutil.rmtree(snapshot_dir(staging), ignore_errors=True)
            publish_directory(staging, final)
            self._prune()
            log.info(
                "Saved step %d to %s in %.1f s (%.1f MiB)",
                step,
                final,
                time.perf_counter() - started,
                _directory_size(final) / 2**20,
            )
        strategy.barrier("save:published")
        self.last_saved_step = step
        return final

    def _save_in_background(
        self, trainer: pl.Trainer, module: LoraTrainingModule, step: int
    ) -> Path:
        """Training state and export snapshot into `step-N`, then the export in the background."""
        self.background.wait(trainer, f"The save of step {step}")
        strategy = trainer.strategy
        final = self.root / save_dir_name(step)
        started = time.perf_counter()
        staging = _staging(trainer, final)
        trainer.save_checkpoint(staging / "training_state", weights_only=False)
        state_seconds = time.perf_counter() - started
        trained = self._record_trained_layers(module, staging)
        write_factors(
            staging, trainer.global_rank, local_hf_factors(module.adapters, module.loaded.spec)
        )
        if trainer.is_global_zero:
            export, lora = self.config.export, self.config.lora
            write_job(
                staging,
                step=step,
                base_dir=str(module.hf_path),
                snapshot_ranks=trainer.world_size,
                write_adapter=export.adapter,
                write_merged=export.merged,
                profile=export.profile,
                check_input_ids=self.check_input_ids.tolist() if export.check else None,
                check_memory_gb=export.check_memory_gb,
                trained_layers=trained is not None,
                r=lora.r,
                alpha=lora.alpha,
                use_rslora=lora.rslora,
                text_prefix=module.loaded.spec.text_prefix,
            )
        strategy.barrier("save:snapshot")
        if trainer.is_global_zero:
            publish_directory(staging, final)
            self._prune()
        strategy.barrier("save:published")
        self.background.start(trainer, final)
        if trainer.is_global_zero:
            log.info(
                "Saved step %d to %s: training blocked %.2f s (training state %.2f s, "
                "snapshot %.1f MiB); the HF export runs in the background",
                step,
                final,
                time.perf_counter() - started,
                state_seconds,
                _directory_size(snapshot_dir(final)) / 2**20,
            )
        self.last_saved_step = step
        return final

    def _record_trained_layers(self, module: LoraTrainingModule, staging: Path) -> Path | None:
        """With the export check on, what our model computes in each layer on the check batch,
        recorded into the save's export snapshot for the check to compare against (every rank)."""
        if not self.config.export.check or self.check_input_ids is None:
            return None
        if module.loaded is None:
            raise ExportError("the export check needs the model, which is not built yet")
        directory = snapshot_dir(staging)
        record_trained_layers(module.loaded.model, self.check_input_ids, directory)
        return directory

    def _prune(self) -> None:
        saves = complete_saves(self.root)
        exported = [save for save in saves if is_exported(save)]
        resumed = [self.resumed_from] if self.resumed_from else []
        protected = {*exported[-1:], self.background.exporting, *self.background.queue, *resumed}
        keep = frozenset(path for path in protected if path is not None)
        for stale in saves_to_prune(self.root, self.config.checkpoint.keep_last, keep):
            shutil.rmtree(stale)
            log.info(
                "Removed old save %s (checkpoint.keep_last=%d)",
                stale,
                self.config.checkpoint.keep_last,
            )
