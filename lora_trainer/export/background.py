"""HF exports made in the background, from a save's snapshot and the base files only.

With `export.background=true` a save writes the training state and the export snapshot
(`snapshot.py`), publishes `step-N/`, and each training rank starts one worker process,
`python -m lora_trainer.export step-N --rank K --world-size W`; training goes on at once.
The workers run `export_hf` as if they were the ranks of a synchronous export, with a barrier made
of marker files in the snapshot directory instead of collectives:

- worker K writes into the one adapter file the factors of snapshot files K, K + W, ..., read one
  module or expert at a time (`SnapshotReader.distributed_adapter`), then merged shard files K,
  K + W, ..., reading back from the adapter file only the factors of the modules those shards
  hold; no worker loads the whole adapter, and the manifest's whole-adapter facts (layout,
  non-zero lora_B) come from the snapshot headers;
- worker 0 also creates the adapter file, moves it and the shards into `hf_adapter/` and
  `hf_merged/` (each directory renamed into place only when complete), runs the check (also
  against the records of our trained model's layers in the snapshot) and writes
  `export_manifest.json` last.

Once every worker has exited, the training process removes the snapshot (`discard_snapshot`; a
worker cannot: the others may still be reading its last barrier's markers).

A worker that fails writes `failed-rank-K` (its message) into the snapshot directory; the others
stop at their next barrier. The snapshot stays until the manifest is written, so a killed or
failed export is completed later from it (`complete_export`): by `resume=latest`, or by
`python -m lora_trainer.export SAVE_DIR`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import lora_trainer
from lora_trainer.errors import ExportError, PeerExportError
from lora_trainer.export.hf_export import STAGING_DIR, export_hf
from lora_trainer.export.manifest import MANIFEST_FILE
from lora_trainer.export.snapshot import SnapshotReader, has_snapshot, read_job, snapshot_dir

logger = logging.getLogger(__name__)

FAILED_MARKER = "failed-rank-{rank:05d}"
_BARRIER_MARKER = "barrier-{count}-rank-{rank:05d}"
_POLL_S = 0.05
_PR_SET_PDEATHSIG = 1
# The first words of the message of a worker that stopped because another one failed.
_OTHER_FAILED = "another export worker failed"


class FileBarrier:
    """A barrier over the `world_size` workers of one export, made of marker files in `directory`
    (a filesystem every worker sees). Raises ExportError once any worker wrote a failure marker."""

    def __init__(
        self, directory: Path, rank: int, world_size: int, parent_pid: int | None = None
    ) -> None:
        self.directory = directory
        self.rank = rank
        self.world_size = world_size
        self.parent_pid = parent_pid
        self.count = 0

    def __call__(self) -> None:
        self.count += 1
        (self.directory / _BARRIER_MARKER.format(count=self.count, rank=self.rank)).touch()
        waiting = [
            self.directory / _BARRIER_MARKER.format(count=self.count, rank=r)
            for r in range(self.world_size)
        ]
        while True:
            failed = failure_messages(self.directory.parent)
            if failed:
                raise ExportError(f"{_OTHER_FAILED}: {failed[0]}")
            waiting = [path for path in waiting if not path.exists()]
            if not waiting:
                return
            if self.parent_pid is not None and os.getppid() != self.parent_pid:
                raise ExportError("the training process that started this export is gone")
            time.sleep(_POLL_S)


def failure_messages(save_dir: Path) -> list[str]:
    """The messages of the workers of `save_dir`'s export that failed, root causes first."""
    messages = []
    for path in sorted(snapshot_dir(save_dir).glob("failed-rank-*")):
        try:
            messages.append(path.read_text().strip())
        except OSError:
            continue
    return sorted(messages, key=lambda text: text.startswith(_OTHER_FAILED))


def is_exported(save_dir: Path) -> bool:
    return (Path(save_dir) / MANIFEST_FILE).is_file()


def pending_exports(root: Path) -> list[Path]:
    """Saves under `root` (oldest first) whose export has not finished: a snapshot, no manifest."""
    if not root.is_dir():
        return []
    saves = [
        p
        for p in root.iterdir()
        if p.is_dir() and p.name.startswith("step-") and p.name[5:].isdigit()
    ]
    return sorted(
        (p for p in saves if has_snapshot(p) and not is_exported(p)), key=lambda p: int(p.name[5:])
    )


def reset_export(save_dir: Path) -> None:
    """Remove what an earlier, killed or failed export of `save_dir` left: its markers and the
    merged staging directory (finished `hf_adapter/` and `hf_merged/` are replaced whole)."""
    shutil.rmtree(Path(save_dir) / STAGING_DIR, ignore_errors=True)
    for marker in snapshot_dir(save_dir).iterdir():
        if marker.name.startswith(("barrier-", "failed-rank-")):
            marker.unlink(missing_ok=True)


