"""The attributes megatron-core reads on a parameter to split, reduce and count it.

`tensor_model_parallel`, `partition_dim` and `partition_stride` say how tensor parallelism splits
it (the grad-norm code counts a replicated parameter once per group); `sequence_parallel` that
sequence parallelism leaves its gradient partial over the tensor-parallel group; `allreduce=False`
that megatron's DDP reduces it over the expert data-parallel group instead of the data-parallel
one (routed-expert parameters).
"""

from __future__ import annotations

import torch


def set_parallel_attributes(param: torch.Tensor, **attributes: bool | int) -> None:
    """Set megatron-core's parallel `attributes` (module docstring) on `param`."""
    for name, value in attributes.items():
        setattr(param, name, value)
