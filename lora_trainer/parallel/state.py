"""Process group, megatron-core model-parallel state and RNG seeding from a `ParallelConfig`:
set up (`initialize_parallel`) and torn down (`destroy_parallel`). `parallel.groups` then says
where this rank sits in the groups, `parallel.collectives` communicates over them."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from lora_trainer.errors import ParallelConfigError
from lora_trainer.parallel.config import ParallelConfig
from lora_trainer.parallel.cpu_compat import apply_cpu_compat

DEFAULT_TIMEOUT = timedelta(minutes=30)


@dataclass(frozen=True)
class ParallelInfo:
    """This rank's place in every parallel group, as megatron-core set it up."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    tp_rank: int
    tp_size: int
    pp_rank: int
    pp_size: int
    ep_rank: int
    ep_size: int
    etp_rank: int
    etp_size: int
    dp_rank: int
    dp_size: int
    expert_dp_rank: int
    expert_dp_size: int
    sp: bool

    @property
    def is_first_pp_stage(self) -> bool:
        """Whether this rank holds the first pipeline stage."""
        return self.pp_rank == 0

    @property
    def is_last_pp_stage(self) -> bool:
        """Whether this rank holds the last pipeline stage."""
        return self.pp_rank == self.pp_size - 1


def _free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env_int(name: str) -> int | None:
    """An integer environment variable, None when unset; ParallelConfigError when malformed."""
    value = os.environ.get(name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise ParallelConfigError(
            f"environment variable {name}={value!r} is not an integer"
        ) from None


def _launch_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from the launcher's environment; (0, 1, 0) without one."""
    rank, world_size = _env_int("RANK"), _env_int("WORLD_SIZE")
    if rank is None and world_size is None:
        return 0, 1, 0
    if rank is None or world_size is None:
        raise ParallelConfigError("set both RANK and WORLD_SIZE, or neither for a single process")
    if not 0 <= rank < world_size:
        raise ParallelConfigError(f"RANK={rank} is not in [0, WORLD_SIZE={world_size})")
    local_rank = _env_int("LOCAL_RANK")
    return rank, world_size, rank if local_rank is None else local_rank


def _device_for(local_rank: int) -> torch.device:
    """The CUDA device of this local rank (made current), or the CPU without CUDA."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    device = torch.device("cuda", local_rank % torch.cuda.device_count())
    torch.cuda.set_device(device)
    return device


def process_group_backend() -> str:
    """The backend of the default process group: NCCL with CUDA, gloo without."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def _init_process_group(rank: int, world_size: int, timeout: timedelta) -> None:
    """Start the default process group on `process_group_backend()`.

    With a launcher's environment it rendezvouses through MASTER_ADDR/MASTER_PORT; a single
    process without one uses a free port on 127.0.0.1.
    """
    if "MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ:
        init_method = "env://"
    elif world_size == 1:
        init_method = f"tcp://127.0.0.1:{_free_port()}"
    else:
        raise ParallelConfigError(
            f"WORLD_SIZE={world_size} needs MASTER_ADDR and MASTER_PORT in the environment"
        )
    dist.init_process_group(
        process_group_backend(),
        init_method=init_method,
        rank=rank,
        world_size=world_size,
        timeout=timeout,
    )


def initialize_parallel(
    cfg: ParallelConfig, seed: int = 1234, timeout: timedelta = DEFAULT_TIMEOUT
) -> ParallelInfo:
    """Set up the process group, megatron-core's parallel groups and the RNGs for `cfg`.

    Uses an already initialized default process group as it is (for example one a launcher or
    Lightning started); otherwise starts one from RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/
    MASTER_PORT, or as a world of one without them. On a machine without CUDA the megatron-core
    CPU compatibility layer is applied first. `cfg` is validated against the world size before any
    group is created (ParallelConfigError).

    Seeding: `torch.manual_seed(seed)` on every rank (so replicated parameters start equal) and
    megatron's `model_parallel_cuda_manual_seed(seed)`, which adds the tensor-parallel
    (`seed + 2718 + tp_rank`) and expert-parallel states that `get_cuda_rng_tracker().fork()`
    switches to.
    """
    if parallel_state.model_parallel_is_initialized():
        raise RuntimeError(
            "megatron parallel state is already initialized; call destroy_parallel()"
        )
    if dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
        local_rank = _env_int("LOCAL_RANK")
        local_rank = rank if local_rank is None else local_rank
    else:
        rank, world_size, local_rank = _launch_env()
    cfg.validate(world_size)
    apply_cpu_compat()
    device = _device_for(local_rank)
    if not dist.is_initialized():
        _init_process_group(rank, world_size, timeout)
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=cfg.tp,
        pipeline_model_parallel_size=cfg.pp,
        expert_model_parallel_size=cfg.ep,
        expert_tensor_parallel_size=cfg.etp,
        distributed_timeout_minutes=max(1, int(timeout.total_seconds() // 60)),
    )
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return ParallelInfo(
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        device=device,
        backend=dist.get_backend(),
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        tp_size=parallel_state.get_tensor_model_parallel_world_size(),
        pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
        pp_size=parallel_state.get_pipeline_model_parallel_world_size(),
        ep_rank=parallel_state.get_expert_model_parallel_rank(),
        ep_size=parallel_state.get_expert_model_parallel_world_size(),
        etp_rank=parallel_state.get_expert_tensor_parallel_rank(),
        etp_size=parallel_state.get_expert_tensor_parallel_world_size(),
        dp_rank=parallel_state.get_data_parallel_rank(),
        dp_size=parallel_state.get_data_parallel_world_size(),
        expert_dp_rank=parallel_state.get_expert_data_parallel_rank(),
        expert_dp_size=parallel_state.get_expert_data_parallel_world_size(),
        sp=cfg.sp,
    )


def destroy_parallel() -> None:
    """Tear down megatron-core's parallel state and the default process group, if any."""
    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
