"""The export check: the PEFT adapter on the base and the merged checkpoint compute the same thing.

Three sides run on the same inputs, in the base checkpoint's own transformers classes:

- *adapter*: the base with the adapter attached by PEFT's own code (the reference);
- *rounded*: the adapter side merged by PEFT (`merge_and_unload`, exact in the compute dtype),
  then every merged weight moved by random noise of the size of one rounding to the base
  checkpoint's stored dtype (uniform in +-half an ulp, element by element): what a correct merged
  export differs from the reference by;
- *merged*: the merged checkpoint as written.

Every module the adapter adapts (each linear; each routed-experts module, with a routing that
sends the tokens through every expert alone, so that a missing or misplaced expert delta shows)
is fed the inputs it saw on the adapter side, and the whole model's logits (`mode="full"`) or
each decoder layer's output (`mode="layer"`) are compared too. Differences are reduced per kind
(`manifest.module_kind`: attention, gdn, mlp, shared_expert, routed_experts; plus `logits` or
`layer_output`). The tolerance of each kind comes from the numbers: a safety factor times the
rounded side's difference, and never below `EPS_FLOOR` units of the compute dtype's rounding at
the scale of the outputs. A correct export differs by one rounding of its weights, a wrong one by
the size of the LoRA delta.

`mode="full"` loads the whole model (one side at a time); `mode="layer"` (see `check_layers`)
holds one decoder layer at a time, so it works for any model size. `check_export` picks layer
mode when the whole model in the compute dtype exceeds `memory_gb`.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from lora_trainer.bridge.safetensors_io import CheckpointReader
from lora_trainer.errors import ExportError
from lora_trainer.kernels.transformers_reference import torch_kernels_only

CONDITIONAL_GENERATION_CLASSES = {
    "qwen3_5": "Qwen3_5ForConditionalGeneration",
    "qwen3_5_moe": "Qwen3_5MoeForConditionalGeneration",
}
ADAPTER_NAME = "default"
GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Default budget for holding the whole model in the compute dtype; above it the check goes layer
# by layer.
CHECK_MEMORY_GB = 16.0
# Tolerance = safety x the difference one rounding of the merged weights makes (measured), and at
# least EPS_FLOOR x the compute dtype's eps x the largest |output| of that kind. An adapted module
# on its recorded inputs differs by up to ~2x the measured rounding; the logits or a layer's output
# (rounding propagated through every module) up to ~3x.
MODULE_SAFETY = 4.0
END_SAFETY = 8.0
EPS_FLOOR = 64.0
NOISE_SEED = 1234
NOISE_CHUNK = 2**22
# Tokens each routed expert is checked on (rows of the check batch, a different choice per expert).
EXPERT_TOKENS = 8
# Integer view and exponent-bit mask of the compute dtypes.
_EXPONENT_BITS = {
    torch.float16: (torch.int16, 0x7C00),
    torch.bfloat16: (torch.int16, 0x7F80),
    torch.float32: (torch.int32, 0x7F800000),
    torch.float64: (torch.int64, 0x7FF0000000000000),
}
Mode = Literal["full", "layer"]
END_KINDS = ("logits", "layer_output")
# The kind of the comparison with our trained model's layers (`check_trained`).
TRAINED_LAYER_OUTPUT = "trained_layer_output"


@dataclass(frozen=True)
class KindResult:
    """One module kind: the worst |adapter - merged| output difference, the tolerance, and what
    it came from: the worst |adapter - rounded| difference and the largest |adapter output|."""

    max_abs_diff: float
    tolerance: float
    rounding_diff: float
    scale: float

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance


@dataclass(frozen=True)
class LayerResult(KindResult):
    """One decoder layer against our trained model (`check_trained`): max |ours - reference|,
    its tolerance, |reference in our model's dtype - reference| (`rounding_diff`) and the largest
    |reference output| (`scale`)."""

    layer: int


@dataclass(frozen=True)
class ExportCheckResult:
    """The outcome of `check_export`; `passed` is False on any key problem or difference above
    its tolerance. `max_abs_diff_adapter_vs_merged` and `tolerance` are those of the end-to-end
    kind (`logits` in full mode, `layer_output` in layer mode); `kinds` has every kind (with
    `trained`: `trained_layer_output`, the layer of `trained_layers` whose difference is the
    largest part of its tolerance)."""

    passed: bool
    max_abs_diff_adapter_vs_merged: float
    missing_keys: list[str]
    unexpected_keys: list[str]
    message: str
    max_abs_diff_reference_vs_merged: float | None = None
    merged_missing_keys: list[str] = field(default_factory=list)
    mode: Mode = "full"
    compute_dtype: str = "float32"
    stored_dtype: str = "float32"
    tolerance: float = 0.0
    kinds: dict[str, KindResult] = field(default_factory=dict)
    trained_dtype: str | None = None
    trained_layers: list[LayerResult] = field(default_factory=list)


class Comparison:
    """Outputs per kind of the three sides, reduced to the worst differences as they come."""

    def __init__(self, compute_dtype: torch.dtype) -> None:
        self.eps = torch.finfo(compute_dtype).eps
        self.adapter: dict[str, float] = {}
        self.rounded: dict[str, float] = {}
        self.merged: dict[str, float] = {}
        self.scale: dict[str, float] = {}

    def add(self, kind: str, adapter: Tensor, rounded: Tensor, merged: Tensor) -> None:
        self.rounded[kind] = max(self.rounded.get(kind, 0.0), max_abs_diff(adapter, rounded))
        self.merged[kind] = max(self.merged.get(kind, 0.0), max_abs_diff(adapter, merged))
        self.scale[kind] = max(
            self.scale.get(kind, 0.0), adapter.abs().max().item() if adapter.numel() else 0.0
        )

    def results(self) -> dict[str, KindResult]:
        return {
            kind: KindResult(
                max_abs_diff=self.merged[kind],
                tolerance=max(
                    (END_SAFETY if kind in END_KINDS else MODULE_SAFETY) * self.rounded[kind],
                    EPS_FLOOR * self.eps * self.scale[kind],
                ),
                rounding_diff=self.rounded[kind],
                scale=self.scale[kind],
            )
            for kind in self.merged
        }


def model_class(model_dir: Path) -> Any:
    """The transformers class a checkpoint is loaded with: its ConditionalGeneration class for
    `qwen3_5` / `qwen3_5_moe`, else `AutoModelForCausalLM`."""
    import transformers

    name = CONDITIONAL_GENERATION_CLASSES.get(str(_config(model_dir).get("model_type")))
    return getattr(transformers, name) if name else transformers.AutoModelForCausalLM


def _config(model_dir: Path) -> dict[str, Any]:
    config_path = Path(model_dir) / "config.json"
    try:
        return json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ExportError(f"cannot read {config_path} for the export check: {error}") from error


def stored_dtype(model_dir: Path) -> torch.dtype:
    """The dtype most of the checkpoint's floating-point bytes are stored in."""
    by_dtype: dict[torch.dtype, int] = {}
    with CheckpointReader(model_dir) as reader:
        for name in reader.names():
            dtype = reader.dtype(name)
            if dtype.is_floating_point:
                by_dtype[dtype] = (
                    by_dtype.get(dtype, 0) + math.prod(reader.shape(name)) * dtype.itemsize
                )
    return max(by_dtype, key=by_dtype.__getitem__) if by_dtype else torch.float32


