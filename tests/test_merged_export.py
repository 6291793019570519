"""Merged HF checkpoint export: every adapted tensor is base + scale * B @ A, everything else is
the base's bytes, in the base's own keys, dtypes, shards and index; transformers loads it and
matches base + PEFT adapter; ranks split the work; failures leave the previous export intact."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from safetensors.torch import save_file

import lora_trainer.export.merged as merged_module
import lora_trainer.export.peft_adapter as peft_adapter_module
import lora_trainer.export.tiled_merge as tiled_merge_module
from lora_trainer.bridge.safetensors_io import INDEX_FILE
from lora_trainer.errors import ExportError
from lora_trainer.export.hf_adapter_weights import HFAdapter, HFExpertLoraWeights, HFLoraWeights
from lora_trainer.export.hf_export import ADAPTER_DIR, MERGED_DIR, STAGING_DIR, export_hf
from lora_trainer.export.manifest import MANIFEST_FILE
from lora_trainer.export.merged import write_merged_checkpoint
from lora_trainer.export.peft_adapter import write_peft_adapter
from tests.checkpoints import KIND_DENSE, KIND_MOE, KIND_MOE_VL, fixed_batch, load_hf_model
from tests.export_fixtures import EXTRA_FILES, HIDDEN_FILE, make_base
from tests.numerics import assert_differs, assert_within_floor, noise_floor, to_float64

REPO = Path(__file__).resolve().parents[1]
RELATIVE_TOLERANCE = (
    1e-6  # adapted fp32 tensors vs base + scale * B @ A in float64, relative to their max
)

# name -> make_base arguments
CASES: dict[str, dict[str, object]] = {
    "dense": {"kind": KIND_DENSE},
    "moe_per_expert_sharded": {"kind": KIND_MOE, "max_shard_size": "100KB"},
    "moe_vl_packed_mtp": {"kind": KIND_MOE_VL, "packed_experts": True, "with_mtp": True},
    "moe_vl_packed_mtp_sharded": {
        "kind": KIND_MOE_VL,
        "packed_experts": True,
        "with_mtp": True,
        "shards": 3,
    },
    "moe_vl_packed_bf16": {
        "kind": KIND_MOE_VL,
        "packed_experts": True,
        "with_mtp": True,
        "dtype": torch.bfloat16,
    },
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, HFAdapter]]:
    root = tmp_path_factory.mktemp("bases")
    return {name: make_base(path=root / name, **kwargs) for name, kwargs in CASES.items()}  # type: ignore[arg-type]


def read_all(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory (single file or sharded)."""
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            names = handle.keys()  # a safe_open handle is not iterable
            tensors.update({name: handle.get_tensor(name) for name in names})
    return tensors


def expected_deltas(adapter: HFAdapter, base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Base tensor name -> scale * B @ A in float64, in the base's expert layout."""
    deltas: dict[str, torch.Tensor] = {}
    for module, weights in adapter.linears.items():
        deltas[f"{adapter.text_prefix}{module}.weight"] = (
            adapter.scale * weights.b.double() @ weights.a.double()
        )
    for key, experts in adapter.experts.items():
        packed = adapter.scale * torch.einsum(
            "eor,eri->eoi", experts.b.double(), experts.a.double()
        )
        name = adapter.text_prefix + key
        if name in base:
            deltas[name] = packed
            continue
        module, _, proj = name.rpartition(".")
        for e in range(packed.shape[0]):
            if proj == "gate_up_proj":
                gate, up = packed[e].chunk(2)
                deltas[f"{module}.{e}.gate_proj.weight"] = gate
                deltas[f"{module}.{e}.up_proj.weight"] = up
            else:
                deltas[f"{module}.{e}.down_proj.weight"] = packed[e]
    return deltas


def export_merged(
    adapter: HFAdapter, base_dir: Path, out_dir: Path, **kwargs: object
) -> list[Path]:
    out_dir.mkdir(parents=True)
    return write_merged_checkpoint(adapter, base_dir, out_dir, progress=False, **kwargs)  # type: ignore[arg-type]


def tree_bytes(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir()) if path.is_file()}


