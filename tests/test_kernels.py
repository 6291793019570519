"""The pure-torch kernels against Hugging Face / explicit references, and packed (cu_seqlens)
inputs against running every sample on its own.

Outputs and gradients agree to a few times the fp32 reference's own distance from an exact float64
computation of the same thing (tests/numerics.py); for the gated delta rule, whose implementations
all compute in fp32, that is a step-by-step float64 recurrence written here."""

from __future__ import annotations

import sys
import types
from collections.abc import Callable
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from transformers.models.qwen3_5.modeling_qwen3_5 import torch_chunk_gated_delta_rule

from lora_trainer.kernels import causal_attention, causal_conv1d, chunk_gated_delta_rule
from lora_trainer.kernels import gated_delta_rule as gdr
from tests.numerics import assert_close, assert_within_floor, noise_floor

PACKED_CHUNKS_BOUND = 1e-5


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
    """Leaf tensors q, k [B, T, Hk, Dk], v [B, T, Hv, Dv], g (log decay < 0), beta in (0, 1) [B, T,
    Hv]. A lower `gate_shift` gives a stronger decay."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seq_len, key_heads, key_dim, generator=gen)
    k = torch.randn(batch, seq_len, key_heads, key_dim, generator=gen)
    v = torch.randn(batch, seq_len, value_heads, value_dim, generator=gen)
    g = F.logsigmoid(torch.randn(batch, seq_len, value_heads, generator=gen) + gate_shift)
    beta = torch.rand(batch, seq_len, value_heads, generator=gen)
    return [x.requires_grad_() for x in (q, k, v, g, beta)]


def grads_of(
    outputs: list[torch.Tensor], inputs: list[torch.Tensor], seed: int = 1
) -> list[torch.Tensor]:
    """Gradients of a random linear function of the outputs (the same function in any dtype)."""
    gen = torch.Generator().manual_seed(seed)
    loss = sum((out * torch.randn(out.shape, generator=gen)).sum() for out in outputs)
    return list(torch.autograd.grad(loss, inputs))


def float64_leaves(inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """float64 copies of the leaf inputs, for the exact reference."""
    return [x.detach().double().requires_grad_() for x in inputs]


def assert_matches_within_floor(
    ours: list[torch.Tensor],
    ours_fp64: list[torch.Tensor],
    reference: list[torch.Tensor],
    exact: list[torch.Tensor],
    inputs: list[torch.Tensor],
    exact_inputs: list[torch.Tensor],
) -> None:
    """Our outputs, and their gradients with respect to `inputs`, against the fp32 `reference`,
    within a few times the larger of the two sides' noise floors: the reference's distance from
    `exact` and ours from `ours_fp64` (the same computations on the float64 `exact_inputs`; our
    gated delta rule computes in fp32 whatever the input dtype, so its side adds nothing there)."""
    for i, (got, got64, want, truth) in enumerate(
        zip(ours, ours_fp64, reference, exact, strict=True)
    ):
        floor = max(noise_floor(want, truth), noise_floor(got, got64.double()))
        assert_within_floor(got, want, floor, f"output {i}")
    grads = zip(
        grads_of(ours, inputs),
        grads_of(ours_fp64, exact_inputs),
        grads_of(reference, inputs),
        grads_of(exact, exact_inputs),
        strict=True,
    )
    for i, (got, got64, want, truth) in enumerate(grads):
        floor = max(noise_floor(want, truth), noise_floor(got, got64.double()))
        assert_within_floor(got, want, floor, f"gradient of input {i}")


def recurrent_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    use_qk_l2norm: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gated delta rule one token at a time in the inputs' dtype (float64 here): per value head,
    S <- exp(g) S; S <- S + k (beta (v - S^T k))^T; o = S^T q / sqrt(Dk), with q, k l2-normalized as
    transformers does (eps 1e-6) and each key head serving Hv / Hk consecutive value heads."""
    group = v.shape[2] // k.shape[2]
    q, k = q.repeat_interleave(group, dim=2), k.repeat_interleave(group, dim=2)
    if use_qk_l2norm:
        q = q * torch.rsqrt((q * q).sum(-1, keepdim=True) + 1e-6)
        k = k * torch.rsqrt((k * k).sum(-1, keepdim=True) + 1e-6)
    q = q * q.shape[-1] ** -0.5
    batch, seq_len, heads, key_dim = k.shape
    state = (
        initial_state
        if initial_state is not None
        else v.new_zeros(batch, heads, key_dim, v.shape[-1])
    )
    outputs = []
    for t in range(seq_len):
        state = state * g[:, t].exp()[..., None, None]
        delta = (v[:, t] - torch.einsum("bhk,bhkv->bhv", k[:, t], state)) * beta[:, t, :, None]
        state = state + k[:, t, :, :, None] * delta[:, :, None, :]
        outputs.append(torch.einsum("bhk,bhkv->bhv", q[:, t], state))
    return torch.stack(outputs, dim=1), state


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
        inputs.append(
            torch.randn(batch, value_heads, key_dim, value_dim, generator=gen).requires_grad_()
        )
    q, k, v, g, beta = inputs[:5]
    initial_state = inputs[5] if with_initial_state else None

    ref_out, ref_state = torch_chunk_gated_delta_rule(
        q,
        k,
        v,
        g,
        beta,
        initial_state=initial_state,
        output_final_state=True,
        use_qk_l2norm_in_kernel=True,
    )
    out, final_state = chunk_gated_delta_rule(
        q, k, v, g, beta, initial_state=initial_state, output_final_state=True
    )
    exact_inputs = float64_leaves(inputs)
    ours_fp64 = chunk_gated_delta_rule(
        *exact_inputs[:5],
        initial_state=exact_inputs[5] if with_initial_state else None,
        output_final_state=True,
    )
    exact = recurrent_gated_delta_rule(*exact_inputs)
    assert out.shape == ref_out.shape and out.dtype == torch.float32
    assert_matches_within_floor(
        [out, final_state], list(ours_fp64), [ref_out, ref_state], list(exact), inputs, exact_inputs
    )


