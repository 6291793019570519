"""The export check's tolerance comes from the numbers: every correct export passes (fp32, bf16 and
fp16 bases, full and layer mode) and every wrongly laid-out one fails, by a wide margin.

Each wrong export is the correct one with one bug of the kind an exporter can have: in the adapter
file (expert-major lora_B columns, one expert's A or B laid out transposed, GDN in_proj_b /
in_proj_a swapped) or in the merged weights (gate and up rows of the routed and shared experts
swapped, the q and k blocks of GDN in_proj_qkv swapped, one expert's delta missing). The margin is
measured as
`worst`: the largest difference / tolerance over all module kinds (<= 1 passes).
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_trainer.export.check import ExportCheckResult, check_export
from lora_trainer.export.hf_adapter_weights import HFAdapter, HFExpertLoraWeights, HFLoraWeights
from lora_trainer.export.hf_export import ADAPTER_DIR, MERGED_DIR, export_hf
from lora_trainer.export.merged import write_merged_checkpoint
from lora_trainer.export.peft_adapter import WEIGHTS_FILE
from tests.checkpoints import KIND_MOE_VL, fixed_batch
from tests.export_fixtures import make_base

BATCH = fixed_batch(256)
PREFIX = "base_model.model.model.language_model."
GDN_LAYER, EXPERT = 0, 1
KEY_DIM = 2 * 8  # linear_num_key_heads x linear_key_head_dim of tests.checkpoints.TEXT_SIZES
CORRECT_MARGIN = 0.6  # a correct export stays well below its tolerance
WRONG_MARGIN = 3.0  # a wrong one exceeds it threefold (12x one rounding; fp32: 1e5-fold)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def worst(result: ExportCheckResult) -> float:
    return max(kind.max_abs_diff / kind.tolerance for kind in result.kinds.values())


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def exported(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path, HFAdapter]:
    root = tmp_path_factory.mktemp(f"tolerance-{request.param}")
    base_dir, adapter = make_base(
        KIND_MOE_VL, root / "base", dtype=request.param, packed_experts=True
    )
    export_hf(adapter, base_dir, root / "save", step=1, progress=False)
    return base_dir, root / "save", adapter


# Adapter-file bugs: a function of the file's tensors.
def expert_major_lora_b(tensors: dict[str, torch.Tensor]) -> None:
    key = PREFIX + "layers.0.mlp.experts.base_layer.lora_B.weight"
    fan_out, columns = tensors[key].shape
    experts = columns // 4
    tensors[key] = (
        tensors[key]
        .view(fan_out, 4, experts)
        .transpose(1, 2)
        .reshape(fan_out, columns)
        .contiguous()
    )


def expert_a_transposed(tensors: dict[str, torch.Tensor]) -> None:
    key = PREFIX + "layers.0.mlp.experts.lora_A.weight"
    rows = slice(EXPERT * 4, EXPERT * 4 + 4)
    block = tensors[key][rows]
    tensors[key][rows] = block.t().contiguous().view(block.shape)


def expert_b_transposed(tensors: dict[str, torch.Tensor]) -> None:
    key = PREFIX + "layers.2.mlp.experts.lora_B.weight"
    fan_out, columns = tensors[key].shape
    experts = columns // 4
    b = tensors[key].view(fan_out, 4, experts)[:, :, EXPERT].contiguous()
    tensors[key].view(fan_out, 4, experts)[:, :, EXPERT] = b.t().contiguous().view(fan_out, 4)


def gdn_b_a_swapped(tensors: dict[str, torch.Tensor]) -> None:
    stem = PREFIX + f"layers.{GDN_LAYER}.linear_attn.in_proj_"
    for factor in ("lora_A", "lora_B"):
        b, a = f"{stem}b.{factor}.weight", f"{stem}a.{factor}.weight"
        tensors[b], tensors[a] = tensors[a], tensors[b]


# Merged-weight bugs: a function of the adapter whose deltas are merged.
def gate_up_swapped(adapter: HFAdapter) -> HFAdapter:
    experts = dict(adapter.experts)
    key = "layers.1.mlp.experts.gate_up_proj"
    gate, up = experts[key].b.chunk(2, dim=1)
    experts[key] = HFExpertLoraWeights(experts[key].a, torch.cat([up, gate], dim=1))
    linears = dict(adapter.linears)
    gate_key, up_key = "layers.3.mlp.shared_expert.gate_proj", "layers.3.mlp.shared_expert.up_proj"
    linears[gate_key], linears[up_key] = linears[up_key], linears[gate_key]
    return dataclasses.replace(adapter, experts=experts, linears=linears)


def gdn_qk_swapped(adapter: HFAdapter) -> HFAdapter:
    linears = dict(adapter.linears)
    key = f"layers.{GDN_LAYER}.linear_attn.in_proj_qkv"
    q, k, v = linears[key].b.split([KEY_DIM, KEY_DIM, linears[key].b.shape[0] - 2 * KEY_DIM])
    linears[key] = HFLoraWeights(linears[key].a, torch.cat([k, q, v]))
    return dataclasses.replace(adapter, linears=linears)


def expert_delta_missing(adapter: HFAdapter) -> HFAdapter:
    experts = dict(adapter.experts)
    key = "layers.2.mlp.experts.down_proj"
    b = experts[key].b.clone()
    b[EXPERT] = 0
    experts[key] = HFExpertLoraWeights(experts[key].a, b)
    return dataclasses.replace(adapter, experts=experts)


ADAPTER_BUGS: dict[str, Callable[[dict[str, torch.Tensor]], None]] = {
    "expert-major lora_B": expert_major_lora_b,
    "expert A transposed": expert_a_transposed,
    "expert B transposed": expert_b_transposed,
    "GDN in_proj_b/a swapped": gdn_b_a_swapped,
}
MERGED_BUGS: dict[str, Callable[[HFAdapter], HFAdapter]] = {
    "gate/up swapped": gate_up_swapped,
    "GDN q/k blocks swapped": gdn_qk_swapped,
    "expert delta missing": expert_delta_missing,
}


@pytest.mark.parametrize("mode", ["full", "layer"])
def test_correct_export_passes(exported: tuple, mode: str) -> None:
    base_dir, save_dir, _ = exported

    result = check_export(base_dir, save_dir / ADAPTER_DIR, save_dir / MERGED_DIR, BATCH, mode=mode)

    assert result.passed, result.message
    assert result.mode == mode
    assert worst(result) < CORRECT_MARGIN, result.message
    kinds = {
        "attention",
        "gdn",
        "shared_expert",
        "routed_experts",
        "logits" if mode == "full" else "layer_output",
    }
    assert set(result.kinds) == kinds
    assert all(kind.rounding_diff > 0 for kind in result.kinds.values())


def test_fp16_export_passes(tmp_path: Path) -> None:
    base_dir, adapter = make_base(
        KIND_MOE_VL, tmp_path / "base", dtype=torch.float16, packed_experts=True
    )
    export_hf(adapter, base_dir, tmp_path / "save", step=1, progress=False)

    result = check_export(
        base_dir, tmp_path / "save" / ADAPTER_DIR, tmp_path / "save" / MERGED_DIR, BATCH
    )

    assert result.passed, result.message
    assert (result.stored_dtype, result.compute_dtype) == ("float16", "float32")
    assert worst(result) < CORRECT_MARGIN, result.message


@pytest.mark.parametrize("bug", ADAPTER_BUGS)
def test_wrong_adapter_file_fails(exported: tuple, bug: str, tmp_path: Path) -> None:
    base_dir, save_dir, _ = exported
    adapter_dir = shutil.copytree(save_dir / ADAPTER_DIR, tmp_path / "adapter")
    tensors = load_file(str(adapter_dir / WEIGHTS_FILE))
    ADAPTER_BUGS[bug](tensors)
    save_file(tensors, str(adapter_dir / WEIGHTS_FILE), metadata={"format": "pt"})

    for mode in ("full", "layer"):
        result = check_export(base_dir, adapter_dir, save_dir / MERGED_DIR, BATCH, mode=mode)
        assert not result.passed and result.missing_keys == result.unexpected_keys == []
        assert worst(result) > WRONG_MARGIN, result.message


@pytest.mark.parametrize("bug", MERGED_BUGS)
def test_wrong_merged_weights_fail(exported: tuple, bug: str, tmp_path: Path) -> None:
    base_dir, save_dir, adapter = exported
    merged_dir = tmp_path / "merged"
    merged_dir.mkdir()
    write_merged_checkpoint(MERGED_BUGS[bug](adapter), base_dir, merged_dir, progress=False)

    for mode in ("full", "layer"):
        result = check_export(base_dir, save_dir / ADAPTER_DIR, merged_dir, BATCH, mode=mode)
        assert not result.passed and result.merged_missing_keys == []
        assert worst(result) > WRONG_MARGIN, result.message
