"""Put LoRA adapters on the targeted linears of a loaded model and freeze everything else."""

from __future__ import annotations

import logging

from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

from lora_trainer.bridge.loader import model_mapping
from lora_trainer.bridge.mapping import ParamMapping
from lora_trainer.bridge.transforms import Transform
from lora_trainer.lora.config import LoraConfig
from lora_trainer.lora.experts import Adapter, GroupedLoraLinear
from lora_trainer.lora.layers import LoraLinear
from lora_trainer.qwen35.experts import GroupedLinear
from lora_trainer.qwen35.model import Qwen35Model

log = logging.getLogger(__name__)


def adapter_identity(transform: Transform) -> str:
    """A name for an adapter that does not depend on the parallel layout (megatron's local expert
    index does): its first HF target, with the global expert index for routed experts."""
    ref = transform.blocks()[0].ref
    return ref.name if ref.expert is None else f"{ref.name}[{ref.expert}]"


def inject_lora(model: Qwen35Model, config: LoraConfig) -> list[Adapter]:
    """Wrap every targeted column/row-parallel linear of this rank's stage in a LoraLinear, and
    every targeted grouped expert projection in a GroupedLoraLinear (one adapter per expert).

    Call after the base weights are loaded: the wrapped modules' parameters move under `.base`.
    Returns the adapters in a fixed order (the same on every rank of a stage)."""
    config.check_model(model.spec.is_moe)
    targeted: dict[str, list[ParamMapping]] = {}
    for mapping in model_mapping(model, "packed"):
        if not mapping.megatron_name.endswith(".weight"):
            continue
        module_name = mapping.megatron_name[: -len(".weight")]
        if module_name.rpartition(".")[2] in config.targets:
            targeted.setdefault(module_name, []).append(mapping)
    adapters: list[Adapter] = []
    for module_name, mappings in targeted.items():
        parent_name, _, leaf = module_name.rpartition(".")
        base = model.get_submodule(module_name)
        adapter: Adapter
        if isinstance(base, GroupedLinear):
            adapter = GroupedLoraLinear(
                base,
                names=[adapter_identity(m.transform) for m in mappings],
                transforms=[m.transform for m in mappings],
                r=config.r,
                scale=config.scale,
                canonical=config.style == "canonical",
                seed=config.seed,
            )
        elif isinstance(base, (ColumnParallelLinear, RowParallelLinear)):
            mapping = mappings[0]
            adapter = LoraLinear(
                base,
                name=adapter_identity(mapping.transform),
                parallel_kind="column" if isinstance(base, ColumnParallelLinear) else "row",
                transform=mapping.transform,
                group=mapping.group,
                r=config.r,
                scale=config.scale,
                dropout=config.dropout,
                canonical=config.style == "canonical",
                seed=config.seed,
            )
        else:
            continue
        setattr(model.get_submodule(parent_name), leaf, adapter)
        adapters.append(adapter)
    for name, param in model.named_parameters():
        param.requires_grad_(".lora_" in name)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info(
        "LoRA (%s, r=%d) on %d linears of this rank: %d trainable parameters",
        config.style,
        config.r,
        len(adapters),
        trainable,
    )
    return adapters
