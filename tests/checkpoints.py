"""Small random Qwen3.5 checkpoints, made with transformers' own classes and `save_pretrained`.

Every config has two GDN and two gated-attention layers (so each of two pipeline stages holds one of
each), nh != ng, Vh != Kh, dk != dv, 2I != H, E = 4 experts with top-2, and head counts divisible by
2 so TP=2 and EP=2 fit.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

KIND_DENSE = "dense"
KIND_MOE = "moe"
KIND_MOE_VL = "moe_vl"
KINDS = (KIND_DENSE, KIND_MOE, KIND_MOE_VL)

TEXT_SIZES: dict[str, object] = {
    "vocab_size": 256,
    "hidden_size": 64,
    "num_hidden_layers": 4,
    "layer_types": ["linear_attention", "full_attention", "linear_attention", "full_attention"],
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "linear_key_head_dim": 8,
    "linear_value_head_dim": 12,
    "linear_conv_kernel_dim": 4,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
}
MOE_SIZES: dict[str, object] = {
    "num_experts": 4,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 24,
    "shared_expert_intermediate_size": 20,
}
DENSE_SIZES: dict[str, object] = {"intermediate_size": 40}
VISION_SIZES: dict[str, object] = {
    "depth": 1,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_heads": 2,
    "out_hidden_size": 64,
    "patch_size": 8,
}
MTP_TENSORS = ("mtp.fc.weight", "mtp.norm.weight")


def build_hf_model(
    kind: str,
    seed: int = 0,
    tie_word_embeddings: bool = False,
    moe_sizes: dict[str, object] | None = None,
) -> torch.nn.Module:
    """A transformers Qwen3.5 model of `kind` with random weights of a useful scale (fp32, eval);
    `moe_sizes` overrides the expert count, top-k and widths of a `moe` model."""
    import transformers

    torch.manual_seed(seed)
    text = dict(TEXT_SIZES, tie_word_embeddings=tie_word_embeddings)
    if kind == KIND_DENSE:
        config = transformers.Qwen3_5TextConfig(**text, **DENSE_SIZES)
        model = transformers.Qwen3_5ForCausalLM(config)
    elif kind == KIND_MOE:
        config = transformers.Qwen3_5MoeTextConfig(**text, **dict(MOE_SIZES, **(moe_sizes or {})))
        model = transformers.Qwen3_5MoeForCausalLM(config)
    elif kind == KIND_MOE_VL:
        config = transformers.Qwen3_5MoeConfig(
            text_config=dict(text, **MOE_SIZES),
            vision_config=VISION_SIZES,
            tie_word_embeddings=tie_word_embeddings,
        )
        model = transformers.Qwen3_5MoeForConditionalGeneration(config)
    else:
        raise ValueError(f"unknown checkpoint kind {kind!r}; use one of {KINDS}")
    randomize_(model, seed)
    return model.eval()


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Fill every parameter with values large enough that a wrong mapping changes the logits."""
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("A_log"):
                param.copy_(torch.empty(param.shape).uniform_(1.0, 16.0, generator=generator).log())
            elif name.endswith("linear_attn.norm.weight"):
                param.copy_(1.0 + 0.2 * torch.randn(param.shape, generator=generator))
            elif param.ndim == 1:
                param.copy_(0.2 * torch.randn(param.shape, generator=generator))
            else:
                fan_in = param.shape[-1] * (
                    param.shape[-1] if param.ndim == 3 and "conv" in name else 1
                )
                std = 1.0 / math.sqrt(max(fan_in, 1))
                param.copy_(std * torch.randn(param.shape, generator=generator))


def save_checkpoint(
    model: torch.nn.Module,
    path: Path,
    *,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str | None = None,
    with_mtp: bool = False,
    packed_experts: bool = False,
) -> Path:
    """`save_pretrained` into `path` (transformers writes routed experts per expert,
    `experts.{e}.gate_proj.weight`); optionally add MTP tensors or pack the experts into the 3D
    `experts.gate_up_proj` / `experts.down_proj` layout, which checkpoints on disk use too."""
    model.to(dtype).save_pretrained(path, max_shard_size=max_shard_size or "2GB")
    model.to(torch.float32)
    if with_mtp or packed_experts:
        _rewrite_single_file(
            path, model, with_mtp=with_mtp, packed_experts=packed_experts, dtype=dtype
        )
    return path


def _rewrite_single_file(
    path: Path, model: torch.nn.Module, *, with_mtp: bool, packed_experts: bool, dtype: torch.dtype
) -> None:
    file = path / "model.safetensors"
    if not file.is_file():
        raise ValueError("MTP and packed-expert rewrites need a single-file checkpoint")
    tensors = load_file(str(file))
    if packed_experts:
        tensors = _pack_experts(tensors)
    if with_mtp:
        hidden = model.config.get_text_config().hidden_size
        generator = torch.Generator().manual_seed(7)
        tensors["mtp.fc.weight"] = torch.randn(hidden, 2 * hidden, generator=generator).to(dtype)
        tensors["mtp.norm.weight"] = torch.randn(hidden, generator=generator).to(dtype)
    save_file(tensors, str(file), metadata={"format": "pt"})


_PER_EXPERT = re.compile(
    r"^(?P<base>.*\.mlp\.experts\.)(?P<e>\d+)\.(?P<proj>gate|up|down)_proj\.weight$"
)


def _pack_experts(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[str, dict[int, torch.Tensor]]] = {}
    for name, tensor in tensors.items():
        match = _PER_EXPERT.match(name)
        if match is None:
            out[name] = tensor
            continue
        per_proj = experts.setdefault(match["base"], {})
        per_proj.setdefault(match["proj"], {})[int(match["e"])] = tensor
    for base, per_proj in experts.items():
        count = len(per_proj["down"])
        out[f"{base}gate_up_proj"] = torch.stack(
            [torch.cat([per_proj["gate"][e], per_proj["up"][e]]) for e in range(count)]
        )
        out[f"{base}down_proj"] = torch.stack([per_proj["down"][e] for e in range(count)])
    return out


def make_checkpoint(kind: str, path: Path, **save_kwargs: object) -> Path:
    """Build and save a random checkpoint of `kind`; returns its directory."""
    model = build_hf_model(kind)
    return save_checkpoint(model, path, **save_kwargs)  # type: ignore[arg-type]


def load_hf_model(path: Path) -> torch.nn.Module:
    """Load a checkpoint made here with its own transformers class, fp32, eval mode."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(path)
    if config.model_type == "qwen3_5_moe":
        cls = transformers.Qwen3_5MoeForConditionalGeneration
    elif config.model_type == "qwen3_5":
        cls = transformers.Qwen3_5ForConditionalGeneration
    else:
        cls = transformers.AutoModelForCausalLM
    return cls.from_pretrained(path, dtype=torch.float32).eval()


def fixed_batch(vocab_size: int, batch: int = 2, seq: int = 24, seed: int = 3) -> torch.Tensor:
    """A fixed batch of token ids."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, seq), generator=generator)
