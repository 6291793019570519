"""The HF export at a checkpoint save: `hf_adapter/`, `hf_merged/` and `export_manifest.json`.

Each directory appears under its final name only when complete (`atomic_directory`: written into
a temporary sibling, fsynced, renamed), and a previous export of the same name stays untouched
until the new one replaces it. A failure (full disk, unwritable directory, killed process) leaves
no half export under the final names.

On several ranks all of them call `export_hf` with the same arguments, their own `rank` and a
`barrier` over all ranks, each with its own part of the adapter (`DistributedAdapter`: every rank
holds only the factors it writes; the save directory must be on a filesystem every rank sees):

1. rank 0 creates the staging directory `save_dir/.hf_export.staging` (removing one a killed
   export left there) and in it the adapter file with its header, at its full size; barrier;
2. every rank writes its factors at their byte ranges of the adapter file; barrier;
3. every rank writes its share of the merged shard files (rank r: files r, r + world_size, ...),
   reading back from the adapter file only the factors of the tensors in its shards, and fsyncs
   them; barrier;
4. rank 0 checks that every shard is there with its full size and removes what killed exports
   left (`cleanup_stale_temporaries`); it moves the adapter and the merged files into the
   temporary directories of `atomic_directory("hf_adapter")` and `atomic_directory("hf_merged")`;
   once both are complete they are renamed into place (hf_merged first). Then it runs the optional
   check and writes the manifest. Other ranks return `{}` after the last barrier.

Every rank reaches every barrier even when a step failed: a rank whose step fails leaves a marker
in the staging directory, so no rank runs a later step on the failed one's output, and then
raises; the other ranks raise a `PeerExportError`. Rank 0 renames nothing after any failure.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import Tensor

from lora_trainer.bridge.safetensors_io import CheckpointReader
from lora_trainer.errors import ExportError, PeerExportError
from lora_trainer.export.check import CHECK_MEMORY_GB, ExportCheckResult, check_export
from lora_trainer.export.hf_adapter_weights import DistributedAdapter, HFAdapter
from lora_trainer.export.manifest import build_manifest, write_manifest
from lora_trainer.export.merge_plan import shard_modules
from lora_trainer.export.merged import write_merged_checkpoint
from lora_trainer.export.peft_adapter import (
    WEIGHTS_FILE,
    Profile,
    create_adapter_file,
    read_adapter_modules,
    write_local_factors,
)
from lora_trainer.files.atomic import (
    atomic_directory,
    cleanup_stale_temporaries,
    export_error,
    fsync_file,
)

logger = logging.getLogger(__name__)

ADAPTER_DIR = "hf_adapter"
MERGED_DIR = "hf_merged"
STAGING_DIR = ".hf_export.staging"
FAILED_DIR = ".failed"

Barrier = Callable[[], None]


def export_hf(
    adapter: HFAdapter | DistributedAdapter,
    base_dir: Path,
    save_dir: Path,
    *,
    step: int,
    write_adapter: bool = True,
    write_merged: bool = True,
    profile: Profile = "peft",
    check_input_ids: Tensor | None = None,
    check_dtype: torch.dtype | None = None,
    check_memory_gb: float = CHECK_MEMORY_GB,
    check_trained_layers: Path | None = None,
    rank: int = 0,
    world_size: int = 1,
    barrier: Barrier | None = None,
    progress: bool = True,
    started_at: float | None = None,
) -> dict[str, Any]:
    """Export `adapter` on the base checkpoint `base_dir` into `save_dir`: a whole `HFAdapter`
    (every rank may pass the same one) or this rank's part of a `DistributedAdapter`.

    Returns the manifest on rank 0 and `{}` on the other ranks. With `check_input_ids` ([batch,
    seq] token ids) rank 0 runs `check_export` (in `check_dtype`, layer by layer when the model
    exceeds `check_memory_gb`) on the written adapter and merged checkpoint (peft profile only),
    also against our trained model's layers when `check_trained_layers` (a directory of
    `trained_layers` records, complete once every rank reached the first barrier) is given, and
    records the result in the manifest; a failed check is logged as an error, not raised (the
    caller decides). `barrier` (needed when `world_size > 1`) must block until every rank has
    called it. Raises ExportError when anything cannot be written (PeerExportError on a rank whose
    own steps succeeded but another rank's failed). The manifest records `status`
    (`complete`, or `check_failed`), `export_started_at` (`started_at`, by default when this call
    began) and `export_finished_at` (unix seconds).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    if world_size > 1 and barrier is None:
        raise ValueError("an export on several ranks needs a barrier over all ranks")
    parts = adapter if isinstance(adapter, DistributedAdapter) else _whole_on_rank_0(adapter, rank)
    started = time.monotonic()
    started_at = time.time() if started_at is None else started_at
    base_dir, save_dir = Path(base_dir), Path(save_dir)
    staging = save_dir / STAGING_DIR
    written: dict[str, Path] = {}
    if not (write_adapter or write_merged):
        return (
            _finish(parts, base_dir, save_dir, step, profile, written, None, started, started_at)
            if rank == 0
            else {}
        )
    try:
        _stage(
            parts,
            base_dir,
            staging,
            profile,
            write_merged,
            rank,
            world_size,
            barrier or _no_barrier,
            progress,
        )
        if rank != 0:
            return {}
        for name in (ADAPTER_DIR, MERGED_DIR):
            cleanup_stale_temporaries(save_dir, name)
        with ExitStack() as stack:
            if write_adapter:
                adapter_tmp = stack.enter_context(atomic_directory(save_dir / ADAPTER_DIR))
                _move_contents(staging / ADAPTER_DIR, adapter_tmp)
                written[ADAPTER_DIR] = save_dir / ADAPTER_DIR
            if write_merged:
                merged_tmp = stack.enter_context(atomic_directory(save_dir / MERGED_DIR))
                _move_contents(staging / MERGED_DIR, merged_tmp)
                written[MERGED_DIR] = save_dir / MERGED_DIR
    finally:
        if rank == 0:
            shutil.rmtree(staging, ignore_errors=True)
    check = _run_check(
        base_dir,
        save_dir,
        profile,
        check_input_ids,
        check_dtype,
        check_memory_gb,
        check_trained_layers,
        written,
    )
    return _finish(parts, base_dir, save_dir, step, profile, written, check, started, started_at)


def _finish(
    parts: DistributedAdapter,
    base_dir: Path,
    save_dir: Path,
    step: int,
    profile: Profile,
    written: dict[str, Path],
    check: ExportCheckResult | None,
    started: float,
    started_at: float,
) -> dict[str, Any]:
    """Rank 0: write and log the manifest."""
    export_seconds = time.monotonic() - started
    manifest = build_manifest(
        adapter=parts,
        base_dir=base_dir,
        step=step,
        profile=profile,
        exported_dirs=written,
        check=check,
        export_seconds=export_seconds,
    )
    manifest.update(
        status="check_failed" if check is not None and not check.passed else "complete",
        export_started_at=started_at,
        export_finished_at=time.time(),
    )
    write_manifest(manifest, save_dir)
    sizes = ", ".join(
        f"{name} {size / 2**20:.1f} MiB" for name, size in manifest["sizes_bytes"].items()
    )
    logger.info(
        "HF export of step %d to %s in %.1f s: %s",
        step,
        save_dir,
        export_seconds,
        sizes or "nothing",
    )
    return manifest


def _whole_on_rank_0(adapter: HFAdapter, rank: int) -> DistributedAdapter:
    """A whole `HFAdapter`: rank 0 writes all its factors into the adapter file; another rank's
    `adapter` (the same, or only the modules its merged shards need) only names the modules."""
    whole = DistributedAdapter.of(adapter)
    return whole if rank == 0 else DistributedAdapter(whole.layout, {}, whole.nonzero_lora_b)


def _no_barrier() -> None:
    """The barrier of a single rank."""


def _stage(
    parts: DistributedAdapter,
    base_dir: Path,
    staging: Path,
    profile: Profile,
    write_merged: bool,
    rank: int,
    world_size: int,
    barrier: Barrier,
    progress: bool,
) -> None:
    """Steps 1 to 3 of the module docstring, then rank 0 checks that the merged shards are
    complete. Raises on every rank whose own step failed, a PeerExportError on the others; rank
    0's caller removes the staging directory."""
    adapter_file = staging / ADAPTER_DIR / WEIGHTS_FILE

    def create() -> None:
        if rank == 0:
            _fresh_directory(staging)
            (staging / ADAPTER_DIR).mkdir()
            (staging / MERGED_DIR).mkdir()
            _write_adapter(
                lambda: create_adapter_file(staging / ADAPTER_DIR, parts.layout, profile), staging
            )

    def write_factors() -> None:
        _write_adapter(
            lambda: write_local_factors(adapter_file, parts.layout, parts.local, profile),
            adapter_file,
        )
        fsync_file(adapter_file)

    def merge() -> None:
        modules = shard_modules(parts.layout, base_dir, rank=rank, world_size=world_size)
        adapter = read_adapter_modules(adapter_file, parts.layout, profile, modules)
        for path in write_merged_checkpoint(
            adapter,
            base_dir,
            staging / MERGED_DIR,
            rank=rank,
            world_size=world_size,
            progress=progress,
        ):
            fsync_file(path)

    failure: Exception | None = None
    for index, step in enumerate((create, write_factors, *((merge,) if write_merged else ()))):
        if failure is None and index > 0 and not staging.is_dir():
            failure = PeerExportError(
                f"rank 0 did not create the export staging directory {staging}: see its error"
            )
        elif failure is None and index > 0 and _peer_failed(staging):
            failure = PeerExportError("another rank's export step failed: see its error")
        elif failure is None:
            try:
                step()
            except Exception as error:
                failure = error
                _mark_failed(staging, rank)
        try:
            barrier()
        except ExportError:
            # A barrier that stops because a peer gave up after this rank's own failure must not
            # hide that failure: it is the root cause the peers point to.
            if failure is None:
                raise
            break
    if failure is None and _peer_failed(staging):
        failure = PeerExportError("another rank's export step failed: see its error")
    if failure is None and rank == 0 and write_merged:
        try:
            _check_staging_complete(base_dir, staging / MERGED_DIR)
        except Exception as error:
            failure = error
    if failure is not None:
        raise failure


def _mark_failed(staging: Path, rank: int) -> None:
    """Leave a marker that this rank's step failed (nothing when the staging directory is
    unusable)."""
    try:
        (staging / FAILED_DIR).mkdir(exist_ok=True)
        (staging / FAILED_DIR / str(rank)).touch()
    except OSError:
        pass


def _peer_failed(staging: Path) -> bool:
    return (staging / FAILED_DIR).is_dir()


def _fresh_directory(path: Path) -> None:
    """Create `path` empty (removing what is there), with a clear error when its parents are
    unusable."""
    for ancestor in path.parents:
        if ancestor.exists():
            if not ancestor.is_dir():
                raise ExportError(
                    f"{ancestor} is not a directory: choose an output_dir whose parent is a "
                    "directory"
                )
            break
    try:
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)
    except OSError as error:
        raise export_error(path, error, "creating") from error


