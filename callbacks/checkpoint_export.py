"""The save callback: every `checkpoint.every_n_steps` steps (and at the last step) it writes
`OUT/checkpoints/step-N/` with the training state of every rank, the HF adapter and/or merged
checkpoint and the export manifest, atomically: everything goes into a temporary sibling (rank 0
makes it with `temporary_directory` and tells the others its name) that is fsynced and renamed to
`step-N` only when complete (`publish_directory`). Then it prunes old saves down to
`checkpoint.keep_last`, never deleting the newest exported one, the ones being exported, nor the
one the run resumed from; only intact saves count (`saves_to_prune`).

With `background=True` (`_save_in_background`) the save holds the training state and the export
snapshot when it is renamed to `step-N`; the HF export is then made inside it by background
workers (`background_export.py`) while training goes on.

The run's configuration wires it (`callbacks.save` in `lora_trainer.training.config`): its
arguments are interpolated from `output_dir`, `checkpoint.*` and `export.*`. What it reads from
the LightningModule is the `AdaptedModel` protocol (`lora_trainer.export.source`), and the save
the run resumed from is the one whose training state the Trainer loaded (`trainer.ckpt_path`).

With `check=True` every rank first records what the model computes in each of its layers on the
check batch into the export snapshot (`record_trained_layers`), which the check compares the
export with."""

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
from lora_trainer.export.peft_adapter import Profile
from lora_trainer.export.snapshot import snapshot_dir, write_factors, write_job
from lora_trainer.export.source import AdaptedModel
from lora_trainer.export.trained_layers import record_trained_layers
from lora_trainer.files.atomic import publish_directory, temporary_directory
from lora_trainer.saves import checkpoints_dir, complete_saves, save_dir_name, saves_to_prune

log = logging.getLogger(__name__)


def _directory_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _staging(trainer: pl.Trainer, final: Path) -> Path:
    """The temporary directory of the save `final`: rank 0 makes it, every rank gets its path."""
    made = str(temporary_directory(final)) if trainer.is_global_zero else ""
    return Path(trainer.strategy.broadcast(made))


def check_input_ids(vocab_size: int) -> torch.Tensor:
    """The fixed batch on which the export check compares logits."""
    return torch.randint(0, vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))


def adapted(module: pl.LightningModule) -> AdaptedModel:
    """`module` as the `AdaptedModel` the export reads; TypeError naming what it lacks."""
    if not isinstance(module, AdaptedModel):
        members = ("adapters", "hf_path", "lora_config", "spec", "megatron_model")
        missing = [name for name in members if not hasattr(module, name)]
        raise TypeError(
            f"the save callback exports LoRA adapters: {type(module).__name__} has no "
            f"{', '.join(missing)} (lora_trainer.export.source.AdaptedModel)"
        )
    return module


