"""lora_trainer.data: row formats, chat-template loss masks, packing, DP sampler, tiny tokenizer,
datamodule. Sources, mixtures, the cache and bad input: test_data_sources.py."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.core.optimizer import LightningOptimizer

from lora_trainer.data.datamodule import SFTDataModule
from lora_trainer.data.formats import (
    ChatSample,
    Columns,
    PromptCompletionSample,
    parse_record,
)
from lora_trainer.data.packing import (
    IGNORE_INDEX,
    PackedDataset,
    build_row,
    collate,
    greedy_pack,
    greedy_pack_chunks,
    sample_labels,
)
from lora_trainer.data.sampler import DPBatchSampler, eval_batches
from lora_trainer.data.tokenize import (
    SampleTokenizer,
    Status,
    TokenizedSample,
    TokenizeSettings,
    load_tokenizer,
    trained_token_ids,
)
from lora_trainer.demo.tokenizer import (
    TINY_SFT_PATH,
    build_tiny_tokenizer,
    tiny_sft_records,
    write_tiny_sft,
)
from lora_trainer.errors import DataError

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather of a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tiny_tokenizer"))


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir: Path):
    return load_tokenizer(tokenizer_dir)


def tiny_chats() -> list[ChatSample]:
    return [parse_record(record) for record in tiny_sft_records()]


def tokenize(tokenizer, sample, **settings: object) -> TokenizedSample:
    args: dict[str, object] = {"max_seq_len": 4096, **settings}
    tokenized, status = SampleTokenizer(tokenizer, TokenizeSettings(**args))(sample)  # type: ignore[arg-type]
    assert status == Status.KEPT
    return tokenized


def trained_runs(tokenizer, tokenized: TokenizedSample) -> list[str]:
    """The decoded runs of consecutive trained tokens."""
    runs, current = [], []
    for tok, keep in zip(tokenized.input_ids, tokenized.loss_mask, strict=True):
        if keep:
            current.append(tok)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    if current:
        runs.append(tokenizer.decode(current))
    return runs


@pytest.fixture(scope="module")
def tiny_samples(tokenizer) -> list[TokenizedSample]:
    tokenizer_ = SampleTokenizer(tokenizer, TokenizeSettings(max_seq_len=64))
    out = [tokenizer_(sample) for sample in tiny_chats()[:120]]
    return [tokenized for tokenized, status in out if status == Status.KEPT]


# ------------------------------------------------------------------------------------ row formats


BAD_ROWS = [
    ([1, 2], "expected an object, got list"),
    ({"text": "hello"}, "none of the supported formats"),
    ({"messages": [], "prompt": "a", "completion": "b"}, "has both a conversation"),
    ({"messages": "hi"}, '"messages" must be a list'),
    ({"messages": ["hi"]}, "messages[0] must be an object"),
    ({"messages": [{"content": "hi"}]}, "messages[0].role is None"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role is 'robot'"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content must be a string"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
    ({"messages": []}, "is empty"),
    ({"prompt": "2 + 2 ="}, '"completion" must be a string, got nothing'),
    ({"prompt": "2 + 2 =", "completion": 4}, '"completion" must be a string, got int'),
    (
        {
            "messages": [
                {"role": "user", "content": "x"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}],
                },
            ]
        },
        "messages[1].tool_calls[0].arguments is a string but not valid JSON",
    ),
    (
        {
            "messages": [
                {"role": "user", "content": "x"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [{"function": {"name": "f", "arguments": "[1]"}}],
                },
            ]
        },
        "messages[1].tool_calls[0].arguments must be a JSON dict, got list",
    ),
    ({"conversations": [{"from": "bot", "value": "x"}]}, "conversations[0].from is 'bot'"),
    (
        {"messages": [], "images": ["a.png"]},
        'has "images": image and video training is not supported',
    ),
    (
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image", "image": "a.png"},
                        {"type": "text", "text": "what?"},
                    ],
                },
                {"role": "assistant", "content": "cat"},
            ]
        },
        "messages[0].content[0] is an image part",
    ),
    ({"messages": [{"role": "user", "content": "x"}], "videos": ["v.mp4"]}, 'has "videos"'),
]


@pytest.mark.parametrize(("row", "what"), BAD_ROWS)
def test_bad_rows_name_the_field(row: object, what: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_record(row)
    assert what in str(info.value)


def test_openai_sharegpt_and_custom_columns_normalize_alike() -> None:
    call = {"name": "get_weather", "arguments": {"city": "Paris", "unit": None}}
    openai = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Weather "},
                    {"type": "text", "text": "in Paris?"},
                ],
            },
            {
                "role": "assistant",
                "content": None,
                "reasoning_content": None,
                "tool_calls": [
                    {
                        "type": "function",
                        "function": {**call, "arguments": json.dumps({"city": "Paris"})},
                    }
                ],
            },
            {"role": "tool", "content": "sunny", "name": "get_weather"},
            {"role": "assistant", "content": "Sunny."},
        ],
        "tools": json.dumps(TOOLS),
        "id": 7,
    }
    sharegpt = {
        "system": "Be brief.",
        "conversations": [
            {"from": "human", "value": "Weather in Paris?"},
            {"from": "function_call", "value": json.dumps(call)},
            {"from": "observation", "value": "sunny"},
            {"from": "gpt", "value": "Sunny."},
        ],
        "tools": TOOLS,
    }
    a, b = parse_record(openai), parse_record(sharegpt)
    assert a.tools == b.tools == tuple(TOOLS)
    assert a.messages[2] == {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "type": "function",
                "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
            }
        ],
    }
    assert [m["content"] for m in a.messages] == [
        "Be brief.",
        "Weather in Paris?",
        "",
        "sunny",
        "Sunny.",
    ]
    assert a.messages[3] == {"role": "tool", "content": "sunny", "name": "get_weather"}
    assert a.messages[:3] + a.messages[4:] == b.messages[:3] + b.messages[4:]
    assert b.messages[3] == {"role": "tool", "content": "sunny"}
    renamed = {"chat": openai["messages"], "functions": openai["tools"]}
    assert (
        parse_record(renamed, Columns.from_mapping({"messages": "chat", "tools": "functions"})) == a
    )
    pc = parse_record(
        {"instruction": "1+1=", "output": "2"}, Columns(prompt="instruction", completion="output")
    )
    assert pc == PromptCompletionSample("1+1=", "2")
    with pytest.raises(ValueError, match=r"unknown data\.columns key"):
        Columns.from_mapping({"message": "chat"})


# --------------------------------------------------------------------------- tiny data, tokenizer


def test_shipped_tiny_dataset_is_the_generated_one(tmp_path: Path) -> None:
    regenerated = write_tiny_sft(tmp_path / "tiny.jsonl")
    assert regenerated.read_bytes() == TINY_SFT_PATH.read_bytes()
    assert TINY_SFT_PATH.stat().st_size < 300_000
    samples = tiny_chats()
    assert len(samples) >= 200
    assert any(sum(m["role"] == "assistant" for m in s.messages) == 2 for s in samples)
    assert any(s.messages[0]["role"] == "system" for s in samples)


def test_tiny_tokenizer_loads_round_trips_and_is_deterministic(
    tokenizer_dir: Path, tmp_path: Path
) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    assert len(tok) == 512
    added = [
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
        "<think>",
        "</think>",
        "<tool_call>",
        "</tool_call>",
        "<tool_response>",
        "</tool_response>",
    ]
    assert tok.convert_tokens_to_ids(added) == list(range(503, 512))
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    for text in ("What is 12 + 7?", "  two  spaces\n\nand newlines\t", "Grüße, 東京! 🙂", ""):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert max(ids, default=0) < 503
        assert tok.decode(ids) == text
    assert len(tok('Reverse the word "banana".')["input_ids"]) < len('Reverse the word "banana".')
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
        tokenize=False,
    )
    assert rendered == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nyo<|im_end|>\n"
    )
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n"
    no_think = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}],
        tokenize=False,
        add_generation_prompt=True,
        enable_thinking=False,
    )
    assert no_think.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert tok("<|im_start|>user", add_special_tokens=False)["input_ids"][0] == 504
    assert tok("<think>x</think>", add_special_tokens=False)["input_ids"][0] == 506

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
    samples = tiny_chats()[:80]
    assert any(sum(m["role"] == "assistant" for m in s.messages) == 2 for s in samples)
    for sample in samples:
        tokenized = tokenize(tokenizer, sample)
        assert len(tokenized.input_ids) == len(tokenized.loss_mask)
        rendered = tokenizer.apply_chat_template(list(sample.messages), tokenize=False)
        assert tokenizer.decode(tokenized.input_ids) == rendered
        expected = [
            f"{m['content']}<|im_end|>\n" for m in sample.messages if m["role"] == "assistant"
        ]
        assert trained_runs(tokenizer, tokenized) == expected
        last = tokenize(tokenizer, sample, train_on="last_assistant")
        assert last.input_ids == tokenized.input_ids
        assert trained_runs(tokenizer, last) == expected[-1:]


TOOL_CHAT = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {
            "role": "assistant",
            "content": "Let me check.",
            "reasoning_content": "Two cities, two calls.",
            "tool_calls": [
                {
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": {"city": "Paris", "days": 2}},
                },
                {
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Rome", "days": 1}'},
                },
            ],
        },
        {"role": "tool", "content": "sunny"},
        {"role": "tool", "content": "rain"},
        {
            "role": "assistant",
            "content": "<think>\nBoth known.\n</think>\n\nParis: sunny. Rome: rain.",
        },
    ],
    "tools": TOOLS,
}


def test_tool_call_and_thinking_masks_match_the_template_rendering(tokenizer) -> None:
    sample = parse_record(TOOL_CHAT)
    rendered = tokenizer.apply_chat_template(
        [dict(m) for m in sample.messages], tools=TOOLS, tokenize=False
    )
    first = (
        "Two cities, two calls.\n</think>\n\nLet me check.\n\n"
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
        "<parameter=days>\n2\n</parameter>\n</function>\n</tool_call>\n"
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nRome\n</parameter>\n"
        "<parameter=days>\n1\n</parameter>\n</function>\n</tool_call><|im_end|>\n"
    )
    second = "Both known.\n</think>\n\nParis: sunny. Rome: rain.<|im_end|>\n"
    assert rendered.count("<|im_start|>assistant\n<think>\n" + first) == 1
    assert rendered.endswith("<|im_start|>assistant\n<think>\n" + second)
    assert (
        "<tool_response>\nsunny\n</tool_response>\n<tool_response>\nrain\n</tool_response>"
        in rendered
    )
    tokenized = tokenize(tokenizer, sample)
    assert tokenizer.decode(tokenized.input_ids) == rendered
    assert trained_runs(tokenizer, tokenized) == [first, second]
    assert trained_runs(tokenizer, tokenize(tokenizer, sample, train_on="last_assistant")) == [
        second
    ]

    # the same reasoning given as reasoning_content or as a <think> block renders the same tokens
    as_field = json.loads(json.dumps(TOOL_CHAT))
    as_field["messages"][-1] = {
        "role": "assistant",
        "content": "Paris: sunny. Rome: rain.",
        "reasoning_content": "Both known.",
    }
    assert tokenize(tokenizer, parse_record(as_field)) == tokenized

    # enable_thinking=false: the empty think block of the generation prompt is not trained either
    plain = parse_record(
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    )
    for thinking in (True, False):
        assert trained_runs(tokenizer, tokenize(tokenizer, plain, enable_thinking=thinking)) == [
            "yo<|im_end|>\n"
        ]


def test_earlier_turns_are_masked_as_the_template_renders_them(tokenizer) -> None:
    """Qwen3.5 drops the reasoning of turns before the last user query: they train without it."""
    sample = parse_record(
        {
            "messages": [
                {"role": "user", "content": "2 + 3?"},
                {"role": "assistant", "content": "5.", "reasoning_content": "add"},
                {"role": "user", "content": "Twice that?"},
                {"role": "assistant", "content": "10.", "reasoning_content": "double"},
            ]
        }
    )
    tokenized = tokenize(tokenizer, sample)
    rendered = tokenizer.apply_chat_template([dict(m) for m in sample.messages], tokenize=False)
    assert "add" not in rendered and tokenizer.decode(tokenized.input_ids) == rendered
    assert trained_runs(tokenizer, tokenized) == [
        "5.<|im_end|>\n",
        "double\n</think>\n\n10.<|im_end|>\n",
    ]


def test_template_markup_in_a_message_is_refused(tokenizer) -> None:
    sample = ChatSample(
        (
            {"role": "user", "content": "say <|im_start|>assistant\nhi"},
            {"role": "assistant", "content": "no"},
        ),
        location="x.jsonl:4",
    )
    with pytest.raises(DataError, match=r"x.jsonl:4: .*2 times for 1 assistant turns"):
        SampleTokenizer(tokenizer, TokenizeSettings(64))(sample)


def test_prompt_completion_mask(tokenizer) -> None:
    tokenized = tokenize(tokenizer, PromptCompletionSample("Reverse lemon:", " nomel"))
    prompt_ids = tokenizer("Reverse lemon:", add_special_tokens=False)["input_ids"]
    assert tokenized.input_ids[: len(prompt_ids)] == prompt_ids
    assert tokenized.loss_mask[: len(prompt_ids)] == [0] * len(prompt_ids)
    assert tokenized.input_ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(trained_token_ids(tokenized)) == " nomel<|im_end|>"


def test_overlong_and_untrained_samples(tokenizer) -> None:
    sample = tiny_chats()[1]
    full = tokenize(tokenizer, sample)
    n = len(full)

    def run(limit: int, overlong: str) -> tuple[TokenizedSample, Status]:
        return SampleTokenizer(tokenizer, TokenizeSettings(limit, overlong=overlong))(sample)

    assert run(n, "drop") == (full, Status.KEPT)
    assert run(n - 1, "drop")[1] == Status.OVERLONG == run(n - 1, "error")[1]
    cut, status = run(n - 2, "truncate")
    assert status == Status.TRUNCATED
    assert cut.input_ids == full.input_ids[: n - 2] and cut.loss_mask == full.loss_mask[: n - 2]
    assert run(6, "truncate")[1] == Status.UNTRAINED
    with pytest.raises(DataError, match="max_seq_len must be at least 2"):
        TokenizeSettings(1)
    with pytest.raises(DataError, match=r"data\.overlong='cut' is unknown"):
        TokenizeSettings(8, overlong="cut")
    with pytest.raises(DataError, match=r"data\.train_on='first' is unknown"):
        TokenizeSettings(8, train_on="first")


# --------------------------------------------------------------------------------------- packing


def test_greedy_pack_groups_in_order() -> None:
    assert greedy_pack([3, 4, 2, 5, 1], 8).tolist() == [0, 2, 5]
    assert greedy_pack([8, 8], 8).tolist() == [0, 1, 2]
    with pytest.raises(DataError, match="sample 1 has 9 tokens"):
        greedy_pack([2, 9], 8)


def test_greedy_pack_chunks_equal_whole_and_name_the_sample() -> None:
    lengths = [(7 * i) % 8 + 1 for i in range(50)]
    whole = greedy_pack(lengths, 8).tolist()
    assert whole[:8] == [0, 1, 2, 3, 4, 5, 7, 9] and whole[-1] == 50
    for size in (1, 3, 7, 50):
        chunks = [np.asarray(lengths[i : i + size]) for i in range(0, len(lengths), size)]
        assert greedy_pack_chunks(chunks, 8).tolist() == whole
    with pytest.raises(DataError, match="sample 4 has 9 tokens"):
        greedy_pack_chunks([np.asarray([1, 2, 3]), np.asarray([4, 9])], 8)


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
    assert len(packed) <= len(tiny_samples) // 2
    assert packed.starts[0] == 0 and packed.starts[-1] == len(tiny_samples)

    batch = collate([packed[i] for i in range(4)])
    _check_batch(batch, 4, seq_len)
    _check_batch(collate([unpacked[i] for i in range(3)]), 3, seq_len)

    for row_index in range(len(packed)):
        row = packed[row_index]
        offset = 0
        for sample_index in range(packed.starts[row_index], packed.starts[row_index + 1]):
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
        per_epoch = (n // gbs) * gbs // (mbs * dp)
        assert len(resumed) == len(list(iter(resumed))) == per_epoch - k % per_epoch
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


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("data_cache")


def _datamodule(tokenizer_dir: Path, rank: int, **kwargs: object) -> SFTDataModule:
    args: dict[str, object] = {
        "model_dir": tokenizer_dir,
        "cache_dir": kwargs.pop("cache_dir"),
        "max_seq_len": 96,
        "micro_batch_size": 2,
        "global_batch_size": 8,
        "seed": 5,
        "dp_rank": rank,
        "dp_size": 2,
    }
    args.update(kwargs)
    return SFTDataModule(TINY_SFT_PATH, **args)


def test_datamodule_batches_shards_and_resume(tokenizer_dir: Path, cache_dir: Path) -> None:
    dm = _datamodule(tokenizer_dir, rank=0, val_path=TINY_SFT_PATH, cache_dir=cache_dir)
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

    resumed = _datamodule(tokenizer_dir, rank=0, val_path=TINY_SFT_PATH, cache_dir=cache_dir)
    resumed.load_state_dict(dm.state_dict())
    assert resumed.state_dict() == dm.state_dict()
    resumed.setup("fit")
    for expected, got in zip(dm.train_dataloader(), resumed.train_dataloader(), strict=True):
        for key in expected:
            assert torch.equal(expected[key], got[key])

    val = list(dm.val_dataloader())
    assert len(val) == len(dm.val_dataset) // 4
    _check_batch(val[0], 2, 96)


def test_datamodule_ranks_see_disjoint_rows(tokenizer_dir: Path, cache_dir: Path) -> None:
    modules = [
        _datamodule(tokenizer_dir, rank=r, pack=False, cache_dir=cache_dir) for r in range(2)
    ]
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


class TwoMicroBatchRecorder(Recorder):
    """Pulls two micro-batches per training step from the loader's iterator through a generator,
    as the training module hands a global batch's micro-batches to megatron's schedule (so a pull
    past the end of the epoch is an error, not the end of the epoch)."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    @staticmethod
    def micro_batches(dataloader_iter: Any) -> Iterator[dict[str, torch.Tensor]]:
        for _ in range(2):
            batch, _, _ = next(dataloader_iter)
            yield batch

    def training_step(self, dataloader_iter: Any) -> None:  # type: ignore[override]
        for batch in self.micro_batches(dataloader_iter):
            self.seen.append(batch["input_ids"][:, :8].flatten().tolist())
        optimizer = self.optimizers()
        assert isinstance(optimizer, LightningOptimizer)
        optimizer.step()


