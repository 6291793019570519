"""The embedded tiny random Qwen3.5 checkpoints (MoE and dense) that the default run trains.

`ensure_tiny_checkpoint(kind, cache_dir)` builds a checkpoint once with transformers' own classes
(`Qwen3_5MoeForCausalLM` / `Qwen3_5ForCausalLM`, `save_pretrained`), with the tiny tokenizer of
`lora_trainer.demo.tokenizer` (chat template included) saved in the same directory, and
returns it from the cache on later calls. The directory name carries a hash of the whole recipe
(sizes, seed, tokenizer data, `RECIPE_VERSION`), so a changed recipe builds a new directory.

A checkpoint is built in a temporary sibling, fsynced and renamed into place (`atomic_directory`
with `replace=False`), so the final directory is either absent or complete: a process that starts
while another builds never reads a half-written checkpoint, and of two concurrent builders the
second keeps the first one's (identical, deterministic) result.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any, Literal

from lora_trainer.demo.tokenizer import (
    TINY_SFT_PATH,
    build_tiny_tokenizer,
    tokenizer_recipe,
)
from lora_trainer.errors import ConfigError
from lora_trainer.files.atomic import atomic_directory

TinyKind = Literal["moe", "dense"]
TINY_KINDS: tuple[str, ...] = ("moe", "dense")

RECIPE_VERSION = 1
SEED = 20240607
VOCAB_SIZE = 512

TEXT_SIZES: dict[str, Any] = {
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 64,
    "num_hidden_layers": 4,
    "layer_types": ["linear_attention", "full_attention", "linear_attention", "full_attention"],
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "linear_key_head_dim": 16,
    "linear_value_head_dim": 16,
    "linear_conv_kernel_dim": 4,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "max_position_embeddings": 4096,
}
MOE_SIZES: dict[str, Any] = {
    "num_experts": 4,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 32,
}
DENSE_SIZES: dict[str, Any] = {"intermediate_size": 128}


def _recipe(kind: str) -> dict[str, Any]:
    """Everything that determines the files of a tiny checkpoint of `kind`."""
    return {
        "version": RECIPE_VERSION,
        "kind": kind,
        "seed": SEED,
        "text": TEXT_SIZES,
        "mlp": MOE_SIZES if kind == "moe" else DENSE_SIZES,
        "tokenizer_data_sha256": hashlib.sha256(TINY_SFT_PATH.read_bytes()).hexdigest(),
        "tokenizer_recipe": tokenizer_recipe(),
    }


def tiny_checkpoint_path(kind: str, cache_dir: str | Path) -> Path:
    """Where the tiny checkpoint of `kind` lives under `cache_dir` (built or not)."""
    if kind not in TINY_KINDS:
        raise ConfigError(
            f"model.tiny={kind!r} is not a tiny model kind; use one of {', '.join(TINY_KINDS)}"
        )
    digest = hashlib.sha256(json.dumps(_recipe(kind), sort_keys=True).encode()).hexdigest()[:12]
    return Path(cache_dir).absolute() / f"qwen3_5-tiny-{kind}-{digest}"


def ensure_tiny_checkpoint(kind: TinyKind, cache_dir: str | Path) -> Path:
    """The directory of the tiny random checkpoint of `kind`, built on the first call.

    The directory holds `config.json`, `model.safetensors`, `generation_config.json` and the tiny
    tokenizer (512 tokens, Qwen chat template); transformers loads both offline.
    """
    final = tiny_checkpoint_path(kind, cache_dir)
    if final.is_dir():
        return final
    with atomic_directory(final, replace=False) as temporary:
        _build(kind, temporary)
    return final


def _build(kind: str, directory: Path) -> None:
    import torch
    import transformers

    build_tiny_tokenizer(directory, vocab_size=VOCAB_SIZE)
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True)
    special = {
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": None,
    }
    model: transformers.PreTrainedModel
    with torch.random.fork_rng(devices=[]):
        if kind == "moe":
            moe = transformers.Qwen3_5MoeTextConfig(**TEXT_SIZES, **MOE_SIZES, **special)
            model = transformers.Qwen3_5MoeForCausalLM(moe)
        else:
            dense = transformers.Qwen3_5TextConfig(**TEXT_SIZES, **DENSE_SIZES, **special)
            model = transformers.Qwen3_5ForCausalLM(dense)
    _randomize(model, SEED)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(directory)


def _randomize(model: Any, seed: int) -> None:
    """Fill every parameter from a seeded generator, at a scale that keeps activations O(1).

    Matrices get std 1/sqrt(fan_in); GDN decay `A_log` is log-uniform in [1, 16]; the GDN output
    norm (a plain RMSNorm) is near 1; other vectors (zero-centred norms, biases) are small.
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("A_log"):
                value = torch.empty(param.shape).uniform_(1.0, 16.0, generator=generator).log()
            elif name.endswith("linear_attn.norm.weight"):
                value = 1.0 + 0.1 * torch.randn(param.shape, generator=generator)
            elif param.ndim == 1:
                value = 0.1 * torch.randn(param.shape, generator=generator)
            else:
                fan_in = param.shape[-1] * (param.shape[1] if "conv1d" in name else 1)
                value = torch.randn(param.shape, generator=generator) / math.sqrt(max(fan_in, 1))
            param.copy_(value)
