"""What each rank runs in the model parity tests (module level, so spawned ranks can import it).

For every checkpoint: build our model for this rank from the HF directory, run one forward and
backward through megatron's pipeline schedule with the loss `sum(logits * W)` (W fixed), and
return the full-vocabulary logits and the gradient of the embedding table (the input gradient,
per token id), gathered from whichever ranks hold them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist


def logit_weights(shape: tuple[int, ...]) -> torch.Tensor:
    """The fixed W of the loss sum(logits * W), scaled so gradients are of order one."""
    return (
        torch.randn(shape, generator=torch.Generator().manual_seed(11)) / torch.Size(shape).numel()
    )


def _vocab_slice(full: torch.Tensor) -> torch.Tensor:
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    return full.chunk(tp, dim=-1)[rank]


def forward_backward(
    model: Any,
    input_ids: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """One micro-batch through megatron's schedule (packed rows when `cu_seqlens` is given);
    returns gathered logits on the last stage."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from lora_trainer.qwen35.model import gather_vocab_logits

    captured: dict[str, torch.Tensor] = {}
    batch, seq = input_ids.shape

    def loss_func(logits: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        captured["logits"] = gather_vocab_logits(logits.detach())
        weights = _vocab_slice(logit_weights((batch, seq, model.spec.vocab_size)))
        return (logits * weights).sum(), {}

    def forward_step(data_iterator: Any, module: Any) -> tuple[torch.Tensor, Any]:
        return module(next(data_iterator), position_ids, cu_seqlens), loss_func

    get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter([input_ids]),
        model=[model],
        num_microbatches=1,
        seq_length=seq,
        micro_batch_size=batch,
        forward_only=False,
    )
    return captured.get("logits")


def _embedding_grad(model: Any) -> torch.Tensor | None:
    from megatron.core import parallel_state

    if not model.pre_process:
        return None
    grad = model.embedding.weight.grad
    shards = [
        torch.empty_like(grad) for _ in range(parallel_state.get_tensor_model_parallel_world_size())
    ]
    dist.all_gather(shards, grad, group=parallel_state.get_tensor_model_parallel_group())
    return torch.cat(shards)


def run_parity(
    rank: int,
    world_size: int,
    parallel: dict[str, Any],
    checkpoints: dict[str, str],
    input_ids: torch.Tensor,
    dtype: torch.dtype = torch.float32,
) -> dict[str, dict[str, torch.Tensor]]:
    """Logits and embedding grads (in `dtype`) of every checkpoint under the `parallel` layout; also
    the round trip HF -> Megatron -> HF of every text tensor."""
    from lora_trainer.bridge.build import build_model_from_hf
    from lora_trainer.bridge.gather import gather_hf_state_dict
    from lora_trainer.parallel.config import ParallelConfig
    from lora_trainer.parallel.state import destroy_parallel, initialize_parallel

    config = ParallelConfig(**parallel)
    initialize_parallel(config, seed=1234)
    results: dict[str, dict[str, torch.Tensor]] = {}
    try:
        for kind, path in checkpoints.items():
            loaded = build_model_from_hf(Path(path), config, params_dtype=dtype)
            model = loaded.model
            local = {
                "logits": forward_backward(model, input_ids),
                "embed_grad": _embedding_grad(model),
            }
            everyone: list[Any] = [None] * world_size
            dist.all_gather_object(everyone, local)
            merged = {key: next(r[key] for r in everyone if r[key] is not None) for key in local}
            merged["hf_state"] = gather_hf_state_dict(model, loaded.expert_layout)
            results[kind] = merged
    finally:
        destroy_parallel()
    return results


def run_packing(
    rank: int,
    world_size: int,
    parallel: dict[str, Any],
    checkpoint: str,
    samples: list[list[int]],
    seq_len: int,
    dtype: torch.dtype = torch.float32,
) -> dict[str, list[torch.Tensor]]:
    """Logits (in `dtype`) of each sample run alone, and of the same samples packed into rows of
    `seq_len` (position ids restarting and `cu_seqlens` boundaries from the data pipeline's
    packing)."""
    from lora_trainer.bridge.build import build_model_from_hf
    from lora_trainer.data.packing import build_row, collate
    from lora_trainer.data.tokenize import TokenizedSample
    from lora_trainer.parallel.config import ParallelConfig
    from lora_trainer.parallel.state import destroy_parallel, initialize_parallel
    from lora_trainer.qwen35.model import gather_vocab_logits

    config = ParallelConfig(**parallel)
    initialize_parallel(config, seed=1234)
    try:
        model = build_model_from_hf(Path(checkpoint), config, params_dtype=dtype).model
        with torch.no_grad():
            alone = [gather_vocab_logits(model(torch.tensor([ids])))[0] for ids in samples]
            tokenized = [
                TokenizedSample(input_ids=ids, loss_mask=[1] * len(ids)) for ids in samples
            ]
            rows = [
                build_row(tokenized[:2], seq_len, pad_id=0),
                build_row(tokenized[2:], seq_len, pad_id=0),
            ]
            batch = collate(rows)
            packed = gather_vocab_logits(
                model(batch["input_ids"], batch["position_ids"], batch["cu_seqlens"].long())
            )
        starts = [0, len(samples[0]), 0] + [
            sum(len(s) for s in samples[2:i]) for i in range(3, len(samples))
        ]
        row_of = [0, 0] + [1] * (len(samples) - 2)
        in_pack = [
            packed[row, start : start + len(ids)]
            for row, start, ids in zip(row_of, starts, samples, strict=True)
        ]
    finally:
        destroy_parallel()
    return {"alone": alone, "packed": in_pack}
