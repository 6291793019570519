"""The layout of saves on disk: `OUT/checkpoints/step-N/` holding `training_state/` (one file per
rank), `hf_adapter/`, `hf_merged/` and `export_manifest.json`. A save is complete once it carries
its name: it is renamed into place only after everything in it was written."""

from __future__ import annotations

import re
from pathlib import Path

_SAVE = re.compile(r"^step-(\d+)$")
MANIFEST = "export_manifest.json"
TRAINING_STATE = "training_state"


def save_dir_name(step: int) -> str:
    return f"step-{step}"


def is_complete_save(path: Path) -> bool:
    return (
        _SAVE.match(path.name) is not None
        and (path / TRAINING_STATE).is_dir()
        and (path / MANIFEST).is_file()
    )


def complete_saves(root: Path) -> list[Path]:
    """Complete saves under `root`, oldest step first."""
    if not root.is_dir():
        return []
    saves = [p for p in root.iterdir() if p.is_dir() and is_complete_save(p)]
    return sorted(saves, key=lambda p: int(_SAVE.match(p.name).group(1)))
