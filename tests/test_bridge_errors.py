"""Bad model directories, configs, checkpoints and parallel sizes fail with messages that name the
file, key or size at fault and say what to do.

Config and parallel-size errors come before anything is built and run in this process. Load errors
need megatron's parallel state; they all share one spawned world-1 run (`try_loads`) over broken
copies of the tiny dense checkpoint, plus the MoE-VL checkpoint with vision and MTP tensors, which
must load.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load_file, save_file

from lora_trainer.bridge.build import build_model_from_hf
from lora_trainer.errors import CheckpointError, ParallelConfigError
from lora_trainer.parallel.config import ParallelConfig
from lora_trainer.qwen35.parallel_fit import check_parallel_fits
from lora_trainer.qwen35.spec import Qwen35Spec
from tests.bridge_error_runner import LoadOutcome, try_loads
from tests.checkpoints import (
    DENSE_SIZES,
    KIND_DENSE,
    KIND_MOE_VL,
    MOE_SIZES,
    MTP_TENSORS,
    TEXT_SIZES,
)
from tests.multirank import run_multirank

WEIGHTS = "model.safetensors"
MISSING_TENSOR = "model.layers.1.self_attn.o_proj.weight"
RESHAPED_TENSOR = "model.layers.0.linear_attn.out_proj.weight"
UNKNOWN_TENSOR = "model.layers.0.foo.weight"

DENSE_SPEC = Qwen35Spec.from_config_dict(dict(TEXT_SIZES, **DENSE_SIZES, model_type="qwen3_5_text"))
MOE_SPEC = Qwen35Spec.from_config_dict(dict(TEXT_SIZES, **MOE_SIZES, model_type="qwen3_5_moe_text"))


# ------------------------------------------------------------------------------ config.json


def _write_config(directory: Path, text: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(text)
    return directory


def test_missing_model_directory(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_model"
    with pytest.raises(CheckpointError) as info:
        Qwen35Spec.from_hf_dir(missing)
    assert str(missing) in str(info.value) and "does not exist" in str(info.value)
    assert "model.hf_path" in str(info.value)


def test_missing_model_directory_through_build(tmp_path: Path) -> None:
    """The user's entry point fails the same way, before any model or process group exists."""
    missing = tmp_path / "no_such_model"
    with pytest.raises(CheckpointError, match=re.escape(str(missing))):
        build_model_from_hf(missing, ParallelConfig())


def test_missing_config_json(tmp_path: Path) -> None:
    (tmp_path / WEIGHTS).write_bytes(b"")
    with pytest.raises(CheckpointError) as info:
        Qwen35Spec.from_hf_dir(tmp_path)
    message = str(info.value)
    assert str(tmp_path / "config.json") in message and "is missing" in message
    assert "save_pretrained" in message


def test_invalid_json_config(tmp_path: Path) -> None:
    directory = _write_config(tmp_path, '{"model_type": "qwen3_5_text", "hidden_size": 64,')
    with pytest.raises(CheckpointError) as info:
        Qwen35Spec.from_hf_dir(directory)
    assert str(directory / "config.json") in str(info.value)
    assert "not valid JSON" in str(info.value)


def test_unsupported_model_type(tmp_path: Path) -> None:
    directory = _write_config(
        tmp_path, json.dumps(dict(TEXT_SIZES, **DENSE_SIZES, model_type="qwen3"))
    )
    with pytest.raises(CheckpointError) as info:
        Qwen35Spec.from_hf_dir(directory)
    message = str(info.value)
    assert str(directory / "config.json") in message
    assert "unsupported model_type 'qwen3'" in message
    assert all(
        name in message for name in ("qwen3_5", "qwen3_5_moe", "qwen3_5_text", "qwen3_5_moe_text")
    )


# --------------------------------------------------------------------------- parallel sizes


FIT_CASES: dict[str, tuple[Qwen35Spec, ParallelConfig, tuple[str, ...], tuple[str, ...]]] = {
    # name: (spec, layout, fragments the message must hold, fragments it must not hold)
    "tp_attention_heads": (
        dataclasses.replace(DENSE_SPEC, num_attention_heads=6),
        ParallelConfig(tp=4),
        ("parallel.tp=4", "attention heads (num_attention_heads) = 6"),
        (),
    ),
    "tp_value_heads": (
        dataclasses.replace(DENSE_SPEC, linear_num_value_heads=3),
        ParallelConfig(tp=2),
        ("parallel.tp=2", "GDN value heads (linear_num_value_heads) = 3", "divide"),
        ("num_attention_heads", "linear_num_key_heads", "vocab_size"),
    ),
    "ep_experts": (
        MOE_SPEC,
        ParallelConfig(ep=3),
        ("parallel.ep=3", "routed experts (num_experts) = 4"),
        ("parallel.tp",),
    ),
    "pp_layers": (
        DENSE_SPEC,
        ParallelConfig(pp=3),
        ("parallel.pp=3", "layers (num_hidden_layers) = 4"),
        ("parallel.tp",),
    ),
    "ep_on_dense": (
        DENSE_SPEC,
        ParallelConfig(ep=2),
        ("parallel.ep=2", "dense", "parallel.ep=1"),
        (),
    ),
    "moe_tp_without_sp": (
        MOE_SPEC,
        ParallelConfig(tp=2),
        ("parallel.tp=2", "MoE", "parallel.sp=true"),
        (),
    ),
}


