"""The HF export at a checkpoint save: `hf_adapter/`, `hf_merged/` and `export_manifest.json`.

Each directory appears under its final name only when complete (`atomic_directory`: written into
a temporary sibling, fsynced, renamed), and a previous export of the same name stays untouched
until the new one replaces it. A failure (full disk, unwritable directory, killed process) leaves
no half export under the final names.

Merged checkpoint on several ranks (all of them call `export_hf` with the same arguments, their
own `rank` and a `barrier` over all ranks; the save directory must be on a filesystem every rank
sees):

1. rank 0 creates the staging directory `save_dir/.hf_merged.staging` (removing one a killed
   export left there); barrier;
2. every rank writes its share of the shard files into it (`write_merged_checkpoint`) and fsyncs
   them; barrier;
3. rank 0 checks that every shard is there with its full size and removes what killed exports
   left (`cleanup_stale_temporaries`); it writes the adapter into the temporary directory of
   `atomic_directory("hf_adapter")` and moves the merged files into that of
   `atomic_directory("hf_merged")`; once both are complete they are renamed into place (hf_merged
   first). Then it runs the optional check and writes the manifest. Other ranks return `{}` after
   the second barrier.

Every rank reaches both barriers even when its own step failed, and then raises, so no rank waits
forever on a rank that failed; rank 0 renames nothing when any rank's files are missing or short.
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
from lora_trainer.export.atomic import atomic_directory, cleanup_stale_temporaries, export_error
from lora_trainer.export.check import CHECK_MEMORY_GB, ExportCheckResult, check_export
from lora_trainer.export.hf_lora import HFAdapter
from lora_trainer.export.manifest import build_manifest, write_manifest
from lora_trainer.export.merged import write_merged_checkpoint
from lora_trainer.export.peft_adapter import Profile, write_peft_adapter

logger = logging.getLogger(__name__)

ADAPTER_DIR = "hf_adapter"
MERGED_DIR = "hf_merged"
STAGING_DIR = ".hf_merged.staging"

Barrier = Callable[[], None]


def export_hf(
    adapter: HFAdapter,
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
    rank: int = 0,
    world_size: int = 1,
    barrier: Barrier | None = None,
    progress: bool = True,
    started_at: float | None = None,
) -> dict[str, Any]:
    """Export `adapter` (full, on every rank) on the base checkpoint `base_dir` into `save_dir`.

    Returns the manifest on rank 0 and `{}` on the other ranks. With `check_input_ids` ([batch,
    seq] token ids) rank 0 runs `check_export` (in `check_dtype`, layer by layer when the model
    exceeds `check_memory_gb`) on the written adapter and merged checkpoint (peft profile only) and records the result in the
    manifest; a failed check is logged as an error, not raised (the caller decides). `barrier`
    (needed when `world_size > 1` and `write_merged`) must block until every rank has called it.
    Raises ExportError when anything cannot be written. The manifest records `status`
    (`complete`, or `check_failed`), `export_started_at` (`started_at`, by default when this call
    began) and `export_finished_at` (unix seconds).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    if world_size > 1 and write_merged and barrier is None:
        raise ValueError("a merged export on several ranks needs a barrier over all ranks")
    started = time.monotonic()
    started_at = time.time() if started_at is None else started_at
    base_dir, save_dir = Path(base_dir), Path(save_dir)
    staging = save_dir / STAGING_DIR
    written: dict[str, Path] = {}
    try:
        if write_merged:
            _stage_merged(adapter, base_dir, staging, rank, world_size, barrier or _no_barrier, progress)
        if rank != 0:
            return {}
        for name in (ADAPTER_DIR, MERGED_DIR):
            cleanup_stale_temporaries(save_dir, name)
        with ExitStack() as stack:
            if write_adapter:
                adapter_tmp = stack.enter_context(atomic_directory(save_dir / ADAPTER_DIR))
                _write_adapter(adapter, adapter_tmp, profile)
                written[ADAPTER_DIR] = save_dir / ADAPTER_DIR
            if write_merged:
                merged_tmp = stack.enter_context(atomic_directory(save_dir / MERGED_DIR))
                _move_contents(staging, merged_tmp)
                written[MERGED_DIR] = save_dir / MERGED_DIR
    finally:
        if write_merged and rank == 0:
            shutil.rmtree(staging, ignore_errors=True)
    export_seconds = time.monotonic() - started

    check = _run_check(base_dir, save_dir, profile, check_input_ids, check_dtype, check_memory_gb, written)
    manifest = build_manifest(
        adapter=adapter,
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
    sizes = ", ".join(f"{name} {size / 2**20:.1f} MiB" for name, size in manifest["sizes_bytes"].items())
    logger.info("HF export of step %d to %s in %.1f s: %s", step, save_dir, export_seconds, sizes or "nothing")
    return manifest


def _no_barrier() -> None:
    """The barrier of a single rank."""


def _stage_merged(
    adapter: HFAdapter, base_dir: Path, staging: Path, rank: int, world_size: int, barrier: Barrier, progress: bool
) -> None:
    """Steps 1 and 2 of the module docstring, then rank 0 checks that the staging is complete.

    Raises on every rank whose own step failed, and on rank 0 also when the staging is incomplete;
    rank 0's caller removes the staging directory."""
    failure: Exception | None = None
    if rank == 0:
        try:
            _fresh_directory(staging)
        except Exception as error:  # noqa: BLE001 - re-raised after the barrier
            failure = error
    barrier()
    if failure is None and not staging.is_dir():
        failure = PeerExportError(f"rank 0 did not create the merged staging directory {staging}: see rank 0's error")
    if failure is None:
        try:
            for path in write_merged_checkpoint(
                adapter, base_dir, staging, rank=rank, world_size=world_size, progress=progress
            ):
                _fsync_file(path)
        except Exception as error:  # noqa: BLE001 - re-raised after the barrier
            failure = error
    barrier()
    if failure is None and rank == 0:
        try:
            _check_staging_complete(base_dir, staging)
        except Exception as error:  # noqa: BLE001 - re-raised below
            failure = error
    if failure is not None:
        raise failure


def _fresh_directory(path: Path) -> None:
    """Create `path` empty (removing what is there), with a clear error when its parents are unusable."""
    for ancestor in path.parents:
        if ancestor.exists():
            if not ancestor.is_dir():
                raise ExportError(
                    f"{ancestor} is not a directory: choose an output_dir whose parent is a directory"
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
        if not (staging / path.name).is_file() or (staging / path.name).stat().st_size != path.stat().st_size
    ]
    if bad:
        raise PeerExportError(
            f"merged shard files missing or incomplete in {staging}: {', '.join(bad[:5])}"
            f"{' ...' if len(bad) > 5 else ''}: another rank's export failed; see its error"
        )


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as error:
        raise export_error(path, error, "flushing to disk") from error
    finally:
        os.close(fd)


def _move_contents(source: Path, target: Path) -> None:
    """Rename every entry of `source` into `target` (same filesystem)."""
    for entry in sorted(source.iterdir()):
        try:
            os.replace(entry, target / entry.name)
        except OSError as error:
            raise export_error(target / entry.name, error, "moving into place") from error


def _write_adapter(adapter: HFAdapter, directory: Path, profile: Profile) -> None:
    try:
        write_peft_adapter(adapter, directory, profile)
    except (OSError, SafetensorError) as error:
        raise export_error(directory, error) from error


def _run_check(
    base_dir: Path,
    save_dir: Path,
    profile: Profile,
    input_ids: Tensor | None,
    dtype: torch.dtype | None,
    memory_gb: float,
    written: dict[str, Path],
) -> ExportCheckResult | None:
    """The export check when asked for and possible; logs its outcome."""
    if input_ids is None:
        return None
    if set(written) != {ADAPTER_DIR, MERGED_DIR} or profile != "peft":
        logger.warning("export check skipped: it needs both hf_adapter and hf_merged in the 'peft' profile")
        return None
    started = time.monotonic()
    result = check_export(
        base_dir, save_dir / ADAPTER_DIR, save_dir / MERGED_DIR, input_ids, dtype=dtype, memory_gb=memory_gb
    )
    log = logger.info if result.passed else logger.error
    log("%s (%.1f s)", result.message, time.monotonic() - started)
    return result
