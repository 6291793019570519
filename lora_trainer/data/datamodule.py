"""`SFTDataModule`: data paths -> tokenized, cached samples -> packed rows -> DP micro-batches.

The module shards data by data-parallel rank itself (`DPBatchSampler`), so the Trainer must not
add a distributed sampler (`Trainer(use_distributed_sampler=False)`). The DP rank and size come
from the constructor or `set_data_parallel`, else from megatron's `parallel_state` when it is
initialized, else rank 0 of 1. The loaders' rows are fixed-length (`max_seq_len`) and a training
"sample" for the batch sizes is a row (a packed row holds several samples when `pack=True`).
Tokenization and mixing are `lora_trainer.data.pipeline`'s: the launching process tokenizes into
the cache before the ranks start, and every rank loads the cached, memory-mapped samples.
`state_dict()` carries the training sampler's state (and so does the training loader, which
Lightning checkpoints with its loop state), so a resumed run continues with exactly the
micro-batches an uninterrupted run would have used next.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from lora_trainer.data.formats import Columns
from lora_trainer.data.packing import PackedDataset, TokenizedRows, collate
from lora_trainer.data.pipeline import mix, parse_sources, tokenize_source
from lora_trainer.data.sampler import DPBatchSampler, eval_batches
from lora_trainer.data.tokenize import TokenizeSettings, load_tokenizer
from lora_trainer.errors import DataError

log = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = ".cache/data"


class ResumableDataLoader(DataLoader):
    """A DataLoader over a `DPBatchSampler` whose state is the sampler's.

    Lightning saves and restores loaders that have `state_dict`/`load_state_dict` with the loop
    state, so a mid-epoch resume also works when the loader is passed without the datamodule.
    """

    def __init__(
        self, dataset: PackedDataset, batch_sampler: DPBatchSampler, **kwargs: Any
    ) -> None:
        super().__init__(dataset, batch_sampler=batch_sampler, **kwargs)
        self.dp_sampler = batch_sampler

    def state_dict(self) -> dict[str, Any]:
        """The batch sampler's `state_dict()`."""
        return self.dp_sampler.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the batch sampler's state."""
        self.dp_sampler.load_state_dict(state_dict)


