"""The pure-torch kernels against Hugging Face / explicit references, and packed (cu_seqlens)
inputs against running every sample on its own."""

from __future__ import annotations

import sys
import types

import pytest
import torch
import torch.nn.functional as F
from transformers.models.qwen3_5.modeling_qwen3_5 import torch_chunk_gated_delta_rule

from lora_trainer.kernels import causal_attention, causal_conv1d, chunk_gated_delta_rule
from lora_trainer.kernels import gated_delta_rule as gdr
from tests.numerics import assert_close

TOL = 1e-5


def gdr_inputs(
    batch: int,
    seq_len: int,
    key_heads: int,
    value_heads: int,
    key_dim: int,
    value_dim: int,
    seed: int = 0,
    gate_shift: float = 2.0,
) -> list[torch.Tensor]:
    """Leaf tensors q, k [B, T, Hk, Dk], v [B, T, Hv, Dv], g (log decay < 0), beta in (0, 1) [B, T, Hv].
    A lower `gate_shift` gives a stronger decay."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seq_len, key_heads, key_dim, generator=gen)
    k = torch.randn(batch, seq_len, key_heads, key_dim, generator=gen)
    v = torch.randn(batch, seq_len, value_heads, value_dim, generator=gen)
    g = F.logsigmoid(torch.randn(batch, seq_len, value_heads, generator=gen) + gate_shift)
    beta = torch.rand(batch, seq_len, value_heads, generator=gen)
    return [x.requires_grad_() for x in (q, k, v, g, beta)]


def grads_of(outputs: list[torch.Tensor], inputs: list[torch.Tensor], seed: int = 1) -> list[torch.Tensor]:
    """Gradients of a random linear function of the outputs."""
    gen = torch.Generator().manual_seed(seed)
    loss = sum((out * torch.randn(out.shape, generator=gen)).sum() for out in outputs)
    return list(torch.autograd.grad(loss, inputs))


@pytest.mark.parametrize(
    "shape",
    [(2, 100, 2, 4, 32, 48), (1, 130, 2, 2, 16, 16), (1, 64, 1, 3, 8, 24)],
    ids=["gva-dk!=dv-partial-chunk", "mha-partial-chunk", "group3-one-chunk"],
)
@pytest.mark.parametrize("with_initial_state", [False, True], ids=["zero-state", "initial-state"])
def test_gated_delta_rule_matches_transformers(shape, with_initial_state):
    batch, _, _, value_heads, key_dim, value_dim = shape
    inputs = gdr_inputs(*shape)
    if with_initial_state:
        gen = torch.Generator().manual_seed(2)
        inputs.append(torch.randn(batch, value_heads, key_dim, value_dim, generator=gen).requires_grad_())
    q, k, v, g, beta = inputs[:5]
    initial_state = inputs[5] if with_initial_state else None

    ref_out, ref_state = torch_chunk_gated_delta_rule(
        q, k, v, g, beta, initial_state=initial_state, output_final_state=True, use_qk_l2norm_in_kernel=True
    )
    out, final_state = chunk_gated_delta_rule(
        q, k, v, g, beta, initial_state=initial_state, output_final_state=True
    )
    assert out.shape == ref_out.shape and out.dtype == torch.float32
    assert_close(out, ref_out, TOL, "out")
    assert_close(final_state, ref_state, TOL, "final_state")
    for ours, theirs in zip(grads_of([out, final_state], inputs), grads_of([ref_out, ref_state], inputs)):
        assert_close(ours, theirs, TOL, "grad")


def test_gated_delta_rule_matches_transformers_under_strong_decay():
    inputs = gdr_inputs(1, 150, 2, 4, 16, 16, seed=11, gate_shift=-4.0)
    ref_out, ref_state = torch_chunk_gated_delta_rule(
        *inputs, output_final_state=True, use_qk_l2norm_in_kernel=True
    )
    out, final_state = chunk_gated_delta_rule(*inputs, output_final_state=True)
    assert_close(out, ref_out, TOL, "out")
    assert_close(final_state, ref_state, TOL, "final_state")
    for ours, theirs in zip(grads_of([out, final_state], inputs), grads_of([ref_out, ref_state], inputs)):
        assert_close(ours, theirs, TOL, "grad")


def test_gated_delta_rule_without_l2norm_matches_transformers():
    q, k, v, g, beta = gdr_inputs(1, 90, 2, 4, 16, 16, seed=3)
    q_unit, k_unit = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    ref_out, _ = torch_chunk_gated_delta_rule(q_unit, k_unit, v, g, beta, use_qk_l2norm_in_kernel=False)
    out, state = chunk_gated_delta_rule(q_unit, k_unit, v, g, beta, use_qk_l2norm=False)
    assert state is None
    assert_close(out, ref_out, TOL, "out")


def test_gated_delta_rule_keeps_input_dtype():
    q, k, v, g, beta = (x.detach().to(torch.bfloat16) for x in gdr_inputs(1, 70, 1, 2, 16, 16))
    out, _ = chunk_gated_delta_rule(q, k, v, g, beta)
    ref_out, _ = chunk_gated_delta_rule(q.float(), k.float(), v.float(), g.float(), beta.float())
    assert out.dtype == torch.bfloat16
    assert_close(out.float(), ref_out, 2e-2, "out")


@pytest.mark.parametrize("with_initial_state", [False, True], ids=["zero-state", "initial-state"])
def test_gated_delta_rule_packed_equals_per_sample(with_initial_state):
    lengths = [37, 64, 0, 100, 1]
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    inputs = gdr_inputs(1, sum(lengths), 2, 4, 16, 24, seed=4)
    if with_initial_state:
        states = torch.randn(len(lengths), 4, 16, 24, generator=torch.Generator().manual_seed(5))
        inputs.append(states.requires_grad_())
    q, k, v, g, beta = inputs[:5]
    initial_state = inputs[5] if with_initial_state else None

    out, final = chunk_gated_delta_rule(
        q, k, v, g, beta, initial_state=initial_state, output_final_state=True, cu_seqlens=cu_seqlens
    )
    pieces, finals = [], []
    for i, (start, end) in enumerate(zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist())):
        if start == end:
            finals.append(torch.zeros(1, 4, 16, 24) if initial_state is None else initial_state[i : i + 1])
            continue
        piece, piece_final = chunk_gated_delta_rule(
            *(x[:, start:end] for x in (q, k, v, g, beta)),
            initial_state=None if initial_state is None else initial_state[i : i + 1],
            output_final_state=True,
        )
        pieces.append(piece)
        finals.append(piece_final)
    expected, expected_final = torch.cat(pieces, dim=1), torch.cat(finals)
    assert final.shape == (len(lengths), 4, 16, 24)
    assert_close(out, expected, 1e-6, "out")
    assert_close(final, expected_final, 1e-6, "final")
    for ours, theirs in zip(grads_of([out, final], inputs), grads_of([expected, expected_final], inputs)):
        assert_close(ours, theirs, 1e-6, "grad")


@pytest.mark.parametrize("gate_shift", [2.0, -2.0, -60.0], ids=["weak-decay", "strong-decay", "extreme-decay"])
def test_gated_delta_rule_packed_without_states_equals_per_sample(gate_shift):
    """The path training takes: samples chunked as one sequence, several inside one chunk, one
    starting on a chunk boundary, one across chunks, an empty one."""
    lengths = [5, 20, 1, 38, 64, 0, 100, 3]
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    inputs = gdr_inputs(1, sum(lengths), 2, 4, 16, 24, seed=6, gate_shift=gate_shift)
    out, final = chunk_gated_delta_rule(*inputs, cu_seqlens=cu_seqlens)
    bounds = cu_seqlens.tolist()
    expected = torch.cat(
        [
            chunk_gated_delta_rule(*(x[:, start:end] for x in inputs))[0]
            for start, end in zip(bounds[:-1], bounds[1:])
            if end > start
        ],
        dim=1,
    )
    assert final is None
    assert max_diff(out, expected) <= TOL
    for ours, theirs in zip(grads_of([out], inputs), grads_of([expected], inputs)):
        assert max_diff(ours, theirs) <= TOL


def test_gated_delta_rule_rejects_bad_shapes():
    q, k, v, g, beta = (x.detach() for x in gdr_inputs(2, 8, 2, 3, 4, 4))
    with pytest.raises(ValueError, match="multiple of Hk"):
        chunk_gated_delta_rule(q, k, v, g, beta)
    q, k, v, g, beta = (x.detach() for x in gdr_inputs(2, 8, 2, 4, 4, 4))
    with pytest.raises(ValueError, match="batch size 1"):
        chunk_gated_delta_rule(q, k, v, g, beta, cu_seqlens=torch.tensor([0, 8]))
    with pytest.raises(ValueError, match="from 0 to T=8"):
        chunk_gated_delta_rule(*(x[:1] for x in (q, k, v, g, beta)), cu_seqlens=torch.tensor([0, 5]))


def test_fla_backend_gets_heads_expanded_and_fla_keywords(monkeypatch):
    """The CUDA path's call into FLA, with FLA faked by our torch path at Hk == Hv."""

    def fake_fla(
        q, k, v, g, beta, *, scale, initial_state, output_final_state, use_qk_l2norm_in_kernel, cu_seqlens
    ):
        assert q.shape[2] == k.shape[2] == v.shape[2] and scale == q.shape[-1] ** -0.5
        return gdr._torch_chunk_gated_delta_rule(
            q, k, v, g, beta, initial_state, output_final_state, cu_seqlens, use_qk_l2norm_in_kernel
        )

    fla_module = types.ModuleType("fla.ops.gated_delta_rule")
    fla_module.chunk_gated_delta_rule = fake_fla
    for name in ("fla", "fla.ops"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "fla.ops.gated_delta_rule", fla_module)
    q, k, v, g, beta = (x.detach() for x in gdr_inputs(1, 80, 2, 6, 16, 8, seed=10))
    cu_seqlens = torch.tensor([0, 30, 80])
    out, state = gdr._fla_chunk_gated_delta_rule(q, k, v, g, beta, None, True, cu_seqlens, True)
    expected, expected_state = chunk_gated_delta_rule(
        q, k, v, g, beta, output_final_state=True, cu_seqlens=cu_seqlens
    )
    assert_close(out, expected, TOL, "out")
    assert_close(state, expected_state, TOL, "state")


