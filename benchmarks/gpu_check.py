"""The Python side of benchmarks/gpu_check.sh: checks on one CUDA GPU, each appending result rows
(JSON lines: check, result, status) to a results file that `table` prints.

- `kernels`: every CUDA kernel path the model takes (FLA's gated delta rule, causal-conv1d or the
  torch conv, flash-attn or per-segment SDPA), forward and backward in bf16 on random packed
  inputs, against the project's torch path in fp32. Reported: max |diff| / max |reference| of the
  output and of the worst input gradient.
- `logits`: our bf16 model (TP=1, whatever CUDA kernels it finds) on the tiny test architectures
  with transformers' own init, at 4,096 tokens, against transformers in fp32 on the GPU on its
  torch kernels (TF32 off), unpacked and as packed samples (each sample's reference run alone).
  transformers in bf16 with its own kernels gives the rounding floor: ours passes when within
  `--tolerance` of the logit scale, or within twice transformers' own bf16 error.
- `stack`: a Qwen3.5-35B-A3B-width stack (hidden 2048, 16 q / 2 kv heads of 256, GDN 16 key /
  32 value heads of 128, 256 experts top-8 of width 512, shared expert 512; 3 GDN + 1 attention
  layers, small vocabulary), bf16 random weights, LoRA r=16 on every target, base frozen:
  forward + backward tokens/s and peak memory at `--seq` tokens, unpacked and packed.
- `table RESULTS`: prints the rows as one table (standard library only).

    python -m benchmarks.gpu_check kernels|logits|stack --results RESULTS [options]
    python -m benchmarks.gpu_check table RESULTS
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

STACK_CONFIG: dict[str, object] = {
    "model_type": "qwen3_5_moe_text",
    "vocab_size": 4096,
    "hidden_size": 2048,
    "num_hidden_layers": 4,
    "layer_types": ["linear_attention"] * 3 + ["full_attention"],
    "num_attention_heads": 16,
    "num_key_value_heads": 2,
    "head_dim": 256,
    "linear_num_key_heads": 16,
    "linear_num_value_heads": 32,
    "linear_key_head_dim": 128,
    "linear_value_head_dim": 128,
    "linear_conv_kernel_dim": 4,
    "num_experts": 256,
    "num_experts_per_tok": 8,
    "moe_intermediate_size": 512,
    "shared_expert_intermediate_size": 512,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
}
KERNEL_TOLERANCE = 5e-2
PACKED_LENGTHS = (700, 1300, 96, 1, 1999)


class Results:
    """Appends result rows to a JSON-lines file and echoes them."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def add(self, check: str, result: str, ok: bool | None) -> None:
        """One row: ok True / False for a check that passes or fails, None for a figure."""
        status = "info" if ok is None else "ok" if ok else "FAIL"
        with self.path.open("a") as out:
            out.write(json.dumps({"check": check, "result": result, "status": status}) + "\n")
        print(f"[{status}] {check}: {result}", flush=True)


def require_cuda() -> Any:
    """The current CUDA device; exits with a message when there is none."""
    import torch

    if not torch.cuda.is_available():
        sys.exit(
            f"benchmarks/gpu_check.py needs an NVIDIA GPU: torch {torch.__version__} (CUDA build "
            f"{torch.version.cuda}) reports torch.cuda.is_available() == False"
        )
    return torch.device("cuda", torch.cuda.current_device())


def relative(a: Any, b: Any) -> float:
    """max |a - b| / max |b|, in fp32."""
    a, b = a.float(), b.float()
    return (a - b).abs().max().item() / max(b.abs().max().item(), 1e-30)


