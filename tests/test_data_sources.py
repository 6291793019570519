"""Data sources (JSONL, JSON, Parquet, shard folders, datasets folders), mixtures, the token cache
and bad input, through `SFTDataModule` and `lora_trainer.data.pipeline`."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import datasets
import pytest
import torch

from lora_trainer.data import packing, pipeline, sources
from lora_trainer.data.datamodule import SFTDataModule
from lora_trainer.data.formats import Columns
from lora_trainer.data.packing import PackedDataset, TokenizedRows, greedy_pack
from lora_trainer.data.pipeline import SourceSpec, parse_sources, tokenize_source
from lora_trainer.data.tokenize import TokenizeSettings
from lora_trainer.demo.tokenizer import build_tiny_tokenizer, tiny_sft_records
from lora_trainer.errors import CheckpointError, DataError

TOOLS = json.dumps(
    [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
)


def rows(n: int = 60) -> list[dict]:
    """Chat rows (some with tool calls, arguments as objects with different keys and as JSON
    strings, and reasoning), ShareGPT rows and prompt/completion rows."""
    out: list[dict] = []
    for i, record in enumerate(tiny_sft_records(n)):
        if i % 5 == 1:
            args = {"city": f"C{i}", "days": i} if i % 2 else {"city": f"C{i}"}
            record["messages"][-1] = {
                "role": "assistant",
                "content": None,
                "reasoning_content": f"call {i}",
                "tool_calls": [
                    {"type": "function", "function": {"name": "get_weather", "arguments": args}}
                ],
            }
            record["messages"] += [
                {"role": "tool", "content": f"sunny {i}"},
                {"role": "assistant", "content": "It is sunny."},
            ]
            record["tools"] = TOOLS
        elif i % 5 == 2:
            call = {
                "type": "function",
                "function": {"name": "get_weather", "arguments": {"city": "X"}},
            }
            record["messages"][-1] = {
                "role": "assistant",
                "content": "Checking.",
                "tool_calls": [call],
            }
            record["messages"].append({"role": "tool", "content": "rain"})
            record["messages"].append(
                {"role": "assistant", "content": "<think>\nok\n</think>\n\nRain."}
            )
        elif i % 5 == 3:
            turns = [
                {
                    "from": {"user": "human", "assistant": "gpt"}.get(m["role"], m["role"]),
                    "value": m["content"],
                }
                for m in record.pop("messages")
            ]
            record["conversations"] = turns
        elif i % 5 == 4:
            messages = record.pop("messages")
            record["prompt"], record["completion"] = (
                messages[-2]["content"],
                " " + messages[-1]["content"],
            )
        out.append(record)
    return out


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tiny_tokenizer"))


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def arrow(records: list[dict]) -> datasets.Dataset:
    """`records` as one Arrow table (columns a row lacks are null)."""
    keys = list(dict.fromkeys(key for record in records for key in record))
    return datasets.Dataset.from_list(
        [{key: record.get(key) for key in keys} for record in records]
    )


def write_formats(root: Path, records: list[dict]) -> dict[str, Path]:
    """The same rows as every supported source kind."""
    table = arrow(records)
    paths = {
        "jsonl": write_jsonl(root / "train.jsonl", records),
        "json": root / "train.json",
        "parquet": root / "train.parquet",
        "parquet_shards": root / "parquet_shards",
        "jsonl_shards": root / "jsonl_shards",
        "saved": root / "saved",
    }
    paths["json"].write_text(json.dumps(records), encoding="utf-8")
    table.to_parquet(str(paths["parquet"]))
    paths["parquet_shards"].mkdir()
    for k, (a, b) in enumerate([(0, 25), (25, 26), (26, len(records))]):
        table.select(range(a, b)).to_parquet(str(paths["parquet_shards"] / f"part-{k:05d}.parquet"))
    write_jsonl(paths["jsonl_shards"] / "a.jsonl", records[:30])
    write_jsonl(paths["jsonl_shards"] / "b.jsonl", records[30:])
    table.save_to_disk(str(paths["saved"]))
    return paths


def module(path: object, tokenizer_dir: Path, cache: Path, **kwargs: object) -> SFTDataModule:
    args: dict[str, object] = {
        "model_dir": tokenizer_dir,
        "max_seq_len": 160,
        "micro_batch_size": 2,
        "global_batch_size": 4,
        "cache_dir": cache,
        "seed": 3,
    }
    args.update(kwargs)
    return SFTDataModule(path, **args)  # type: ignore[arg-type]


def all_rows(dm: SFTDataModule) -> list[tuple]:
    assert dm.train_dataset is not None
    return [
        (r.input_ids, r.labels, r.position_ids, r.cu_seqlens)
        for r in (dm.train_dataset[i] for i in range(len(dm.train_dataset)))
    ]


def test_same_rows_in_every_format_give_identical_batches(
    tokenizer_dir: Path, tmp_path: Path
) -> None:
    records = rows()
    paths = write_formats(tmp_path, records)
    reference = module(paths["jsonl"], tokenizer_dir, tmp_path / "cache")
    reference.setup()
    expected_rows = all_rows(reference)
    expected_batches = list(reference.train_dataloader())
    assert len(expected_batches) >= 5
    assert sum(r[1].count(-100) < len(r[1]) for r in expected_rows) == len(expected_rows)
    for kind, path in paths.items():
        dm = module(path, tokenizer_dir, tmp_path / "cache")
        dm.setup()
        assert all_rows(dm) == expected_rows, kind
        for a, b in zip(expected_batches, dm.train_dataloader(), strict=True):
            assert all(torch.equal(a[key], b[key]) for key in a), kind
    caches = [p for p in (tmp_path / "cache").glob("tokenized-*") if p.is_dir()]
    assert len(caches) == len(paths)


def test_tokens_are_cached_and_the_key_follows_data_and_settings(
    tokenizer_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", rows(40))
    first = module(path, tokenizer_dir, tmp_path / "cache")
    first.setup()
    built = sorted(p.name for p in (tmp_path / "cache").glob("tokenized-*") if p.is_dir())
    assert len(built) == 1 and not list((tmp_path / "cache").glob(".tokenized-*"))

    def no_build(*args: object, **kwargs: object) -> None:
        raise AssertionError("tokenized again")

    monkeypatch.setattr(pipeline, "_build", no_build)
    again = module(path, tokenizer_dir, tmp_path / "cache")
    again.setup()
    assert all_rows(again) == all_rows(first)
    for change in ({"max_seq_len": 96}, {"train_on": "last_assistant"}, {"enable_thinking": False}):
        with pytest.raises(AssertionError, match="tokenized again"):
            module(path, tokenizer_dir, tmp_path / "cache", **change).setup()
    os.utime(path, ns=(1, 1))
    with pytest.raises(AssertionError, match="tokenized again"):
        module(path, tokenizer_dir, tmp_path / "cache").setup()


def test_mixture_weights_counts_seed_and_resume(tokenizer_dir: Path, tmp_path: Path) -> None:
    a = write_jsonl(tmp_path / "a.jsonl", rows(40)[:20])
    b = write_jsonl(tmp_path / "b.jsonl", tiny_sft_records(50)[40:])
    spec = [{"path": str(a), "weight": 2}, {"path": str(b), "samples": 25}]
    dm = module(spec, tokenizer_dir, tmp_path / "cache", pack=False, global_batch_size=8)
    mixed = dm.samples("data.train_path")
    alone_a = module(a, tokenizer_dir, tmp_path / "cache").samples("data.train_path")
    alone_b = module(b, tokenizer_dir, tmp_path / "cache").samples("data.train_path")
    assert len(mixed) == 2 * len(alone_a) + 25 and len(alone_b) == 10

    def counts(dataset: datasets.Dataset) -> dict[tuple, int]:
        out: dict[tuple, int] = {}
        for ids in dataset["input_ids"]:
            out[tuple(ids)] = out.get(tuple(ids), 0) + 1
        return out

    got = counts(mixed)
    for ids in counts(alone_a):
        assert got[ids] == 2
    assert sum(got[ids] for ids in counts(alone_b)) == 25
    assert all(got[ids] in (2, 3) for ids in counts(alone_b))
    assert list(mixed["input_ids"]) == list(
        module(spec, tokenizer_dir, tmp_path / "cache").samples("data.train_path")["input_ids"]
    )
    other_seed = module(spec, tokenizer_dir, tmp_path / "cache", seed=4).samples("data.train_path")
    assert list(other_seed["input_ids"]) != list(mixed["input_ids"])

    dm.setup()
    loader = iter(dm.train_dataloader())
    head = [next(loader) for _ in range(3)]
    resumed = module(spec, tokenizer_dir, tmp_path / "cache", pack=False, global_batch_size=8)
    resumed.load_state_dict(dm.state_dict())
    resumed.setup()
    for x, y in zip(loader, resumed.train_dataloader(), strict=True):
        assert all(torch.equal(x[key], y[key]) for key in x)
    assert len(head) == 3


def test_source_spec_errors() -> None:
    assert parse_sources("x.jsonl", "k") == (SourceSpec(Path("x.jsonl").absolute()),)
    assert parse_sources(["x.jsonl", {"path": "y.parquet", "samples": 3}], "k") == (
        SourceSpec(Path("x.jsonl").absolute(), weight=1.0),
        SourceSpec(Path("y.parquet").absolute(), samples=3),
    )
    for value, what in [
        ([], "non-empty list"),
        ([{"path": "a", "weight": 1, "samples": 2}], r"k\[0\] has both weight and samples"),
        ([{"path": "a", "weight": -1}], r"k\[0\].weight=-1 must be a positive number"),
        ([{"path": "a", "share": 1}], r"k\[0\] has unknown key\(s\) share"),
        ([{"weight": 1}], r"k\[0\] must be a path"),
    ]:
        with pytest.raises(DataError, match=what):
            parse_sources(value, "k")


def tokenize(path: Path, tokenizer_dir: Path, cache: Path, **settings: object) -> tuple:
    args: dict[str, object] = {"max_seq_len": 160, **settings}
    return tokenize_source(
        SourceSpec(path),
        model_dir=tokenizer_dir,
        settings=TokenizeSettings(**args),  # type: ignore[arg-type]
        columns=Columns(),
        cache_dir=cache,
        key="data.train_path",
    )


def test_bad_rows_name_source_row_and_field(tokenizer_dir: Path, tmp_path: Path) -> None:
    good = rows(3)
    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_text(
        json.dumps(good[0]) + "\n\n" + '{"messages": [{"role": "user", "content": 5}]}\n'
    )
    with pytest.raises(
        DataError, match=rf"data\.train_path: {jsonl}:3: messages\[0\]\.content must be a string"
    ):
        tokenize(jsonl, tokenizer_dir, tmp_path / "cache")
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(good[0]) + "\n{oops\n")
    with pytest.raises(DataError, match=rf"{broken}:2: invalid JSON"):
        tokenize(broken, tokenizer_dir, tmp_path / "cache")
    shards = tmp_path / "shards"
    shards.mkdir()
    arrow(good[:2]).to_parquet(str(shards / "0.parquet"))
    arrow([good[0], {**good[0], "messages": [{"role": "user", "content": "x"}]}]).to_parquet(
        str(shards / "1.parquet")
    )
    with pytest.raises(
        DataError, match=rf"{shards / '1.parquet'} row 1: \"messages\" has no assistant turn"
    ):
        tokenize(shards, tokenizer_dir, tmp_path / "cache")
    images = write_jsonl(tmp_path / "images.jsonl", [good[0], {**good[0], "images": ["cat.png"]}])
    with pytest.raises(
        DataError, match=rf"{images}:2: has \"images\": image and video training is not supported"
    ):
        tokenize(images, tokenizer_dir, tmp_path / "cache")
    columns = write_jsonl(tmp_path / "columns.jsonl", [{"instruction": "a", "output": "b"}])
    with pytest.raises(
        DataError,
        match=r"columns.jsonl:1: is none of the supported formats: .*prompt.*data\.columns"
        r".*its columns: instruction, output",
    ):
        tokenize(columns, tokenizer_dir, tmp_path / "cache")


def test_unknown_missing_and_empty_sources(tokenizer_dir: Path, tmp_path: Path) -> None:
    csv = tmp_path / "train.csv"
    csv.write_text("a,b\n")
    with pytest.raises(
        DataError,
        match=r"data\.train_path: .*train\.csv: unknown data format '\.csv'; "
        r"use a \.jsonl/\.json file, a \.parquet file",
    ):
        tokenize(csv, tokenizer_dir, tmp_path / "cache")
    with pytest.raises(DataError, match=r"nope\.jsonl does not exist"):
        tokenize(tmp_path / "nope.jsonl", tokenizer_dir, tmp_path / "cache")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DataError, match="holds no data shards"):
        tokenize(tmp_path / "empty_dir", tokenizer_dir, tmp_path / "cache")
    good = write_jsonl(tmp_path / "good.jsonl", rows(8))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n \n")
    dm = module([str(good), str(empty)], tokenizer_dir, tmp_path / "cache")
    with pytest.raises(DataError, match=rf"data\.train_path: {empty} has no rows"):
        dm.samples("data.train_path")


def test_overlong_summary_line_truncate_and_error(
    tokenizer_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    records = tiny_sft_records(30)
    records[4] = {
        "messages": [
            {"role": "user", "content": "Say long."},
            {"role": "assistant", "content": "long " * 200},
        ]
    }
    records[9] = {"prompt": "word " * 200, "completion": " x"}
    path = write_jsonl(tmp_path / "train.jsonl", records)
    dm = module(path, tokenizer_dir, tmp_path / "cache", max_seq_len=96)
    with caplog.at_level(logging.WARNING):
        kept = dm.samples("data.train_path", announce=True)
    lines = [r.getMessage() for r in caplog.records if "data.max_seq_len=96" in r.getMessage()]
    assert len(lines) == 1
    assert f"{path}:5, {path}:10" in lines[0] and "dropped (data.overlong=drop)" in lines[0]
    assert len(kept) == 28 and "28 of 30 samples kept; 2 longer than" in lines[0]
    truncated = module(path, tokenizer_dir, tmp_path / "cache", max_seq_len=96, overlong="truncate")
    assert len(truncated.samples("data.train_path")) > len(kept)
    assert max(truncated.samples("data.train_path")["length"]) == 96
    with pytest.raises(
        DataError,
        match=rf"data\.train_path: 2 of 30 samples .* longer than data\.max_seq_len=96 tokens: "
        rf"{path}:5, {path}:10.*data\.overlong=drop",
    ):
        module(path, tokenizer_dir, tmp_path / "cache", max_seq_len=96, overlong="error").samples(
            "data.train_path"
        )


def test_parquet_shards_read_in_batches_equal_jsonl_and_locate_dropped_rows(
    tokenizer_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    records = tiny_sft_records(12)
    long = {
        "messages": [
            {"role": "user", "content": "Say long."},
            {"role": "assistant", "content": "long " * 200},
        ]
    }
    records[2] = records[9] = long
    jsonl = write_jsonl(tmp_path / "train.jsonl", records)
    shards = tmp_path / "shards"
    shards.mkdir()
    arrow(records[:5]).to_parquet(str(shards / "0.parquet"))
    arrow(records[5:]).to_parquet(str(shards / "1.parquet"))
    monkeypatch.setattr(sources, "PARQUET_BATCH_ROWS", 2)
    expected, _ = tokenize(jsonl, tokenizer_dir, tmp_path / "cache", max_seq_len=96)
    samples, summary = tokenize(shards, tokenizer_dir, tmp_path / "cache", max_seq_len=96)
    assert summary.rows == 12 and summary.counts == {"KEPT": 10, "OVERLONG": 2}
    assert summary.examples == {
        "OVERLONG": [f"{shards / '0.parquet'} row 2", f"{shards / '1.parquet'} row 4"]
    }
    assert samples["input_ids"][:] == expected["input_ids"][:]
    assert samples["loss_mask"][:] == expected["loss_mask"][:]
    monkeypatch.setattr(packing, "LENGTH_CHUNK", 3)
    rows_of_samples = TokenizedRows(samples)
    lengths = [len(sample) for sample in rows_of_samples[:]]
    packed = PackedDataset(rows_of_samples, 96, pad_id=0)
    assert packed.starts is not None
    assert packed.starts.tolist() == greedy_pack(lengths, 96).tolist()
    unpacked = PackedDataset(rows_of_samples, 96, pad_id=0, pack=False)
    assert unpacked.starts is None and len(unpacked) == 10
    assert unpacked[9].input_ids[: lengths[9]] == rows_of_samples[9].input_ids
    with pytest.raises(IndexError):
        unpacked[10]


def test_missing_chat_template_is_a_tokenizer_error(tokenizer_dir: Path, tmp_path: Path) -> None:
    bare = build_tiny_tokenizer(tmp_path / "bare")
    (bare / "chat_template.jinja").unlink()
    config = json.loads((bare / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    path = write_jsonl(tmp_path / "train.jsonl", rows(5))
    with pytest.raises(CheckpointError, match=rf"the tokenizer in {bare} has no chat template"):
        tokenize(path, bare, tmp_path / "cache")
    completions = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "a", "completion": "b"}])
    samples, summary = tokenize(completions, bare, tmp_path / "cache")
    assert len(samples) == 1 and summary.counts == {"KEPT": 1}


def test_parallel_tokenization_equals_serial_and_reports_bad_rows(
    tokenizer_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", rows(24))
    serial, _ = tokenize(path, tokenizer_dir, tmp_path / "serial")
    monkeypatch.setattr(pipeline, "ROWS_PER_PROCESS", 8)
    parallel, summary = tokenize_source(
        SourceSpec(path),
        model_dir=tokenizer_dir,
        settings=TokenizeSettings(160),
        columns=Columns(),
        cache_dir=tmp_path / "parallel",
        key="data.train_path",
        num_proc=2,
    )
    assert summary.rows == 24 and parallel["input_ids"][:] == serial["input_ids"][:]
    bad = write_jsonl(
        tmp_path / "bad.jsonl", [*rows(20), {"messages": [{"role": "user", "content": "x"}]}]
    )
    with pytest.raises(DataError, match=rf"{bad}:21: \"messages\" has no assistant turn"):
        tokenize_source(
            SourceSpec(bad),
            model_dir=tokenizer_dir,
            settings=TokenizeSettings(160),
            columns=Columns(),
            cache_dir=tmp_path / "parallel",
            key="data.train_path",
            num_proc=2,
        )


def test_training_on_jsonl_and_on_a_datasets_folder_gives_the_same_adapter(tmp_path: Path) -> None:
    """End to end, `python train.py` on 2 ranks: the same rows as JSONL and as a datasets folder."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    repo = Path(__file__).resolve().parent.parent
    records = rows(40)
    jsonl = write_jsonl(tmp_path / "train.jsonl", records)
    saved = tmp_path / "saved"
    arrow(records).save_to_disk(str(saved))
    adapters = []
    for name, path in (("jsonl", jsonl), ("saved", saved)):
        out = tmp_path / name
        env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
        env.update(TORCHDYNAMO_DISABLE="1", HOME=str(out))
        run = subprocess.run(
            [
                sys.executable,
                "train.py",
                f"output_dir={out}",
                f"data.train_path={path}",
                f"data.cache_dir={tmp_path / 'cache'}",
                "data.max_seq_len=128",
                "trainer.max_steps=2",
                "trainer.global_batch_size=4",
                "trainer.micro_batch_size=1",
                "checkpoint.every_n_steps=2",
                "export.merged=false",
                "logger=none",
                f"model.tiny_cache_dir={repo / '.cache' / 'tiny_models'}",
            ],
            cwd=repo,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
        adapters.append(
            load_file(
                str(out / "checkpoints" / "step-2" / "hf_adapter" / "adapter_model.safetensors")
            )
        )
    assert sorted(adapters[0]) == sorted(adapters[1])
    assert any(t.abs().sum() > 0 for k, t in adapters[0].items() if "lora_B" in k)
    for key, tensor in adapters[0].items():
        assert torch.equal(tensor, adapters[1][key]), key
