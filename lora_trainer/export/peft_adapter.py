"""Write an `HFAdapter` as a Hugging Face PEFT LoRA adapter (`adapter_model.safetensors`,
`adapter_config.json`) in the layout peft 0.21 loads with `PeftModel.from_pretrained`.

Linear modules: `base_model.model.<prefix><module>.lora_A.weight` [r, in] and `.lora_B.weight`
[out, r]; `target_modules` lists their leaf names (PEFT matches a list entry only as a whole dotted
suffix of a module path, so `out_proj` never hits the vision tower's `proj`; the tests check this).

Routed experts, two profiles:

- `"peft"`: the `target_parameters` layout of PEFT >= 0.19.1 (and vLLM). Each packed parameter is
  wrapped by a `ParamWrapper`; lora_A is [E·r, in] with row e·r + j (expert-major), lora_B is
  [out, r·E] with column j·E + e (expert index fastest). Both projections of one experts module are
  nested wrappers, see `EXPERT_PROJECTIONS`.
- `"per_expert"`: 2D keys `...mlp.experts.{e}.{gate,up,down}_proj` for engines that want one adapter
  per expert; gate_up is split into its gate and up rows, both with the same lora_A. PEFT itself
  does not load these onto the packed transformers experts.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import save_file
from torch import Tensor

from lora_trainer.export.hf_adapter_weights import (
    FactorMapping,
    HFAdapter,
    HFExpertLoraWeights,
    HFLoraWeights,
)

Profile = Literal["peft", "per_expert"]

WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
KEY_PREFIX = "base_model.model."

# The packed expert parameters in the order `Qwen3_5MoeExperts` registers them. PEFT wraps the
# targeted parameters of one module in this registration order (not the order of
# `target_parameters`), each `ParamWrapper` around the previous one: the first targeted projection
# is innermost, and its keys carry one `base_layer.` per targeted projection after it. With both
# targeted: gate_up_proj -> `experts.base_layer.lora_*`, down_proj -> `experts.lora_*`.
EXPERT_PROJECTIONS = ("gate_up_proj", "down_proj")

# per_expert profile: packed projection -> the per-expert modules its output rows split into, in
# row order and of equal size (gate_up_proj rows per expert are [gate; up]).
PER_EXPERT_MODULES: dict[str, tuple[str, ...]] = {
    "gate_up_proj": ("gate_proj", "up_proj"),
    "down_proj": ("down_proj",),
}


def write_peft_adapter(
    adapter: HFAdapter,
    directory: Path,
    profile: Profile = "peft",
    dtype: torch.dtype = torch.float32,
) -> list[Path]:
    """Write `adapter` into the existing `directory` as a PEFT adapter; returns the files written.

    Tensors are written contiguous and in `dtype`. `profile` picks the routed-expert layout (see
    the module docstring).
    """
    tensors = _linear_tensors(adapter)
    target_modules = {_leaf(path) for path in adapter.linears}
    if profile == "peft":
        tensors.update(_packed_expert_tensors(adapter))
        target_parameters = sorted(f"mlp.experts.{proj}" for proj in _targeted_projections(adapter))
    elif profile == "per_expert":
        tensors.update(_per_expert_tensors(adapter))
        target_modules.update(_per_expert_leaves(adapter))
        target_parameters = []
    else:
        raise ValueError(f"unknown PEFT export profile {profile!r}; use 'peft' or 'per_expert'")

    weights_path = directory / WEIGHTS_FILE
    config_path = directory / CONFIG_FILE
    file_tensors = {key: _for_file(tensor, dtype) for key, tensor in tensors.items()}
    save_file(file_tensors, str(weights_path), metadata={"format": "pt"})
    config = _adapter_config(adapter, sorted(target_modules), target_parameters)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return [weights_path, config_path]


def _linear_tensors(adapter: HFAdapter) -> dict[str, Tensor]:
    """lora_A / lora_B of every linear module, under their PEFT keys."""
    tensors: dict[str, Tensor] = {}
    for path, weights in adapter.linears.items():
        tensors.update(_lora_pair(adapter, path, weights.a, weights.b))
    return tensors


def _packed_expert_tensors(adapter: HFAdapter) -> dict[str, Tensor]:
    """Routed experts in the `target_parameters` layout, nested as PEFT nests the wrappers."""
    targeted = _targeted_projections(adapter)
    tensors: dict[str, Tensor] = {}
    for key, weights in adapter.experts.items():
        module, proj = _split_expert_key(key)
        wrapper = module + ".base_layer" * (len(targeted) - 1 - targeted.index(proj))
        tensors.update(_lora_pair(adapter, wrapper, _pack_a(weights), _pack_b(weights)))
    return tensors


def _per_expert_tensors(adapter: HFAdapter) -> dict[str, Tensor]:
    """Routed experts as 2D per-expert modules; a packed projection's rows are split per module."""
    tensors: dict[str, Tensor] = {}
    for key, weights in adapter.experts.items():
        module, proj = _split_expert_key(key)
        names = PER_EXPERT_MODULES[proj]
        for expert in range(weights.a.shape[0]):
            row_blocks = weights.b[expert].chunk(len(names), dim=0)
            for name, b in zip(names, row_blocks, strict=True):
                tensors.update(
                    _lora_pair(adapter, f"{module}.{expert}.{name}", weights.a[expert], b)
                )
    return tensors


