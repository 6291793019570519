"""A Lightning strategy for megatron-core: it owns process groups and megatron's parallel state,
leaves gradient synchronisation to megatron's DDP inside the module, and saves one training-state
file per rank (each rank holds different LoRA shards and optimizer state), holding only tensors
and plain values, read back with `weights_only=True`."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from lightning.pytorch.strategies import DDPStrategy
from megatron.core import parallel_state

from lora_trainer.errors import CheckpointError
from lora_trainer.parallel.config import ParallelConfig
from lora_trainer.parallel.state import initialize_parallel, process_group_backend
from lora_trainer.saves import (
    STATE_FILE,
    load_rank_state,
    save_rank_state,
    write_state_manifest,
)


class MegatronStrategy(DDPStrategy):
    def __init__(
        self,
        parallel: ParallelConfig,
        seed: int,
        save_settings: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(process_group_backend=process_group_backend(), **kwargs)
        self.parallel = parallel
        self.seed = seed
        self.save_settings = save_settings or {}

    def setup_environment(self) -> None:
        super().setup_environment()
        if not parallel_state.model_parallel_is_initialized():
            initialize_parallel(self.parallel, seed=self.seed)

    def configure_ddp(self) -> None:
        """Megatron's DDP wraps the model inside the module; no torch DDP on top."""

    def _layout(self) -> dict[str, Any]:
        return {"world_size": self.world_size, "parallel": asdict(self.parallel)}

    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: str | Path, storage_options: Any = None
    ) -> None:
        """Every rank writes its own file into the directory `filepath` (temp file + rename); once
        all are written, rank 0 lists them with the run's settings in its manifest.json."""
        directory = Path(filepath)
        directory.mkdir(parents=True, exist_ok=True)
        checkpoint = dict(checkpoint, parallel_layout=self._layout())
        save_rank_state(checkpoint, directory / STATE_FILE.format(rank=self.global_rank))
        self.barrier("save:rank_states")
        if self.is_global_zero:
            write_state_manifest(
                directory,
                step=checkpoint["global_step"],
                world_size=self.world_size,
                settings=self.save_settings,
            )

    def load_checkpoint(
        self, checkpoint_path: str | Path, weights_only: bool | None = None
    ) -> dict[str, Any]:
        path = Path(checkpoint_path) / STATE_FILE.format(rank=self.global_rank)
        if not path.is_file():
            raise CheckpointError(
                f"{path} is missing: the checkpoint {checkpoint_path} was not saved by a run with "
                f"{self.world_size} ranks, or it is incomplete; resume from another step"
            )
        checkpoint = load_rank_state(path)
        saved, now = checkpoint.get("parallel_layout"), self._layout()
        if saved != now:
            raise CheckpointError(
                f"{checkpoint_path} was saved with layout {saved}, this run is {now}; resume with "
                "the same trainer.devices and parallel.* settings"
            )
        return checkpoint

    def remove_checkpoint(self, filepath: str | Path) -> None:
        """Saves are pruned by the checkpoint callback, never by Lightning."""
