"""Tokenize SFT samples with the model's own tokenizer and chat template, with loss masks.

`loss_mask[t] == 1` means token `t` is a training target, i.e. the model is trained to predict
`input_ids[t]` from the tokens before it; labels are shifted at batch time (see `packing`).

Chat samples are rendered with the tokenizer's chat template and tokenized once. The assistant
spans are found by rendering prefixes of the conversation: for the assistant turn `i`, the text of
``messages[:i]`` with the generation prompt and the text of ``messages[:i + 1]`` must both be
prefixes of the full text (the template is prefix-stable), and the turn's trained characters are
those between the two (its content and the template's end-of-turn text, e.g. ``<|im_end|>\\n``).
Tokens overlapping those characters, by the tokenizer's offset mapping, are trained. Templates
that render earlier turns differently once later turns exist (Qwen3's thinking template does so
for multi-turn reasoning) raise `DataError` instead of mis-masking.

Prompt/completion samples: prompt and completion are tokenized separately (as at inference, where
the completion is generated after the tokenized prompt); the completion and an EOS token are
trained. Everything is truncated to `max_seq_len` tokens, keeping the beginning.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_trainer.data.jsonl import ChatSample, PromptCompletionSample, SFTSample
from lora_trainer.errors import DataError


@dataclass(frozen=True)
class TokenizedSample:
    """Token ids and the per-token training mask (1: predict this token, 0: context only)."""

    input_ids: list[int]
    loss_mask: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)


def load_tokenizer(model_dir: str | Path) -> Any:
    """`AutoTokenizer.from_pretrained(model_dir)` (offline), with a `DataError` when it fails."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except (OSError, ValueError) as err:
        raise DataError(f"cannot load a tokenizer from {model_dir}: {err}") from err


def _render(
    tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool, where: str
) -> str:
    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except Exception as err:  # errors raised by the template itself (jinja2, raise_exception)
        raise DataError(f"{where}the chat template failed on this conversation: {err}") from err


def assistant_char_spans(tokenizer: Any, sample: ChatSample) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the `[start, end)` character span of each assistant turn."""
    messages = [{"role": m.role, "content": m.content} for m in sample.messages]
    where = f"{sample.location}: " if sample.location else ""
    text = _render(tokenizer, messages, False, where)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], True, where)
        through = _render(tokenizer, messages[: i + 1], False, where)
        if not (text.startswith(before) and text.startswith(through)):
            raise DataError(
                f"{where}the chat template renders assistant turn {i} differently once later "
                "turns follow, so its tokens cannot be located; use a prefix-stable template"
            )
        spans.append((len(before), len(through)))
    return text, spans


def tokenize_chat(tokenizer: Any, sample: ChatSample) -> TokenizedSample:
    """Tokenize a conversation; only tokens overlapping assistant spans are trained."""
    text, spans = assistant_char_spans(tokenizer, sample)
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    loss_mask = [
        int(any(tok_start < end and tok_end > start for start, end in spans))
        for tok_start, tok_end in encoding["offset_mapping"]
    ]
    return TokenizedSample(list(encoding["input_ids"]), loss_mask)


def tokenize_prompt_completion(tokenizer: Any, sample: PromptCompletionSample) -> TokenizedSample:
    """Prompt tokens (masked), then completion tokens and EOS (trained)."""
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no eos_token, which prompt/completion samples end with")
    prompt = list(tokenizer(sample.prompt, add_special_tokens=True)["input_ids"])
    completion = list(tokenizer(sample.completion, add_special_tokens=False)["input_ids"])
    completion.append(tokenizer.eos_token_id)
    return TokenizedSample(prompt + completion, [0] * len(prompt) + [1] * len(completion))


def tokenize_sample(tokenizer: Any, sample: SFTSample, max_seq_len: int) -> TokenizedSample:
    """Tokenize one sample of either format and truncate it to `max_seq_len` tokens."""
    if isinstance(sample, ChatSample):
        tokenized = tokenize_chat(tokenizer, sample)
    else:
        tokenized = tokenize_prompt_completion(tokenizer, sample)
    if len(tokenized) <= max_seq_len:
        return tokenized
    return TokenizedSample(tokenized.input_ids[:max_seq_len], tokenized.loss_mask[:max_seq_len])


def tokenize_samples(
    tokenizer: Any, samples: Iterable[SFTSample], max_seq_len: int
) -> list[TokenizedSample]:
    """`tokenize_sample` over `samples`, in order."""
    if max_seq_len < 2:
        raise DataError(f"max_seq_len must be at least 2, got {max_seq_len}")
    return [tokenize_sample(tokenizer, sample, max_seq_len) for sample in samples]


def trained_token_ids(sample: TokenizedSample) -> list[int]:
    """The ids of the tokens the sample trains, in order."""
    return [tok for tok, keep in zip(sample.input_ids, sample.loss_mask, strict=True) if keep]


def drop_untrained(samples: Sequence[TokenizedSample]) -> tuple[list[TokenizedSample], int]:
    """The samples that still train at least one token (after truncation) and how many were not.

    The first token of a sample is never a target (nothing precedes it), so it does not count.
    """
    kept = [s for s in samples if sum(s.loss_mask[1:]) > 0]
    return kept, len(samples) - len(kept)
