"""lora_trainer.parallel: config validation, process groups, and megatron-core on CPU over gloo.

Each multi-rank layout is one spawned run (process start and the megatron import cost seconds)
that returns numbers; the assertions are made here in the parent. Which test exercises which
`cpu_compat` patch (P-numbers as in the module):

- P1 CPU RNG tracker: every spawned run (`initialize_parallel` seeds through it);
  `test_tp2_layers_rng_clip_moe` checks fork determinism and per-TP-rank streams.
- P2 `torch.cuda.current_device`: `test_tp2_layers_rng_clip_moe` (sequence-parallel all-gather
  buffer), `test_ep2_moe_alltoall` (router weight move), `test_pp2_1f1b_and_world_of_one`
  (p2p receive buffers).
- P3 cuda-to-cpu torch-function mode: `test_tp2_layers_rng_clip_moe` (`broadcast_data`:
  `device="cuda"` and `Tensor.cuda()`; grad norm), `test_pp2_1f1b_and_world_of_one`
  (`total_num_tokens` in the 1F1B schedule).
- P4a host stream, P4b `te_general_gemm`: `test_ep2_moe_alltoall` and the ETP=2 MoE in
  `test_tp2_layers_rng_clip_moe`; P4c numpy split sizes: `test_ep2_moe_alltoall` (the EP
  all-to-all).
- P6 CPU grad clip: `test_tp2_layers_rng_clip_moe`.
- P7 uneven all_gather: `test_tp2_layers_rng_clip_moe` (megatron's
  `gather_from_sequence_parallel_region` with uneven split sizes, forward and backward).
"""

from __future__ import annotations

import copy
import os
import time
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import package_info, parallel_state, tensor_parallel
from megatron.core.enums import ModelType
from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
from megatron.core.optimizer import clip_grads
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.spec_utils import build_module

from lora_trainer.errors import ParallelConfigError
from lora_trainer.parallel import cpu_compat
from lora_trainer.parallel.collectives import (
    all_gather_objects,
    gather_shards,
    merge_from_all_ranks,
)
from lora_trainer.parallel.config import ParallelConfig
from lora_trainer.parallel.groups import (
    data_parallel_rank_size,
    group_rank_size,
    local_expert_range,
)
from lora_trainer.parallel.state import ParallelInfo, destroy_parallel, initialize_parallel
from tests.multirank import run_multirank

# Relative errors of fp32 toy layers (hidden size 8, a few terms per sum, no amplification): they
# stay below 3e-7 whatever kernels torch picks (ATEN_CPU_CAPABILITY default, avx2, avx512; 1 or 2
# threads), while a wrong shard or a missing reduction is off by O(1).
TOL = 1e-5
TIMEOUT_S = 240.0
HIDDEN = 8
SEED = 1234

# TransformerConfig flags for CPU runs; those that differ from megatron-core 0.16.1's defaults are
# use_cpu_initialization (TP-independent initial weights) and, for pp > 1, pipeline_dtype and
# batch_p2p_sync=False. The fusions are already off by default and are spelled out to pin them.
CPU_FLAGS: dict[str, Any] = {
    "use_cpu_initialization": True,
    "params_dtype": torch.float32,
    "gradient_accumulation_fusion": False,
    "bias_activation_fusion": False,
    "bias_dropout_fusion": False,
    "masked_softmax_fusion": False,
    "apply_rope_fusion": False,
    "persist_layer_norm": False,
    "moe_permute_fusion": False,
    "moe_router_fusion": False,
    "cross_entropy_loss_fusion": False,
}


def _config(**overrides: Any) -> TransformerConfig:
    """A tiny fp32 TransformerConfig for the current parallel layout, with the CPU flags."""
    kwargs: dict[str, Any] = {
        "num_layers": 1,
        "hidden_size": HIDDEN,
        "num_attention_heads": 2,
        "tensor_model_parallel_size": parallel_state.get_tensor_model_parallel_world_size(),
        "pipeline_model_parallel_size": parallel_state.get_pipeline_model_parallel_world_size(),
        "expert_model_parallel_size": parallel_state.get_expert_model_parallel_world_size(),
        "expert_tensor_parallel_size": parallel_state.get_expert_tensor_parallel_world_size(),
        **CPU_FLAGS,
    }
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def _randn(*shape: int, seed: int) -> torch.Tensor:
    """A reproducible normal tensor that leaves the global RNG alone."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest absolute difference over the largest reference magnitude; inf on shape mismatch."""
    if got.shape != want.shape:
        return float("inf")
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-12)).item()


