"""The export check and the manifest: a good export passes and is described exactly; an adapter
with a renamed key, or a merged checkpoint with a corrupted tensor, fails with a clear message."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_trainer.export.check import check_export
from lora_trainer.export.hf_adapter_weights import HFAdapter
from lora_trainer.export.hf_export import ADAPTER_DIR, MERGED_DIR, export_hf
from lora_trainer.export.manifest import LIBRARIES, MANIFEST_FILE, MODULE_KINDS
from lora_trainer.export.peft_adapter import WEIGHTS_FILE
from lora_trainer.export.trained_layers import TrainedLayers
from tests.checkpoints import (
    KIND_MOE_VL,
    build_hf_model,
    fixed_batch,
    load_hf_model,
    save_checkpoint,
)
from tests.export_fixtures import make_base
from tests.lora_runner import run_trained_export
from tests.multirank import run_multirank
from tests.numerics import FLOOR_FACTOR, assert_close, noise_floor, to_float64

STEP = 42
BATCH = fixed_batch(256)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def exported(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, Path, HFAdapter, dict[str, Any]]:
    """A packed MoE-VL base with MTP, exported with the check (float64 forward, see
    check_export)."""
    root = tmp_path_factory.mktemp("check")
    base_dir, adapter = make_base(KIND_MOE_VL, root / "base", packed_experts=True, with_mtp=True)
    manifest = export_hf(
        adapter,
        base_dir,
        root / "save",
        step=STEP,
        check_input_ids=BATCH,
        check_dtype=torch.float64,
        progress=False,
    )
    return base_dir, root / "save", adapter, manifest


@pytest.fixture(scope="module")
def merged_bound(exported: tuple) -> float:
    """The bound on the check's float64 adapter-vs-merged difference: a few times the merged
    checkpoint's own fp32-vs-float64 logit difference (its noise floor, see tests/numerics.py)."""
    with torch.no_grad():
        model = load_hf_model(exported[1] / MERGED_DIR)
        fp32 = model(BATCH).logits
        return FLOOR_FACTOR * noise_floor(fp32, to_float64(model)(BATCH).logits)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_good_export_passes_and_manifest_describes_it(exported: tuple, merged_bound: float) -> None:
    base_dir, save_dir, adapter, manifest = exported
    on_disk = json.loads((save_dir / MANIFEST_FILE).read_text())

    assert on_disk == manifest
    assert manifest["check"]["passed"] is True, manifest["check"]["message"]
    assert manifest["check"]["max_abs_diff_adapter_vs_merged"] <= merged_bound
    assert manifest["check"]["missing_keys"] == manifest["check"]["unexpected_keys"] == []
    assert manifest["check"]["mode"] == "full" and manifest["check"]["compute_dtype"] == "float64"
    kinds = manifest["check"]["kinds"]
    assert set(kinds) == {"attention", "gdn", "shared_expert", "routed_experts", "logits"}
    assert all(0 < kind["max_abs_diff"] <= kind["tolerance"] for kind in kinds.values())
    assert manifest["check"]["tolerance"] == kinds["logits"]["tolerance"]
    assert manifest["step"] == STEP and manifest["profile"] == "peft"
    assert manifest["base"] == {
        "path": str(base_dir.resolve()),
        "config_sha256": sha256(base_dir / "config.json"),
    }
    assert set(manifest["versions"]) == set(LIBRARIES)
    assert all(
        manifest["versions"][name] for name in ("torch", "transformers", "peft", "safetensors")
    )
    for directory in (ADAPTER_DIR, MERGED_DIR):
        files = sorted(p for p in (save_dir / directory).iterdir())
        assert manifest["files"][directory] == {p.name: sha256(p) for p in files}
        assert manifest["sizes_bytes"][directory] == sum(p.stat().st_size for p in files)
    # 2 attention layers x q/k/v/o, 2 GDN layers x in_proj_qkv/z/b/a + out_proj, 4 layers x shared
    # expert gate/up/down, 4 layers x packed gate_up/down
    counts = {
        "attention": 8,
        "gdn": 10,
        "mlp": 0,
        "shared_expert": 12,
        "routed_experts": 8,
        "other": 0,
    }
    assert manifest["adapter"]["modules"] == counts and list(counts) == list(MODULE_KINDS)
    assert manifest["adapter"]["nonzero_lora_B"] == 38
    assert manifest["adapter"]["scale"] == adapter.scale


def test_reference_logits_are_compared(exported: tuple, merged_bound: float) -> None:
    """Logits of the base without the adapter as `reference_logits`: only that comparison fails."""
    base_dir, save_dir, _, _ = exported
    with torch.no_grad():
        unadapted = load_hf_model(base_dir)(BATCH).logits

    result = check_export(
        base_dir,
        save_dir / ADAPTER_DIR,
        save_dir / MERGED_DIR,
        BATCH,
        reference_logits=unadapted,
        dtype=torch.float64,
    )

    assert not result.passed
    assert result.max_abs_diff_adapter_vs_merged <= merged_bound
    assert (
        result.max_abs_diff_reference_vs_merged is not None
        and result.max_abs_diff_reference_vs_merged > 0.5
    )
    assert "reference and merged logits differ" in result.message
    assert "adapter and merged" not in result.message


def test_renamed_adapter_key_fails(exported: tuple, tmp_path: Path) -> None:
    base_dir, save_dir, _, _ = exported
    adapter_dir = shutil.copytree(save_dir / ADAPTER_DIR, tmp_path / "adapter")
    tensors = load_file(str(adapter_dir / WEIGHTS_FILE))
    key = "base_model.model.model.language_model.layers.1.self_attn.q_proj.lora_A.weight"
    renamed = key.replace("q_proj", "query_proj")
    tensors[renamed] = tensors.pop(key)
    save_file(tensors, str(adapter_dir / WEIGHTS_FILE), metadata={"format": "pt"})

    result = check_export(base_dir, adapter_dir, save_dir / MERGED_DIR, BATCH)

    assert not result.passed
    assert result.unexpected_keys == [renamed]
    assert result.missing_keys == [key]
    assert "not consumed by PEFT" in result.message and renamed in result.message


