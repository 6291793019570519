"""The export snapshot of a save: what a background export is made from, without the model.

At a save every rank writes its LoRA factors, already in HF layout (`local_hf_factors`), into
`step-N/export_snapshot/factors-rank-KKKKK.safetensors` (with, in the file's metadata, which of
them have a non-zero lora_B), and rank 0 writes `job.json`: the base checkpoint, the export
settings, the adapter's hyperparameters and the check batch. With the export check on, the
snapshot also holds what our model computed in each layer on the check batch
(`trained-layers-stage-KKKKK.safetensors`, `trained_layers.py`). All are written before `step-N`
gets its name, so a published save always carries a whole snapshot, and its export can be made
later by any process (`python -m lora_trainer.export SAVE_DIR`).

`SnapshotReader` reads it back without loading the adapter: the headers of every rank's file give
each factor's shape and place (`meta_adapter`: the whole layout on the meta device) and the
non-zero flags (`nonzero_lora_b`); `distributed_adapter` gives an export worker its share, the
factors of some snapshot files, each pair read from disk only when the writer looks it up.
Data-parallel replicas may write the same factors; the lowest rank's copy is read.
"""

from __future__ import annotations

import json
import math
import struct
import time
from collections import defaultdict
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from io import FileIO
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from lora_trainer.errors import ExportError
from lora_trainer.export.check import CHECK_MEMORY_GB
from lora_trainer.export.hf_adapter_weights import (
    DistributedAdapter,
    HFAdapter,
    LocalFactors,
    hf_weights_from_factors,
)
from lora_trainer.files.atomic import atomic_file, atomic_write_json, export_error

SNAPSHOT_DIR = "export_snapshot"
JOB_FILE = "job.json"
FACTORS_FILE = "factors-rank-{rank:05d}.safetensors"
# Metadata key of a factors file: the JSON list of its entries (`module#expert`, expert empty for a
# linear module) whose lora_B is not all zero.
NONZERO_METADATA = "lora_b_nonzero"
_SEPARATOR = "#"
_F32 = 4


@dataclass(frozen=True)
class ExportJob:
    """What to export from a snapshot, written by rank 0 at the save."""

    step: int
    base_dir: str
    snapshot_ranks: int
    write_adapter: bool
    write_merged: bool
    profile: str
    check_input_ids: list[list[int]] | None
    r: int
    alpha: float
    use_rslora: bool
    text_prefix: str
    saved_at: float
    check_memory_gb: float = CHECK_MEMORY_GB
    # Whether the snapshot holds our model's records of the check batch (`trained_layers`).
    trained_layers: bool = False

    def check_tensor(self) -> torch.Tensor | None:
        return (
            None
            if self.check_input_ids is None
            else torch.tensor(self.check_input_ids, dtype=torch.long)
        )


def snapshot_dir(save_dir: Path) -> Path:
    return Path(save_dir) / SNAPSHOT_DIR


def has_snapshot(save_dir: Path) -> bool:
    return (snapshot_dir(save_dir) / JOB_FILE).is_file()


def write_job(save_dir: Path, **fields: Any) -> ExportJob:
    """Write `job.json` of the snapshot in `save_dir` (fields of ExportJob but `saved_at`)."""
    job = ExportJob(**fields, saved_at=time.time())
    atomic_write_json(snapshot_dir(save_dir) / JOB_FILE, asdict(job))
    return job


def read_job(save_dir: Path) -> ExportJob:
    path = snapshot_dir(save_dir) / JOB_FILE
    try:
        return ExportJob(**json.loads(path.read_text()))
    except FileNotFoundError as error:
        raise ExportError(
            f"{save_dir} has no export snapshot ({SNAPSHOT_DIR}/{JOB_FILE}): its export was "
            "finished (see export_manifest.json) or it was not saved by lora_trainer; pass another "
            "save"
        ) from error
    except (OSError, ValueError, TypeError) as error:
        raise ExportError(
            f"{path} cannot be read ({error}): the snapshot is damaged; export another save"
        ) from error


def write_factors(save_dir: Path, rank: int, factors: LocalFactors) -> Path:
    """This rank's factors (fp32, on CPU) into its snapshot file, flushed to disk; the file's
    metadata lists the factors whose lora_B is not all zero (`NONZERO_METADATA`)."""
    tensors: dict[str, torch.Tensor] = {}
    nonzero: list[str] = []
    for (module, expert), (a, b) in factors.items():
        key = _entry_key(module, expert)
        tensors[f"{key}{_SEPARATOR}a"] = a.detach().to("cpu", torch.float32).contiguous()
        tensors[f"{key}{_SEPARATOR}b"] = b.detach().to("cpu", torch.float32).contiguous()
        if bool(tensors[f"{key}{_SEPARATOR}b"].any()):
            nonzero.append(key)
    path = snapshot_dir(save_dir) / FACTORS_FILE.format(rank=rank)
    with atomic_file(path) as temporary:
        try:
            save_file(
                tensors, str(temporary), metadata={NONZERO_METADATA: json.dumps(sorted(nonzero))}
            )
        except Exception as error:
            raise export_error(path, error) from error
    return path


def _entry_key(module: str, expert: int | None) -> str:
    return _SEPARATOR.join((module, "" if expert is None else str(expert)))


def _parse(key: str) -> tuple[str, int | None, str]:
    module, expert, factor = key.split(_SEPARATOR)
    return module, (int(expert) if expert else None), factor


@dataclass(frozen=True)
class _Stored:
    """One fp32 tensor of a snapshot file: its shape and absolute byte offset."""

    shape: tuple[int, ...]
    offset: int


