"""CPU speed of our pure-torch chunk_gated_delta_rule against transformers'
torch_chunk_gated_delta_rule.

Times forward + backward on the same inputs and the same torch threads, alternating the two so
that load drift on a shared machine hits both alike, and prints the medians and the ratio
ours / transformers (below 1 means ours is faster).

    python benchmarks/kernel_speed.py [--threads N] [--repeats R]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.models.qwen3_5.modeling_qwen3_5 import torch_chunk_gated_delta_rule
from transformers.utils import logging as hf_logging

from lora_trainer.kernels import chunk_gated_delta_rule


@dataclass(frozen=True)
class Case:
    """One benchmark shape: q, k [B, T, Hk, Dk]; v [B, T, Hv, Dv]."""

    name: str
    batch: int
    seq_len: int
    key_heads: int
    value_heads: int
    key_dim: int
    value_dim: int


CASES = (
    Case("small GVA", 1, 2048, 4, 8, 64, 64),
    Case("Qwen3.5-35B-A3B TP=8 shard", 1, 4096, 2, 4, 128, 128),
)


def make_inputs(case: Case) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Leaf tensors q, k, v, g, beta (fixed seed) and the output cotangent."""
    gen = torch.Generator().manual_seed(0)
    b, t = case.batch, case.seq_len
    q = torch.randn(b, t, case.key_heads, case.key_dim, generator=gen)
    k = torch.randn(b, t, case.key_heads, case.key_dim, generator=gen)
    v = torch.randn(b, t, case.value_heads, case.value_dim, generator=gen)
    g = F.logsigmoid(torch.randn(b, t, case.value_heads, generator=gen))
    beta = torch.rand(b, t, case.value_heads, generator=gen)
    d_out = torch.randn(b, t, case.value_heads, case.value_dim, generator=gen)
    return [x.requires_grad_() for x in (q, k, v, g, beta)], d_out


def ours(inputs: list[torch.Tensor]) -> torch.Tensor:
    return chunk_gated_delta_rule(*inputs)[0]


def transformers_reference(inputs: list[torch.Tensor]) -> torch.Tensor:
    return torch_chunk_gated_delta_rule(*inputs, use_qk_l2norm_in_kernel=True)[0]


def forward_backward_seconds(
    fn: Callable[[list[torch.Tensor]], torch.Tensor],
    inputs: list[torch.Tensor],
    d_out: torch.Tensor,
) -> float:
    for x in inputs:
        x.grad = None
    start = time.perf_counter()
    fn(inputs).backward(d_out)
    return time.perf_counter() - start


def bench(case: Case, repeats: int, warmup: int) -> None:
    inputs, d_out = make_inputs(case)
    with torch.no_grad():
        diff = (ours(inputs) - transformers_reference(inputs)).abs().max().item()
    contenders = {"ours": ours, "transformers": transformers_reference}
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for step in range(warmup + repeats):
        for name, fn in contenders.items():
            seconds = forward_backward_seconds(fn, inputs, d_out)
            if step >= warmup:
                times[name].append(seconds)
    ours_ms, theirs_ms = (statistics.median(times[name]) * 1e3 for name in contenders)
    print(
        f"{case.name}: B={case.batch} T={case.seq_len} Hk={case.key_heads} Hv={case.value_heads} "
        f"Dk={case.key_dim} Dv={case.value_dim}\n"
        f"  ours {ours_ms:9.1f} ms   transformers {theirs_ms:9.1f} ms   "
        f"ratio ours/transformers {ours_ms / theirs_ms:.3f}   max |out diff| {diff:.1e}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads"
    )
    parser.add_argument(
        "--repeats", type=int, default=7, help="timed forward+backward runs per contender"
    )
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs per contender first")
    args = parser.parse_args()
    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {args.threads} threads, "
        f"median of {args.repeats} runs after {args.warmup} warm-up runs"
    )
    for case in CASES:
        bench(case, args.repeats, args.warmup)


if __name__ == "__main__":
    main()
