"""Peak memory per rank of a save's HF export on 2 ranks (EP=2), at real widths.

Uses the base and adapter of `export_check_scale.py` (run it with `--work DIR --skip-check`
first): 2 spawned processes on a gloo group, each holding its expert-parallel half of the routed
experts' LoRA factors (rank 0 also the dense ones, as the first data-parallel replica), export the
adapter and the merged checkpoint the way a save does:

- `gather` (how a save exported before; run it with the older library first on PYTHONPATH):
  `all_gather_object` of every rank's factors, the whole adapter on every rank, then `export_hf`;
- `parts`: each rank passes only its own factors (`DistributedAdapter`) to `export_hf`.

Prints each rank's peak RSS above its RSS before the export (VmHWM, reset through
/proc/self/clear_refs) and the export's time.

    python benchmarks/export_memory.py --work DIR [--mode parts|gather]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from benchmarks.export_check_scale import config, random_adapter, reset_peak, rss, shapes_of
from lora_trainer.export.hf_adapter_weights import HFAdapter, HFExpertLoraWeights, HFLoraWeights
from lora_trainer.export.hf_export import export_hf
from lora_trainer.parallel.collectives import merge_from_all_ranks

WORLD = 2


def local_factors(
    adapter: HFAdapter, rank: int
) -> dict[tuple[str, int | None], tuple[torch.Tensor, torch.Tensor]]:
    """Rank `rank`'s factors under EP=2: half of every expert module, the linears on rank 0."""
    local: dict[tuple[str, int | None], tuple[torch.Tensor, torch.Tensor]] = {}
    if rank == 0:
        local.update(
            {(module, None): (w.a.clone(), w.b.clone()) for module, w in adapter.linears.items()}
        )
    for key, weights in adapter.experts.items():
        per_rank = weights.a.shape[0] // WORLD
        for expert in range(rank * per_rank, (rank + 1) * per_rank):
            local[(key, expert)] = (weights.a[expert].clone(), weights.b[expert].clone())
    return local


def whole(factors: dict, template: HFAdapter) -> HFAdapter:
    experts: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = defaultdict(dict)
    linears = {}
    for (module, expert), (a, b) in factors.items():
        if expert is None:
            linears[module] = HFLoraWeights(a, b)
        else:
            experts[module][expert] = (a, b)
    stacked = {
        module: HFExpertLoraWeights(
            torch.stack([e[i][0] for i in sorted(e)]), torch.stack([e[i][1] for i in sorted(e)])
        )
        for module, e in experts.items()
    }
    return HFAdapter(
        linears,
        stacked,
        template.r,
        template.alpha,
        template.use_rslora,
        template.text_prefix,
        template.base_model_name_or_path,
    )


def worker(rank: int, work: Path, out: Path, mode: str, port: int, results: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    cfg = json.loads((work / "base" / "config.json").read_text())
    template = random_adapter(shapes_of(config(cfg["num_hidden_layers"], cfg["num_experts"])))
    local = local_factors(template, rank)
    if mode == "parts":
        from lora_trainer.export.hf_adapter_weights import DistributedAdapter, on_meta

        parts = DistributedAdapter(
            on_meta(template), local, len(template.linears) + len(template.experts)
        )
    template = HFAdapter(
        {},
        {},
        template.r,
        template.alpha,
        template.use_rslora,
        template.text_prefix,
        template.base_model_name_or_path,
    )
    dist.barrier()
    baseline = reset_peak()
    started = time.perf_counter()
    adapter = whole(merge_from_all_ranks(local), template) if mode == "gather" else parts
    export_hf(
        adapter,
        work / "base",
        out,
        step=1,
        rank=rank,
        world_size=WORLD,
        barrier=dist.barrier,
        progress=False,
    )
    seconds = time.perf_counter() - started
    results[rank] = (rss()[1] - baseline, baseline, seconds)
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--mode", choices=("parts", "gather"), default="parts")
    args = parser.parse_args()
    with (
        tempfile.TemporaryDirectory(prefix="export_memory-", dir=args.work) as tmp,
        mp.Manager() as manager,
    ):
        results = manager.dict()
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        mp.spawn(
            worker, args=(args.work, Path(tmp) / "save", args.mode, port, results), nprocs=WORLD
        )
        for rank in sorted(results.keys()):
            peak, baseline, seconds = results[rank]
            print(
                f"{args.mode}: rank {rank} peak RSS {peak / 2**20:.0f} MiB above "
                f"{baseline / 2**20:.0f} MiB, "
                f"export {seconds:.1f} s"
            )
        shutil.rmtree(Path(tmp) / "save", ignore_errors=True)


if __name__ == "__main__":
    main()
