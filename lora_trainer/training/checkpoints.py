"""The layout of saves on disk: `OUT/checkpoints/step-N/` holding `training_state/` (one file per
rank), `hf_adapter/`, `hf_merged/` and `export_manifest.json`. A save is complete once it carries
its name: it is renamed into place only after everything in it was written. A save whose export
runs (or was killed) in the background is complete too: it holds `training_state/` and the export
snapshot, from which its export is completed (`lora_trainer.export.background`)."""

from __future__ import annotations

import re
from pathlib import Path

from lora_trainer.export.snapshot import has_snapshot

_SAVE = re.compile(r"^step-(\d+)$")
MANIFEST = "export_manifest.json"
TRAINING_STATE = "training_state"


def save_dir_name(step: int) -> str:
    return f"step-{step}"


def is_complete_save(path: Path) -> bool:
    return (
        _SAVE.match(path.name) is not None
        and (path / TRAINING_STATE).is_dir()
        and ((path / MANIFEST).is_file() or has_snapshot(path))
    )


def save_step(path: Path) -> int:
    """N of a `step-N` save directory."""
    match = _SAVE.match(Path(path).name)
    if match is None:
        raise ValueError(f"{path} is not a step-N save directory")
    return int(match.group(1))


def complete_saves(root: Path) -> list[Path]:
    """Complete saves under `root`, oldest step first."""
    if not root.is_dir():
        return []
    saves = [p for p in root.iterdir() if p.is_dir() and is_complete_save(p)]
    return sorted(saves, key=lambda p: int(_SAVE.match(p.name).group(1)))
