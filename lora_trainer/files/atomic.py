"""Atomic publication of directories and files: the one way lora_trainer makes what it wrote
appear under its final name (the saves, the HF exports, the tiny checkpoints, every manifest).

A directory is written into a temporary sibling of its final path, `.<name>.tmp-<pid>-<random>`
(`temporary_directory`), and published by `publish_directory`: every file and directory in it is
fsynced, it is renamed onto the final path (a directory it replaces is first moved aside to
`.<name>.old-<pid>-<random>`, and deleted once the new one is in place), and the parent is fsynced.
So the final path never holds a half-written directory, and a published one survives a crash or a
power loss. `atomic_directory` wraps both halves around a body in one process; a save that several
ranks write calls them itself (rank 0 makes the temporary directory and publishes it). A single
file goes the same way through `atomic_file` (a temporary sibling, fsync, `os.replace`, fsync of the
parent). Temporaries stay in the final path's parent, so every rename is on one filesystem;
`cleanup_stale_temporaries` clears what a killed process left.
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


def fsync_file(path: Path) -> None:
    """Flush the file `path` to disk; ExportError naming it when the disk refuses."""
    try:
        _fsync_path(path, directory=False)
    except OSError as error:
        raise export_error(path, error, "flushing to disk") from error


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


def temporary_directory(final: Path | str) -> Path:
    """Create the empty temporary sibling `.<name>.tmp-<pid>-<random>` of `final` (its parents
    too) for `publish_directory`. Raises ExportError when the parent is not a writable directory
    or `final` exists and is not a directory."""
    final = Path(final)
    if final.exists() and not final.is_dir():
        raise ExportError(
            f"{final} exists and is not a directory: remove it or choose another output_dir"
        )
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
    """Rename `temporary` onto the existing `final`, which is moved aside, then deleted.

    If the new directory cannot be renamed into place, the old one is restored.
    """
    aside = final.parent / f".{final.name}.old-{os.getpid()}-{_token()}"
    try:
        os.rename(final, aside)
    except OSError as error:
        raise export_error(final, error, "moving aside the previous directory") from error
    try:
        os.rename(temporary, final)
    except OSError as error:
        try:
            os.rename(aside, final)
        except OSError as restore_error:
            raise ExportError(
                f"could not rename the finished directory to {final} ({error}) nor restore the "
                f"previous one ({restore_error}): it is kept at {aside}; rename it back by hand"
            ) from error
        raise export_error(final, error, "renaming the finished directory to") from error
    _remove(aside)


def publish_directory(temporary: Path, final: Path | str, *, replace: bool = True) -> bool:
    """Publish the complete directory `temporary` (from `temporary_directory`) as `final`.

    Every file and directory in `temporary` is fsynced, then it is renamed onto `final` and the
    parent is fsynced. An existing `final` is replaced as a whole (and restored when the rename
    fails). With `replace=False` an existing `final` is kept (another process published the same
    content first): `temporary` is deleted and False returned. On an error (ExportError)
    `temporary` stays, for the caller to delete or `cleanup_stale_temporaries` to clear.
    """
    final = Path(final)
    try:
        _fsync_tree(temporary)
    except OSError as error:
        raise export_error(temporary, error, "flushing to disk") from error
    if replace and (final.exists() or final.is_symlink()):
        _swap_into_place(temporary, final)
    else:
        try:
            os.rename(temporary, final)
        except OSError as error:
            if replace or not final.is_dir():
                raise export_error(final, error, "renaming the finished directory to") from error
            _remove(temporary)
            return False
    try:
        _fsync_path(final.parent, directory=True)
    except OSError as error:
        raise export_error(final.parent, error, "flushing to disk") from error
    return True


@contextmanager
def atomic_directory(final: Path | str, *, replace: bool = True) -> Iterator[Path]:
    """Yield a fresh temporary directory that `publish_directory` publishes as `final` when the
    body succeeds (see there for `replace`).

    On any exception the temporary directory is deleted, the exception re-raised, and an existing
    `final` is left untouched. Raises ExportError when the parent is not writable or `final`
    exists and is not a directory.
    """
    temporary = temporary_directory(final)
    try:
        yield temporary
        publish_directory(temporary, final, replace=replace)
    except BaseException:
        _remove(temporary)
        raise


@contextmanager
def atomic_file(path: Path | str) -> Iterator[Path]:
    """Yield the path of a temporary sibling of `path` to write; when the body succeeds, the file
    is fsynced and renamed onto `path` (`os.replace`), and the directory fsynced.

    The file keeps the mode of the file it replaces, or gets the umask default. On any exception
    the temporary is deleted and `path` left as it was; a failure to publish raises ExportError
    naming `path`.
    """
    path = Path(path)
    _make_parent(path.parent)
    mode = path.stat().st_mode & 0o7777 if path.is_file() else 0o666 & ~_umask()
    try:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent)
        os.close(fd)
    except OSError as error:
        raise export_error(path, error) from error
    temporary = Path(name)
    try:
        yield temporary
        try:
            os.chmod(temporary, mode)
            _fsync_path(temporary, directory=False)
            os.replace(temporary, path)
            _fsync_path(path.parent, directory=True)
        except OSError as error:
            raise export_error(path, error) from error
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path | str, text: str) -> None:
    """Write `text` (UTF-8) to `path` through `atomic_file`. Raises ExportError naming `path`
    when the write fails; `path` is then left as it was."""
    with atomic_file(path) as temporary:
        try:
            temporary.write_text(text, encoding="utf-8")
        except OSError as error:
            raise export_error(Path(path), error) from error


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


def cleanup_stale_temporaries(parent: Path | str, name: str | None = None) -> list[str]:
    """Clean up what a killed process left in `parent`; returns one note per entry handled
    (`removed .<name>.tmp-...`, `restored <name> from .<name>.old-...`).

    Only entries named `.<name>.tmp-<pid>-<random>` or `.<name>.old-<pid>-<random>` whose pid is
    no longer running on this machine are touched (restrict to one final name with `name`).
    Temporaries are deleted. A moved-aside previous directory is deleted when `<name>` exists and
    renamed back to `<name>` when it does not (the process died between the two renames). Call it
    from one process only: pids of processes on other machines sharing the filesystem are not seen.
    """
    parent = Path(parent)
    if not parent.is_dir():
        return []
    notes: list[str] = []
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
                raise export_error(final, error, "restoring the previous directory to") from error
            notes.append(f"restored {final.name} from {entry.name}")
        else:
            _remove(entry)
            notes.append(f"removed {entry.name}")
    return notes
