"""CheckpointReader and ShardedCheckpointWriter on small single-file, sharded and HF checkpoints."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import safetensors.torch
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from lora_trainer.bridge.safetensors_io import (
    INDEX_FILE,
    SINGLE_FILE,
    CheckpointReader,
    ShardedCheckpointWriter,
    shard_file_names,
)
from lora_trainer.errors import CheckpointError, ExportError
from tests.checkpoints import KIND_DENSE, build_hf_model, save_checkpoint

SHARD_1 = "model-00001-of-00002.safetensors"
SHARD_2 = "model-00002-of-00002.safetensors"


def _tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "layers.0.weight": torch.randn(6, 8, generator=generator),
        "layers.0.bias": torch.randn(8, generator=generator).to(torch.bfloat16),
        "layers.1.weight": torch.randn(10, 7, generator=generator).to(torch.bfloat16),
        "experts.gate_up_proj": torch.randn(4, 6, 5, generator=generator).to(torch.bfloat16),
        "positions": torch.arange(12, dtype=torch.int64),
        "scale": torch.tensor(0.5),
    }


def _save_single(directory: Path, tensors: dict[str, torch.Tensor]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / SINGLE_FILE), metadata={"format": "pt"})
    return directory


def _save_sharded(directory: Path, tensors: dict[str, torch.Tensor]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    names = sorted(tensors)
    halves = {SHARD_1: names[: len(names) // 2], SHARD_2: names[len(names) // 2 :]}
    weight_map = {}
    for file, shard_names in halves.items():
        shard = {n: tensors[n] for n in shard_names}
        save_file(shard, str(directory / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard_names, file))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (directory / INDEX_FILE).write_text(json.dumps(index))
    return directory


@pytest.fixture(params=["single", "sharded"])
def checkpoint(
    request: pytest.FixtureRequest, tmp_path: Path
) -> tuple[Path, dict[str, torch.Tensor]]:
    tensors = _tensors()
    save = _save_single if request.param == "single" else _save_sharded
    return save(tmp_path / "ckpt", tensors), tensors


def _owns_memory(tensor: torch.Tensor) -> bool:
    return (
        tensor.is_contiguous()
        and tensor.storage_offset() == 0
        and tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
    )


def test_reader_metadata(checkpoint: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, tensors = checkpoint
    with CheckpointReader(path) as reader:
        assert sorted(reader.names()) == sorted(tensors)
        assert "layers.0.weight" in reader and "nope" not in reader
        for name, tensor in tensors.items():
            assert reader.shape(name) == tuple(tensor.shape)
            assert reader.dtype(name) == tensor.dtype
            assert reader.file_of(name).is_file()
            assert name in load_file(str(reader.file_of(name)))


def test_read_whole_tensors_exact(checkpoint: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, tensors = checkpoint
    with CheckpointReader(path) as reader:
        for name, tensor in tensors.items():
            out = reader.read(name)
            assert out.dtype == tensor.dtype and torch.equal(out, tensor)
            assert _owns_memory(out)


@pytest.mark.parametrize(
    ("name", "start", "stop", "dim"),
    [
        ("layers.0.weight", 2, 5, 0),
        ("layers.0.weight", 3, 8, 1),
        ("layers.1.weight", 0, 10, 0),
        ("layers.1.weight", 1, 4, -1),
        ("layers.0.bias", 4, 8, 0),
        ("experts.gate_up_proj", 1, 3, 0),
        ("experts.gate_up_proj", 2, 6, 1),
        ("experts.gate_up_proj", 0, 2, 2),
        ("positions", 5, 5, 0),
    ],
)
def test_read_rows_is_the_slice(
    checkpoint: tuple[Path, dict[str, torch.Tensor]], name: str, start: int, stop: int, dim: int
) -> None:
    path, tensors = checkpoint
    with CheckpointReader(path) as reader:
        out = reader.read_rows(name, start, stop, dim=dim)
    expected = tensors[name].narrow(dim, start, stop - start)
    assert out.dtype == expected.dtype and torch.equal(out, expected)
    assert _owns_memory(out)


def test_read_blocks_concatenates_slices(checkpoint: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, tensors = checkpoint
    weight = tensors["layers.1.weight"]
    experts = tensors["experts.gate_up_proj"]
    with CheckpointReader(path) as reader:
        rows = reader.read_blocks("layers.1.weight", [(0, 2), (5, 8)])
        cols = reader.read_blocks("experts.gate_up_proj", [(0, 1), (3, 5)], dim=-1)
        single = reader.read_blocks("layers.1.weight", [(4, 6)])
        empty = reader.read_blocks("experts.gate_up_proj", [], dim=1)
    assert torch.equal(rows, torch.cat([weight[0:2], weight[5:8]]))
    assert torch.equal(cols, torch.cat([experts[..., 0:1], experts[..., 3:5]], dim=-1))
    assert torch.equal(single, weight[4:6]) and _owns_memory(single)
    assert empty.shape == (4, 0, 5) and empty.dtype == torch.bfloat16
    assert rows.dtype == torch.bfloat16 and _owns_memory(rows) and _owns_memory(cols)


def test_reads_survive_close_and_reopen(checkpoint: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, tensors = checkpoint
    reader = CheckpointReader(path)
    kept = reader.read_rows("layers.0.weight", 1, 3)
    reader.close()
    assert torch.equal(kept, tensors["layers.0.weight"][1:3])
    assert torch.equal(reader.read("layers.1.weight"), tensors["layers.1.weight"])
    reader.close()


def test_real_transformers_sharded_checkpoint(tmp_path: Path) -> None:
    path = save_checkpoint(
        build_hf_model(KIND_DENSE), tmp_path / "hf", dtype=torch.bfloat16, max_shard_size="60KB"
    )
    index = json.loads((path / INDEX_FILE).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and not (path / SINGLE_FILE).exists()
    on_disk = {name: t for shard in shards for name, t in load_file(str(path / shard)).items()}
    with CheckpointReader(path) as reader:
        assert sorted(reader.names()) == sorted(on_disk)
        for name, tensor in on_disk.items():
            assert reader.file_of(name).name == index["weight_map"][name]
            assert reader.dtype(name) == torch.bfloat16
            assert torch.equal(reader.read(name), tensor)
            half = tensor.shape[0] // 2
            assert torch.equal(reader.read_rows(name, half, tensor.shape[0]), tensor[half:])
            if tensor.ndim == 2:
                assert torch.equal(
                    reader.read_blocks(name, [(0, 1), (half, half + 1)]),
                    torch.cat([tensor[0:1], tensor[half : half + 1]]),
                )


# --- reader errors -------------------------------------------------------------------------------


def test_error_no_safetensors(tmp_path: Path) -> None:
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"no model\.safetensors") as info:
        CheckpointReader(tmp_path)
    assert str(tmp_path) in str(info.value) and "pytorch_model.bin" in str(info.value)


def test_error_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        CheckpointReader(tmp_path / "absent")


def test_error_index_not_json(tmp_path: Path) -> None:
    path = _save_sharded(tmp_path / "ckpt", _tensors())
    (path / INDEX_FILE).write_text('{"weight_map": {"a": ')
    with pytest.raises(CheckpointError, match="not valid JSON") as info:
        CheckpointReader(path)
    assert INDEX_FILE in str(info.value)


def test_error_index_without_weight_map(tmp_path: Path) -> None:
    path = _save_sharded(tmp_path / "ckpt", _tensors())
    (path / INDEX_FILE).write_text('{"metadata": {}}')
    with pytest.raises(CheckpointError, match="weight_map"):
        CheckpointReader(path)


def test_error_index_names_missing_shard(tmp_path: Path) -> None:
    path = _save_sharded(tmp_path / "ckpt", _tensors())
    (path / SHARD_2).unlink()
    with pytest.raises(CheckpointError, match="missing") as info:
        CheckpointReader(path)
    assert SHARD_2 in str(info.value) and SHARD_1 not in str(info.value)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_error_corrupt_shard_names_the_file(tmp_path: Path, damage: str) -> None:
    path = _save_sharded(tmp_path / "ckpt", _tensors())
    shard = path / SHARD_2
    data = shard.read_bytes()
    damaged = {"truncated": data[: len(data) - 16], "garbage": b"\xff" * 64, "empty": b""}
    shard.write_bytes(damaged[damage])
    weight_map = json.loads((path / INDEX_FILE).read_text())["weight_map"]
    name = next(n for n, f in weight_map.items() if f == SHARD_2)
    with (
        CheckpointReader(path) as reader,
        pytest.raises(CheckpointError, match="not a valid safetensors file") as info,
    ):
        reader.read(name)
    assert SHARD_2 in str(info.value)


def test_error_corrupt_single_file(tmp_path: Path) -> None:
    path = _save_single(tmp_path / "ckpt", _tensors())
    (path / SINGLE_FILE).write_bytes((path / SINGLE_FILE).read_bytes()[:40])
    with pytest.raises(CheckpointError, match=SINGLE_FILE):
        CheckpointReader(path)


def test_error_unknown_name_suggests_close_names(
    checkpoint: tuple[Path, dict[str, torch.Tensor]],
) -> None:
    path, _ = checkpoint
    with CheckpointReader(path) as reader:
        for call in (reader.read, reader.shape, reader.dtype, reader.file_of):
            with pytest.raises(CheckpointError) as info:
                call("layers.0.weigth")
            message = str(info.value)
            assert "'layers.0.weigth'" in message and str(path) in message
            assert "layers.0.weight" in message.split("close names:")[1]
        with pytest.raises(CheckpointError, match="'zzz'"):
            reader.read_rows("zzz", 0, 1)


def test_error_index_points_to_wrong_shard(tmp_path: Path) -> None:
    path = _save_sharded(tmp_path / "ckpt", _tensors())
    index = json.loads((path / INDEX_FILE).read_text())
    index["weight_map"]["ghost"] = SHARD_1
    (path / INDEX_FILE).write_text(json.dumps(index))
    with (
        CheckpointReader(path) as reader,
        pytest.raises(CheckpointError, match="does not contain") as info,
    ):
        reader.read("ghost")
    assert SHARD_1 in str(info.value)


@pytest.mark.parametrize(
    ("start", "stop", "dim", "match"),
    [
        (0, 7, 0, r"\[0:7\].*size 6"),
        (4, 2, 0, r"\[4:2\]"),
        (-1, 2, 0, r"\[-1:2\]"),
        (0, 9, 1, "size 8"),
        (0, 1, 2, "has 2 dims"),
        (0, 1, -3, "has 2 dims"),
    ],
)
def test_error_slice_out_of_range(
    checkpoint: tuple[Path, dict[str, torch.Tensor]], start: int, stop: int, dim: int, match: str
) -> None:
    path, _ = checkpoint
    with CheckpointReader(path) as reader:
        with pytest.raises(CheckpointError, match=match) as info:
            reader.read_rows("layers.0.weight", start, stop, dim=dim)
        assert "'layers.0.weight'" in str(info.value)
        with pytest.raises(CheckpointError, match=match):
            reader.read_blocks("layers.0.weight", [(0, 1), (start, stop)], dim=dim)


# --- writer --------------------------------------------------------------------------------------


def test_writer_round_trip_loads_in_transformers(tmp_path: Path) -> None:
    import transformers

    model = build_hf_model(KIND_DENSE)
    state = model.state_dict()
    names = list(state)
    out = tmp_path / "export"
    writer = ShardedCheckpointWriter(out)
    first, second = shard_file_names(2)
    writer.write_shard(first, {n: state[n] for n in names[: len(names) // 2]})
    writer.write_shard(second, {n: state[n] for n in names[len(names) // 2 :]})
    index_path = writer.finish()
    model.config.save_pretrained(out)

    index = json.loads(index_path.read_text())
    total_size = sum(t.numel() * t.element_size() for t in state.values())
    assert index["metadata"]["total_size"] == total_size
    assert set(index["weight_map"]) == set(names)
    assert set(index["weight_map"].values()) == {first, second}
    for shard in (first, second):
        with safe_open(str(out / shard), framework="pt") as handle:
            assert handle.metadata() == {"format": "pt"}

    loaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    loaded_state = loaded.state_dict()
    assert sorted(loaded_state) == sorted(state)
    for name, tensor in state.items():
        assert torch.equal(loaded_state[name], tensor), name


def test_writer_single_file_has_no_index(tmp_path: Path) -> None:
    tensors = _tensors()
    writer = ShardedCheckpointWriter(tmp_path / "out")
    writer.write_shard(SINGLE_FILE, tensors)
    assert writer.finish() is None
    assert not (tmp_path / "out" / INDEX_FILE).exists()
    with CheckpointReader(tmp_path / "out") as reader:
        assert all(torch.equal(reader.read(n), t) for n, t in tensors.items())


def test_writer_index_order_and_shared_storage(tmp_path: Path) -> None:
    fused = torch.arange(12.0).reshape(4, 3)
    gate, up = fused.chunk(2)
    writer = ShardedCheckpointWriter(tmp_path / "out")
    writer.write_shard(SHARD_1, {"up": up, "gate": gate, "tied": fused, "tied_too": fused})
    writer.write_shard(SHARD_2, {"alpha": torch.ones(2, dtype=torch.bfloat16)})
    writer.finish(weight_map_order=["tied", "alpha", "gate", "up", "tied_too"])
    index = json.loads((tmp_path / "out" / INDEX_FILE).read_text())
    assert list(index["weight_map"]) == ["tied", "alpha", "gate", "up", "tied_too"]
    assert index["metadata"]["total_size"] == 4 * (6 + 6 + 12 + 12) + 2 * 2
    with CheckpointReader(tmp_path / "out") as reader:
        assert torch.equal(reader.read("gate"), gate) and torch.equal(reader.read("up"), up)
        assert torch.equal(reader.read("tied_too"), fused)


def test_writer_rejects_misuse(tmp_path: Path) -> None:
    writer = ShardedCheckpointWriter(tmp_path / "out")
    with pytest.raises(ValueError, match="bare"):
        writer.write_shard("sub/x.safetensors", {"a": torch.ones(1)})
    writer.write_shard(SINGLE_FILE, {"a": torch.ones(1)})
    with pytest.raises(ValueError, match="already written"):
        writer.write_shard(SHARD_2, {"a": torch.ones(1)})
    writer.write_shard(SHARD_2, {"b": torch.ones(1)})
    with pytest.raises(ValueError, match=SINGLE_FILE):
        writer.finish()
    other = ShardedCheckpointWriter(tmp_path / "other")
    with pytest.raises(ValueError, match="no tensors"):
        other.finish()
    with pytest.raises(ValueError, match="no tensors"):
        other.write_shard(SHARD_1, {})
    other.write_shard(SHARD_1, {"a": torch.ones(1), "b": torch.ones(1)})
    with pytest.raises(ValueError, match="every written tensor"):
        other.finish(weight_map_order=["a", "a"])


@pytest.mark.parametrize(
    ("error", "match"),
    [
        (OSError(errno.ENOSPC, "No space left on device"), "disk full while writing .*free space"),
        (
            SafetensorError("I/O error: No space left on device (os error 28)"),
            "disk full while writing",
        ),
        (PermissionError(errno.EACCES, "Permission denied"), "no permission"),
        (OSError(errno.EIO, "Input/output error"), "failed writing"),
    ],
)
def test_writer_write_failure_is_export_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: Exception, match: str
) -> None:
    writer = ShardedCheckpointWriter(tmp_path / "out")
    writer.write_shard(SHARD_1, {"a": torch.ones(3)})

    def failing_save(tensors: dict, filename: str, metadata: dict | None = None) -> None:
        Path(filename).write_bytes(b"partial")
        raise error

    monkeypatch.setattr(safetensors.torch, "save_file", failing_save)
    with pytest.raises(ExportError, match=match) as info:
        writer.write_shard(SHARD_2, {"b": torch.ones(3)})
    assert SHARD_2 in str(info.value)
    assert not (tmp_path / "out" / SHARD_2).exists()
    assert "b" not in writer.weight_map


def test_writer_unusable_directory(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ExportError, match="file/out"):
        ShardedCheckpointWriter(blocker / "out")
