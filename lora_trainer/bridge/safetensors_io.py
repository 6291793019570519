"""Reading and writing Hugging Face safetensors checkpoints, single-file or sharded.

`CheckpointReader` reads whole tensors or only slices of them (each rank reads the rows it owns,
through `safe_open(...).get_slice`), from `model.safetensors` or from the shards listed in
`model.safetensors.index.json`. `ShardedCheckpointWriter` writes one shard at a time and then the
index, in the layout transformers' `save_pretrained` writes.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import safetensors.torch
import torch
from safetensors import SafetensorError, safe_open

from lora_trainer.errors import CheckpointError
from lora_trainer.files.atomic import atomic_write_json, export_error

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SHARD_METADATA = {"format": "pt"}


def shard_file_names(count: int) -> list[str]:
    """The shard file names transformers uses for `count` shards (`model.safetensors` for one)."""
    if count < 1:
        raise ValueError(f"a checkpoint needs at least one shard, got {count}")
    if count == 1:
        return [SINGLE_FILE]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def _listing(directory: Path) -> str:
    names = sorted(entry.name for entry in directory.iterdir())
    shown = ", ".join(names[:10]) + (f", ... ({len(names)} entries)" if len(names) > 10 else "")
    return shown or "nothing"


def _weight_map_from_index(model_dir: Path) -> dict[str, Path]:
    """Tensor name -> shard path from the index; every shard it names must exist."""
    index_path = model_dir / INDEX_FILE
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise CheckpointError(
            f"{index_path} is not valid JSON ({error}): the file is corrupt or truncated; "
            "download the checkpoint again"
        ) from error
    except (OSError, UnicodeDecodeError) as error:
        raise CheckpointError(f"cannot read {index_path}: {error}") from error
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(name, str) and isinstance(file, str) for name, file in weight_map.items()
    ):
        raise CheckpointError(
            f"{index_path} has no 'weight_map' object mapping tensor names to shard files: "
            "the index is corrupt; download the checkpoint again"
        )
    missing = sorted({file for file in weight_map.values() if not (model_dir / file).is_file()})
    if missing:
        needed = sum(1 for file in weight_map.values() if file in missing)
        raise CheckpointError(
            f"{index_path} names shard file(s) missing from {model_dir}: {', '.join(missing)} "
            f"({needed} tensors): download the missing shards again"
        )
    return {name: model_dir / file for name, file in weight_map.items()}


def _open_shard(path: Path) -> Any:
    """`safe_open` a shard, turning a corrupt or unreadable file into a CheckpointError."""
    try:
        return safe_open(str(path), framework="pt")
    except SafetensorError as error:
        raise CheckpointError(
            f"{path} is not a valid safetensors file ({error}): it is truncated or corrupt; "
            "download it again"
        ) from error
    except OSError as error:
        raise CheckpointError(f"cannot open {path}: {error}") from error


def _contiguous_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor with its own storage holding exactly the elements of `tensor`."""
    return tensor.clone(memory_format=torch.contiguous_format)


