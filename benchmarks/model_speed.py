"""CPU speed of our Megatron Qwen3.5 (TP=1) against transformers' implementation of the same
checkpoint.

For a dense and a MoE model (hidden 512, 8 layers, 3 GDN : 1 gated attention; MoE with 8 experts
top-2 and a shared expert) it builds a random checkpoint with transformers' own classes,
`save_pretrained`s it into a temporary directory and loads it into our model with
`build_model_from_hf`. Both sides then run forward + backward on the same batch, in fp32, in
training mode (dropout is 0 in both), with the same torch threads, and the same loss: token
cross-entropy of the logits against the batch shifted by one. The backward goes through every
parameter on both sides (all of them require grad, as in full fine-tuning; gradients are reset
to None before each step). The two alternate step by step so that load drift on a shared machine
hits both alike. Printed per model: median and best ms of each, the ratios ours / transformers
(goal <= 1.0) and the max |logit diff|; then the gated delta rule kernel alone at the GDN
layer's shape, against transformers' `torch_chunk_gated_delta_rule` (benchmarks/kernel_speed.py).

On a machine shared with other jobs, `--threads 1` gives the steadiest figures: with more threads
than idle cores, one descheduled thread stalls every parallel op.

`--profile` adds, per model, the top ops by self CPU time of one profiled step of each side.

Run it as a script (it imports its sibling benchmarks/kernel_speed.py):

    python benchmarks/model_speed.py [--threads N] [--seq 1024] [--batch 1] [--repeats 5]
    [--profile]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from kernel_speed import Case
from kernel_speed import bench as bench_kernel
from torch import nn
from torch.profiler import ProfilerActivity, profile
from transformers.utils import logging as hf_logging

from lora_trainer.bridge.build import build_model_from_hf
from lora_trainer.parallel.config import ParallelConfig
from lora_trainer.parallel.state import destroy_parallel, initialize_parallel

KIND_DENSE = "dense"
KIND_MOE = "moe"
LAYER_TYPES = ["linear_attention"] * 3 + ["full_attention"]
TEXT_SIZES: dict[str, object] = {
    "vocab_size": 8192,
    "hidden_size": 512,
    "num_hidden_layers": 8,
    "layer_types": LAYER_TYPES * 2,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "linear_num_key_heads": 4,
    "linear_num_value_heads": 8,
    "linear_key_head_dim": 64,
    "linear_value_head_dim": 64,
    "linear_conv_kernel_dim": 4,
    "tie_word_embeddings": False,
}
DENSE_SIZES: dict[str, object] = {"intermediate_size": 1536}
MOE_SIZES: dict[str, object] = {
    "num_experts": 8,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 384,
    "shared_expert_intermediate_size": 384,
}
PROFILE_ROWS = 15

Forward = Callable[[nn.Module, torch.Tensor], torch.Tensor]


def build_hf_model(kind: str, seed: int = 0) -> nn.Module:
    """A transformers Qwen3.5 ForCausalLM of `kind` with its own random init, fp32."""
    torch.manual_seed(seed)
    if kind == KIND_DENSE:
        return transformers.Qwen3_5ForCausalLM(
            transformers.Qwen3_5TextConfig(**TEXT_SIZES, **DENSE_SIZES)
        )
    if kind == KIND_MOE:
        return transformers.Qwen3_5MoeForCausalLM(
            transformers.Qwen3_5MoeTextConfig(**TEXT_SIZES, **MOE_SIZES)
        )
    raise ValueError(f"unknown model kind {kind!r}; use {KIND_DENSE!r} or {KIND_MOE!r}")


def hf_forward(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """transformers' logits [B, S, V]."""
    return model(input_ids=input_ids, use_cache=False).logits


