"""Chunked gated delta rule (the Gated DeltaNet token mixer of Qwen3.5 linear-attention layers).

One signature, two backends: FLA's Triton kernel when the tensors are on CUDA and `fla` is
importable, otherwise a pure-torch chunked algorithm that matches
`transformers.models.qwen3_5.modeling_qwen3_5.torch_chunk_gated_delta_rule`.

Shape letters: B batch, T tokens, Hk key heads, Hv value heads (a multiple of Hk; value head i
reads key head i // (Hv // Hk)), Dk key head dim, Dv value head dim, N chunks, C chunk size.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

CHUNK_SIZE = 64
L2NORM_EPS = 1e-6


@functools.cache
def _fla_available() -> bool:
    return importlib.util.find_spec("fla") is not None


def chunk_gated_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    *,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: Tensor | None = None,
    use_qk_l2norm: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """Gated delta rule over whole sequences, FLA conventions.

    q, k: [B, T, Hk, Dk]; v: [B, T, Hv, Dv]; g (log decay, <= 0) and beta: [B, T, Hv].
    `cu_seqlens` (int64 [S + 1], needs B == 1) packs S samples whose recurrent state starts
    afresh at each boundary. `initial_state` is [S, Hv, Dk, Dv] with S = B, or the number of
    packed samples. With `use_qk_l2norm` q and k are l2-normalised over Dk; q is then scaled
    by Dk ** -0.5.

    Returns the output [B, T, Hv, Dv] in q's dtype (computed in fp32) and, if
    `output_final_state`, the final fp32 state [S, Hv, Dk, Dv], else None.
    """
    _check_shapes(q, k, v, g, beta, cu_seqlens)
    if q.is_cuda and _fla_available():
        return _fla_chunk_gated_delta_rule(
            q, k, v, g, beta, initial_state, output_final_state, cu_seqlens, use_qk_l2norm
        )
    return _torch_chunk_gated_delta_rule(
        q, k, v, g, beta, initial_state, output_final_state, cu_seqlens, use_qk_l2norm
    )


def _check_shapes(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, cu_seqlens: Tensor | None
) -> None:
    if q.shape != k.shape or q.dim() != 4:
        raise ValueError(
            f"q and k must both be [B, T, Hk, Dk], got {tuple(q.shape)} and {tuple(k.shape)}"
        )
    if v.dim() != 4 or v.shape[:2] != q.shape[:2] or v.shape[2] % q.shape[2]:
        raise ValueError(
            f"v must be [B, T, Hv, Dv] with Hv a multiple of Hk={q.shape[2]}, got {tuple(v.shape)}"
        )
    if g.shape != v.shape[:3] or beta.shape != v.shape[:3]:
        raise ValueError(
            f"g and beta must be [B, T, Hv] = {tuple(v.shape[:3])}, "
            f"got {tuple(g.shape)} and {tuple(beta.shape)}"
        )
    if cu_seqlens is not None and q.shape[0] != 1:
        raise ValueError(
            f"cu_seqlens packs samples along T and needs batch size 1, got {q.shape[0]}"
        )


def _fla_chunk_gated_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    initial_state: Tensor | None,
    output_final_state: bool,
    cu_seqlens: Tensor | None,
    use_qk_l2norm: bool,
) -> tuple[Tensor, Tensor | None]:
    """FLA's chunk kernel; it wants as many q/k heads as v heads, so q and k are expanded."""
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_chunk_gated_delta_rule

    group = v.shape[2] // q.shape[2]
    if group > 1:
        q, k = q.repeat_interleave(group, dim=2), k.repeat_interleave(group, dim=2)
    return fla_chunk_gated_delta_rule(
        q,
        k,
        v,
        g,
        beta,
        scale=q.shape[-1] ** -0.5,
        initial_state=initial_state,
        output_final_state=output_final_state,
        cu_seqlens=None if cu_seqlens is None else cu_seqlens.to(device=q.device, dtype=torch.long),
        use_qk_l2norm_in_kernel=use_qk_l2norm,
    )


