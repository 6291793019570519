"""Which process of a run this is: the one started by the user, or one Lightning relaunched.

With `trainer.devices > 1` and no external launcher, Lightning's subprocess launcher re-runs
`python train.py <same overrides>` for local ranks 1..n-1 with `LOCAL_RANK` set in their
environment (and no `RANK`/`GROUP_RANK`). Those processes must not validate or build anything
again: the process the user started did both before Lightning launched them. Processes started
by torchrun (which sets `GROUP_RANK`) or SLURM's srun (no `LOCAL_RANK`) are each launched
independently, so each validates its own configuration.
"""

from __future__ import annotations

import os
from collections.abc import Mapping


def is_relaunched_rank(environ: Mapping[str, str] = os.environ) -> bool:
    """True in a local-rank process that Lightning's subprocess launcher started."""
    local_rank = environ.get("LOCAL_RANK", "0")
    return local_rank not in ("", "0") and "GROUP_RANK" not in environ


def is_first_process(environ: Mapping[str, str] = os.environ) -> bool:
    """The process of global rank 0 before launch: the one `python train.py` started, or rank 0
    of torchrun (`RANK`) or srun (`SLURM_PROCID`). It takes the output_dir lock and prepares it."""
    return not is_relaunched_rank(environ) and environ.get(
        "RANK", environ.get("SLURM_PROCID", "0")
    ) in ("", "0")