class CheckpointReader:
    """Read-only access to the tensors of a Hugging Face model directory.

    Uses `model.safetensors` when present (as transformers does), else
    `model.safetensors.index.json` and its shards. Shards are opened on first use and kept open
    until `close()` (or the end of a `with` block); a closed reader reopens them when used again.
    Every read returns a new contiguous tensor in the stored dtype that owns its memory.
    """

    def __init__(self, model_dir: Path | str) -> None:
        self.model_dir = Path(model_dir)
        self._handles: dict[Path, Any] = {}
        self._weight_map = self._load_weight_map()

    def _load_weight_map(self) -> dict[str, Path]:
        if not self.model_dir.is_dir():
            raise CheckpointError(
                f"model directory {self.model_dir} does not exist or is not a directory: "
                "point the model path at a Hugging Face model directory"
            )
        single = self.model_dir / SINGLE_FILE
        if single.is_file():
            return dict.fromkeys(self._handle(single).keys(), single)
        if (self.model_dir / INDEX_FILE).is_file():
            return _weight_map_from_index(self.model_dir)
        raise CheckpointError(
            f"no {SINGLE_FILE} or {INDEX_FILE} in {self.model_dir} (found: "
            f"{_listing(self.model_dir)}): point the model path at a Hugging Face model directory "
            "saved in safetensors format (for .bin weights, load them with transformers and "
            "save_pretrained them again)"
        )

    def _handle(self, path: Path) -> Any:
        handle = self._handles.get(path)
        if handle is None:
            handle = self._handles[path] = _open_shard(path)
        return handle

    def _slice(self, name: str) -> Any:
        """The lazy safetensors slice of `name`; nothing is read yet."""
        path = self.file_of(name)
        try:
            return self._handle(path).get_slice(name)
        except SafetensorError as error:
            raise CheckpointError(
                f"{self.model_dir / INDEX_FILE} puts tensor {name!r} in {path.name}, which does "
                f"not contain it ({error}): the index and the shards do not belong together; "
                "download the checkpoint again"
            ) from error

    def names(self) -> list[str]:
        """Every tensor name in the checkpoint."""
        return list(self._weight_map)

    def __contains__(self, name: object) -> bool:
        return name in self._weight_map

    def file_of(self, name: str) -> Path:
        """The safetensors file that holds `name`."""
        path = self._weight_map.get(name)
        if path is None:
            close = difflib.get_close_matches(name, self._weight_map, n=3)
            hint = f"; close names: {', '.join(close)}" if close else ""
            raise CheckpointError(
                f"tensor {name!r} is not in the checkpoint {self.model_dir} "
                f"({len(self._weight_map)} tensors){hint}: check that the model directory and "
                "its config.json belong together"
            )
        return path

    def shape(self, name: str) -> tuple[int, ...]:
        """The stored shape of `name`, read from the file header only."""
        return tuple(self._slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        """The stored dtype of `name`, read without loading the tensor."""
        tensor_slice = self._slice(name)
        return (tensor_slice[0:0] if tensor_slice.get_shape() else tensor_slice[...]).dtype

    def read(self, name: str) -> torch.Tensor:
        """The whole tensor `name`."""
        return _contiguous_copy(self._slice(name)[...])

    def read_rows(self, name: str, start: int, stop: int, dim: int = 0) -> torch.Tensor:
        """Indices `start:stop` of `name` along `dim`; only that slice is read from disk."""
        tensor_slice = self._slice(name)
        shape = tuple(tensor_slice.get_shape())
        dim = self._check_range(name, shape, start, stop, dim)
        return _contiguous_copy(tensor_slice[_index(dim, start, stop)])

    def read_blocks(
        self, name: str, ranges: Sequence[tuple[int, int]], dim: int = 0
    ) -> torch.Tensor:
        """The slices `start:stop` of `name` along `dim`, one per range, concatenated along `dim`.

        Only those slices are read from disk; no ranges give a tensor of size 0 along `dim`.
        """
        tensor_slice = self._slice(name)
        shape = tuple(tensor_slice.get_shape())
        if not ranges:
            dim = self._check_range(name, shape, 0, 0, dim)
            return _contiguous_copy(tensor_slice[_index(dim, 0, 0)])
        for start, stop in ranges:
            dim = self._check_range(name, shape, start, stop, dim)
        return torch.cat([tensor_slice[_index(dim, start, stop)] for start, stop in ranges], dim)

    def _check_range(
        self, name: str, shape: tuple[int, ...], start: int, stop: int, dim: int
    ) -> int:
        """Validate `start:stop` along `dim` of `shape`; returns `dim` made non-negative."""
        where = f"tensor {name!r} of shape {shape} in {self.file_of(name)}"
        if not -len(shape) <= dim < len(shape):
            raise CheckpointError(
                f"cannot slice dim {dim} of {where}: it has {len(shape)} dims; the checkpoint "
                "does not match the model config"
            )
        dim %= len(shape)
        if not 0 <= start <= stop <= shape[dim]:
            raise CheckpointError(
                f"slice [{start}:{stop}] along dim {dim} is out of range for {where} "
                f"(size {shape[dim]}): the checkpoint does not match the model config or the "
                "parallel sizes"
            )
        return dim

    def close(self) -> None:
        """Close every open shard."""
        handles, self._handles = self._handles, {}
        for handle in handles.values():
            handle.__exit__(None, None, None)

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def _index(dim: int, start: int, stop: int) -> tuple[slice, ...]:
    return (slice(None),) * dim + (slice(start, stop),)


def _independent(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached contiguous CPU tensors; tensors sharing storage with an earlier one are copied
    (safetensors refuses to save shared storage, e.g. tied embeddings)."""
    seen: set[int] = set()
    out: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        tensor = tensor.detach().to("cpu").contiguous()
        pointer = tensor.untyped_storage().data_ptr()
        if tensor.numel() and pointer in seen:
            tensor = tensor.clone()
        seen.add(pointer)
        out[name] = tensor
    return out


class ShardedCheckpointWriter:
    """Write a checkpoint shard by shard into `directory`, then its index.

    Call `write_shard` once per shard file (only that shard's tensors are held), then `finish`,
    which writes `model.safetensors.index.json` as transformers does unless the checkpoint is the
    single file `model.safetensors`. Write failures raise ExportError naming the file and the fix.
    """

    def __init__(self, directory: Path | str) -> None:
        self.directory = Path(directory)
        self.weight_map: dict[str, str] = {}
        self.total_size = 0
        self.total_parameters = 0
        self._shards: list[str] = []
        self._finished = False
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise export_error(self.directory, error, "creating") from error

    def write_shard(self, file_name: str, tensors: Mapping[str, torch.Tensor]) -> Path:
        """Write `tensors` to the shard `file_name` (a bare `*.safetensors` name); returns it."""
        self._check_shard(file_name, tensors)
        path = self.directory / file_name
        shard = _independent(tensors)
        try:
            safetensors.torch.save_file(shard, str(path), metadata=SHARD_METADATA)
        except (OSError, SafetensorError) as error:
            path.unlink(missing_ok=True)
            raise export_error(path, error) from error
        self._shards.append(file_name)
        for name, tensor in shard.items():
            self.weight_map[name] = file_name
            self.total_size += tensor.numel() * tensor.element_size()
            self.total_parameters += tensor.numel()
        return path

    def _check_shard(self, file_name: str, tensors: Mapping[str, torch.Tensor]) -> None:
        if self._finished:
            raise ValueError("write_shard after finish: the checkpoint is already complete")
        if Path(file_name).name != file_name or not file_name.endswith(".safetensors"):
            raise ValueError(f"shard name {file_name!r} must be a bare '*.safetensors' file name")
        if file_name in self._shards:
            raise ValueError(f"shard {file_name!r} was already written")
        if not tensors:
            raise ValueError(f"shard {file_name!r} has no tensors")
        repeated = sorted(name for name in tensors if name in self.weight_map)
        if repeated:
            raise ValueError(f"tensors already written to other shards: {repeated[:5]}")

    def finish(self, weight_map_order: Sequence[str] | None = None) -> Path | None:
        """Write the index (weight_map sorted by name, or in `weight_map_order`, which must list
        every written tensor once); returns its path, or None for a single `model.safetensors`."""
        if not self._shards:
            raise ValueError("finish before any write_shard: the checkpoint has no tensors")
        if len(self._shards) > 1 and SINGLE_FILE in self._shards:
            raise ValueError(
                f"a sharded checkpoint must not have a shard named {SINGLE_FILE}: transformers "
                "would load it alone; use shard_file_names()"
            )
        order = sorted(self.weight_map) if weight_map_order is None else list(weight_map_order)
        if len(order) != len(self.weight_map) or set(order) != set(self.weight_map):
            raise ValueError("weight_map_order must list every written tensor exactly once")
        self._finished = True
        if self._shards == [SINGLE_FILE]:
            return None
        index_path = self.directory / INDEX_FILE
        index = {
            "metadata": {"total_parameters": self.total_parameters, "total_size": self.total_size},
            "weight_map": {name: self.weight_map[name] for name in order},
        }
        atomic_write_json(index_path, index)
        return index_path
