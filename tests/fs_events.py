"""A log of every fsync and rename, in order, across processes, to check that what is published
was flushed to disk first.

`record(monkeypatch, log)` logs the calls of this process; `sitecustomize(log)` is the source of a
`sitecustomize.py` that logs those of every Python process started with its folder on PYTHONPATH
(the ranks of a `python train.py` run). Each call appends one line (`fsync PATH` or
`rename SOURCE TARGET`, real paths) once it returned, with O_APPEND, so the lines of all processes
are in the order the calls completed.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

Event = tuple[str, ...]


def _patches(log: Path) -> dict[str, Callable[..., Any]]:
    real_fsync, real_rename, real_replace = os.fsync, os.rename, os.replace

    def write(*fields: str) -> None:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, ("\t".join(fields) + "\n").encode())
        finally:
            os.close(fd)

    def fsync(fd: int) -> None:
        real_fsync(fd)
        write("fsync", os.readlink(f"/proc/self/fd/{fd}"))

    def renaming(real: Callable[..., None]) -> Callable[..., None]:
        def rename(source: Any, target: Any, **kwargs: Any) -> None:
            real(source, target, **kwargs)
            write("rename", os.path.realpath(source), os.path.realpath(target))

        return rename

    return {"fsync": fsync, "rename": renaming(real_rename), "replace": renaming(real_replace)}


def install(log: str) -> None:
    """Log this process's fsyncs and renames into `log` from now on (for `sitecustomize`)."""
    for name, patch in _patches(Path(log)).items():
        setattr(os, name, patch)


def record(monkeypatch: pytest.MonkeyPatch, log: Path) -> None:
    """Log this process's fsyncs and renames into `log` until the test ends."""
    for name, patch in _patches(log).items():
        monkeypatch.setattr(os, name, patch)


def sitecustomize(log: Path) -> str:
    """The source of a `sitecustomize.py` that runs `install(log)` in every process."""
    return (
        "import importlib.util\n"
        f"spec = importlib.util.spec_from_file_location('fs_events', {__file__!r})\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(module)\n"
        f"module.install({str(log)!r})\n"
    )


def read(log: Path) -> list[Event]:
    return [tuple(line.split("\t")) for line in log.read_text().splitlines()]


def _publishing_rename(events: list[Event], published: Path) -> int:
    renames = [i for i, event in enumerate(events) if event[:1] == ("rename",)]
    index = next((i for i in reversed(renames) if events[i][2] == str(published)), None)
    assert index is not None, f"{published} was not published by a rename"
    return index


def assert_file_synced_then_published(events: list[Event], published: Path) -> None:
    """The file `published` appeared by the rename of a temporary file fsynced before."""
    index = _publishing_rename(events, Path(os.path.realpath(published)))
    assert ("fsync", events[index][1]) in events[:index], f"{published} not fsynced before"


def assert_synced_then_published(
    events: list[Event], published: Path, contents: Path | None = None
) -> Path:
    """`published` appeared by the rename of a temporary directory after every file and directory
    now in `contents` (default: `published` itself) had been fsynced under the temporary name, and
    its parent was fsynced after the rename. Returns the temporary directory."""
    published = Path(os.path.realpath(published))
    contents = published if contents is None else contents
    index = _publishing_rename(events, published)
    temporary = Path(events[index][1])
    synced = {
        Path(event[1]).relative_to(temporary)
        for event in events[:index]
        if event[0] == "fsync" and Path(event[1]).is_relative_to(temporary)
    }
    expected = {Path("."), *(path.relative_to(contents) for path in contents.rglob("*"))}
    assert len(expected) > 1, f"{contents} is empty"
    assert sorted(map(str, expected - synced)) == [], f"not fsynced before publishing {published}"
    assert ("fsync", str(published.parent)) in events[index + 1 :], f"{published.parent} not synced"
    return temporary
