"""Moving bytes between files at explicit offsets, without going through Python objects.

- `map_range`: a byte range of a file as a uint8 tensor backed by a private memory mapping (no
  read into a buffer; the pages come from the page cache as they are touched);
- `write_at`: the raw bytes of a tensor written at an offset (`os.pwrite`);
- `copy_range`: a byte range copied from one file to another inside the kernel
  (`os.copy_file_range`; a read and a write through a bounded buffer where the platform or the
  filesystem lacks it), reporting progress.

Every call takes its offsets explicitly, so several threads can write different ranges of one
file at once.
"""

from __future__ import annotations

import errno
import mmap
import os
from collections.abc import Callable

import torch
from torch import Tensor

from lora_trainer.errors import ExportError

# Largest single transfer handed to copy_file_range / pwrite, and the buffer of the fallback copy.
COPY_CHUNK = 2**30
FALLBACK_CHUNK = 8 * 2**20
_COPY_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV}


def map_range(fd: int, start: int, stop: int) -> Tensor:
    """Bytes `start:stop` of the file `fd` as a uint8 tensor over a private memory mapping.

    The mapping lives as long as the tensor or any view of it. Writes to the tensor would stay
    private to this process; the file is never changed. The range must lie inside the file
    (check it against the file size first: touching a page past the end raises SIGBUS).
    """
    if stop <= start:
        return torch.empty(0, dtype=torch.uint8)
    aligned = start - start % mmap.ALLOCATIONGRANULARITY
    mapping = mmap.mmap(fd, stop - aligned, access=mmap.ACCESS_COPY, offset=aligned)
    return torch.frombuffer(mapping, dtype=torch.uint8, count=stop - start, offset=start - aligned)


def write_at(fd: int, tensor: Tensor, offset: int) -> None:
    """Write the raw little-endian bytes of the contiguous CPU tensor `tensor` at `offset`."""
    view = tensor.reshape(-1).view(torch.uint8).numpy().data
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done : done + COPY_CHUNK], offset + done)


def copy_range(
    src: int,
    dst: int,
    offset: int,
    count: int,
    progress: Callable[[int], object] = lambda _: None,
) -> None:
    """Copy `count` bytes at `offset` of `src` to the same offset of `dst`, calling `progress`
    with the number of bytes of each transfer. Raises ExportError when `src` ends early."""
    while count > 0:
        sent = _transfer(src, dst, offset, min(count, COPY_CHUNK))
        if sent == 0:
            raise ExportError(
                f"the base file ended {count} bytes early while copying: it is truncated"
            )
        offset += sent
        count -= sent
        progress(sent)


def _transfer(src: int, dst: int, offset: int, count: int) -> int:
    """One `os.copy_file_range`, or a read and a write where the platform or filesystem lacks it."""
    if hasattr(os, "copy_file_range"):
        try:
            return os.copy_file_range(src, dst, count, offset, offset)
        except OSError as error:
            if error.errno not in _COPY_UNSUPPORTED:
                raise
    data = os.pread(src, min(count, FALLBACK_CHUNK), offset)
    view = memoryview(data)
    done = 0
    while done < len(view):
        done += os.pwrite(dst, view[done:], offset + done)
    return done