def test_corrupted_merged_tensor_fails(exported: tuple, tmp_path: Path) -> None:
    base_dir, save_dir, _, _ = exported
    merged_dir = shutil.copytree(save_dir / MERGED_DIR, tmp_path / "merged")
    tensors = load_file(str(merged_dir / "model.safetensors"))
    tensors["model.language_model.layers.1.self_attn.o_proj.weight"] += 0.05
    save_file(tensors, str(merged_dir / "model.safetensors"), metadata={"format": "pt"})

    result = check_export(base_dir, save_dir / ADAPTER_DIR, merged_dir, BATCH)

    assert not result.passed
    assert result.missing_keys == result.unexpected_keys == result.merged_missing_keys == []
    assert result.max_abs_diff_adapter_vs_merged > 0.01
    assert "adapter and merged logits differ" in result.message


# The comparison with our trained model: our Megatron model with random LoRA factors records its
# layers on the check batch, and the export made from its adapter is checked against the records.
# The base is stored in the dtype our model computes in, as in training (fp32 on CPU, bf16 on GPU).
TRAINED_LORA = {"r": 4, "alpha": 8.0}
MUTATED = "layers.1.mlp.experts.gate_up_proj[0]"
LAYERS = [0, 1, 2, 3]
# How far above its tolerance the changed expert puts its layer: fp32 resolves ~1e-6 of the
# output scale, bf16 ~1e-2 (the bf16 floor of these random layers is 1-4% of their output).
WRONG_MARGIN = {torch.float32: 100.0, torch.bfloat16: 4.0}
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])


@pytest.fixture(scope="module")
def trained_bases(tmp_path_factory: pytest.TempPathFactory) -> dict[torch.dtype, str]:
    root = tmp_path_factory.mktemp("trained")
    return {
        dtype: str(
            save_checkpoint(
                build_hf_model(KIND_MOE_VL),
                root / str(dtype).removeprefix("torch."),
                dtype=dtype,
                packed_experts=True,
                with_mtp=True,
            )
        )
        for dtype in WRONG_MARGIN
    }


def trained_export(
    base: str,
    save_dir: Path,
    dtype: torch.dtype = torch.float32,
    parallel: dict[str, Any] | None = None,
    mutate: str | None = None,
) -> dict[str, Any]:
    """The check part of the manifest of `run_trained_export` (2 ranks with `parallel`)."""
    manifests = run_multirank(
        run_trained_export,
        2 if parallel else 1,
        parallel or {},
        base,
        BATCH,
        TRAINED_LORA,
        str(save_dir),
        dtype,
        mutate,
        timeout=600,
    )
    return manifests[0]["check"]


@DTYPES
def test_export_computes_what_the_trained_model_computed(
    trained_bases: dict[torch.dtype, str], tmp_path: Path, dtype: torch.dtype
) -> None:
    check = trained_export(trained_bases[dtype], tmp_path, dtype)

    assert check["passed"], check["message"]
    assert check["trained_dtype"] == str(dtype).removeprefix("torch.")
    layers = check["trained_layers"]
    assert [layer["layer"] for layer in layers] == LAYERS
    for layer in layers:
        # Our layer is about as far from the reference as the reference run in our dtype.
        assert 0 < layer["max_abs_diff"] <= 2 * layer["rounding_diff"], layer
        assert layer["max_abs_diff"] < layer["tolerance"] / 3, layer
    assert "trained_layer_output" in check["kinds"]


@DTYPES
def test_export_of_another_lora_than_the_trained_one_fails(
    trained_bases: dict[torch.dtype, str], tmp_path: Path, dtype: torch.dtype
) -> None:
    """One expert's factors change between the recording and the export: adapter and merged
    checkpoint still agree, only the comparison with the trained layer sees it."""
    check = trained_export(trained_bases[dtype], tmp_path, dtype, mutate=MUTATED)

    assert not check["passed"]
    assert all(
        result["max_abs_diff"] <= result["tolerance"]
        for kind, result in check["kinds"].items()
        if kind != "trained_layer_output"
    )
    ratios = [layer["max_abs_diff"] / layer["tolerance"] for layer in check["trained_layers"]]
    assert max(ratios[:1] + ratios[2:]) <= 1, check["message"]
    assert ratios[1] > WRONG_MARGIN[dtype], check["message"]
    assert (
        "does not compute what the trained model computed: outputs of layer 1 "
        in (check["message"])
    )


def test_trained_records_of_two_expert_parallel_ranks_equal_one_rank(
    trained_bases: dict[torch.dtype, str], tmp_path: Path
) -> None:
    base = trained_bases[torch.float32]
    one = trained_export(base, tmp_path / "one")
    two = trained_export(base, tmp_path / "ep2", parallel={"ep": 2})

    assert two["passed"], two["message"]
    records = [TrainedLayers(tmp_path / name / "trained") for name in ("one", "ep2")]
    for layer in one["trained_layers"]:
        single, expert_parallel = (record.layer(layer["layer"]) for record in records)
        for what in ("input", "output"):
            got, want = getattr(expert_parallel, what), getattr(single, what)
            assert_close(got, want, layer["rounding_diff"], f"layer {layer['layer']} {what}")
        assert single.routing is not None and expert_parallel.routing is not None
        assert torch.equal(single.routing, expert_parallel.routing)
