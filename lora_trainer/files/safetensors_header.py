"""The header of a safetensors file: each tensor's name, dtype, shape and absolute byte range.

A safetensors file is an 8-byte little-endian header length, a JSON header mapping tensor names
to `{"dtype", "shape", "data_offsets"}` (offsets relative to the end of the header, plus an
optional `__metadata__` entry), then the tensor bytes. `read_header` reads only the header and
checks that every byte range lies inside the file, so the ranges can be read or mapped as they are.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from lora_trainer.errors import CheckpointError


@dataclass(frozen=True)
class TensorEntry:
    """One tensor in a safetensors file: its stored dtype name, shape and absolute byte range."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    stop: int


def read_header(path: Path) -> list[TensorEntry]:
    """The tensors of the safetensors file `path` from its header, in file order.

    Raises CheckpointError when the header cannot be read or parsed, or names a byte range
    outside the file (a truncated or corrupt file).
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if 8 + length > size:
                raise ValueError(f"header length {length} exceeds the file size {size}")
            header = json.loads(handle.read(length))
        data_start = 8 + length
        entries = [
            TensorEntry(
                name,
                info["dtype"],
                tuple(info["shape"]),
                data_start + info["data_offsets"][0],
                data_start + info["data_offsets"][1],
            )
            for name, info in header.items()
            if name != "__metadata__"
        ]
    except (OSError, ValueError, KeyError, TypeError, IndexError, struct.error) as error:
        raise CheckpointError(
            f"cannot read the safetensors header of {path}: {error}: the file is truncated or "
            "corrupt; download it again"
        ) from error
    for entry in entries:
        if not data_start <= entry.start <= entry.stop <= size:
            raise CheckpointError(
                f"tensor {entry.name!r} in {path} has bytes {entry.start}:{entry.stop} outside the "
                f"file ({size} bytes): the file is truncated or corrupt; download it again"
            )
    return sorted(entries, key=lambda entry: entry.start)
