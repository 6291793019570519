"""Peak memory of the background export workers at real widths, made from a save's snapshot.

Uses the base of `export_check_scale.py` (written into `--work DIR/base` when missing: 2 layers at
Qwen3.5-35B-A3B widths, hidden 2048, 256 routed experts of width 512, bf16, ~5 GB) and its random
rank-16 adapter on every LoRA target, snapshotted as a save on 2 expert-parallel ranks writes it
(each rank its half of every expert module, rank 0 also the dense linears). Then the export runs
as a training run makes it: 2 worker processes `python -m lora_trainer.export SAVE --rank K
--world-size 2` (`--workers 2`), or as an interrupted export is completed, in one process
`python -m lora_trainer.export SAVE` (`--workers 1`). Prints each worker's peak RSS (its VmHWM at
exit), that of a process that only imports the export (`--help`: the baseline), and the size of
the adapter's factors; `--adapter-only` leaves the merged checkpoint out of the job.

    python benchmarks/background_export_memory.py --work DIR [--workers 2] [--adapter-only]

The workers run the library this script imports: to measure an older one, put its checkout first
on PYTHONPATH (its `benchmarks/export_check_scale.py` and snapshot writer are used).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

import lora_trainer
from benchmarks.export_check_scale import config, random_adapter, shapes_of, write_base
from lora_trainer.export.snapshot import write_factors, write_job

SNAPSHOT_RANKS = 2


def write_snapshot(save: Path, base: Path, write_merged: bool) -> int:
    """The snapshot of a save on SNAPSHOT_RANKS expert-parallel ranks; returns the bytes of the
    adapter's factors."""
    cfg = json.loads((base / "config.json").read_text())
    adapter = random_adapter(shapes_of(config(cfg["num_hidden_layers"], cfg["num_experts"])))
    for rank in range(SNAPSHOT_RANKS):
        factors: dict[tuple[str, int | None], tuple[torch.Tensor, torch.Tensor]] = {}
        if rank == 0:
            factors.update({(m, None): (w.a, w.b) for m, w in adapter.linears.items()})
        for key, weights in adapter.experts.items():
            per_rank = weights.a.shape[0] // SNAPSHOT_RANKS
            for expert in range(rank * per_rank, (rank + 1) * per_rank):
                factors[(key, expert)] = (weights.a[expert], weights.b[expert])
        write_factors(save, rank, factors)
    write_job(
        save,
        step=1,
        base_dir=str(base),
        snapshot_ranks=SNAPSHOT_RANKS,
        write_adapter=True,
        write_merged=write_merged,
        profile="peft",
        check_input_ids=None,
        r=adapter.r,
        alpha=adapter.alpha,
        use_rslora=adapter.use_rslora,
        text_prefix=adapter.text_prefix,
    )
    linears = sum((w.a.numel() + w.b.numel()) * 4 for w in adapter.linears.values())
    return linears + sum((w.a.numel() + w.b.numel()) * 4 for w in adapter.experts.values())


# Runs `python -m lora_trainer.export ARGS` and writes the process's own peak RSS (VmHWM, kB) into
# the file named first. (A child's getrusage peak would count the pages it shared with this
# process before exec.)
_MEASURED = """
import atexit, runpy, sys
peak_file = sys.argv.pop(1)
def report():
    status = open("/proc/self/status").read().splitlines()
    peak = next(line for line in status if line.startswith("VmHWM:"))
    open(peak_file, "w").write(peak.split()[1])
atexit.register(report)
sys.argv[0] = "lora_trainer.export"
runpy.run_module("lora_trainer.export", run_name="__main__", alter_sys=True)
"""


def peak_rss(work: Path, arguments: list[list[str]]) -> tuple[list[int], float]:
    """Run `python -m lora_trainer.export` with each of `arguments` at once; each one's peak RSS
    in bytes, and the wall time until all ended."""
    root = str(Path(lora_trainer.__file__).resolve().parent.parent)
    env = dict(os.environ, TORCHDYNAMO_DISABLE="1", CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    files = [work / f"peak-{index}" for index in range(len(arguments))]
    started = time.perf_counter()
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", _MEASURED, str(file), *args], env=env, stdout=subprocess.DEVNULL
        )
        for file, args in zip(files, arguments, strict=True)
    ]
    for args, process in zip(arguments, processes, strict=True):
        if process.wait() != 0:
            raise SystemExit(
                f"lora_trainer.export {' '.join(args)} exited with {process.returncode}"
            )
    seconds = time.perf_counter() - started
    peaks = [int(file.read_text()) * 1024 for file in files]
    for file in files:
        file.unlink()
    return peaks, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--workers", type=int, choices=(1, 2), default=2)
    parser.add_argument("--adapter-only", action="store_true")
    args = parser.parse_args()
    base = args.work / "base"
    if not (base / "config.json").is_file():
        base.mkdir(parents=True, exist_ok=True)
        write_base(base, config(2, 256))
    save = args.work / "background_save"
    shutil.rmtree(save, ignore_errors=True)
    adapter_bytes = write_snapshot(save, base, write_merged=not args.adapter_only)
    (baseline,), _ = peak_rss(args.work, [["--help"]])
    if args.workers == 1:
        peaks, seconds = peak_rss(args.work, [[str(save)]])
    else:
        peaks, seconds = peak_rss(
            args.work, [[str(save), "--rank", str(r), "--world-size", "2"] for r in (0, 1)]
        )
    shutil.rmtree(save, ignore_errors=True)
    what = "adapter" if args.adapter_only else "adapter + merged"
    print(
        f"{lora_trainer.__file__}: {what}, {args.workers} worker(s), adapter factors "
        f"{adapter_bytes / 2**20:.0f} MiB, export {seconds:.1f} s"
    )
    for rank, peak in enumerate(peaks):
        print(
            f"  worker {rank}: peak RSS {peak / 2**20:.0f} MiB, "
            f"{(peak - baseline) / 2**20:.0f} MiB above the {baseline / 2**20:.0f} MiB of a "
            "process that only imports the export"
        )


if __name__ == "__main__":
    main()
