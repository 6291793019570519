"""What the single rank of tests/test_device_paths.py runs (module level, so spawn can import
it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def _factors(adapters: list[Any]) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """Each adapter's A and row permutation, keyed by its HF target name(s) (grouped expert
    adapters hold one name per local expert)."""
    return {
        "|".join(getattr(a, "names", [getattr(a, "name", "")])): (
            a.lora_A.detach().clone(),
            getattr(a, "perm", None),
        )
        for a in adapters
    }


def run_device_context_checks(rank: int, world_size: int, checkpoint: str) -> dict[str, Any]:
    """LoRA built under `with torch.device("meta"):` (how Lightning's tensor_init_context builds
    the model, with the GPU as the device) against LoRA built without a context, the `int(tensor)`
    calls of that build, and RoPE angles of a bf16 model placed as on a GPU against fp32."""
    from lora_trainer.bridge.build import build_model_from_hf
    from lora_trainer.lora.config import LoraConfig
    from lora_trainer.lora.inject import inject_lora
    from lora_trainer.parallel.config import ParallelConfig
    from lora_trainer.parallel.state import destroy_parallel, initialize_parallel

    config = ParallelConfig()
    lora = LoraConfig(r=4, style="canonical")
    initialize_parallel(config, seed=1234)
    try:
        plain = _factors(inject_lora(build_model_from_hf(Path(checkpoint), config).model, lora))
        model = build_model_from_hf(Path(checkpoint), config).model
        int_calls = 0
        tensor_int = torch.Tensor.__int__

        def counting_int(self: torch.Tensor) -> int:
            nonlocal int_calls
            int_calls += 1
            return tensor_int(self)

        torch.Tensor.__int__ = counting_int
        try:
            with torch.device("meta"):
                adapters = inject_lora(model, lora)
        finally:
            torch.Tensor.__int__ = tensor_int
        in_context = _factors(adapters)

        positions = torch.arange(32768).unsqueeze(0)
        fp32_rotary = build_model_from_hf(Path(checkpoint), config, torch.float32).model.rotary(
            positions
        )
        is_available = torch.cuda.is_available
        torch.cuda.is_available = lambda: True
        try:
            bf16_model = build_model_from_hf(Path(checkpoint), config, torch.bfloat16).model
        finally:
            torch.cuda.is_available = is_available
        bf16_rotary = bf16_model.rotary(positions)
        param_dtypes = {p.dtype for p in bf16_model.parameters()}
    finally:
        destroy_parallel()
    return {
        "plain": plain,
        "in_context": in_context,
        "int_calls": int_calls,
        "fp32_rotary": fp32_rotary,
        "bf16_rotary": bf16_rotary,
        "bf16_param_dtypes": param_dtypes,
    }
