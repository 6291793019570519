"""CPU speed of a LoRA training step: ours (TP=1) against transformers + PEFT on the same
checkpoint, and our routed experts as grouped GEMMs against the per-expert loop.

1. LoRA training step. For a dense model, an 8-expert MoE (top-2) and a 256-expert MoE (top-8,
   hidden 256, expert width 64) it builds a random checkpoint with transformers' own classes and
   loads it into both sides: ours with `build_model_from_hf` + `inject_lora`, theirs with PEFT,
   r=16 on every linear (attention, Gated DeltaNet, dense MLP / shared expert) and, on MoE, on the
   routed experts (PEFT `target_parameters` on `mlp.experts.gate_up_proj` / `down_proj`; ours per
   expert). One step is forward, next-token cross-entropy, backward into the LoRA factors only,
   and an AdamW step, on the same tokens with the same torch threads; the two sides alternate
   step by step so that load drift on a shared machine hits both alike. Printed: median ms per
   step and the ratio ours / transformers+PEFT (goal <= 0.8).
2. One MoE layer (router, dispatcher, routed experts with LoRA, shared expert) of our model,
   forward + backward, at E = 8, 64, 256 experts (top-8 of width 64 at hidden 256), with the
   experts on torch's grouped matmul and on the per-expert loop.

    python benchmarks/lora_speed.py [--threads N] [--rows 8] [--seq 512] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import peft
import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers.utils import logging as hf_logging

from lora_trainer.bridge.build import build_model_from_hf
from lora_trainer.kernels import grouped_gemm
from lora_trainer.lora.config import LoraConfig
from lora_trainer.lora.inject import inject_lora
from lora_trainer.parallel.config import ParallelConfig
from lora_trainer.parallel.state import destroy_parallel, initialize_parallel

LAYER_TYPES = ["linear_attention"] * 3 + ["full_attention"]
TEXT_512: dict[str, object] = {
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
TEXT_256 = dict(
    TEXT_512,
    hidden_size=256,
    num_attention_heads=4,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
)
MODELS: dict[str, tuple[dict[str, object], dict[str, object] | None]] = {
    "dense": (TEXT_512, None),
    "moe_e8_top2": (
        TEXT_512,
        {
            "num_experts": 8,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 384,
            "shared_expert_intermediate_size": 384,
        },
    ),
    "moe_e256_top8": (
        TEXT_256,
        {
            "num_experts": 256,
            "num_experts_per_tok": 8,
            "moe_intermediate_size": 64,
            "shared_expert_intermediate_size": 64,
        },
    ),
}
# The 256-expert model runs on shorter rows, as in the measurement (8 x 256).
SEQ_SCALE = {"dense": 1, "moe_e8_top2": 1, "moe_e256_top8": 2}
PEFT_MODULES = [
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
]
RANK, ALPHA = 16, 32.0

Step = Callable[[], None]


def build_hf(
    name: str, text: dict[str, object] | None = None, moe: dict[str, object] | None = None
) -> nn.Module:
    """A transformers ForCausalLM with its own random init, fp32."""
    torch.manual_seed(0)
    text_sizes, moe_sizes = MODELS[name] if text is None else (text, moe)
    if moe_sizes is None:
        return transformers.Qwen3_5ForCausalLM(
            transformers.Qwen3_5TextConfig(**text_sizes, intermediate_size=1536)
        )
    return transformers.Qwen3_5MoeForCausalLM(
        transformers.Qwen3_5MoeTextConfig(**text_sizes, **moe_sizes)
    )


def next_token_loss(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten())


def make_step(
    model: nn.Module, forward: Callable[[torch.Tensor], torch.Tensor], input_ids: torch.Tensor
) -> Step:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        next_token_loss(forward(input_ids), input_ids).backward()
        optimizer.step()

    return step


def ours_step(path: Path, input_ids: torch.Tensor) -> tuple[Step, int]:
    model = build_model_from_hf(path, ParallelConfig()).model
    inject_lora(model, LoraConfig(r=RANK, alpha=ALPHA))
    model.train()
    return make_step(model, model, input_ids), sum(
        p.numel() for p in model.parameters() if p.requires_grad
    )


def peft_step(theirs: nn.Module, moe: bool, input_ids: torch.Tensor) -> tuple[Step, int]:
    config = peft.LoraConfig(
        r=RANK,
        lora_alpha=ALPHA,
        target_modules=PEFT_MODULES,
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"] if moe else None,
    )
    model = peft.get_peft_model(theirs, config)
    model.train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return make_step(
        model, lambda ids: model(input_ids=ids, use_cache=False).logits, input_ids
    ), trainable


def alternate(steps: dict[str, Step], warmup: int, repeats: int) -> dict[str, float]:
    """Median seconds per step of each, the steps interleaved."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for index in range(warmup + repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            if index >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def bench_training_step(name: str, args: argparse.Namespace, workdir: Path) -> None:
    theirs = build_hf(name)
    path = workdir / name
    theirs.save_pretrained(path)
    moe = MODELS[name][1] is not None
    seq = args.seq // SEQ_SCALE[name]
    input_ids = torch.randint(0, 8192, (args.rows, seq), generator=torch.Generator().manual_seed(0))
    ours, ours_trainable = ours_step(path, input_ids)
    theirs_step, theirs_trainable = peft_step(theirs, moe, input_ids)
    medians = alternate({"ours": ours, "peft": theirs_step}, args.warmup, args.repeats)
    print(
        f"| {name} | {args.rows} x {seq} | {ours_trainable / 1e6:.2f}M / "
        f"{theirs_trainable / 1e6:.2f}M | "
        f"{medians['ours'] * 1e3:.0f} | {medians['peft'] * 1e3:.0f} | "
        f"{medians['ours'] / medians['peft']:.2f} |"
    )


