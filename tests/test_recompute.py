"""`model.recompute`: LoRA gradients and the adapter after a few steps equal those without
recompute, with LoRA dropout, on packed rows, at PP=1, PP=2 and EP=2 (the MoE all-to-all inside
the recomputed layers)."""

from __future__ import annotations

import pytest
import torch

from tests.checkpoints import KIND_DENSE, KIND_MOE_VL
from tests.lora_runner import run_recompute
from tests.multirank import run_multirank
from tests.test_lora import _adapter_tensors

LORA = {
    KIND_DENSE: {"r": 4, "alpha": 8.0, "dropout": 0.2},
    KIND_MOE_VL: {"r": 4, "alpha": 8.0},
}
TOL = 1e-6


LAYOUTS = {
    "pp1": (1, {}, (KIND_DENSE, KIND_MOE_VL)),
    "pp2": (2, {"pp": 2}, (KIND_DENSE, KIND_MOE_VL)),
    "ep2": (2, {"ep": 2}, (KIND_MOE_VL,)),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_selective_and_full_recompute_equal_no_recompute(
    layout: str, checkpoints: dict, input_ids: torch.Tensor
) -> None:
    world, parallel, kinds = LAYOUTS[layout]
    results = run_multirank(
        run_recompute, world, parallel, {k: checkpoints[k] for k in kinds}, input_ids, LORA
    )[0]
    for kind in kinds:
        reference = results[kind]["none"]
        ref_grads, ref_adapter = (
            _adapter_tensors(reference["grads"]),
            _adapter_tensors(reference["adapter"]),
        )
        assert all(g.abs().sum() > 0 for g in ref_grads.values()), kind
        for mode in ("selective", "full"):
            grads, adapter = (
                _adapter_tensors(results[kind][mode]["grads"]),
                _adapter_tensors(results[kind][mode]["adapter"]),
            )
            for name, grad in ref_grads.items():
                assert (grads[name] - grad).abs().max().item() <= TOL, f"{kind} {mode}: grad {name}"
            for name, tensor in ref_adapter.items():
                assert (adapter[name] - tensor).abs().max().item() <= TOL, f"{kind} {mode}: {name}"