def _pack_a(weights: HFExpertLoraWeights) -> Tensor:
    """[E, r, in] -> [E·r, in], row e·r + j (expert-major)."""
    experts, rank, fan_in = weights.a.shape
    return weights.a.reshape(experts * rank, fan_in)


def _pack_b(weights: HFExpertLoraWeights) -> Tensor:
    """[E, out, r] -> [out, r·E], column j·E + e (expert index fastest)."""
    experts, fan_out, rank = weights.b.shape
    return weights.b.permute(1, 2, 0).reshape(fan_out, rank * experts)


def _lora_pair(adapter: HFAdapter, module: str, a: Tensor, b: Tensor) -> dict[str, Tensor]:
    """The two PEFT keys of one LoRA module (relative to the text prefix) with their tensors."""
    stem = f"{KEY_PREFIX}{adapter.text_prefix}{module}"
    return {f"{stem}.lora_A.weight": a, f"{stem}.lora_B.weight": b}


def _targeted_projections(adapter: HFAdapter) -> list[str]:
    """The packed projections the adapter targets, in PEFT's wrapping order (innermost first)."""
    present = {_split_expert_key(key)[1] for key in adapter.experts}
    return [proj for proj in EXPERT_PROJECTIONS if proj in present]


def _per_expert_leaves(adapter: HFAdapter) -> set[str]:
    """Leaf names of the per-expert modules the per_expert profile writes."""
    return {
        name for key in adapter.experts for name in PER_EXPERT_MODULES[_split_expert_key(key)[1]]
    }


def _split_expert_key(key: str) -> tuple[str, str]:
    """`layers.0.mlp.experts.gate_up_proj` -> (`layers.0.mlp.experts`, `gate_up_proj`)."""
    module, _, proj = key.rpartition(".")
    if proj not in EXPERT_PROJECTIONS or not module.endswith("mlp.experts"):
        raise ValueError(
            f"routed-expert LoRA key {key!r} must be '<layer>.mlp.experts.<projection>' with a "
            f"projection in {EXPERT_PROJECTIONS}"
        )
    return module, proj


def _leaf(path: str) -> str:
    return path.rpartition(".")[2]


def _for_file(tensor: Tensor, dtype: torch.dtype) -> Tensor:
    """A contiguous CPU copy in `dtype` (a copy, so no two file tensors share storage)."""
    return (
        tensor.detach().to(device="cpu", dtype=dtype).clone(memory_format=torch.contiguous_format)
    )