def compare_kernel(
    results: Results,
    name: str,
    backend: str,
    run: Callable[..., Any],
    reference: Callable[..., Any],
    inputs: list[Any],
) -> None:
    """Forward + backward of `run` on bf16 copies of `inputs` against `reference` on fp32 copies."""
    import torch

    generator = torch.Generator(inputs[0].device).manual_seed(1)
    fast = [x.detach().to(torch.bfloat16).requires_grad_() for x in inputs]
    exact = [x.detach().float().requires_grad_() for x in inputs]
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = run(*fast)
    weight = torch.randn(out.shape, device=out.device, generator=generator)
    (out.float() * weight).sum().backward()
    torch.cuda.synchronize()
    milliseconds = (time.perf_counter() - start) * 1e3
    expected = reference(*exact)
    (expected * weight).sum().backward()
    out_error = relative(out, expected)
    grad_error = max(relative(f.grad, e.grad) for f, e in zip(fast, exact, strict=True))
    ok = out_error <= KERNEL_TOLERANCE and grad_error <= KERNEL_TOLERANCE
    results.add(
        f"kernel {name}",
        f"{backend}: out {out_error:.1e}, grads {grad_error:.1e} of max|ref| (bf16 vs fp32 torch "
        "path), "
        f"{milliseconds:.0f} ms fwd+bwd incl. first-call compile",
        ok,
    )


def check_kernels(results: Results, args: argparse.Namespace) -> None:
    import importlib

    import torch
    import torch.nn.functional as F

    from lora_trainer.kernels import attention as attention_module
    from lora_trainer.kernels import causal_attention, causal_conv1d, chunk_gated_delta_rule
    from lora_trainer.kernels import gated_delta_rule as gdr

    conv_module = importlib.import_module("lora_trainer.kernels.causal_conv1d")
    device = require_cuda()
    generator = torch.Generator(device).manual_seed(0)
    lengths = torch.tensor(PACKED_LENGTHS)
    tokens = int(lengths.sum())
    cu_seqlens = F.pad(lengths.cumsum(0), (1, 0)).to(device)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=device, generator=generator)

    q, k = randn(1, tokens, 4, 128), randn(1, tokens, 4, 128)
    v = randn(1, tokens, 8, 128)
    g = F.logsigmoid(randn(1, tokens, 8) + 2.0)
    beta = torch.rand(1, tokens, 8, device=device, generator=generator)
    backend = "FLA" if gdr._fla_available() else "torch (fla not installed)"
    compare_kernel(
        results,
        "gated delta rule, packed",
        backend,
        lambda *x: chunk_gated_delta_rule(*x, cu_seqlens=cu_seqlens)[0],
        lambda *x: gdr._torch_chunk_gated_delta_rule(*x, None, False, cu_seqlens, True)[0],
        [q, k, v, g, beta],
    )
    for channels, packed in ((4096, True), (100, False)):
        x = randn(1, tokens, channels).transpose(1, 2)
        weight = randn(channels, 4) * 0.5
        fits = conv_module._use_cuda_kernel(x) and conv_module._kernel_fits(
            x, weight, cu_seqlens if packed else None
        )
        installed = conv_module._causal_conv1d_available()
        backend = (
            "causal-conv1d"
            if fits
            else "torch conv" + ("" if installed else " (causal-conv1d not installed)")
        )
        packing = cu_seqlens if packed else None
        compare_kernel(
            results,
            f"causal conv1d, {channels} channels, {'packed' if packed else 'rows'}",
            backend,
            lambda x, w, packing=packing: causal_conv1d(x, w, cu_seqlens=packing),
            lambda x, w, packing=packing: conv_module._torch_causal_conv1d(x, w, "silu", packing),
            [x, weight],
        )
    q, k, v = randn(1, tokens, 16, 256), randn(1, tokens, 2, 256), randn(1, tokens, 2, 256)
    backend = (
        "flash-attn varlen" if attention_module._flash_attn_available() else "SDPA per segment"
    )
    scale = 256**-0.5
    compare_kernel(
        results,
        "causal attention, packed",
        backend,
        lambda *x: causal_attention(*x, scale=scale, cu_seqlens=cu_seqlens),
        lambda *x: explicit_attention(*x, scale=scale, cu_seqlens=cu_seqlens),
        [q, k, v],
    )


def explicit_attention(q: Any, k: Any, v: Any, *, scale: float, cu_seqlens: Any) -> Any:
    """Softmax attention written out per sample in the inputs' dtype: [1, T, H, D] in and out."""
    import torch

    group = q.shape[2] // k.shape[2]
    bounds = cu_seqlens.tolist()
    outs = []
    for start, end in itertools.pairwise(bounds):
        qs, ks, vs = q[0, start:end], k[0, start:end], v[0, start:end]
        ks, vs = ks.repeat_interleave(group, dim=1), vs.repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", qs, ks) * scale
        causal = torch.ones(end - start, end - start, dtype=torch.bool, device=q.device).tril()
        outs.append(
            torch.einsum("hqk,khd->qhd", scores.masked_fill(~causal, float("-inf")).softmax(-1), vs)
        )
    return torch.cat(outs).unsqueeze(0)


