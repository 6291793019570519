"""The merge of one adapted tensor, tile by tile: base rows + `scale * b @ a`, rounded once.

The base tensor is seen as [matrices * out, in] (a packed expert tensor holds one [out, in]
matrix per expert). `tiles` cuts each matrix into tiles of a few MiB of rows; `pieces` groups
consecutive tiles into pieces, the unit of work one thread takes. `merge_piece`, for each tile
of a piece, reads its rows of the base file into a reused buffer, converts them to fp32 into a
second one, adds `scale * (b @ a)` there with one `addmm`, rounds the sum once back to the stored
dtype into the first buffer and writes it at the same offset of the output.

The result of a tile does not depend on how the rows are tiled: `addmm` gives every element the
same sum for any tile of two rows or more (the matrix product of one row takes another path, so
no tile has one row unless its matrix has one), which the tests check bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from lora_trainer.export.merge_plan import MERGEABLE_DTYPES, LowRankDelta
from lora_trainer.files.byte_copy import read_at, tensor_bytes, write_at
from lora_trainer.files.safetensors_header import TensorEntry

# fp32 bytes of one tile of rows (the conversion, the matmul and the rounding run on it; large
# enough that the cost of each call is small against its arithmetic, measured fastest on
# 35B-A3B widths), and base bytes of one piece of work.
TILE_BYTES = 4 * 2**20
PIECE_BYTES = 16 * 2**20


@dataclass(frozen=True)
class Tile:
    """Rows `start : start + count` of matrix `matrix` of a tensor."""

    matrix: int
    start: int
    count: int


@dataclass(frozen=True)
class Piece:
    """Consecutive tiles of the adapted tensor `entry`, merged and written by one thread."""

    entry: TensorEntry
    delta: LowRankDelta
    tiles: tuple[Tile, ...]


@dataclass(frozen=True)
class TileBuffers:
    """Views of one thread's buffers for tiles of one shape: the rows in the stored dtype (read
    from the base, then the rounded sum written out), their raw bytes, and the fp32 tile."""

    rows: Tensor
    raw: memoryview
    work: Tensor


class Scratch:
    """One thread's reused buffers, and their views for the shape of the last tile (consecutive
    tiles mostly share a shape, so most tiles make no new view)."""

    def __init__(self) -> None:
        self._work = torch.empty(0, dtype=torch.float32)
        self._rows = torch.empty(0, dtype=torch.uint8)
        self._views: TileBuffers | None = None

    def buffers(self, rows: int, fan_in: int, dtype: torch.dtype) -> TileBuffers:
        views = self._views
        if views is not None and views.rows.shape == (rows, fan_in) and views.rows.dtype == dtype:
            return views
        count, nbytes = rows * fan_in, rows * fan_in * dtype.itemsize
        if self._work.numel() < count:
            self._work = torch.empty(count, dtype=torch.float32)
        if self._rows.numel() < nbytes:
            self._rows = torch.empty(nbytes, dtype=torch.uint8)
        stored = self._rows[:nbytes].view(dtype).view(rows, fan_in)
        self._views = TileBuffers(
            stored, tensor_bytes(stored), self._work[:count].view(rows, fan_in)
        )
        return self._views


def split_rows(rows: int, tile_rows: int) -> Iterator[tuple[int, int]]:
    """(start, count) of consecutive tiles covering `rows` rows, `tile_rows` (at least 3) rows
    at most each; no tile has a single row unless `rows` is 1."""
    start = 0
    while start < rows:
        count = min(tile_rows, rows - start)
        if rows - start - count == 1:
            count -= 1
        yield start, count
        start += count


def tiles(entry: TensorEntry, delta: LowRankDelta) -> list[Tile]:
    """The tiles of every matrix of `entry` (`TILE_BYTES` of fp32, at least 3 rows), in file
    order."""
    fan_in = entry.shape[-1]
    per_matrix = math.prod(entry.shape[:-1]) // delta.matrices
    tile_rows = max(3, TILE_BYTES // (4 * fan_in))
    return [
        Tile(matrix, start, count)
        for matrix in range(delta.matrices)
        for start, count in split_rows(per_matrix, tile_rows)
    ]


def pieces(entry: TensorEntry, delta: LowRankDelta) -> Iterator[Piece]:
    """The tiles of `entry` grouped into pieces of about `PIECE_BYTES` base bytes, in file order."""
    row_bytes = entry.shape[-1] * MERGEABLE_DTYPES[entry.dtype].itemsize
    group: list[Tile] = []
    size = 0
    for tile in tiles(entry, delta):
        group.append(tile)
        size += tile.count * row_bytes
        if size >= PIECE_BYTES:
            yield Piece(entry, delta, tuple(group))
            group, size = [], 0
    if group:
        yield Piece(entry, delta, tuple(group))


def merge_piece(src: int, dst: int, piece: Piece, scratch: Scratch) -> int:
    """Merge the rows of `piece` read from the base file `src` and write them at the same offsets
    of `dst`; returns the number of bytes written."""
    entry = piece.entry
    dtype = MERGEABLE_DTYPES[entry.dtype]
    fan_in = entry.shape[-1]
    per_matrix = math.prod(entry.shape[:-1]) // piece.delta.matrices
    row_bytes = fan_in * dtype.itemsize
    first = piece.tiles[0].matrix
    a, b = piece.delta.factors(first, piece.tiles[-1].matrix + 1)
    written = 0
    for tile in piece.tiles:
        offset = entry.start + (tile.matrix * per_matrix + tile.start) * row_bytes
        buffers = scratch.buffers(tile.count, fan_in, dtype)
        read_at(src, buffers.raw, offset)
        work = buffers.work
        work.copy_(buffers.rows)
        index = tile.matrix - first
        rows_b = b[index, tile.start : tile.start + tile.count]
        torch.addmm(work, rows_b, a[index], alpha=piece.delta.scale, out=work)
        buffers.rows.copy_(work)
        write_at(dst, buffers.raw, offset)
        written += tile.count * row_bytes
    return written
