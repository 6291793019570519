"""A LoRA adapter in Hugging Face layout: what the export writers take as input.

The gather from the Megatron ranks produces an `HFAdapter`: every LoRA factor already full size
(no TP/EP shards), already split into the HF target modules (`q_proj` incl. its gate rows,
`in_proj_qkv/z/b/a`, `gate_proj`/`up_proj`, ...), named by the HF module path below the text
prefix. The writers only lay it out on disk.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

# (HF module path below the text prefix, expert index or None) -> (a [r, in], b [out, r])
LocalFactors = dict[tuple[str, int | None], tuple[Tensor, Tensor]]
# The same, read only: a dict, or a mapping that reads each pair from disk when it is looked up
# (a background export's snapshot, `snapshot.SnapshotReader`), so nothing is held between uses.
FactorMapping = Mapping[tuple[str, int | None], tuple[Tensor, Tensor]]


@dataclass(frozen=True)
class HFLoraWeights:
    """LoRA factors of one HF linear module: delta = scale * b @ a, shaped like its weight
    [out, in].

    `a` is [r, in], `b` is [out, r].
    """

    a: Tensor
    b: Tensor

    def __post_init__(self) -> None:
        if self.a.ndim != 2 or self.b.ndim != 2 or self.a.shape[0] != self.b.shape[1]:
            raise ValueError(
                "linear LoRA factors must be a [r, in] and b [out, r]; got a "
                f"{tuple(self.a.shape)}, b {tuple(self.b.shape)}"
            )


@dataclass(frozen=True)
class HFExpertLoraWeights:
    """LoRA factors of the routed experts of one layer for one packed projection.

    `a` is [E, r, in], `b` is [E, out, r]; delta[e] = scale * b[e] @ a[e] is shaped like the HF
    packed parameter W[e] (`gate_up_proj` [E, 2I, H], `down_proj` [E, H, I]), which the model
    applies as `linear(x, W[e])`.
    """

    a: Tensor
    b: Tensor

    def __post_init__(self) -> None:
        if (
            self.a.ndim != 3
            or self.b.ndim != 3
            or self.a.shape[0] != self.b.shape[0]
            or self.a.shape[1] != self.b.shape[2]
        ):
            raise ValueError(
                "expert LoRA factors must be a [E, r, in] and b [E, out, r]; got a "
                f"{tuple(self.a.shape)}, b {tuple(self.b.shape)}"
            )


@dataclass(frozen=True)
class HFAdapter:
    """A whole adapter in HF layout.

    `linears` is keyed by the HF module path without the text prefix (`layers.0.self_attn.q_proj`,
    `layers.1.linear_attn.in_proj_qkv`, `layers.0.mlp.shared_expert.gate_proj`, dense
    `layers.0.mlp.gate_proj`); `experts` by the packed parameter path
    (`layers.0.mlp.experts.gate_up_proj`, `layers.0.mlp.experts.down_proj`). `text_prefix` is
    `model.language_model.` for ForConditionalGeneration checkpoints and `model.` for ForCausalLM.
    """

    linears: dict[str, HFLoraWeights]
    experts: dict[str, HFExpertLoraWeights]
    r: int
    alpha: float
    use_rslora: bool
    text_prefix: str
    base_model_name_or_path: str

    def __post_init__(self) -> None:
        ranks = {w.a.shape[-2] for w in self.factors()}
        if ranks - {self.r}:
            raise ValueError(f"adapter rank is {self.r} but its factors have ranks {sorted(ranks)}")
        if not self.text_prefix.endswith("."):
            raise ValueError(f"text_prefix must end with '.', got {self.text_prefix!r}")

    def factors(self) -> list[HFLoraWeights | HFExpertLoraWeights]:
        """The factors of every linear module and every packed expert projection."""
        return [*self.linears.values(), *self.experts.values()]

    @property
    def scale(self) -> float:
        """The LoRA scaling: alpha / r, or alpha / sqrt(r) with rsLoRA."""
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


@dataclass(frozen=True)
class DistributedAdapter:
    """An adapter spread over ranks, as the export writes it.

    `layout` is the whole adapter with every factor on the meta device (names and shapes only; the
    same on every rank); `local` holds the factors this rank writes, keyed (module, expert index
    or None), a [r, in] and b [out, r] of one linear module or one expert (in memory, or read
    when looked up); no factor is local to two ranks. `nonzero_lora_b` counts the non-zero lora_B
    of the whole adapter (one per linear module, one per packed expert projection).
    """

    layout: HFAdapter
    local: FactorMapping
    nonzero_lora_b: int

    @classmethod
    def of(cls, adapter: HFAdapter) -> DistributedAdapter:
        """A whole adapter held by one rank: every factor is local."""
        local: LocalFactors = {(module, None): (w.a, w.b) for module, w in adapter.linears.items()}
        for key, weights in adapter.experts.items():
            local.update(
                {(key, e): (weights.a[e], weights.b[e]) for e in range(weights.a.shape[0])}
            )
        nonzero = sum(1 for w in adapter.factors() if bool(w.b.any()))
        return cls(on_meta(adapter), local, nonzero)


def on_meta(adapter: HFAdapter) -> HFAdapter:
    """`adapter` with every factor replaced by an fp32 meta tensor of its shape."""

    def meta(tensor: Tensor) -> Tensor:
        return torch.empty(tensor.shape, dtype=torch.float32, device="meta")

    return HFAdapter(
        linears={m: HFLoraWeights(meta(w.a), meta(w.b)) for m, w in adapter.linears.items()},
        experts={k: HFExpertLoraWeights(meta(w.a), meta(w.b)) for k, w in adapter.experts.items()},
        r=adapter.r,
        alpha=adapter.alpha,
        use_rslora=adapter.use_rslora,
        text_prefix=adapter.text_prefix,
        base_model_name_or_path=adapter.base_model_name_or_path,
    )


def hf_weights_from_factors(
    factors: LocalFactors,
) -> tuple[dict[str, HFLoraWeights], dict[str, HFExpertLoraWeights]]:
    """Factors keyed by (HF module, expert or None) in the layout of an HFAdapter: linears by
    module, each module's experts stacked in expert order, both sorted by name."""
    linears: dict[str, HFLoraWeights] = {}
    experts: dict[str, dict[int, tuple[Tensor, Tensor]]] = {}
    for (module, expert), (a, b) in factors.items():
        if expert is None:
            linears[module] = HFLoraWeights(a=a, b=b)
        else:
            experts.setdefault(module, {})[expert] = (a, b)
    stacked = {
        module: HFExpertLoraWeights(
            a=_stack([by_expert[e][0] for e in sorted(by_expert)]),
            b=_stack([by_expert[e][1] for e in sorted(by_expert)]),
        )
        for module, by_expert in sorted(experts.items())
    }
    return dict(sorted(linears.items())), stacked


def _stack(tensors: list[Tensor]) -> Tensor:
    """`torch.stack`; meta tensors are made at the stacked shape instead (stacking them runs
    torch's Python meta kernels, whose first use imports ~800 modules: ~70 MiB and, on a busy
    machine, tens of seconds in an export worker)."""
    first = tensors[0]
    if first.is_meta:
        return torch.empty((len(tensors), *first.shape), dtype=first.dtype, device="meta")
    return torch.stack(tensors)