def compute_dtype_for(stored: torch.dtype) -> torch.dtype:
    """float64 for fp32/fp64 checkpoints (so the fp32 rounding of the merged weights, not the
    arithmetic, is what differs), float32 for bf16 and fp16 ones."""
    return torch.float64 if stored.itemsize >= 4 else torch.float32


def model_bytes(model_dir: Path, dtype: torch.dtype) -> int:
    """Bytes of every floating-point tensor of the checkpoint in `dtype`."""
    with CheckpointReader(model_dir) as reader:
        return sum(
            math.prod(reader.shape(name)) * dtype.itemsize
            for name in reader.names()
            if reader.dtype(name).is_floating_point
        )


def check_export(
    base_dir: Path,
    adapter_dir: Path,
    merged_dir: Path,
    input_ids: Tensor,
    *,
    reference_logits: Tensor | None = None,
    dtype: torch.dtype | None = None,
    memory_gb: float = CHECK_MEMORY_GB,
    mode: Mode | None = None,
    trained: Path | None = None,
) -> ExportCheckResult:
    """Check the adapter in `adapter_dir` and the merged checkpoint in `merged_dir` against each
    other on the base `base_dir`, on `input_ids` ([batch, seq]); see the module docstring.

    Fails on adapter keys PEFT reports missing or does not consume, on base weights the merged
    checkpoint lacks, and on any kind's difference above its tolerance (also the merged logits
    against `reference_logits` when given, full mode only, with the logits' tolerance). `dtype`
    (default: `compute_dtype_for` the stored dtype) is the dtype every side runs in; `mode`
    (default: by `memory_gb`) is `full` or `layer`. With `trained` (a directory of our model's
    records, `trained_layers`) every decoder layer is also compared with what our trained model
    computed (`check_trained`, kind `trained_layer_output`, in either mode).
    """
    base_dir, adapter_dir, merged_dir = Path(base_dir), Path(adapter_dir), Path(merged_dir)
    stored = stored_dtype(base_dir)
    dtype = dtype or compute_dtype_for(stored)
    if mode is None:
        mode = "full" if model_bytes(base_dir, dtype) <= memory_gb * 2**30 else "layer"
    if reference_logits is not None and mode != "full":
        raise ValueError("reference_logits can only be compared in full mode")
    comparison = Comparison(dtype)
    if mode == "full":
        missing, unexpected, merged_missing, reference_diff = _check_full(
            base_dir,
            adapter_dir,
            merged_dir,
            input_ids,
            dtype,
            stored,
            comparison,
            reference_logits,
        )
    else:
        from lora_trainer.export.check_layers import check_layers

        missing, unexpected, merged_missing = check_layers(
            base_dir, adapter_dir, merged_dir, input_ids, dtype, stored, comparison
        )
        reference_diff = None
    end_kind = "logits" if mode == "full" else "layer_output"
    kinds = comparison.results()
    trained_dtype: torch.dtype | None = None
    trained_layers: list[LayerResult] = []
    if trained is not None:
        from lora_trainer.export.check_trained import check_trained, worst_layer

        trained_dtype, trained_layers = check_trained(
            base_dir, adapter_dir, Path(trained), input_ids, dtype
        )
        kinds[TRAINED_LAYER_OUTPUT] = worst_layer(trained_layers)
    end = kinds[end_kind]
    problems = []
    if missing:
        problems.append(
            f"{len(missing)} adapter keys missing from {adapter_dir} (first: {missing[0]})"
        )
    if unexpected:
        problems.append(
            f"{len(unexpected)} adapter keys not consumed by PEFT (first: {unexpected[0]})"
        )
    if merged_missing:
        problems.append(
            f"{len(merged_missing)} weights missing from {merged_dir} (first: {merged_missing[0]})"
        )
    for kind, result in kinds.items():
        if kind != TRAINED_LAYER_OUTPUT and not result.passed:
            what = (
                "adapter and merged logits"
                if kind == "logits"
                else f"adapter and merged {kind} outputs"
            )
            problems.append(
                f"{what} differ by up to {result.max_abs_diff:.3g} > tolerance "
                f"{result.tolerance:.3g}"
            )
    failed_layers = [result for result in trained_layers if not result.passed]
    if failed_layers:
        layers = ", ".join(
            f"layer {result.layer} by up to {result.max_abs_diff:.3g} > tolerance "
            f"{result.tolerance:.3g}"
            for result in failed_layers
        )
        problems.append(
            "the adapter on the base does not compute what the trained model computed: outputs "
            f"of {layers} (trained in {str(trained_dtype).removeprefix('torch.')})"
        )
    if reference_diff is not None and not reference_diff <= end.tolerance:
        problems.append(
            f"reference and merged logits differ by up to {reference_diff:.3g} > tolerance "
            f"{end.tolerance:.3g}"
        )
    worst = ", ".join(
        f"{kind} {result.max_abs_diff:.3g}/{result.tolerance:.3g}" for kind, result in kinds.items()
    )
    message = (
        f"export check ({mode} mode) failed: " + "; ".join(problems)
        if problems
        else f"export check passed ({mode} mode, {str(dtype).removeprefix('torch.')}): worst "
        f"difference / tolerance per kind: {worst}"
    )
    return ExportCheckResult(
        passed=not problems,
        max_abs_diff_adapter_vs_merged=end.max_abs_diff,
        missing_keys=missing,
        unexpected_keys=unexpected,
        message=message,
        max_abs_diff_reference_vs_merged=reference_diff,
        merged_missing_keys=merged_missing,
        mode=mode,
        compute_dtype=str(dtype).removeprefix("torch."),
        stored_dtype=str(stored).removeprefix("torch."),
        tolerance=end.tolerance,
        kinds=kinds,
        trained_dtype=None if trained_dtype is None else str(trained_dtype).removeprefix("torch."),
        trained_layers=list(trained_layers),
    )


