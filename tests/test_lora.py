"""LoRA on the parallel model against transformers + PEFT, and every layout against TP=1.

Every adapter gets the same full random factors (non-zero B) at every layout. The gathered HF
adapter is written with the PEFT writer and loaded with `PeftModel.from_pretrained` onto the base
checkpoint's own class: no missing or unexpected keys, and its logits equal ours to a few times
the larger of PEFT's and our own fp32-vs-float64 differences (tests/numerics.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lora_trainer.export.hf_adapter_weights import HFAdapter
from lora_trainer.export.hf_export import ADAPTER_DIR, MERGED_DIR, export_hf
from lora_trainer.export.peft_adapter import write_peft_adapter
from lora_trainer.lora.config import LoraConfig, LoraConfigError
from tests.checkpoints import KIND_DENSE, KIND_MOE, KIND_MOE_VL, load_hf_model
from tests.layouts import LAYOUTS
from tests.lora_runner import run_lora
from tests.multirank import run_multirank
from tests.numerics import assert_differs, assert_within_floor, noise_floor, to_float64
from tests.test_peft_adapter import assert_fully_consumed, load_peft

KINDS = (KIND_DENSE, KIND_MOE, KIND_MOE_VL)


@pytest.fixture(scope="session")
def fused_single(checkpoints: dict[str, str], input_ids: torch.Tensor) -> dict:
    return run_multirank(run_lora, 1, {}, checkpoints, input_ids, {"r": 4, "alpha": 8.0})[0]


@pytest.fixture(scope="session")
def fused_single_fp64(checkpoints: dict[str, str], input_ids: torch.Tensor) -> dict:
    """The single-rank run in float64: the reference for the fp32 runs' rounding noise."""
    return run_multirank(
        run_lora, 1, {}, checkpoints, input_ids, {"r": 4, "alpha": 8.0}, torch.float64
    )[0]


def _adapter_tensors(adapter: HFAdapter) -> dict[str, torch.Tensor]:
    out = {}
    for name, weights in {**adapter.linears, **adapter.experts}.items():
        out[f"{name}.a"], out[f"{name}.b"] = weights.a, weights.b
    return out