def test_gated_delta_rule_matches_transformers_under_strong_decay():
    inputs = gdr_inputs(1, 150, 2, 4, 16, 16, seed=11, gate_shift=-4.0)
    ref_out, ref_state = torch_chunk_gated_delta_rule(
        *inputs, output_final_state=True, use_qk_l2norm_in_kernel=True
    )
    out, final_state = chunk_gated_delta_rule(*inputs, output_final_state=True)
    exact_inputs = float64_leaves(inputs)
    ours_fp64 = chunk_gated_delta_rule(*exact_inputs, output_final_state=True)
    exact = recurrent_gated_delta_rule(*exact_inputs)
    assert_matches_within_floor(
        [out, final_state], list(ours_fp64), [ref_out, ref_state], list(exact), inputs, exact_inputs
    )


def test_gated_delta_rule_without_l2norm_matches_transformers():
    q, k, v, g, beta = gdr_inputs(1, 90, 2, 4, 16, 16, seed=3)
    q_unit, k_unit = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    ref_out, _ = torch_chunk_gated_delta_rule(
        q_unit, k_unit, v, g, beta, use_qk_l2norm_in_kernel=False
    )
    out, state = chunk_gated_delta_rule(q_unit, k_unit, v, g, beta, use_qk_l2norm=False)
    exact_inputs = [x.double() for x in (q_unit, k_unit, v, g, beta)]
    exact, _ = recurrent_gated_delta_rule(*exact_inputs, use_qk_l2norm=False)
    ours_fp64, _ = chunk_gated_delta_rule(*exact_inputs, use_qk_l2norm=False)
    assert state is None
    assert_within_floor(
        out, ref_out, max(noise_floor(ref_out, exact), noise_floor(out, ours_fp64)), "output"
    )


def test_gated_delta_rule_keeps_input_dtype():
    q, k, v, g, beta = (x.detach().to(torch.bfloat16) for x in gdr_inputs(1, 70, 1, 2, 16, 16))
    out, _ = chunk_gated_delta_rule(q, k, v, g, beta)
    ref_out, _ = chunk_gated_delta_rule(q.float(), k.float(), v.float(), g.float(), beta.float())
    assert out.dtype == torch.bfloat16
    # the same fp32 computation on the same values, rounded once to bf16: within half an ulp
    assert_close(
        out.float(), ref_out, torch.finfo(torch.bfloat16).eps * ref_out.abs().max().item(), "output"
    )


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
        q,
        k,
        v,
        g,
        beta,
        initial_state=initial_state,
        output_final_state=True,
        cu_seqlens=cu_seqlens,
    )
    exact_inputs = float64_leaves(inputs)
    ours_fp64 = chunk_gated_delta_rule(
        *exact_inputs[:5],
        initial_state=exact_inputs[5] if with_initial_state else None,
        output_final_state=True,
        cu_seqlens=cu_seqlens,
    )
    assert final.shape == (len(lengths), 4, 16, 24)
    assert_matches_within_floor(
        [out, final],
        list(ours_fp64),
        per_sample_gated_delta_rule(
            partial(chunk_gated_delta_rule, output_final_state=True), inputs, cu_seqlens
        ),
        per_sample_gated_delta_rule(recurrent_gated_delta_rule, exact_inputs, cu_seqlens),
        inputs,
        exact_inputs,
    )