class CheckpointExportCallback(pl.Callback):
    """Saves every `every_n_steps` optimizer steps and at the last one into
    `output_dir/checkpoints/step-N`, keeping the newest `keep_last` intact saves; `adapter`,
    `merged`, `profile`, `check`, `check_memory_gb` and `background` are the `export.*` settings."""

    def __init__(
        self,
        *,
        output_dir: str | Path,
        every_n_steps: int,
        keep_last: int,
        adapter: bool,
        merged: bool,
        profile: Profile,
        check: bool,
        check_memory_gb: float,
        background: bool,
    ) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps={every_n_steps} must be at least 1")
        self.root = checkpoints_dir(output_dir)
        self.every_n_steps = every_n_steps
        self.keep_last = keep_last
        self.write_adapter = adapter
        self.write_merged = merged
        self.profile = profile
        self.check = check
        self.check_memory_gb = check_memory_gb
        self.in_background = background
        self.resumed_from: Path | None = None
        self.last_saved_step = -1
        self.background = BackgroundExports(on_finished=lambda _: self._prune())

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Saves an earlier run left without their export (killed meanwhile) get it now."""
        if trainer.ckpt_path:
            self.resumed_from = Path(trainer.ckpt_path).parent
        if trainer.is_global_zero:
            log.info("Saving every %d steps to %s", self.every_n_steps, self.root)
        pending = pending_exports(self.root) if trainer.is_global_zero else []
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
        if step % self.every_n_steps == 0 or step >= trainer.max_steps:
            self.save(trainer, adapted(pl_module), step)

    def save(self, trainer: pl.Trainer, module: AdaptedModel, step: int) -> Path:
        if step == self.last_saved_step:
            return self.root / save_dir_name(step)
        if self.in_background:
            return self._save_in_background(trainer, module, step)
        strategy = trainer.strategy
        final = self.root / save_dir_name(step)
        staging = _staging(trainer, final)
        started = time.perf_counter()
        trainer.save_checkpoint(staging / "training_state", weights_only=False)
        failure: Exception | None = None
        try:
            trained = self._record_trained_layers(module, staging)
            adapter = distributed_hf_adapter(
                module.adapters, module.spec, module.lora_config, module.hf_path
            )
            manifest = export_hf(
                adapter,
                Path(module.hf_path),
                staging,
                step=step,
                write_adapter=self.write_adapter,
                write_merged=self.write_merged,
                profile=self.profile,
                check_input_ids=check_input_ids(module.spec.vocab_size) if self.check else None,
                check_memory_gb=self.check_memory_gb,
                check_trained_layers=trained,
                rank=trainer.global_rank,
                world_size=trainer.world_size,
                barrier=strategy.barrier,
            )
            check = manifest.get("check")
            if trainer.is_global_zero and self.check and not (check and check.get("passed")):
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

    def _save_in_background(self, trainer: pl.Trainer, module: AdaptedModel, step: int) -> Path:
        """Training state and export snapshot into `step-N`, then the export in the background."""
        self.background.wait(trainer, f"The save of step {step}")
        strategy = trainer.strategy
        final = self.root / save_dir_name(step)
        started = time.perf_counter()
        staging = _staging(trainer, final)
        trainer.save_checkpoint(staging / "training_state", weights_only=False)
        state_seconds = time.perf_counter() - started
        trained = self._record_trained_layers(module, staging)
        write_factors(staging, trainer.global_rank, local_hf_factors(module.adapters, module.spec))
        if trainer.is_global_zero:
            lora = module.lora_config
            write_job(
                staging,
                step=step,
                base_dir=module.hf_path,
                snapshot_ranks=trainer.world_size,
                write_adapter=self.write_adapter,
                write_merged=self.write_merged,
                profile=self.profile,
                check_input_ids=(
                    check_input_ids(module.spec.vocab_size).tolist() if self.check else None
                ),
                check_memory_gb=self.check_memory_gb,
                trained_layers=trained is not None,
                r=lora.r,
                alpha=lora.alpha,
                use_rslora=lora.rslora,
                text_prefix=module.spec.text_prefix,
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

    def _record_trained_layers(self, module: AdaptedModel, staging: Path) -> Path | None:
        """With the export check on, what our model computes in each layer on the check batch,
        recorded into the save's export snapshot for the check to compare against (every rank)."""
        if not self.check:
            return None
        directory = snapshot_dir(staging)
        batch = check_input_ids(module.spec.vocab_size)
        record_trained_layers(module.megatron_model, batch, directory)
        return directory

    def _prune(self) -> None:
        saves = complete_saves(self.root)
        exported = [save for save in saves if is_exported(save)]
        resumed = [self.resumed_from] if self.resumed_from else []
        protected = {*exported[-1:], self.background.exporting, *self.background.queue, *resumed}
        keep = frozenset(path for path in protected if path is not None)
        for stale in saves_to_prune(self.root, self.keep_last, keep):
            shutil.rmtree(stale)
            log.info("Removed old save %s (checkpoint.keep_last=%d)", stale, self.keep_last)
