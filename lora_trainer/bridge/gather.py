"""Megatron -> HF: gather every rank's shards back into full HF-named tensors.

Meant for the text model's LoRA adapter and for verification (round trip); the merged export
streams base tensors from disk instead of gathering the model.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from lora_trainer.bridge.loader import model_mapping
from lora_trainer.bridge.mapping import ExpertLayout, ParamMapping
from lora_trainer.bridge.transforms import HFRef
from lora_trainer.parallel.collectives import gather_shards, merge_from_all_ranks
from lora_trainer.parallel.groups import group_rank_size
from lora_trainer.qwen35.model import Qwen35Model


def gather_mapped(
    tensors: dict[str, torch.Tensor], mappings: list[ParamMapping]
) -> dict[HFRef, torch.Tensor]:
    """Full HF tensors (by ref) for the Megatron tensors this rank holds, kept by the first rank
    of each splitting group so that every ref appears once per stage."""
    out: dict[HFRef, torch.Tensor] = {}
    for mapping in mappings:
        if not mapping.exported:
            continue
        shards = gather_shards(mapping.local_tensor(tensors), mapping.group)
        rank, _ = group_rank_size(mapping.group)
        if rank == 0:
            out.update(mapping.transform.unshard(shards))
    return out


def assemble_hf_names(refs: dict[HFRef, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Packed expert refs (one per expert) become the 3D tensor, stacked in expert order."""
    out: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[int, torch.Tensor]] = defaultdict(dict)
    for ref, tensor in refs.items():
        if ref.expert is None:
            out[ref.name] = tensor
        else:
            experts[ref.name][ref.expert] = tensor
    for name, by_index in experts.items():
        out[name] = torch.stack([by_index[e] for e in sorted(by_index)])
    return out


def gather_hf_state_dict(
    model: Qwen35Model, expert_layout: ExpertLayout
) -> dict[str, torch.Tensor]:
    """Every text tensor of the model under its HF checkpoint name, on every rank."""
    mappings = model_mapping(model, expert_layout)
    local = gather_mapped(dict(model.named_parameters()), mappings)
    return assemble_hf_names(merge_from_all_ranks({ref: t.cpu() for ref, t in local.items()}))