def _check_full(
    base_dir: Path,
    adapter_dir: Path,
    merged_dir: Path,
    input_ids: Tensor,
    dtype: torch.dtype,
    stored: torch.dtype,
    comparison: Comparison,
    reference_logits: Tensor | None,
) -> tuple[list[str], list[str], list[str], float | None]:
    """Full mode: the whole model per side, one side in memory at a time."""
    cls = model_class(base_dir)
    base, base_info = _load(cls, base_dir, dtype)
    adapted, missing, unexpected = _with_adapter(base, adapter_dir)
    inner = adapted.get_base_model()
    modules = adapted_modules(inner)
    with record_inputs(inner, modules) as inputs:
        adapter_logits = _logits(adapted, input_ids)
    adapter_outputs = replay(inner, modules, inputs)
    targets = adapted_parameters(inner)
    rounded = adapted.merge_and_unload()
    del adapted, base, inner
    round_like_storage_(rounded, targets, stored)
    rounded_outputs = replay(rounded, modules, inputs)
    rounded_logits = _logits(rounded, input_ids)
    del rounded
    merged, merged_info = _load(cls, merged_dir, dtype)
    merged_outputs = replay(merged, modules, inputs)
    merged_logits = _logits(merged, input_ids)
    del merged
    for path, kind in modules:
        if path in adapter_outputs:
            comparison.add(kind, adapter_outputs[path], rounded_outputs[path], merged_outputs[path])
    comparison.add("logits", adapter_logits, rounded_logits, merged_logits)
    merged_missing = sorted(set(merged_info["missing_keys"]) - set(base_info["missing_keys"]))
    reference_diff = (
        None if reference_logits is None else max_abs_diff(reference_logits, merged_logits)
    )
    return missing, unexpected, merged_missing, reference_diff


