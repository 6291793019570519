"""Pack tokenized samples into fixed-length rows and collate rows into model batches.

A row holds one or more whole samples, back to back, then padding up to `seq_len` (every row has
the same length, so pipeline stages exchange tensors of one shape). Per position `t` of a row:

- `input_ids[t]`: the token; the pad id in the padding;
- `labels[t]`: the next-token target `input_ids[t + 1]` when that token belongs to the same sample
  and is trained (`loss_mask[t + 1] == 1`), else -100; so the last position of every sample, and
  the padding, is -100 and no target crosses a sample boundary;
- `position_ids[t]`: the position inside its sample, restarting at 0 for each sample (the padding
  counts as one more segment and also starts at 0).

`cu_seqlens` are the segment boundaries, FLA / flash-attention varlen convention: cumulative
lengths starting at 0 and ending at `seq_len`, one segment per sample plus one for the padding when
there is any. Within a segment the model attends causally and carries GDN recurrent and conv state;
at each boundary it starts afresh.

Batch format (`collate`), for `B` rows of length `T`:

- `input_ids`, `labels`, `position_ids`: int64 `[B, T]`;
- `cu_seqlens`: int32 `[S + 1]`, the boundaries of all `S` segments of the batch viewed as one
  flattened sequence of `B * T` tokens (row `b` occupies `[b * T, (b + 1) * T)`, so every `b * T`
  is a boundary). Varlen kernels run on the `[1, B * T]` view with these boundaries; since rows
  never share a segment, reshaping the output back to `[B, T]` is exact.

Unpacked mode is the same with one sample per row.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, overload

import numpy as np
import torch

from lora_trainer.data.tokenize import TokenizedSample
from lora_trainer.errors import DataError

IGNORE_INDEX = -100
LENGTH_CHUNK = 65_536


@dataclass(frozen=True)
class PackedRow:
    """One fixed-length row of the batch (see the module docstring for each field)."""

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]
    cu_seqlens: list[int]


def sample_labels(sample: TokenizedSample) -> list[int]:
    """Next-token targets of one sample: `input_ids[t + 1]` if trained, else -100; last is -100."""
    ids, mask = sample.input_ids, sample.loss_mask
    labels = [ids[t + 1] if mask[t + 1] else IGNORE_INDEX for t in range(len(ids) - 1)]
    return [*labels, IGNORE_INDEX]


def check_lengths(lengths: Sequence[int] | np.ndarray, seq_len: int, first: int = 0) -> np.ndarray:
    """`lengths` as an int64 array; `DataError` unless every one is in 1..`seq_len`. `first` is
    the index of `lengths[0]` among all samples (for the error)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    bad = np.flatnonzero((lengths < 1) | (lengths > seq_len))
    if len(bad):
        raise DataError(
            f"sample {first + bad[0]} has {lengths[bad[0]]} tokens; a row holds 1..{seq_len}"
        )
    return lengths