@pytest.mark.parametrize("case", list(CASES))
def test_adapted_tensors_merged_others_identical(case: str, bases: dict, tmp_path: Path) -> None:
    base_dir, adapter = bases[case]
    export_merged(adapter, base_dir, tmp_path / "merged")
    base, merged = read_all(base_dir), read_all(tmp_path / "merged")
    deltas = expected_deltas(adapter, base)

    assert set(merged) == set(base)
    assert set(deltas) <= set(base)
    for name, tensor in base.items():
        assert merged[name].dtype == tensor.dtype, name
        if name not in deltas:
            assert torch.equal(merged[name], tensor), name
            continue
        expected = tensor.double() + deltas[name]
        error = (merged[name].double() - expected).abs()
        bound = RELATIVE_TOLERANCE * expected.abs().max()
        if tensor.dtype != torch.float32:  # rounded once to the stored dtype: at most one ulp off
            bound = bound + expected.abs() * torch.finfo(tensor.dtype).eps
        assert (error <= bound).all(), name
        assert not torch.equal(merged[name], tensor), name

    # same files, same index, same non-weight files; hidden files and nothing else are left out
    base_files = sorted(p.name for p in base_dir.iterdir() if not p.name.startswith("."))
    assert sorted(p.name for p in (tmp_path / "merged").iterdir()) == base_files
    for name in [
        "config.json",
        *EXTRA_FILES,
        *([INDEX_FILE] if (base_dir / INDEX_FILE).exists() else []),
    ]:
        assert (tmp_path / "merged" / name).read_bytes() == (base_dir / name).read_bytes(), name
    assert not (tmp_path / "merged" / HIDDEN_FILE).exists()


def test_layouts_and_dtypes_kept(bases: dict, tmp_path: Path) -> None:
    """A per-expert base stays per-expert, a packed one packed with its MTP tensors, bf16 stays
    bf16, and the sharded cases really have several shards."""
    per_expert_dir, per_expert_adapter = bases["moe_per_expert_sharded"]
    export_merged(per_expert_adapter, per_expert_dir, tmp_path / "per_expert")
    names = set(read_all(tmp_path / "per_expert"))
    assert "model.layers.0.mlp.experts.3.gate_proj.weight" in names
    assert not [name for name in names if name.endswith(("gate_up_proj", "experts.down_proj"))]
    assert len(json.loads((tmp_path / "per_expert" / INDEX_FILE).read_text())["weight_map"]) == len(
        names
    )
    assert len(list((tmp_path / "per_expert").glob("*.safetensors"))) > 2

    bf16_dir, bf16_adapter = bases["moe_vl_packed_bf16"]
    export_merged(bf16_adapter, bf16_dir, tmp_path / "bf16")
    tensors = read_all(tmp_path / "bf16")
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    assert "model.language_model.layers.0.mlp.experts.gate_up_proj" in tensors
    assert {"mtp.fc.weight", "mtp.norm.weight"} <= set(tensors)
    assert len(list(bases["moe_vl_packed_mtp_sharded"][0].glob("*.safetensors"))) == 3


@pytest.mark.parametrize("case", ["dense", "moe_per_expert_sharded", "moe_vl_packed_mtp"])
def test_merged_logits_match_peft_adapter(case: str, bases: dict, tmp_path: Path) -> None:
    """Both sides in float64 (the merged checkpoint's fp32 weights): the fixture amplifies rounding,
    so merged vs unmerged differ by up to ~2e-4 in an fp32 forward from the forward's own rounding.
    In float64 what is left is the fp32 rounding of the stored merged weights, of the order of the
    merged model's own fp32-vs-float64 difference (the bound's scale); a wrong merge moves the
    logits by O(1)."""
    base_dir, adapter = bases[case]
    export_merged(adapter, base_dir, tmp_path / "merged")
    (tmp_path / "adapter").mkdir()
    write_peft_adapter(adapter, tmp_path / "adapter")
    batch = fixed_batch(256)

    with torch.no_grad():
        merged_model = load_hf_model(tmp_path / "merged")
        merged_fp32 = merged_model(batch).logits
        merged_logits = to_float64(merged_model)(batch).logits
        base_model = to_float64(load_hf_model(base_dir))
        base_logits = base_model(batch).logits
        adapter_logits = (
            PeftModel.from_pretrained(base_model, tmp_path / "adapter").eval()(batch).logits
        )

    assert_differs(merged_logits, base_logits, 0.5, f"{case}: merged vs base")
    floor = noise_floor(merged_fp32, merged_logits)
    assert_within_floor(
        merged_logits, adapter_logits, floor, f"{case}: merged vs base + PEFT adapter"
    )


