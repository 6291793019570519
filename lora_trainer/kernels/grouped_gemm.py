"""Grouped linear: `x_g @ W_g^T` for each group g of consecutive rows (the routed experts).

One signature, two backends, chosen once per (device type, dtype) and said in the log:
torch's grouped matmul (`torch.nn.functional.grouped_mm`) where it runs for that device and dtype
(fp32 / bf16 / fp16 on CPU and on CUDA), otherwise a loop of `F.linear` over the groups (float64,
older torch). Grouped matmul wants every row stride to be a multiple of 16 bytes (e.g. bf16 with a
LoRA rank of 4 has 8-byte rows): such operands are zero-padded along the offending dimension, which
leaves the product unchanged.

Shape letters: T rows (sorted by group), K input features, N output features, G groups.
"""

from __future__ import annotations

import functools
import logging
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

log = logging.getLogger(__name__)

Backend = Literal["grouped_mm", "loop"]
_ALIGN_BYTES = 16


@functools.cache
def grouped_backend(device_type: str, dtype: torch.dtype) -> Backend:
    """`grouped_mm` when torch's grouped matmul runs on this device and dtype, else `loop`."""
    grouped = getattr(F, "grouped_mm", None)
    backend: Backend = "loop"
    if grouped is not None:
        try:
            x = torch.zeros(2, 8, device=device_type, dtype=dtype)
            w = torch.zeros(2, 8, 8, device=device_type, dtype=dtype)
            grouped(
                x,
                w.transpose(-2, -1),
                offs=torch.tensor([1, 2], device=device_type, dtype=torch.int32),
            )
            backend = "grouped_mm"
        except (RuntimeError, NotImplementedError):
            backend = "loop"
    log.info(
        "Routed experts on %s %s: %s",
        device_type,
        str(dtype).removeprefix("torch."),
        "torch grouped matmul"
        if backend == "grouped_mm"
        else "a per-expert loop (no grouped matmul)",
    )
    return backend


def _pad(t: Tensor, *dims: int) -> Tensor:
    """Zero-pad `t` along `dims` so that each of them spans a whole number of 16-byte units."""
    unit = max(_ALIGN_BYTES // t.element_size(), 1)
    pad = [0, 0] * t.dim()
    for dim in dims:
        pad[2 * (t.dim() - 1 - dim % t.dim()) + 1] = -t.shape[dim] % unit
    return F.pad(t, pad) if any(pad) else t.contiguous()


def _forward_grouped(x: Tensor, weight: Tensor, offs: Tensor) -> Tensor:
    """x [T, K] @ weight[g]^T: the contracted K is the row stride of both operands."""
    return F.grouped_mm(_pad(x, 1), _pad(weight, 2).transpose(-2, -1), offs=offs)


def _input_grad_grouped(grad: Tensor, weight: Tensor, offs: Tensor) -> Tensor:
    """grad [T, N] @ weight[g]: N is grad's row stride, K the weight's."""
    k = weight.shape[2]
    return F.grouped_mm(_pad(grad, 1), _pad(weight, 1, 2), offs=offs)[:, :k]


def _weight_grad_grouped(grad: Tensor, x: Tensor, weight: Tensor, offs: Tensor) -> Tensor:
    """dW_g = grad_g^T x_g for every group, [G, N, K] (zeros for a group without rows)."""
    n, k = weight.shape[1:]
    return F.grouped_mm(_pad(grad, 1).t(), _pad(x, 1), offs=offs)[:, :n, :k]


def _counts(offs: Tensor) -> list[int]:
    return torch.diff(offs, prepend=offs.new_zeros(1)).tolist()


def _forward_loop(x: Tensor, weight: Tensor, counts: list[int]) -> Tensor:
    return torch.cat([F.linear(x_g, w_g) for x_g, w_g in zip(x.split(counts), weight, strict=True)])


class _GroupedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, offs: Tensor, backend: Backend) -> Tensor:
        ctx.save_for_backward(x, weight, offs)
        ctx.backend = backend
        if backend == "grouped_mm":
            return _forward_grouped(x, weight, offs)
        return _forward_loop(x, weight, _counts(offs))

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None, None]:
        x, weight, offs = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x = grad_w = None
        if ctx.backend == "grouped_mm":
            if ctx.needs_input_grad[0]:
                grad_x = _input_grad_grouped(grad, weight, offs)
            if ctx.needs_input_grad[1]:
                grad_w = _weight_grad_grouped(grad, x, weight, offs)
            return grad_x, grad_w, None, None
        counts = _counts(offs)
        if ctx.needs_input_grad[0]:
            grad_x = _forward_loop(grad, weight.transpose(-2, -1), counts)
        if ctx.needs_input_grad[1]:
            grad_w = torch.stack(
                [g.t() @ x_g for g, x_g in zip(grad.split(counts), x.split(counts), strict=True)]
            )
        return grad_x, grad_w, None, None


def grouped_linear(x: Tensor, weight: Tensor, offs: Tensor) -> Tensor:
    """x [T, K] with rows sorted by group, weight [G, N, K], offs int32 [G]: the cumulative row
    counts (offs[-1] == T). Returns [T, N] where rows of group g are `x_g @ weight[g]^T`."""
    if (
        x.dim() != 2
        or weight.dim() != 3
        or x.shape[1] != weight.shape[2]
        or offs.shape != (weight.shape[0],)
    ):
        raise ValueError(
            f"grouped_linear: x {list(x.shape)}, weight {list(weight.shape)} and offs "
            f"{list(offs.shape)} do not form x [T, K], weight [G, N, K], offs [G]"
        )
    backend = grouped_backend(x.device.type, x.dtype)
    return _GroupedLinear.apply(x, weight.to(x.dtype), offs, backend)
