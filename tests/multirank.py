"""Run a function on several local ranks, each its own spawned process, and collect the results.

Every rank gets the environment a launcher like torchrun would give it (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR=127.0.0.1, a free MASTER_PORT) plus TORCHDYNAMO_DISABLE=1, set before the
child starts so it holds from the child's first import. The function must live at module level
in an importable module (the spawn start method pickles it by name).
"""

from __future__ import annotations

import contextlib
import multiprocessing.connection
import os
import pickle
import queue
import socket
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import torch.multiprocessing as mp

_POLL_S = 0.2
_GRACE_S = 2.0
_JOIN_S = 5.0


class MultirankError(RuntimeError):
    """A rank failed and its exception could not be sent back as itself."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the duration of the block, then restore the old ones."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


def _worker(fn: Callable[..., Any], rank: int, world_size: int, args: tuple, results: Any) -> None:
    """Child entry point: run `fn` and send back ("ok", pickled result) or ("error", ...)."""
    try:
        payload = pickle.dumps(fn(rank, world_size, *args))
    except BaseException as exc:
        text = traceback.format_exc()
        try:
            exc_bytes: bytes | None = pickle.dumps(exc)
        except Exception:
            exc_bytes = None
        results.put((rank, "error", exc_bytes, text))
    else:
        results.put((rank, "ok", payload, ""))


def _raise_rank_error(rank: int, exc_bytes: bytes | None, text: str) -> None:
    """Re-raise a rank's exception in the parent, with the rank's traceback text attached."""
    note = f"rank {rank} failed; its traceback:\n{text}"
    exc: BaseException | None = None
    if exc_bytes is not None:
        with contextlib.suppress(Exception):
            exc = pickle.loads(exc_bytes)
    if isinstance(exc, BaseException):
        exc.add_note(note)
        raise exc
    raise MultirankError(note)


def _stop(procs: list[mp.Process]) -> None:
    """Terminate (then kill) every child still alive and reap them all."""
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
    multiprocessing.connection.wait([p.sentinel for p in procs], timeout=_JOIN_S)
    for proc in procs:
        if proc.is_alive():
            proc.kill()
        proc.join()


def run_multirank(
    fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 120.0
) -> list[Any]:
    """Run `fn(rank, world_size, *args)` on `world_size` spawned processes; return results by rank.

    The first rank to fail has its exception re-raised here (as `MultirankError` if the exception
    cannot be pickled), with that rank's traceback text as a note; the other ranks are then
    terminated, since they may be blocked in a collective. A rank that dies without reporting,
    or a run that exceeds `timeout` seconds, raises `MultirankError`/`TimeoutError`.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = str(free_port())
    procs: list[mp.Process] = []
    try:
        for rank in range(world_size):
            env = {
                "RANK": str(rank),
                "LOCAL_RANK": str(rank),
                "WORLD_SIZE": str(world_size),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": port,
                "TORCHDYNAMO_DISABLE": "1",
            }
            proc = ctx.Process(target=_worker, args=(fn, rank, world_size, args, results))
            with _environ(env):
                proc.start()
            procs.append(proc)
        return _collect(procs, results, time.monotonic() + timeout, timeout)
    finally:
        _stop(procs)
        results.close()


def _next_report(
    procs: list[mp.Process], results: Any, done: dict[int, Any], deadline: float, timeout: float
) -> tuple[int, str, bytes | None, str]:
    """The next rank's report; raises when a rank died without one or the deadline passed."""
    while True:
        try:
            return results.get(timeout=_POLL_S)
        except queue.Empty:
            pass
        dead = {r: p.exitcode for r, p in enumerate(procs) if r not in done and not p.is_alive()}
        if dead:
            # A rank that exits flushes its report first; allow for the pipe's delay once.
            try:
                return results.get(timeout=_GRACE_S)
            except queue.Empty:
                raise MultirankError(
                    f"ranks exited without reporting (rank: exit code) {dead}"
                ) from None
        if time.monotonic() > deadline:
            missing = sorted(set(range(len(procs))) - set(done))
            raise TimeoutError(f"ranks {missing} did not finish within {timeout} s")


def _collect(procs: list[mp.Process], results: Any, deadline: float, timeout: float) -> list[Any]:
    """Every rank's result in rank order, failing fast on the first error, death or the deadline."""
    done: dict[int, Any] = {}
    while len(done) < len(procs):
        rank, status, payload, text = _next_report(procs, results, done, deadline, timeout)
        if status == "error":
            _raise_rank_error(rank, payload, text)
        done[rank] = pickle.loads(payload)
    return [done[rank] for rank in range(len(procs))]
