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
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import save_file
from torch import Tensor

from lora_trainer.export.hf_lora import HFAdapter, HFExpertLoraWeights

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
                tensors.update(_lora_pair(adapter, f"{module}.{expert}.{name}", weights.a[expert], b))
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
    return {name for key in adapter.experts for name in PER_EXPERT_MODULES[_split_expert_key(key)[1]]}


def _split_expert_key(key: str) -> tuple[str, str]:
    """`layers.0.mlp.experts.gate_up_proj` -> (`layers.0.mlp.experts`, `gate_up_proj`)."""
    module, _, proj = key.rpartition(".")
    if proj not in EXPERT_PROJECTIONS or not module.endswith("mlp.experts"):
        raise ValueError(
            f"routed-expert LoRA key {key!r} must be '<layer>.mlp.experts.<projection>' with a projection "
            f"in {EXPERT_PROJECTIONS}"
        )
    return module, proj


def _leaf(path: str) -> str:
    return path.rpartition(".")[2]


def _for_file(tensor: Tensor, dtype: torch.dtype) -> Tensor:
    """A contiguous CPU copy in `dtype` (a copy, so no two file tensors share storage)."""
    return tensor.detach().to(device="cpu", dtype=dtype).clone(memory_format=torch.contiguous_format)


def _adapter_config(adapter: HFAdapter, target_modules: list[str], target_parameters: list[str]) -> dict[str, Any]:
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
