"""A failed export step on any rank stops every rank together: the rank of the root failure raises
its ExportError, every other rank a PeerExportError (which train.py exits on silently)."""

from __future__ import annotations

import pytest
import torch.distributed as dist

from lora_trainer.errors import ExportError, PeerExportError
from lora_trainer.export.agreement import raise_on_every_rank
from tests.multirank import run_multirank

CASES = {
    "none": {},
    "rank 1 fails": {1: ExportError("disk full while writing shard 2")},
    "root on rank 1, peer on rank 0": {
        0: PeerExportError("merged shard files missing"),
        1: OSError("No space left on device"),
    },
    "two roots": {0: ExportError("check failed"), 1: ExportError("disk full")},
}


def _agree(rank: int, world_size: int) -> dict[str, tuple[str, str] | None]:
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    outcomes: dict[str, tuple[str, str] | None] = {}
    for case, failures in CASES.items():
        try:
            raise_on_every_rank(failures.get(rank))
            outcomes[case] = None
        except ExportError as error:
            outcomes[case] = (type(error).__name__, str(error))
    dist.destroy_process_group()
    return outcomes


def test_every_rank_stops_and_one_reports_the_cause() -> None:
    rank0, rank1 = run_multirank(_agree, 2, timeout=60.0)

    assert rank0["none"] is None and rank1["none"] is None
    assert rank1["rank 1 fails"] == ("ExportError", "disk full while writing shard 2")
    assert rank0["rank 1 fails"] == (
        "PeerExportError",
        "stopping: rank 1's export failed: disk full while writing shard 2",
    )
    assert rank1["root on rank 1, peer on rank 0"] == (
        "ExportError",
        "OSError: No space left on device",
    )
    assert rank0["root on rank 1, peer on rank 0"][0] == "PeerExportError"
    assert rank0["two roots"] == ("ExportError", "check failed")
    assert rank1["two roots"][0] == "PeerExportError"


def test_one_process_raises_its_own_error() -> None:
    raise_on_every_rank(None)
    with pytest.raises(ExportError, match=r"^ValueError: bad shape$") as raised:
        raise_on_every_rank(ValueError("bad shape"))
    assert not isinstance(raised.value, PeerExportError)
