"""A tiny Qwen-style tokenizer and the small SFT dataset it is trained on, both deterministic.

`tiny_sft_records` generates short chat samples (arithmetic and word tasks, some with a system
prompt, some with two assistant turns) that a tiny model can learn; the repository ships them as
`assets/tiny_sft.jsonl` (`write_tiny_sft` rewrites that file). `build_tiny_tokenizer` trains a
byte-level BPE on that file with the `tokenizers` library, with Qwen's pre-tokenizer regex, Qwen's
special tokens and its thinking and tool-call tokens placed after the regular vocabulary, and the
Qwen3.5 chat template (`assets/qwen3_5_chat_template.jinja`, as published with the Qwen3.5
tokenizers: tools, XML tool calls, tool responses, reasoning and `enable_thinking`), and saves it
as a transformers tokenizer directory that `AutoTokenizer.from_pretrained` loads offline.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any

from lora_trainer.errors import DataError

TINY_SFT_PATH = Path(__file__).parent / "assets" / "tiny_sft.jsonl"
QWEN35_CHAT_TEMPLATE_PATH = Path(__file__).parent / "assets" / "qwen3_5_chat_template.jinja"
TINY_SFT_SEED = 1234
TINY_SFT_NUM_SAMPLES = 400

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)
# Qwen3.5's added tokens that its chat template writes (not special: decoded like text).
TEMPLATE_TOKENS = (
    "<think>",
    "</think>",
    "<tool_call>",
    "</tool_call>",
    "<tool_response>",
    "</tool_response>",
)

# Qwen2/2.5/3 pre-tokenizer split pattern (digits are split one by one).
QWEN_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_WORDS = [
    "apple",
    "banana",
    "cherry",
    "river",
    "mountain",
    "garden",
    "window",
    "pencil",
    "rocket",
    "planet",
    "yellow",
    "purple",
    "orange",
    "silver",
    "castle",
    "dragon",
    "forest",
    "island",
    "jacket",
    "kitten",
    "lemon",
    "market",
    "needle",
    "ocean",
    "pepper",
    "quiet",
    "rabbit",
    "summer",
    "tiger",
    "umbrella",
    "violet",
    "winter",
    "zebra",
    "bread",
    "cloud",
    "dance",
    "eagle",
    "flower",
    "guitar",
    "house",
    "light",
    "music",
    "night",
    "paper",
    "stone",
    "train",
    "water",
    "bottle",
    "candle",
    "doctor",
    "engine",
    "finger",
    "honey",
    "letter",
    "mirror",
]
_SYSTEM_PROMPTS = ("You are a helpful assistant.", "Answer briefly.", "You are good at math.")


def _arithmetic(rng: random.Random) -> list[dict[str, str]]:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    op = rng.choice("+-*")
    if op == "*":
        a, b = a % 13, b % 13
    result = {"+": a + b, "-": a - b, "*": a * b}[op]
    question = rng.choice(("What is {a} {op} {b}?", "Compute {a} {op} {b}.", "{a} {op} {b} = ?"))
    return [
        {"role": "user", "content": question.format(a=a, op=op, b=b)},
        {"role": "assistant", "content": f"{a} {op} {b} = {result}."},
    ]


def _word_task(rng: random.Random) -> list[dict[str, str]]:
    word = rng.choice(_WORDS)
    task = rng.randrange(5)
    if task == 0:
        question, answer = f'Reverse the word "{word}".', word[::-1]
    elif task == 1:
        question, answer = f'Write "{word}" in capital letters.', word.upper()
    elif task == 2:
        question, answer = (
            f'How many letters are in "{word}"?',
            f'"{word}" has {len(word)} letters.',
        )
    elif task == 3:
        question, answer = (
            f'What is the first letter of "{word}"?',
            f"The first letter is {word[0]}.",
        )
    else:
        question, answer = f'Spell "{word}" with dashes.', "-".join(word)
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def _two_turns(rng: random.Random) -> list[dict[str, str]]:
    a, b = rng.randint(1, 50), rng.randint(1, 50)
    return [
        {"role": "user", "content": f"What is {a} + {b}?"},
        {"role": "assistant", "content": f"{a} + {b} = {a + b}."},
        {"role": "user", "content": "And twice that?"},
        {"role": "assistant", "content": f"2 * {a + b} = {2 * (a + b)}."},
    ]


def tiny_sft_records(
    num_samples: int = TINY_SFT_NUM_SAMPLES, seed: int = TINY_SFT_SEED
) -> list[dict[str, Any]]:
    """The tiny SFT dataset as JSON records `{"messages": [...]}`, fixed by the arguments."""
    rng = random.Random(seed)
    records = []
    for _ in range(num_samples):
        kind = rng.random()
        if kind < 0.45:
            messages = _arithmetic(rng)
        elif kind < 0.85:
            messages = _word_task(rng)
        else:
            messages = _two_turns(rng)
        if rng.random() < 0.2:
            messages = [{"role": "system", "content": rng.choice(_SYSTEM_PROMPTS)}, *messages]
        records.append({"messages": messages})
    return records


def write_tiny_sft(path: str | Path = TINY_SFT_PATH) -> Path:
    """Write `tiny_sft_records()` as JSONL to `path` (default: the shipped asset) and return it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = (json.dumps(record, ensure_ascii=False) for record in tiny_sft_records())
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def tokenizer_recipe() -> str:
    """A hash of what else than the data and vocabulary size decides the tiny tokenizer's files."""
    blob = json.dumps([SPECIAL_TOKENS, TEMPLATE_TOKENS, QWEN35_CHAT_TEMPLATE_PATH.read_text()])
    return hashlib.sha256(blob.encode()).hexdigest()


def _training_texts(data_path: Path) -> list[str]:
    """Every message of a chat JSONL file as ``role\ncontent``, the texts BPE merges learn from."""
    texts: list[str] = []
    for line in data_path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            messages = json.loads(line)["messages"]
            texts.extend(f"{message['role']}\n{message['content']}" for message in messages)
    return texts


def build_tiny_tokenizer(
    out_dir: str | Path, vocab_size: int = 512, data_path: str | Path = TINY_SFT_PATH
) -> Path:
    """Train a byte-level BPE of `vocab_size` tokens (special tokens included) on `data_path`.

    The regular vocabulary holds the 256 byte symbols and the learned merges; `<|endoftext|>`,
    `<|im_start|>`, `<|im_end|>` and the template tokens (`<think>`, `<tool_call>`, ...) follow
    it, as in Qwen, so `len(tokenizer) == vocab_size`.
    `eos_token` is `<|im_end|>` and `pad_token` is `<|endoftext|>` (as in Qwen's chat models).
    Returns `out_dir`; the same inputs give byte-identical files.
    """
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    added = len(SPECIAL_TOKENS) + len(TEMPLATE_TOKENS)
    regular_size = vocab_size - added
    if regular_size < 256:
        raise DataError(
            f"vocab_size={vocab_size} is too small for a byte-level BPE: it needs at least "
            f"{256 + added} (256 bytes and {added} added tokens)"
        )
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=regular_size,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(_training_texts(Path(data_path)), trainer=trainer)
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    tokenizer.add_tokens(
        [AddedToken(token, special=False, normalized=False) for token in TEMPLATE_TOKENS]
    )

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        clean_up_tokenization_spaces=False,
        model_max_length=131072,
    )
    fast.chat_template = QWEN35_CHAT_TEMPLATE_PATH.read_text(encoding="utf-8")
    out_dir = Path(out_dir)
    fast.save_pretrained(out_dir)
    return out_dir
