"""AdamW over the LoRA parameters, warmup + cosine learning rate, model-parallel gradient norm."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from torch import nn

from lora_trainer.parallel.groups import group_rank_size
from lora_trainer.training.config import OptimSection


def build_optimizer(params: list[nn.Parameter], cfg: OptimSection) -> torch.optim.AdamW:
    return torch.optim.AdamW(
        params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, weight_decay=cfg.weight_decay
    )


def warmup_cosine(cfg: OptimSection, max_steps: int) -> Callable[[int], float]:
    """Multiplier of `cfg.lr` at a step: linear warmup, then cosine down to `cfg.min_lr`."""
    floor = cfg.min_lr / cfg.lr if cfg.lr > 0 else 0.0

    def factor(step: int) -> float:
        if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        span = max(1, max_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def _counted_here(param: nn.Parameter, expert: bool) -> bool:
    """A replicated factor is counted on the first rank of the group that replicates it."""
    if getattr(param, "tensor_model_parallel", False):
        return True
    rank_in_group, _ = group_rank_size("etp" if expert else "tp")
    return rank_in_group == 0


def grad_norm(params: list[nn.Parameter]) -> torch.Tensor:
    """L2 norm of all gradients of the model across tensor, pipeline and expert parallel ranks."""
    dense = torch.zeros((), dtype=torch.float32, device=params[0].device)
    expert = torch.zeros_like(dense)
    for param in params:
        if param.grad is None:
            continue
        is_expert = not getattr(param, "allreduce", True)
        if _counted_here(param, is_expert):
            square = param.grad.float().pow(2).sum()
            if is_expert:
                expert += square
            else:
                dense += square
    if dist.is_initialized():
        dist.all_reduce(dense, group=parallel_state.get_model_parallel_group())
        dist.all_reduce(
            expert, group=parallel_state.get_expert_tensor_model_pipeline_parallel_group()
        )
    return (dense + expert).sqrt()


def clip_gradients(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Scale gradients so their global norm is at most `max_norm` (0 disables); returns the norm."""
    norm = grad_norm(params)
    if max_norm > 0:
        coefficient = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        for param in params:
            if param.grad is not None:
                param.grad.mul_(coefficient)
    return norm
