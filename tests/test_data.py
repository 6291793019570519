"""lora_trainer.data: JSONL, loss masks, packing, DP sampler, tiny tokenizer, datamodule."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from lora_trainer.data.datamodule import SFTDataModule
from lora_trainer.data.jsonl import (
    ChatSample,
    Message,
    PromptCompletionSample,
    read_jsonl,
)
from lora_trainer.data.packing import (
    IGNORE_INDEX,
    PackedDataset,
    build_row,
    collate,
    greedy_pack,
    sample_labels,
)
from lora_trainer.data.sampler import DPBatchSampler, eval_batches
from lora_trainer.data.tokenize import (
    TokenizedSample,
    drop_untrained,
    load_tokenizer,
    tokenize_chat,
    tokenize_prompt_completion,
    tokenize_sample,
    tokenize_samples,
    trained_token_ids,
)
from lora_trainer.data.tokenizer_builder import (
    TINY_SFT_PATH,
    build_tiny_tokenizer,
    tiny_sft_records,
    write_tiny_sft,
)
from lora_trainer.errors import DataError

GOOD_CHAT = {
    "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tiny_tokenizer"))


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir: Path):
    return load_tokenizer(tokenizer_dir)


@pytest.fixture(scope="module")
def tiny_samples(tokenizer) -> list[TokenizedSample]:
    return tokenize_samples(tokenizer, read_jsonl(TINY_SFT_PATH)[:120], max_seq_len=64)


# --------------------------------------------------------------------------------------- JSONL


BAD_LINES = [
    ('{"messages": [', "invalid JSON"),
    ("[1, 2]", "expected a JSON object, got list"),
    ('{"text": "hello"}', "neither a chat sample"),
    ('{"messages": [], "prompt": "a", "completion": "b"}', 'both "messages" and "prompt"'),
    ('{"messages": "hi"}', '"messages" must be a list'),
    ('{"messages": ["hi"]}', "messages[0] must be an object"),
    ('{"messages": [{"content": "hi"}]}', 'messages[0] needs a string "role"'),
    ('{"messages": [{"role": "robot", "content": "hi"}]}', "unknown role 'robot'"),
    ('{"messages": [{"role": "user", "content": 5}]}', 'messages[0] needs a string "content"'),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant turn"),
    ('{"messages": []}', "no assistant turn"),
    ('{"prompt": "2 + 2 ="}', 'has no "completion"'),
    ('{"prompt": "2 + 2 =", "completion": 4}', '"completion" must be a string'),
]


@pytest.mark.parametrize(("line", "what"), BAD_LINES)
def test_bad_jsonl_line_names_file_line_and_problem(tmp_path: Path, line: str, what: str) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(GOOD_CHAT) + "\n\n" + line + "\n" + json.dumps(GOOD_CHAT) + "\n")
    with pytest.raises(DataError) as info:
        read_jsonl(path)
    assert f"{path}:3:" in str(info.value)
    assert what in str(info.value)


def test_missing_empty_and_non_utf8_files(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DataError, match=r"nope\.jsonl"):
        read_jsonl(missing)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    with pytest.raises(DataError, match="has no samples"):
        read_jsonl(empty)
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(json.dumps(GOOD_CHAT).encode() + b"\n\xff\xfe\n")
    with pytest.raises(DataError, match=r"binary.jsonl:2: not valid UTF-8"):
        read_jsonl(binary)


def test_read_jsonl_both_formats(tmp_path: Path) -> None:
    path = tmp_path / "mixed.jsonl"
    chat = {
        "id": 7,
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "hi", "name": "bob"},
            {"role": "assistant", "content": "hello"},
        ],
    }
    path.write_text(
        json.dumps(chat) + "\n   \n" + json.dumps({"prompt": "1+1=", "completion": "2"}) + "\n"
    )
    samples = read_jsonl(path)
    assert samples == [
        ChatSample(
            (Message("system", "Be brief."), Message("user", "hi"), Message("assistant", "hello"))
        ),
        PromptCompletionSample("1+1=", "2"),
    ]
    assert [s.location for s in samples] == [f"{path}:1", f"{path}:3"]


# --------------------------------------------------------------------------- tiny data, tokenizer


def test_shipped_tiny_dataset_is_the_generated_one(tmp_path: Path) -> None:
    regenerated = write_tiny_sft(tmp_path / "tiny.jsonl")
    assert regenerated.read_bytes() == TINY_SFT_PATH.read_bytes()
    assert TINY_SFT_PATH.stat().st_size < 300_000
    samples = read_jsonl(TINY_SFT_PATH)
    assert len(samples) == len(tiny_sft_records()) >= 200
    assert all(isinstance(s, ChatSample) for s in samples)
    assert any(sum(m.role == "assistant" for m in s.messages) == 2 for s in samples)
    assert any(s.messages[0].role == "system" for s in samples)


def test_tiny_tokenizer_loads_round_trips_and_is_deterministic(
    tokenizer_dir: Path, tmp_path: Path
) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    assert len(tok) == 512
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [
        509,
        510,
        511,
    ]
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    for text in ("What is 12 + 7?", "  two  spaces\n\nand newlines\t", "Grüße, 東京! 🙂", ""):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert max(ids, default=0) < 509
        assert tok.decode(ids) == text
    assert len(tok('Reverse the word "banana".')["input_ids"]) < len('Reverse the word "banana".')
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
        tokenize=False,
    )
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n"
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok("<|im_start|>user", add_special_tokens=False)["input_ids"][0] == 510

    again = build_tiny_tokenizer(tmp_path / "again")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (again / name).read_bytes() == (tokenizer_dir / name).read_bytes()
    with pytest.raises(DataError, match="too small"):
        build_tiny_tokenizer(tmp_path / "small", vocab_size=200)


def test_load_tokenizer_missing_dir(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="cannot load a tokenizer"):
        load_tokenizer(tmp_path / "no_model")


# ------------------------------------------------------------------------------------ loss masks


def test_chat_loss_mask_trains_exactly_the_assistant_turns(tokenizer) -> None:
    samples = read_jsonl(TINY_SFT_PATH)[:80]
    assert any(sum(m.role == "assistant" for m in s.messages) == 2 for s in samples)
    for sample in samples:
        tokenized = tokenize_chat(tokenizer, sample)
        assert len(tokenized.input_ids) == len(tokenized.loss_mask)
        rendered = tokenizer.apply_chat_template(
            [{"role": m.role, "content": m.content} for m in sample.messages], tokenize=False
        )
        assert tokenizer.decode(tokenized.input_ids) == rendered
        expected = "".join(
            f"{m.content}<|im_end|>\n" for m in sample.messages if m.role == "assistant"
        )
        assert tokenizer.decode(trained_token_ids(tokenized)) == expected
        context = [
            t for t, keep in zip(tokenized.input_ids, tokenized.loss_mask, strict=True) if not keep
        ]
        for message in sample.messages:
            if message.role != "assistant":
                assert message.content in tokenizer.decode(context)


def test_multi_turn_mask_spans(tokenizer) -> None:
    sample = ChatSample(
        (
            Message("system", "S"),
            Message("user", "What is 2 + 3?"),
            Message("assistant", "2 + 3 = 5."),
            Message("user", "And twice that?"),
            Message("assistant", "2 * 5 = 10."),
        )
    )
    tokenized = tokenize_chat(tokenizer, sample)
    runs, current = [], []
    for tok, keep in zip(tokenized.input_ids, tokenized.loss_mask, strict=True):
        if keep:
            current.append(tok)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    runs.append(tokenizer.decode(current))
    assert runs == ["2 + 3 = 5.<|im_end|>\n", "2 * 5 = 10.<|im_end|>\n"]


def test_prompt_completion_mask(tokenizer) -> None:
    sample = PromptCompletionSample("Reverse lemon:", " nomel")
    tokenized = tokenize_prompt_completion(tokenizer, sample)
    prompt_ids = tokenizer("Reverse lemon:", add_special_tokens=False)["input_ids"]
    assert tokenized.input_ids[: len(prompt_ids)] == prompt_ids
    assert tokenized.loss_mask[: len(prompt_ids)] == [0] * len(prompt_ids)
    assert tokenized.input_ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(trained_token_ids(tokenized)) == " nomel<|im_end|>"


def test_truncation_and_untrained_samples(tokenizer) -> None:
    sample = read_jsonl(TINY_SFT_PATH)[1]
    full = tokenize_sample(tokenizer, sample, max_seq_len=1000)
    short = tokenize_sample(tokenizer, sample, max_seq_len=6)
    assert short.input_ids == full.input_ids[:6] and short.loss_mask == full.loss_mask[:6]
    kept, dropped = drop_untrained([full, short])
    assert kept == [full] and dropped == 1
    with pytest.raises(DataError, match="max_seq_len"):
        tokenize_samples(tokenizer, [sample], max_seq_len=1)


def test_template_that_is_not_prefix_stable_is_refused(tokenizer_dir: Path) -> None:
    tok = load_tokenizer(tokenizer_dir)
    tok.chat_template = (
        "{%- for m in messages -%}"
        "{%- if m['role'] == 'assistant' and loop.last -%}"
        "{{- '<|im_start|>assistant\\n<think></think>' + m['content'] + '<|im_end|>\\n' -}}"
        "{%- else -%}"
        "{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' -}}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
    )
    two_turns = ChatSample(
        (
            Message("user", "a"),
            Message("assistant", "b"),
            Message("user", "c"),
            Message("assistant", "d"),
        ),
        location="x.jsonl:4",
    )
    with pytest.raises(DataError, match=r"x.jsonl:4: .*assistant turn 1"):
        tokenize_chat(tok, two_turns)


# --------------------------------------------------------------------------------------- packing


def test_greedy_pack_groups_in_order() -> None:
    assert greedy_pack([3, 4, 2, 5, 1], 8) == [[0, 1], [2, 3, 4]]
    assert greedy_pack([8, 8], 8) == [[0], [1]]
    with pytest.raises(DataError, match="sample 1 has 9 tokens"):
        greedy_pack([2, 9], 8)


def test_build_row_fields() -> None:
    a = TokenizedSample([10, 11, 12], [0, 1, 1])
    b = TokenizedSample([20, 21], [0, 1])
    row = build_row([a, b], seq_len=8, pad_id=0)
    assert row.input_ids == [10, 11, 12, 20, 21, 0, 0, 0]
    assert row.labels == [11, 12, -100, 21, -100, -100, -100, -100]
    assert row.position_ids == [0, 1, 2, 0, 1, 0, 1, 2]
    assert row.cu_seqlens == [0, 3, 5, 8]
    full = build_row([a, TokenizedSample([1] * 5, [1] * 5)], seq_len=8, pad_id=0)
    assert full.cu_seqlens == [0, 3, 8]


def _check_batch(batch: dict[str, torch.Tensor], rows: int, seq_len: int) -> None:
    assert batch["input_ids"].shape == batch["labels"].shape == batch["position_ids"].shape
    assert batch["input_ids"].shape == (rows, seq_len)
    assert batch["input_ids"].dtype == batch["labels"].dtype == torch.long
    cu = batch["cu_seqlens"]
    assert cu.dtype == torch.int32 and cu.dim() == 1
    bounds = cu.tolist()
    assert bounds[0] == 0 and bounds[-1] == rows * seq_len
    assert all(x < y for x, y in itertools.pairwise(bounds))
    assert set(range(0, rows * seq_len + 1, seq_len)) <= set(bounds)
    ids, labels, pos = (
        batch[k].flatten().tolist() for k in ("input_ids", "labels", "position_ids")
    )
    for start, end in itertools.pairwise(bounds):
        assert pos[start:end] == list(range(end - start))
        assert labels[end - 1] == IGNORE_INDEX
        for t in range(start, end - 1):
            assert labels[t] in (IGNORE_INDEX, ids[t + 1])


def test_packed_batch_targets_equal_unpacked(
    tiny_samples: list[TokenizedSample], tokenizer
) -> None:
    seq_len = 128
    packed = PackedDataset(tiny_samples, seq_len, tokenizer.pad_token_id, pack=True)
    unpacked = PackedDataset(tiny_samples, seq_len, tokenizer.pad_token_id, pack=False)
    assert len(unpacked) == len(tiny_samples)
    assert len(packed) <= len(tiny_samples) // 3
    assert sorted(i for group in packed.groups for i in group) == list(range(len(tiny_samples)))

    batch = collate([packed[i] for i in range(4)])
    _check_batch(batch, 4, seq_len)
    _check_batch(collate([unpacked[i] for i in range(3)]), 3, seq_len)

    for row_index in range(len(packed)):
        row = packed[row_index]
        offset = 0
        for sample_index in packed.groups[row_index]:
            n = len(tiny_samples[sample_index])
            alone = unpacked[sample_index]
            assert row.input_ids[offset : offset + n] == alone.input_ids[:n]
            assert row.labels[offset : offset + n] == alone.labels[:n]
            assert row.position_ids[offset : offset + n] == alone.position_ids[:n]
            assert alone.labels[n:] == [IGNORE_INDEX] * (seq_len - n)
            assert alone.input_ids[n:] == [tokenizer.pad_token_id] * (seq_len - n)
            targets = [t for t in alone.labels if t != IGNORE_INDEX]
            assert targets == trained_token_ids(tiny_samples[sample_index])
            offset += n
        assert row.labels[offset:] == [IGNORE_INDEX] * (seq_len - offset)


def test_sample_labels_shift() -> None:
    assert sample_labels(TokenizedSample([5, 6, 7, 8], [0, 0, 1, 1])) == [-100, 7, 8, -100]


# --------------------------------------------------------------------------------------- sampler


def _take(sampler: DPBatchSampler, n: int) -> list[list[int]]:
    out: list[list[int]] = []
    while len(out) < n:
        for batch in sampler:
            out.append(batch)
            if len(out) == n:
                break
    return out


def test_dp_ranks_are_disjoint_and_cover_the_epoch() -> None:
    n, mbs, gbs, dp = 53, 2, 8, 2
    samplers = [DPBatchSampler(n, mbs, gbs, dp_rank=r, dp_size=dp, seed=7) for r in range(dp)]
    epochs = [list(s) for s in samplers]
    assert len(epochs[0]) == len(epochs[1]) == len(samplers[0]) == (n // gbs) * gbs // (mbs * dp)
    seen = [i for batches in epochs for batch in batches for i in batch]
    assert len(seen) == len(set(seen)) == (n // gbs) * gbs
    permutation = samplers[0].epoch_permutation(0).tolist()
    assert set(seen) == set(permutation[: (n // gbs) * gbs])
    for k in range(len(epochs[0])):
        assert epochs[0][k] + epochs[1][k] == permutation[k * mbs * dp : (k + 1) * mbs * dp]
    assert all(s.consumed_samples == (n // gbs) * gbs for s in samplers)
    second = list(samplers[0])
    assert second != epochs[0] and samplers[0].epoch == 2
    assert list(DPBatchSampler(n, mbs, gbs, 0, dp, seed=7)) == epochs[0]


@pytest.mark.parametrize("k", [3, 6, 7, 15])
def test_sampler_resume_continues_exactly(k: int) -> None:
    n, mbs, gbs, dp = 50, 2, 12, 3
    for rank in range(dp):
        reference = _take(DPBatchSampler(n, mbs, gbs, rank, dp, seed=3), 20)
        first = DPBatchSampler(n, mbs, gbs, rank, dp, seed=3)
        head = _take(first, k)
        state = json.loads(json.dumps(first.state_dict()))
        resumed = DPBatchSampler(n, mbs, gbs, rank, dp, seed=3)
        resumed.load_state_dict(state)
        assert head + _take(resumed, 20 - k) == reference


def test_sampler_state_errors() -> None:
    sampler = DPBatchSampler(40, 2, 8, 0, 2, seed=1)
    with pytest.raises(DataError, match="seed"):
        sampler.load_state_dict(
            {"consumed_samples": 8, "seed": 2, "num_samples": 40, "global_batch_size": 8}
        )
    with pytest.raises(DataError, match="num_samples"):
        sampler.load_state_dict(
            {"consumed_samples": 8, "seed": 1, "num_samples": 41, "global_batch_size": 8}
        )
    with pytest.raises(DataError, match="multiple"):
        sampler.load_state_dict(
            {"consumed_samples": 6, "seed": 1, "num_samples": 40, "global_batch_size": 8}
        )
    with pytest.raises(DataError, match="multiple of micro_batch_size"):
        DPBatchSampler(40, 2, 6, 0, 2)
    with pytest.raises(DataError, match="fewer than one global batch"):
        DPBatchSampler(5, 2, 8, 0, 2)
    with pytest.raises(DataError, match="dp_rank 2"):
        DPBatchSampler(40, 2, 8, 2, 2)


def test_eval_batches_split_in_order() -> None:
    assert eval_batches(11, 2, 0, 2) == [[0, 1], [4, 5]]
    assert eval_batches(11, 2, 1, 2) == [[2, 3], [6, 7]]
    assert eval_batches(12, 2, 1, 2) == [[2, 3], [6, 7], [10, 11]]


# ------------------------------------------------------------------------------------ datamodule


def _datamodule(tokenizer_dir: Path, rank: int, **kwargs: object) -> SFTDataModule:
    args: dict[str, object] = dict(
        model_dir=tokenizer_dir,
        max_seq_len=96,
        micro_batch_size=2,
        global_batch_size=8,
        seed=5,
        dp_rank=rank,
        dp_size=2,
    )
    args.update(kwargs)
    return SFTDataModule(TINY_SFT_PATH, **args)


def test_datamodule_batches_shards_and_resume(tokenizer_dir: Path) -> None:
    dm = _datamodule(tokenizer_dir, rank=0, val_path=TINY_SFT_PATH)
    dm.setup("fit")
    assert dm.val_dataloader() is not None
    loader = dm.train_dataloader()
    assert len(loader) == len(dm.train_sampler)
    batches = []
    for batch in loader:
        batches.append(batch)
        if len(batches) == 10:
            break
    for batch in batches:
        _check_batch(batch, 2, 96)
    assert dm.consumed_samples == 10 * 2 * 2

    resumed = _datamodule(tokenizer_dir, rank=0, val_path=TINY_SFT_PATH)
    resumed.load_state_dict(dm.state_dict())
    assert resumed.state_dict() == dm.state_dict()
    resumed.setup("fit")
    for expected, got in zip(dm.train_dataloader(), resumed.train_dataloader(), strict=True):
        for key in expected:
            assert torch.equal(expected[key], got[key])

    val = list(dm.val_dataloader())
    assert len(val) == len(dm.val_dataset) // 4
    _check_batch(val[0], 2, 96)


def test_datamodule_ranks_see_disjoint_rows(tokenizer_dir: Path) -> None:
    modules = [_datamodule(tokenizer_dir, rank=r, pack=False) for r in range(2)]
    for dm in modules:
        dm.setup("fit")
    assert modules[0].val_dataloader() == []
    rows = [[i for batch in dm.train_sampler for i in batch] for dm in modules]
    assert not set(rows[0]) & set(rows[1])
    assert len(rows[0]) + len(rows[1]) == len(modules[0].train_dataset) // 8 * 8
    with pytest.raises(DataError, match="both dp_rank and dp_size"):
        SFTDataModule(
            TINY_SFT_PATH,
            model_dir=tokenizer_dir,
            max_seq_len=8,
            micro_batch_size=1,
            global_batch_size=1,
            dp_rank=0,
        )


class Recorder(pl.LightningModule):
    """Records the start of every micro-batch it trains on; lr 0 on one weight."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[list[int]] = []

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        self.seen.append(batch["input_ids"][:, :8].flatten().tolist())
        return self.weight.sum() * batch["labels"].ne(IGNORE_INDEX).float().mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_lightning_resume_mid_epoch_continues_the_same_batches(
    tokenizer_dir: Path, tmp_path: Path
) -> None:
    def fit(steps: int, ckpt: Path | None = None, save: Path | None = None) -> list[list[int]]:
        trainer = pl.Trainer(
            max_steps=steps,
            accelerator="cpu",
            devices=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            use_distributed_sampler=False,
            default_root_dir=tmp_path,
        )
        module = Recorder()
        dm = _datamodule(tokenizer_dir, rank=1, max_seq_len=256, global_batch_size=4)
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt)
        if save is not None:
            trainer.save_checkpoint(save)
        return module.seen

    ckpt = tmp_path / "step.ckpt"
    probe = _datamodule(tokenizer_dir, rank=1, max_seq_len=256, global_batch_size=4)
    probe.setup("fit")
    per_epoch = len(probe.train_sampler)
    assert per_epoch >= 8
    full = fit(per_epoch + 6)
    head = fit(per_epoch + 2, save=ckpt)
    tail = fit(per_epoch + 6, ckpt=ckpt)
    assert len(full) == per_epoch + 6 and len(tail) == 4
    assert head + tail == full


def test_datamodule_data_parallel_defaults(tokenizer_dir: Path) -> None:
    dm = SFTDataModule(
        TINY_SFT_PATH,
        model_dir=tokenizer_dir,
        max_seq_len=64,
        micro_batch_size=1,
        global_batch_size=4,
    )
    assert dm.data_parallel() == (0, 1)  # megatron parallel_state is not initialized
    dm.set_data_parallel(3, 4)
    dm.setup("fit")
    assert (dm.train_sampler.dp_rank, dm.train_sampler.dp_size) == (3, 4)
    with pytest.raises(DataError, match="before setup"):
        dm.set_data_parallel(0, 1)
