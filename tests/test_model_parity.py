"""Our Megatron Qwen3.5 against transformers, and every parallel layout against TP=1.

One spawned run per parallel layout covers all three checkpoints (dense ForCausalLM, MoE
ForCausalLM with per-expert tensors on disk, MoE ForConditionalGeneration with a vision tower,
MTP tensors and packed experts on disk): logits, input (embedding) gradients, and the round trip
HF -> Megatron -> HF of every text tensor. Logits and gradients agree to a few times the larger
of the two sides' own fp32-vs-float64 differences on the same checkpoint and batch
(tests/numerics.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.checkpoints import KIND_DENSE, KIND_MOE, KIND_MOE_VL, load_hf_model
from tests.layouts import LAYOUTS
from tests.multirank import run_multirank
from tests.numerics import assert_within_floor, noise_floor, to_float64
from tests.parity_runner import logit_weights, run_parity


def _logits_and_embed_grad(
    model: torch.nn.Module, input_ids: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The model's logits and embedding-table gradient for the loss sum(logits * W)."""
    logits = model(input_ids=input_ids).logits
    (logits * logit_weights(tuple(logits.shape)).to(logits.dtype)).sum().backward()
    return {"logits": logits.detach(), "embed_grad": model.get_input_embeddings().weight.grad}


@pytest.fixture(scope="session")
def reference(
    checkpoints: dict[str, str], input_ids: torch.Tensor
) -> dict[str, dict[str, torch.Tensor]]:
    """transformers' fp32 logits and embedding-table gradient, and their noise floors (their
    difference from the same model run in float64)."""
    out = {}
    for kind, path in checkpoints.items():
        fp32 = _logits_and_embed_grad(load_hf_model(Path(path)), input_ids)
        fp64 = _logits_and_embed_grad(to_float64(load_hf_model(Path(path))), input_ids)
        floors = {f"{key}_floor": noise_floor(fp32[key], fp64[key]) for key in fp32}
        out[kind] = {**fp32, **floors}
    return out


@pytest.fixture(scope="session")
def single_rank(
    checkpoints: dict[str, str], input_ids: torch.Tensor
) -> dict[str, dict[str, torch.Tensor]]:
    """Our TP=1 run, with the noise floors of its logits and embedding gradient (their difference
    from the same run in float64)."""
    fp32 = run_multirank(run_parity, 1, {}, checkpoints, input_ids)[0]
    fp64 = run_multirank(run_parity, 1, {}, checkpoints, input_ids, torch.float64)[0]
    for kind, ours in fp32.items():
        ours.update(
            {
                f"{key}_floor": noise_floor(ours[key], fp64[kind][key])
                for key in ("logits", "embed_grad")
            }
        )
    return fp32


def _text_tensors(path: str) -> dict[str, torch.Tensor]:
    tensors = load_file(str(Path(path) / "model.safetensors"))
    return {k: v for k, v in tensors.items() if not k.startswith(("model.visual.", "mtp."))}


@pytest.mark.parametrize("kind", [KIND_DENSE, KIND_MOE, KIND_MOE_VL])
def test_tp1_matches_transformers(
    kind: str, single_rank: dict, reference: dict, checkpoints: dict
) -> None:
    ours, ref = single_rank[kind], reference[kind]
    for key in ("logits", "embed_grad"):
        floor = max(ours[f"{key}_floor"], ref[f"{key}_floor"])
        assert_within_floor(ours[key], ref[key], floor, f"{kind}: {key} vs transformers")
    hf_state, on_disk = ours["hf_state"], _text_tensors(checkpoints[kind])
    assert sorted(hf_state) == sorted(on_disk)
    for name, tensor in on_disk.items():
        assert torch.equal(hf_state[name], tensor), name


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_parallel_layout_matches_single_rank(
    layout: str, checkpoints: dict, input_ids: torch.Tensor, single_rank: dict, reference: dict
) -> None:
    world, parallel, kinds = LAYOUTS[layout]
    results = run_multirank(
        run_parity, world, parallel, {k: checkpoints[k] for k in kinds}, input_ids
    )[0]
    for kind in kinds:
        ours, single = results[kind], single_rank[kind]
        floor = max(single["logits_floor"], reference[kind]["logits_floor"])
        assert_within_floor(
            ours["logits"], reference[kind]["logits"], floor, f"{kind}: logits vs transformers"
        )
        grad_floor = single["embed_grad_floor"]
        assert_within_floor(
            ours["embed_grad"], single["embed_grad"], grad_floor, f"{kind}: embed_grad vs TP=1"
        )
        assert sorted(ours["hf_state"]) == sorted(single["hf_state"]), kind
        for name, tensor in single["hf_state"].items():
            assert torch.equal(ours["hf_state"][name], tensor), f"{kind}: {name}"