def _peft_logits(
    path: str, adapter: HFAdapter, directory: Path, input_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The base + PEFT adapter's logits in fp32 and in float64."""
    write_peft_adapter(adapter, directory)
    model = load_peft(load_hf_model(Path(path)), directory)
    assert_fully_consumed(model, directory)
    model.set_adapter("default")
    with torch.no_grad():
        fp32 = model(input_ids=input_ids).logits
        return fp32, to_float64(model)(input_ids=input_ids).logits


@pytest.mark.parametrize("kind", KINDS)
def test_tp1_adapter_loads_in_peft_with_our_logits(
    kind: str,
    fused_single: dict,
    fused_single_fp64: dict,
    checkpoints: dict,
    input_ids: torch.Tensor,
    tmp_path: Path,
) -> None:
    ours = fused_single[kind]
    adapter: HFAdapter = ours["adapter"]
    assert all(w.b.abs().sum() > 0 for w in {**adapter.linears, **adapter.experts}.values())
    peft_fp32, peft_fp64 = _peft_logits(checkpoints[kind], adapter, tmp_path, input_ids)
    floor = max(
        noise_floor(peft_fp32, peft_fp64),
        noise_floor(ours["logits"], fused_single_fp64[kind]["logits"]),
    )
    assert_within_floor(ours["logits"], peft_fp32, floor, f"{kind}: logits vs PEFT")
    with torch.no_grad():
        base_logits = load_hf_model(Path(checkpoints[kind]))(input_ids=input_ids).logits
    assert_differs(base_logits, ours["logits"], 0.1, f"{kind}: logits with vs without the adapter")


def test_canonical_and_fused_give_the_same_logits_for_the_same_delta(
    fused_single: dict, fused_single_fp64: dict, checkpoints: dict, input_ids: torch.Tensor
) -> None:
    """Equal in exact arithmetic, so compared in float64 (the model's norms and kernels still run in
    fp32, hence the fp32 run's noise floor as the scale)."""
    lora = {"r": 4, "alpha": 8.0, "style": "canonical"}
    canonical = run_multirank(run_lora, 1, {}, checkpoints, input_ids, lora, torch.float64)[0]
    for kind in KINDS:
        fused = fused_single_fp64[kind]
        floor = noise_floor(fused_single[kind]["logits"], fused["logits"])
        assert_within_floor(
            canonical[kind]["logits"], fused["logits"], floor, f"{kind}: canonical vs fused"
        )
        fused_tensors = _adapter_tensors(fused["adapter"])
        canonical_tensors = _adapter_tensors(canonical[kind]["adapter"])
        assert sorted(fused_tensors) == sorted(canonical_tensors)
        for name, tensor in fused_tensors.items():
            assert torch.equal(canonical_tensors[name], tensor), f"{kind}: {name}"


def _tree_bytes(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_parallel_layout_matches_single_rank_and_peft(
    layout: str,
    fused_single: dict,
    fused_single_fp64: dict,
    checkpoints: dict,
    input_ids: torch.Tensor,
    tmp_path: Path,
) -> None:
    """Gradients within a few times the single-rank run's own fp32-vs-float64 difference relative to
    each tensor's largest entry (the worst ratio over all tensors: one tensor's few entries are too
    few to measure its own floor); logits as in the TP=1 test, with the single-rank run's floor."""
    world, parallel, kinds = LAYOUTS[layout]
    lora = {"r": 4, "alpha": 8.0}
    parts = tmp_path / "parts"
    results = run_multirank(
        run_lora,
        world,
        parallel,
        {k: checkpoints[k] for k in kinds},
        input_ids,
        lora,
        torch.float32,
        str(parts),
    )[0]
    for kind in kinds:
        # each rank wrote only its own factors: the same files as the gathered adapter exported on
        # one rank
        export_hf(
            results[kind]["adapter"],
            Path(checkpoints[kind]),
            tmp_path / "whole" / kind,
            step=1,
            progress=False,
        )
        for directory in (ADAPTER_DIR, MERGED_DIR):
            assert _tree_bytes(parts / kind / directory) == _tree_bytes(
                tmp_path / "whole" / kind / directory
            ), kind
        ours, single = results[kind], fused_single[kind]
        adapter_tensors, single_tensors = (
            _adapter_tensors(ours["adapter"]),
            _adapter_tensors(single["adapter"]),
        )
        assert sorted(adapter_tensors) == sorted(single_tensors), kind
        for name, tensor in single_tensors.items():
            assert torch.equal(adapter_tensors[name], tensor), f"{kind}: {name}"
        grads, single_grads = _adapter_tensors(ours["grads"]), _adapter_tensors(single["grads"])
        for name, grad in single_grads.items():
            assert grad.abs().sum() > 0, f"{kind}: {name} has no gradient"
        exact_grads = _adapter_tensors(fused_single_fp64[kind]["grads"])
        relative_floor = max(
            noise_floor(grad, exact_grads[name].double()) / grad.abs().max().item()
            for name, grad in single_grads.items()
        )
        for name, grad in single_grads.items():
            floor = relative_floor * grad.abs().max().item()
            assert_within_floor(grads[name], grad, floor, f"{kind}: {name}")
        (tmp_path / kind).mkdir()
        peft_fp32, peft_fp64 = _peft_logits(
            checkpoints[kind], ours["adapter"], tmp_path / kind, input_ids
        )
        single_floor = noise_floor(single["logits"], fused_single_fp64[kind]["logits"])
        floor = max(noise_floor(peft_fp32, peft_fp64), single_floor)
        assert_within_floor(ours["logits"], peft_fp32, floor, f"{kind}: logits vs PEFT")


def test_router_target_is_refused() -> None:
    with pytest.raises(LoraConfigError, match="router"):
        LoraConfig(targets=("linear_qkv", "router"))


def test_dropout_on_routed_experts_is_refused_but_allowed_on_dense() -> None:
    config = LoraConfig(dropout=0.1)
    with pytest.raises(LoraConfigError, match="dropout"):
        config.check_model(is_moe=True)
    config.check_model(is_moe=False)
    LoraConfig(dropout=0.1, targets=("linear_qkv", "in_proj")).check_model(is_moe=True)


def test_unknown_target_and_bad_rank_are_refused() -> None:
    with pytest.raises(LoraConfigError, match="q_proj"):
        LoraConfig(targets=("q_proj",))
    with pytest.raises(LoraConfigError, match=r"lora\.r"):
        LoraConfig(r=0)
