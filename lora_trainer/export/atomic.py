"""Atomic writes of export directories and single files.

An export is written into a temporary sibling of its final path and renamed into place only once
every file is complete and on disk, so `final` never holds a half-written export. Temporaries are
named `.<name>.tmp-<pid>-<random>` (and a replaced export is moved aside to
`.<name>.old-<pid>-<random>`) in the same parent, so every rename stays on one filesystem.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lora_trainer.errors import ExportError

logger = logging.getLogger(__name__)

_STALE = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)-[A-Za-z0-9_-]+$")
_OS_ERROR_CODE = re.compile(r"os error (\d+)")
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_NO_PERMISSION = (errno.EACCES, errno.EPERM)


def export_error(path: Path, cause: BaseException, doing: str = "writing") -> ExportError:
    """An ExportError for a failed write of `path` that names the cause and the fix.

    `cause` is an OSError or an error whose text carries `os error N` (as safetensors' Rust
    writer reports I/O failures).
    """
    code = cause.errno if isinstance(cause, OSError) else _errno_in_text(str(cause))
    if code in _DISK_FULL:
        return ExportError(
            f"disk full while {doing} {path} ({cause}): free space or choose another output_dir"
        )
    if code in _NO_PERMISSION:
        return ExportError(
            f"no permission for {doing} {path} ({cause}): make {path.parent} writable "
            "or choose another output_dir"
        )
    if code == errno.EROFS:
        return ExportError(
            f"read-only filesystem while {doing} {path} ({cause}): choose another output_dir"
        )
    return ExportError(f"failed {doing} {path}: {cause}")


def _errno_in_text(text: str) -> int | None:
    match = _OS_ERROR_CODE.search(text)
    return int(match.group(1)) if match else None


def _umask() -> int:
    """The process umask (read by setting and restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _token() -> str:
    return secrets.token_hex(4)


def _remove(path: Path) -> None:
    """Delete a file, symlink or directory tree; errors are logged, not raised."""
    try:
        if path.is_symlink() or not path.is_dir():
            path.unlink(missing_ok=True)
        else:
            shutil.rmtree(path)
    except OSError as error:
        logger.warning("could not delete %s: %s; delete it by hand", path, error)


def _fsync_path(path: Path, directory: bool) -> None:
    flags = os.O_RDONLY | (os.O_DIRECTORY if directory else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """fsync every regular file and directory under `root` (symlinks are not followed)."""
    for dirpath, _dirnames, filenames in os.walk(root):
        for filename in filenames:
            file = Path(dirpath) / filename
            if not file.is_symlink():
                _fsync_path(file, directory=False)
        _fsync_path(Path(dirpath), directory=True)


def _make_parent(parent: Path) -> None:
    if parent.exists() and not parent.is_dir():
        raise ExportError(
            f"{parent} is not a directory: choose an output_dir whose parent is a directory"
        )
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ExportError(
            f"cannot create the output directory {parent} ({error}): make sure every component "
            "of the path is a writable directory, or choose another output_dir"
        ) from error


def _make_temporary_dir(final: Path) -> Path:
    parent = final.parent
    _make_parent(parent)
    try:
        temporary = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-{os.getpid()}-", dir=parent))
    except OSError as error:
        raise ExportError(
            f"cannot write into {parent} ({error}): make the directory writable "
            "or choose another output_dir"
        ) from error
    temporary.chmod(0o777 & ~_umask())
    return temporary


def _swap_into_place(temporary: Path, final: Path) -> None:
    """Rename `temporary` onto `final`; an existing `final` is moved aside, then deleted.

    If the new directory cannot be renamed into place, the old one is restored.
    """
    if not (final.exists() or final.is_symlink()):
        try:
            os.rename(temporary, final)
        except OSError as error:
            raise export_error(final, error, "renaming the finished export to") from error
        return
    aside = final.parent / f".{final.name}.old-{os.getpid()}-{_token()}"
    try:
        os.rename(final, aside)
    except OSError as error:
        raise export_error(final, error, "moving aside the previous export") from error
    try:
        os.rename(temporary, final)
    except OSError as error:
        try:
            os.rename(aside, final)
        except OSError as restore_error:
            raise ExportError(
                f"could not rename the finished export to {final} ({error}) nor restore the "
                f"previous export ({restore_error}): it is kept at {aside}; rename it back by hand"
            ) from error
        raise export_error(final, error, "renaming the finished export to") from error
    _remove(aside)


@contextmanager
def atomic_directory(final: Path | str) -> Iterator[Path]:
    """Yield a fresh temporary directory that replaces `final` when the body succeeds.

    On success every file is fsynced and the directory renamed onto `final` (an existing `final`
    is replaced as a whole). On any exception the temporary directory is deleted, the exception
    re-raised, and an existing `final` is left untouched. Raises ExportError when the parent is
    not writable or `final` exists and is not a directory.
    """
    final = Path(final)
    if final.exists() and not final.is_dir():
        raise ExportError(
            f"{final} exists and is not a directory: remove it or choose another output_dir"
        )
    temporary = _make_temporary_dir(final)
    try:
        yield temporary
        try:
            _fsync_tree(temporary)
        except OSError as error:
            raise export_error(temporary, error, "flushing to disk") from error
        _swap_into_place(temporary, final)
    except BaseException:
        _remove(temporary)
        raise
    try:
        _fsync_path(final.parent, directory=True)
    except OSError as error:
        raise export_error(final.parent, error, "flushing to disk") from error


def atomic_write_text(path: Path | str, text: str) -> None:
    """Write `text` (UTF-8) to `path` through a fsynced temporary file and `os.replace`.

    The file keeps the mode of the file it replaces, or gets the umask default. Raises
    ExportError naming `path` when the write fails; `path` is then left as it was.
    """
    path = Path(path)
    _make_parent(path.parent)
    mode = path.stat().st_mode & 0o7777 if path.is_file() else 0o666 & ~_umask()
    try:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent)
    except OSError as error:
        raise export_error(path, error) from error
    temporary = Path(name)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fchmod(handle.fileno(), mode)
            os.fsync(handle.fileno())
        os.replace(temporary, path)
        _fsync_path(path.parent, directory=True)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise export_error(path, error) from error


def atomic_write_json(
    path: Path | str, obj: Any, *, indent: int = 2, sort_keys: bool = False
) -> None:
    """Write `obj` as JSON (with a trailing newline) to `path` atomically; see atomic_write_text."""
    atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=sort_keys) + "\n")