def _all_gather(tensor: torch.Tensor, group: dist.ProcessGroup, dim: int) -> torch.Tensor:
    """Concatenate every group member's `tensor` along `dim`, in group-rank order."""
    pieces = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(pieces, tensor.contiguous(), group=group)
    return torch.cat(pieces, dim=dim)


def _seq_slice(length: int, sp: bool) -> slice:
    """This rank's part of a sequence of `length` under sequence parallelism (all of it without)."""
    if not sp:
        return slice(0, length)
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    chunk = length // tp_size
    start = parallel_state.get_tensor_model_parallel_rank() * chunk
    return slice(start, start + chunk)


def _groups_and_collectives(rank: int) -> dict[str, Any]:
    """What `parallel.groups` and `parallel.collectives` answer on this rank."""
    return {
        "rank_size": {group: group_rank_size(group) for group in ("tp", "etp", "none")},
        "tp_shards": [s.tolist() for s in gather_shards(torch.full((2,), float(rank)), "tp")],
        "objects": all_gather_objects(f"rank {rank}"),
        "merged": merge_from_all_ranks({f"from {rank}": rank, "shared": rank}),
        "experts": local_expert_range(4),
        "dp": data_parallel_rank_size(),
    }


# ---- the multi-rank helper itself -------------------------------------------------------------


def _rank_one_fails(rank: int, world_size: int) -> None:
    """Rank 1 raises; rank 0 would block for ten minutes (as if stuck in a collective)."""
    if rank == 1:
        raise ParallelConfigError("boom from rank 1")
    time.sleep(600)


def test_multirank_reraises_and_stops_the_others() -> None:
    start = time.monotonic()
    with pytest.raises(ParallelConfigError, match="boom from rank 1") as caught:
        run_multirank(_rank_one_fails, 2, timeout=TIMEOUT_S)
    assert "rank 1 failed; its traceback" in "".join(caught.value.__notes__)
    assert time.monotonic() - start < TIMEOUT_S


def test_multirank_times_out() -> None:
    with pytest.raises(TimeoutError, match=r"did not finish within 1\.0 s"):
        run_multirank(_rank_one_fails, 1, timeout=1.0)


# ---- config validation (no processes) ----------------------------------------------------------


@pytest.mark.parametrize(
    ("cfg", "world_size", "message"),
    [
        (ParallelConfig(tp=2), 3, "not divisible by tp\\*pp"),
        (ParallelConfig(tp=2, pp=2), 6, "not divisible by tp\\*pp"),
        (ParallelConfig(tp=2, ep=2, etp=2), 2, "expert grid"),
        (ParallelConfig(ep=3), 4, "expert grid"),
        (ParallelConfig(sp=True), 2, "sp=true needs tensor parallelism"),
        (ParallelConfig(tp=0), 2, "tp=0 must be a positive integer"),
        (ParallelConfig(pp=-1), 2, "pp=-1 must be a positive integer"),
        (ParallelConfig(ep=1.5), 2, "ep=1.5 must be a positive integer"),
        (ParallelConfig(etp=True), 2, "etp=True must be a positive integer"),
        (ParallelConfig(), 0, "world size 0 must be a positive integer"),
    ],
)
def test_validate_rejects(cfg: ParallelConfig, world_size: int, message: str) -> None:
    with pytest.raises(ParallelConfigError, match=message):
        cfg.validate(world_size)


def test_validate_accepts_and_sizes() -> None:
    cfg = ParallelConfig(tp=2, pp=2, ep=2, etp=1, sp=True)
    cfg.validate(8)
    assert cfg.dp_size(8) == 2
    assert cfg.expert_dp_size(8) == 2
    assert ParallelConfig().dp_size(3) == 3
    with pytest.raises(ParallelConfigError):
        cfg.dp_size(6)


