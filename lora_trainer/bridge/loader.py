"""Load a Hugging Face Qwen3.5 checkpoint into this rank's Megatron model.

Each rank reads only the rows it owns from the safetensors files (never the whole checkpoint),
after checking that every tensor it needs exists with the shape the config implies.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch

from lora_trainer.bridge.mapping import (
    ExpertLayout,
    ParamMapping,
    build_mapping,
    is_skipped_hf_name,
)
from lora_trainer.bridge.safetensors_io import CheckpointReader
from lora_trainer.bridge.transforms import HFRef
from lora_trainer.errors import CheckpointError
from lora_trainer.parallel.groups import group_rank_size, local_expert_range
from lora_trainer.qwen35.model import Qwen35Model

log = logging.getLogger(__name__)

_PACKED_EXPERTS = re.compile(r"\.mlp\.experts\.gate_up_proj$")


class CheckpointSource:
    """`SliceSource` over a checkpoint on disk; an expert ref reads one expert of a packed
    tensor."""

    def __init__(self, reader: CheckpointReader) -> None:
        self.reader = reader

    def read_rows(self, ref: HFRef, start: int, stop: int, dim: int) -> torch.Tensor:
        if ref.expert is None:
            return self.reader.read_rows(ref.name, start, stop, dim)
        matrix = self.reader.read_rows(ref.name, ref.expert, ref.expert + 1, 0)[0]
        return matrix.narrow(dim, start, stop - start).contiguous()


def detect_expert_layout(reader: CheckpointReader) -> ExpertLayout:
    """`packed` when the checkpoint stores `mlp.experts.gate_up_proj`, else `per_expert`."""
    return (
        "packed" if any(_PACKED_EXPERTS.search(name) for name in reader.names()) else "per_expert"
    )


def model_mapping(model: Qwen35Model, expert_layout: ExpertLayout) -> list[ParamMapping]:
    """The mapping of every parameter `model` (this rank's stage) holds."""
    return build_mapping(
        model.spec,
        model.layer_indices,
        first_stage=model.pre_process,
        last_stage=model.post_process,
        local_experts=local_expert_range(model.spec.num_experts),
        expert_layout=expert_layout,
    )


def _check_tensors(reader: CheckpointReader, mappings: list[ParamMapping], path: Path) -> None:
    """Every HF tensor the mappings read exists with the shape the config implies."""
    for mapping in mappings:
        for block in mapping.transform.blocks():
            name = block.ref.name
            if name not in reader:
                raise CheckpointError(
                    f"{path}: tensor {name!r} (for {mapping.megatron_name}) is missing from the "
                    "checkpoint; the checkpoint does not match its config.json, re-export it"
                )
            shape = tuple(reader.shape(name))
            if shape != block.shape:
                raise CheckpointError(
                    f"{path}: tensor {name!r} has shape {list(shape)} but config.json implies "
                    f"{list(block.shape)}; the checkpoint and its config.json do not match"
                )


def _check_no_unknown_tensors(
    reader: CheckpointReader, spec_prefix: str, known: set[str], path: Path
) -> None:
    """Text-model tensors that no rule reads mean the checkpoint is not the model it claims."""
    unknown = [
        name
        for name in reader.names()
        if name not in known
        and not is_skipped_hf_name(name)
        and (name.startswith((spec_prefix, "lm_head.")))
    ]
    if unknown:
        raise CheckpointError(
            f"{path}: {len(unknown)} text-model tensors are not part of a Qwen3.5 model with this "
            f"config.json, e.g. {unknown[:3]}; check model_type and the layer settings in "
            "config.json"
        )


def load_hf_checkpoint(model: Qwen35Model, path: str | Path) -> ExpertLayout:
    """Fill `model` (this rank's shard of every parameter) from the HF checkpoint at `path`.

    Returns the checkpoint's expert layout, which the merged export writes back."""
    path = Path(path)
    with CheckpointReader(path) as reader:
        layout = detect_expert_layout(reader)
        mappings = model_mapping(model, layout)
        _check_tensors(reader, mappings, path)
        all_rules = build_mapping(
            model.spec,
            range(model.spec.num_layers),
            first_stage=True,
            last_stage=True,
            local_experts=range(model.spec.num_experts),
            expert_layout=layout,
        )
        known = {block.ref.name for m in all_rules for block in m.transform.blocks()}
        _check_no_unknown_tensors(reader, model.spec.text_prefix, known, path)
        skipped = sum(1 for name in reader.names() if is_skipped_hf_name(name))
        if skipped:
            log.info(
                "Checkpoint %s: %d vision / MTP tensors are not trained and are left as they are",
                path,
                skipped,
            )
        source = CheckpointSource(reader)
        params = dict(model.named_parameters())
        for mapping in mappings:
            if mapping.megatron_name not in params:
                raise CheckpointError(
                    f"internal: the model has no parameter {mapping.megatron_name}"
                )
            param = mapping.local_tensor(params)
            rank, size = group_rank_size(mapping.group)
            value = mapping.transform.shard(source, rank, size)
            if value.shape != param.shape:
                raise CheckpointError(
                    f"{path}: {mapping.megatron_name} expects a shard of shape "
                    f"{list(param.shape)}, the checkpoint gives {list(value.shape)}"
                )
            with torch.no_grad():
                param.copy_(value.to(param.dtype))
        missing = set(params) - {m.megatron_name for m in mappings}
        if missing:
            raise CheckpointError(f"internal: no mapping rule fills {sorted(missing)[:5]}")
    return layout
