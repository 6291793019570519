"""On a CUDA GPU: bf16 logit parity of our model against transformers, and training throughput.

1. Parity. For each tiny test architecture (tests/checkpoints.py: dense, MoE, MoE-VL with packed
   experts and MTP tensors), saved in bf16, our model (TP=1, bf16 parameters, loaded with
   `build_model_from_hf`) and transformers' own class (bf16) run the same fixed batch on the GPU,
   each with whatever CUDA kernels it finds (FLA, causal-conv1d). Printed: max |ours - transformers|
   and, for context, each side's max |diff| against transformers in fp32 on the CPU, all relative to
   the logit scale max |fp32 logits|. The weights are transformers' own initialisation, not the
   large ones of `tests.checkpoints.randomize_`: with those, bf16 rounding is amplified so much
   that transformers in bf16 misses its own fp32 logits by 30-95% of the logit scale, and no bf16
   tolerance can tell a bug from rounding. With transformers' init that error is 0.7-2%. Fails (exit 1) when ours vs transformers exceeds
   `--tolerance`, or when our error against fp32 exceeds both `--tolerance` and twice that of
   transformers (both sides may use the same CUDA kernels, so agreeing with each other alone
   would not catch a kernel called with the wrong conventions).
2. Throughput. A Qwen3.5-35B-A3B-shaped stack of 4 layers (3 GDN + 1 gated attention; H=2048,
   16 query / 2 KV heads of 256, GDN 16 key / 32 value heads of 128, 256 experts top-8 of width
   512, shared expert 512) with a small vocabulary, so that the layers dominate; bf16 random
   weights made on the GPU from an HF-style config dict (no checkpoint on disk); LoRA r=16 on
   every target (experts included), base frozen. Printed: forward + backward tokens/s of
   `--steps` steps of `--seq` tokens after warm-up, and the peak GPU memory.

Exits with a clear message on a machine without CUDA. Run from the repository root:

    python -m benchmarks.gpu_parity [--tolerance 2e-2] [--seq 4096] [--steps 5]
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from torch import nn

from lora_trainer.bridge.build import build_model_from_hf
from lora_trainer.lora.config import LoraConfig
from lora_trainer.lora.inject import inject_lora
from lora_trainer.parallel.config import ParallelConfig
from lora_trainer.parallel.state import destroy_parallel, initialize_parallel
from lora_trainer.qwen35.model import Qwen35Model
from lora_trainer.qwen35.spec import Qwen35Spec
from lora_trainer.qwen35.transformer_config import build_transformer_config
from tests.checkpoints import (
    DENSE_SIZES,
    KIND_DENSE,
    KIND_MOE,
    KIND_MOE_VL,
    KINDS,
    MOE_SIZES,
    TEXT_SIZES,
    VISION_SIZES,
    fixed_batch,
    load_hf_model,
    save_checkpoint,
)

CUDA_KERNELS = ("fla", "causal_conv1d", "flash_attn")
STACK_CONFIG: dict[str, object] = dict(
    model_type="qwen3_5_moe_text",
    vocab_size=4096,
    hidden_size=2048,
    num_hidden_layers=4,
    layer_types=["linear_attention"] * 3 + ["full_attention"],
    num_attention_heads=16,
    num_key_value_heads=2,
    head_dim=256,
    linear_num_key_heads=16,
    linear_num_value_heads=32,
    linear_key_head_dim=128,
    linear_value_head_dim=128,
    linear_conv_kernel_dim=4,
    num_experts=256,
    num_experts_per_tok=8,
    moe_intermediate_size=512,
    shared_expert_intermediate_size=512,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
)


def require_cuda() -> torch.device:
    """The current CUDA device; exits with a message when there is none."""
    if not torch.cuda.is_available():
        sys.exit(
            f"benchmarks/gpu_parity.py needs an NVIDIA GPU: torch {torch.__version__} reports "
            f"torch.cuda.is_available() == False (built with CUDA {torch.version.cuda}). "
            "Run it on a CUDA machine with a CUDA build of torch (benchmarks/gpu_check.sh)."
        )
    return torch.device("cuda", torch.cuda.current_device())


def build_default_init_model(kind: str, seed: int = 0) -> nn.Module:
    """The tiny test architecture `kind` (tests/checkpoints.py sizes and classes) with the weights
    transformers initialises it with, fp32."""
    torch.manual_seed(seed)
    if kind == KIND_DENSE:
        return transformers.Qwen3_5ForCausalLM(transformers.Qwen3_5TextConfig(**TEXT_SIZES, **DENSE_SIZES))
    if kind == KIND_MOE:
        return transformers.Qwen3_5MoeForCausalLM(transformers.Qwen3_5MoeTextConfig(**TEXT_SIZES, **MOE_SIZES))
    if kind == KIND_MOE_VL:
        config = transformers.Qwen3_5MoeConfig(
            text_config=dict(TEXT_SIZES, **MOE_SIZES), vision_config=VISION_SIZES, tie_word_embeddings=False
        )
        return transformers.Qwen3_5MoeForConditionalGeneration(config)
    raise ValueError(f"unknown checkpoint kind {kind!r}; use one of {KINDS}")


def relative_diff(a: torch.Tensor, b: torch.Tensor, scale: float) -> float:
    """max |a - b| / scale, computed in fp32."""
    return (a.float() - b.float()).abs().max().item() / scale


def check_parity(kind: str, workdir: Path, device: torch.device, tolerance: float) -> bool:
    """Compare our bf16 logits with transformers' bf16 logits for checkpoint `kind`; print them."""
    extra = dict(packed_experts=True, with_mtp=True) if kind == KIND_MOE_VL else {}
    path = save_checkpoint(build_default_init_model(kind), workdir / kind, dtype=torch.bfloat16, **extra)
    input_ids = fixed_batch(vocab_size=256, batch=2, seq=64)
    reference = load_hf_model(path)
    with torch.no_grad():
        fp32_logits = reference(input_ids=input_ids).logits
        theirs = reference.to(device=device, dtype=torch.bfloat16)(input_ids=input_ids.to(device)).logits
        ours_model = build_model_from_hf(path, ParallelConfig(), params_dtype=torch.bfloat16).model
        ours = ours_model.to(device).eval()(input_ids.to(device))
    scale = fp32_logits.abs().max().item()
    versus_theirs = relative_diff(ours, theirs, scale)
    ours_error = relative_diff(ours.cpu(), fp32_logits, scale)
    theirs_error = relative_diff(theirs.cpu(), fp32_logits, scale)
    passed = versus_theirs <= tolerance and ours_error <= max(tolerance, 2 * theirs_error)
    print(
        f"{kind:7s} logit scale {scale:7.3f}   max|ours - transformers| / scale {versus_theirs:.2e}   "
        f"vs fp32: ours {ours_error:.2e}, transformers {theirs_error:.2e}   "
        f"{'ok' if passed else f'FAIL (tolerance {tolerance:.0e})'}"
    )
    return passed