def bench_moe_layer(experts: int, args: argparse.Namespace, workdir: Path) -> None:
    """Forward + backward of layer 0's MoE block on random hidden states, grouped vs loop."""
    moe = {
        "num_experts": experts,
        "num_experts_per_tok": 8,
        "moe_intermediate_size": 64,
        "shared_expert_intermediate_size": 64,
    }
    text = dict(TEXT_256, num_hidden_layers=4, layer_types=LAYER_TYPES, vocab_size=256)
    path = workdir / f"layer_e{experts}"
    build_hf("", text, moe).save_pretrained(path)
    model = build_model_from_hf(path, ParallelConfig()).model
    inject_lora(model, LoraConfig(r=RANK, alpha=ALPHA))
    mlp = model.layers["0"].mlp
    hidden = torch.randn(args.seq, args.rows, 256, generator=torch.Generator().manual_seed(1))
    original = grouped_gemm.grouped_backend

    def run(backend: str) -> Step:
        def step() -> None:
            grouped_gemm.grouped_backend = lambda device, dtype: backend  # type: ignore[assignment]
            try:
                mlp.zero_grad(set_to_none=True)
                out, _ = mlp(hidden)
                out.square().mean().backward()
            finally:
                grouped_gemm.grouped_backend = original

        return step

    medians = alternate(
        {"grouped_mm": run("grouped_mm"), "loop": run("loop")}, args.warmup, args.repeats
    )
    print(
        f"| {experts} | {args.rows * args.seq} | {medians['grouped_mm'] * 1e3:.1f} | "
        f"{medians['loop'] * 1e3:.1f} | "
        f"{medians['grouped_mm'] / medians['loop']:.2f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads"
    )
    parser.add_argument("--rows", type=int, default=8, help="rows per batch")
    parser.add_argument(
        "--seq", type=int, default=512, help="tokens per row (half for the 256-expert model)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per side")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per side first")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument(
        "--experts",
        nargs="*",
        type=int,
        default=[8, 64, 256],
        help="expert counts of the layer benchmark",
    )
    args = parser.parse_args()
    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, peft "
        f"{peft.__version__}, "
        f"{args.threads} threads, fp32, r={RANK}; median of {args.repeats} steps after "
        f"{args.warmup} warm-up"
    )
    initialize_parallel(ParallelConfig())
    try:
        with tempfile.TemporaryDirectory(prefix="lora_speed_") as workdir:
            print("\nLoRA training step (forward, loss, backward, AdamW):\n")
            print(
                "| model | rows x tokens | trainable ours / peft | ours ms | transformers+peft ms "
                "| ratio |"
            )
            print("|---|---|---|---|---|---|")
            for name in args.models:
                bench_training_step(name, args, Path(workdir))
            if args.experts:
                print(
                    "\nOne MoE layer with LoRA, forward + backward (top-8, hidden 256, expert "
                    "width 64):\n"
                )
                print("| experts | tokens | grouped ms | loop ms | grouped / loop |")
                print("|---|---|---|---|---|")
                for experts in args.experts:
                    bench_moe_layer(experts, args, Path(workdir))
    finally:
        destroy_parallel()


if __name__ == "__main__":
    main()