def hf_conv(x: torch.Tensor, weight: torch.Tensor, activation: str | None) -> torch.Tensor:
    """Hugging Face's torch fallback of causal_conv1d_fn."""
    out = F.conv1d(x, weight.unsqueeze(1), padding=weight.shape[1] - 1, groups=x.shape[1])[..., : x.shape[-1]]
    return F.silu(out) if activation == "silu" else out


@pytest.mark.parametrize("activation", ["silu", None])
def test_causal_conv1d_matches_hf(activation):
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(2, 12, 50, generator=gen, requires_grad=True)
    weight = torch.randn(12, 4, generator=gen, requires_grad=True)
    out = causal_conv1d(x, weight, activation=activation)
    ref = hf_conv(x, weight, activation)
    assert_close(out, ref, TOL, "out")
    for ours, theirs in zip(grads_of([out], [x, weight]), grads_of([ref], [x, weight])):
        assert_close(ours, theirs, TOL, "grad")


def test_causal_conv1d_packed_equals_per_sample():
    gen = torch.Generator().manual_seed(7)
    lengths = [5, 2, 0, 17, 1]
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    x = torch.randn(1, 12, sum(lengths), generator=gen, requires_grad=True)
    weight = torch.randn(12, 4, generator=gen, requires_grad=True)
    out = causal_conv1d(x, weight, cu_seqlens=cu_seqlens)
    expected = torch.cat(
        [
            hf_conv(x[..., s:e], weight, "silu")
            for s, e in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist())
            if e > s
        ],
        dim=-1,
    )
    assert_close(out, expected, TOL, "out")
    for ours, theirs in zip(grads_of([out], [x, weight]), grads_of([expected], [x, weight])):
        assert_close(ours, theirs, TOL, "grad")


def softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Explicit causal softmax attention, kv heads repeated for GQA: [B, T, H, D] in and out."""
    group = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    seq_len = q.shape[1]
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool).tril()
    weights = scores.masked_fill(~causal, float("-inf")).softmax(dim=-1)
    return torch.einsum("bhqk,bkhd->bqhd", weights, v)


def attention_inputs(batch: int, seq_len: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seq_len, 4, 16, generator=gen, requires_grad=True)
    k = torch.randn(batch, seq_len, 2, 16, generator=gen, requires_grad=True)
    v = torch.randn(batch, seq_len, 2, 16, generator=gen, requires_grad=True)
    return q, k, v


def test_causal_attention_matches_softmax_reference_with_gqa():
    q, k, v = attention_inputs(2, 33, seed=8)
    out = causal_attention(q, k, v, scale=0.3)
    ref = softmax_attention(q, k, v, 0.3)
    assert out.shape == (2, 33, 4, 16)
    assert_close(out, ref, TOL, "out")
    for ours, theirs in zip(grads_of([out], [q, k, v]), grads_of([ref], [q, k, v])):
        assert_close(ours, theirs, TOL, "grad")


def test_causal_attention_packed_equals_per_sample():
    lengths = [9, 1, 20, 3]
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    q, k, v = attention_inputs(1, sum(lengths), seed=9)
    out = causal_attention(q, k, v, scale=0.25, cu_seqlens=cu_seqlens)
    expected = torch.cat(
        [
            softmax_attention(q[:, s:e], k[:, s:e], v[:, s:e], 0.25)
            for s, e in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist())
        ],
        dim=1,
    )
    assert_close(out, expected, TOL, "out")
    for ours, theirs in zip(grads_of([out], [q, k, v]), grads_of([expected], [q, k, v])):
        assert_close(ours, theirs, TOL, "grad")
