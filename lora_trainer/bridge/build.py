"""Build this rank's Qwen3.5 model from a Hugging Face checkpoint directory."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from lora_trainer.bridge.loader import load_hf_checkpoint
from lora_trainer.bridge.mapping import ExpertLayout
from lora_trainer.parallel.config import ParallelConfig
from lora_trainer.qwen35.model import Qwen35Model
from lora_trainer.qwen35.parallel_fit import check_parallel_fits
from lora_trainer.qwen35.recompute_mode import Recompute
from lora_trainer.qwen35.spec import Qwen35Spec
from lora_trainer.qwen35.transformer_config import build_transformer_config


@dataclass
class LoadedModel:
    model: Qwen35Model
    spec: Qwen35Spec
    expert_layout: ExpertLayout
    hf_path: Path


def build_model_from_hf(
    hf_path: str | Path,
    parallel: ParallelConfig,
    params_dtype: torch.dtype = torch.float32,
    recompute: Recompute = Recompute.none,
) -> LoadedModel:
    """Spec from config.json, fit check, the model for this rank's stage, weights loaded.

    Needs `lora_trainer.parallel.state.initialize_parallel` to have run with the same `parallel`."""
    hf_path = Path(hf_path)
    spec = Qwen35Spec.from_hf_dir(hf_path)
    check_parallel_fits(spec, parallel)
    model = Qwen35Model(spec, build_transformer_config(spec, parallel, params_dtype), recompute)
    if torch.cuda.is_available():
        model.to(device=torch.cuda.current_device())
    cast_parameters(model, params_dtype)
    layout = load_hf_checkpoint(model, hf_path)
    return LoadedModel(model, spec, layout, hf_path)


def cast_parameters(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Parameters to `dtype`; buffers keep theirs (RoPE's inverse frequencies stay fp32, as in
    transformers: in bf16 the rotation angle is off by radians at a few thousand positions)."""
    for param in model.parameters():
        param.data = param.data.to(dtype)