class SFTDataModule(LightningDataModule):
    """Supervised fine-tuning data for one DP rank, packed or one sample per row."""

    def __init__(
        self,
        train_path: str | Path | Sequence[Any],
        *,
        model_dir: str | Path,
        max_seq_len: int,
        micro_batch_size: int,
        global_batch_size: int,
        val_path: str | Path | Sequence[Any] | None = None,
        pack: bool = True,
        seed: int = 0,
        train_on: str = "all_assistant",
        enable_thinking: bool = True,
        overlong: str = "drop",
        columns: Mapping[str, str] | None = None,
        cache_dir: str | Path = DEFAULT_CACHE_DIR,
        num_proc: int | None = None,
        dp_rank: int | None = None,
        dp_size: int | None = None,
    ) -> None:
        super().__init__()
        self.train_sources = parse_sources(train_path, "data.train_path")
        self.val_sources = (
            parse_sources(val_path, "data.val_path") if val_path is not None else None
        )
        self.model_dir = Path(model_dir)
        self.max_seq_len = max_seq_len
        self.settings = TokenizeSettings(max_seq_len, train_on, enable_thinking, overlong)
        try:
            self.columns = Columns.from_mapping(columns or {})
        except ValueError as err:
            raise DataError(str(err)) from err
        self.cache_dir = Path(cache_dir)
        self.num_proc = num_proc
        self.micro_batch_size = micro_batch_size
        self.global_batch_size = global_batch_size
        self.pack = pack
        self.seed = seed
        self.train_dataset: PackedDataset | None = None
        self.val_dataset: PackedDataset | None = None
        self.train_sampler: DPBatchSampler | None = None
        self._pending_state: dict[str, Any] | None = None
        self._dp: tuple[int, int] | None = None
        if dp_rank is not None or dp_size is not None:
            if dp_rank is None or dp_size is None:
                raise DataError("pass both dp_rank and dp_size, or neither")
            self.set_data_parallel(dp_rank, dp_size)

    @classmethod
    def from_config(
        cls,
        data: Any,
        *,
        default_train_path: str | Path,
        model_dir: str | Path,
        micro_batch_size: int,
        global_batch_size: int,
    ) -> SFTDataModule:
        """The data module of a run's `data` section (`lora_trainer.training.config.DataSection`);
        a null `train_path` reads `default_train_path`."""
        return cls(
            data.train_path if data.train_path is not None else default_train_path,
            model_dir=model_dir,
            max_seq_len=data.max_seq_len,
            micro_batch_size=micro_batch_size,
            global_batch_size=global_batch_size,
            val_path=data.val_path,
            pack=data.pack,
            seed=data.seed,
            train_on=str(data.train_on),
            enable_thinking=data.enable_thinking,
            overlong=str(data.overlong),
            columns=dataclasses.asdict(data.columns),
            cache_dir=data.cache_dir,
            num_proc=data.num_proc,
        )

    def set_data_parallel(self, dp_rank: int, dp_size: int) -> None:
        """Use this DP rank and size instead of megatron's; call before `setup`."""
        if self.train_sampler is not None:
            raise DataError("set_data_parallel must be called before setup()")
        self._dp = (dp_rank, dp_size)

    def data_parallel(self) -> tuple[int, int]:
        """`(dp_rank, dp_size)`: as set, else from megatron's parallel_state, else `(0, 1)`."""
        from lora_trainer.parallel.groups import data_parallel_rank_size

        return self._dp or data_parallel_rank_size() or (0, 1)

    def samples(self, key: str, announce: bool = False) -> Any:
        """The tokenized (cached) and mixed samples of `data.train_path` or `data.val_path`.

        With `announce`, logs each source's summary line when anything was truncated or dropped.
        """
        sources = self.train_sources if key == "data.train_path" else self.val_sources
        if sources is None:
            raise DataError(f"{key} is not set")
        parts = []
        for spec in sources:
            dataset, summary = tokenize_source(
                spec,
                model_dir=self.model_dir,
                settings=self.settings,
                columns=self.columns,
                cache_dir=self.cache_dir,
                key=key,
                num_proc=self.num_proc,
            )
            if announce and set(summary.counts) != {"KEPT"}:
                log.warning(summary.line(key, spec.path, self.settings))
            parts.append((dataset, spec))
        return mix(parts, self.seed, key)

    def _dataset(self, key: str, tokenizer: Any) -> PackedDataset:
        samples = TokenizedRows(self.samples(key))
        pad_id = tokenizer.pad_token_id
        if pad_id is None:
            pad_id = tokenizer.eos_token_id
        if pad_id is None:
            raise DataError(f"the tokenizer in {self.model_dir} has neither a pad nor an eos token")
        return PackedDataset(samples, self.max_seq_len, pad_id, pack=self.pack)

    def setup(self, stage: str | None = None) -> None:
        """Tokenize and pack the datasets and build the training sampler (once)."""
        if self.train_dataset is not None:
            return
        tokenizer = load_tokenizer(self.model_dir)
        self.train_dataset = self._dataset("data.train_path", tokenizer)
        if self.val_sources is not None:
            self.val_dataset = self._dataset("data.val_path", tokenizer)
        dp_rank, dp_size = self.data_parallel()
        self.train_sampler = DPBatchSampler(
            len(self.train_dataset),
            micro_batch_size=self.micro_batch_size,
            global_batch_size=self.global_batch_size,
            dp_rank=dp_rank,
            dp_size=dp_size,
            seed=self.seed,
        )
        if self._pending_state is not None:
            self.train_sampler.load_state_dict(self._pending_state)
            self._pending_state = None

    def _require_setup(self) -> tuple[PackedDataset, DPBatchSampler]:
        if self.train_dataset is None or self.train_sampler is None:
            raise DataError("SFTDataModule.setup() must run before its dataloaders are used")
        return self.train_dataset, self.train_sampler

    def train_dataloader(self) -> ResumableDataLoader:
        """Micro-batches of this DP rank (dicts from `collate`), continuing at `consumed_samples`.

        No worker processes: they would prefetch ahead of training and make the consumed-sample
        count run ahead of what was trained.
        """
        dataset, sampler = self._require_setup()
        return ResumableDataLoader(
            dataset, batch_sampler=sampler, collate_fn=collate, num_workers=0
        )

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        """This rank's share of the validation rows in order; `[]` when there is no `val_path`."""
        self._require_setup()
        if self.val_dataset is None:
            return []
        dp_rank, dp_size = self.data_parallel()
        batches = eval_batches(len(self.val_dataset), self.micro_batch_size, dp_rank, dp_size)
        return DataLoader(self.val_dataset, batch_sampler=batches, collate_fn=collate)

    @property
    def consumed_samples(self) -> int:
        """Training rows handed out to all DP ranks together so far."""
        return self._require_setup()[1].consumed_samples

    def state_dict(self) -> dict[str, Any]:
        """`{"train_sampler": DPBatchSampler.state_dict()}` (or the state still to be applied)."""
        if self.train_sampler is not None:
            return {"train_sampler": self.train_sampler.state_dict()}
        if self._pending_state is not None:
            return {"train_sampler": dict(self._pending_state)}
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the sampler state now, or at `setup` if it has not run yet."""
        state = state_dict.get("train_sampler")
        if state is None:
            return
        if self.train_sampler is not None:
            self.train_sampler.load_state_dict(state)
        else:
            self._pending_state = dict(state)
