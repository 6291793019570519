"""Peak activation memory and time of one LoRA forward + backward under each `model.recompute`.

The 8-expert MoE of benchmarks/lora_speed.py (hidden 512, 8 layers) with r=16 LoRA on every
linear, one row of 4,096 tokens, fp32, TP=1. Each mode runs in its own fresh process with glibc's
mmap threshold pinned at 64 KiB, so every tensor-sized allocation is returned to the system when
freed and the resident set size follows the live tensors; a sampler thread polls it during the
step. Activation memory is the step's peak RSS minus the RSS just before it (model, LoRA factors
and their gradients from a warm-up step already allocated). Time: one model per mode in this
process, their steps interleaved, each step's CPU time of this process (with one thread, the
compute time, which a shared machine's load does not inflate as it does wall time); the median
per mode. Printed: a table with each mode against `none` (goal for `full`: at most half
the memory for at most 1.4x the time).

    python benchmarks/recompute_memory.py [--threads N] [--tokens 4096] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

PAGE = os.sysconf("SC_PAGE_SIZE")
MODES = ("none", "selective", "full")


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * PAGE


class PeakSampler(threading.Thread):
    """Polls this process's RSS until stopped; `peak` is the largest value seen."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = rss_bytes()
        self.running = True

    def run(self) -> None:
        while self.running:
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.0005)

    def stop(self) -> int:
        self.running = False
        self.join()
        return max(self.peak, rss_bytes())


def build(checkpoint: Path, mode: str) -> tuple[torch.nn.Module, Callable[[int], float]]:
    """Our model with LoRA under `mode`, and one timed forward + backward on one row of tokens."""
    from lora_speed import next_token_loss

    from lora_trainer.bridge.build import build_model_from_hf
    from lora_trainer.lora.config import LoraConfig
    from lora_trainer.lora.inject import inject_lora
    from lora_trainer.parallel.config import ParallelConfig
    from lora_trainer.qwen35.recompute import Recompute

    model = build_model_from_hf(checkpoint, ParallelConfig(), recompute=Recompute(mode)).model
    inject_lora(model, LoraConfig(r=16, alpha=32.0))
    model.train()

    def step(tokens: int) -> float:
        input_ids = torch.randint(
            0, model.spec.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0)
        )
        model.zero_grad(set_to_none=False)
        start = time.process_time()
        next_token_loss(model(input_ids), input_ids).backward()
        return time.process_time() - start

    return model, step


def child(checkpoint: str, mode: str, tokens: int) -> None:
    """One mode in this fresh process: a warm-up step, then the measured one; prints JSON."""
    from lora_trainer.parallel.config import ParallelConfig
    from lora_trainer.parallel.state import destroy_parallel, initialize_parallel

    initialize_parallel(ParallelConfig())
    _, step = build(Path(checkpoint), mode)
    step(tokens)
    before = rss_bytes()
    sampler = PeakSampler()
    sampler.start()
    step(tokens)
    peak = sampler.stop()
    destroy_parallel()
    print(json.dumps({"mode": mode, "activation_bytes": peak - before}))


def interleaved_seconds(checkpoint: Path, tokens: int, repeats: int) -> dict[str, float]:
    from lora_trainer.parallel.config import ParallelConfig
    from lora_trainer.parallel.state import destroy_parallel, initialize_parallel

    initialize_parallel(ParallelConfig())
    try:
        steps = {mode: build(checkpoint, mode)[1] for mode in MODES}
        times: dict[str, list[float]] = {mode: [] for mode in MODES}
        for index in range(repeats + 1):
            for mode, step in steps.items():
                seconds = step(tokens)
                if index > 0:
                    times[mode].append(seconds)
    finally:
        destroy_parallel()
    return {mode: statistics.median(values) for mode, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads"
    )
    parser.add_argument("--tokens", type=int, default=4096, help="tokens in the one row")
    parser.add_argument(
        "--repeats", type=int, default=2, help="timed steps per mode after one warm-up"
    )
    parser.add_argument("--child", nargs=2, metavar=("CHECKPOINT", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        child(args.child[0], args.child[1], args.tokens)
        return
    from lora_speed import build_hf
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", TORCHDYNAMO_DISABLE="1")
    results = {}
    with tempfile.TemporaryDirectory(prefix="recompute_memory_") as workdir:
        path = Path(workdir) / "moe_e8_top2"
        build_hf("moe_e8_top2").save_pretrained(path)
        for mode in MODES:
            run = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--threads",
                    str(args.threads),
                    "--tokens",
                    str(args.tokens),
                    "--child",
                    str(path),
                    mode,
                ],
                env=env,
                capture_output=True,
                text=True,
                check=False,
            )
            if run.returncode != 0:
                raise SystemExit(f"error: the {mode} run failed:\n{run.stderr[-3000:]}")
            results[mode] = json.loads(run.stdout.strip().splitlines()[-1])
        for mode, seconds in interleaved_seconds(path, args.tokens, args.repeats).items():
            results[mode]["seconds"] = seconds
    base = results["none"]
    print(
        f"torch {torch.__version__}, {args.threads} threads, fp32, 8-expert MoE (hidden 512, 8 "
        "layers), "
        f"LoRA r=16, 1 x {args.tokens} tokens\n"
    )
    print("| recompute | activation MiB | vs none | step CPU ms | vs none |")
    print("|---|---|---|---|---|")
    for mode in MODES:
        result = results[mode]
        print(
            f"| {mode} | {result['activation_bytes'] / 2**20:.0f} | "
            f"{result['activation_bytes'] / base['activation_bytes']:.2f} | "
            f"{result['seconds'] * 1e3:.0f} | "
            f"{result['seconds'] / base['seconds']:.2f} |"
        )


if __name__ == "__main__":
    main()