def test_two_ranks_write_the_same_files_as_one(bases: dict, tmp_path: Path) -> None:
    base_dir, adapter = bases["moe_vl_packed_mtp_sharded"]
    single = export_merged(adapter, base_dir, tmp_path / "one")
    (tmp_path / "two").mkdir()
    rank0 = write_merged_checkpoint(
        adapter, base_dir, tmp_path / "two", rank=0, world_size=2, progress=False
    )
    rank1 = write_merged_checkpoint(
        adapter, base_dir, tmp_path / "two", rank=1, world_size=2, progress=False
    )

    assert [p.name for p in rank1] == ["model-00002-of-00003.safetensors"]
    assert sorted(p.name for p in rank0 + rank1) == sorted(p.name for p in single)
    assert tree_bytes(tmp_path / "two") == tree_bytes(tmp_path / "one")


def test_adapter_module_without_base_tensor(bases: dict, tmp_path: Path) -> None:
    base_dir, adapter = bases["dense"]
    extra = HFLoraWeights(torch.ones(4, 64), torch.ones(8, 4))
    wrong = HFAdapter(
        {**adapter.linears, "layers.0.self_attn.qkv_proj": extra}, {}, 4, 8.0, False, "model.", "x"
    )
    with pytest.raises(ExportError, match=r"layers\.0\.self_attn\.qkv_proj"):
        export_merged(wrong, base_dir, tmp_path / "merged")
    assert list((tmp_path / "merged").iterdir()) == []
    moe_dir, moe_adapter = bases["moe_per_expert_sharded"]
    prefixed = HFAdapter({}, moe_adapter.experts, 4, 8.0, False, "model.language_model.", "x")
    with pytest.raises(ExportError, match=r"layers\.0\.mlp\.experts\.gate_up_proj .*per-expert"):
        export_merged(prefixed, moe_dir, tmp_path / "merged2")


