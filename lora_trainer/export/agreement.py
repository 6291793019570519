"""Every rank agrees on an export's failure: one rank reports the cause, every rank stops.

After a collective step (the HF export, its check) each rank passes its own failure or None to
`raise_on_every_rank`; it exchanges only the failures' messages (one small object per rank), so
every rank returns together, or raises together: the rank of the first root failure (one that is
not a `PeerExportError`, by rank order) raises an `ExportError` with its message, every other rank
a `PeerExportError` that callers stop on without printing anything.
"""

from __future__ import annotations

import torch.distributed as dist

from lora_trainer.errors import ExportError, PeerExportError
from lora_trainer.parallel.collectives import all_gather_objects

# (message, is a consequence of another rank's failure) or None
_Report = tuple[str, bool] | None


def raise_on_every_rank(failure: BaseException | None) -> None:
    """Collective over the default group (a no-op agreement on one process): returns on every
    rank when no rank failed, else raises on every rank (module docstring)."""
    report: _Report = (
        None if failure is None else (_message(failure), isinstance(failure, PeerExportError))
    )
    reports = all_gather_objects(report)
    rank = dist.get_rank() if len(reports) > 1 else 0
    failed = [(index, item) for index, item in enumerate(reports) if item is not None]
    if not failed:
        return
    roots = [(index, item) for index, item in failed if not item[1]] or failed
    source, (message, _) = roots[0]
    if rank != source:
        raise PeerExportError(f"stopping: rank {source}'s export failed: {message}")
    if isinstance(failure, ExportError) and not isinstance(failure, PeerExportError):
        raise failure
    raise ExportError(message) from failure


def _message(failure: BaseException) -> str:
    text = str(failure)
    return text if isinstance(failure, ExportError) else f"{type(failure).__name__}: {text}"