def build_default_init_model(kind: str, seed: int = 0) -> Any:
    """The tiny test architecture `kind` with the weights transformers initialises it with, fp32.
    (tests.checkpoints.randomize_'s large weights amplify bf16 rounding so much that transformers
    in bf16 misses its own fp32 logits by 30-95% of the logit scale.)"""
    import torch
    import transformers

    from tests.checkpoints import (
        DENSE_SIZES,
        KIND_DENSE,
        KIND_MOE,
        MOE_SIZES,
        TEXT_SIZES,
        VISION_SIZES,
    )

    torch.manual_seed(seed)
    if kind == KIND_DENSE:
        return transformers.Qwen3_5ForCausalLM(
            transformers.Qwen3_5TextConfig(**TEXT_SIZES, **DENSE_SIZES)
        )
    if kind == KIND_MOE:
        return transformers.Qwen3_5MoeForCausalLM(
            transformers.Qwen3_5MoeTextConfig(**TEXT_SIZES, **MOE_SIZES)
        )
    config = transformers.Qwen3_5MoeConfig(
        text_config=dict(TEXT_SIZES, **MOE_SIZES),
        vision_config=VISION_SIZES,
        tie_word_embeddings=False,
    )
    return transformers.Qwen3_5MoeForConditionalGeneration(config)


def check_logits(results: Results, args: argparse.Namespace) -> None:
    import torch
    import torch.nn.functional as F

    from lora_trainer.bridge.build import build_model_from_hf
    from lora_trainer.kernels.transformers_reference import torch_kernels_only
    from lora_trainer.parallel.config import ParallelConfig
    from lora_trainer.parallel.state import destroy_parallel, initialize_parallel
    from tests.checkpoints import KINDS, load_hf_model, save_checkpoint

    device = require_cuda()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    input_ids = torch.randint(0, 256, (1, args.seq), generator=torch.Generator().manual_seed(0)).to(
        device
    )
    lengths = torch.tensor(PACKED_LENGTHS)
    lengths[-1] += args.seq - int(lengths.sum())
    bounds = F.pad(lengths.cumsum(0), (1, 0)).tolist()
    positions = torch.cat([torch.arange(n) for n in lengths.tolist()]).unsqueeze(0).to(device)
    initialize_parallel(ParallelConfig())
    try:
        with tempfile.TemporaryDirectory(prefix="gpu_check_") as workdir:
            for kind in KINDS:
                extra = {"packed_experts": True, "with_mtp": True} if kind == "moe_vl" else {}
                model = build_default_init_model(kind)
                path = save_checkpoint(model, Path(workdir) / kind, dtype=torch.bfloat16, **extra)
                reference = load_hf_model(path).to(device)
                with torch.no_grad():
                    with torch_kernels_only():
                        fp32 = reference(input_ids=input_ids).logits
                        pieces = [input_ids[:, s:e] for s, e in itertools.pairwise(bounds)]
                        fp32_alone = torch.cat(
                            [reference(input_ids=piece).logits for piece in pieces], dim=1
                        )
                    theirs = reference.to(torch.bfloat16)(input_ids=input_ids).logits
                    del reference
                    ours_model = build_model_from_hf(
                        path, ParallelConfig(), params_dtype=torch.bfloat16
                    ).model.eval()
                    ours = ours_model(input_ids)
                    ours_packed = ours_model(
                        input_ids, positions, torch.tensor(bounds, device=device)
                    )
                    del ours_model
                scale = fp32.abs().max().item()
                floor = (theirs.float() - fp32).abs().max().item() / scale
                for label, logits, expected in (
                    ("rows", ours, fp32),
                    ("packed", ours_packed, fp32_alone),
                ):
                    error = (logits.float() - expected).abs().max().item() / scale
                    ok = error <= max(args.tolerance, 2 * floor)
                    results.add(
                        f"logits {kind}, {label}, {args.seq} tokens",
                        f"ours bf16 vs transformers fp32: {error:.1e} of logit scale {scale:.2f} "
                        f"(transformers bf16: {floor:.1e})",
                        ok,
                    )
                torch.cuda.empty_cache()
    finally:
        destroy_parallel()


