"""`Qwen35Spec`: the shape of a Qwen3.5 text model, read from a Hugging Face `config.json`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from lora_trainer.errors import CheckpointError

TEXT_MODEL_TYPES = ("qwen3_5_text", "qwen3_5_moe_text")
WRAPPER_MODEL_TYPES = ("qwen3_5", "qwen3_5_moe")
LayerKind = Literal["linear_attention", "full_attention"]


@dataclass(frozen=True)
class Qwen35Spec:
    """Every size the text model needs, under the names of the HF config.

    `is_conditional_generation` tells which HF class the checkpoint belongs to: the
    `ForConditionalGeneration` checkpoints keep text weights under `model.language_model.`,
    the `ForCausalLM` ones under `model.`.
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    layer_types: tuple[LayerKind, ...]
    rms_norm_eps: float
    tie_word_embeddings: bool
    hidden_act: str
    # gated full attention
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rope_theta: float
    partial_rotary_factor: float
    attention_bias: bool
    # Gated DeltaNet
    linear_num_key_heads: int
    linear_num_value_heads: int
    linear_key_head_dim: int
    linear_value_head_dim: int
    linear_conv_kernel_dim: int
    # MLP: dense (intermediate_size) or MoE (num_experts > 0)
    intermediate_size: int
    num_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    shared_expert_intermediate_size: int
    is_conditional_generation: bool

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def gdn_key_dim(self) -> int:
        return self.linear_num_key_heads * self.linear_key_head_dim

    @property
    def gdn_value_dim(self) -> int:
        return self.linear_num_value_heads * self.linear_value_head_dim

    @property
    def gdn_conv_dim(self) -> int:
        return 2 * self.gdn_key_dim + self.gdn_value_dim

    @property
    def text_prefix(self) -> str:
        """Prefix of the text-model weights in the HF checkpoint (`embed_tokens`, `layers.N...`)."""
        return "model.language_model." if self.is_conditional_generation else "model."

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> Qwen35Spec:
        path = Path(path)
        if not path.is_dir():
            raise CheckpointError(
                f"model directory {path} does not exist; set model.hf_path to a local Hugging Face "
                "checkpoint directory holding config.json and *.safetensors"
            )
        config_file = path / "config.json"
        if not config_file.is_file():
            raise CheckpointError(
                f"{config_file} is missing; {path} is not a Hugging Face checkpoint directory "
                "(save one with `model.save_pretrained(dir)`)"
            )
        try:
            config = json.loads(config_file.read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{config_file} is not valid JSON: {exc}") from exc
        return cls.from_config_dict(config, source=str(config_file))

    @classmethod
    def from_config_dict(cls, config: dict[str, Any], source: str = "config") -> Qwen35Spec:
        model_type = config.get("model_type")
        if model_type in WRAPPER_MODEL_TYPES:
            text = config.get("text_config")
            if not isinstance(text, dict):
                raise CheckpointError(
                    f"{source}: model_type {model_type!r} needs a `text_config` section"
                )
            text = dict(text)
            text.setdefault("tie_word_embeddings", config.get("tie_word_embeddings", False))
            conditional = True
        elif model_type in TEXT_MODEL_TYPES:
            text = config
            conditional = False
        else:
            raise CheckpointError(
                f"{source}: unsupported model_type {model_type!r}; lora_trainer supports "
                f"{', '.join(WRAPPER_MODEL_TYPES + TEXT_MODEL_TYPES)} (Qwen3.5 dense and MoE)"
            )
        return cls._from_text_config(text, model_type, conditional, source)

    @classmethod
    def _from_text_config(
        cls, text: dict[str, Any], model_type: str, conditional: bool, source: str
    ) -> Qwen35Spec:
        def need(key: str) -> Any:
            if key not in text:
                raise CheckpointError(f"{source}: text config has no {key!r}")
            return text[key]

        num_layers = int(need("num_hidden_layers"))
        layer_types = text.get("layer_types")
        if layer_types is None:
            interval = int(text.get("full_attention_interval", 4))
            layer_types = [
                "linear_attention" if (i + 1) % interval else "full_attention"
                for i in range(num_layers)
            ]
        if len(layer_types) != num_layers:
            raise CheckpointError(
                f"{source}: layer_types has {len(layer_types)} entries for {num_layers} layers"
            )
        unknown = sorted(set(layer_types) - {"linear_attention", "full_attention"})
        if unknown:
            raise CheckpointError(f"{source}: unknown layer types {unknown}")
        rope = text.get("rope_parameters") or {}
        hidden = int(need("hidden_size"))
        heads = int(need("num_attention_heads"))
        is_moe = "moe" in model_type
        return cls(
            model_type=model_type,
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            num_layers=num_layers,
            layer_types=tuple(layer_types),
            rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(text.get("tie_word_embeddings", False)),
            hidden_act=str(text.get("hidden_act", "silu")),
            num_attention_heads=heads,
            num_key_value_heads=int(text.get("num_key_value_heads", heads)),
            head_dim=int(text.get("head_dim") or hidden // heads),
            rope_theta=float(rope.get("rope_theta", text.get("rope_theta", 10000.0))),
            partial_rotary_factor=float(
                rope.get("partial_rotary_factor", text.get("partial_rotary_factor", 0.25))
            ),
            attention_bias=bool(text.get("attention_bias", False)),
            linear_num_key_heads=int(need("linear_num_key_heads")),
            linear_num_value_heads=int(need("linear_num_value_heads")),
            linear_key_head_dim=int(need("linear_key_head_dim")),
            linear_value_head_dim=int(need("linear_value_head_dim")),
            linear_conv_kernel_dim=int(text.get("linear_conv_kernel_dim", 4)),
            intermediate_size=0 if is_moe else int(need("intermediate_size")),
            num_experts=int(need("num_experts")) if is_moe else 0,
            num_experts_per_tok=int(need("num_experts_per_tok")) if is_moe else 0,
            moe_intermediate_size=int(need("moe_intermediate_size")) if is_moe else 0,
            shared_expert_intermediate_size=int(text.get("shared_expert_intermediate_size", 0))
            if is_moe
            else 0,
            is_conditional_generation=conditional,
        )
