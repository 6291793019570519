"""transformers' Qwen3.5 models as a reference that runs on torch kernels only.

transformers binds `fla` and `causal_conv1d` when its Qwen3.5 modeling modules are imported and
those packages are importable. Up to 5.24 it calls them whatever the device: a transformers model
on the CPU then calls CUDA-only kernels. From 5.25 it checks the inputs' device, so a CPU model
takes the torch path, but a CUDA model still takes the kernels. Reference runs (the export check,
the fp32 side of the GPU parity check) go through `torch_kernels_only()`, which points the
modules' kernel-bound names back at the pure-torch functions they wrap for the duration of the
block.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
from collections.abc import Iterator

MODELING_MODULES = (
    "transformers.models.qwen3_5.modeling_qwen3_5",
    "transformers.models.qwen3_5_moe.modeling_qwen3_5_moe",
)
KERNEL_BOUND_FUNCTIONS = (
    "causal_conv1d_fn",
    "causal_conv1d_update",
    "torch_chunk_gated_delta_rule",
    "torch_recurrent_gated_delta_rule",
)


@contextlib.contextmanager
def torch_kernels_only() -> Iterator[None]:
    """Run transformers' Qwen3.5 models in the block on their pure-torch kernels."""
    saved = []
    for module_name in MODELING_MODULES:
        module = importlib.import_module(module_name)
        for name in KERNEL_BOUND_FUNCTIONS:
            bound = getattr(module, name, None)
            if bound is not None:
                saved.append((module, name, bound))
                setattr(module, name, inspect.unwrap(bound))
    try:
        yield
    finally:
        for module, name, bound in saved:
            setattr(module, name, bound)
