"""Named transforms between full Hugging Face tensors and one rank's Megatron shard.

A transform reads only the rows its rank owns (`shard`) and rebuilds the HF tensors from the
shards of all ranks of the splitting group (`unshard`). Every split needs the group size the
tensor was packed with: a fused tensor's logical full form is rank-interleaved.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class HFRef:
    """One HF tensor, or (with `expert`) one expert's matrix of a packed 3D expert tensor."""

    name: str
    expert: int | None = None


class SliceSource(Protocol):
    """Where shards read from: the checkpoint on disk, or a dict of tensors in memory."""

    def read_rows(self, ref: HFRef, start: int, stop: int, dim: int) -> torch.Tensor: ...


@dataclass(frozen=True)
class Block:
    """Rows [start, start + length) along the split dim of `ref`, split evenly over the group;
    rank t owns the t-th part. `shape` is the HF tensor's full shape (checked on load)."""

    ref: HFRef
    shape: tuple[int, ...]
    start: int
    length: int


class Transform(Protocol):
    """How one Megatron parameter is made from HF tensors and back."""

    def blocks(self) -> list[Block]: ...

    def shard(self, source: SliceSource, rank: int, size: int) -> torch.Tensor: ...

    def unshard(self, shards: list[torch.Tensor]) -> dict[HFRef, torch.Tensor]: ...


@dataclass(frozen=True)
class Replicated:
    """The same full tensor on every rank (norms, router, gates, GDN output norm)."""

    block: Block

    def blocks(self) -> list[Block]:
        return [self.block]

    def shard(self, source: SliceSource, rank: int, size: int) -> torch.Tensor:
        return source.read_rows(self.block.ref, 0, self.block.shape[0], 0)

    def unshard(self, shards: list[torch.Tensor]) -> dict[HFRef, torch.Tensor]:
        return {self.block.ref: shards[0]}


@dataclass(frozen=True)
class SplitBlocks:
    """The shard is the concatenation along `dim` of every block's part for this rank.

    One block over a whole tensor is the plain column-parallel (dim 0) or row-parallel (dim 1)
    split; several blocks fuse tensors (GDN in_proj = [q|k|v|z|b|a], fc1 = [gate|up])."""

    parts: tuple[Block, ...]
    dim: int = 0

    def blocks(self) -> list[Block]:
        return list(self.parts)

    def shard(self, source: SliceSource, rank: int, size: int) -> torch.Tensor:
        pieces = []
        for block in self.parts:
            step = block.length // size
            start = block.start + rank * step
            pieces.append(source.read_rows(block.ref, start, start + step, self.dim))
        return torch.cat(pieces, dim=self.dim)

    def unshard(self, shards: list[torch.Tensor]) -> dict[HFRef, torch.Tensor]:
        size = len(shards)
        split_sizes = [block.length // size for block in self.parts]
        per_rank = [torch.split(shard, split_sizes, dim=self.dim) for shard in shards]
        pieces: dict[HFRef, list[tuple[int, torch.Tensor]]] = {}
        for index, block in enumerate(self.parts):
            full = torch.cat([parts[index] for parts in per_rank], dim=self.dim)
            pieces.setdefault(block.ref, []).append((block.start, full))
        return {
            ref: torch.cat([t for _, t in sorted(items, key=lambda item: item[0])], dim=self.dim)
            for ref, items in pieces.items()
        }


@dataclass(frozen=True)
class GatedQKV:
    """HF q_proj (per head `[q_h; gate_h]`), k_proj, v_proj <-> Megatron `linear_qkv`, whose rows
    per query group are `[q heads | gate heads | k | v]`. A rank owns whole groups."""

    q: Block
    k: Block
    v: Block
    groups: int
    heads_per_group: int
    head_dim: int

    def blocks(self) -> list[Block]:
        return [self.q, self.k, self.v]

    def shard(self, source: SliceSource, rank: int, size: int) -> torch.Tensor:
        local = self.groups // size
        n, d = self.heads_per_group, self.head_dim
        q_rows = local * n * 2 * d
        q = source.read_rows(self.q.ref, rank * q_rows, (rank + 1) * q_rows, 0)
        k = source.read_rows(self.k.ref, rank * local * d, (rank + 1) * local * d, 0)
        v = source.read_rows(self.v.ref, rank * local * d, (rank + 1) * local * d, 0)
        rest = q.shape[1:]
        q = q.reshape(local, n, 2, d, *rest)
        fused = torch.cat(
            [
                q[:, :, 0].reshape(local, n * d, *rest),
                q[:, :, 1].reshape(local, n * d, *rest),
                k.reshape(local, d, *rest),
                v.reshape(local, d, *rest),
            ],
            dim=1,
        )
        return fused.reshape(local * (2 * n + 2) * d, *rest)

    def unshard(self, shards: list[torch.Tensor]) -> dict[HFRef, torch.Tensor]:
        n, d = self.heads_per_group, self.head_dim
        full = torch.cat(shards, dim=0)
        rest = full.shape[1:]
        grouped = full.reshape(self.groups, (2 * n + 2) * d, *rest)
        q, gate, k, v = torch.split(grouped, [n * d, n * d, d, d], dim=1)
        q = q.reshape(self.groups, n, 1, d, *rest)
        gate = gate.reshape(self.groups, n, 1, d, *rest)
        q_proj = torch.cat([q, gate], dim=2).reshape(self.groups * n * 2 * d, *rest)
        return {
            self.q.ref: q_proj,
            self.k.ref: k.reshape(self.groups * d, *rest),
            self.v.ref: v.reshape(self.groups * d, *rest),
        }
