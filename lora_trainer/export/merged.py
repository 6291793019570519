"""The merged HF checkpoint: the base checkpoint with every LoRA delta `scale * B @ A` folded in.

The output keeps the base's own layout: every shard file gets the base shard's header bytes
unchanged (names, dtypes, shapes, offsets, metadata), so the index is the base index and a
per-expert base stays per-expert. Every output byte sits at the offset it has in the base file:

- every byte range the adapter does not touch (header, vision tower, MTP, norms, embeddings,
  router, ...) is copied from the base file inside the kernel (`os.copy_file_range`, no tensor is
  built), so those tensors are bit-identical;
- an adapted tensor is merged tile by tile (`tiled_merge`): its rows are read from the base
  file, get the delta added in fp32, are rounded once back to the stored dtype and written at
  their offset.

The copies and the pieces of this rank's shard files form one queue that `MERGE_WORKERS` threads
work through (torch and os calls release the GIL), each with its own reused buffers, so a large
shard is shared by all the threads and one thread's file I/O overlaps another's arithmetic.
Memory is bounded by one tile's buffers per thread, whatever the shard or model size. Each
thread runs its arithmetic on one torch intra-op thread: the tiles are small, and the threads
already use the cores. Shard files are divided among ranks (rank r writes files
r, r + world_size, ...); rank 0 also writes the index and copies the non-weight files. Writing
into a temporary directory and renaming it is the caller's job (`hf_export`).
"""

from __future__ import annotations

import gc
import itertools
import os
import shutil
import threading
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from lora_trainer.bridge.safetensors_io import INDEX_FILE, SINGLE_FILE
from lora_trainer.errors import ExportError
from lora_trainer.export.hf_adapter_weights import HFAdapter
from lora_trainer.export.merge_plan import LowRankDelta, checked_plan, shard_layouts
from lora_trainer.export.tiled_merge import Piece, Scratch, merge_piece, pieces
from lora_trainer.files.atomic import export_error
from lora_trainer.files.byte_copy import copy_range
from lora_trainer.files.safetensors_header import TensorEntry

# Threads that merge and copy at once: one per core, at most 4.
MERGE_WORKERS = min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 2)
# Largest byte range of untouched bytes copied as one piece of work.
COPY_PIECE_BYTES = 64 * 2**20
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
    with _imported_objects_frozen():
        return _write_merged(adapter, Path(base_dir), Path(out_dir), rank, world_size, progress)


def _write_merged(
    adapter: HFAdapter, base_dir: Path, out_dir: Path, rank: int, world_size: int, progress: bool
) -> list[Path]:
    _check_out_dir(base_dir, out_dir)
    names, layouts = shard_layouts(base_dir)
    deltas = checked_plan(adapter, names, layouts)
    shard_paths = list(layouts)
    mine = shard_paths[rank::world_size]
    with (
        _intra_op_threads(1),
        tqdm(
            total=sum(path.stat().st_size for path in mine),
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc="merged export",
            disable=not (progress and rank == 0),
        ) as bar,
    ):
        written = _write_shards(
            [_Shard(path, out_dir / path.name, layouts[path]) for path in mine], deltas, bar.update
        )
    if rank == 0:
        written.extend(
            _copy_non_weight_files(base_dir, out_dir, sharded=shard_paths[0].name != SINGLE_FILE)
        )
    return written


@dataclass(frozen=True)
class _Shard:
    """One shard file to write: the base file, its output and the base file's header."""

    source: Path
    target: Path
    entries: list[TensorEntry]


@dataclass(frozen=True)
class _Copy:
    """Untouched bytes `start:stop` of a shard."""

    start: int
    stop: int


@dataclass(frozen=True)
class _Job:
    """One piece of work on one shard: its open files and a copy or a merge."""

    target: Path
    src: int
    dst: int
    work: _Copy | Piece


def _check_out_dir(base_dir: Path, out_dir: Path) -> None:
    if not out_dir.is_dir():
        raise ExportError(f"merged export directory {out_dir} does not exist or is not a directory")
    if out_dir.resolve() == base_dir.resolve():
        raise ExportError(
            f"merged export directory {out_dir} is the base checkpoint itself: choose another"
        )


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


@contextmanager
def _imported_objects_frozen() -> Iterator[None]:
    """Leave the objects that exist now out of the cyclic garbage collector for the body.

    The export makes thousands of small objects (deltas, pieces, tiles, jobs), which sets off full
    collections; each one walks every object the process has imported (torch, transformers,
    megatron: 170k-360k objects), measured at 1-3 s each on a 2-core machine, about half the time
    of a per-expert export. The objects made in the body are still collected."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _write_shards(
    shards: list[_Shard], deltas: Mapping[str, LowRankDelta], progress: Callable[[int], object]
) -> list[Path]:
    """Write every shard of `shards` (all sized like their base file first, then filled by the
    workers at their offsets); on any failure no target is left behind."""
    try:
        with ExitStack() as stack:
            jobs = []
            for shard in shards:
                src = os.open(shard.source, os.O_RDONLY)
                stack.callback(os.close, src)
                size = os.fstat(src).st_size
                try:
                    dst = os.open(shard.target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
                    stack.callback(os.close, dst)
                    os.ftruncate(dst, size)
                except OSError as error:
                    raise export_error(shard.target, error) from error
                jobs.append(_jobs(shard, src, dst, size, deltas))
            _run_jobs(itertools.chain.from_iterable(jobs), progress)
    except BaseException:
        for shard in shards:
            shard.target.unlink(missing_ok=True)
        raise
    return [shard.target for shard in shards]


def _jobs(
    shard: _Shard, src: int, dst: int, size: int, deltas: Mapping[str, LowRankDelta]
) -> Iterator[_Job]:
    """A shard's copies of untouched bytes and pieces of adapted tensors, in file order."""
    cursor = 0
    for entry in shard.entries:
        delta = deltas.get(entry.name)
        if delta is None:
            continue
        yield from _copies(shard.target, src, dst, cursor, entry.start)
        yield from (_Job(shard.target, src, dst, piece) for piece in pieces(entry, delta))
        cursor = entry.stop
    yield from _copies(shard.target, src, dst, cursor, size)


def _copies(target: Path, src: int, dst: int, start: int, stop: int) -> Iterator[_Job]:
    for first in range(start, stop, COPY_PIECE_BYTES):
        yield _Job(target, src, dst, _Copy(first, min(first + COPY_PIECE_BYTES, stop)))


def _run_jobs(jobs: Iterator[_Job], progress: Callable[[int], object]) -> None:
    """Work through `jobs` on `MERGE_WORKERS` threads; the first failure stops every thread and
    is raised (an OSError as the ExportError of its target file)."""
    lock = threading.Lock()
    failed = threading.Event()

    def report(count: int) -> None:
        with lock:
            progress(count)

    def worker() -> None:
        scratch = Scratch()
        while not failed.is_set():
            with lock:
                job = next(jobs, None)
            if job is None:
                return
            try:
                if isinstance(job.work, _Copy):
                    copy_range(
                        job.src, job.dst, job.work.start, job.work.stop - job.work.start, report
                    )
                else:
                    report(merge_piece(job.src, job.dst, job.work, scratch))
            except OSError as error:
                failed.set()
                raise export_error(job.target, error) from error
            except BaseException:
                failed.set()
                raise

    with ThreadPoolExecutor(MERGE_WORKERS) as pool:
        futures = [pool.submit(worker) for _ in range(MERGE_WORKERS)]
    for future in futures:
        future.result()


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
