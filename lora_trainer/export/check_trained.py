"""The export check against our trained model: each exported layer computes what our layer computed.

The adapter and merged checkpoint can agree with each other and still not be the model that was
trained (a factor exported transposed, experts permuted the same way in both). So, when the save
recorded what our model computed on the check batch (`trained_layers`), each decoder layer is
also run, one at a time, in the base's own transformers class with the adapter attached by PEFT's
own code, on the hidden states OUR model fed that layer, and compared with OUR layer's output:

- *reference*: that layer in a dtype more precise than our model's (the check's compute dtype,
  or float64 when our model ran in float32 and the check in float32 too);
- *floor*: the same layer in our model's dtype: how far computing in that dtype alone moves the
  output (what our layer differs from the reference by when the export is right).

Both route every token to the experts our router chose: top-k routing is a discrete choice that
rounding can flip between two nearly tied experts in any dtype, and the router is not exported
(its weights are the base's). The tolerance of a layer is `SAFETY` times |floor - reference|, and
at least one unit of our dtype's rounding at the scale of the layer's output. A correct export
differs from our layer by our dtype's rounding; a wrong one by the size of a LoRA delta.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lora_trainer.bridge.safetensors_io import CheckpointReader
from lora_trainer.export.check import KindResult, LayerResult, max_abs_diff
from lora_trainer.export.check_layers import HFLayers
from lora_trainer.export.peft_adapter import WEIGHTS_FILE
from lora_trainer.export.trained_layers import TrainedLayer, TrainedLayers

# Our model and the floor side both carry about one floor of rounding in their dtype, through
# different kernels (up to ~2x apart); the same margin as the check's end-to-end kinds.
SAFETY = 8.0


def reference_dtype(compute: torch.dtype, ours: torch.dtype) -> torch.dtype:
    """The check's compute dtype when it is more precise than our model's, else float64."""
    return compute if compute.itemsize > ours.itemsize else torch.float64


def check_trained(
    base_dir: Path,
    adapter_dir: Path,
    trained_dir: Path,
    input_ids: Tensor,
    compute_dtype: torch.dtype,
) -> tuple[torch.dtype, list[LayerResult]]:
    """Compare every decoder layer of the adapter on `base_dir` with our model's records in
    `trained_dir` (module docstring); returns our model's dtype and one result per layer."""
    from peft import LoraConfig
    from safetensors import safe_open

    trained = TrainedLayers(trained_dir)
    reference = HFLayers(base_dir, reference_dtype(compute_dtype, trained.dtype))
    floor = HFLayers(base_dir, trained.dtype)
    config = LoraConfig.from_pretrained(str(adapter_dir))
    config.inference_mode = True
    results = []
    with (
        CheckpointReader(base_dir) as base,
        safe_open(str(Path(adapter_dir) / WEIGHTS_FILE), framework="pt") as adapter_file,
    ):
        sides = [(side, side.inputs(input_ids, base)[1]) for side in (reference, floor)]
        for index in range(reference.text_config.num_hidden_layers):
            ours = trained.layer(index)
            weights = reference.adapter_weights(index, adapter_file)
            reference_out, floor_out = (
                _run(side, index, base, weights, config, ours, side.layer_kwargs(index, inputs))
                for side, inputs in sides
            )
            diff = max_abs_diff(ours.output, reference_out)
            rounding = max_abs_diff(floor_out, reference_out)
            scale = reference_out.abs().max().item()
            tolerance = max(SAFETY * rounding, torch.finfo(trained.dtype).eps * scale)
            results.append(LayerResult(diff, tolerance, rounding, scale, layer=index))
    return trained.dtype, results


def worst_layer(results: list[LayerResult]) -> KindResult:
    """The layer whose difference is the largest part of its tolerance, as a kind's result."""
    worst = max(results, key=lambda result: result.max_abs_diff / max(result.tolerance, 1e-300))
    return KindResult(worst.max_abs_diff, worst.tolerance, worst.rounding_diff, worst.scale)


def _run(
    side: HFLayers,
    index: int,
    base: CheckpointReader,
    weights: dict[str, Tensor],
    config: Any,
    ours: TrainedLayer,
    kwargs: dict[str, Any],
) -> Tensor:
    """Layer `index` with the adapter, in `side`'s dtype, on our layer's input, routed as ours
    was; float64."""
    tree, _, _ = side.adapted_layer(index, base, weights, config)
    layer = tree.get_submodule(side.layer_path(index))
    with _routed_as(layer, ours.routing), torch.no_grad():
        output = layer(ours.input.to(side.dtype), **kwargs)
    return output.to(torch.float64)


@contextmanager
def _routed_as(layer: nn.Module, routing: Tensor | None) -> Iterator[None]:
    """Within the block the layer's router picks the experts in `routing` ([tokens, top_k]) and
    weighs them with its own probabilities, renormalised over the k (as transformers' router)."""
    gate = getattr(getattr(layer, "mlp", None), "gate", None)
    if routing is None or gate is None:
        yield
        return

    def hook(
        _: nn.Module, args: tuple[Any, ...], output: tuple[Tensor, Tensor, Tensor]
    ) -> tuple[Tensor, Tensor, Tensor]:
        logits = output[0]
        index = routing.to(output[2].dtype)
        probs = torch.softmax(logits.float(), dim=-1).gather(-1, index)
        return logits, (probs / probs.sum(dim=-1, keepdim=True)).to(logits.dtype), index

    handle = gate.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
