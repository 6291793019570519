"""Background exports (`export.background=true`): workers that make a save's export from its
snapshot equal the synchronous export bit for bit; training runs whose export is killed or whose
disk fills up in the background; `python -m lora_trainer.export SAVE_DIR`."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

import lora_trainer.export.snapshot as snapshot_module
from callbacks.checkpoint_export import CheckpointExportCallback
from lora_trainer.errors import ExportError
from lora_trainer.export.background import FileBarrier, failure_messages, run_export_share
from lora_trainer.export.hf_adapter_weights import (
    DistributedAdapter,
    HFAdapter,
    HFLoraWeights,
    LocalFactors,
)
from lora_trainer.export.hf_export import export_hf
from lora_trainer.export.merge_plan import shard_modules
from lora_trainer.export.peft_adapter import Profile, write_peft_adapter
from lora_trainer.export.snapshot import (
    FACTORS_FILE,
    SNAPSHOT_DIR,
    SnapshotReader,
    read_job,
    snapshot_dir,
    write_factors,
    write_job,
)
from lora_trainer.saves import write_state_manifest
from lora_trainer.training.config import CheckpointSection, TrainConfig
from lora_trainer.training.instantiate import instantiate_callbacks
from tests import fs_events
from tests.checkpoints import KIND_MOE_VL
from tests.export_fixtures import make_base
from tests.test_training import COMMON, REPO

EXPORTED = ("hf_adapter", "hf_merged")


def _files(directory: Path) -> dict[str, bytes]:
    return {
        p.relative_to(directory).as_posix(): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def assert_same_exports(save: Path, reference: Path) -> None:
    for name in EXPORTED:
        ours, theirs = _files(save / name), _files(reference / name)
        assert sorted(ours) == sorted(theirs), name
        different = [file for file in theirs if ours[file] != theirs[file]]
        assert not different, f"{name}: {different}"


def _snapshot_of(
    adapter: HFAdapter,
    save: Path,
    base: Path,
    ranks: int,
    check: torch.Tensor | None,
    experts: str = "dealt",
    profile: str = "peft",
) -> list[LocalFactors]:
    """`adapter` as `ranks` ranks would snapshot it; returns each rank's factors. Routed experts
    in contiguous blocks of E / ranks (`experts="blocks"`: expert parallelism) or dealt out by
    index (`"dealt"`: every rank's experts in runs of one); the linears on rank 0, and one linear
    on every rank (a data-parallel replica's copy)."""
    replicated = next(iter(adapter.linears))
    snapshot: list[LocalFactors] = []
    for rank in range(ranks):
        factors: LocalFactors = {
            (m, None): (w.a, w.b)
            for m, w in adapter.linears.items()
            if rank == 0 or m == replicated
        }
        for module, weights in adapter.experts.items():
            count = weights.a.shape[0]
            indices = (
                range(rank * count // ranks, (rank + 1) * count // ranks)
                if experts == "blocks"
                else range(rank, count, ranks)
            )
            for expert in indices:
                factors[(module, expert)] = (weights.a[expert], weights.b[expert])
        write_factors(save, rank, factors)
        snapshot.append(factors)
    write_job(
        save,
        step=7,
        base_dir=str(base),
        snapshot_ranks=ranks,
        write_adapter=True,
        write_merged=True,
        profile=profile,
        check_input_ids=None if check is None else check.tolist(),
        r=adapter.r,
        alpha=adapter.alpha,
        use_rslora=adapter.use_rslora,
        text_prefix=adapter.text_prefix,
    )
    return snapshot


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, HFAdapter]:
    """A sharded packed MoE-VL base and an adapter for it whose first linear has a zero lora_B
    (as after initialisation), so that the manifest's count of non-zero lora_B is not the count of
    modules."""
    path, adapter = make_base(
        KIND_MOE_VL,
        tmp_path_factory.mktemp("base") / "moe_vl",
        dtype=torch.bfloat16,
        packed_experts=True,
        with_mtp=True,
        shards=3,
    )
    first = next(iter(adapter.linears))
    zero_b = HFLoraWeights(adapter.linears[first].a, torch.zeros_like(adapter.linears[first].b))
    linears = {**adapter.linears, first: zero_b}
    return path, dataclasses.replace(adapter, linears=linears, base_model_name_or_path=str(path))


@pytest.fixture(scope="module")
def synchronous_exports(
    base: tuple[Path, HFAdapter], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """The synchronous export of `base`'s adapter in each profile; its adapter file is the one
    `write_peft_adapter` makes from the whole adapter in memory, byte for byte."""
    path, adapter = base
    root = tmp_path_factory.mktemp("sync")
    profiles: tuple[Profile, ...] = ("peft", "per_expert")
    for profile in profiles:
        export_hf(adapter, path, root / profile, step=7, profile=profile, progress=False)
        (root / f"{profile}-whole").mkdir()
        write_peft_adapter(adapter, root / f"{profile}-whole", profile)
        assert _files(root / profile / "hf_adapter") == _files(root / f"{profile}-whole")
    return {profile: root / profile for profile in profiles}


class SnapshotReads:
    """The factor bytes each export worker (a thread named `worker-K`) reads from the snapshot:
    in all, and the most it holds at once (a tensor counts until it is freed)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.total: dict[str, int] = defaultdict(int)
        self.live: dict[str, int] = defaultdict(int)
        self.peak: dict[str, int] = defaultdict(int)
        self._lock = threading.Lock()
        read = snapshot_module._read_tensor

        def recorded(*args: Any) -> torch.Tensor:
            tensor = read(*args)
            worker, size = threading.current_thread().name, tensor.numel() * 4
            with self._lock:
                self.total[worker] += size
                self.live[worker] += size
                self.peak[worker] = max(self.peak[worker], self.live[worker])
            weakref.finalize(tensor, self._freed, worker, size)
            return tensor

        monkeypatch.setattr(snapshot_module, "_read_tensor", recorded)

    def _freed(self, worker: str, size: int) -> None:
        with self._lock:
            self.live[worker] -= size


def _pair_bytes(pair: tuple[torch.Tensor, torch.Tensor]) -> int:
    return sum(t.numel() * 4 for t in pair)


def _run_workers(save: Path, workers: int) -> None:
    errors: list[BaseException] = []

    def worker(rank: int) -> None:
        try:
            run_export_share(save, rank, workers)
        except BaseException as error:
            errors.append(error)

    threads = [
        threading.Thread(target=worker, args=(rank,), name=f"worker-{rank}")
        for rank in reversed(range(workers))
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors


LAYOUTS = {
    # name: (snapshot ranks, workers, routed experts, profile)
    "ep2": (2, 2, "blocks", "peft"),
    "ep2_per_expert": (2, 2, "blocks", "per_expert"),
    "dealt_experts": (2, 2, "dealt", "peft"),
    "one_worker_of_ep2": (2, 1, "blocks", "peft"),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_workers_read_only_their_share_and_equal_the_synchronous_export(
    layout: str,
    base: tuple[Path, HFAdapter],
    synchronous_exports: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Workers make the synchronous export's files bit for bit and its manifest's adapter facts,
    while each reads from the snapshot exactly the factors it writes (those of its snapshot files,
    without a data-parallel replica's copies), each once, holding at most two factor pairs at a
    time (the one being written and the next being read): no worker loads the whole adapter."""
    ranks, workers, experts, profile = LAYOUTS[layout]
    path, adapter = base
    reference = synchronous_exports[profile]
    save = tmp_path / "background"
    snapshot = _snapshot_of(adapter, save, path, ranks, None, experts, profile)
    reads = SnapshotReads(monkeypatch)
    _run_workers(save, workers)

    assert_same_exports(save, reference)
    manifest = json.loads((save / "export_manifest.json").read_text())
    expected = json.loads((reference / "export_manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["step"] == 7
    assert manifest["export_started_at"] <= manifest["export_finished_at"] <= time.time()
    assert manifest["files"] == expected["files"]
    assert manifest["adapter"] == expected["adapter"]
    assert manifest["adapter"]["nonzero_lora_B"] == len(adapter.linears) + len(adapter.experts) - 1

    owner: dict[tuple[str, int | None], int] = {}
    for rank, factors in enumerate(snapshot):
        for key in factors:
            owner.setdefault(key, rank)
    whole = sum(_pair_bytes(pair) for pair in DistributedAdapter.of(adapter).local.values())
    largest = max(_pair_bytes(pair) for factors in snapshot for pair in factors.values())
    share: dict[str, int] = defaultdict(int)
    for key, rank in owner.items():
        share[f"worker-{rank % workers}"] += _pair_bytes(snapshot[rank][key])
    assert sum(share.values()) == whole
    assert dict(reads.total) == dict(share)
    for worker in share:
        assert reads.peak[worker] <= 2 * largest, (worker, reads.peak[worker], largest)
        assert reads.live[worker] == 0
    if workers > 1:
        assert all(0 < size < whole for size in share.values())


def test_snapshot_headers_give_the_layout_and_the_nonzero_count_without_reading_factors(
    base: tuple[Path, HFAdapter], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reader's layout and count of non-zero lora_B come from the snapshot files' headers (no
    factor read); a snapshot written without the non-zero flags is counted one lora_B at a time."""
    path, adapter = base
    snapshot = _snapshot_of(adapter, tmp_path, path, 2, None, "blocks")
    expected = len(adapter.linears) + len(adapter.experts) - 1
    reads = SnapshotReads(monkeypatch)
    reader = SnapshotReader(tmp_path, read_job(tmp_path))
    layout = reader.meta_adapter()
    for ours, theirs in ((layout.linears, adapter.linears), (layout.experts, adapter.experts)):
        assert {k: (w.a.shape, w.b.shape, w.a.device.type) for k, w in ours.items()} == {
            k: (w.a.shape, w.b.shape, "meta") for k, w in theirs.items()
        }
    assert reader.nonzero_lora_b() == expected
    assert not reads.total

    for rank in range(len(snapshot)):
        file = snapshot_dir(tmp_path) / FACTORS_FILE.format(rank=rank)
        save_file(load_file(str(file)), str(file))
    assert SnapshotReader(tmp_path, read_job(tmp_path)).nonzero_lora_b() == expected
    # every linear's lora_B, and one expert's of each packed projection (that one is non-zero)
    read = sum(w.b.numel() for w in adapter.linears.values())
    read += sum(w.b[0].numel() for w in adapter.experts.values())
    assert sum(reads.total.values()) == 4 * read


def test_a_worker_share_of_the_merged_shards_covers_only_its_modules(
    base: tuple[Path, HFAdapter], tmp_path: Path
) -> None:
    path, adapter = base
    _snapshot_of(adapter, tmp_path, path, ranks=2, check=None)
    layout = SnapshotReader(tmp_path, read_job(tmp_path)).meta_adapter()
    shares = [shard_modules(layout, path, rank=rank, world_size=3) for rank in range(3)]
    everything = {*adapter.linears, *adapter.experts}
    assert set().union(*shares) == everything
    assert all(0 < len(share) < len(everything) for share in shares)
    assert not (shares[0] & shares[1]) and not (shares[1] & shares[2])


def test_a_failed_worker_stops_the_others_at_their_barrier(tmp_path: Path) -> None:
    (tmp_path / SNAPSHOT_DIR).mkdir()
    barrier = FileBarrier(snapshot_dir(tmp_path), rank=0, world_size=2)
    (snapshot_dir(tmp_path) / "failed-rank-00001").write_text("disk full while writing x\n")
    with pytest.raises(
        ExportError, match="another export worker failed: disk full while writing x"
    ):
        barrier()
    assert failure_messages(tmp_path) == ["disk full while writing x"]


def test_pruning_keeps_saves_whose_export_is_unfinished_and_the_newest_exported_one(
    tmp_path: Path,
) -> None:
    config = TrainConfig(
        output_dir=str(tmp_path), checkpoint=CheckpointSection(every_n_steps=1, keep_last=1)
    )
    callback = instantiate_callbacks(config)[0]
    assert isinstance(callback, CheckpointExportCallback) and callback.keep_last == 1
    for step in range(1, 5):
        save = tmp_path / "checkpoints" / f"step-{step}"
        (save / "training_state").mkdir(parents=True)
        write_state_manifest(save / "training_state", step=step, world_size=0, settings={})
        if step <= 2:
            (save / "export_manifest.json").write_text('{"files": {}, "sizes_bytes": {}}')
        else:
            (save / SNAPSHOT_DIR).mkdir()
            (save / SNAPSHOT_DIR / "job.json").write_text("{}")
    callback.background.queue.append(tmp_path / "checkpoints" / "step-3")
    callback._prune()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "step-2",
        "step-3",
        "step-4",
    ]
    callback.background.queue.clear()
    callback._prune()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-2", "step-4"]


# End to end: `python train.py` on 2 ranks (the default EP=2 layout of the tiny MoE).


def _env(output_dir: Path, pythonpath: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(TORCHDYNAMO_DISABLE="1", HOME=str(output_dir), PYTHONUNBUFFERED="1")
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (pythonpath, env.get("PYTHONPATH")) if p)
    return env


def _command(output_dir: Path, *overrides: str) -> list[str]:
    return [
        sys.executable,
        "train.py",
        f"output_dir={output_dir}",
        "logger=none",
        *COMMON,
        *overrides,
    ]


def run_train(
    output_dir: Path, *overrides: str, pythonpath: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        _command(output_dir, *overrides),
        cwd=REPO,
        env=_env(output_dir, pythonpath),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=600,
    )


def export_cli(save: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lora_trainer.export", str(save)],
        cwd=REPO,
        env=_env(save),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=300,
    )


def _ok(run: subprocess.CompletedProcess[str]) -> str:
    assert run.returncode == 0, run.stdout[-6000:]
    return run.stdout


STEPS = ["trainer.max_steps=4", "checkpoint.every_n_steps=2", "checkpoint.keep_last=2"]


@pytest.fixture(scope="module")
def fs_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where every process of the synchronous run logs its fsyncs and renames (`fs_events`)."""
    inject = tmp_path_factory.mktemp("fs_events")
    (inject / "sitecustomize.py").write_text(fs_events.sitecustomize(inject / "events.log"))
    return inject / "events.log"


@pytest.fixture(scope="module")
def synchronous_run(tmp_path_factory: pytest.TempPathFactory, fs_log: Path) -> Path:
    out = tmp_path_factory.mktemp("synchronous")
    _ok(
        run_train(
            out,
            *STEPS,
            "export.background=false",
            "export.check=true",
            pythonpath=str(fs_log.parent),
        )
    )
    return out / "checkpoints"


def test_saves_and_their_exports_are_fsynced_before_they_are_published(
    synchronous_run: Path, fs_log: Path
) -> None:
    events = fs_events.read(fs_log)
    for step in (2, 4):
        save = synchronous_run / f"step-{step}"
        staging = fs_events.assert_synced_then_published(events, save)
        assert staging.name.startswith(f".step-{step}.tmp-")
        for name in EXPORTED:
            fs_events.assert_synced_then_published(events, staging / name, save / name)
        rank_files = sorted(path.name for path in (save / "training_state").glob("rank-*.pt"))
        assert rank_files == ["rank-00000.pt", "rank-00001.pt"]
        for name in rank_files:
            fs_events.assert_file_synced_then_published(events, staging / "training_state" / name)


def test_background_saves_equal_synchronous_saves(synchronous_run: Path, tmp_path: Path) -> None:
    output = _ok(run_train(tmp_path, *STEPS, "export.check=true"))
    assert "the HF export runs in the background" in output
    assert output.index("step-4 finished") < output.index("Training done")
    for step in (2, 4):
        save = tmp_path / "checkpoints" / f"step-{step}"
        assert sorted(p.name for p in save.iterdir()) == [
            "export_manifest.json",
            *EXPORTED,
            "training_state",
        ]
        assert_same_exports(save, synchronous_run / f"step-{step}")
        manifest = json.loads((save / "export_manifest.json").read_text())
        assert manifest["status"] == "complete" and manifest["check"]["passed"]
        synchronous = json.loads(
            (synchronous_run / f"step-{step}" / "export_manifest.json").read_text()
        )
        assert manifest["adapter"] == synchronous["adapter"]
        assert manifest["export_started_at"] <= manifest["export_finished_at"]
        # Both exports were checked against what the trained model computed in every layer
        # (recorded into the snapshot, which is gone once the export finished).
        synchronous = synchronous_run / f"step-{step}"
        assert SNAPSHOT_DIR not in {p.name for p in synchronous.iterdir()}
        sync_check = json.loads((synchronous / "export_manifest.json").read_text())["check"]
        for check in (manifest["check"], sync_check):
            layers = check["trained_layers"]
            assert check["trained_dtype"] == "float32" and len(layers) >= 2
            assert [layer["layer"] for layer in layers] == list(range(len(layers)))
            assert all(0 < layer["max_abs_diff"] <= layer["tolerance"] for layer in layers)
    records = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    times = [record["time"] for record in records]
    assert len(records) == 4 and times == sorted(times) and times[-1] <= time.time()


def test_killed_background_export_is_completed_by_resume(
    synchronous_run: Path, tmp_path: Path
) -> None:
    killed = tmp_path / "killed"
    process = subprocess.Popen(
        _command(killed, "trainer.max_steps=2", "checkpoint.every_n_steps=2"),
        cwd=REPO,
        env=_env(killed),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    save = killed / "checkpoints" / "step-2"
    deadline = time.monotonic() + 300
    while (
        not (save / SNAPSHOT_DIR / "job.json").is_file()
        and process.poll() is None
        and time.monotonic() < deadline
    ):
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert (save / "training_state").is_dir() and not (save / "export_manifest.json").exists()
    longer = tmp_path / "longer"
    shutil.copytree(killed, longer)

    output = _ok(
        run_train(killed, "trainer.max_steps=2", "checkpoint.every_n_steps=2", "resume=latest")
    )
    assert "only completing unfinished exports" in output and "Training done" in output
    assert_same_exports(save, synchronous_run / "step-2")
    assert sorted(p.name for p in save.iterdir()) == [
        "export_manifest.json",
        *EXPORTED,
        "training_state",
    ]

    output = _ok(run_train(longer, *STEPS, "resume=latest"))
    assert "Completing the HF export of step-2 in the background" in output
    assert_same_exports(longer / "checkpoints" / "step-2", synchronous_run / "step-2")
    for step in (2, 4):
        manifest = json.loads(
            (longer / "checkpoints" / f"step-{step}" / "export_manifest.json").read_text()
        )
        assert manifest["status"] == "complete"


_FULL_DISK = """
import errno, os, sys
if "lora_trainer.export" in sys.orig_argv and any(arg.endswith("step-2") for arg in sys.orig_argv):
    def _disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    os.copy_file_range = _disk_full
"""


def test_full_disk_in_the_background_stops_training_and_keeps_earlier_saves(tmp_path: Path) -> None:
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(_FULL_DISK)
    out = tmp_path / "run"
    run = run_train(
        out, "trainer.max_steps=3", "checkpoint.every_n_steps=1", pythonpath=str(inject)
    )
    output = run.stdout
    assert run.returncode != 0
    assert "the background HF export of" in output and "disk full while writing" in output, output[
        -3000:
    ]
    root = out / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-1", "step-2"]
    assert sorted(p.name for p in (root / "step-1").iterdir()) == [
        "export_manifest.json",
        *EXPORTED,
        "training_state",
    ]
    assert sorted(p.name for p in (root / "step-2").iterdir()) == [SNAPSHOT_DIR, "training_state"]

    shutil.rmtree(inject)
    assert "Completing the HF export" in _ok(export_cli(root / "step-2"))
    assert sorted(p.name for p in (root / "step-2").iterdir()) == [
        "export_manifest.json",
        *EXPORTED,
        "training_state",
    ]
    assert (
        json.loads((root / "step-2" / "export_manifest.json").read_text())["status"] == "complete"
    )
