"""The merged HF checkpoint: the base checkpoint with every LoRA delta `scale * B @ A` folded in.

The output keeps the base's own layout: every shard file gets the base shard's header bytes
unchanged (names, dtypes, shapes, offsets, metadata), so the index is the base index and a
per-expert base stays per-expert. A shard is written front to back in one pass:

- every byte range the adapter does not touch (header, vision tower, MTP, norms, embeddings,
  router, ...) is copied from the base file as is (`os.sendfile`, no tensor is built), so those
  tensors are bit-identical;
- an adapted tensor is read at its offset in the shard (from the shard's header) in blocks of
  rows into one reused buffer; each block gets the delta added tile by tile (a few rows at a
  time, small enough to stay in cache: converted to fp32, `scale * b @ a` added with `addmm`,
  rounded once back to the stored dtype) and is written in place.

Memory is bounded by one block buffer (`BLOCK_BYTES`) and one tile per shard worker, whatever the shard or model
size. Shard files are divided among ranks (rank r writes files r, r + world_size, ...); rank 0
also writes the index and copies the non-weight files. Writing into a temporary directory and
renaming it is the caller's job (`hf_export`).

The tile loop runs on one torch intra-op thread (`MERGE_THREADS`): its many small ops lose far
more to thread-pool synchronisation than they gain once the cores are shared (by the other ranks
on the node, or anything else): measured 10-20x slower with 2 threads on 2 busy cores.
Parallelism comes from spreading the shards over the ranks, and within a rank from merging
`SHARD_WORKERS` shards at once, so that one shard's file I/O overlaps another's arithmetic.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import struct
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from lora_trainer.bridge.safetensors_io import INDEX_FILE, SINGLE_FILE, CheckpointReader
from lora_trainer.errors import CheckpointError, ExportError
from lora_trainer.export.atomic import export_error
from lora_trainer.export.hf_adapter_weights import HFAdapter
from lora_trainer.export.peft_adapter import PER_EXPERT_MODULES

# Bytes of one block of rows of an adapted tensor read, merged and written at a time (at least one
# row), and fp32 bytes of one tile of delta rows (kept in cache between matmul and add).
BLOCK_BYTES = 32 * 2**20
TILE_BYTES = 2 * 2**20
MERGE_THREADS = 1
# Shards merged at once, each by its own thread with its own buffers (one block and one tile,
# so memory stays bounded): one thread's file I/O overlaps another's arithmetic (torch and os
# calls release the GIL). On a 1 GiB bf16 checkpoint, 4 gave 2.6-3.0x a plain copy, 2 gave 3.0-3.3x.
SHARD_WORKERS = 4
# Largest single transfer handed to sendfile / write.
_COPY_CHUNK = 2**30
# safetensors dtype names a delta can be added to (quantized weights would need their scales).
MERGEABLE_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
}
# Other weight formats are not copied: an unmerged copy of the weights would contradict the merge.
_OTHER_WEIGHT_SUFFIXES = (
    ".bin",
    ".pt",
    ".pth",
    ".ckpt",
    ".gguf",
    ".h5",
    ".msgpack",
    ".onnx",
    ".index.json",
)
_SENDFILE_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP}


@dataclass(frozen=True)
class LowRankDelta:
    """`scale * b @ a` for one base tensor.

    2D: a [r, in], b [out, r], delta [out, in]. 3D (packed experts): a [E, r, in], b [E, out, r],
    delta[e] = scale * b[e] @ a[e]. `source` names the adapter entry, for messages.
    """

    a: Tensor
    b: Tensor
    scale: float
    source: str

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of the delta, which must equal the base tensor's."""
        return (*self.b.shape[:-1], self.a.shape[-1])

    def stacked_factors(self) -> tuple[Tensor, Tensor]:
        """fp32 a [M, r, in] and scale * b [M, out, r], M = 1 for a 2D delta: the base tensor seen
        as [M * out, in] has rows m * out + i = delta[m][i]."""
        a, b = self.a.float(), self.b.float() * self.scale
        return (a, b) if a.ndim == 3 else (a.unsqueeze(0), b.unsqueeze(0))


