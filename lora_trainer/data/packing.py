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

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lora_trainer.data.tokenize import TokenizedSample
from lora_trainer.errors import DataError

IGNORE_INDEX = -100


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


def greedy_pack(lengths: Sequence[int], seq_len: int) -> list[list[int]]:
    """Group sample indices into rows of at most `seq_len` tokens, greedily and in order.

    Samples are taken in index order; a sample that does not fit in the current row's remaining
    space starts a new row. Every sample must be at most `seq_len` long (tokenization truncates).
    """
    groups: list[list[int]] = []
    used = seq_len
    for index, length in enumerate(lengths):
        if not 0 < length <= seq_len:
            raise DataError(f"sample {index} has {length} tokens; packing needs 1..{seq_len}")
        if used + length > seq_len:
            groups.append([])
            used = 0
        groups[-1].append(index)
        used += length
    return groups


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


class PackedDataset(torch.utils.data.Dataset[PackedRow]):
    """Rows built on access from tokenized samples and a grouping of their indices.

    `pack=True` groups samples with `greedy_pack`; `pack=False` puts one sample in each row. Rows
    are built when indexed, so memory holds the samples once, not padded copies.
    """

    def __init__(
        self, samples: Sequence[TokenizedSample], seq_len: int, pad_id: int, pack: bool = True
    ) -> None:
        self.samples = list(samples)
        self.seq_len = seq_len
        self.pad_id = pad_id
        lengths = [len(sample) for sample in self.samples]
        if pack:
            self.groups = greedy_pack(lengths, seq_len)
        else:
            self.groups = [[index] for index in range(len(self.samples))]

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, index: int) -> PackedRow:
        members = [self.samples[i] for i in self.groups[index]]
        return build_row(members, self.seq_len, self.pad_id)


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
