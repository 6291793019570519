"""The save callback: every `checkpoint.every_n_steps` steps (and at the last step) it writes
`OUT/checkpoints/step-N/` with the training state of every rank, the HF adapter and/or merged
checkpoint and the export manifest, atomically: everything goes into a staging sibling that is
renamed to `step-N` only when complete. Then it prunes old saves down to `checkpoint.keep_last`,
never deleting the newest complete one."""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from lora_trainer.errors import ExportError
from lora_trainer.export.gather_adapter import gather_hf_adapter
from lora_trainer.export.hf_export import export_hf
from lora_trainer.training.checkpoints import complete_saves, save_dir_name
from lora_trainer.training.config import TrainConfig
from lora_trainer.training.module import LoraTrainingModule

log = logging.getLogger(__name__)


def _directory_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


class CheckpointExportCallback(pl.Callback):
    def __init__(self, config: TrainConfig, check_input_ids: torch.Tensor | None) -> None:
        self.config = config
        self.root = Path(config.output_dir) / "checkpoints"
        self.check_input_ids = check_input_ids
        self.last_saved_step = -1

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        every = self.config.checkpoint.every_n_steps
        if step % every == 0 or step >= self.config.trainer.max_steps:
            self.save(trainer, pl_module, step)

    def save(self, trainer: pl.Trainer, module: LoraTrainingModule, step: int) -> Path:
        if step == self.last_saved_step:
            return self.root / save_dir_name(step)
        strategy = trainer.strategy
        final = self.root / save_dir_name(step)
        staging = self.root / f".{final.name}.partial"
        if trainer.is_global_zero:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        strategy.barrier("save:staging")
        started = time.perf_counter()
        trainer.save_checkpoint(staging / "training_state", weights_only=False)
        adapter = gather_hf_adapter(module.adapters, module.loaded.spec, self.config.lora.to_lora_config(), str(module.hf_path))
        export = self.config.export
        manifest = export_hf(
            adapter,
            Path(module.hf_path),
            staging,
            step=step,
            write_adapter=export.adapter,
            write_merged=export.merged,
            profile=export.profile,
            check_input_ids=self.check_input_ids if export.check else None,
            rank=trainer.global_rank,
            world_size=trainer.world_size,
            barrier=strategy.barrier,
        )
        strategy.barrier("save:exported")
        if trainer.is_global_zero:
            check = manifest.get("check")
            if export.check and not (check and check.get("passed")):
                raise ExportError(
                    f"the export check failed at step {step}: {check}; the save stays unpublished at "
                    f"{staging} for inspection, the previous saves are untouched"
                )
            self._publish(staging, final)
            self._prune()
            log.info(
                "Saved step %d to %s in %.1f s (%.1f MiB)",
                step, final, time.perf_counter() - started, _directory_size(final) / 2**20,
            )
        strategy.barrier("save:published")
        self.last_saved_step = step
        return final

    @staticmethod
    def _publish(staging: Path, final: Path) -> None:
        """Rename the complete staging directory onto `final`; an older `final` (a re-save of the
        same step after a resume) is moved aside first and deleted only after the swap."""
        old = final.with_name(f".{final.name}.old")
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
        staging.rename(final)
        shutil.rmtree(old, ignore_errors=True)

    def _prune(self) -> None:
        saves = complete_saves(self.root)
        for stale in saves[: max(0, len(saves) - max(1, self.config.checkpoint.keep_last))]:
            shutil.rmtree(stale)
            log.info("Removed old save %s (checkpoint.keep_last=%d)", stale, self.config.checkpoint.keep_last)
