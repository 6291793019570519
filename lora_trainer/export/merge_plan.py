"""The plan of a merged export: which LoRA delta goes into which base tensor, checked against the
base checkpoint's shard headers before anything is written.

A delta is `scale * b @ a` for one base tensor, in the base's own expert layout: a linear module
targets `<prefix><module>.weight`; a packed expert entry targets the packed parameter
`<prefix>layers.N.mlp.experts.<proj>` when the base has it, else the 2D per-expert weights.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from lora_trainer.bridge.safetensors_io import CheckpointReader
from lora_trainer.errors import ExportError
from lora_trainer.export.hf_adapter_weights import HFAdapter
from lora_trainer.export.peft_adapter import PER_EXPERT_MODULES
from lora_trainer.files.safetensors_header import TensorEntry, read_header

# safetensors dtype names a delta can be added to (quantized weights would need their scales).
MERGEABLE_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
}


@dataclass(frozen=True)
class LowRankDelta:
    """`scale * b @ a` for one base tensor.

    2D: a [r, in], b [out, r], delta [out, in]. 3D (packed experts): a [E, r, in], b [E, out, r],
    delta[e] = scale * b[e] @ a[e]. `source` names the adapter entry, for messages.
    """

    a: Tensor
    b: Tensor
    scale: float
    source: str

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of the delta, which must equal the base tensor's."""
        return (*self.b.shape[:-1], self.a.shape[-1])

    @property
    def matrices(self) -> int:
        """The number of [out, in] matrices: E for packed experts, 1 for a 2D delta."""
        return self.a.shape[0] if self.a.ndim == 3 else 1

    def factors(self, first: int, stop: int) -> tuple[Tensor, Tensor]:
        """fp32 a [M, r, in] and b [M, out, r] of matrices `first:stop` (M = stop - first; views
        when the factors are fp32), unscaled: matrix m's delta is scale * b[m] @ a[m], at rows
        m * out : (m + 1) * out of the base tensor seen as [matrices * out, in]."""
        a, b = (self.a, self.b) if self.a.ndim == 3 else (self.a[None], self.b[None])
        return a[first:stop].float(), b[first:stop].float()


def plan_deltas(adapter: HFAdapter, names: Iterable[str]) -> dict[str, LowRankDelta]:
    """Base tensor name -> its delta, for every adapter module, in the base's own expert layout.

    A linear module `m` targets `<prefix>m.weight`; a packed expert entry targets the packed
    parameter `<prefix>layers.N.mlp.experts.<proj>` when the base has it, else the per-expert
    weights `...experts.{e}.{gate,up,down}_proj.weight` (gate_up rows per expert are [gate; up]).
    Raises ExportError naming every adapter module whose base tensors are missing.
    """
    available = set(names)
    scale = adapter.scale
    plan: dict[str, LowRankDelta] = {}
    missing: list[str] = []

    def add(name: str, delta: LowRankDelta) -> None:
        if name in plan:
            raise ExportError(
                f"adapter modules {plan[name].source!r} and {delta.source!r} both target base "
                f"tensor {name!r}: the adapter has the same module twice"
            )
        plan[name] = delta

    for module, weights in adapter.linears.items():
        name = f"{adapter.text_prefix}{module}.weight"
        if name in available:
            add(name, LowRankDelta(weights.a, weights.b, scale, module))
        else:
            missing.append(f"{module} (no {name})")
    for key, expert_weights in adapter.experts.items():
        packed = adapter.text_prefix + key
        if packed in available:
            add(packed, LowRankDelta(expert_weights.a, expert_weights.b, scale, key))
            continue
        module, _, proj = packed.rpartition(".")
        parts = PER_EXPERT_MODULES.get(proj, ())
        targets = [
            (f"{module}.{expert}.{part}.weight", expert, index)
            for expert in range(expert_weights.a.shape[0])
            for index, part in enumerate(parts)
        ]
        absent = [name for name, _, _ in targets if name not in available]
        if not targets or absent:
            example = absent[0] if absent else f"{module}.0.<proj>.weight"
            missing.append(f"{key} (no {packed}, nor per-expert {example})")
            continue
        for name, expert, index in targets:
            rows = expert_weights.b[expert].chunk(len(parts), dim=0)[index]
            add(name, LowRankDelta(expert_weights.a[expert], rows, scale, key))
    if missing:
        shown = "; ".join(missing[:5]) + (
            f"; ... ({len(missing)} in all)" if len(missing) > 5 else ""
        )
        raise ExportError(
            f"adapter modules without a base tensor: {shown}: the adapter does not belong to this "
            f"base checkpoint (text prefix {adapter.text_prefix!r})"
        )
    return plan


def check_deltas(deltas: Mapping[str, LowRankDelta], entries: Mapping[str, TensorEntry]) -> None:
    """Every delta fits its base tensor's shape, and the base tensor is a float dtype."""
    for name, delta in deltas.items():
        entry = entries.get(name)
        if entry is None:
            raise ExportError(
                f"base tensor {name!r} is in the checkpoint index but in no shard file's header: "
                "the index and the shards do not belong together; download the checkpoint again"
            )
        if entry.shape != delta.shape:
            raise ExportError(
                f"LoRA delta of {delta.source!r} has shape {delta.shape} but base tensor {name!r} "
                f"is {entry.shape}: the adapter does not belong to this base checkpoint"
            )
        if entry.dtype not in MERGEABLE_DTYPES:
            raise ExportError(
                f"base tensor {name!r} is stored as {entry.dtype}: a LoRA delta can only be merged "
                f"into {sorted(MERGEABLE_DTYPES)} weights; merge onto an unquantized base "
                "checkpoint"
            )
        itemsize = MERGEABLE_DTYPES[entry.dtype].itemsize
        if (entry.stop - entry.start) != itemsize * math.prod(entry.shape):
            raise ExportError(
                f"tensor {name!r} of shape {entry.shape} {entry.dtype} has "
                f"{entry.stop - entry.start} bytes in the base file: the base file's header is "
                "inconsistent; download the checkpoint again"
            )


def shard_layouts(base_dir: Path) -> tuple[list[str], dict[Path, list[TensorEntry]]]:
    """The base checkpoint's tensor names and, per shard file (sorted by path), its header."""
    with CheckpointReader(base_dir) as reader:
        names = reader.names()
        shard_paths = sorted({reader.file_of(name) for name in names})
    return names, {path: read_header(path) for path in shard_paths}


def checked_plan(
    adapter: HFAdapter, names: Iterable[str], layouts: Mapping[Path, list[TensorEntry]]
) -> dict[str, LowRankDelta]:
    """`plan_deltas` checked against every shard header (`check_deltas`)."""
    deltas = plan_deltas(adapter, names)
    check_deltas(deltas, {entry.name: entry for entries in layouts.values() for entry in entries})
    return deltas


def shard_modules(
    layout: HFAdapter, base_dir: Path, *, rank: int = 0, world_size: int = 1
) -> set[str]:
    """The adapter modules (keys of `layout.linears` / `layout.experts`) whose deltas go into the
    shard files `rank` writes; checks the whole `layout` (factors may be on the meta device)
    against the whole base first, as `write_merged_checkpoint` does."""
    names, layouts = shard_layouts(Path(base_dir))
    deltas = checked_plan(layout, names, layouts)
    mine = {entry.name for path in list(layouts)[rank::world_size] for entry in layouts[path]}
    return {delta.source for name, delta in deltas.items() if name in mine}