def _torch_chunk_gated_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    initial_state: Tensor | None,
    output_final_state: bool,
    cu_seqlens: Tensor | None,
    use_qk_l2norm: bool,
) -> tuple[Tensor, Tensor | None]:
    """Pure-torch path: normalise q/k, cut every tensor into chunks, solve and scan them.

    Packed samples without initial or final states are chunked like one unpacked sequence (no
    padding per sample, no gathers): `_ChunkSegments` masks what crosses a sample boundary. With
    states, every sample is padded to its own chunks (`_ChunkLayout`)."""
    out_dtype = q.dtype
    q, k = q.float(), k.float()
    if use_qk_l2norm:
        q, k = _l2norm(q), _l2norm(k)
    q = q * q.shape[-1] ** -0.5
    # Packed samples with no state in or out run as one continuous sequence (`_ChunkSegments`).
    continuous = None if initial_state is not None or output_final_state else cu_seqlens
    layout = _ChunkLayout(q.shape[1], cu_seqlens if continuous is None else None)
    packing = (
        None if continuous is None else _ChunkSegments(continuous, q.shape[1], layout.num_chunks)
    )
    out, final_state = _chunk_scan(
        layout.chunk(q),
        layout.chunk(k),
        layout.chunk(v.float()),
        layout.chunk(g.float().unsqueeze(-1)).squeeze(-1),
        layout.chunk(beta.float().unsqueeze(-1)).squeeze(-1),
        initial_state,
        layout.segments,
        packing,
    )
    out = layout.unchunk(out).to(out_dtype, memory_format=torch.contiguous_format)
    return out, final_state if output_final_state else None


def _l2norm(x: Tensor) -> Tensor:
    """x / |x| over the last dim, with FLA's epsilon inside the square root."""
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + L2NORM_EPS)


