"""Checks that a parallel layout fits a model: each size must divide what it splits."""

from __future__ import annotations

from lora_trainer.errors import ParallelConfigError
from lora_trainer.parallel.config import ParallelConfig
from lora_trainer.qwen35.spec import Qwen35Spec


def check_parallel_fits(spec: Qwen35Spec, parallel: ParallelConfig) -> None:
    """Raise ParallelConfigError naming every size that the layout cannot split evenly."""
    splits: list[tuple[str, int, str, int]] = [
        (
            "parallel.tp",
            parallel.tp,
            "attention heads (num_attention_heads)",
            spec.num_attention_heads,
        ),
        ("parallel.tp", parallel.tp, "KV groups (num_key_value_heads)", spec.num_key_value_heads),
        (
            "parallel.tp",
            parallel.tp,
            "GDN key heads (linear_num_key_heads)",
            spec.linear_num_key_heads,
        ),
        (
            "parallel.tp",
            parallel.tp,
            "GDN value heads (linear_num_value_heads)",
            spec.linear_num_value_heads,
        ),
        ("parallel.tp", parallel.tp, "vocabulary (vocab_size)", spec.vocab_size),
        ("parallel.pp", parallel.pp, "layers (num_hidden_layers)", spec.num_layers),
    ]
    if spec.is_moe:
        splits += [
            ("parallel.ep", parallel.ep, "routed experts (num_experts)", spec.num_experts),
            (
                "parallel.etp",
                parallel.etp,
                "expert FFN width (moe_intermediate_size)",
                spec.moe_intermediate_size,
            ),
            (
                "parallel.tp",
                parallel.tp,
                "shared expert FFN width",
                spec.shared_expert_intermediate_size,
            ),
        ]
    else:
        splits.append(
            ("parallel.tp", parallel.tp, "FFN width (intermediate_size)", spec.intermediate_size)
        )
        if parallel.ep > 1:
            raise ParallelConfigError(
                f"parallel.ep={parallel.ep} but the model {spec.model_type!r} is dense (no "
                "experts); set parallel.ep=1"
            )
    if spec.is_moe and parallel.tp > 1 and not parallel.sp:
        raise ParallelConfigError(
            f"parallel.tp={parallel.tp} on a MoE model needs sequence parallelism (megatron-core's "
            "MoE layer requires it with tensor parallelism); set parallel.sp=true"
        )
    problems = [
        f"{key}={size} does not divide the {what} = {count}"
        for key, size, what, count in splits
        if size > 1 and count % size
    ]
    if problems:
        raise ParallelConfigError(
            "the parallel layout does not fit the model: "
            + "; ".join(problems)
            + ". Choose sizes that divide these counts."
        )
