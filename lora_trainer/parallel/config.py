"""`ParallelConfig`: how the world of ranks is split into tensor, pipeline, expert and data
parallel."""

from __future__ import annotations

from dataclasses import dataclass

from lora_trainer.errors import ParallelConfigError


@dataclass(frozen=True)
class ParallelConfig:
    """Parallel sizes, in megatron-core's terms.

    - `tp`: tensor parallel size (attention and dense MLP weights are sharded over it);
    - `pp`: pipeline parallel size (the layer stack is cut into `pp` stages);
    - `ep`: expert parallel size (routed experts are spread over it);
    - `etp`: expert tensor parallel size (each routed expert's weights are sharded over it);
    - `sp`: sequence parallelism, which shards activations outside the tensor-parallel regions
      along the sequence. It needs `tp > 1`: `sp=True` with `tp == 1` is an error (megatron-core
      itself rejects it, and silently ignoring it would make `sp` lie about the run).

    Data parallelism takes whatever the other sizes leave: `world_size // (tp * pp)` ranks for the
    dense part and `world_size // (etp * ep * pp)` for the experts. Checks that need the model
    (heads, experts, layers divisible by the sizes) belong to the model side.
    """

    tp: int = 1
    pp: int = 1
    ep: int = 1
    etp: int = 1
    sp: bool = False

    def dp_size(self, world_size: int) -> int:
        """Data parallel size of the dense part for `world_size` ranks (validated first)."""
        self.validate(world_size)
        return world_size // (self.tp * self.pp)

    def expert_dp_size(self, world_size: int) -> int:
        """Data parallel size of the routed experts for `world_size` ranks (validated first)."""
        self.validate(world_size)
        return world_size // (self.etp * self.ep * self.pp)

    def validate(self, world_size: int) -> None:
        """Raise ParallelConfigError unless these sizes fit `world_size` ranks."""
        for name in ("tp", "pp", "ep", "etp"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ParallelConfigError(
                    f"parallel size {name}={value!r} must be a positive integer"
                )
        if not isinstance(self.sp, bool):
            raise ParallelConfigError(f"sp={self.sp!r} must be true or false")
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise ParallelConfigError(f"world size {world_size!r} must be a positive integer")
        dense = self.tp * self.pp
        if world_size % dense != 0:
            raise ParallelConfigError(
                f"world size {world_size} is not divisible by tp*pp = {self.tp}*{self.pp} = "
                f"{dense}; choose tp and pp whose product divides the number of ranks"
            )
        expert = self.etp * self.ep * self.pp
        if world_size % expert != 0:
            raise ParallelConfigError(
                f"world size {world_size} is not divisible by etp*ep*pp = "
                f"{self.etp}*{self.ep}*{self.pp} = {expert} (the expert grid); choose etp, ep "
                f"and pp whose product divides the number of ranks"
            )
        if self.sp and self.tp == 1:
            raise ParallelConfigError(
                "sp=true needs tensor parallelism (tp > 1), got tp=1; set sp=false or tp > 1"
            )
