"""What each rank runs in the LoRA tests (module level, so spawned ranks can import it).

For every checkpoint: build our model, inject LoRA, give every adapter the same full random
factors at every layout (non-zero B), run one forward/backward through megatron's schedule (in
`dtype`; the LoRA factors stay fp32), and return the logits, the LoRA gradients in HF layout, and
the adapter gathered into HF layout.
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from tests.parity_runner import forward_backward


def random_full_factors(adapter: Any, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Full (unsharded) random factors for one adapter, the same at every parallel layout. The
    canonical style's per-target adapters share one A, so fused and canonical encode one delta."""
    generator = torch.Generator().manual_seed(seed + zlib.crc32(adapter.name.encode()))
    full_in = (
        adapter.lora_A.shape[2]
        if adapter.parallel_kind == "column"
        else sum(s.size for s in adapter.spans)
    )
    full_out = (
        sum(s.size for s in adapter.spans)
        if adapter.parallel_kind == "column"
        else adapter.lora_B[0].shape[0]
    )
    a = (torch.randn(1, adapter.r, full_in, generator=generator) / full_in**0.5).expand(
        adapter.num_adapters, -1, -1
    )
    b = 0.2 * torch.randn(full_out, adapter.r, generator=generator) / adapter.r**0.5
    return a, b


def _finalize_grads(model: Any) -> None:
    """What megatron's DDP + finalize_model_grads do in training, for a batch that every data
    parallel replica shares. Factors that saw only a sequence shard are summed over TP. Routed
    expert factors are summed over the expert-data-parallel group (the TP ranks whose token shards
    reach the same experts); their tokens also arrive from every data-parallel replica through the
    token dispatcher, so, as with the token-weighted loss in training, they are divided by the
    data-parallel size."""
    from megatron.core import parallel_state

    dp_size = parallel_state.get_data_parallel_world_size()
    for param in model.parameters():
        if param.grad is None:
            continue
        if not getattr(param, "allreduce", True):
            if parallel_state.get_expert_data_parallel_world_size() > 1:
                dist.all_reduce(param.grad, group=parallel_state.get_expert_data_parallel_group())
            param.grad /= dp_size
        elif (
            getattr(param, "sequence_parallel", False)
            and parallel_state.get_tensor_model_parallel_world_size() > 1
        ):
            dist.all_reduce(param.grad, group=parallel_state.get_tensor_model_parallel_group())


def _grads_as_adapter(adapters: list[Any], spec: Any, config: Any) -> Any:
    """The LoRA gradients laid out like the adapter (swap each factor for its gradient)."""
    from lora_trainer.export.gather_adapter import gather_hf_adapter

    saved = [(a.lora_A.data, [b.data for b in a.lora_B]) for a in adapters]
    for adapter in adapters:
        adapter.lora_A.data = adapter.lora_A.grad.clone()
        for b in adapter.lora_B:
            b.data = b.grad.clone()
    grads = gather_hf_adapter(adapters, spec, config, "")
    for adapter, (a, bs) in zip(adapters, saved, strict=True):
        adapter.lora_A.data = a
        for b, value in zip(adapter.lora_B, bs, strict=True):
            b.data = value
    return grads


def run_lora(
    rank: int,
    world_size: int,
    parallel: dict[str, Any],
    checkpoints: dict[str, str],
    input_ids: torch.Tensor,
    lora: dict[str, Any],
    dtype: torch.dtype = torch.float32,
    export_dir: str | None = None,
) -> dict[str, dict[str, Any]]:
    """Logits, gathered adapter and gathered gradients per checkpoint kind; with `export_dir`,
    also the export of each rank's own part of the adapter into `export_dir/<kind>`."""
    from lora_trainer.bridge.build import build_model_from_hf
    from lora_trainer.export.gather_adapter import distributed_hf_adapter, gather_hf_adapter
    from lora_trainer.export.hf_export import export_hf
    from lora_trainer.lora.config import LoraConfig
    from lora_trainer.lora.experts import linear_adapters
    from lora_trainer.lora.inject import inject_lora
    from lora_trainer.parallel.config import ParallelConfig
    from lora_trainer.parallel.state import destroy_parallel, initialize_parallel

    config = ParallelConfig(**parallel)
    lora_config = LoraConfig(**lora)
    initialize_parallel(config, seed=1234)
    results: dict[str, dict[str, Any]] = {}
    try:
        for kind, path in checkpoints.items():
            loaded = build_model_from_hf(Path(path), config, params_dtype=dtype)
            adapters = inject_lora(loaded.model, lora_config)
            for adapter in linear_adapters(adapters):
                adapter.set_full(*random_full_factors(adapter, seed=5))
            logits = forward_backward(loaded.model, input_ids)
            _finalize_grads(loaded.model)
            everyone: list[Any] = [None] * world_size
            dist.all_gather_object(everyone, logits)
            results[kind] = {
                "logits": next(x for x in everyone if x is not None),
                "adapter": gather_hf_adapter(adapters, loaded.spec, lora_config, path),
                "grads": _grads_as_adapter(adapters, loaded.spec, lora_config),
            }
            if export_dir is not None:
                part = distributed_hf_adapter(adapters, loaded.spec, lora_config, path)
                export_hf(
                    part,
                    Path(path),
                    Path(export_dir) / kind,
                    step=1,
                    rank=rank,
                    world_size=world_size,
                    barrier=dist.barrier,
                    progress=False,
                )
    finally:
        destroy_parallel()
    return results


