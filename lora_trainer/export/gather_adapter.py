"""The LoRA adapter of every rank (TP, EP, PP) in HF layout: each rank's own part
(`distributed_hf_adapter`, what the export writes) or the whole adapter on every rank
(`gather_hf_adapter`, for tests and verification).

Each fused adapter is split by the group size it was built with: a factor's rows are put back at
the positions the base weight's transform gives for each rank, then cut into the HF targets. A
factor split over TP ranks is assembled (one module at a time) on the first rank of its group;
only the first data-parallel replica keeps it.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state

from lora_trainer.export.hf_adapter_weights import (
    DistributedAdapter,
    HFAdapter,
    LocalFactors,
    hf_weights_from_factors,
)
from lora_trainer.lora.config import LoraConfig
from lora_trainer.lora.experts import Adapter, ExpertLoraView, linear_adapters
from lora_trainer.lora.layers import LoraLinear
from lora_trainer.lora.layout import shard_positions
from lora_trainer.parallel.collectives import gather_shards, merge_from_all_ranks
from lora_trainer.parallel.groups import group_rank_size
from lora_trainer.qwen35.spec import Qwen35Spec


def _unshard(
    shards: list[torch.Tensor], adapter: LoraLinear | ExpertLoraView, dim: int
) -> torch.Tensor:
    """Put each rank's shard back at its positions along `dim` of the full factor."""
    total = sum(span.size for span in adapter.spans)
    shape = list(shards[0].shape)
    shape[dim] = total
    full = shards[0].new_zeros(shape)
    for rank, shard in enumerate(shards):
        positions = shard_positions(adapter.transform, rank, len(shards), 0 if dim == 0 else 1)
        full.index_copy_(dim, positions.to(full.device), shard)
    return full


def full_factors(adapter: LoraLinear | ExpertLoraView) -> tuple[torch.Tensor, torch.Tensor]:
    """a [adapters, r, in_full], b [out_full, r] (rows in target-concatenation order), on every
    rank of the adapter's group."""
    a, b_local = adapter.lora_A.detach(), adapter.local_b_fused_order().detach()
    if adapter.parallel_kind == "column":
        return a, _unshard(gather_shards(b_local, adapter.group), adapter, 0)
    return _unshard(gather_shards(a, adapter.group), adapter, 2), b_local


def _hf_module(ref_name: str, prefix: str) -> str:
    name = ref_name[len(prefix) :] if ref_name.startswith(prefix) else ref_name
    return name[: -len(".weight")] if name.endswith(".weight") else name


def _first_replica(adapter: LoraLinear | ExpertLoraView) -> bool:
    """Whether this rank is the first data-parallel replica of `adapter` (expert data-parallel
    for routed experts): the other replicas hold the same factors and send nothing."""
    if adapter.group == "etp":
        return parallel_state.get_expert_data_parallel_rank() == 0
    return parallel_state.get_data_parallel_rank() == 0


def local_hf_factors(adapters: list[Adapter], spec: Qwen35Spec) -> LocalFactors:
    """This rank's adapters cut into HF targets; kept by the first rank of each split group of
    the first data-parallel replica."""
    out: LocalFactors = {}
    for adapter in linear_adapters(adapters):
        a_full, b_full = full_factors(adapter)
        rank, _ = group_rank_size(adapter.group)
        if rank != 0 or not _first_replica(adapter):
            continue
        for index, span in enumerate(adapter.spans):
            a = a_full[index if a_full.shape[0] > 1 else 0]
            b = (
                b_full[span.offset : span.offset + span.size]
                if adapter.parallel_kind == "column"
                else b_full
            )
            key = (_hf_module(span.ref.name, spec.text_prefix), span.ref.expert)
            out[key] = (a.clone().float(), b.clone().float())
    return out


def gather_hf_adapter(
    adapters: list[Adapter], spec: Qwen35Spec, config: LoraConfig, base_model_name_or_path: str
) -> HFAdapter:
    """The whole adapter in HF layout, on every rank. Collective: every rank must call it."""
    local = {key: (a.cpu(), b.cpu()) for key, (a, b) in local_hf_factors(adapters, spec).items()}
    return _hf_adapter(merge_from_all_ranks(local), spec, config, base_model_name_or_path)


def distributed_hf_adapter(
    adapters: list[Adapter], spec: Qwen35Spec, config: LoraConfig, base_model_name_or_path: str
) -> DistributedAdapter:
    """This rank's part of the adapter in HF layout: the factors it keeps (`local_hf_factors`)
    and the whole adapter's shapes. Collective: every rank must call it; only shapes and one flag
    per factor (whether lora_B is non-zero) travel between ranks."""
    local = {key: (a.cpu(), b.cpu()) for key, (a, b) in local_hf_factors(adapters, spec).items()}
    shapes = merge_from_all_ranks(
        {key: (tuple(a.shape), tuple(b.shape), bool(b.any())) for key, (a, b) in local.items()}
    )
    nonzero = {module for (module, _), (_, _, b_nonzero) in shapes.items() if b_nonzero}
    meta = {key: (_meta(a_shape), _meta(b_shape)) for key, (a_shape, b_shape, _) in shapes.items()}
    layout = _hf_adapter(meta, spec, config, base_model_name_or_path)
    return DistributedAdapter(layout, local, len(nonzero))


def _hf_adapter(
    factors: LocalFactors, spec: Qwen35Spec, config: LoraConfig, base_model_name_or_path: str
) -> HFAdapter:
    linears, experts = hf_weights_from_factors(factors)
    return HFAdapter(
        linears=linears,
        experts=experts,
        r=config.r,
        alpha=config.alpha,
        use_rslora=config.rslora,
        text_prefix=spec.text_prefix,
        base_model_name_or_path=base_model_name_or_path,
    )


def _meta(shape: tuple[int, ...]) -> torch.Tensor:
    return torch.empty(shape, dtype=torch.float32, device="meta")