@dataclass(frozen=True)
class _Entry:
    """Where the factors of one linear module or one expert are, and whether its lora_B is
    non-zero (None: not recorded, a snapshot written before the flags were)."""

    path: Path
    a: _Stored
    b: _Stored
    b_nonzero: bool | None


class SnapshotReader:
    """Every rank's snapshot file of a save: which factors there are, their shapes, their values."""

    def __init__(self, save_dir: Path, job: ExportJob) -> None:
        self.job = job
        self.files = [
            snapshot_dir(save_dir) / FACTORS_FILE.format(rank=rank)
            for rank in range(job.snapshot_ranks)
        ]
        missing = [path.name for path in self.files if not path.is_file()]
        if missing:
            raise ExportError(
                f"the export snapshot of {save_dir} lacks {', '.join(missing[:3])}: the save is "
                "damaged; export another save"
            )
        # (module, expert) -> its entry; the lowest rank holding a factor wins.
        self.entries: dict[tuple[str, int | None], _Entry] = {}
        for path in self.files:
            for key, entry in _read_entries(path).items():
                self.entries.setdefault(key, entry)

    def meta_adapter(self) -> HFAdapter:
        """The whole adapter with meta tensors: shapes only, nothing read."""
        factors = {
            entry: (
                torch.empty(stored.a.shape, device="meta"),
                torch.empty(stored.b.shape, device="meta"),
            )
            for entry, stored in self.entries.items()
        }
        linears, experts = hf_weights_from_factors(factors)
        job = self.job
        return HFAdapter(
            linears=linears,
            experts=experts,
            r=job.r,
            alpha=job.alpha,
            use_rslora=job.use_rslora,
            text_prefix=job.text_prefix,
            base_model_name_or_path=job.base_dir,
        )

    def nonzero_lora_b(self) -> int:
        """How many lora_B of the adapter (one per linear module, one per packed expert
        projection) are not all zero: from the flags each rank recorded at the save, else (a
        snapshot written before them) read one lora_B at a time."""
        modules: set[str] = set()
        for (module, _), entry in self.entries.items():
            if module in modules:
                continue
            nonzero = entry.b_nonzero
            if nonzero is None:
                nonzero = bool(_read(entry.path, entry.b)[0].any())
            if nonzero:
                modules.add(module)
        return len(modules)

    def distributed_adapter(self, rank: int = 0, world_size: int = 1) -> DistributedAdapter:
        """Export worker `rank` of `world_size`'s part of the adapter: the whole layout (shapes
        only), as its local factors those of the snapshot files rank, rank + world_size, ...
        (each pair read from disk when looked up, nothing kept), and the count of non-zero lora_B.
        No factor is read here."""
        mine = set(self.files[rank::world_size])
        local = _FactorsOnDisk(
            {key: entry for key, entry in self.entries.items() if entry.path in mine}
        )
        return DistributedAdapter(self.meta_adapter(), local, self.nonzero_lora_b())


class _FactorsOnDisk(Mapping[tuple[str, int | None], tuple[torch.Tensor, torch.Tensor]]):
    """Factor pairs of a snapshot, each read from its file when looked up and not kept."""

    def __init__(self, entries: dict[tuple[str, int | None], _Entry]) -> None:
        self._entries = entries

    def __getitem__(self, key: tuple[str, int | None]) -> tuple[torch.Tensor, torch.Tensor]:
        entry = self._entries[key]
        a, b = _read(entry.path, entry.a, entry.b)
        return a, b

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __iter__(self) -> Iterator[tuple[str, int | None]]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


def _read_entries(path: Path) -> dict[tuple[str, int | None], _Entry]:
    """The factor pairs of the snapshot file `path` (all fp32), from its header."""
    try:
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        listed = (header.pop("__metadata__", None) or {}).get(NONZERO_METADATA)
        nonzero = None if listed is None else set(json.loads(listed))
        pairs: dict[tuple[str, int | None], dict[str, _Stored]] = defaultdict(dict)
        for key, info in header.items():
            if info["dtype"] != "F32":
                raise ValueError(f"{key} is {info['dtype']}, not F32")
            module, expert, factor = _parse(key)
            offset = 8 + length + info["data_offsets"][0]
            pairs[(module, expert)][factor] = _Stored(tuple(info["shape"]), offset)
        return {
            (module, expert): _Entry(
                path,
                pair["a"],
                pair["b"],
                None if nonzero is None else _entry_key(module, expert) in nonzero,
            )
            for (module, expert), pair in pairs.items()
        }
    except (OSError, ValueError, KeyError, TypeError, struct.error) as error:
        raise _damaged(path, error) from error


def _read(path: Path, *stored: _Stored) -> list[torch.Tensor]:
    """The fp32 tensors `stored` of the snapshot file `path`, each in memory of its own."""
    try:
        with open(path, "rb", buffering=0) as handle:
            return [_read_tensor(handle, path, tensor) for tensor in stored]
    except OSError as error:
        raise _damaged(path, error) from error


def _read_tensor(handle: FileIO, path: Path, stored: _Stored) -> torch.Tensor:
    """The fp32 tensor `stored` of the open snapshot file `path`."""
    buffer = bytearray(math.prod(stored.shape) * _F32)
    view = memoryview(buffer)
    handle.seek(stored.offset)
    done = 0
    while done < len(buffer):
        count = handle.readinto(view[done:])
        if not count:
            raise _damaged(path, ValueError(f"the file ends {len(buffer) - done} bytes early"))
        done += count
    return torch.frombuffer(buffer, dtype=torch.float32).view(stored.shape)


def _damaged(path: Path, cause: BaseException) -> ExportError:
    return ExportError(
        f"the export snapshot file {path} cannot be read ({cause}): the save is damaged; export "
        "another save"
    )
