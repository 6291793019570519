"""Speed and memory of the merged HF export against a plain copy of the same checkpoint.

Generates a random bf16 Qwen3.5-MoE-shaped text checkpoint at the widths of Qwen3.5-35B-A3B
(hidden 2048, 256 routed experts of width 512, GDN and gated-attention layers; at least
`--size-gb`, in shards of at most `--shard-mb` unless one tensor is larger; routed experts packed
or per expert, `--layout`) and a random rank-16 adapter on every LoRA target, in a temporary
directory, then measures in the same run:

- copy: `shutil.copy` of every base file (the floor any export is measured against);
- merged: `write_merged_checkpoint` in a subprocess: its wall time, and its peak RSS above the
  RSS it had after imports and the adapter load, against the largest shard + 256 MiB. The peak
  is the child's own `VmHWM` (Linux), because
  `getrusage(RUSAGE_CHILDREN).ru_maxrss` also counts the parent's RSS at the moment it forked
  (Linux carries the high-water mark across fork and exec); elsewhere it falls back to that;
- adapter: `write_peft_adapter`;
- manifest: sha256 of every merged file (what `export_manifest.json` records).

Copy and merged run `--rounds` times, alternating, so load drift on a shared machine hits both
alike; the best and the median of each are printed, with the ratio merged / copy (goal <= 1.5)
and the export's peak RSS / (largest shard + 256 MiB) (goal <= 1). Deletes everything it wrote.

Each timed run first flushes the page cache to disk, then deletes its own output of the round
before and at once writes into the memory that freed. A virtual machine that hands free memory
back to its host writes into memory freed seconds ago at several GiB/s but into long-free memory
at about 0.4 GiB/s (measured here), so without this the order of the runs would decide the
ratio. A first, untimed round makes those outputs.

    python benchmarks/export_speed.py [--size-gb 1.0] [--shard-mb 300] [--rounds 3] \
        [--layout per_expert|packed]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from lora_trainer.bridge.safetensors_io import INDEX_FILE, shard_file_names
from lora_trainer.export.hf_adapter_weights import HFAdapter, HFExpertLoraWeights, HFLoraWeights
from lora_trainer.export.manifest import hash_files
from lora_trainer.export.merged import write_merged_checkpoint
from lora_trainer.export.peft_adapter import write_peft_adapter

HIDDEN = 2048
VOCAB = 32768
EXPERTS = 256
MOE_INTER = 512
SHARED_INTER = 512
HEADS, KV_HEADS, HEAD_DIM = 16, 2, 256
K_HEADS, V_HEADS, K_DIM, V_DIM, CONV = 16, 32, 128, 128, 4
RANK, ALPHA = 16, 32.0
PREFIX = "model."
RSS_HEADROOM = 256 * 2**20
GOAL_RATIO = 1.5


def layer_shapes(layer: int) -> dict[str, tuple[int, ...]]:
    """The tensors of one decoder layer (every 4th full attention, the others GDN), HF names."""
    p = f"{PREFIX}layers.{layer}."
    shapes: dict[str, tuple[int, ...]] = {
        p + "input_layernorm.weight": (HIDDEN,),
        p + "post_attention_layernorm.weight": (HIDDEN,),
        p + "mlp.gate.weight": (EXPERTS, HIDDEN),
        p + "mlp.experts.gate_up_proj": (EXPERTS, 2 * MOE_INTER, HIDDEN),
        p + "mlp.experts.down_proj": (EXPERTS, HIDDEN, MOE_INTER),
        p + "mlp.shared_expert.gate_proj.weight": (SHARED_INTER, HIDDEN),
        p + "mlp.shared_expert.up_proj.weight": (SHARED_INTER, HIDDEN),
        p + "mlp.shared_expert.down_proj.weight": (HIDDEN, SHARED_INTER),
        p + "mlp.shared_expert_gate.weight": (1, HIDDEN),
    }
    if layer % 4 == 3:
        shapes.update(
            {
                p + "self_attn.q_proj.weight": (2 * HEADS * HEAD_DIM, HIDDEN),
                p + "self_attn.k_proj.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
                p + "self_attn.v_proj.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
                p + "self_attn.o_proj.weight": (HIDDEN, HEADS * HEAD_DIM),
                p + "self_attn.q_norm.weight": (HEAD_DIM,),
                p + "self_attn.k_norm.weight": (HEAD_DIM,),
            }
        )
    else:
        qkv = 2 * K_HEADS * K_DIM + V_HEADS * V_DIM
        shapes.update(
            {
                p + "linear_attn.in_proj_qkv.weight": (qkv, HIDDEN),
                p + "linear_attn.in_proj_z.weight": (V_HEADS * V_DIM, HIDDEN),
                p + "linear_attn.in_proj_b.weight": (V_HEADS, HIDDEN),
                p + "linear_attn.in_proj_a.weight": (V_HEADS, HIDDEN),
                p + "linear_attn.conv1d.weight": (qkv, 1, CONV),
                p + "linear_attn.A_log": (V_HEADS,),
                p + "linear_attn.dt_bias": (V_HEADS,),
                p + "linear_attn.norm.weight": (V_DIM,),
                p + "linear_attn.out_proj.weight": (HIDDEN, V_HEADS * V_DIM),
            }
        )
    return shapes


def model_shapes(size_bytes: int) -> dict[str, tuple[int, ...]]:
    """Embeddings, norm, lm_head and as many layers as it takes to reach `size_bytes` in bf16."""
    shapes: dict[str, tuple[int, ...]] = {
        f"{PREFIX}embed_tokens.weight": (VOCAB, HIDDEN),
        f"{PREFIX}norm.weight": (HIDDEN,),
        "lm_head.weight": (VOCAB, HIDDEN),
    }
    layer = 0
    while 2 * sum(math.prod(shape) for shape in shapes.values()) < size_bytes:
        shapes.update(layer_shapes(layer))
        layer += 1
    return shapes


def per_expert_shapes(shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """`shapes` with every packed expert tensor replaced by its 2D per-expert weights, in place."""
    unpacked: dict[str, tuple[int, ...]] = {}
    for name, shape in shapes.items():
        module, _, proj = name.rpartition(".")
        if not module.endswith(".mlp.experts"):
            unpacked[name] = shape
            continue
        count, fan_out, fan_in = shape
        parts = ("gate_proj", "up_proj") if proj == "gate_up_proj" else ("down_proj",)
        for expert in range(count):
            for part in parts:
                unpacked[f"{module}.{expert}.{part}.weight"] = (fan_out // len(parts), fan_in)
    return unpacked


def write_base(directory: Path, shapes: dict[str, tuple[int, ...]], shard_bytes: int) -> int:
    """Random bf16 shards of at most about `shard_bytes` each, their index and a config.json;
    returns the number of layers."""
    groups: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = 2 * math.prod(shape)
        if groups[-1] and size + nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    weight_map: dict[str, str] = {}
    generator = torch.Generator().manual_seed(0)
    for file_name, names in zip(shard_file_names(len(groups)), groups, strict=True):
        tensors = {
            name: (0.02 * torch.randn(shapes[name], generator=generator)).bfloat16()
            for name in names
        }
        save_file(tensors, str(directory / file_name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, file_name))
    total = sum(2 * math.prod(shape) for shape in shapes.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    layers = 1 + max(int(name.split(".")[2]) for name in shapes if ".layers." in name)
    config = {
        "model_type": "qwen3_5_moe_text",
        "architectures": ["Qwen3_5MoeForCausalLM"],
        "dtype": "bfloat16",
        "hidden_size": HIDDEN,
        "vocab_size": VOCAB,
        "num_hidden_layers": layers,
        "num_experts": EXPERTS,
        "moe_intermediate_size": MOE_INTER,
        "shared_expert_intermediate_size": SHARED_INTER,
    }
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return layers


def random_adapter(shapes: dict[str, tuple[int, ...]]) -> HFAdapter:
    """Rank-16 factors (non-zero B) on every linear LoRA target and both packed expert
    projections."""
    generator = torch.Generator().manual_seed(1)
    targets = (
        "_proj.weight",
        "in_proj_qkv.weight",
        "in_proj_z.weight",
        "in_proj_b.weight",
        "in_proj_a.weight",
    )
    linears: dict[str, HFLoraWeights] = {}
    experts: dict[str, HFExpertLoraWeights] = {}
    for name, shape in shapes.items():
        path = name.removeprefix(PREFIX)
        if path.endswith(("gate_up_proj", "experts.down_proj")):
            count, fan_out, fan_in = shape
            experts[path] = HFExpertLoraWeights(
                torch.randn(count, RANK, fan_in, generator=generator) / fan_in**0.5,
                0.01 * torch.randn(count, fan_out, RANK, generator=generator),
            )
        elif name.startswith(PREFIX + "layers.") and path.endswith(targets):
            fan_out, fan_in = shape
            linears[path.removesuffix(".weight")] = HFLoraWeights(
                torch.randn(RANK, fan_in, generator=generator) / fan_in**0.5,
                0.01 * torch.randn(fan_out, RANK, generator=generator),
            )
    return HFAdapter(linears, experts, RANK, ALPHA, False, PREFIX, "bench-qwen3.5-moe")


def directory_bytes(directory: Path) -> int:
    return sum(path.stat().st_size for path in directory.iterdir() if path.is_file())


def timed(function, *args, **kwargs) -> float:  # type: ignore[no-untyped-def]
    os.sync()
    started = time.perf_counter()
    function(*args, **kwargs)
    return time.perf_counter() - started


def fresh_output(directory: Path) -> None:
    """Flush the page cache to disk (so no writeback runs during the timed part), then delete
    `directory` (the output of the round before) and make it again, empty."""
    os.sync()
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir()


def timed_copy(source: Path, target: Path) -> float:
    """Seconds to copy every file of `source` into a fresh `target`."""
    fresh_output(target)
    started = time.perf_counter()
    for path in sorted(source.iterdir()):
        shutil.copy(path, target / path.name)
    return time.perf_counter() - started


def peak_rss() -> int:
    """This process's peak RSS in bytes: `VmHWM` where /proc has it, else `ru_maxrss`."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child_merge(adapter_file: Path, base_dir: Path, out_dir: Path) -> None:
    """Subprocess body: load the adapter, run the merged export into a fresh `out_dir`, print its
    time and peak RSS before and after."""
    adapter = torch.load(adapter_file, weights_only=False)
    baseline = peak_rss()
    fresh_output(out_dir)
    started = time.perf_counter()
    write_merged_checkpoint(adapter, base_dir, out_dir, progress=False)
    seconds = time.perf_counter() - started
    print(json.dumps({"seconds": seconds, "baseline_rss": baseline, "peak_rss": peak_rss()}))