def run_export_share(
    save_dir: Path, rank: int = 0, world_size: int = 1, parent_pid: int | None = None
) -> None:
    """Worker `rank` of `world_size` of the export of `save_dir` (the module docstring); with
    world_size 1 the whole export. Raises ExportError, after writing this worker's failure marker.
    A worker started by the training process `parent_pid` dies with it (on Linux)."""
    save_dir = Path(save_dir)
    if parent_pid is not None:
        _die_with_parent(parent_pid)
    try:
        _export_share(save_dir, rank, world_size, parent_pid)
    except Exception as error:
        marker = snapshot_dir(save_dir) / FAILED_MARKER.format(rank=rank)
        try:
            text = f"{_OTHER_FAILED}: {error}" if isinstance(error, PeerExportError) else str(error)
            marker.write_text(text + "\n")
        except OSError as marker_error:
            logger.error("could not record the export failure in %s: %s", marker, marker_error)
        if isinstance(error, ExportError):
            raise
        raise ExportError(
            f"the export of {save_dir} failed: {type(error).__name__}: {error}"
        ) from error


def _die_with_parent(parent_pid: int) -> None:
    """Have the kernel kill this process when its parent dies (Linux), so that a killed run leaves
    no worker that a later completion of the same export would race; exit if it is already gone."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:
        raise SystemExit(1)


def _export_share(save_dir: Path, rank: int, world_size: int, parent_pid: int | None) -> None:
    started_at = time.time()
    job = read_job(save_dir)
    adapter = SnapshotReader(save_dir, job).distributed_adapter(rank, world_size)
    barrier = FileBarrier(snapshot_dir(save_dir), rank, world_size, parent_pid)
    manifest = export_hf(
        adapter,
        Path(job.base_dir),
        save_dir,
        step=job.step,
        write_adapter=job.write_adapter,
        write_merged=job.write_merged,
        profile=job.profile,  # type: ignore[arg-type]
        check_input_ids=job.check_tensor(),
        check_memory_gb=job.check_memory_gb,
        check_trained_layers=snapshot_dir(save_dir) if job.trained_layers else None,
        rank=rank,
        world_size=world_size,
        barrier=barrier,
        progress=False,
        started_at=started_at,
    )
    if rank != 0:
        return
    check = manifest.get("check")
    if job.check_input_ids is not None and check is not None and not check.get("passed"):
        raise ExportError(
            f"the export check of step {job.step} failed: {check.get('message', check)}"
        )


def complete_export(save_dir: Path) -> None:
    """Make the missing export of `save_dir` in this process, from its snapshot."""
    save_dir = Path(save_dir).absolute()
    if is_exported(save_dir):
        logger.info("%s is already exported (%s)", save_dir, MANIFEST_FILE)
        discard_snapshot(save_dir)
        return
    read_job(save_dir)
    reset_export(save_dir)
    logger.info("Completing the HF export of %s", save_dir)
    run_export_share(save_dir)
    discard_snapshot(save_dir)


def discard_snapshot(save_dir: Path) -> None:
    """Remove the snapshot of an exported save (kept while the export is unfinished)."""
    if is_exported(save_dir):
        shutil.rmtree(snapshot_dir(save_dir), ignore_errors=True)


class ExportWorker:
    """One rank's background worker process of one save's export."""

    def __init__(self, save_dir: Path, rank: int, world_size: int) -> None:
        self.save_dir = Path(save_dir)
        self.rank = rank
        root = str(Path(lora_trainer.__file__).resolve().parent.parent)
        env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
        command = [
            sys.executable,
            "-m",
            "lora_trainer.export",
            str(self.save_dir),
            "--rank",
            str(rank),
            "--world-size",
            str(world_size),
            "--parent-pid",
            str(os.getpid()),
        ]
        self.process = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL)

    def running(self) -> bool:
        return self.process.poll() is None

    def failure(self) -> str | None:
        """None while running or after success; else why it failed."""
        code = self.process.poll()
        if code in (None, 0):
            return None
        messages = failure_messages(self.save_dir)
        if messages:
            return messages[0]
        return f"the export worker of rank {self.rank} exited with code {code}"

    def settle(self, timeout_s: float) -> None:
        """Give the worker up to `timeout_s` to exit by itself (a worker stopped by another's
        failure exits at its next barrier; the failing one after recording its cause)."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=timeout_s)

    def stop(self) -> None:
        """Kill the worker (its snapshot stays; the export can be completed later)."""
        if self.running():
            self.process.send_signal(signal.SIGKILL)
        self.process.wait()
