"""How long a save blocks training: synchronous export against background export.

Generates a random bf16 Qwen3.5-MoE text checkpoint of at least `--size-gb` (the shapes of
`export_speed.py`: Qwen3.5-35B-A3B widths, 256 packed routed experts, GDN and gated-attention
layers, in several shards; the tokenizer of the tiny test model), then trains it with
`python train.py` on 2 CPU ranks (expert parallel 2, LoRA r=16 on every target) for one step with
one save, twice: `export.background=false` and `export.background=true`. Each run's save log
gives the time the save kept training waiting (from the save's start to training going on) and,
for the background save, the part spent writing the training state. Prints both and the ratio,
against the goal: background save <= training state write + 1 s. Deletes everything it wrote.

    python benchmarks/save_blocking.py [--size-gb 1.0] [--shard-mb 300]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from export_speed import (
    CONV,
    EXPERTS,
    HEAD_DIM,
    HEADS,
    HIDDEN,
    K_DIM,
    K_HEADS,
    KV_HEADS,
    MOE_INTER,
    SHARED_INTER,
    V_DIM,
    V_HEADS,
    VOCAB,
    model_shapes,
    write_base,
)

REPO = Path(__file__).resolve().parent.parent
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
SYNC_SAVE = re.compile(r"Saved step 1 to \S+ in ([\d.]+) s")
BACKGROUND_SAVE = re.compile(
    r"Saved step 1 to \S+: training blocked ([\d.]+) s \(training state ([\d.]+) s"
)


def write_checkpoint(directory: Path, size_bytes: int, shard_bytes: int) -> int:
    """The base checkpoint with a config.json transformers and lora_trainer load; returns its
    size."""
    directory.mkdir(parents=True)
    layers = write_base(directory, model_shapes(size_bytes), shard_bytes)
    config = {
        "model_type": "qwen3_5_moe_text",
        "architectures": ["Qwen3_5MoeForCausalLM"],
        "dtype": "bfloat16",
        "vocab_size": VOCAB,
        "hidden_size": HIDDEN,
        "num_hidden_layers": layers,
        "layer_types": [
            "full_attention" if i % 4 == 3 else "linear_attention" for i in range(layers)
        ],
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "head_dim": HEAD_DIM,
        "linear_num_key_heads": K_HEADS,
        "linear_num_value_heads": V_HEADS,
        "linear_key_head_dim": K_DIM,
        "linear_value_head_dim": V_DIM,
        "linear_conv_kernel_dim": CONV,
        "num_experts": EXPERTS,
        "num_experts_per_tok": 4,
        "moe_intermediate_size": MOE_INTER,
        "shared_expert_intermediate_size": SHARED_INTER,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
    }
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tokenizer = _tiny_model(directory.parent / "tiny")
    for name in TOKENIZER_FILES:
        shutil.copy(tokenizer / name, directory / name)
    return sum(path.stat().st_size for path in directory.glob("*.safetensors"))


def _tiny_model(cache: Path) -> Path:
    """The tiny test model (built once into `cache`): its tokenizer has a chat template."""
    from lora_trainer.demo.model import ensure_tiny_checkpoint

    return Path(ensure_tiny_checkpoint("moe", cache))


def train(base: Path, output_dir: Path, background: bool) -> str:
    command = [
        sys.executable,
        "train.py",
        f"model.hf_path={base}",
        "model.tiny=null",
        f"output_dir={output_dir}",
        "logger=none",
        "trainer.max_steps=1",
        "checkpoint.every_n_steps=1",
        "data.max_seq_len=32",
        "trainer.global_batch_size=2",
        "trainer.micro_batch_size=1",
        "trainer.devices=2",
        "parallel.ep=2",
        f"export.background={str(background).lower()}",
    ]
    env = dict(os.environ, TORCHDYNAMO_DISABLE="1", PYTHONUNBUFFERED="1")
    run = subprocess.run(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    if run.returncode != 0:
        raise SystemExit(f"train.py failed:\n{run.stdout[-5000:]}")
    return run.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gb", type=float, default=1.0)
    parser.add_argument("--shard-mb", type=float, default=300.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="save_blocking_") as scratch:
        base = Path(scratch) / "base"
        size = write_checkpoint(base, int(args.size_gb * 2**30), int(args.shard_mb * 2**20))
        print(
            f"base: {size / 2**30:.2f} GiB bf16 in {len(list(base.glob('*.safetensors')))} shards"
        )
        started = time.perf_counter()
        sync_log = train(base, Path(scratch) / "sync", background=False)
        sync_wall = time.perf_counter() - started
        started = time.perf_counter()
        background_log = train(base, Path(scratch) / "background", background=True)
        background_wall = time.perf_counter() - started
    sync = SYNC_SAVE.search(sync_log)
    background = BACKGROUND_SAVE.search(background_log)
    if sync is None or background is None:
        raise SystemExit("no save line found in the training logs")
    sync_s, background_s, state_s = float(sync[1]), float(background[1]), float(background[2])
    print(f"save blocks training, synchronous export: {sync_s:.2f} s (run {sync_wall:.0f} s)")
    print(
        f"save blocks training, background export:  {background_s:.2f} s (run "
        f"{background_wall:.0f} s), "
        f"of which the training state {state_s:.2f} s"
    )
    print(
        f"background / synchronous: {background_s / sync_s:.3f}; background - training state: "
        f"{background_s - state_s:.2f} s (goal <= 1 s)"
    )


if __name__ == "__main__":
    main()