def run_merge_subprocess(adapter_file: Path, base_dir: Path, out_dir: Path) -> dict[str, float]:
    """The child's figures (merge seconds, baseline and peak RSS in bytes) and its wall time."""
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, __file__, "--child", str(adapter_file), str(base_dir), str(out_dir)],
        check=True,
        capture_output=True,
        text=True,
        env=dict(os.environ, TORCHDYNAMO_DISABLE="1"),
    )
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    figures["wall"] = time.perf_counter() - started
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--size-gb", type=float, default=1.0, help="smallest checkpoint size, GB (1e9 bytes)"
    )
    parser.add_argument(
        "--shard-mb", type=float, default=300.0, help="largest shard size, MB (1e6 bytes)"
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="timed alternating copy / merged runs"
    )
    parser.add_argument(
        "--layout",
        choices=("per_expert", "packed"),
        default="per_expert",
        help="routed experts in the base: 2D weights per expert, or one tensor per projection",
    )
    parser.add_argument(
        "--child", nargs=3, metavar=("ADAPTER", "BASE", "OUT"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.child:
        child_merge(*(Path(arg) for arg in args.child))
        return

    with tempfile.TemporaryDirectory(prefix="export_speed-") as tmp:
        root = Path(tmp)
        base_dir = root / "base"
        base_dir.mkdir()
        shapes = model_shapes(int(args.size_gb * 1e9))
        started = time.perf_counter()
        base_shapes = per_expert_shapes(shapes) if args.layout == "per_expert" else shapes
        layers = write_base(base_dir, base_shapes, int(args.shard_mb * 1e6))
        shards = sorted(base_dir.glob("*.safetensors"))
        base_size, largest = directory_bytes(base_dir), max(p.stat().st_size for p in shards)
        print(
            f"base: {base_size / 2**30:.2f} GiB bf16, {layers} layers, E={EXPERTS}, H={HIDDEN}, "
            f"{len(shards)} shards (largest {largest / 2**20:.0f} MiB), "
            f"generated in {time.perf_counter() - started:.1f} s"
        )
        adapter = random_adapter(shapes)
        adapter_file = root / "adapter.pt"
        torch.save(adapter, adapter_file)
        print(
            f"adapter: r={RANK}, {len(adapter.linears)} linear modules, "
            f"{len(adapter.experts)} packed expert projections ({args.layout} in the base)"
        )

        copies: list[float] = []
        merges: list[dict[str, float]] = []
        for round_ in range(args.rounds + 1):
            copy_s = timed_copy(base_dir, root / "copy")
            figures = run_merge_subprocess(adapter_file, base_dir, root / "merged")
            if round_:
                copies.append(copy_s)
                merges.append(figures)
        (root / "adapter").mkdir()
        adapter_s = timed(write_peft_adapter, adapter, root / "adapter")
        hash_s = timed(hash_files, root / "merged")
        assert directory_bytes(root / "merged") == base_size

        merge_times = [figures["seconds"] for figures in merges]
        peak = max(figures["peak_rss"] for figures in merges)
        baseline = max(figures["baseline_rss"] for figures in merges)
        growth = max(figures["peak_rss"] - figures["baseline_rss"] for figures in merges)
        budget = largest + RSS_HEADROOM
        gib = base_size / 2**30
        for label, times in (
            ("copy (shutil.copy of every file)", copies),
            ("merged export", merge_times),
        ):
            print(
                f"{label:34s} best {min(times):6.2f} s ({gib / min(times):.2f} GiB/s), "
                f"median {statistics.median(times):6.2f} s over {len(times)} rounds "
                f"({' '.join(f'{seconds:.2f}' for seconds in times)})"
            )
        print(
            f"merged subprocess wall incl. imports and adapter load: "
            f"{statistics.median(figures['wall'] for figures in merges):.2f} s (median)"
        )
        print(
            f"adapter export (write_peft_adapter): {adapter_s:.2f} s "
            f"({directory_bytes(root / 'adapter') / 2**20:.1f} MiB)"
        )
        print(f"manifest sha256 of hf_merged:        {hash_s:.2f} s")
        print(
            f"merged / copy: best {min(merge_times) / min(copies):.2f}x, "
            f"median {statistics.median(merge_times) / statistics.median(copies):.2f}x "
            f"(goal <= {GOAL_RATIO}x)"
        )
        print(
            f"peak RSS of the merged export process: {peak / 2**20:.0f} MiB, of which "
            f"{baseline / 2**20:.0f} MiB after imports and adapter load"
        )
        print(
            f"peak RSS added by the export: {growth / 2**20:.0f} MiB; largest shard + 256 MiB = "
            f"{budget / 2**20:.0f} MiB; ratio {growth / budget:.2f} (goal <= 1)"
        )


if __name__ == "__main__":
    main()