def test_cpu_compat_refuses_other_megatron_versions(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(package_info, "MINOR", 17)
    with pytest.raises(RuntimeError, match=r"supports megatron-core 0\.16\.x only"):
        cpu_compat.check_megatron_version()


def test_cpu_compat_with_cuda_applies_only_the_patch_for_absent_transformer_engine(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On a GPU without TransformerEngine every MoE forward would raise NameError:
    te_general_gemm."""
    from megatron.core.transformer.moe import moe_utils

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delattr(moe_utils, "te_general_gemm", raising=False)
    current_device = torch.cuda.current_device
    assert cpu_compat.apply_cpu_compat() is False
    assert torch.cuda.current_device is current_device
    assert moe_utils.te_general_gemm is None


# ---- tp=2: layers, RNG, broadcast, clip, uneven gather, ETP=2 MoE ------------------------------


def _compat_idempotent() -> bool:
    """Applying the CPU layer again changes nothing: still one cuda-to-cpu mode on the stack."""
    applied = cpu_compat.apply_cpu_compat() and cpu_compat.apply_cpu_compat()
    stack = torch.overrides._get_current_function_mode_stack()
    return applied and sum(isinstance(m, cpu_compat.CudaToCpuMode) for m in stack) == 1


def _rng_checks(seed: int) -> dict[str, Any]:
    """P1: the model-parallel RNG fork is deterministic, per TP rank, and leaves the CPU RNG."""
    tracker = tensor_parallel.get_cuda_rng_tracker()
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    outer = torch.get_rng_state()
    with tracker.fork():
        first = torch.rand(4)
    with tracker.fork():
        second = torch.rand(4)
    outer_untouched = torch.equal(outer, torch.get_rng_state())
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    with tracker.fork():
        again = torch.rand(4)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    expected = torch.rand(4, generator=torch.Generator().manual_seed(seed + 2718 + tp_rank))
    per_rank = _all_gather(first[None], parallel_state.get_tensor_model_parallel_group(), dim=0)
    return {
        "cpu_tracker": isinstance(tracker, cpu_compat.CpuRNGStatesTracker),
        "repeatable": torch.equal(first, again),
        "advances": not torch.equal(first, second),
        "outer_untouched": outer_untouched,
        "megatron_seed_formula": torch.equal(first, expected),
        "tp_ranks_differ": not torch.equal(per_rank[0], per_rank[1]),
    }


def _linear_errors(sp: bool) -> dict[str, float]:
    """Column- then row-parallel linear vs plain torch on the gathered full weights."""
    config = _config(sequence_parallel=sp)
    init = torch.nn.init.normal_
    col = tensor_parallel.ColumnParallelLinear(
        HIDDEN, 12, config=config, init_method=init, bias=True, gather_output=False
    )
    row = tensor_parallel.RowParallelLinear(
        12,
        HIDDEN,
        config=config,
        init_method=init,
        bias=True,
        input_is_parallel=True,
        skip_bias_add=False,
    )
    tp_group = parallel_state.get_tensor_model_parallel_group()
    w1, b1 = _all_gather(col.weight, tp_group, 0), _all_gather(col.bias, tp_group, 0)
    w2, b2 = _all_gather(row.weight, tp_group, 1), row.bias.detach().clone()

    seq = 4
    x_full, g_full = _randn(seq, 2, HIDDEN, seed=1), _randn(seq, 2, HIDDEN, seed=2)
    part = _seq_slice(seq, sp)
    x = x_full[part].clone().requires_grad_()
    y, _ = row(F.gelu(col(x)[0]))
    (y * g_full[part]).sum().backward()

    ref = [t.detach().clone().requires_grad_() for t in (x_full, w1, b1, w2, b2)]
    x_ref, w1_ref, b1_ref, w2_ref, b2_ref = ref
    y_ref = F.linear(F.gelu(F.linear(x_ref, w1_ref, b1_ref)), w2_ref, b2_ref)
    (y_ref * g_full).sum().backward()

    tp_rank, shard = parallel_state.get_tensor_model_parallel_rank(), col.weight.shape[0]
    rows = slice(tp_rank * shard, (tp_rank + 1) * shard)
    errors = {
        "out": _rel_err(y, y_ref[part]),
        "input_grad": _rel_err(x.grad, x_ref.grad[part]),
        "col_weight_grad": _rel_err(col.weight.grad, w1_ref.grad[rows]),
        "row_weight_grad": _rel_err(row.weight.grad, w2_ref.grad[:, rows]),
    }
    if not sp:
        # Under SP each rank's row-parallel bias grad covers only its sequence part until
        # finalize_model_grads all-reduces it, so the norm is checked without SP.
        errors.update(_clip_errors(col, row, [w1_ref, b1_ref, w2_ref, b2_ref], rows))
    return errors


def _clip_errors(
    col: torch.nn.Module, row: torch.nn.Module, ref_params: list[torch.Tensor], rows: slice
) -> dict[str, float]:
    """P3 + P6: megatron's grad norm and clip on the TP shards vs torch's on the full weights."""
    params = [col.weight, col.bias, row.weight, row.bias]
    grads_for_norm = [
        p.grad for p in params if tensor_parallel.param_is_not_tensor_parallel_duplicate(p)
    ]
    norm = clip_grads.get_grad_norm_fp32(
        grads_for_norm, grad_stats_parallel_group=parallel_state.get_model_parallel_group()
    )
    ref_norm = torch.nn.utils.clip_grad_norm_(ref_params, max_norm=1.0).item()
    # Through the module attribute, as megatron's optimizer calls it: the patch replaces it there.
    clip_grads.clip_grad_by_total_norm_fp32(params, max_norm=1.0, total_norm=norm)
    return {
        "grad_norm": abs(norm - ref_norm) / ref_norm,
        "clipped_col_grad": _rel_err(col.weight.grad, ref_params[0].grad[rows]),
        "clipped_row_grad": _rel_err(row.weight.grad, ref_params[2].grad[:, rows]),
    }


def _broadcast_ok() -> bool:
    """P3: megatron's `broadcast_data` (`device="cuda"`, `Tensor.cuda()`) from TP rank 0."""
    expected = torch.arange(6).view(2, 3)
    mine = {"tokens": expected} if parallel_state.get_tensor_model_parallel_rank() == 0 else None
    got = tensor_parallel.broadcast_data(["tokens"], mine, torch.int64)["tokens"]
    return torch.equal(got, expected)


def _uneven_gather_errors() -> dict[str, float]:
    """P7: `gather_from_sequence_parallel_region` with uneven split sizes, forward and backward."""
    sizes = [3, 5]
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    x = torch.full((sizes[tp_rank], 2), float(tp_rank + 1), requires_grad=True)
    y = tensor_parallel.gather_from_sequence_parallel_region(
        x, group=parallel_state.get_tensor_model_parallel_group(), output_split_sizes=sizes
    )
    weight = torch.arange(8.0).view(8, 1)
    (y * weight).sum().backward()
    expected_y = torch.cat([torch.full((n, 2), float(r + 1)) for r, n in enumerate(sizes)])
    start = sum(sizes[:tp_rank])
    expected_grad = 2 * weight[start : start + sizes[tp_rank]].expand(-1, 2)
    return {"out": _rel_err(y, expected_y), "grad": _rel_err(x.grad, expected_grad)}


def _tp2_run(rank: int, world_size: int) -> dict[str, Any]:
    """Rank body of the tp=2 layout (ETP=2 for the MoE)."""
    info = initialize_parallel(ParallelConfig(tp=2, etp=2, sp=True), seed=SEED)
    try:
        default_draw = _all_gather(torch.rand(3)[None], dist.group.WORLD, dim=0)
        return {
            "info": info,
            "default_rng_equal_across_ranks": torch.equal(default_draw[0], default_draw[1]),
            "rng": _rng_checks(SEED),
            "linear_sp_off": _linear_errors(sp=False),
            "linear_sp_on": _linear_errors(sp=True),
            "broadcast": _broadcast_ok(),
            "compat_idempotent": _compat_idempotent(),
            "uneven_gather": _uneven_gather_errors(),
            "moe_etp2_sp": _moe_errors(seq=6, sp=True),
            "groups": _groups_and_collectives(rank),
        }
    finally:
        destroy_parallel()


def test_tp2_layers_rng_clip_moe() -> None:
    results = run_multirank(_tp2_run, 2, timeout=TIMEOUT_S)
    for rank, res in enumerate(results):
        info: ParallelInfo = res["info"]
        assert (info.rank, info.world_size, info.backend) == (rank, 2, "gloo")
        assert (info.tp_rank, info.tp_size, info.etp_rank, info.etp_size) == (rank, 2, rank, 2)
        assert (info.pp_size, info.ep_size, info.dp_size, info.expert_dp_size) == (1, 1, 1, 1)
        assert info.sp and info.device == torch.device("cpu")
        assert res["default_rng_equal_across_ranks"]
        assert all(res["rng"].values()), res["rng"]
        assert res["broadcast"] and res["compat_idempotent"]
        for key in ("linear_sp_off", "linear_sp_on", "uneven_gather", "moe_etp2_sp"):
            assert max(res[key].values()) < TOL, (key, res[key])
        assert res["groups"] == {
            "rank_size": {"tp": (rank, 2), "etp": (rank, 2), "none": (0, 1)},
            "tp_shards": [[0.0, 0.0], [1.0, 1.0]],
            "objects": ["rank 0", "rank 1"],
            "merged": {"from 0": 0, "from 1": 1, "shared": 1},
            "experts": range(4),
            "dp": (0, 1),
        }


# ---- MoE: megatron MoELayer vs a plain-torch reference ------------------------------------------

NUM_EXPERTS = 4
TOPK = 2
EXPERT_FFN = 6
SHARED_FFN = 10


def _moe_layer(sp: bool) -> torch.nn.Module:
    """megatron's MoELayer: alltoall dispatcher, SequentialMLP, top-2 softmax router, SwiGLU
    experts and a sigmoid-gated shared expert, no biases, no aux loss."""
    config = _config(
        sequence_parallel=sp,
        init_method_std=0.5,
        ffn_hidden_size=16,
        num_moe_experts=NUM_EXPERTS,
        moe_router_topk=TOPK,
        moe_router_score_function="softmax",
        moe_ffn_hidden_size=EXPERT_FFN,
        moe_token_dispatcher_type="alltoall",
        moe_grouped_gemm=False,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        moe_shared_expert_intermediate_size=SHARED_FFN,
        moe_shared_expert_gate=True,
        moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0,
    )
    spec = get_moe_module_spec(use_te=False, num_experts=NUM_EXPERTS, moe_grouped_gemm=False)
    return build_module(spec, config=config)


GluWeights = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _merge_glu_shards(fc1_shards: list[torch.Tensor], fc2_shards: list[torch.Tensor]) -> GluWeights:
    """Full (gate, up, down) weights from TP shards of a GLU MLP.

    Each fc1 shard is [gate_part; up_part] of that rank's columns, so the full gate (and up) is
    the concatenation of the shards' first (second) halves; fc2 shards split the input dim.
    """
    halves = [shard.chunk(2, dim=0) for shard in fc1_shards]
    gate = torch.cat([h[0] for h in halves], dim=0)
    up = torch.cat([h[1] for h in halves], dim=0)
    return gate, up, torch.cat(fc2_shards, dim=1)


def _swiglu(x: torch.Tensor, weights: GluWeights) -> torch.Tensor:
    """down(silu(gate x) * up x)."""
    gate, up, down = weights
    return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)


def _gathered_moe_weights(layer: torch.nn.Module) -> dict[str, Any]:
    """Every expert's and the shared expert's full weights, assembled from all ranks."""
    ep_rank = parallel_state.get_expert_model_parallel_rank()
    etp_rank = parallel_state.get_expert_tensor_parallel_rank()
    local = layer.experts.local_experts
    mine = {
        (ep_rank * len(local) + i, etp_rank): (
            expert.linear_fc1.weight.detach().clone(),
            expert.linear_fc2.weight.detach().clone(),
        )
        for i, expert in enumerate(local)
    }
    everyone: list[dict] = [{} for _ in range(dist.get_world_size())]
    dist.all_gather_object(everyone, mine)
    shards = {key: value for part in everyone for key, value in part.items()}
    etp_size = parallel_state.get_expert_tensor_parallel_world_size()
    experts = [
        _merge_glu_shards(
            [shards[(e, r)][0] for r in range(etp_size)],
            [shards[(e, r)][1] for r in range(etp_size)],
        )
        for e in range(NUM_EXPERTS)
    ]
    shared = layer.shared_experts
    tp_group = parallel_state.get_tensor_model_parallel_group()
    tp_size = dist.get_world_size(tp_group)
    fc1 = _all_gather(shared.linear_fc1.weight.detach(), tp_group, 0).chunk(tp_size, dim=0)
    fc2 = _all_gather(shared.linear_fc2.weight.detach(), tp_group, 1).chunk(tp_size, dim=1)
    return {
        "router": layer.router.weight.detach().clone(),
        "experts": experts,
        "shared": _merge_glu_shards(list(fc1), list(fc2)),
        "shared_gate": shared.gate_weight.detach().clone(),
    }


def _moe_reference(x: torch.Tensor, weights: dict[str, Any]) -> torch.Tensor:
    """Plain-torch MoE: softmax over the top-k router logits, weighted sum of the chosen experts,
    plus sigmoid(gate x) times the shared expert."""
    tokens = x.reshape(-1, x.shape[-1])
    top_logits, top_ids = F.linear(tokens, weights["router"]).topk(TOPK, dim=-1)
    probs = top_logits.softmax(dim=-1)
    routed = torch.zeros_like(tokens)
    for k in range(TOPK):
        for e, expert in enumerate(weights["experts"]):
            picked = top_ids[:, k] == e
            if picked.any():
                contribution = probs[picked, k : k + 1] * _swiglu(tokens[picked], expert)
                routed = routed.index_add(0, picked.nonzero().squeeze(1), contribution)
    gate = torch.sigmoid(F.linear(tokens, weights["shared_gate"]))
    return (routed + gate * _swiglu(tokens, weights["shared"])).view_as(x)


def _moe_errors(seq: int, sp: bool) -> dict[str, float]:
    """MoELayer output and input gradient vs the reference on the gathered weights.

    Data-parallel ranks get different tokens (so the alltoall split sizes differ per rank);
    under sequence parallelism the ranks of a TP group share a sequence and each keeps its slice.
    """
    layer = _moe_layer(sp)
    seed = 10 + parallel_state.get_data_parallel_rank()
    x_full, g_full = _randn(seq, 2, HIDDEN, seed=seed), _randn(seq, 2, HIDDEN, seed=seed + 100)
    part = _seq_slice(seq, sp)
    x = x_full[part].clone().requires_grad_()
    y, _ = layer(x)
    (y * g_full[part]).sum().backward()

    x_ref = x_full.clone().requires_grad_()
    y_ref = _moe_reference(x_ref, _gathered_moe_weights(layer))
    (y_ref * g_full).sum().backward()
    return {"out": _rel_err(y, y_ref[part]), "input_grad": _rel_err(x.grad, x_ref.grad[part])}


def _ep2_run(rank: int, world_size: int) -> dict[str, Any]:
    """Rank body of the ep=2 layout."""
    info = initialize_parallel(ParallelConfig(ep=2), seed=SEED)
    try:
        return {
            "info": info,
            "moe": _moe_errors(seq=6, sp=False),
            "groups": _groups_and_collectives(rank),
        }
    finally:
        destroy_parallel()


def test_ep2_moe_alltoall() -> None:
    results = run_multirank(_ep2_run, 2, timeout=TIMEOUT_S)
    for rank, res in enumerate(results):
        info: ParallelInfo = res["info"]
        assert (info.ep_rank, info.ep_size, info.tp_size, info.dp_size) == (rank, 2, 1, 2)
        assert (info.expert_dp_size, info.etp_size) == (1, 1)
        assert max(res["moe"].values()) < TOL, res["moe"]
        assert res["groups"] == {
            "rank_size": {"tp": (0, 1), "etp": (0, 1), "none": (0, 1)},
            "tp_shards": [[float(rank)] * 2],
            "objects": ["rank 0", "rank 1"],
            "merged": {"from 0": 0, "from 1": 1, "shared": 1},
            "experts": range(2 * rank, 2 * rank + 2),
            "dp": (rank, 2),
        }


# ---- pp=2: 1F1B through get_forward_backward_func; then a world of one -----------------------

MICROBATCHES = 4
PP_SEQ = 3
PP_BATCH = 2


class ToyStage(torch.nn.Module):
    """One pipeline stage: tanh(linear(x)); later stages read the tensor megatron hands in."""

    def __init__(self, config: TransformerConfig, layer: torch.nn.Linear) -> None:
        super().__init__()
        self.config = config
        self.model_type = ModelType.encoder_or_decoder
        self.layer = layer
        self.input_tensor: torch.Tensor | None = None

    def set_input_tensor(self, tensor: torch.Tensor | list[torch.Tensor]) -> None:
        """Called by the schedule with the activation received from the previous stage."""
        self.input_tensor = tensor[0] if isinstance(tensor, list) else tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not parallel_state.is_pipeline_first_stage():
            x = self.input_tensor
        return torch.tanh(self.layer(x))


def _squared_mean_loss(output: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-micro-batch loss and a copy of its value for reporting.

    A copy, not a detached view: megatron divides the returned loss by the number of
    micro-batches in place (schedules.py:269).
    """
    loss = output.pow(2).mean()
    return loss, {"loss": loss.detach().clone()}


def _forward_step(data: Any, model: ToyStage) -> tuple[torch.Tensor, Any]:
    """megatron forward_step_func: the next micro-batch through this stage."""
    return model(next(data)), _squared_mean_loss


def _pp_errors() -> dict[str, float]:
    """1F1B over two stages vs the same two layers run in one process (losses and grads)."""
    torch.manual_seed(0)
    layers = [torch.nn.Linear(HIDDEN, HIDDEN) for _ in range(2)]
    reference = copy.deepcopy(layers)
    batches = [_randn(PP_SEQ, PP_BATCH, HIDDEN, seed=i) for i in range(MICROBATCHES)]
    config = _config(num_layers=2, pipeline_dtype=torch.float32, batch_p2p_sync=False)
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    stage = ToyStage(config, layers[pp_rank])
    losses = get_forward_backward_func()(
        forward_step_func=_forward_step,
        data_iterator=iter(batches),
        model=[stage],
        num_microbatches=MICROBATCHES,
        seq_length=PP_SEQ,
        micro_batch_size=PP_BATCH,
        forward_only=False,
    )
    ref_losses = []
    for batch in batches:
        loss = torch.tanh(reference[1](torch.tanh(reference[0](batch)))).pow(2).mean()
        (loss / MICROBATCHES).backward()
        ref_losses.append(loss.detach())
    errors = {
        "weight_grad": _rel_err(stage.layer.weight.grad, reference[pp_rank].weight.grad),
        "bias_grad": _rel_err(stage.layer.bias.grad, reference[pp_rank].bias.grad),
    }
    if parallel_state.is_pipeline_last_stage():
        errors["loss"] = _rel_err(torch.stack([d["loss"] for d in losses]), torch.stack(ref_losses))
    return errors


def _pp2_run(rank: int, world_size: int) -> dict[str, Any]:
    """Rank body of the pp=2 layout, then a world of one without launcher variables."""
    info = initialize_parallel(ParallelConfig(pp=2), seed=SEED)
    try:
        errors = _pp_errors()
    finally:
        destroy_parallel()
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(name)
    alone = initialize_parallel(ParallelConfig(), seed=SEED)
    destroy_parallel()
    os.environ.update({"RANK": "0", "WORLD_SIZE": "3"})
    try:
        initialize_parallel(ParallelConfig(tp=2))
        rejected = ""
    except ParallelConfigError as exc:
        rejected = str(exc)
    return {
        "info": info,
        "pp": errors,
        "alone": alone,
        "rejected": rejected,
        "left_initialized": dist.is_initialized() or parallel_state.model_parallel_is_initialized(),
    }


def test_pp2_1f1b_and_world_of_one() -> None:
    results = run_multirank(_pp2_run, 2, timeout=TIMEOUT_S)
    for rank, res in enumerate(results):
        info: ParallelInfo = res["info"]
        assert (info.pp_rank, info.pp_size, info.tp_size, info.dp_size) == (rank, 2, 1, 1)
        assert info.is_first_pp_stage == (rank == 0) and info.is_last_pp_stage == (rank == 1)
        assert len(res["pp"]) == (3 if rank == 1 else 2)
        assert max(res["pp"].values()) < TOL, res["pp"]
        alone: ParallelInfo = res["alone"]
        assert (alone.rank, alone.world_size, alone.tp_size, alone.dp_size) == (0, 1, 1, 1)
        assert "not divisible by tp*pp" in res["rejected"]
        assert not res["left_initialized"]