@pytest.mark.parametrize(
    ("module_class", "global_batch_size"), [(Recorder, 4), (TwoMicroBatchRecorder, 8)]
)
def test_lightning_resume_mid_epoch_continues_the_same_batches(
    module_class: type[Recorder],
    global_batch_size: int,
    tokenizer_dir: Path,
    tmp_path: Path,
    cache_dir: Path,
) -> None:
    """A run resumed in the middle of its second epoch trains through the end of that epoch into
    the third on the micro-batches of an uninterrupted run, with one or two micro-batches a step."""

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
        module = module_class()
        dm = _datamodule(
            tokenizer_dir,
            rank=1,
            max_seq_len=256,
            global_batch_size=global_batch_size,
            cache_dir=cache_dir,
        )
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt)
        if save is not None:
            trainer.save_checkpoint(save)
        return module.seen

    ckpt = tmp_path / "step.ckpt"
    probe = _datamodule(
        tokenizer_dir,
        rank=1,
        max_seq_len=256,
        global_batch_size=global_batch_size,
        cache_dir=cache_dir,
    )
    probe.setup("fit")
    per_step = global_batch_size // 4
    steps_per_epoch = len(probe.train_sampler) // per_step
    assert steps_per_epoch >= 4
    full = fit(2 * steps_per_epoch + 1)
    head = fit(steps_per_epoch + 2, save=ckpt)
    tail = fit(2 * steps_per_epoch + 1, ckpt=ckpt)
    assert len(full) == (2 * steps_per_epoch + 1) * per_step
    assert len(tail) == (steps_per_epoch - 1) * per_step
    assert head + tail == full


def test_datamodule_data_parallel_defaults(tokenizer_dir: Path, cache_dir: Path) -> None:
    dm = SFTDataModule(
        TINY_SFT_PATH,
        model_dir=tokenizer_dir,
        cache_dir=cache_dir,
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
