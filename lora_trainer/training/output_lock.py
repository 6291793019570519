"""The lock a running training holds on its `output_dir`: `OUT/lora_trainer.lock`, a JSON file
naming the host, pid (and the pid's start time) of the process that launched the run.

A second run into the same folder is refused before launch. A lock whose process is gone (same
host, pid not running, or running but started at another time: the pid was reused) is stale: the
new run takes it over and says so. A lock from another host cannot be checked from here: the
message names the host and the file to delete once no run is alive there.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from lora_trainer.errors import ConfigError
from lora_trainer.files.atomic import pid_alive

log = logging.getLogger(__name__)

LOCK_FILE = "lora_trainer.lock"


def _process_start(pid: int) -> str | None:
    """The start time of `pid` in clock ticks since boot (Linux), None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _describe(holder: dict[str, Any]) -> str:
    since = holder.get("started")
    when = (
        time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since))
        if isinstance(since, (int, float))
        else "?"
    )
    return f"host {holder.get('host')}, pid {holder.get('pid')}, since {when}"


class OutputDirLock:
    """`with OutputDirLock(output_dir):` holds the lock for the body (ConfigError when held)."""

    def __init__(self, output_dir: Path) -> None:
        self.path = Path(output_dir) / LOCK_FILE
        pid = os.getpid()
        self.me = {
            "host": socket.gethostname(),
            "pid": pid,
            "pid_start": _process_start(pid),
            "started": time.time(),
        }

    def _stale(self, holder: dict[str, Any]) -> bool:
        if holder.get("host") != self.me["host"]:
            return False
        pid = holder.get("pid")
        if not isinstance(pid, int) or not pid_alive(pid):
            return True
        start = _process_start(pid)
        return start is not None and holder.get("pid_start") not in (None, start)

    def _read(self) -> dict[str, Any] | None:
        try:
            holder = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}
        return holder if isinstance(holder, dict) else {}

    def _write_temporary(self) -> Path:
        fd, name = tempfile.mkstemp(prefix=f".{LOCK_FILE}.", dir=self.path.parent)
        with os.fdopen(fd, "w") as handle:
            json.dump(self.me, handle)
        return Path(name)

    def acquire(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            temporary = self._write_temporary()
        except OSError as err:
            raise ConfigError(
                f"output_dir={self.path.parent} is not writable ({err}): choose another output_dir"
            ) from err
        try:
            for _ in range(3):
                try:
                    os.link(temporary, self.path)
                    return
                except FileExistsError:
                    pass
                holder = self._read()
                if holder is None:
                    continue
                if not holder or self._stale(holder):
                    log.warning(
                        "output_dir=%s: taking over the lock %s of a run that is no longer running "
                        "(%s)",
                        self.path.parent,
                        self.path,
                        _describe(holder) if holder else "unreadable lock file",
                    )
                    os.replace(temporary, self.path)
                    if self._read() == self.me:
                        return
                    temporary = self._write_temporary()
                    continue
                raise ConfigError(
                    f"output_dir={self.path.parent} is in use by a running training "
                    f"({_describe(holder)}): "
                    f"wait for it to end or choose another output_dir (if no run is alive there, "
                    f"delete {self.path})"
                )
            raise ConfigError(
                f"output_dir={self.path.parent}: could not take the lock {self.path}; try again"
            )
        finally:
            temporary.unlink(missing_ok=True)

    def release(self) -> None:
        if self._read() == self.me:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> OutputDirLock:
        self.acquire()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.release()
