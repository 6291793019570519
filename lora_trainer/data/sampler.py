"""Data-parallel batch samplers: each DP rank gets its own micro-batches of dataset indices.

Training (`DPBatchSampler`): every epoch is a permutation of the dataset seeded by
``(seed, epoch)``, cut into global batches of `global_batch_size` indices; the last incomplete
global batch of an epoch is dropped. A global batch is consumed in
``micro_steps = global_batch_size // (micro_batch_size * dp_size)`` micro-steps of
``micro_batch_size * dp_size`` indices, of which DP rank `r` takes the `r`-th slice of
`micro_batch_size`. So the ranks' micro-batches are disjoint and their union is the epoch.

`consumed_samples` counts the samples handed out to all DP ranks together (the same number on
every rank, as in Megatron), is advanced as micro-batches are yielded, and is the whole resume
state: an iterator always starts at `consumed_samples`, so a sampler restored with
`load_state_dict` continues with exactly the micro-batches an uninterrupted run would get next.
Iteration stops at the end of the current epoch; iterating again continues with the next one.
Counts are exact when the consumer does not prefetch ahead of training (DataLoader with
`num_workers=0`; Lightning does not prefetch a loader that has a length).

Evaluation (`eval_batches`): indices in order, no shuffling, split the same way into micro-batches.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from lora_trainer.errors import DataError


def _check_sizes(
    num_samples: int, micro_batch_size: int, global_batch_size: int, dp_rank: int, dp_size: int
) -> None:
    if micro_batch_size < 1 or dp_size < 1:
        raise DataError(
            f"micro_batch_size ({micro_batch_size}) and dp_size ({dp_size}) must be >= 1"
        )
    if not 0 <= dp_rank < dp_size:
        raise DataError(f"dp_rank {dp_rank} is outside 0..{dp_size - 1}")
    if global_batch_size % (micro_batch_size * dp_size):
        raise DataError(
            f"global_batch_size {global_batch_size} must be a multiple of micro_batch_size "
            f"{micro_batch_size} * dp_size {dp_size}"
        )
    if num_samples < global_batch_size:
        raise DataError(
            f"the dataset has {num_samples} rows, fewer than one global batch of "
            f"{global_batch_size}"
        )


class DPBatchSampler:
    """Deterministically shuffled micro-batches of indices for one DP rank, resumable exactly."""

    def __init__(
        self,
        num_samples: int,
        micro_batch_size: int,
        global_batch_size: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        seed: int = 0,
        consumed_samples: int = 0,
    ) -> None:
        _check_sizes(num_samples, micro_batch_size, global_batch_size, dp_rank, dp_size)
        self.num_samples = num_samples
        self.micro_batch_size = micro_batch_size
        self.global_batch_size = global_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.seed = seed
        self.samples_per_epoch = num_samples // global_batch_size * global_batch_size
        self.consumed_samples = 0
        self._set_consumed(consumed_samples)

    @property
    def micro_step_size(self) -> int:
        """Samples consumed by all DP ranks together in one micro-step."""
        return self.micro_batch_size * self.dp_size

    @property
    def epoch(self) -> int:
        """The epoch the next micro-batch belongs to."""
        return self.consumed_samples // self.samples_per_epoch

    @property
    def consumed_in_epoch(self) -> int:
        """Samples of the current epoch already handed out to all DP ranks together."""
        return self.consumed_samples % self.samples_per_epoch

    def __len__(self) -> int:
        """Micro-batches the next iteration yields for this rank: the rest of the current epoch,
        a whole epoch unless the sampler was resumed in the middle of one. Lightning reads it at
        every epoch start to know when the epoch ends, as a training step that pulls several
        micro-batches must never reach past it."""
        return (self.samples_per_epoch - self.consumed_in_epoch) // self.micro_step_size

    def epoch_permutation(self, epoch: int) -> np.ndarray:
        """The dataset order of `epoch`."""
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)

    def __iter__(self) -> Iterator[list[int]]:
        order = self.epoch_permutation(self.epoch)
        for offset in range(self.consumed_in_epoch, self.samples_per_epoch, self.micro_step_size):
            first = offset + self.dp_rank * self.micro_batch_size
            batch = order[first : first + self.micro_batch_size].tolist()
            self.consumed_samples += self.micro_step_size
            yield batch

    def _set_consumed(self, consumed_samples: int) -> None:
        if consumed_samples < 0 or consumed_samples % self.micro_step_size:
            raise DataError(
                f"consumed_samples {consumed_samples} must be a non-negative multiple of "
                f"micro_batch_size * dp_size = {self.micro_step_size}"
            )
        self.consumed_samples = consumed_samples

    def state_dict(self) -> dict[str, Any]:
        """The resume state; identical on every DP rank."""
        return {
            "consumed_samples": self.consumed_samples,
            "seed": self.seed,
            "num_samples": self.num_samples,
            "global_batch_size": self.global_batch_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a `state_dict()` saved with the same dataset size, seed and global batch.

        `micro_batch_size` and `dp_size` may differ from the saved run, as long as
        `consumed_samples` is a multiple of the new `micro_batch_size * dp_size`.
        """
        for key in ("seed", "num_samples", "global_batch_size"):
            if state[key] != getattr(self, key):
                raise DataError(
                    f"cannot resume the data order: the checkpoint has {key}={state[key]}, "
                    f"this run has {key}={getattr(self, key)}"
                )
        self._set_consumed(int(state["consumed_samples"]))


def eval_batches(
    num_samples: int, micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1
) -> list[list[int]]:
    """This rank's micro-batches over `range(num_samples)`, in order, no shuffling.

    Micro-step `k` covers indices ``[k * mbs * dp_size, (k + 1) * mbs * dp_size)`` and rank `r`
    takes its `r`-th slice; a last incomplete micro-step is dropped so every rank runs the same
    number of micro-batches.
    """
    step = micro_batch_size * dp_size
    _check_sizes(num_samples, micro_batch_size, step, dp_rank, dp_size)
    return [
        list(range(offset + dp_rank * micro_batch_size, offset + (dp_rank + 1) * micro_batch_size))
        for offset in range(0, num_samples - step + 1, step)
    ]