class _ChunkLayout:
    """Where each token of a [B, T, H, D] tensor lands in the chunked [N, B, H, C, D] layout.

    Without cu_seqlens the sequence is right-padded with zeros to N * C tokens. With cu_seqlens
    each sample is padded on its own, so no chunk mixes two samples. `segments` lists the
    [first, last + 1) chunk range of every sample (one range when there is no cu_seqlens).
    Zero padding is inert: a zero key, value, beta and log decay leave the state untouched.
    """

    def __init__(self, seq_len: int, cu_seqlens: Tensor | None) -> None:
        self.seq_len = seq_len
        if cu_seqlens is None:
            self.num_chunks = -(-seq_len // CHUNK_SIZE)
            self.segments = [(0, self.num_chunks)]
            self.slots = None
            return
        cu_seqlens = cu_seqlens.to(torch.long)
        if cu_seqlens[0] != 0 or cu_seqlens[-1] != seq_len:
            raise ValueError(
                f"cu_seqlens must run from 0 to T={seq_len}, got {cu_seqlens.tolist()}"
            )
        lengths = cu_seqlens.diff()
        chunk_counts = (lengths + CHUNK_SIZE - 1) // CHUNK_SIZE
        chunk_ends = chunk_counts.cumsum(0).tolist()
        self.num_chunks = chunk_ends[-1]
        self.segments = list(zip([0, *chunk_ends[:-1]], chunk_ends, strict=True))
        first_slots = (chunk_counts.cumsum(0) - chunk_counts) * CHUNK_SIZE
        self.slots = torch.arange(seq_len, device=cu_seqlens.device) + torch.repeat_interleave(
            first_slots - cu_seqlens[:-1], lengths, output_size=seq_len
        )

    def chunk(self, x: Tensor) -> Tensor:
        """[B, T, H, D] -> [N, B, H, C, D], zero padded."""
        batch, _, heads, dim = x.shape
        padded_len = self.num_chunks * CHUNK_SIZE
        if self.slots is None:
            x = F.pad(x, (0, 0, 0, 0, 0, padded_len - self.seq_len))
        else:
            x = x.new_zeros(batch, padded_len, heads, dim).index_copy(1, self.slots, x)
        return (
            x.view(batch, self.num_chunks, CHUNK_SIZE, heads, dim)
            .permute(1, 0, 3, 2, 4)
            .contiguous()
        )

    def unchunk(self, x: Tensor) -> Tensor:
        """[N, B, H, C, D] -> [B, T, H, D], padding dropped."""
        _, batch, heads, _, dim = x.shape
        x = x.permute(1, 0, 3, 2, 4).reshape(batch, self.num_chunks * CHUNK_SIZE, heads, dim)
        if self.slots is None:
            return x[:, : self.seq_len]
        return x.index_select(1, self.slots)


class _ChunkSegments:
    """Sample boundaries inside the chunks of a packed sequence chunked as one ([N, C] each).

    Per token: `restart_index` / `restarts`, where its sample starts inside its chunk (the
    cumulative log decay restarts there); `sees_state`, whether its sample began in an earlier
    chunk (only then does it read the state entering the chunk); `feeds_state`, whether it is in
    the sample of the chunk's last token (only those tokens write the state leaving the chunk).
    `blocked` [N, 1, 1, C, C] is True where token j is after token i or in another sample.
    The zero padding after the last token counts as part of the last sample.
    """

    def __init__(self, cu_seqlens: Tensor, seq_len: int, num_chunks: int) -> None:
        cu_seqlens = cu_seqlens.to(torch.long)
        if cu_seqlens[0] != 0 or cu_seqlens[-1] != seq_len:
            raise ValueError(
                f"cu_seqlens must run from 0 to T={seq_len}, got {cu_seqlens.tolist()}"
            )
        device = cu_seqlens.device
        padded_len = num_chunks * CHUNK_SIZE
        starts = torch.repeat_interleave(cu_seqlens[:-1], cu_seqlens.diff(), output_size=seq_len)
        starts = torch.cat([starts, starts[-1:].expand(padded_len - seq_len)]).view(
            num_chunks, CHUNK_SIZE
        )
        chunk_starts = torch.arange(0, padded_len, CHUNK_SIZE, device=device).unsqueeze(-1)
        first = (starts - chunk_starts).clamp(min=0)
        self.restarts = first > 0
        self.restart_index = (first - 1).clamp(min=0)
        self.sees_state = starts < chunk_starts
        self.feeds_state = starts == starts[:, -1:]
        after = torch.ones(CHUNK_SIZE, CHUNK_SIZE, dtype=torch.bool, device=device).triu(1)
        other_sample = starts.unsqueeze(-1) != starts.unsqueeze(-2)
        self.blocked = (after | other_sample).view(num_chunks, 1, 1, CHUNK_SIZE, CHUNK_SIZE)

    def restart(self, cum_decay: Tensor) -> Tensor:
        """[N, B, H, C] cumulative log decay from the chunk start -> from each token's sample
        start within the chunk."""
        index = self.restart_index.view(-1, 1, 1, CHUNK_SIZE).expand_as(cum_decay)
        before = cum_decay.gather(-1, index) * self.restarts.view(-1, 1, 1, CHUNK_SIZE)
        return cum_decay - before

    def cut(self, log_decay: Tensor, which: Tensor) -> Tensor:
        """[N, B, H, C] log decays set to -inf (decay 0) where `which` ([N, C]) is False, before
        any exp: across samples they are differences of unrelated sums and may overflow."""
        return log_decay.masked_fill(~which.view(-1, 1, 1, CHUNK_SIZE), float("-inf"))


def _chunk_scan(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    initial_state: Tensor | None,
    segments: list[tuple[int, int]],
    packing: _ChunkSegments | None = None,
) -> tuple[Tensor, Tensor]:
    """The chunked gated delta rule on fp32 chunks.

    q, k: [N, B, Hk, C, Dk]; v: [N, B, Hv, C, Dv]; g, beta: [N, B, Hv, C]. Within a chunk the
    delta-rule updates are folded into one triangular solve (the WY/UT transform); across chunks
    only the state recursion stays sequential. Returns the output [N, B, Hv, C, Dv] and the final
    states [S, Hv, Dk, Dv], one per batch row or per packed segment. `packing` marks sample
    boundaries inside chunks (`segments` is then the one range of all chunks).
    """
    num_chunks, batch, key_heads, chunk, key_dim = k.shape
    value_heads, value_dim = v.shape[2], v.shape[-1]
    group = value_heads // key_heads
    grouped = (num_chunks, batch, key_heads, group, chunk)

    cum_decay = g.cumsum(-1)
    if packing is None:
        blocked = torch.ones(chunk, chunk, dtype=torch.bool, device=g.device).triu(1)
    else:
        cum_decay, blocked = packing.restart(cum_decay), packing.blocked
    ut_system, intra_attn = _DecayedGrams.apply(k @ k.mT, q @ k.mT, cum_decay, beta, blocked)

    k_grouped = k.unsqueeze(3)
    log_from_start, log_to_end = cum_decay, cum_decay[..., -1:] - cum_decay
    if packing is not None:
        log_from_start = packing.cut(log_from_start, packing.sees_state)
        log_to_end = packing.cut(log_to_end, packing.feeds_state)
    decay_from_start, decay_to_end = log_from_start.exp(), log_to_end.exp()
    chunk_decay = decay_from_start[..., -1]
    decayed_k_beta = (k_grouped * (beta * decay_from_start).view(*grouped, 1)).flatten(2, 3)
    rhs = torch.cat([v * beta.unsqueeze(-1), decayed_k_beta], dim=-1)
    solved = torch.linalg.solve_triangular(ut_system, rhs, upper=False, unitriangular=True)
    new_values, k_cumdecay = solved.split([value_dim, key_dim], dim=-1)

    query = (q.unsqueeze(3) * decay_from_start.view(*grouped, 1)).flatten(2, 3)
    key = (k_grouped * decay_to_end.view(*grouped, 1)).flatten(2, 3)

    rows = batch * value_heads
    if initial_state is not None:
        initial_state = initial_state.to(k).reshape(len(segments), rows, key_dim, value_dim)
    states, corrected, finals = _StateScan.apply(
        new_values.flatten(1, 2),
        k_cumdecay.flatten(1, 2),
        key.flatten(1, 2),
        chunk_decay.flatten(1, 2),
        initial_state,
        segments,
    )
    flat = (num_chunks * rows, chunk)
    out = torch.baddbmm(
        query.reshape(*flat, key_dim) @ states.view(-1, key_dim, value_dim),
        intra_attn.reshape(*flat, chunk),
        corrected.view(*flat, value_dim),
    )
    out = out.view(num_chunks, batch, value_heads, chunk, value_dim)
    return out, finals.view(-1, value_heads, key_dim, value_dim)


class _DecayedGrams(torch.autograd.Function):
    """The decayed intra-chunk matrices, as one autograd node instead of a dozen elementwise ones.

    With c the cumulative log decay of a chunk and D_ij = exp(c_i - c_j) where i may see j (0
    where `blocked`: above the diagonal, and across packed samples): ut_system = beta_i *
    (k_i . k_j) * D_ij and intra_attn = (q_i . k_j) * D_ij.
    The grams come per key head and are broadcast over the Hv // Hk value heads of the group.
    """

    @staticmethod
    def forward(
        ctx: Any,
        key_gram: Tensor,
        query_gram: Tensor,
        cum_decay: Tensor,
        beta: Tensor,
        blocked: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """key_gram, query_gram: [N, B, Hk, C, C]; cum_decay, beta: [N, B, Hv, C]; blocked: bool,
        broadcastable to [N, B, Hv, C, C]. Returns ut_system and intra_attn, both
        [N, B, Hv, C, C]."""
        num_chunks, batch, key_heads, chunk, _ = key_gram.shape
        grouped = (num_chunks, batch, key_heads, -1, chunk)
        pair_decay = _pairwise_decay(cum_decay, blocked).view(*grouped, chunk)
        ut_system = (key_gram.unsqueeze(3) * pair_decay).mul_(beta.view(*grouped, 1))
        intra_attn = query_gram.unsqueeze(3) * pair_decay
        ctx.save_for_backward(key_gram, beta, pair_decay, ut_system, intra_attn)
        return ut_system.flatten(2, 3), intra_attn.flatten(2, 3)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(
        ctx: Any, d_ut_system: Tensor, d_intra_attn: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, None]:
        key_gram, beta, pair_decay, ut_system, intra_attn = ctx.saved_tensors
        d_ut_system, d_intra_attn = d_ut_system.view_as(ut_system), d_intra_attn.view_as(intra_attn)
        decayed = d_ut_system * pair_decay
        d_beta = (decayed * key_gram.unsqueeze(3)).sum(-1).flatten(2, 3)
        d_key_gram = decayed.mul_(beta.view(*pair_decay.shape[:-1], 1)).sum(3)
        d_query_gram = (d_intra_attn * pair_decay).sum(3)
        d_log_decay = (d_ut_system * ut_system).addcmul_(d_intra_attn, intra_attn)
        d_cum_decay = (d_log_decay.sum(-1) - d_log_decay.sum(-2)).flatten(2, 3)
        return d_key_gram, d_query_gram, d_cum_decay, d_beta, None


def _pairwise_decay(cum_decay: Tensor, blocked: Tensor) -> Tensor:
    """exp(c_i - c_j), 0 where `blocked`: [..., C] -> [..., C, C]."""
    return (
        (cum_decay.unsqueeze(-1) - cum_decay.unsqueeze(-2))
        .masked_fill_(blocked, float("-inf"))
        .exp_()
    )


class _StateScan(torch.autograd.Function):
    """The sequential part of the chunked algorithm, with a hand-written backward.

    Per chunk i (rows R = B * Hv): v_new_i = new_values_i - k_cumdecay_i @ S_i and
    S_{i+1} = S_i * chunk_decay_i + key_i^T @ v_new_i, where key is decayed to the chunk end.
    The state restarts at each segment from its initial state, or from zero when there is none.
    Autograd would record four tiny matmuls per chunk and stack gradient slices; here the
    backward loop only carries the state gradient, and the weight gradients are batched matmuls.
    """

    @staticmethod
    def forward(
        ctx: Any,
        new_values: Tensor,
        k_cumdecay: Tensor,
        key: Tensor,
        chunk_decay: Tensor,
        initial_states: Tensor | None,
        segments: list[tuple[int, int]],
    ) -> tuple[Tensor, Tensor, Tensor]:
        """new_values: [N, R, C, Dv]; k_cumdecay, key: [N, R, C, Dk]; chunk_decay: [N, R];
        initial_states: [S, R, Dk, Dv] or None. Returns the states entering every chunk
        [N, R, Dk, Dv], v_new [N, R, C, Dv] and the final state of every segment [S, R, Dk, Dv]."""
        num_chunks, rows, _, value_dim = new_values.shape
        key_dim = key.shape[-1]
        states = new_values.new_empty(num_chunks, rows, key_dim, value_dim)
        corrected = torch.empty_like(new_values, memory_format=torch.contiguous_format)
        finals = new_values.new_zeros(len(segments), rows, key_dim, value_dim)
        decay = chunk_decay[..., None, None]
        for segment, (first, end) in enumerate(segments):
            if initial_states is not None:
                (states[first] if end > first else finals[segment]).copy_(initial_states[segment])
            elif end > first:
                states[first].zero_()
            for i in range(first, end):
                if i == first and initial_states is None:
                    corrected[i] = new_values[i]
                else:
                    torch.baddbmm(
                        new_values[i], k_cumdecay[i], states[i], alpha=-1, out=corrected[i]
                    )
                state = states[i + 1] if i + 1 < end else finals[segment]
                torch.mul(states[i], decay[i], out=state)
                state.baddbmm_(key[i].mT, corrected[i])
        ctx.save_for_backward(k_cumdecay, key, chunk_decay, states, corrected)
        ctx.segments = segments
        ctx.zero_start = initial_states is None
        return states, corrected, finals

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(
        ctx: Any,
        d_states: Tensor,
        d_corrected: Tensor,
        d_finals: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None, None]:
        k_cumdecay, key, chunk_decay, states, corrected = ctx.saved_tensors
        decay = chunk_decay[..., None, None]
        d_next = torch.empty_like(states)
        d_values = torch.empty_like(corrected)
        d_initial = None if ctx.zero_start else torch.empty_like(d_finals)
        for segment, (first, end) in enumerate(ctx.segments):
            if end > first:
                d_next[end - 1] = d_finals[segment]
            elif d_initial is not None:
                d_initial[segment] = d_finals[segment]
            for i in range(end - 1, first - 1, -1):
                torch.baddbmm(d_corrected[i], key[i], d_next[i], out=d_values[i])
                if i > first:
                    d_state = d_next[i - 1]
                elif d_initial is not None:
                    d_state = d_initial[segment]
                else:
                    break
                torch.addcmul(d_states[i], d_next[i], decay[i], out=d_state)
                d_state.baddbmm_(k_cumdecay[i].mT, d_values[i], alpha=-1)
        d_k_cumdecay = (d_values @ states.mT).neg_()
        d_key = corrected @ d_next.mT
        d_chunk_decay = (d_next * states).sum((-2, -1))
        return d_values, d_k_cumdecay, d_key, d_chunk_decay, d_initial, None
