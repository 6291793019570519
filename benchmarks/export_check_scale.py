"""The export check at real widths: a 2-layer slice of Qwen3.5-35B-A3B checked layer by layer.

Generates a random bf16 `qwen3_5_moe_text` checkpoint at 35B-A3B widths (hidden 2048, 256 routed
experts of width 512, top-8, 16 q heads / 2 KV groups of 256, GDN 16 key / 32 value heads of 128,
vocab 248320; one GDN and one attention layer: ~5 GB). Our model is built on it (one rank, bf16 as
on GPUs) with random rank-16 LoRA factors on every target; it records its layers on the check
batch (`record_trained_layers`), exports adapter + merged checkpoint (`export_hf`) and is freed.
Then `check_export` runs in layer mode, against the records too. Prints the time and this
process's peak RSS above its baseline for the model + export and for the check (the peak is reset
between phases through /proc/self/clear_refs), the check's per-kind differences and tolerances,
each layer's difference from our model with its tolerance, and whether the whole model would
have fit the memory budget.

    python benchmarks/export_check_scale.py [--layers 2] [--experts 256] [--work DIR] [--skip-check]

Needs ~10 GB of disk and ~8 GB of memory for our model in bf16: see the printed peaks. With
`--work DIR` the base and the export are kept there and reused by the next run (so the check can
run on its own, e.g. while holding a lock on a shared machine); without it everything goes into a
temporary directory that is deleted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from lora_trainer.bridge.safetensors_io import INDEX_FILE, shard_file_names
from lora_trainer.export.hf_adapter_weights import HFAdapter, HFExpertLoraWeights, HFLoraWeights
from lora_trainer.export.hf_export import ADAPTER_DIR, MERGED_DIR, export_hf
from lora_trainer.export.manifest import MANIFEST_FILE

RANK, ALPHA = 16, 32.0
SHARD_BYTES = 2 * 10**9
TARGETS = {
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
}


def config(layers: int, experts: int) -> dict[str, object]:
    return {
        "model_type": "qwen3_5_moe_text",
        "architectures": ["Qwen3_5MoeForCausalLM"],
        "dtype": "bfloat16",
        "vocab_size": 248320,
        "hidden_size": 2048,
        "num_hidden_layers": layers,
        "layer_types": [("full_attention" if i % 2 else "linear_attention") for i in range(layers)],
        "num_attention_heads": 16,
        "num_key_value_heads": 2,
        "head_dim": 256,
        "linear_num_key_heads": 16,
        "linear_num_value_heads": 32,
        "linear_key_head_dim": 128,
        "linear_value_head_dim": 128,
        "linear_conv_kernel_dim": 4,
        "num_experts": experts,
        "num_experts_per_tok": 8,
        "moe_intermediate_size": 512,
        "shared_expert_intermediate_size": 512,
        "tie_word_embeddings": False,
        "rms_norm_eps": 1e-6,
    }


def shapes_of(cfg: dict[str, object]) -> dict[str, tuple[int, ...]]:
    import transformers

    with torch.device("meta"):
        model = transformers.Qwen3_5MoeForCausalLM(transformers.Qwen3_5MoeTextConfig(**cfg))
    return {name: tuple(param.shape) for name, param in model.named_parameters()}


def write_base(directory: Path, cfg: dict[str, object]) -> None:
    shapes = shapes_of(cfg)
    groups: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = 2 * math.prod(shape)
        if groups[-1] and size + nbytes > SHARD_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    generator = torch.Generator().manual_seed(0)
    weight_map: dict[str, str] = {}
    for file_name, names in zip(shard_file_names(len(groups)), groups, strict=True):
        tensors = {}
        for name in names:
            shape = shapes[name]
            std = 0.2 if len(shape) == 1 else 1 / math.sqrt(shape[-1])
            tensors[name] = (std * torch.randn(shape, generator=generator)).bfloat16()
        save_file(tensors, str(directory / file_name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, file_name))
        del tensors
    total = sum(2 * math.prod(shape) for shape in shapes.values())
    (directory / INDEX_FILE).write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    (directory / "config.json").write_text(json.dumps(cfg, indent=2))


def random_adapter(shapes: dict[str, tuple[int, ...]]) -> HFAdapter:
    """A random rank-16 adapter on every LoRA target of the slice (for `export_memory.py`)."""
    generator = torch.Generator().manual_seed(1)
    linears: dict[str, HFLoraWeights] = {}
    experts: dict[str, HFExpertLoraWeights] = {}
    for name, shape in shapes.items():
        path = name.removeprefix("model.")
        if path.endswith(("experts.gate_up_proj", "experts.down_proj")):
            count, fan_out, fan_in = shape
            experts[path] = HFExpertLoraWeights(
                torch.randn(count, RANK, fan_in, generator=generator) / fan_in**0.5,
                0.01 * torch.randn(count, fan_out, RANK, generator=generator),
            )
        elif (
            path.startswith("layers.")
            and path.endswith(".weight")
            and path.split(".")[-2] in TARGETS
        ):
            fan_out, fan_in = shape
            linears[path.removesuffix(".weight")] = HFLoraWeights(
                torch.randn(RANK, fan_in, generator=generator) / fan_in**0.5,
                0.01 * torch.randn(fan_out, RANK, generator=generator),
            )
    return HFAdapter(linears, experts, RANK, ALPHA, False, "model.", "bench-qwen3.5-35b-a3b-slice")


def trained_export(base: Path, save: Path, trained: Path, ids: torch.Tensor) -> None:
    """Our model on `base` (one rank, bf16) with random LoRA factors records its layers on `ids`
    into `trained` and exports its adapter into `save`."""
    from lora_trainer.bridge.build import build_model_from_hf
    from lora_trainer.export.gather_adapter import gather_hf_adapter
    from lora_trainer.export.trained_layers import record_trained_layers
    from lora_trainer.lora.config import LoraConfig
    from lora_trainer.lora.inject import inject_lora
    from lora_trainer.parallel.config import ParallelConfig
    from lora_trainer.parallel.state import destroy_parallel, initialize_parallel

    parallel = ParallelConfig()
    lora = LoraConfig(r=RANK, alpha=ALPHA)
    initialize_parallel(parallel)
    try:
        loaded = build_model_from_hf(base, parallel, params_dtype=torch.bfloat16)
        adapters = inject_lora(loaded.model, lora)
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, param in loaded.model.named_parameters():
                if param.requires_grad:
                    std = param.shape[-1] ** -0.5 if "lora_A" in name else 0.01
                    values = torch.randn(param.shape, generator=generator, dtype=param.dtype)
                    param.copy_(std * values)
        record_trained_layers(loaded.model, ids, trained)
        adapter = gather_hf_adapter(adapters, loaded.spec, lora, str(base))
        del loaded, adapters
        export_hf(adapter, base, save, step=1, progress=False)
    finally:
        destroy_parallel()


def rss() -> tuple[int, int]:
    """(current RSS, peak RSS since the last reset) of this process, bytes."""
    values = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) * 1024
    return values["VmRSS"], values["VmHWM"]


def reset_peak() -> int:
    Path("/proc/self/clear_refs").write_text("5")
    return rss()[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--experts", type=int, default=256)
    parser.add_argument(
        "--work", type=Path, default=None, help="kept work directory, reused when it has the files"
    )
    parser.add_argument("--skip-check", action="store_true", help="only generate and export")
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        root = args.work or Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="export_check_scale-"))
        )
        base = root / "base"
        cfg = config(args.layers, args.experts)
        if not (base / "config.json").is_file():
            base.mkdir(parents=True, exist_ok=True)
            started = time.perf_counter()
            write_base(base, cfg)
            print(f"base written in {time.perf_counter() - started:.0f} s")
        size = sum(p.stat().st_size for p in base.glob("*.safetensors"))
        print(f"base: {size / 2**30:.2f} GiB bf16, {args.layers} layers, {args.experts} experts")
        ids = torch.randint(0, 248320, (2, 16), generator=torch.Generator().manual_seed(0))
        save, trained = root / "trained_save", root / "trained_save" / "trained"
        if not (save / MANIFEST_FILE).is_file():
            baseline = reset_peak()
            started = time.perf_counter()
            trained_export(base, save, trained, ids)
            print(
                f"our model (bf16) + record + export: {time.perf_counter() - started:.1f} s, "
                f"peak RSS {(rss()[1] - baseline) / 2**20:.0f} MiB above the "
                f"{baseline / 2**20:.0f} MiB before it"
            )
        if args.skip_check:
            return
        from lora_trainer.export.check import CHECK_MEMORY_GB, check_export, model_bytes

        full = model_bytes(base, torch.float32)
        print(
            f"whole model in float32: {full / 2**30:.1f} GiB vs "
            f"export.check_memory_gb={CHECK_MEMORY_GB}: "
            f"{'full' if full <= CHECK_MEMORY_GB * 2**30 else 'layer'} mode"
        )
        baseline = reset_peak()
        started = time.perf_counter()
        result = check_export(
            base, save / ADAPTER_DIR, save / MERGED_DIR, ids, mode="layer", trained=trained
        )
        print(
            f"check (layer mode): {time.perf_counter() - started:.1f} s, peak RSS "
            f"{(rss()[1] - baseline) / 2**20:.0f} MiB above the {baseline / 2**20:.0f} MiB before "
            "it"
        )
        print(result.message)
        for kind, figures in result.kinds.items():
            print(
                f"  {kind:20s} max difference {figures.max_abs_diff:.3g}, rounding "
                f"{figures.rounding_diff:.3g}, "
                f"tolerance {figures.tolerance:.3g}, scale {figures.scale:.3g}"
            )

        for layer in result.trained_layers:
            print(
                f"  layer {layer.layer}: max |ours - reference| {layer.max_abs_diff:.3g}, "
                f"reference in {result.trained_dtype} {layer.rounding_diff:.3g}, "
                f"tolerance {layer.tolerance:.3g}, scale {layer.scale:.3g}"
            )


if __name__ == "__main__":
    main()
