"""Collectives that the bridge and the export share: the shards of a split tensor, and every
rank's small Python objects (each a no-op on a single process). Every rank must call them."""

from __future__ import annotations

from typing import Any, TypeVar

import torch
import torch.distributed as dist

from lora_trainer.parallel.groups import SplitGroup, group_rank_size, split_process_group

Item = TypeVar("Item")
Key = TypeVar("Key")
Value = TypeVar("Value")


def gather_shards(tensor: torch.Tensor, group: SplitGroup) -> list[torch.Tensor]:
    """All shards of `tensor` over the group that splits it, in rank order."""
    _, size = group_rank_size(group)
    if size == 1:
        return [tensor.detach()]
    shards = [torch.empty_like(tensor) for _ in range(size)]
    dist.all_gather(shards, tensor.detach().contiguous(), group=split_process_group(group))
    return shards


def all_gather_objects(item: Item) -> list[Item]:
    """Every rank's picklable `item`, indexed by rank, on every rank; `[item]` on one process."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return [item]
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, item)
    return everyone


def merge_from_all_ranks(local: dict[Key, Value]) -> dict[Key, Value]:
    """The union of every rank's dict (picklable, on CPU), on every rank."""
    merged: dict[Key, Value] = {}
    for part in all_gather_objects(local):
        merged.update(part)
    return merged
