"""A rank of a 2-rank gloo job that fails the way a training rank can after launch:
`python -m tests.failure_runner RANK PORT OUTPUT_DIR MODE`. MODE `one`: rank 1 raises a
CheckpointError while rank 0 waits in a collective; `all`: both ranks raise it."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from lora_trainer.errors import CheckpointError
from lora_trainer.training.failures import exit_after_launch


def main(rank: int, port: int, output_dir: Path, mode: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        dist.barrier()
        if rank == 1 or mode == "all":
            raise CheckpointError(
                "step-2/training_state/rank-00001.pt cannot be read; resume from another save"
            )
        dist.all_reduce(torch.ones(4))
        dist.barrier()
    except BaseException as error:
        exit_after_launch(error, output_dir)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]), sys.argv[4])
