"""Our Megatron Qwen3.5 against transformers, and every parallel layout against TP=1.

One spawned run per parallel layout covers all three checkpoints (dense ForCausalLM, MoE
ForCausalLM with per-expert tensors on disk, MoE ForConditionalGeneration with a vision tower,
MTP tensors and packed experts on disk): logits, input (embedding) gradients, and the round trip
HF -> Megatron -> HF of every text tensor.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.checkpoints import KIND_DENSE, KIND_MOE, KIND_MOE_VL, load_hf_model
from tests.layouts import LAYOUTS
from tests.multirank import run_multirank
from tests.parity_runner import logit_weights, run_parity

LOGIT_TOL = 1e-4
GRAD_TOL = 1e-5


@pytest.fixture(scope="session")
def reference(checkpoints: dict[str, str], input_ids: torch.Tensor) -> dict[str, dict[str, torch.Tensor]]:
    """transformers' logits and embedding-table gradient for the loss sum(logits * W)."""
    out = {}
    for kind, path in checkpoints.items():
        model = load_hf_model(Path(path))
        logits = model(input_ids=input_ids).logits
        (logits * logit_weights(tuple(logits.shape))).sum().backward()
        out[kind] = {"logits": logits.detach(), "embed_grad": model.get_input_embeddings().weight.grad}
    return out


@pytest.fixture(scope="session")
def single_rank(checkpoints: dict[str, str], input_ids: torch.Tensor) -> dict[str, dict[str, torch.Tensor]]:
    return run_multirank(run_parity, 1, {}, checkpoints, input_ids)[0]


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def _text_tensors(path: str) -> dict[str, torch.Tensor]:
    tensors = load_file(str(Path(path) / "model.safetensors"))
    return {k: v for k, v in tensors.items() if not k.startswith(("model.visual.", "mtp."))}


@pytest.mark.parametrize("kind", [KIND_DENSE, KIND_MOE, KIND_MOE_VL])
def test_tp1_matches_transformers(kind: str, single_rank: dict, reference: dict, checkpoints: dict) -> None:
    ours, ref = single_rank[kind], reference[kind]
    assert _max_diff(ours["logits"], ref["logits"]) <= LOGIT_TOL
    assert _max_diff(ours["embed_grad"], ref["embed_grad"]) <= LOGIT_TOL
    hf_state, on_disk = ours["hf_state"], _text_tensors(checkpoints[kind])
    assert sorted(hf_state) == sorted(on_disk)
    for name, tensor in on_disk.items():
        assert torch.equal(hf_state[name], tensor), name


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_parallel_layout_matches_single_rank(
    layout: str, checkpoints: dict, input_ids: torch.Tensor, single_rank: dict, reference: dict
) -> None:
    world, parallel, kinds = LAYOUTS[layout]
    results = run_multirank(run_parity, world, parallel, {k: checkpoints[k] for k in kinds}, input_ids)[0]
    for kind in kinds:
        ours, single = results[kind], single_rank[kind]
        assert _max_diff(ours["logits"], reference[kind]["logits"]) <= LOGIT_TOL, kind
        assert _max_diff(ours["embed_grad"], single["embed_grad"]) <= GRAD_TOL, kind
        assert sorted(ours["hf_state"]) == sorted(single["hf_state"]), kind
        for name, tensor in single["hf_state"].items():
            assert torch.equal(ours["hf_state"][name], tensor), f"{kind}: {name}"
