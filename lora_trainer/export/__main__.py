"""`python -m lora_trainer.export SAVE_DIR`: make the missing HF export of one save (a run killed
or stopped while its export ran in the background) from the save's snapshot, without training.

Training runs also start this module once per rank with `--rank K --world-size W` as their
background export workers (`background.py`); a worker leaves the reporting of a failure to the
training process that started it.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from lora_trainer.errors import LoraTrainerError
from lora_trainer.export.background import complete_export, run_export_share


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lora_trainer.export", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("save_dir", type=Path, help="a save: OUT/checkpoints/step-N")
    parser.add_argument("--rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--world-size", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--parent-pid", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    worker = args.rank is not None
    logging.basicConfig(
        level=logging.INFO if not worker or args.rank == 0 else logging.WARNING,
        format="[%(asctime)s][export][%(levelname)s] - %(message)s",
    )
    try:
        if worker:
            run_export_share(args.save_dir, args.rank, args.world_size, args.parent_pid)
        else:
            complete_export(args.save_dir)
    except LoraTrainerError as error:
        if not worker:
            print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
