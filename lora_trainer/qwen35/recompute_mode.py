"""The recompute modes (`model.recompute`), apart from their torch implementation in
`recompute.py`, so the run configuration names them without importing torch."""

from __future__ import annotations

from enum import StrEnum


class Recompute(StrEnum):
    """`model.recompute`: which activations the decoder layers keep for backward."""

    none = "none"
    selective = "selective"
    full = "full"