def _load(cls: Any, model_dir: Path, dtype: torch.dtype) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The model in `dtype`, eval mode, with transformers' loading info. Routed experts run on the
    eager (looped) implementation for dtypes transformers' grouped_mm lacks (float64 on CPU)."""
    model, info = cls.from_pretrained(model_dir, dtype=dtype, output_loading_info=True)
    if dtype not in GROUPED_MM_DTYPES:
        model.set_experts_implementation("eager")
    return model.eval(), info


def _with_adapter(base: torch.nn.Module, adapter_dir: Path) -> tuple[Any, list[str], list[str]]:
    """`base` wrapped by the PEFT adapter in `adapter_dir`, with the adapter keys PEFT reported
    missing and those of the file it did not consume (both named as in the file)."""
    from peft import PeftConfig, get_peft_model, get_peft_model_state_dict, load_peft_weights

    config = PeftConfig.from_pretrained(str(adapter_dir))
    config.inference_mode = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(base, config, adapter_name=ADAPTER_NAME)
        result = model.load_adapter(adapter_dir, adapter_name=ADAPTER_NAME)
    in_file = set(load_peft_weights(str(adapter_dir), device="cpu"))
    in_model = set(get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME))
    missing = {file_key(key) for key in result.missing_keys} | (in_model - in_file)
    unexpected = {file_key(key) for key in result.unexpected_keys} | (in_file - in_model)
    return model.eval(), sorted(missing), sorted(unexpected)


def file_key(key: str) -> str:
    """A PEFT module key with the adapter name removed, as keys are named in the adapter file."""
    return key.replace(f".{ADAPTER_NAME}.", ".")


def adapted_modules(model: torch.nn.Module) -> list[tuple[str, str]]:
    """(module path, kind) of every module PEFT adapted in `model`, as the paths will be after
    `merge_and_unload`: each wrapped linear, and each routed-experts module (its wrapped
    parameters nest, the outermost wrapper is called). Kinds as `manifest.module_kind`."""
    from peft.tuners.lora import LoraLayer, ParamWrapper

    from lora_trainer.export.manifest import module_kind

    kinds = {
        name.replace(".base_layer", ""): "routed_experts"
        if isinstance(module, ParamWrapper)
        else module_kind(name)
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer)
    }
    return list(kinds.items())


Inputs = dict[str, tuple[tuple[Any, ...], dict[str, Any]]]


