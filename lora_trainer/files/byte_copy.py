"""Moving bytes between files at explicit offsets, without going through Python objects.

- `tensor_bytes`: the raw bytes of a tensor as a writable buffer sharing its memory;
- `read_at`: a byte range of a file read into a reused buffer (`os.preadv`; a file that ends
  early raises ExportError, where a memory mapping would die of SIGBUS);
- `write_at`: a buffer written at an offset (`os.pwrite`);
- `copy_range`: a byte range copied from one file to another inside the kernel
  (`os.copy_file_range`; a read and a write through a bounded buffer where the platform or the
  filesystem lacks it), reporting progress.

Every call takes its offsets explicitly, so several threads can write different ranges of one
file at once.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable

import torch
from torch import Tensor

from lora_trainer.errors import ExportError

# Largest single transfer handed to copy_file_range / pwrite, and the buffer of the fallback copy.
COPY_CHUNK = 2**30
FALLBACK_CHUNK = 8 * 2**20
_COPY_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV}


def tensor_bytes(tensor: Tensor) -> memoryview:
    """The raw little-endian bytes of the contiguous CPU tensor `tensor`, sharing its memory."""
    return tensor.reshape(-1).view(torch.uint8).numpy().data


def read_at(fd: int, view: memoryview, offset: int) -> None:
    """Fill `view` with the bytes at `offset` of the file `fd`. Raises ExportError when the file
    ends first."""
    done = 0
    while done < len(view):
        read = os.preadv(fd, [view[done : done + COPY_CHUNK]], offset + done)
        if read == 0:
            raise ExportError(
                f"the base file ended {len(view) - done} bytes early while reading: it is "
                "truncated or was changed during the export"
            )
        done += read


def write_at(fd: int, view: memoryview, offset: int) -> None:
    """Write `view` at `offset` of the file `fd`."""
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