def _check_staging_complete(base_dir: Path, staging: Path) -> None:
    """Every shard file of the base is in `staging` with the base file's size (the merged shard
    has the same header and tensor sizes), so no rank's share is missing or cut short."""
    with CheckpointReader(base_dir) as reader:
        shards = sorted({reader.file_of(name) for name in reader.names()})
    bad = [
        path.name
        for path in shards
        if not (staging / path.name).is_file()
        or (staging / path.name).stat().st_size != path.stat().st_size
    ]
    if bad:
        raise PeerExportError(
            f"merged shard files missing or incomplete in {staging}: {', '.join(bad[:5])}"
            f"{' ...' if len(bad) > 5 else ''}: another rank's export failed; see its error"
        )


def _move_contents(source: Path, target: Path) -> None:
    """Rename every entry of `source` into `target` (same filesystem)."""
    for entry in sorted(source.iterdir()):
        try:
            os.replace(entry, target / entry.name)
        except OSError as error:
            raise export_error(target / entry.name, error, "moving into place") from error


def _write_adapter(write: Callable[[], object], path: Path) -> None:
    """Run one adapter-file write, with a clear error when the disk refuses."""
    try:
        write()
    except (OSError, SafetensorError) as error:
        raise export_error(path, error) from error


def _run_check(
    base_dir: Path,
    save_dir: Path,
    profile: Profile,
    input_ids: Tensor | None,
    dtype: torch.dtype | None,
    memory_gb: float,
    trained: Path | None,
    written: dict[str, Path],
) -> ExportCheckResult | None:
    """The export check when asked for and possible; logs its outcome."""
    if input_ids is None:
        return None
    if set(written) != {ADAPTER_DIR, MERGED_DIR} or profile != "peft":
        logger.warning(
            "export check skipped: it needs both hf_adapter and hf_merged in the 'peft' profile"
        )
        return None
    started = time.monotonic()
    result = check_export(
        base_dir,
        save_dir / ADAPTER_DIR,
        save_dir / MERGED_DIR,
        input_ids,
        dtype=dtype,
        memory_gb=memory_gb,
        trained=trained,
    )
    log = logger.info if result.passed else logger.error
    log("%s (%.1f s)", result.message, time.monotonic() - started)
    return result
