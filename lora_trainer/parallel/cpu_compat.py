"""Make megatron-core 0.16.x run on a CPU-only torch build with gloo.

megatron-core assumes CUDA in a few dozen places. `apply_cpu_compat()` patches exactly the ones
that break the paths this project uses (tensor/sequence/pipeline/expert parallel layers, the MoE
alltoall dispatcher, `get_forward_backward_func`, gradient clipping). With CUDA available it
applies only the patch that any machine without TransformerEngine needs (P4b, the router's
gemm), is idempotent, and refuses megatron-core versions it was not written for, because every
patch targets a private symbol whose line numbers (cited per patch, megatron-core 0.16.1) may
move.

The patches are process-global: after `apply_cpu_compat()`, `torch.cuda.current_device()` returns
the CPU device and tensor factories asked for `device="cuda"` build on the CPU. That is only done
in processes where CUDA is unavailable, where such calls would otherwise raise.

Left alone because they do not fail on the paths above: `torch.cuda.stream(...)` (a no-op context
on a CPU-only build), `torch.cuda.manual_seed` (queued lazily, never raises), gloo's uneven
reduce_scatter (supported). Not patched and so unsupported on CPU: `pin_memory=True` (reached only
by context parallelism, models/common/embeddings/rope_utils.py:63, utils.py:2117) and activation
recomputation through `tensor_parallel.checkpoint` (saves the CUDA RNG state, random.py:447).

Code that imported a patched function by name before `apply_cpu_compat()` keeps the original;
call through the module (`clip_grads.clip_grad_by_total_norm_fp32`), as megatron itself does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import package_info
from megatron.core.tensor_parallel import mappings
from megatron.core.tensor_parallel import random as mcore_random
from torch.overrides import TorchFunctionMode

SUPPORTED_MEGATRON = (0, 16)

_applied = False


def megatron_version() -> str:
    """The installed megatron-core version string."""
    return package_info.__version__


def check_megatron_version() -> None:
    """Raise RuntimeError unless the installed megatron-core is a 0.16.x release."""
    if (package_info.MAJOR, package_info.MINOR) != SUPPORTED_MEGATRON:
        raise RuntimeError(
            f"lora_trainer's CPU compatibility layer supports megatron-core "
            f"{SUPPORTED_MEGATRON[0]}.{SUPPORTED_MEGATRON[1]}.x only, found "
            f"{megatron_version()}; install megatron-core==0.16.1 to run on CPU "
            f"(on CUDA the layer is not used)."
        )


def apply_cpu_compat() -> bool:
    """Patch megatron-core for CPU; return True when patched, False when CUDA is available (then
    only `TE_ABSENT_PATCHES` are applied, which every device without TransformerEngine needs).

    Idempotent: calling it again does nothing. Raises RuntimeError for an unsupported
    megatron-core version.
    """
    global _applied
    for patch in TE_ABSENT_PATCHES:
        patch()
    if torch.cuda.is_available():
        return False
    if _applied:
        return True
    check_megatron_version()
    for patch in PATCHES:
        patch()
    _applied = True
    return True


# P1 --------------------------------------------------------------------------------------------


class CpuRNGStatesTracker(mcore_random.CudaRNGStatesTracker):
    """megatron's RNG tracker on the CPU generator.

    `add` stores the state of a fresh CPU generator seeded with `seed`; `fork` swaps it into the
    global CPU generator for the block and saves its advanced state on the way out.
    """

    def add(self, name: str, seed: int) -> None:
        """Track a new named RNG state seeded with `seed` (names and seeds must be unique)."""
        self._is_initialized = True
        if seed in self.seeds_:
            raise ValueError(f"seed {seed} already exists")
        if name in self.states_:
            raise ValueError(f"rng state {name} already exists")
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name: str = mcore_random._MODEL_PARALLEL_RNG_TRACKER_NAME) -> Iterator[None]:
        """Run the block on the named RNG state, then restore the previous CPU RNG state."""
        if name not in self.states_:
            raise ValueError(f"rng state {name} is not added")
        outer_state = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer_state)


def patch_rng_tracker() -> None:
    """P1: `model_parallel_cuda_manual_seed` and `tracker.fork()` need the CUDA generator.

    megatron-core 0.16.1 tensor_parallel/random.py:235 (`add`: `torch.cuda.get_rng_state()`,
    "Torch not compiled with CUDA enabled") and :250 (`fork`: `_get_cuda_rng_state`). The CPU
    tracker replaces `CudaRNGStatesTracker`, which `initialize_rng_tracker` looks up by name; a
    tracker already built from the CUDA class is dropped so the next call builds a CPU one.
    """
    mcore_random.CudaRNGStatesTracker = CpuRNGStatesTracker
    tracker = mcore_random._CUDA_RNG_STATE_TRACKER
    if tracker is not None and not isinstance(tracker, CpuRNGStatesTracker):
        mcore_random.initialize_rng_tracker(force_reset=True)


# P2 --------------------------------------------------------------------------------------------


def _cpu_current_device() -> torch.device:
    """Stand-in for `torch.cuda.current_device()`: the CPU device."""
    return torch.device("cpu")


def patch_current_device() -> None:
    """P2: `torch.cuda.current_device()` is the device of ~30 megatron allocations.

    On a CPU build it raises "Torch not compiled with CUDA enabled"; reached at utils.py:631
    (the global buffer of the sequence-parallel all-gather, tensor_parallel/layers.py:482),
    transformer/moe/router.py:90, pipeline_parallel/p2p_communication.py:313 and the
    tensor_parallel/mappings.py gathers and all-to-alls (:141, :181, :442).
    """
    # megatron uses the result only as a device: the CPU device stands in for a CUDA index.
    torch.cuda.current_device = _cpu_current_device  # type: ignore[assignment]


# P3 --------------------------------------------------------------------------------------------


def _is_cuda_device(device: Any) -> bool:
    """Whether a `device=` argument names a CUDA device."""
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, torch.device) and device.type == "cuda"


class CudaToCpuMode(TorchFunctionMode):
    """Runs torch calls asked for `device="cuda..."` on the CPU; `Tensor.cuda()` returns self."""

    def __torch_function__(
        self,
        func: Any,
        types: Any,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if _is_cuda_device(kwargs.get("device")):
            kwargs = {**kwargs, "device": "cpu"}
        return func(*args, **kwargs)


def install_cuda_to_cpu_mode() -> None:
    """P3: hard-coded `device="cuda"` and `.cuda()` in megatron-core.

    transformer/utils.py:35 (causal mask), pipeline_parallel/schedules.py:596/2138
    (`total_num_tokens`), optimizer/optimizer.py:907, optimizer/clip_grads.py:103 and
    utils.py:1207 (grad norm), tensor_parallel/data.py:37/84 (`broadcast_data`). The mode is
    entered once and never exited, so it stays on this thread's torch-function mode stack
    (autograd propagates it to its own threads).
    """
    CudaToCpuMode().__enter__()


# P4a -------------------------------------------------------------------------------------------


class HostEvent:
    """A CUDA event stand-in: host work is synchronous, so it is always complete."""

    def synchronize(self) -> None:
        """Nothing to wait for."""

    def query(self) -> bool:
        """Always complete."""
        return True


class HostStream:
    """A CUDA stream stand-in: host work is synchronous, so waiting and events are no-ops."""

    def wait_stream(self, stream: Any) -> None:
        """Nothing to wait for."""

    def synchronize(self) -> None:
        """Nothing to wait for."""

    def record_event(self, event: Any = None) -> HostEvent:
        """A completed event."""
        return HostEvent()


HOST_STREAM = HostStream()


def _host_current_stream(device: Any = None) -> HostStream:
    """Stand-in for `torch.cuda.current_stream()`: the single host stream."""
    return HOST_STREAM


def patch_alltoall_streams() -> None:
    """P4a: the alltoall dispatcher builds and uses a CUDA side stream for device-to-host copies.

    transformer/moe/token_dispatcher.py:445 (`torch.cuda.Stream()`, "torch.cuda.Stream requires
    CUDA support") and :871-893 (`torch.cuda.current_stream()`, `record_event()`). The
    dispatcher's class-level stream is preset to the host stream, and `current_stream()` returns
    that same object, so megatron sees no side stream and skips `record_stream`.
    """
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

    MoEAlltoAllTokenDispatcher.cuda_dtoh_stream = HOST_STREAM
    # The host stream has the methods megatron calls on a stream (see HostStream).
    torch.cuda.current_stream = _host_current_stream  # type: ignore[assignment]


# P4b -------------------------------------------------------------------------------------------


def patch_router_te_gemm() -> None:
    """P4b: `NameError: te_general_gemm` in the router's gating linear, on CPU and on CUDA alike.

    transformer/moe/moe_utils.py:1192 reads `te_general_gemm`, which is only assigned when
    TransformerEngine imports (moe_utils.py:22-39); None selects the torch.mm path. Where
    TransformerEngine is installed the name exists and is left alone.
    """
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


# P4c -------------------------------------------------------------------------------------------


def patch_split_sizes_to_numpy() -> None:
    """P4c: alltoall split sizes stay tensors on CPU, which `all_to_all_single` rejects.

    transformer/moe/moe_utils.py:1078 `maybe_move_tensor_to_cpu(..., as_numpy=True)` converts only
    CUDA tensors, so on CPU token_dispatcher.py:879-887 keep tensors and tensor_parallel/
    mappings.py:444 fails with "all_to_all_single(): incompatible function arguments". The
    dispatcher imported the function by name, so its reference is replaced.
    """
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    original = moe_utils.maybe_move_tensor_to_cpu

    def maybe_move_tensor_to_cpu(
        tensor: Any, as_numpy: bool = False, record_stream: bool = False
    ) -> Any:
        """megatron's helper, but CPU tensors asked for as numpy are converted too."""
        if as_numpy and torch.is_tensor(tensor) and not tensor.is_cuda:
            return tensor.numpy()
        return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

    token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu


# P6 --------------------------------------------------------------------------------------------


def clip_grad_by_total_norm_cpu(
    parameters: Iterable[torch.Tensor] | torch.Tensor,
    max_norm: float,
    total_norm: float,
    use_decoupled_grad: bool = False,
) -> None:
    """Scale the parameters' gradients in place by `max_norm / total_norm` when that is below 1.

    Same contract as megatron's `clip_grad_by_total_norm_fp32`, without its CUDA assertions.
    """
    from megatron.core.utils import to_local_if_dtensor

    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [
        to_local_if_dtensor(getattr(param, attr)).detach()
        for param in parameters
        if getattr(param, attr, None) is not None
    ]
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0 and grads:
        torch._foreach_mul_(grads, clip_coeff)


def patch_grad_clip() -> None:
    """P6: `clip_grad > 0` asserts `param.grad.type() == 'torch.cuda.FloatTensor'`.

    optimizer/clip_grads.py:167; optimizer/optimizer.py:50 imported the function by name, so
    both references are replaced.
    """
    from megatron.core.optimizer import clip_grads
    from megatron.core.optimizer import optimizer as mcore_optimizer

    clip_grads.clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm_cpu
    mcore_optimizer.clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm_cpu


# P7 --------------------------------------------------------------------------------------------


def _uneven_split_sizes(sizes: Any) -> list[int] | None:
    """Split sizes as a list of ints, or None when they are absent or all equal."""
    if sizes is None:
        return None
    sizes = [int(size) for size in sizes]
    return None if len(set(sizes)) <= 1 else sizes


def gather_uneven_first_dim(
    input_: torch.Tensor, group: dist.ProcessGroup, sizes: list[int]
) -> torch.Tensor:
    """All-gather along dim 0 where rank i holds `sizes[i]` rows: pad to the largest, trim."""
    longest = max(sizes)
    padded = input_.new_zeros((longest, *input_.shape[1:]))
    padded[: input_.shape[0]] = input_
    pieces = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(pieces, padded.contiguous(), group=group)
    return torch.cat([piece[:size] for piece, size in zip(pieces, sizes, strict=True)], dim=0)


def patch_uneven_all_gather() -> None:
    """P7: gloo rejects an all_gather of unequal sizes ("allgather: invalid tensor size").

    tensor_parallel/mappings.py:150, `_gather_along_first_dim` with uneven `output_split_sizes`,
    which the alltoall dispatcher uses (token_dispatcher.py:696) when expert parallelism and
    expert tensor parallelism are both > 1. Equal or absent split sizes keep megatron's code; the
    backward's uneven reduce_scatter (mappings.py:193) works on gloo as it is.
    """
    original = mappings._gather_along_first_dim

    def _gather_along_first_dim(
        input_: torch.Tensor,
        group: dist.ProcessGroup,
        output_split_sizes: Any = None,
        use_global_buffer: bool = False,
    ) -> torch.Tensor:
        """megatron's gather, padded-and-trimmed when the split sizes differ."""
        sizes = _uneven_split_sizes(output_split_sizes)
        if sizes is None or group.size() == 1:
            return original(input_, group, output_split_sizes, use_global_buffer)
        return gather_uneven_first_dim(input_, group, sizes)

    mappings._gather_along_first_dim = _gather_along_first_dim


TE_ABSENT_PATCHES = (patch_router_te_gemm,)
"""Patches for a megatron-core without TransformerEngine, applied on every device (P4b)."""

PATCHES = (
    patch_rng_tracker,
    patch_current_device,
    install_cuda_to_cpu_mode,
    patch_alltoall_streams,
    patch_split_sizes_to_numpy,
    patch_grad_clip,
    patch_uneven_all_gather,
)
"""The CPU-only patches, in the order `apply_cpu_compat` applies them (P1, P2, P3, P4a, P4c, P6,
P7), after `TE_ABSENT_PATCHES`."""