def randomize_on_device_(model: Any, seed: int) -> None:
    """Random weights of a useful scale, drawn where each parameter lives."""
    import math

    import torch

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


def check_stack(results: Results, args: argparse.Namespace) -> None:
    import torch
    import torch.nn.functional as F

    from lora_trainer.lora.config import LoraConfig
    from lora_trainer.lora.inject import inject_lora
    from lora_trainer.parallel.config import ParallelConfig
    from lora_trainer.parallel.state import destroy_parallel, initialize_parallel
    from lora_trainer.qwen35.model import Qwen35Model
    from lora_trainer.qwen35.spec import Qwen35Spec
    from lora_trainer.qwen35.transformer_config import build_transformer_config

    device = require_cuda()
    initialize_parallel(ParallelConfig())
    try:
        spec = Qwen35Spec.from_config_dict(dict(STACK_CONFIG), source="STACK_CONFIG")
        model = Qwen35Model(
            spec, build_transformer_config(spec, ParallelConfig(), torch.bfloat16)
        ).to(device)
        randomize_on_device_(model, seed=0)
        inject_lora(model, LoraConfig())
        model.train()
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        generator = torch.Generator().manual_seed(0)
        input_ids = torch.randint(
            0, int(STACK_CONFIG["vocab_size"]), (1, args.seq), generator=generator
        ).to(device)
        lengths = torch.full((16,), args.seq // 16)
        lengths[-1] += args.seq - int(lengths.sum())
        cu_seqlens = F.pad(lengths.cumsum(0), (1, 0)).to(device)
        positions = torch.cat([torch.arange(n) for n in lengths.tolist()]).unsqueeze(0).to(device)

        def step(packed: bool) -> None:
            model.zero_grad(set_to_none=True)
            logits = model(input_ids, positions, cu_seqlens) if packed else model(input_ids)
            F.cross_entropy(logits[0, :-1].float(), input_ids[0, 1:]).backward()

        seconds = {}
        for packed in (False, True):
            for _ in range(args.warmup):
                step(packed)
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
            for _ in range(args.steps):
                step(packed)
            torch.cuda.synchronize(device)
            seconds[packed] = (time.perf_counter() - start) / args.steps
            label = "16 packed samples" if packed else "1 row"
            results.add(
                f"35B-A3B-width 4-layer LoRA step, {label}",
                f"{args.seq / seconds[packed]:,.0f} tokens/s ({seconds[packed] * 1e3:.0f} ms/step "
                f"of {args.seq} "
                f"tokens), peak {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB, "
                f"{trainable / 1e6:.1f}M LoRA params",
                True,
            )
        ratio = seconds[True] / seconds[False]
        results.add("35B-A3B-width packed / unpacked time", f"{ratio:.3f} (goal <= 1.05)", None)
    finally:
        destroy_parallel()


def print_table(path: Path) -> None:
    """The result rows as one aligned table."""
    rows = (
        [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if path.exists()
        else []
    )
    if not rows:
        print(f"no results in {path}")
        return
    width = max(len(row["check"]) for row in rows)
    print(f"{'status':6}  {'check':{width}}  result")
    for row in rows:
        print(f"{row['status']:6}  {row['check']:{width}}  {row['result']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["kernels", "logits", "stack", "table"])
    parser.add_argument("results", nargs="?", type=Path, help="results file (table)")
    parser.add_argument(
        "--results", dest="results_file", type=Path, help="results file to append to"
    )
    parser.add_argument(
        "--tolerance", type=float, default=2e-2, help="max logit error / logit scale in bf16"
    )
    parser.add_argument(
        "--seq", type=int, default=4096, help="tokens of the logits and stack checks"
    )
    parser.add_argument("--steps", type=int, default=3, help="timed steps of the stack")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps of the stack first")
    args = parser.parse_args()
    if args.command == "table":
        print_table(args.results)
        return
    if args.results_file is None:
        parser.error("--results is required")
    checks = {"kernels": check_kernels, "logits": check_logits, "stack": check_stack}
    checks[args.command](Results(args.results_file), args)


if __name__ == "__main__":
    main()