def pid_alive(pid: int) -> bool:
    """Whether a process with `pid` exists on this host (one we may not signal counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cleanup_stale_temporaries(parent: Path | str, name: str | None = None) -> list[Path]:
    """Clean up what a killed export left in `parent`; returns the paths removed or restored.

    Only entries named `.<name>.tmp-<pid>-<random>` or `.<name>.old-<pid>-<random>` whose pid is
    no longer running on this machine are touched (restrict to one export with `name`).
    Temporaries are deleted. A moved-aside previous export is deleted when `<name>` exists and
    renamed back to `<name>` when it does not (the process died between the two renames). Call it
    from one process only: pids of processes on other machines sharing the filesystem are not seen.
    """
    parent = Path(parent)
    if not parent.is_dir():
        return []
    handled: list[Path] = []
    for entry in sorted(parent.iterdir()):
        match = _STALE.match(entry.name)
        if match is None or (name is not None and match["name"] != name):
            continue
        if pid_alive(int(match["pid"])):
            continue
        final = parent / match["name"]
        if match["kind"] == "old" and not (final.exists() or final.is_symlink()):
            try:
                os.rename(entry, final)
            except OSError as error:
                raise export_error(final, error, "restoring the previous export to") from error
        else:
            _remove(entry)
        handled.append(entry)
    return handled