def per_sample_gated_delta_rule(
    rule: Callable[..., tuple[torch.Tensor, torch.Tensor]],
    inputs: list[torch.Tensor],
    cu_seqlens: torch.Tensor,
) -> list[torch.Tensor]:
    """`rule` (returning the output and the final state) run on every sample of a packed batch on
    its own: the outputs concatenated and the final states stacked (an empty sample keeps its
    initial state)."""
    q, k, v, g, beta = inputs[:5]
    initial_state = inputs[5] if len(inputs) > 5 else None
    pieces, finals = [], []
    for i, (start, end) in enumerate(
        zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist(), strict=True)
    ):
        state = None if initial_state is None else initial_state[i : i + 1]
        if start == end:
            finals.append(
                v.new_zeros(1, v.shape[2], k.shape[3], v.shape[3]) if state is None else state
            )
            continue
        piece, piece_final = rule(
            *(x[:, start:end] for x in (q, k, v, g, beta)), initial_state=state
        )
        pieces.append(piece)
        finals.append(piece_final)
    return [torch.cat(pieces, dim=1), torch.cat(finals)]


@pytest.mark.parametrize(
    "gate_shift", [2.0, -2.0, -60.0], ids=["weak-decay", "strong-decay", "extreme-decay"]
)
def test_gated_delta_rule_packed_without_states_equals_per_sample(gate_shift):
    """The path training takes: samples chunked as one sequence, several inside one chunk, one
    starting on a chunk boundary, one across chunks, an empty one."""
    lengths = [5, 20, 1, 38, 64, 0, 100, 3]
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    inputs = gdr_inputs(1, sum(lengths), 2, 4, 16, 24, seed=6, gate_shift=gate_shift)
    out, final = chunk_gated_delta_rule(*inputs, cu_seqlens=cu_seqlens)
    per_sample = partial(chunk_gated_delta_rule, output_final_state=True)
    expected = per_sample_gated_delta_rule(per_sample, inputs, cu_seqlens)
    assert final is None
    # A fixed bound on O(1) values: the packed chunks' rounding grows with the decay summed over a
    # chunk that spans samples, which no per-sample floor measures (1.3e-6 under strong decay, on
    # every CPU capability, against 3e-7 for the samples run alone).
    assert_close(out, expected[0], PACKED_CHUNKS_BOUND, "output")
    for i, (ours, theirs) in enumerate(
        zip(grads_of([out], inputs), grads_of([expected[0]], inputs), strict=True)
    ):
        assert_close(ours, theirs, PACKED_CHUNKS_BOUND, f"gradient of input {i}")


def test_gated_delta_rule_rejects_bad_shapes():
    q, k, v, g, beta = (x.detach() for x in gdr_inputs(2, 8, 2, 3, 4, 4))
    with pytest.raises(ValueError, match="multiple of Hk"):
        chunk_gated_delta_rule(q, k, v, g, beta)
    q, k, v, g, beta = (x.detach() for x in gdr_inputs(2, 8, 2, 4, 4, 4))
    with pytest.raises(ValueError, match="batch size 1"):
        chunk_gated_delta_rule(q, k, v, g, beta, cu_seqlens=torch.tensor([0, 8]))
    with pytest.raises(ValueError, match="from 0 to T=8"):
        chunk_gated_delta_rule(
            *(x[:1] for x in (q, k, v, g, beta)), cu_seqlens=torch.tensor([0, 5])
        )