@dataclass(frozen=True)
class _Entry:
    """One tensor in a safetensors file: its stored dtype name, shape and absolute byte range."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    stop: int


def write_merged_checkpoint(
    adapter: HFAdapter,
    base_dir: Path,
    out_dir: Path,
    *,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
) -> list[Path]:
    """Write this rank's part of the merged checkpoint of `adapter` on `base_dir` into `out_dir`.

    `out_dir` must exist. Returns the files this rank wrote: its shard files and, on rank 0, the
    index (a copy of the base index) and the non-weight files (top-level files of `base_dir`
    except safetensors, indexes, other weight formats and hidden files). Raises ExportError when
    an adapter module has no base tensor, shapes or dtypes do not fit, or a write fails; every
    rank checks the whole adapter against the whole base before writing anything.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    _check_out_dir(base_dir, out_dir)
    with CheckpointReader(base_dir) as reader:
        shard_paths = sorted({reader.file_of(name) for name in reader.names()})
        names = reader.names()
    layouts = {path: _read_entries(path) for path in shard_paths}
    deltas = plan_deltas(adapter, names)
    _check_deltas(deltas, {entry.name: entry for entries in layouts.values() for entry in entries})
    mine = shard_paths[rank::world_size]
    written: list[Path] = []
    total = sum(path.stat().st_size for path in mine)
    with (
        _intra_op_threads(MERGE_THREADS),
        tqdm(
            total=total,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc="merged export",
            disable=not (progress and rank == 0),
        ) as bar,
        ThreadPoolExecutor(SHARD_WORKERS) as pool,
    ):
        jobs = [
            pool.submit(
                _merge_shard, path, layouts[path], out_dir / path.name, deltas, _Buffers(), bar
            )
            for path in mine
        ]
        written.extend(job.result() for job in jobs)
    if rank == 0:
        written.extend(
            _copy_non_weight_files(base_dir, out_dir, sharded=shard_paths[0].name != SINGLE_FILE)
        )
    return written


def shard_modules(
    layout: HFAdapter, base_dir: Path, *, rank: int = 0, world_size: int = 1
) -> set[str]:
    """The adapter modules (keys of `layout.linears` / `layout.experts`) whose deltas go into the
    shard files `rank` writes; checks the whole `layout` (factors may be on the meta device)
    against the whole base first, as `write_merged_checkpoint` does."""
    base_dir = Path(base_dir)
    with CheckpointReader(base_dir) as reader:
        files = {name: reader.file_of(name) for name in reader.names()}
    shard_paths = sorted(set(files.values()))
    deltas = plan_deltas(layout, files)
    _check_deltas(
        deltas, {entry.name: entry for path in shard_paths for entry in _read_entries(path)}
    )
    mine = set(shard_paths[rank::world_size])
    return {delta.source for name, delta in deltas.items() if files[name] in mine}


def plan_deltas(adapter: HFAdapter, names: Iterable[str]) -> dict[str, LowRankDelta]:
    """Base tensor name -> its delta, for every adapter module, in the base's own expert layout.

    A linear module `m` targets `<prefix>m.weight`; a packed expert entry targets the packed
    parameter `<prefix>layers.N.mlp.experts.<proj>` when the base has it, else the per-expert
    weights `...experts.{e}.{gate,up,down}_proj.weight` (gate_up rows per expert are [gate; up]).
    Raises ExportError naming every adapter module whose base tensors are missing.
    """
    available = set(names)
    scale = adapter.scale
    plan: dict[str, LowRankDelta] = {}
    missing: list[str] = []

    def add(name: str, delta: LowRankDelta) -> None:
        if name in plan:
            raise ExportError(
                f"adapter modules {plan[name].source!r} and {delta.source!r} both target base tensor "
                f"{name!r}: the adapter has the same module twice"
            )
        plan[name] = delta

    for module, weights in adapter.linears.items():
        name = f"{adapter.text_prefix}{module}.weight"
        if name in available:
            add(name, LowRankDelta(weights.a, weights.b, scale, module))
        else:
            missing.append(f"{module} (no {name})")
    for key, expert_weights in adapter.experts.items():
        packed = adapter.text_prefix + key
        if packed in available:
            add(packed, LowRankDelta(expert_weights.a, expert_weights.b, scale, key))
            continue
        module, _, proj = packed.rpartition(".")
        parts = PER_EXPERT_MODULES.get(proj, ())
        targets = [
            (f"{module}.{expert}.{part}.weight", expert, index)
            for expert in range(expert_weights.a.shape[0])
            for index, part in enumerate(parts)
        ]
        absent = [name for name, _, _ in targets if name not in available]
        if not targets or absent:
            example = absent[0] if absent else f"{module}.0.<proj>.weight"
            missing.append(f"{key} (no {packed}, nor per-expert {example})")
            continue
        for name, expert, index in targets:
            rows = expert_weights.b[expert].chunk(len(parts), dim=0)[index]
            add(name, LowRankDelta(expert_weights.a[expert], rows, scale, key))
    if missing:
        shown = "; ".join(missing[:5]) + (
            f"; ... ({len(missing)} in all)" if len(missing) > 5 else ""
        )
        raise ExportError(
            f"adapter modules without a base tensor: {shown}: the adapter does not belong to this base "
            f"checkpoint (text prefix {adapter.text_prefix!r})"
        )
    return plan


