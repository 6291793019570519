"""This rank's place in megatron-core's parallel groups, once `parallel.state` has set them up.

A parameter is split over one group, named by a `SplitGroup`: `tp` (tensor parallel), `etp`
(expert tensor parallel) or `none` (replicated). `group_rank_size` and `split_process_group` answer
for such a name; `local_expert_range` and `data_parallel_rank_size` for the expert- and
data-parallel groups.
"""

from __future__ import annotations

from typing import Literal

import torch.distributed as dist
from megatron.core import parallel_state

SplitGroup = Literal["tp", "etp", "none"]


def group_rank_size(group: SplitGroup) -> tuple[int, int]:
    """This rank's index in the group that splits a parameter, and the group's size."""
    if group == "tp":
        return (
            parallel_state.get_tensor_model_parallel_rank(),
            parallel_state.get_tensor_model_parallel_world_size(),
        )
    if group == "etp":
        return (
            parallel_state.get_expert_tensor_parallel_rank(),
            parallel_state.get_expert_tensor_parallel_world_size(),
        )
    return 0, 1


def split_process_group(group: SplitGroup) -> dist.ProcessGroup | None:
    """The process group of a split group name; None (the default group) for `none`."""
    if group == "tp":
        return parallel_state.get_tensor_model_parallel_group()
    if group == "etp":
        return parallel_state.get_expert_tensor_parallel_group()
    return None


def local_expert_range(num_experts: int) -> range:
    """Global indices of the routed experts held by this expert-parallel rank."""
    if num_experts == 0:
        return range(0)
    ep_size = parallel_state.get_expert_model_parallel_world_size()
    per_rank = num_experts // ep_size
    start = parallel_state.get_expert_model_parallel_rank() * per_rank
    return range(start, start + per_rank)


def data_parallel_rank_size() -> tuple[int, int] | None:
    """`(dp_rank, dp_size)` from megatron's `parallel_state`, or None when it is not initialized."""
    if not parallel_state.model_parallel_is_initialized():
        return None
    return parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