def test_fla_backend_gets_heads_expanded_and_fla_keywords(monkeypatch):
    """The CUDA path's call into FLA, with FLA faked by our torch path at Hk == Hv."""

    def fake_fla(
        q,
        k,
        v,
        g,
        beta,
        *,
        scale,
        initial_state,
        output_final_state,
        use_qk_l2norm_in_kernel,
        cu_seqlens,
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
    exact_inputs = [x.double() for x in (q, k, v, g, beta)]
    exact = per_sample_gated_delta_rule(recurrent_gated_delta_rule, exact_inputs, cu_seqlens)
    ours_fp64 = gdr._fla_chunk_gated_delta_rule(*exact_inputs, None, True, cu_seqlens, True)
    pairs = zip(
        ("output", "final state"),
        (out, state),
        ours_fp64,
        (expected, expected_state),
        exact,
        strict=True,
    )
    for name, got, got64, want, truth in pairs:
        assert_within_floor(
            got, want, max(noise_floor(want, truth), noise_floor(got, got64.double())), name
        )


def hf_conv(x: torch.Tensor, weight: torch.Tensor, activation: str | None) -> torch.Tensor:
    """Hugging Face's torch fallback of causal_conv1d_fn."""
    out = F.conv1d(x, weight.unsqueeze(1), padding=weight.shape[1] - 1, groups=x.shape[1])[
        ..., : x.shape[-1]
    ]
    return F.silu(out) if activation == "silu" else out


@pytest.mark.parametrize("activation", ["silu", None])
def test_causal_conv1d_matches_hf(activation):
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(2, 12, 50, generator=gen, requires_grad=True)
    weight = torch.randn(12, 4, generator=gen, requires_grad=True)
    out = causal_conv1d(x, weight, activation=activation)
    exact_inputs = float64_leaves([x, weight])
    assert_matches_within_floor(
        [out],
        [causal_conv1d(*exact_inputs, activation=activation)],
        [hf_conv(x, weight, activation)],
        [hf_conv(*exact_inputs, activation)],
        [x, weight],
        exact_inputs,
    )


def test_causal_conv1d_packed_equals_per_sample():
    gen = torch.Generator().manual_seed(7)
    lengths = [5, 2, 0, 17, 1]
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    x = torch.randn(1, 12, sum(lengths), generator=gen, requires_grad=True)
    weight = torch.randn(12, 4, generator=gen, requires_grad=True)
    out = causal_conv1d(x, weight, cu_seqlens=cu_seqlens)
    bounds = [
        (s, e)
        for s, e in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist(), strict=True)
        if e > s
    ]
    exact_x, exact_weight = float64_leaves([x, weight])
    expected = torch.cat([hf_conv(x[..., s:e], weight, "silu") for s, e in bounds], dim=-1)
    exact = torch.cat([hf_conv(exact_x[..., s:e], exact_weight, "silu") for s, e in bounds], dim=-1)
    ours_fp64 = causal_conv1d(exact_x, exact_weight, cu_seqlens=cu_seqlens)
    assert_matches_within_floor(
        [out], [ours_fp64], [expected], [exact], [x, weight], [exact_x, exact_weight]
    )


def softmax_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> torch.Tensor:
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
    exact_inputs = float64_leaves([q, k, v])
    assert out.shape == (2, 33, 4, 16)
    assert_matches_within_floor(
        [out],
        [causal_attention(*exact_inputs, scale=0.3)],
        [softmax_attention(q, k, v, 0.3)],
        [softmax_attention(*exact_inputs, 0.3)],
        [q, k, v],
        exact_inputs,
    )


def test_causal_attention_packed_equals_per_sample():
    lengths = [9, 1, 20, 3]
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    q, k, v = attention_inputs(1, sum(lengths), seed=9)
    out = causal_attention(q, k, v, scale=0.25, cu_seqlens=cu_seqlens)
    bounds = list(zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist(), strict=True))
    exact_inputs = float64_leaves([q, k, v])

    def per_sample(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.cat(
            [softmax_attention(q[:, s:e], k[:, s:e], v[:, s:e], 0.25) for s, e in bounds], dim=1
        )

    ours_fp64 = causal_attention(*exact_inputs, scale=0.25, cu_seqlens=cu_seqlens)
    assert_matches_within_floor(
        [out],
        [ours_fp64],
        [per_sample(q, k, v)],
        [per_sample(*exact_inputs)],
        [q, k, v],
        exact_inputs,
    )