def test_export_hf_on_two_ranks(bases: dict, tmp_path: Path) -> None:
    """The barrier protocol with two ranks as threads: the same merged files as one rank."""
    base_dir, adapter = bases["moe_vl_packed_mtp_sharded"]
    barrier = threading.Barrier(2, timeout=60)
    results: dict[int, object] = {}

    def run(rank: int) -> None:
        try:
            results[rank] = export_hf(
                adapter,
                base_dir,
                tmp_path / "two",
                step=3,
                rank=rank,
                world_size=2,
                barrier=barrier.wait,
                progress=False,
            )
        except Exception as error:
            results[rank] = error

    threads = [threading.Thread(target=run, args=(rank,)) for rank in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    export_hf(adapter, base_dir, tmp_path / "one", step=3, progress=False)

    assert results[1] == {}
    assert isinstance(results[0], dict) and results[0]["step"] == 3
    assert tree_bytes(tmp_path / "two" / MERGED_DIR) == tree_bytes(tmp_path / "one" / MERGED_DIR)
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(
        [ADAPTER_DIR, MANIFEST_FILE, MERGED_DIR]
    )


def test_unwritable_export_directory(bases: dict, tmp_path: Path) -> None:
    base_dir, adapter = bases["dense"]
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("x")
    with pytest.raises(ExportError, match="is not a directory"):
        export_hf(adapter, base_dir, blocker / "checkpoint", step=1, progress=False)
    with pytest.raises(ExportError, match=r"(?i)not a directory"):
        export_hf(
            adapter, base_dir, blocker / "checkpoint", step=1, write_merged=False, progress=False
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["not_a_dir"]


def _fail_disk_full(*args: object, **kwargs: object) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("target", ["merged", "adapter"])
def test_disk_full_keeps_previous_export(
    target: str, bases: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base_dir, adapter = bases["moe_vl_packed_mtp"]
    save_dir = tmp_path / "checkpoint"
    export_hf(adapter, base_dir, save_dir, step=1, progress=False)
    before = snapshot(save_dir)

    if target == "merged":
        monkeypatch.setattr(merged_module, "copy_range", _fail_disk_full)
    else:
        monkeypatch.setattr(peft_adapter_module, "_pwrite", _fail_disk_full)
    with pytest.raises(ExportError, match="disk full"):
        export_hf(adapter, base_dir, save_dir, step=2, progress=False)

    assert snapshot(save_dir) == before


def snapshot(save_dir: Path) -> dict[str, bytes]:
    """Every entry under `save_dir` (hidden temporaries included) with its bytes."""
    return {
        path.relative_to(save_dir).as_posix(): path.read_bytes() if path.is_file() else b"<dir>"
        for path in sorted(save_dir.rglob("*"))
    }


KILLED_EXPORT = textwrap.dedent(
    """
    import os, signal, sys, torch
    import lora_trainer.export.tiled_merge as tiled_merge
    from lora_trainer.export.hf_export import export_hf
    from tests.export_fixtures import random_adapter
    from tests.checkpoints import build_hf_model

    written = tiled_merge.write_at
    def write_then_die(fd, view, offset):
        written(fd, view, offset)
        os.kill(os.getpid(), signal.SIGKILL)
    tiled_merge.write_at = write_then_die
    adapter = random_adapter(build_hf_model(sys.argv[3]), sys.argv[3])
    export_hf(adapter, sys.argv[1], sys.argv[2], step=2, progress=False)
    """
)


def test_killed_export_keeps_previous_export(bases: dict, tmp_path: Path) -> None:
    """A process killed in the middle of writing merged shards leaves the previous export as it was;
    the next export removes what the killed one left behind."""
    base_dir, adapter = bases["moe_vl_packed_mtp"]
    save_dir = tmp_path / "checkpoint"
    export_hf(adapter, base_dir, save_dir, step=1, progress=False)
    before = {name: data for name, data in snapshot(save_dir).items() if not name.startswith(".")}

    env = dict(os.environ, TORCHDYNAMO_DISABLE="1", PYTHONPATH=str(REPO))
    process = subprocess.run(
        [sys.executable, "-c", KILLED_EXPORT, str(base_dir), str(save_dir), KIND_MOE_VL],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert process.returncode == -signal.SIGKILL, process.stderr
    after = snapshot(save_dir)
    assert {name: data for name, data in after.items() if not name.startswith(".")} == before
    assert any(name.startswith(STAGING_DIR) for name in after)

    export_hf(adapter, base_dir, save_dir, step=3, progress=False)
    assert sorted(p.name for p in save_dir.iterdir()) == sorted(
        [ADAPTER_DIR, MANIFEST_FILE, MERGED_DIR]
    )
    assert tree_bytes(save_dir / MERGED_DIR) == {
        k.split("/", 1)[1]: v for k, v in before.items() if k.startswith(f"{MERGED_DIR}/")
    }


def bf16_base(directory: Path) -> tuple[dict[str, torch.Tensor], HFAdapter]:
    """A bf16 checkpoint with awkward row counts (a packed expert tensor, 2D weights of odd row
    counts, a one-row weight, untouched tensors between them) and an adapter on its weights."""
    generator = torch.Generator().manual_seed(5)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator)

    base = {
        "model.embed_tokens.weight": randn(50, 64).bfloat16(),
        "model.layers.0.mlp.experts.gate_up_proj": randn(3, 38, 64).bfloat16(),
        "model.layers.0.norm.weight": randn(64).bfloat16(),
        "model.layers.0.self_attn.q_proj.weight": randn(101, 64).bfloat16(),
        "model.layers.0.self_attn.o_proj.weight": randn(64, 96).bfloat16(),
        "model.layers.0.mlp.shared_expert_gate.weight": randn(1, 64).bfloat16(),
    }
    directory.mkdir()
    save_file(base, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text("{}\n")
    rank = 4
    linears = {
        name.removeprefix("model.").removesuffix(".weight"): HFLoraWeights(
            randn(rank, shape[1]), 0.1 * randn(shape[0], rank)
        )
        for name, shape in (
            ("model.layers.0.self_attn.q_proj.weight", (101, 64)),
            ("model.layers.0.self_attn.o_proj.weight", (64, 96)),
            ("model.layers.0.mlp.shared_expert_gate.weight", (1, 64)),
        )
    }
    experts = {
        "layers.0.mlp.experts.gate_up_proj": HFExpertLoraWeights(
            randn(3, rank, 64), 0.1 * randn(3, 38, rank)
        )
    }
    return base, HFAdapter(linears, experts, rank, 3.0, False, "model.", "bf16")


def reference_merge(base: dict[str, torch.Tensor], adapter: HFAdapter) -> dict[str, torch.Tensor]:
    """Each adapted tensor as torch ops compute it on the whole matrix: the base in fp32 plus
    scale * (b @ a) by `addmm`, rounded once to the stored dtype."""
    factors = {
        **{f"model.{m}.weight": (w.a[None], w.b[None]) for m, w in adapter.linears.items()},
        **{f"model.{m}": (w.a, w.b) for m, w in adapter.experts.items()},
    }
    merged = dict(base)
    for name, (a, b) in factors.items():
        tensor = base[name].reshape(a.shape[0], -1, a.shape[-1])
        merged[name] = (
            torch.stack(
                [
                    torch.addmm(tensor[m].float(), b[m].float(), a[m].float(), alpha=adapter.scale)
                    for m in range(a.shape[0])
                ]
            )
            .to(tensor.dtype)
            .reshape(base[name].shape)
        )
    return merged


@pytest.mark.parametrize(
    ("tile_rows", "piece_tiles", "workers"), [(None, None, None), (3, 1, 2), (4, 3, 3), (7, 2, 1)]
)
def test_bf16_merge_equals_reference_bit_for_bit(
    tile_rows: int | None,
    piece_tiles: int | None,
    workers: int | None,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The default tiling, and tiles of a few rows (each tile of 64 or 96 columns), one to three
    tiles a piece, on one to three threads: every tiling gives the whole-matrix result."""
    if tile_rows is not None:
        monkeypatch.setattr(tiled_merge_module, "TILE_BYTES", tile_rows * 4 * 64)
        monkeypatch.setattr(tiled_merge_module, "PIECE_BYTES", piece_tiles * tile_rows * 2 * 64)
        monkeypatch.setattr(merged_module, "MERGE_WORKERS", workers)
    base, adapter = bf16_base(tmp_path / "base")
    export_merged(adapter, tmp_path / "base", tmp_path / "merged")
    merged = read_all(tmp_path / "merged")
    expected = reference_merge(base, adapter)
    assert set(merged) == set(expected)
    for name, tensor in expected.items():
        assert merged[name].dtype == torch.bfloat16, name
        assert torch.equal(merged[name], tensor), name
    assert not torch.equal(
        merged["model.layers.0.self_attn.q_proj.weight"],
        base["model.layers.0.self_attn.q_proj.weight"],
    )


def test_base_truncated_during_the_export_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A base file cut short after its header was read ends the export with an ExportError that
    says so (not a SIGBUS), and leaves no merged file behind."""
    adapter = bf16_base(tmp_path / "base")[1]
    shard_layouts = merged_module.shard_layouts

    def layouts_then_truncate(base_dir: Path):  # type: ignore[no-untyped-def]
        layouts = shard_layouts(base_dir)
        for path in layouts[1]:
            os.truncate(path, path.stat().st_size // 2)
        return layouts

    monkeypatch.setattr(merged_module, "shard_layouts", layouts_then_truncate)
    with pytest.raises(ExportError, match="bytes early"):
        export_merged(adapter, tmp_path / "base", tmp_path / "merged")
    assert list((tmp_path / "merged").iterdir()) == []