@contextmanager
def record_inputs(model: torch.nn.Module, modules: list[tuple[str, str]]) -> Iterator[Inputs]:
    """Within the block, the first call of each module in `modules` records its arguments."""
    inputs: Inputs = {}
    handles = []

    def hook_for(path: str) -> Callable[..., None]:
        def hook(_: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            inputs.setdefault(path, (_detached(args), _detached(kwargs)))

        return hook

    for path, _ in modules:
        handles.append(
            model.get_submodule(path).register_forward_pre_hook(hook_for(path), with_kwargs=True)
        )
    try:
        yield inputs
    finally:
        for handle in handles:
            handle.remove()


def _detached(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach().clone()
    if isinstance(value, tuple):
        return tuple(_detached(item) for item in value)
    if isinstance(value, dict):
        return {key: _detached(item) for key, item in value.items()}
    return value


def replay(
    model: torch.nn.Module, modules: list[tuple[str, str]], inputs: Inputs
) -> dict[str, Tensor]:
    """Each called module's output (first tensor of a tuple, float64) on its recorded inputs;
    routed experts on `every_expert_inputs` instead."""
    outputs: dict[str, Tensor] = {}
    with torch.no_grad():
        for path, kind in modules:
            if path not in inputs:
                continue
            module = model.get_submodule(path)
            args, kwargs = inputs[path]
            if kind == "routed_experts":
                args, kwargs = every_expert_inputs(module, args, kwargs)
            output = module(*args, **kwargs)
            outputs[path] = (
                (output[0] if isinstance(output, tuple) else output).detach().to(torch.float64)
            )
    return outputs


def every_expert_inputs(
    experts: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The recorded (hidden_states [T, H], top_k_index [T, K], top_k_weights [T, K]) of a routed
    experts module turned into a routing through every expert alone: `EXPERT_TOKENS` of the T
    tokens (a different choice per expert) once per expert, each row to its expert only, with
    weight 1. So every expert's output is compared on its own, whatever the router would pick."""
    values = list(args) + [
        kwargs[name] for name in ("hidden_states", "top_k_index", "top_k_weights") if name in kwargs
    ]
    hidden, top_k_index, top_k_weights = values[:3]
    num_experts = _num_experts(experts)
    tokens = hidden.shape[0]
    per_expert = min(EXPERT_TOKENS, tokens)
    expert = torch.arange(num_experts).repeat_interleave(per_expert)
    rows = (expert * per_expert + torch.arange(per_expert).repeat(num_experts)) % tokens
    index = expert.to(top_k_index.dtype).unsqueeze(1)
    weights = torch.ones(index.shape, dtype=top_k_weights.dtype)
    return (hidden[rows], index, weights), {}


def _num_experts(experts: torch.nn.Module) -> int:
    module: Any = experts
    while not hasattr(module, "num_experts") and hasattr(module, "base_layer"):
        module = module.base_layer
    return int(module.num_experts)


def adapted_parameters(model: torch.nn.Module) -> list[str]:
    """Names (as they will be after `merge_and_unload`) of the parameters the PEFT layers in
    `model` adapt: `<module>.weight` of a wrapped linear, `<module>.<parameter>` of a wrapped
    parameter (routed experts)."""
    from peft.tuners.lora import LoraLayer, ParamWrapper

    names = []
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        path = name.replace(".base_layer", "")
        names.append(
            f"{path}.{module.parameter_name}"
            if isinstance(module, ParamWrapper)
            else f"{path}.weight"
        )
    return sorted(set(names))


def round_like_storage_(model: torch.nn.Module, names: list[str], stored: torch.dtype) -> None:
    """Move each named parameter by uniform noise in +-half an ulp of `stored` at its value: a
    rounding to `stored`, statistically, that keeps the exact value's information out. The ulp is
    the power of two of the value's exponent (its exponent bits alone) times `stored`'s eps; one
    block of `NOISE_CHUNK` random numbers serves every chunk of every parameter."""
    eps = torch.finfo(stored).eps
    generator = torch.Generator().manual_seed(NOISE_SEED)
    with torch.no_grad():
        for name in names:
            flat = model.get_parameter(name).view(-1)
            integer, exponent_bits = _EXPONENT_BITS[flat.dtype]
            noise = (
                torch.rand(min(NOISE_CHUNK, flat.numel()), generator=generator, dtype=flat.dtype)
                - 0.5
            ) * eps
            for start in range(0, flat.numel(), NOISE_CHUNK):
                part = flat[start : start + NOISE_CHUNK]
                scale = torch.bitwise_and(part.view(integer), exponent_bits).view(part.dtype)
                part.addcmul_(scale, noise[: part.numel()])


def _logits(model: torch.nn.Module, input_ids: Tensor) -> Tensor:
    """The model's logits in float64, on torch kernels only (the check runs on the CPU, where
    `fla` / `causal_conv1d` kernels that transformers may have bound cannot run)."""
    with torch.no_grad(), torch_kernels_only():
        return model(input_ids=input_ids).logits.detach().to(torch.float64)


def max_abs_diff(x: Tensor, y: Tensor) -> float:
    """max |x - y| in float64; inf when the shapes differ."""
    if x.shape != y.shape:
        return float("inf")
    if x.numel() == 0:
        return 0.0
    return (x.to(torch.float64) - y.to(torch.float64)).abs().max().item()