def _check_out_dir(base_dir: Path, out_dir: Path) -> None:
    if not out_dir.is_dir():
        raise ExportError(f"merged export directory {out_dir} does not exist or is not a directory")
    if out_dir.resolve() == base_dir.resolve():
        raise ExportError(
            f"merged export directory {out_dir} is the base checkpoint itself: choose another"
        )


def _check_deltas(deltas: dict[str, LowRankDelta], entries: dict[str, _Entry]) -> None:
    """Every delta fits its base tensor's shape, and the base tensor is a float dtype."""
    for name, delta in deltas.items():
        entry = entries.get(name)
        if entry is None:
            raise ExportError(
                f"base tensor {name!r} is in the checkpoint index but in no shard file's header: the "
                "index and the shards do not belong together; download the checkpoint again"
            )
        if entry.shape != delta.shape:
            raise ExportError(
                f"LoRA delta of {delta.source!r} has shape {delta.shape} but base tensor {name!r} is "
                f"{entry.shape}: the adapter does not belong to this base checkpoint"
            )
        if entry.dtype not in MERGEABLE_DTYPES:
            raise ExportError(
                f"base tensor {name!r} is stored as {entry.dtype}: a LoRA delta can only be merged into "
                f"{sorted(MERGEABLE_DTYPES)} weights; merge onto an unquantized base checkpoint"
            )


def _read_entries(path: Path) -> list[_Entry]:
    """The tensors of a safetensors file from its header, in file order (absolute byte ranges)."""
    try:
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > path.stat().st_size:
                raise ValueError(f"header length {length} exceeds the file size")
            header = json.loads(handle.read(length))
    except (OSError, ValueError, struct.error) as error:
        raise CheckpointError(f"cannot read the safetensors header of {path}: {error}") from error
    data_start = 8 + length
    entries = [
        _Entry(
            name,
            info["dtype"],
            tuple(info["shape"]),
            data_start + info["data_offsets"][0],
            data_start + info["data_offsets"][1],
        )
        for name, info in header.items()
        if name != "__metadata__"
    ]
    return sorted(entries, key=lambda entry: entry.start)


@contextmanager
def _intra_op_threads(count: int) -> Iterator[None]:
    """Run the body with `count` torch intra-op threads, then restore the previous number (the
    setting is process-wide; nothing is changed when it already is `count`)."""
    previous = torch.get_num_threads()
    if previous == count:
        yield
        return
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class _Buffers:
    """Reused scratch memory: the block buffer (stored bytes) and the fp32 tile buffer."""

    def __init__(self) -> None:
        self._block = torch.empty(0, dtype=torch.uint8)
        self._tile = torch.empty(0, dtype=torch.float32)

    def block(self, nbytes: int) -> Tensor:
        if self._block.numel() < nbytes:
            self._block = torch.empty(nbytes, dtype=torch.uint8)
        return self._block[:nbytes]

    def tile(self, numel: int) -> Tensor:
        if self._tile.numel() < numel:
            self._tile = torch.empty(numel, dtype=torch.float32)
        return self._tile[:numel]


def _merge_shard(
    source: Path,
    entries: list[_Entry],
    target: Path,
    deltas: dict[str, LowRankDelta],
    buffers: _Buffers,
    bar: tqdm,
) -> Path:
    """Write `target` as `source` with the delta of every adapted tensor added; returns `target`."""
    size = source.stat().st_size
    try:
        with open(source, "rb") as src, open(target, "wb") as dst:
            cursor = 0
            for entry in entries:
                delta = deltas.get(entry.name)
                if delta is None:
                    continue
                _copy_range(src.fileno(), dst.fileno(), cursor, entry.start - cursor, bar)
                _write_merged_tensor(src.fileno(), entry, delta, dst.fileno(), buffers, bar)
                cursor = entry.stop
            _copy_range(src.fileno(), dst.fileno(), cursor, size - cursor, bar)
    except OSError as error:
        target.unlink(missing_ok=True)
        raise export_error(target, error) from error
    except BaseException:
        target.unlink(missing_ok=True)
        raise
    return target