def run_lora_expert_loop(
    rank: int,
    world_size: int,
    parallel: dict[str, Any],
    checkpoints: dict[str, str],
    input_ids: torch.Tensor,
    lora: dict[str, Any],
) -> dict[str, dict[str, Any]]:
    """`run_lora` with the routed experts on the per-expert loop instead of grouped matmul."""
    from lora_trainer.kernels import grouped_gemm

    grouped_gemm.grouped_backend = lambda device_type, dtype: "loop"
    return run_lora(rank, world_size, parallel, checkpoints, input_ids, lora)


def run_recompute(
    rank: int,
    world_size: int,
    parallel: dict[str, Any],
    checkpoints: dict[str, str],
    input_ids: torch.Tensor,
    lora: dict[str, dict[str, Any]],
) -> dict[str, dict[str, Any]]:
    """Three SGD steps on packed rows from the same random factors and the same RNG seed under
    every `model.recompute` mode: the first step's LoRA gradients and the final adapter, per mode.
    `lora` holds the LoRA settings per checkpoint kind (dropout where the model allows it)."""
    from lora_trainer.bridge.build import build_model_from_hf
    from lora_trainer.export.gather_adapter import gather_hf_adapter
    from lora_trainer.lora.config import LoraConfig
    from lora_trainer.lora.experts import linear_adapters
    from lora_trainer.lora.inject import inject_lora
    from lora_trainer.parallel.config import ParallelConfig
    from lora_trainer.parallel.state import destroy_parallel, initialize_parallel
    from lora_trainer.qwen35.recompute_mode import Recompute

    config = ParallelConfig(**parallel)
    initialize_parallel(config, seed=1234)
    batch, seq = input_ids.shape
    split = seq // 3  # row 0 packs two samples, the other rows hold one each
    position_ids = torch.arange(seq).repeat(batch, 1)
    position_ids[0, split:] -= split
    cu_seqlens = torch.tensor([0, split] + [seq * (row + 1) for row in range(batch)])
    results: dict[str, dict[str, Any]] = {}
    try:
        for kind, path in checkpoints.items():
            loaded = build_model_from_hf(Path(path), config)
            lora_config = LoraConfig(**lora[kind])
            adapters = inject_lora(loaded.model, lora_config)
            for adapter in linear_adapters(adapters):
                adapter.set_full(*random_full_factors(adapter, seed=5))
            params = [p for p in loaded.model.parameters() if p.requires_grad]
            start = [p.detach().clone() for p in params]
            results[kind] = {}
            for mode in reversed(Recompute):  # recompute first: nothing warmed up by a plain pass
                loaded.model.recompute = mode
                torch.manual_seed(7)
                with torch.no_grad():
                    for param, value in zip(params, start, strict=True):
                        param.copy_(value)
                for step in range(3):
                    for param in params:
                        param.grad = None
                    forward_backward(loaded.model, input_ids, position_ids, cu_seqlens)
                    _finalize_grads(loaded.model)
                    if step == 0:
                        grads = _grads_as_adapter(adapters, loaded.spec, lora_config)
                    with torch.no_grad():
                        for param in params:
                            param -= 0.5 * param.grad
                results[kind][mode.value] = {
                    "grads": grads,
                    "adapter": gather_hf_adapter(adapters, loaded.spec, lora_config, path),
                }
    finally:
        destroy_parallel()
    return results


def run_trained_export(
    rank: int,
    world_size: int,
    parallel: dict[str, Any],
    checkpoint: str,
    input_ids: torch.Tensor,
    lora: dict[str, Any],
    save_dir: str,
    dtype: torch.dtype = torch.float32,
    mutate: str | None = None,
) -> dict[str, Any]:
    """Our model with random LoRA factors (the same at every layout) records its layers on
    `input_ids` into `save_dir/trained`, then every rank exports its part of the adapter into
    `save_dir` with the export check against those records; rank 0 returns the manifest. With
    `mutate`, the adapter of that name gets its lora_B negated between the recording and the
    export: the export then is not the model that computed the records."""
    from lora_trainer.bridge.build import build_model_from_hf
    from lora_trainer.export.gather_adapter import distributed_hf_adapter
    from lora_trainer.export.hf_export import export_hf
    from lora_trainer.export.trained_layers import record_trained_layers
    from lora_trainer.lora.config import LoraConfig
    from lora_trainer.lora.experts import linear_adapters
    from lora_trainer.lora.inject import inject_lora
    from lora_trainer.parallel.config import ParallelConfig
    from lora_trainer.parallel.state import destroy_parallel, initialize_parallel

    config = ParallelConfig(**parallel)
    lora_config = LoraConfig(**lora)
    initialize_parallel(config, seed=1234)
    try:
        loaded = build_model_from_hf(Path(checkpoint), config, params_dtype=dtype)
        adapters = inject_lora(loaded.model, lora_config)
        for adapter in linear_adapters(adapters):
            adapter.set_full(*random_full_factors(adapter, seed=5))
        trained = Path(save_dir) / "trained"
        record_trained_layers(loaded.model, input_ids, trained)
        for adapter in linear_adapters(adapters):
            if adapter.name.endswith(mutate or "\0"):
                a, b = random_full_factors(adapter, seed=5)
                adapter.set_full(a, -b)
        return export_hf(
            distributed_hf_adapter(adapters, loaded.spec, lora_config, checkpoint),
            Path(checkpoint),
            Path(save_dir),
            step=1,
            check_input_ids=input_ids,
            check_trained_layers=trained,
            rank=rank,
            world_size=world_size,
            barrier=dist.barrier,
            progress=False,
        )
    finally:
        destroy_parallel()
