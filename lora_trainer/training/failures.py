"""One `error:` line for a failed run, however many ranks it has.

Before launch the process prints `error: ...` and exits (2 for bad input). Once ranks run, the
first rank to fail claims the marker file `OUT/.lora_trainer.failed` (created whole, with the exit
code, or not at all), prints its line and exits at once; a rank that fails because another one is
gone (a collective to a dead peer) waits a few seconds for that marker and exits with its code
without a word, so several ranks hitting the same error still print one line. Exit codes: 2 for a
`LoraTrainerError` (bad input, unusable files), 1 for anything else. `HYDRA_FULL_ERROR=1` adds
the traceback.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from pathlib import Path
from typing import NoReturn

from lora_trainer.errors import LoraTrainerError, PeerExportError

MARKER = ".lora_trainer.failed"
PEER_WAIT_S = 10.0
_PEER_GONE = (
    "Connection closed by peer",
    "Connection reset by peer",
    "Broken pipe",
    "Connection refused",
)


def exit_code(error: BaseException) -> int:
    return 2 if isinstance(error, LoraTrainerError) else 1


def describe(error: BaseException) -> str:
    if isinstance(error, LoraTrainerError):
        return f"error: {error}"
    hint = "" if _full_error() else " (set HYDRA_FULL_ERROR=1 for the traceback)"
    return f"error: {type(error).__name__}: {error}{hint}"


def _full_error() -> bool:
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


def clear_marker(output_dir: Path) -> None:
    """Remove a previous run's marker (the launching process, holding the output_dir lock)."""
    (output_dir / MARKER).unlink(missing_ok=True)


def _peer_gone(error: BaseException) -> bool:
    import torch.distributed as dist  # not at the top: train.py refuses a bad command line first

    return isinstance(error, (dist.DistError, PeerExportError)) or any(
        text in str(error) for text in _PEER_GONE
    )


def _claim(marker: Path, code: int) -> bool:
    """Create `marker` holding `code`, whole, unless it exists (the link makes it atomic)."""
    temporary = marker.with_name(f"{marker.name}.{os.getpid()}")
    try:
        temporary.write_text(str(code))
        os.link(temporary, marker)
    except FileExistsError:
        return False
    except OSError:
        return True
    finally:
        temporary.unlink(missing_ok=True)
    return True


def _claimed_code(marker: Path) -> int | None:
    try:
        return int(marker.read_text())
    except (OSError, ValueError):
        return None


def _finish(code: int) -> NoReturn:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def exit_before_launch(error: BaseException) -> NoReturn:
    if _full_error():
        traceback.print_exception(error)
    print(describe(error), file=sys.stderr)
    sys.exit(exit_code(error))


def exit_after_launch(error: BaseException, output_dir: Path) -> NoReturn:
    """End this rank for `error`, printing the run's one error line if no rank did yet."""
    marker = output_dir / MARKER
    code = exit_code(error)
    if _peer_gone(error):
        deadline = time.monotonic() + PEER_WAIT_S
        while time.monotonic() < deadline:
            claimed = _claimed_code(marker)
            if claimed is not None:
                _finish(claimed)
            time.sleep(0.1)
    if _claim(marker, code):
        if _full_error():
            traceback.print_exception(error)
        import torch.distributed as dist

        rank = f"rank {dist.get_rank()}: " if dist.is_initialized() else ""
        line = describe(error)
        print(f"error: {rank}{line.removeprefix('error: ')}", file=sys.stderr)
        _finish(code)
    _finish(_claimed_code(marker) or code)
