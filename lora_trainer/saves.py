"""The layout of saves on disk, and the rules that keep them trustworthy. Below `training/` and
`callbacks/`, which both import it; it imports only `lora_trainer.files`, `lora_trainer.export`
and `lora_trainer.errors`.

    OUT/checkpoints/step-N/
        training_state/rank-*.pt        one file per rank: tensors and plain values only
        training_state/manifest.json    the rank files and their sizes, and the settings of the run
        hf_adapter/, hf_merged/         the HF exports
        export_manifest.json            the exported files and their total sizes
        export_snapshot/                while a background export is unfinished (export.background)

A save is written into `.step-N.tmp-<pid>-<random>`, fsynced and renamed to `step-N` when complete
(`lora_trainer.files.atomic.publish_directory`; a re-save of the same step moves the previous one
to `.step-N.old-<pid>-<random>` for the swap). A save is intact only when every file its two
manifests list is there with the right size (`save_problems`); a save whose background
export is unfinished (no export manifest yet, its `export_snapshot/` there) is intact when its
training state is, and its export is completed from the snapshot (`lora_trainer.export.background`).
Damaged saves are never resumed from and never counted by `checkpoint.keep_last`. Leftovers of a
killed run (`.step-N.tmp-*`, `.step-N.old-*`) are cleared at the start of the next one
(`clear_leftovers`), and a run that starts at step K moves the saves after K, from another line of
training, under `checkpoints/abandoned/` (`set_aside_after`).
"""

from __future__ import annotations

import json
import pickle
import re
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from lora_trainer.errors import CheckpointError
from lora_trainer.export.snapshot import has_snapshot
from lora_trainer.files.atomic import atomic_file, atomic_write_json, cleanup_stale_temporaries

_SAVE = re.compile(r"^step-(\d+)$")
CHECKPOINTS_DIR = "checkpoints"
MANIFEST = "export_manifest.json"
TRAINING_STATE = "training_state"
STATE_MANIFEST = "manifest.json"
STATE_FILE = "rank-{rank:05d}.pt"
ABANDONED = "abandoned"
_PLAIN = (str, int, float, bool, type(None), torch.Tensor, torch.Size, torch.dtype)


def checkpoints_dir(output_dir: str | Path) -> Path:
    """`output_dir/checkpoints`, the parent of every `step-N` save of a run."""
    return Path(output_dir) / CHECKPOINTS_DIR


def save_dir_name(step: int) -> str:
    return f"step-{step}"


def step_of(path: Path) -> int | None:
    """N of a `step-N` directory name, None for any other name."""
    match = _SAVE.match(path.name)
    return int(match.group(1)) if match else None


# ------------------------------------------------------------------------- training state files


