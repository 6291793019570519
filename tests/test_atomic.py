"""atomic_directory (and its halves temporary_directory, publish_directory), atomic_file,
atomic_write_text/json and cleanup_stale_temporaries."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import safetensors.torch
import torch

from lora_trainer.bridge.safetensors_io import ShardedCheckpointWriter
from lora_trainer.errors import ExportError
from lora_trainer.files import atomic
from lora_trainer.files.atomic import (
    atomic_directory,
    atomic_write_json,
    atomic_write_text,
    cleanup_stale_temporaries,
    publish_directory,
    temporary_directory,
)
from tests import fs_events

DEAD_PID = 99_999_999  # above the kernel's pid_max, so never a running process


def _old_export(parent: Path) -> Path:
    final = parent / "export"
    final.mkdir()
    (final / "old.txt").write_text("old")
    return final


def _entries(parent: Path) -> list[str]:
    return sorted(entry.name for entry in parent.iterdir())


def test_success_creates_final(tmp_path: Path) -> None:
    final = tmp_path / "nested" / "export"
    with atomic_directory(final) as temporary:
        assert temporary.parent == final.parent and temporary.name.startswith(".export.tmp-")
        assert not final.exists()
        (temporary / "a.txt").write_text("new")
    assert (final / "a.txt").read_text() == "new"
    assert _entries(final.parent) == ["export"]
    umask = os.umask(0o022)
    os.umask(umask)
    assert final.stat().st_mode & 0o777 == 0o777 & ~umask


def test_success_replaces_old_export(tmp_path: Path) -> None:
    final = _old_export(tmp_path)
    with atomic_directory(final) as temporary:
        (temporary / "new.txt").write_text("new")
        assert (final / "old.txt").read_text() == "old"
    assert _entries(final) == ["new.txt"]
    assert _entries(tmp_path) == ["export"]


def test_exception_in_body_keeps_old_and_removes_temporary(tmp_path: Path) -> None:
    final = _old_export(tmp_path)
    with pytest.raises(RuntimeError, match="boom"), atomic_directory(final) as temporary:
        (temporary / "half.txt").write_text("half")
        raise RuntimeError("boom")
    assert _entries(final) == ["old.txt"]
    assert _entries(tmp_path) == ["export"]


def test_a_publish_fsyncs_every_file_and_directory_before_the_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = tmp_path / "events.log"
    out = tmp_path / "out"
    out.mkdir()
    final = _old_export(out)
    fs_events.record(monkeypatch, log)
    with atomic_directory(final) as temporary:
        (temporary / "sub").mkdir()
        (temporary / "sub" / "b.bin").write_bytes(b"b")
        (temporary / "a.txt").write_text("a")
    assert _entries(final) == ["a.txt", "sub"]
    published_from = fs_events.assert_synced_then_published(fs_events.read(log), final)
    assert published_from.name.startswith(".export.tmp-")

    plain = out / "plain"
    (out / ".plain").mkdir()
    (out / ".plain" / "a.txt").write_text("a")
    os.rename(out / ".plain", plain)
    with pytest.raises(AssertionError, match="not fsynced before publishing"):
        fs_events.assert_synced_then_published(fs_events.read(log), plain)


def test_without_replace_an_existing_final_is_kept(tmp_path: Path) -> None:
    final = _old_export(tmp_path)
    with atomic_directory(final, replace=False) as temporary:
        (temporary / "new.txt").write_text("new")
    assert _entries(final) == ["old.txt"]
    other = tmp_path / "other"
    with atomic_directory(other, replace=False) as temporary:
        (temporary / "ours.txt").write_text("ours")
        other.mkdir()
        (other / "theirs.txt").write_text("theirs")
    assert _entries(other) == ["theirs.txt"]
    assert _entries(tmp_path) == ["export", "other"]

    temporary = temporary_directory(tmp_path / "third")
    (temporary / "a.txt").write_text("a")
    assert publish_directory(temporary, tmp_path / "third", replace=False) is True
    temporary = temporary_directory(tmp_path / "third")
    assert publish_directory(temporary, tmp_path / "third", replace=False) is False
    assert _entries(tmp_path / "third") == ["a.txt"]
    assert _entries(tmp_path) == ["export", "other", "third"]


def test_disk_full_while_writing_shards(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    final = _old_export(tmp_path)

    def disk_full(tensors: dict, filename: str, metadata: dict | None = None) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with (
        pytest.raises(ExportError, match="disk full while writing") as info,
        atomic_directory(final) as temporary,
    ):
        writer = ShardedCheckpointWriter(temporary)
        writer.write_shard("model.safetensors", {"a": torch.ones(2)})
    assert "model.safetensors" in str(info.value) and "output_dir" in str(info.value)
    assert _entries(final) == ["old.txt"]
    assert _entries(tmp_path) == ["export"]


def test_disk_full_at_fsync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    final = _old_export(tmp_path)

    def fsync(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(ExportError, match="disk full"), atomic_directory(final) as temporary:
        (temporary / "a.txt").write_text("new")
        monkeypatch.setattr(os, "fsync", fsync)
    assert _entries(final) == ["old.txt"]
    assert _entries(tmp_path) == ["export"]


def test_parent_is_a_file(tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    with (
        pytest.raises(ExportError, match="output_dir") as info,
        atomic_directory(blocker / "export"),
    ):
        pytest.fail("the body must not run")
    assert str(blocker) in str(info.value)


def test_unwritable_parent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def denied(prefix: str, dir: Path) -> str:
        raise PermissionError(errno.EACCES, "Permission denied", str(dir))

    monkeypatch.setattr(atomic.tempfile, "mkdtemp", denied)
    with (
        pytest.raises(ExportError, match="writable") as info,
        atomic_directory(tmp_path / "export"),
    ):
        pytest.fail("the body must not run")
    assert str(tmp_path) in str(info.value)


def test_final_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "export").write_text("x")
    with pytest.raises(ExportError, match="not a directory"), atomic_directory(tmp_path / "export"):
        pytest.fail("the body must not run")


def test_failed_swap_restores_old_export(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    final = _old_export(tmp_path)
    real_rename = os.rename

    def rename(source: Path, target: Path) -> None:
        if Path(source).name.startswith(".export.tmp-"):
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        real_rename(source, target)

    monkeypatch.setattr(os, "rename", rename)
    with (
        pytest.raises(ExportError, match="renaming the finished directory"),
        atomic_directory(final) as temporary,
    ):
        (temporary / "new.txt").write_text("new")
    assert _entries(final) == ["old.txt"]
    assert _entries(tmp_path) == ["export"]


def test_atomic_write_text_and_json(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "config.json"
    atomic_write_json(path, {"b": 1, "a": [1, 2]})
    assert json.loads(path.read_text()) == {"b": 1, "a": [1, 2]}
    assert path.read_text().endswith("\n")
    path.chmod(0o640)
    atomic_write_text(path, "replaced")
    assert path.read_text() == "replaced"
    assert path.stat().st_mode & 0o777 == 0o640
    assert _entries(path.parent) == ["config.json"]


def test_atomic_write_text_fsyncs_the_file_before_the_rename_and_the_directory_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = tmp_path / "events.log"
    path = tmp_path / "out" / "config.json"
    fs_events.record(monkeypatch, log)
    atomic_write_text(path, "text")
    events = fs_events.read(log)
    renames = [event for event in events if event[0] == "rename"]
    assert [target for _, _, target in renames] == [str(path.resolve())]
    temporary = renames[0][1]
    assert Path(temporary).name.startswith(".config.json.tmp-")
    assert events == [
        ("fsync", temporary),
        renames[0],
        ("fsync", str(path.parent.resolve())),
    ]
    assert path.read_text() == "text"


def test_atomic_write_text_failure_keeps_old(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "config.json"
    path.write_text("old")

    def disk_full(source: Path, target: Path) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", disk_full)
    with pytest.raises(ExportError, match="disk full while writing") as info:
        atomic_write_text(path, "new")
    assert str(path) in str(info.value)
    assert path.read_text() == "old"
    assert _entries(tmp_path) == ["config.json"]


def test_cleanup_stale_temporaries(tmp_path: Path) -> None:
    _old_export(tmp_path)
    stale = tmp_path / f".export.tmp-{DEAD_PID}-abc123"
    live = tmp_path / f".export.tmp-{os.getpid()}-abc123"
    replaced = tmp_path / f".export.old-{DEAD_PID}-abcd"
    orphan = tmp_path / f".adapter.old-{DEAD_PID}-abcd"
    stale_file = tmp_path / f".config.json.tmp-{DEAD_PID}-x1y2"
    unrelated = (tmp_path / ".export.tmpfoo", tmp_path / "other")
    for directory in (stale, live, replaced, orphan, *unrelated):
        directory.mkdir()
        (directory / "f").write_text("x")
    stale_file.write_text("x")

    assert cleanup_stale_temporaries(tmp_path, name="adapter") == [
        f"restored adapter from {orphan.name}"
    ]
    assert (tmp_path / "adapter" / "f").is_file()
    assert cleanup_stale_temporaries(tmp_path) == [
        f"removed {stale_file.name}",
        f"removed {replaced.name}",
        f"removed {stale.name}",
    ]
    assert _entries(tmp_path) == sorted([".export.tmpfoo", live.name, "adapter", "export", "other"])
    assert cleanup_stale_temporaries(tmp_path / "absent") == []