def _adapter_config(
    adapter: HFAdapter, target_modules: list[str], target_parameters: list[str]
) -> dict[str, Any]:
    """`adapter_config.json` as peft 0.21 reads it (fields not given take PEFT's defaults)."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": adapter.base_model_name_or_path,
        "r": adapter.r,
        "lora_alpha": int(adapter.alpha) if float(adapter.alpha).is_integer() else adapter.alpha,
        "use_rslora": adapter.use_rslora,
        "target_modules": target_modules,
        "target_parameters": target_parameters or None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
    }


# Distributed writing: every rank writes its own factors into one adapter file whose header every
# rank computes from the layout (all tensors fp32, in safetensors' own order and format).
_F32 = 4


def file_entries(layout: HFAdapter, profile: Profile) -> dict[str, tuple[int, ...]]:
    """Key -> shape of every tensor of the adapter file of `layout` (factors may be on meta)."""
    tensors = _linear_tensors(layout)
    if profile == "peft":
        tensors.update(_packed_expert_tensors(layout))
    elif profile == "per_expert":
        tensors.update(_per_expert_tensors(layout))
    else:
        raise ValueError(f"unknown PEFT export profile {profile!r}; use 'peft' or 'per_expert'")
    return {key: tuple(tensor.shape) for key, tensor in tensors.items()}


def _header(entries: dict[str, tuple[int, ...]]) -> tuple[bytes, dict[str, int]]:
    """The safetensors header bytes (as `save_file` writes them for fp32 tensors) and each key's
    absolute data offset."""
    described: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offsets: dict[str, int] = {}
    cursor = 0
    for key in sorted(entries):
        size = math.prod(entries[key]) * _F32
        described[key] = {
            "dtype": "F32",
            "shape": list(entries[key]),
            "data_offsets": [cursor, cursor + size],
        }
        offsets[key] = cursor
        cursor += size
    text = json.dumps(described, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    start = 8 + len(text)
    return struct.pack("<Q", len(text)) + text, {
        key: start + offset for key, offset in offsets.items()
    }


def create_adapter_file(directory: Path, layout: HFAdapter, profile: Profile) -> Path:
    """Write `adapter_config.json` and the adapter file's header into `directory`, the file at its
    full size (data still zero); every rank then writes its factors with `write_local_factors`."""
    entries = file_entries(layout, profile)
    header, offsets = _header(entries)
    path = directory / WEIGHTS_FILE
    end = max(
        (offsets[key] + math.prod(shape) * _F32 for key, shape in entries.items()),
        default=len(header),
    )
    with open(path, "wb") as handle:
        handle.write(header)
        handle.truncate(end)
    target_modules = {_leaf(module) for module in layout.linears}
    target_parameters: list[str] = []
    if profile == "peft":
        target_parameters = sorted(f"mlp.experts.{proj}" for proj in _targeted_projections(layout))
    else:
        target_modules.update(_per_expert_leaves(layout))
    config = _adapter_config(layout, sorted(target_modules), target_parameters)
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return path


def write_local_factors(
    path: Path, layout: HFAdapter, local: FactorMapping, profile: Profile
) -> None:
    """Write the factors in `local` at their byte ranges of the adapter file `path` (made by
    `create_adapter_file`), looking each pair (a linear module's or one expert's) up once and
    keeping it only until the next lookup, so a `local` that reads from disk on lookup holds at
    most two pairs at a time. Packed expert lora_B columns of consecutive local experts are
    gathered (the run's share of that lora_B, twice: stacked, then transposed) and written
    together: one run of bytes per row and rank index."""
    _, offsets = _header(file_entries(layout, profile))
    fd = os.open(path, os.O_WRONLY)
    try:
        experts: dict[str, list[int]] = {}
        for module, expert in local:
            if expert is None:
                a, b = local[(module, expert)]
                for key, tensor in _lora_pair(layout, module, a, b).items():
                    _pwrite(fd, tensor, offsets[key])
            else:
                experts.setdefault(module, []).append(expert)
        for key, indices in experts.items():
            for run in _runs(sorted(indices)):
                _write_expert_run(fd, layout, key, run, local, offsets, profile)
    finally:
        os.close(fd)


def _runs(indices: list[int]) -> list[list[int]]:
    runs: list[list[int]] = []
    for index in indices:
        if runs and runs[-1][-1] == index - 1:
            runs[-1].append(index)
        else:
            runs.append([index])
    return runs


def _write_expert_run(
    fd: int,
    layout: HFAdapter,
    key: str,
    run: list[int],
    local: FactorMapping,
    offsets: dict[str, int],
    profile: Profile,
) -> None:
    module, proj = _split_expert_key(key)
    if profile == "per_expert":
        names = PER_EXPERT_MODULES[proj]
        for expert in run:
            a, b = local[(key, expert)]
            for name, rows in zip(names, b.chunk(len(names), dim=0), strict=True):
                for file_key, tensor in _lora_pair(
                    layout, f"{module}.{expert}.{name}", a, rows
                ).items():
                    _pwrite(fd, tensor, offsets[file_key])
        return
    targeted = _targeted_projections(layout)
    wrapper = module + ".base_layer" * (len(targeted) - 1 - targeted.index(proj))
    stem = f"{KEY_PREFIX}{layout.text_prefix}{wrapper}"
    experts, rank, fan_in = layout.experts[key].a.shape
    fan_out = layout.experts[key].b.shape[1]
    a_start = offsets[f"{stem}.lora_A.weight"]
    stacked = torch.empty(len(run), fan_out, rank)  # lora_B [n, out, r] of the run's experts
    for index, expert in enumerate(run):
        a, b = local[(key, expert)]
        _pwrite(fd, a, a_start + expert * rank * fan_in * _F32)
        stacked[index] = b
    columns = stacked.permute(1, 2, 0).contiguous()  # [out, r, n]
    start = offsets[f"{stem}.lora_B.weight"]
    if len(run) == experts:
        _pwrite(fd, columns, start)
        return
    for row in range(fan_out):
        for j in range(rank):
            _pwrite(fd, columns[row, j], start + ((row * rank + j) * experts + run[0]) * _F32)


def _pwrite(fd: int, tensor: Tensor, offset: int) -> None:
    view = (
        tensor.detach().to(device="cpu", dtype=torch.float32).contiguous().reshape(-1).numpy()
    ).data.cast("B")
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


def read_adapter_modules(
    path: Path, layout: HFAdapter, profile: Profile, modules: set[str]
) -> HFAdapter:
    """The adapter restricted to `modules` (keys of `layout.linears` / `layout.experts`), read back
    from the adapter file `path` in `profile`'s layout: exactly the factors that were written."""
    from safetensors import safe_open

    linears: dict[str, HFLoraWeights] = {}
    experts: dict[str, HFExpertLoraWeights] = {}
    with safe_open(str(path), framework="pt") as handle:
        for module in sorted(modules & set(layout.linears)):
            keys = list(
                _lora_pair(layout, module, layout.linears[module].a, layout.linears[module].b)
            )
            linears[module] = HFLoraWeights(handle.get_tensor(keys[0]), handle.get_tensor(keys[1]))
        targeted = _targeted_in_file(Path(path)) if profile == "peft" else []
        for key in sorted(modules & set(layout.experts)):
            experts[key] = _read_experts(handle, layout, key, profile, targeted)
    return HFAdapter(
        linears,
        experts,
        layout.r,
        layout.alpha,
        layout.use_rslora,
        layout.text_prefix,
        layout.base_model_name_or_path,
    )


def _targeted_in_file(path: Path) -> list[str]:
    """The packed projections the adapter file next to `path` targets, in PEFT's wrapping order
    (from its adapter_config.json, so a layout holding only some modules names them right)."""
    config = json.loads((path.parent / CONFIG_FILE).read_text())
    listed = set(config.get("target_parameters") or ())
    return [proj for proj in EXPERT_PROJECTIONS if f"mlp.experts.{proj}" in listed]


def _read_experts(
    handle: Any, layout: HFAdapter, key: str, profile: Profile, targeted: list[str]
) -> HFExpertLoraWeights:
    module, proj = _split_expert_key(key)
    experts, rank, _ = layout.experts[key].a.shape
    if profile == "per_expert":
        a_rows, b_rows = [], []
        for expert in range(experts):
            parts = [
                list(
                    _lora_pair(
                        layout,
                        f"{module}.{expert}.{name}",
                        layout.experts[key].a,
                        layout.experts[key].b,
                    )
                )
                for name in PER_EXPERT_MODULES[proj]
            ]
            a_rows.append(handle.get_tensor(parts[0][0]))
            b_rows.append(torch.cat([handle.get_tensor(names[1]) for names in parts]))
        return HFExpertLoraWeights(torch.stack(a_rows), torch.stack(b_rows))
    wrapper = module + ".base_layer" * (len(targeted) - 1 - targeted.index(proj))
    stem = f"{KEY_PREFIX}{layout.text_prefix}{wrapper}"
    a = handle.get_tensor(f"{stem}.lora_A.weight")
    b = handle.get_tensor(f"{stem}.lora_B.weight")
    return HFExpertLoraWeights(
        a.view(experts, rank, -1).clone(),
        b.view(b.shape[0], rank, experts).permute(2, 0, 1).contiguous(),
    )