@pytest.mark.parametrize("case", list(FIT_CASES))
def test_parallel_sizes_that_do_not_fit(case: str) -> None:
    spec, parallel, present, absent = FIT_CASES[case]
    with pytest.raises(ParallelConfigError) as info:
        check_parallel_fits(spec, parallel)
    message = str(info.value)
    for fragment in present:
        assert fragment in message, (fragment, message)
    for fragment in absent:
        assert fragment not in message, (fragment, message)


def test_fitting_layouts_pass() -> None:
    check_parallel_fits(DENSE_SPEC, ParallelConfig(tp=2, pp=2))
    check_parallel_fits(MOE_SPEC, ParallelConfig(tp=2, sp=True, ep=4, pp=4))


def test_build_checks_the_fit_before_building(checkpoints: dict[str, str]) -> None:
    """build_model_from_hf refuses a misfit before megatron's parallel state is needed."""
    with pytest.raises(ParallelConfigError, match=r"parallel\.pp=3 .*num_hidden_layers\) = 4"):
        build_model_from_hf(checkpoints[KIND_DENSE], ParallelConfig(pp=3))


# ----------------------------------------------------------------------------- checkpoints


def _copy(source: str, root: Path, name: str) -> Path:
    return Path(shutil.copytree(source, root / name))


def _edit_tensors(directory: Path, edit: Any) -> Path:
    """Rewrite the single weights file of `directory` with `edit(tensors)` applied."""
    file = directory / WEIGHTS
    tensors = load_file(str(file))
    edit(tensors)
    save_file(tensors, str(file), metadata={"format": "pt"})
    return directory


def _edit_config(directory: Path, **changes: Any) -> Path:
    file = directory / "config.json"
    file.write_text(json.dumps(dict(json.loads(file.read_text()), **changes)))
    return directory


def _truncate(directory: Path) -> Path:
    file = directory / WEIGHTS
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    return directory


@pytest.fixture(scope="module")
def broken(
    checkpoints: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """Copies of the tiny dense checkpoint, each broken in one way, by case name."""
    root = tmp_path_factory.mktemp("broken_checkpoints")
    dense = checkpoints[KIND_DENSE]

    def reshape(tensors: dict) -> None:
        tensors[RESHAPED_TENSOR] = tensors[RESHAPED_TENSOR][:, :40].contiguous()

    def add_unknown(tensors: dict) -> None:
        tensors[UNKNOWN_TENSOR] = tensors[RESHAPED_TENSOR].clone()

    return {
        "missing_tensor": _edit_tensors(
            _copy(dense, root, "missing"), lambda t: t.pop(MISSING_TENSOR)
        ),
        "wrong_shape": _edit_tensors(_copy(dense, root, "wrong_shape"), reshape),
        "config_hidden_size": _edit_config(_copy(dense, root, "hidden"), hidden_size=32),
        "truncated": _truncate(_copy(dense, root, "truncated")),
        "unknown_tensor": _edit_tensors(_copy(dense, root, "unknown"), add_unknown),
    }


@pytest.fixture(scope="module")
def outcomes(broken: dict[str, Path], checkpoints: dict[str, str]) -> dict[str, LoadOutcome]:
    """Every load case in one spawned world-1 run."""
    cases = {name: str(path) for name, path in broken.items()}
    cases["vision_mtp"] = checkpoints[KIND_MOE_VL]
    return run_multirank(try_loads, 1, cases)[0]


def _failure(outcome: LoadOutcome) -> str:
    assert outcome.error_type == "CheckpointError", outcome
    return outcome.message


def test_missing_tensor_names_key_and_directory(outcomes: dict, broken: dict) -> None:
    message = _failure(outcomes["missing_tensor"])
    assert repr(MISSING_TENSOR) in message and "missing" in message
    assert str(broken["missing_tensor"]) in message
    assert "re-export" in message


def test_wrong_tensor_shape_names_tensor_and_both_shapes(outcomes: dict, broken: dict) -> None:
    message = _failure(outcomes["wrong_shape"])
    assert str(broken["wrong_shape"]) in message
    assert f"{RESHAPED_TENSOR!r} has shape [64, 40] but config.json implies [64, 48]" in message


def test_config_that_does_not_match_the_weights(outcomes: dict, broken: dict) -> None:
    """hidden_size 64 -> 32 in config.json: the first tensor checked reports both shapes."""
    message = _failure(outcomes["config_hidden_size"])
    assert str(broken["config_hidden_size"]) in message
    match = re.search(
        r"tensor '(model\.[\w.]+)' has shape \[([\d, ]+)\] but config.json implies \[([\d, ]+)\]",
        message,
    )
    assert match is not None, message
    on_disk, implied = match.group(2).split(", "), match.group(3).split(", ")
    assert "64" in on_disk and "32" in implied and "64" not in implied


def test_truncated_safetensors_names_the_file(outcomes: dict, broken: dict) -> None:
    message = _failure(outcomes["truncated"])
    assert str(broken["truncated"] / WEIGHTS) in message
    assert "truncated or corrupt" in message and "download it again" in message


def test_unknown_text_tensor_is_refused(outcomes: dict, broken: dict) -> None:
    message = _failure(outcomes["unknown_tensor"])
    assert str(broken["unknown_tensor"]) in message
    assert UNKNOWN_TENSOR in message and "model_type" in message


def test_vision_and_mtp_tensors_are_skipped(outcomes: dict, checkpoints: dict) -> None:
    names = load_file(str(Path(checkpoints[KIND_MOE_VL]) / WEIGHTS)).keys()
    assert set(MTP_TENSORS) <= set(names)
    assert any(name.startswith("model.visual.") for name in names)
    outcome = outcomes["vision_mtp"]
    assert outcome.error_type is None, outcome.message
    assert outcome.num_parameters > 0
