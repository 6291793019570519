"""The export check: the PEFT adapter on the base and the merged checkpoint give the same logits.

Both sides are loaded with transformers in the base checkpoint's own class, in fp32 by default:
base + `PeftModel` adapter first (its missing and unexpected adapter keys are recorded, and every
key of the adapter file must be consumed), then the merged checkpoint, one model in memory at a
time. The same fixed batch runs through both. Optionally our own model's logits are compared too.
Meant for small models and CI-sized checks: it holds one full fp32 model in memory.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lora_trainer.errors import ExportError
from lora_trainer.kernels.transformers_reference import torch_kernels_only

CONDITIONAL_GENERATION_CLASSES = {
    "qwen3_5": "Qwen3_5ForConditionalGeneration",
    "qwen3_5_moe": "Qwen3_5MoeForConditionalGeneration",
}
ADAPTER_NAME = "default"
GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class ExportCheckResult:
    """The outcome of `check_export`; `passed` is False on any key problem or logit difference."""

    passed: bool
    max_abs_diff_adapter_vs_merged: float
    missing_keys: list[str]
    unexpected_keys: list[str]
    message: str
    max_abs_diff_reference_vs_merged: float | None = None
    merged_missing_keys: list[str] = field(default_factory=list)


def model_class(model_dir: Path) -> Any:
    """The transformers class a checkpoint is loaded with: its ConditionalGeneration class for
    `qwen3_5` / `qwen3_5_moe`, else `AutoModelForCausalLM`."""
    import transformers

    config_path = Path(model_dir) / "config.json"
    try:
        model_type = json.loads(config_path.read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError) as error:
        raise ExportError(f"cannot read {config_path} for the export check: {error}") from error
    name = CONDITIONAL_GENERATION_CLASSES.get(model_type)
    return getattr(transformers, name) if name else transformers.AutoModelForCausalLM


def check_export(
    base_dir: Path,
    adapter_dir: Path,
    merged_dir: Path,
    input_ids: Tensor,
    *,
    atol: float = 1e-4,
    reference_logits: Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> ExportCheckResult:
    """Compare base + PEFT adapter against the merged checkpoint on `input_ids` ([batch, seq]).

    Fails on missing or unexpected adapter keys, on keys the merged checkpoint lacks that the base
    has, and on a max |logit difference| above `atol` (also against `reference_logits`, when given).
    `dtype` is the dtype both sides run in. Pick `atol` for it and for the base dtype: an fp32
    forward differs from itself merged vs unmerged by rounding alone (up to ~2e-4 on the tests'
    tiny random models; float64 brings that to ~1e-5, the fp32 rounding of the merged weights),
    and a bf16 base stores the merged weights rounded to bf16.
    """
    cls = model_class(Path(base_dir))
    base, base_info = _load(cls, base_dir, dtype)
    adapted, missing, unexpected = _with_adapter(base, Path(adapter_dir))
    adapter_logits = _logits(adapted, input_ids)
    del adapted, base
    merged, merged_info = _load(cls, merged_dir, dtype)
    merged_logits = _logits(merged, input_ids)
    del merged
    merged_missing = sorted(set(merged_info["missing_keys"]) - set(base_info["missing_keys"]))

    diff = _max_abs_diff(adapter_logits, merged_logits)
    reference_diff = None if reference_logits is None else _max_abs_diff(reference_logits, merged_logits)
    problems = []
    if missing:
        problems.append(f"{len(missing)} adapter keys missing from {adapter_dir} (first: {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} adapter keys not consumed by PEFT (first: {unexpected[0]})")
    if merged_missing:
        problems.append(f"{len(merged_missing)} weights missing from {merged_dir} (first: {merged_missing[0]})")
    if not diff <= atol:
        problems.append(f"adapter and merged logits differ by up to {diff:.3g} > atol {atol:g}")
    if reference_diff is not None and not reference_diff <= atol:
        problems.append(f"reference and merged logits differ by up to {reference_diff:.3g} > atol {atol:g}")
    message = (
        "export check failed: " + "; ".join(problems)
        if problems
        else f"export check passed: adapter and merged logits agree within {diff:.3g} (atol {atol:g})"
    )
    return ExportCheckResult(
        passed=not problems,
        max_abs_diff_adapter_vs_merged=diff,
        missing_keys=missing,
        unexpected_keys=unexpected,
        message=message,
        max_abs_diff_reference_vs_merged=reference_diff,
        merged_missing_keys=merged_missing,
    )


def _load(cls: Any, model_dir: Path, dtype: torch.dtype) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The model in `dtype`, eval mode, with transformers' loading info. Routed experts run on the
    eager (looped) implementation for dtypes transformers' grouped_mm lacks (float64 on CPU)."""
    model, info = cls.from_pretrained(model_dir, dtype=dtype, output_loading_info=True)
    if dtype not in GROUPED_MM_DTYPES:
        model.set_experts_implementation("eager")
    return model.eval(), info


def _with_adapter(base: torch.nn.Module, adapter_dir: Path) -> tuple[torch.nn.Module, list[str], list[str]]:
    """`base` wrapped by the PEFT adapter in `adapter_dir`, with the adapter keys PEFT reported
    missing and those of the file it did not consume (both named as in the file)."""
    from peft import PeftConfig, get_peft_model, get_peft_model_state_dict, load_peft_weights

    config = PeftConfig.from_pretrained(adapter_dir)
    config.inference_mode = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(base, config, adapter_name=ADAPTER_NAME)
        result = model.load_adapter(adapter_dir, adapter_name=ADAPTER_NAME)
    in_file = set(load_peft_weights(str(adapter_dir), device="cpu"))
    in_model = set(get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME))
    missing = {_file_key(key) for key in result.missing_keys} | (in_model - in_file)
    unexpected = {_file_key(key) for key in result.unexpected_keys} | (in_file - in_model)
    return model.eval(), sorted(missing), sorted(unexpected)


def _file_key(key: str) -> str:
    """A PEFT module key with the adapter name removed, as keys are named in the adapter file."""
    return key.replace(f".{ADAPTER_NAME}.", ".")


def _logits(model: torch.nn.Module, input_ids: Tensor) -> Tensor:
    """The model's logits in float64, on torch kernels only (the check runs on the CPU, where
    `fla` / `causal_conv1d` kernels that transformers may have bound cannot run)."""
    with torch.no_grad(), torch_kernels_only():
        return model(input_ids=input_ids).logits.detach().to(torch.float64)


def _max_abs_diff(x: Tensor, y: Tensor) -> float:
    if x.shape != y.shape:
        return float("inf")
    return (x.to(torch.float64) - y.to(torch.float64)).abs().max().item()