def check_plain(value: Any, where: str = "checkpoint") -> None:
    """Raise TypeError naming the first entry of `value` that is not a tensor or plain value
    (what `torch.load(weights_only=True)` reads back)."""
    if isinstance(value, (dict, OrderedDict)):
        for key, item in value.items():
            if not isinstance(key, (str, int)):
                raise TypeError(f"{where} has a key of type {type(key).__name__}: {key!r}")
            check_plain(item, f"{where}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            check_plain(item, f"{where}[{index}]")
    elif not isinstance(value, _PLAIN):
        raise TypeError(
            f"{where} is a {type(value).__module__}.{type(value).__qualname__}: training states "
            "hold only tensors and plain values"
        )


def save_rank_state(state: dict[str, Any], path: Path) -> None:
    """Write one rank's training state (tensors and plain values only) through a temporary file,
    fsynced by this rank before it gets its name (`atomic_file`)."""
    check_plain(state)
    with atomic_file(path) as temporary:
        torch.save(state, temporary)


def load_rank_state(path: Path, mmap: bool = False) -> dict[str, Any]:
    """Read one rank's training state with `weights_only=True`: anything but tensors and plain
    values (a planted pickle) is refused, never executed. `mmap=True` reads only the structure."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        reason = next(
            (line for line in str(exc).splitlines() if "GLOBAL" in line or "Unsupported" in line),
            "",
        )
        raise CheckpointError(
            f"{path} holds objects other than tensors and plain values "
            f"({reason.strip() or 'refused'}); lora_trainer never writes such files, so it was "
            "altered or comes from elsewhere: it was not loaded. Resume from another save"
        ) from None
    except Exception as exc:
        raise CheckpointError(f"{path} cannot be read ({exc}); resume from another save") from exc


def write_state_manifest(
    state_dir: Path, *, step: int, world_size: int, settings: dict[str, Any]
) -> None:
    """List the rank files of `state_dir` with their sizes, and the run's `settings`, in
    `state_dir/manifest.json` (rank 0, once every rank's file is written)."""
    files = {path.name: path.stat().st_size for path in sorted(state_dir.glob("rank-*.pt"))}
    expected = {STATE_FILE.format(rank=rank) for rank in range(world_size)}
    if set(files) != expected:
        raise CheckpointError(
            f"{state_dir} holds {sorted(files)}, not the {world_size} rank files of this run: a "
            "rank failed to write its training state"
        )
    atomic_write_json(
        state_dir / STATE_MANIFEST,
        {
            "format_version": 1,
            "step": step,
            "world_size": world_size,
            "files": files,
            "settings": settings,
        },
    )


def read_state_manifest(save: Path) -> dict[str, Any]:
    path = save / TRAINING_STATE / STATE_MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(
            f"{path} is missing (the save is incomplete, or was written by an older lora_trainer)"
        ) from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path} cannot be read ({exc})") from exc
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise CheckpointError(f"{path} does not list the rank files")
    return manifest


# ------------------------------------------------------------------------------- intact saves


def _size_problems(directory: Path, sizes: dict[str, int]) -> list[str]:
    problems = []
    for name, size in sizes.items():
        file = directory / name
        if not file.is_file():
            problems.append(f"{file.relative_to(directory.parent)} is missing")
        elif file.stat().st_size != size:
            problems.append(
                f"{file.relative_to(directory.parent)} has {file.stat().st_size} bytes, not {size}"
            )
    return problems


def save_problems(save: Path) -> list[str]:
    """What is wrong with the save `save` (empty for an intact save): a manifest missing or
    unreadable, a file it lists missing, a size that differs."""
    try:
        state = read_state_manifest(save)
    except CheckpointError as err:
        return [str(err)]
    problems = _size_problems(save / TRAINING_STATE, state["files"])
    try:
        export = json.loads((save / MANIFEST).read_text())
        listed, totals = export["files"], export["sizes_bytes"]
    except FileNotFoundError:
        return problems if has_snapshot(save) else [*problems, f"{MANIFEST} is missing"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return [*problems, f"{MANIFEST} cannot be read ({exc})"]
    for directory, files in listed.items():
        missing = [name for name in files if not (save / directory / name).is_file()]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            problems.append(f"{directory}/{missing[0]} is missing{more}")
            continue
        size = sum((save / directory / name).stat().st_size for name in files)
        if size != totals.get(directory):
            problems.append(
                f"{directory}/ holds {size} bytes, its manifest says {totals.get(directory)}"
            )
    return problems


def is_complete_save(path: Path) -> bool:
    """A `step-N` directory whose manifests' files are all there with their sizes."""
    return step_of(path) is not None and path.is_dir() and not save_problems(path)


def scan_saves(root: Path) -> tuple[list[Path], dict[Path, list[str]]]:
    """The intact saves under `root` (oldest step first), and the damaged ones with their
    problems."""
    if not root.is_dir():
        return [], {}
    intact, damaged = [], {}
    for path in sorted(
        (p for p in root.iterdir() if p.is_dir() and step_of(p) is not None),
        key=lambda p: step_of(p) or 0,
    ):
        problems = save_problems(path)
        if problems:
            damaged[path] = problems
        else:
            intact.append(path)
    return intact, damaged


def complete_saves(root: Path) -> list[Path]:
    """Intact saves under `root`, oldest step first."""
    return scan_saves(root)[0]


def describe_damaged(damaged: dict[Path, list[str]]) -> str:
    return "; ".join(f"{path.name}: {problems[0]}" for path, problems in damaged.items())


def saves_to_prune(root: Path, keep_last: int, keep: frozenset[Path] = frozenset()) -> list[Path]:
    """The intact saves beyond the newest `keep_last` (at least 1), oldest first, except those in
    `keep` (the save the run resumed from). Damaged saves are neither counted nor removed."""
    intact = complete_saves(root)
    old = intact[: max(0, len(intact) - max(1, keep_last))]
    return [path for path in old if path.resolve() not in {k.resolve() for k in keep}]


# ------------------------------------------------------------------------ leftovers, other lines


def clear_leftovers(root: Path) -> list[str]:
    """Remove what a killed save left under `root`: its temporary directory, and a previous
    `step-N` it had moved aside (renamed back when the kill came between the two renames of a
    re-save), when the process that made them is gone (`cleanup_stale_temporaries`). Call it only
    while holding the output folder's lock. Returns one note per folder handled."""
    return cleanup_stale_temporaries(root)


def set_aside_after(root: Path, step: int) -> tuple[Path, list[Path]] | None:
    """Move every `step-M` save with M > `step` (another line of training than the one starting
    at `step`) into `root/abandoned/<time>-after-step-<step>/`; returns that folder and the moved
    saves, or None when there is nothing after `step`."""
    if not root.is_dir():
        return None
    newer = sorted(
        (p for p in root.iterdir() if p.is_dir() and (step_of(p) or 0) > step),
        key=lambda p: step_of(p) or 0,
    )
    if not newer:
        return None
    name = f"{time.strftime('%Y%m%d-%H%M%S')}-after-step-{step}"
    aside, count = root / ABANDONED / name, 1
    while aside.exists():
        count += 1
        aside = root / ABANDONED / f"{name}-{count}"
    aside.mkdir(parents=True)
    for path in newer:
        path.rename(aside / path.name)
    return aside, newer