def greedy_pack(lengths: Sequence[int] | np.ndarray, seq_len: int) -> np.ndarray:
    """Group samples into rows of at most `seq_len` tokens, greedily and in order.

    Samples are taken in index order; a sample that does not fit in the current row's remaining
    space starts a new row. Returns the row boundaries: row `g` holds samples
    ``starts[g]:starts[g + 1]`` (so ``len(starts) == rows + 1``). Every sample must be
    1..`seq_len` tokens long (tokenization drops or truncates longer ones).
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    chunks = (lengths[i : i + LENGTH_CHUNK] for i in range(0, len(lengths), LENGTH_CHUNK))
    return greedy_pack_chunks(chunks, seq_len)


def greedy_pack_chunks(chunks: Iterable[np.ndarray], seq_len: int) -> np.ndarray:
    """`greedy_pack` of the lengths given chunk by chunk, in order: memory holds one chunk and
    the row boundaries (8 bytes per row), whatever the number of samples."""
    starts = array("q", [0])
    used = index = 0
    for chunk in chunks:
        for length in check_lengths(chunk, seq_len, index).tolist():
            if used + length > seq_len:
                starts.append(index)
                used = 0
            used += length
            index += 1
    if index:
        starts.append(index)
    return np.frombuffer(starts, dtype=np.int64)


def build_row(samples: Sequence[TokenizedSample], seq_len: int, pad_id: int) -> PackedRow:
    """Concatenate `samples` into one row of exactly `seq_len` tokens, padded with `pad_id`."""
    input_ids: list[int] = []
    labels: list[int] = []
    position_ids: list[int] = []
    cu_seqlens = [0]
    for sample in samples:
        input_ids.extend(sample.input_ids)
        labels.extend(sample_labels(sample))
        position_ids.extend(range(len(sample)))
        cu_seqlens.append(len(input_ids))
    pad = seq_len - len(input_ids)
    if pad < 0:
        raise DataError(f"{len(input_ids)} tokens do not fit in a row of {seq_len}")
    if pad:
        input_ids.extend([pad_id] * pad)
        labels.extend([IGNORE_INDEX] * pad)
        position_ids.extend(range(pad))
        cu_seqlens.append(seq_len)
    return PackedRow(input_ids, labels, position_ids, cu_seqlens)


class TokenizedRows(Sequence[TokenizedSample]):
    """A tokenized `datasets.Dataset` (`input_ids`, `loss_mask`, `length`) as `TokenizedSample`s,
    read from its memory-mapped Arrow files on access."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def length_chunks(self) -> Iterator[np.ndarray]:
        """Every sample's token count, in order, `LENGTH_CHUNK` samples at a time."""
        lengths = self.dataset.select_columns(["length"]).with_format("numpy")
        for start in range(0, len(lengths), LENGTH_CHUNK):
            yield lengths[start : start + LENGTH_CHUNK]["length"]

    @overload
    def __getitem__(self, index: int) -> TokenizedSample: ...
    @overload
    def __getitem__(self, index: slice) -> list[TokenizedSample]: ...
    def __getitem__(self, index: int | slice) -> TokenizedSample | list[TokenizedSample]:
        if isinstance(index, slice):
            rows = self.dataset[index]
            return [
                TokenizedSample(list(ids), list(mask))
                for ids, mask in zip(rows["input_ids"], rows["loss_mask"], strict=True)
            ]
        row = self.dataset[int(index)]
        return TokenizedSample(list(row["input_ids"]), list(row["loss_mask"]))


class PackedDataset(torch.utils.data.Dataset[PackedRow]):
    """Rows built on access from tokenized samples and the row boundaries over them.

    `pack=True` groups samples with `greedy_pack` and keeps the row boundaries, `starts` (8 bytes
    per row); `pack=False` puts sample `i` alone in row `i` and keeps none (`starts` is None).
    `samples` is a list of `TokenizedSample`s or `TokenizedRows` over a memory-mapped dataset,
    whose lengths are read `LENGTH_CHUNK` at a time; rows are built when indexed, so memory holds
    no padded copies.
    """

    def __init__(
        self,
        samples: Sequence[TokenizedSample],
        seq_len: int,
        pad_id: int,
        pack: bool = True,
    ) -> None:
        self.samples = samples
        self.seq_len = seq_len
        self.pad_id = pad_id
        if isinstance(samples, TokenizedRows):
            chunks: Iterable[np.ndarray] = samples.length_chunks()
        else:
            chunks = [np.asarray([len(sample) for sample in samples], dtype=np.int64)]
        self.starts: np.ndarray | None = None
        if pack:
            self.starts = greedy_pack_chunks(chunks, seq_len)
        else:
            first = 0
            for chunk in chunks:
                first += len(check_lengths(chunk, seq_len, first))

    def __len__(self) -> int:
        return len(self.samples) if self.starts is None else len(self.starts) - 1

    def __getitem__(self, index: int) -> PackedRow:
        if self.starts is None:
            if not 0 <= index < len(self.samples):
                raise IndexError(f"row {index} of {len(self.samples)}")
            first, end = index, index + 1
        else:
            first, end = int(self.starts[index]), int(self.starts[index + 1])
        return build_row(self.samples[first:end], self.seq_len, self.pad_id)


def collate(rows: Sequence[PackedRow]) -> dict[str, torch.Tensor]:
    """Stack rows into the batch dict described in the module docstring."""
    if not rows:
        raise DataError("cannot collate an empty batch")
    seq_len = len(rows[0].input_ids)
    if any(len(row.input_ids) != seq_len for row in rows):
        raise DataError("rows of one batch must all have the same length")
    cu_seqlens = [0]
    for b, row in enumerate(rows):
        cu_seqlens.extend(b * seq_len + boundary for boundary in row.cu_seqlens[1:])
    return {
        "input_ids": torch.tensor([row.input_ids for row in rows], dtype=torch.long),
        "labels": torch.tensor([row.labels for row in rows], dtype=torch.long),
        "position_ids": torch.tensor([row.position_ids for row in rows], dtype=torch.long),
        "cu_seqlens": torch.tensor(cu_seqlens, dtype=torch.int32),
    }
