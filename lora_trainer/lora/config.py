"""`LoraConfig`: which Megatron linears get adapters, and how."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from lora_trainer.errors import LoraTrainerError

_ROUTER = (
    "a LoRA on the MoE router (HF `mlp.gate`) cannot be loaded by PEFT (unsupported module type)"
)

LoraStyle = Literal["fused", "canonical"]
ALL_TARGETS: tuple[str, ...] = (
    "linear_qkv",
    "linear_proj",
    "in_proj",
    "out_proj",
    "linear_fc1",
    "linear_fc2",
)
UNEXPRESSIBLE_TARGETS = {
    "router": _ROUTER,
    "gate": _ROUTER,
}


class LoraConfigError(LoraTrainerError):
    """A LoRA setting that is invalid or that the exported PEFT adapter could not express."""


@dataclass(frozen=True)
class LoraConfig:
    """LoRA settings.

    - `targets`: Megatron linear names; `linear_fc1`/`linear_fc2` cover the dense MLP, the shared
      expert and the routed experts.
    - `style`: `fused` puts one adapter on each fused Megatron weight (q+gate+k+v, GDN in_proj,
      gate+up); `canonical` puts one per HF target (q_proj with its gate rows, k_proj, v_proj;
      in_proj_qkv/z/b/a; gate_proj, up_proj). Routed experts have one adapter per expert either way.
    """

    r: int = 16
    alpha: float = 32.0
    rslora: bool = False
    dropout: float = 0.0
    targets: tuple[str, ...] = field(default=ALL_TARGETS)
    style: LoraStyle = "fused"
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "targets", tuple(self.targets))
        if self.r < 1:
            raise LoraConfigError(f"lora.r={self.r} must be at least 1")
        if not 0.0 <= self.dropout < 1.0:
            raise LoraConfigError(f"lora.dropout={self.dropout} must be in [0, 1)")
        if self.style not in ("fused", "canonical"):
            raise LoraConfigError(f"lora.style={self.style!r} must be 'fused' or 'canonical'")
        for target in self.targets:
            if target in UNEXPRESSIBLE_TARGETS:
                raise LoraConfigError(
                    f"lora.targets contains {target!r}: {UNEXPRESSIBLE_TARGETS[target]}; remove it"
                )
            if target not in ALL_TARGETS:
                raise LoraConfigError(
                    f"lora.targets contains unknown {target!r}; choose from "
                    f"{', '.join(ALL_TARGETS)}"
                )
        if not self.targets:
            raise LoraConfigError(
                "lora.targets is empty; name at least one of " + ", ".join(ALL_TARGETS)
            )

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)

    def check_model(self, is_moe: bool) -> None:
        """Settings that depend on the model: PEFT's expert LoRA (`target_parameters`) has no
        dropout."""
        touches_experts = is_moe and bool({"linear_fc1", "linear_fc2"} & set(self.targets))
        if touches_experts and self.dropout > 0:
            raise LoraConfigError(
                f"lora.dropout={self.dropout} on routed experts cannot be expressed in PEFT's "
                "expert "
                "format (target_parameters has no dropout); set lora.dropout=0 or drop "
                "linear_fc1/linear_fc2 from lora.targets"
            )