def ours_forward(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Our logits [B, S, V] (TP=1, so the vocab-parallel logits are the full vocabulary)."""
    return model(input_ids)


def next_token_loss(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the logits at t against the token at t + 1."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten())


def step_seconds(forward: Forward, model: nn.Module, input_ids: torch.Tensor) -> float:
    """Wall time of one forward + backward, gradients reset to None first."""
    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    next_token_loss(forward(model, input_ids), input_ids).backward()
    return time.perf_counter() - start


def max_logit_diff(ours: nn.Module, theirs: nn.Module, input_ids: torch.Tensor) -> float:
    """Max |logits ours - logits transformers| on the batch (both sides compute the same thing)."""
    with torch.no_grad():
        return (ours_forward(ours, input_ids) - hf_forward(theirs, input_ids)).abs().max().item()


def print_profile(label: str, forward: Forward, model: nn.Module, input_ids: torch.Tensor) -> None:
    """The top ops by self CPU time of one forward + backward."""
    model.zero_grad(set_to_none=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        next_token_loss(forward(model, input_ids), input_ids).backward()
    print(f"  profile of one step, {label}:")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=PROFILE_ROWS))


def hf_implementations(model: nn.Module) -> str:
    """The attention (and, for MoE, experts) implementation transformers chose for `model`."""
    config = model.config
    names = f"attention={config._attn_implementation}"
    if getattr(config, "num_experts", 0):
        names += f", experts={config._experts_implementation}"
    return names


def bench_model(
    kind: str, input_ids: torch.Tensor, args: argparse.Namespace, workdir: Path
) -> None:
    """Build both sides of `kind` from one checkpoint, check they agree, time and print them."""
    theirs = build_hf_model(kind)
    path = workdir / kind
    theirs.save_pretrained(path)
    ours = build_model_from_hf(path, ParallelConfig()).model
    theirs.train()
    ours.train()
    diff = max_logit_diff(ours, theirs, input_ids)
    contenders: dict[str, tuple[Forward, nn.Module]] = {
        "ours": (ours_forward, ours),
        "transformers": (hf_forward, theirs),
    }
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for step in range(args.warmup + args.repeats):
        for name, (forward, model) in contenders.items():
            seconds = step_seconds(forward, model, input_ids)
            if step >= args.warmup:
                times[name].append(seconds)
    ours_ms, theirs_ms = (statistics.median(times[name]) * 1e3 for name in contenders)
    ours_best, theirs_best = (min(times[name]) * 1e3 for name in contenders)
    params = sum(p.numel() for p in theirs.parameters()) / 1e6
    print(
        f"{kind}: {params:.1f}M params, B={input_ids.shape[0]} T={input_ids.shape[1]} "
        f"(transformers {hf_implementations(theirs)})\n"
        f"  median: ours {ours_ms:9.1f} ms   transformers {theirs_ms:9.1f} ms   "
        f"ratio ours/transformers {ours_ms / theirs_ms:.3f}   max |logit diff| {diff:.1e}\n"
        f"  best:   ours {ours_best:9.1f} ms   transformers {theirs_best:9.1f} ms   "
        f"ratio ours/transformers {ours_best / theirs_best:.3f}"
    )
    if args.profile:
        for name, (forward, model) in contenders.items():
            print_profile(f"{kind} {name}", forward, model, input_ids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads"
    )
    parser.add_argument("--seq", type=int, default=1024, help="tokens per sequence")
    parser.add_argument("--batch", type=int, default=1, help="sequences per batch")
    parser.add_argument(
        "--repeats", type=int, default=5, help="timed forward+backward steps per side"
    )
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per side first")
    parser.add_argument(
        "--kinds", nargs="+", default=[KIND_DENSE, KIND_MOE], choices=[KIND_DENSE, KIND_MOE]
    )
    parser.add_argument("--profile", action="store_true", help="print the top ops of each side")
    args = parser.parse_args()
    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, {args.threads} "
        "threads, "
        f"fp32, training mode, backward through all parameters; "
        f"median of {args.repeats} steps after {args.warmup} warm-up steps"
    )
    input_ids = torch.randint(
        0,
        int(TEXT_SIZES["vocab_size"]),
        (args.batch, args.seq),
        generator=torch.Generator().manual_seed(0),
    )
    initialize_parallel(ParallelConfig())
    try:
        with tempfile.TemporaryDirectory(prefix="model_speed_") as workdir:
            for kind in args.kinds:
                bench_model(kind, input_ids, args, Path(workdir))
    finally:
        destroy_parallel()
    gdn = Case(
        "gated delta rule alone, the GDN layer's shape",
        args.batch,
        args.seq,
        int(TEXT_SIZES["linear_num_key_heads"]),
        int(TEXT_SIZES["linear_num_value_heads"]),
        int(TEXT_SIZES["linear_key_head_dim"]),
        int(TEXT_SIZES["linear_value_head_dim"]),
    )
    bench_kernel(gdn, args.repeats, args.warmup)


if __name__ == "__main__":
    main()