def randomize_on_device_(model: nn.Module, seed: int) -> None:
    """Random weights of a useful scale, drawn where each parameter lives (the scheme of
    tests/checkpoints.randomize_ on our parameter names)."""
    generator = torch.Generator(next(model.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("A_log"):
                param.uniform_(1.0, 16.0, generator=generator).log_()
            elif name.endswith("out_norm.weight"):
                param.normal_(1.0, 0.2, generator=generator)
            elif param.ndim == 1:
                param.normal_(0.0, 0.2, generator=generator)
            else:
                param.normal_(0.0, 1.0 / math.sqrt(param[0].numel()), generator=generator)


def build_stack(device: torch.device) -> Qwen35Model:
    """The 35B-A3B-shaped stack with random bf16 weights on `device` and LoRA on every target."""
    spec = Qwen35Spec.from_config_dict(dict(STACK_CONFIG), source="STACK_CONFIG")
    model = Qwen35Model(spec, build_transformer_config(spec, ParallelConfig(), torch.bfloat16)).to(device)
    randomize_on_device_(model, seed=0)
    inject_lora(model, LoraConfig())
    return model.to(device).train()


def training_step(model: Qwen35Model, input_ids: torch.Tensor) -> None:
    """Forward, next-token cross-entropy and backward into the LoRA parameters."""
    logits = model(input_ids)
    F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten()).backward()


def measure_throughput(device: torch.device, seq: int, steps: int, warmup: int) -> None:
    """Print forward + backward tokens/s and the peak memory of the stack at `seq` tokens."""
    model = build_stack(device)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, int(STACK_CONFIG["vocab_size"]), (1, seq), generator=generator).to(device)
    for _ in range(warmup):
        training_step(model, input_ids)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        training_step(model, input_ids)
    torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    print(
        f"Qwen3.5-35B-A3B-shaped 4-layer stack ({total / 1e9:.2f}B params, {trainable / 1e6:.1f}M LoRA "
        f"r=16 trainable), bf16, batch 1 x {seq} tokens, {steps} steps after {warmup} warm-up:\n"
        f"  forward+backward {steps * seq / seconds:,.0f} tokens/s ({seconds / steps * 1e3:.0f} ms/step), "
        f"peak memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tolerance", type=float, default=2e-2, help="max relative logit diff in bf16")
    parser.add_argument("--seq", type=int, default=4096, help="tokens per step of the throughput run")
    parser.add_argument("--steps", type=int, default=5, help="timed steps of the throughput run")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    args = parser.parse_args()
    device = require_cuda()
    kernels = ", ".join(f"{name} {'yes' if importlib.util.find_spec(name) else 'no'}" for name in CUDA_KERNELS)
    print(f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, CUDA {torch.version.cuda}; {kernels}")
    initialize_parallel(ParallelConfig())
    try:
        with tempfile.TemporaryDirectory(prefix="gpu_parity_") as workdir:
            results = [check_parity(kind, Path(workdir), device, args.tolerance) for kind in KINDS]
        measure_throughput(device, args.seq, args.steps, args.warmup)
    finally:
        destroy_parallel()
    if not all(results):
        sys.exit(f"bf16 parity failed for {[k for k, ok in zip(KINDS, results) if not ok]}")


if __name__ == "__main__":
    main()
