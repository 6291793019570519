"""The export snapshot of a save: what a background export is made from, without the model.

At a save every rank writes its LoRA factors, already in HF layout (`local_hf_factors`), into
`step-N/export_snapshot/factors-rank-KKKKK.safetensors`, and rank 0 writes `job.json`: the base
checkpoint, the export settings, the adapter's hyperparameters and the check batch. With the
export check on, the snapshot also holds what our model computed in each layer on the check batch
(`trained-layers-stage-KKKKK.safetensors`, `trained_layers.py`). Both are
written before `step-N` gets its name, so a published save always carries a whole snapshot, and
its export can be made later by any process (`python -m lora_trainer.export SAVE_DIR`).

`SnapshotReader` reads it back: the headers of every rank's file give each factor's shape, so a
reader can plan which modules a share of the merged export needs (`meta_adapter`) and then load
only those (`load_adapter`). Data-parallel replicas write the same factors; the lowest rank's copy
is read.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lora_trainer.errors import ExportError
from lora_trainer.export.check import CHECK_MEMORY_GB
from lora_trainer.export.hf_lora import HFAdapter, hf_weights_from_factors
from lora_trainer.files.atomic import atomic_file, atomic_write_json, export_error

SNAPSHOT_DIR = "export_snapshot"
JOB_FILE = "job.json"
FACTORS_FILE = "factors-rank-{rank:05d}.safetensors"
_SEPARATOR = "#"

# (HF module path below the text prefix, expert index or None) -> (a [r, in], b [out, r])
Factors = dict[tuple[str, int | None], tuple[torch.Tensor, torch.Tensor]]


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


def write_factors(save_dir: Path, rank: int, factors: Factors) -> Path:
    """This rank's factors (fp32, on CPU) into its snapshot file, flushed to disk."""
    tensors: dict[str, torch.Tensor] = {}
    for (module, expert), (a, b) in factors.items():
        key = _SEPARATOR.join((module, "" if expert is None else str(expert)))
        tensors[f"{key}{_SEPARATOR}a"] = a.detach().to("cpu", torch.float32).contiguous()
        tensors[f"{key}{_SEPARATOR}b"] = b.detach().to("cpu", torch.float32).contiguous()
    path = snapshot_dir(save_dir) / FACTORS_FILE.format(rank=rank)
    with atomic_file(path) as temporary:
        try:
            save_file(tensors, str(temporary))
        except Exception as error:
            raise export_error(path, error) from error
    return path


def _parse(key: str) -> tuple[str, int | None, str]:
    module, expert, factor = key.split(_SEPARATOR)
    return module, (int(expert) if expert else None), factor


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
        # (module, expert) -> (file, shapes of a and b); the lowest rank holding a factor wins.
        self.entries: dict[tuple[str, int | None], tuple[Path, dict[str, tuple[int, ...]]]] = {}
        for path in self.files:
            shapes: dict[tuple[str, int | None], dict[str, tuple[int, ...]]] = defaultdict(dict)
            with safe_open(str(path), framework="pt") as handle:
                keys = handle.keys()  # a safe_open handle is not iterable
                for key in keys:
                    module, expert, factor = _parse(key)
                    shapes[(module, expert)][factor] = tuple(handle.get_slice(key).get_shape())
            for entry, factor_shapes in shapes.items():
                self.entries.setdefault(entry, (path, factor_shapes))

    def meta_adapter(self) -> HFAdapter:
        """The whole adapter with meta tensors: shapes only, nothing read."""
        factors = {
            entry: (
                torch.empty(shapes["a"], device="meta"),
                torch.empty(shapes["b"], device="meta"),
            )
            for entry, (_, shapes) in self.entries.items()
        }
        return self._adapter(factors)

    def load_adapter(self, modules: Iterable[str] | None = None) -> HFAdapter:
        """The adapter with the factors of `modules` (HF module paths, or packed expert keys; all
        when None) read from disk."""
        wanted = None if modules is None else set(modules)
        by_file: dict[Path, list[tuple[str, int | None]]] = defaultdict(list)
        for entry, (path, _) in self.entries.items():
            if wanted is None or entry[0] in wanted:
                by_file[path].append(entry)
        factors: Factors = {}
        for path, entries in by_file.items():
            with safe_open(str(path), framework="pt") as handle:
                for module, expert in entries:
                    key = _SEPARATOR.join((module, "" if expert is None else str(expert)))
                    factors[(module, expert)] = (
                        handle.get_tensor(f"{key}{_SEPARATOR}a"),
                        handle.get_tensor(f"{key}{_SEPARATOR}b"),
                    )
        return self._adapter(factors)

    def _adapter(self, factors: Factors) -> HFAdapter:
        """Factors in the layout `gather_hf_adapter` builds: linears by module, experts stacked in
        expert order, both sorted by name."""
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