def _write_merged_tensor(
    src: int, entry: _Entry, delta: LowRankDelta, dst: int, buffers: _Buffers, bar: tqdm
) -> None:
    """Read `entry` block by block, add the delta (fp32, rounded once), write it in its stored dtype."""
    dtype = MERGEABLE_DTYPES[entry.dtype]
    fan_in = entry.shape[-1]
    rows = math.prod(entry.shape[:-1])
    row_bytes = fan_in * dtype.itemsize
    if rows * row_bytes != entry.stop - entry.start:
        raise ExportError(
            f"tensor {entry.name!r} of shape {entry.shape} {entry.dtype} has {entry.stop - entry.start} bytes "
            "in the base file: the base file's header is inconsistent"
        )
    a, b = delta.stacked_factors()
    block_rows = max(1, BLOCK_BYTES // row_bytes)
    tile_rows = max(1, TILE_BYTES // (4 * fan_in))
    for first in range(0, rows, block_rows):
        count = min(block_rows, rows - first)
        raw = buffers.block(count * row_bytes)
        _read_exactly(src, raw, entry.start + first * row_bytes)
        block = raw.view(dtype).view(count, fan_in)
        _add_delta_rows_(
            block, first, a, b, buffers.tile(tile_rows * fan_in).view(tile_rows, fan_in)
        )
        _write_tensor(dst, block)
        bar.update(count * row_bytes)


def _add_delta_rows_(block: Tensor, first: int, a: Tensor, b: Tensor, tile: Tensor) -> None:
    """Add rows `first : first + len(block)` of the stacked delta (`stacked_factors`) to `block`
    in place, a tile of rows of one matrix at a time: the rows go to the fp32 `tile`, get
    `b @ a` added there (`addmm`), and are rounded once back into `block`."""
    per_matrix = b.shape[1]
    row, end = first, first + block.shape[0]
    while row < end:
        matrix, start = divmod(row, per_matrix)
        count = min(per_matrix - start, tile.shape[0], end - row)
        rows = block[row - first : row - first + count]
        work = tile[:count]
        work.copy_(rows)
        torch.addmm(work, b[matrix, start : start + count], a[matrix], out=work)
        rows.copy_(work)
        row += count


def _read_exactly(fd: int, buffer: Tensor, offset: int) -> None:
    """Fill the uint8 tensor `buffer` from `fd` at `offset`."""
    view = memoryview(buffer.numpy())
    done = 0
    while done < len(view):
        count = os.preadv(fd, [view[done:]], offset + done)
        if count == 0:
            raise ExportError(
                f"the base file ended {len(view) - done} bytes early while reading: it is truncated"
            )
        done += count


def _write_tensor(fd: int, tensor: Tensor) -> None:
    """Write the raw little-endian bytes of `tensor` at the file position."""
    view = memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())
    done = 0
    while done < len(view):
        done += os.write(fd, view[done : done + _COPY_CHUNK])


def _copy_range(src: int, dst: int, offset: int, count: int, bar: tqdm) -> None:
    """Copy `count` bytes at `offset` of `src` to the file position of `dst`."""
    while count > 0:
        sent = _send(src, dst, offset, min(count, _COPY_CHUNK))
        if sent == 0:
            raise ExportError(
                f"the base file ended {count} bytes early while copying: it is truncated"
            )
        offset += sent
        count -= sent
        bar.update(sent)


def _send(src: int, dst: int, offset: int, count: int) -> int:
    """One `os.sendfile`, or a read and a write where the platform or filesystem lacks it."""
    if hasattr(os, "sendfile"):
        try:
            return os.sendfile(dst, src, offset, count)
        except OSError as error:
            if error.errno not in _SENDFILE_UNSUPPORTED:
                raise
    data = os.pread(src, min(count, 64 * 2**20), offset)
    view = memoryview(data)
    done = 0
    while done < len(view):
        done += os.write(dst, view[done:])
    return done


def _copy_non_weight_files(base_dir: Path, out_dir: Path, *, sharded: bool) -> list[Path]:
    """Copy the index (when sharded) and every non-weight top-level file of `base_dir`."""
    names = [INDEX_FILE] if sharded else []
    names += sorted(
        entry.name
        for entry in base_dir.iterdir()
        if entry.is_file()
        and not entry.name.startswith(".")
        and not entry.name.endswith((".safetensors", *_OTHER_WEIGHT_SUFFIXES))
    )
    copied = []
    for name in names:
        target = out_dir / name
        try:
            shutil.copyfile(base_dir / name, target)
        except OSError as error:
            target.unlink(missing_ok=True)
            raise export_error(target, error) from error
        copied.append(target)
    return copied
