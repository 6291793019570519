"""Base checkpoints and random adapters for the merged-export and export-check tests.

A base checkpoint is saved from a tiny random transformers model; the adapter puts non-zero LoRA
factors on every LoRA target of that model (attention, GDN, dense / shared-expert MLP and, for
MoE, both packed routed-expert projections), with shapes taken from the model's own parameters.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors.torch import load_file

from lora_trainer.bridge.safetensors_io import (
    SINGLE_FILE,
    ShardedCheckpointWriter,
    shard_file_names,
)
from lora_trainer.export.hf_adapter_weights import HFAdapter, HFExpertLoraWeights, HFLoraWeights
from tests.checkpoints import KIND_DENSE, KIND_MOE, KIND_MOE_VL, build_hf_model, save_checkpoint

RANK = 4
ALPHA = 8.0
B_SCALE = 0.05  # lora_B size: moves the logits by O(1)
TARGET_LEAVES = {
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "in_proj_qkv",
    "in_proj_z",
    "in_proj_b",
    "in_proj_a",
    "out_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
}
EXPERT_PROJECTIONS = ("gate_up_proj", "down_proj")
TEXT_PREFIX = {KIND_DENSE: "model.", KIND_MOE: "model.", KIND_MOE_VL: "model.language_model."}
# Non-weight files a real checkpoint directory has next to config.json; all are copied.
EXTRA_FILES = {
    "tokenizer_config.json": '{"model_max_length": 64}\n',
    "tokenizer.json": '{"version": "1.0"}\n',
    "chat_template.jinja": "{{ messages }}\n",
    "preprocessor_config.json": "{}\n",
}
HIDDEN_FILE = ".download_marker"


def random_adapter(model: torch.nn.Module, kind: str, seed: int = 11) -> HFAdapter:
    """Random LoRA factors, every lora_B non-zero, on every LoRA target of `model`."""
    prefix = TEXT_PREFIX[kind]
    generator = torch.Generator().manual_seed(seed)
    linears: dict[str, HFLoraWeights] = {}
    experts: dict[str, HFExpertLoraWeights] = {}
    for name, module in model.named_modules():
        if not name.startswith(prefix):
            continue
        path = name.removeprefix(prefix)
        if isinstance(module, torch.nn.Linear) and path.rpartition(".")[2] in TARGET_LEAVES:
            linears[path] = HFLoraWeights(
                _factor((RANK, module.in_features), generator, 1 / math.sqrt(module.in_features)),
                _factor((module.out_features, RANK), generator, B_SCALE / math.sqrt(RANK)),
            )
        if path.endswith("mlp.experts"):
            for proj in EXPERT_PROJECTIONS:
                num_experts, fan_out, fan_in = getattr(module, proj).shape
                experts[f"{path}.{proj}"] = HFExpertLoraWeights(
                    _factor((num_experts, RANK, fan_in), generator, 1 / math.sqrt(fan_in)),
                    _factor((num_experts, fan_out, RANK), generator, B_SCALE / math.sqrt(RANK)),
                )
    return HFAdapter(linears, experts, RANK, ALPHA, False, prefix, f"tiny-qwen3.5-{kind}")


def _factor(shape: tuple[int, ...], generator: torch.Generator, std: float) -> torch.Tensor:
    return std * torch.randn(shape, generator=generator)


def make_base(
    kind: str,
    path: Path,
    *,
    dtype: torch.dtype = torch.float32,
    packed_experts: bool = False,
    with_mtp: bool = False,
    max_shard_size: str | None = None,
    shards: int = 1,
) -> tuple[Path, HFAdapter]:
    """Save a base checkpoint of `kind` with extra non-weight files; returns it and an adapter for
    it.

    `shards` > 1 re-writes a single-file checkpoint (e.g. packed, with MTP) into that many shards.
    """
    model = build_hf_model(kind)
    save_checkpoint(
        model,
        path,
        dtype=dtype,
        packed_experts=packed_experts,
        with_mtp=with_mtp,
        max_shard_size=max_shard_size,
    )
    if shards > 1:
        reshard(path, shards)
    for name, text in {**EXTRA_FILES, HIDDEN_FILE: "x\n"}.items():
        (path / name).write_text(text)
    return path, random_adapter(model, kind)


def reshard(path: Path, shards: int) -> None:
    """Split `path/model.safetensors` into `shards` files with an index, tensors in name order."""
    tensors = load_file(str(path / SINGLE_FILE))
    (path / SINGLE_FILE).unlink()
    names = sorted(tensors)
    writer = ShardedCheckpointWriter(path)
    for index, file_name in enumerate(shard_file_names(shards)):
        part = names[index * len(names) // shards : (index + 1) * len(names) // shards]
        writer.write_shard(file_name, {name: tensors[name] for name in part})
    writer.finish()
