"""Turn normalized samples into token ids with loss masks.

`loss_mask[t] == 1` means token `t` is a training target, i.e. the model is trained to predict
`input_ids[t]` from the tokens before it; labels are shifted at batch time (see `packing`).

Chat samples are rendered once, whole, by the tokenizer's own chat template (with the sample's
`tools` and `enable_thinking`), and tokenized. The assistant turns are then located in that
text with markers the template itself yields (`TemplateMarkers`, probed on a tiny
conversation): each turn starts after the assistant header (``<|im_start|>assistant\\n``) and
ends with the end-of-turn text (``<|im_end|>\\n``). So templates that render a turn differently
once later turns follow (Qwen3.5 drops the reasoning of turns before the last user query) are
masked as they render. What the generation prompt already holds after the header (``<think>\\n``)
and an empty think block (``<think>\\n\\n</think>\\n\\n``) are not trained. `train_on` picks the
turns: `all_assistant` or `last_assistant`. Tokens overlapping a trained character span, by the
tokenizer's offset mapping, are trained.

Prompt/completion samples: prompt and completion are tokenized separately (as at inference,
where the completion is generated after the tokenized prompt); the completion and an EOS token
are trained.

A sample longer than `max_seq_len` tokens is handled per `overlong`: `drop` (skipped), `truncate`
(cut to `max_seq_len`, keeping the beginning) or `error`; see `Status`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any

from lora_trainer.data.formats import ChatSample, PromptCompletionSample, SFTSample
from lora_trainer.errors import CheckpointError, DataError

TRAIN_ON = ("all_assistant", "last_assistant")
OVERLONG = ("drop", "truncate", "error")
_PROBE_USER, _PROBE_ASSISTANT, _PROBE_NEXT = "Q7x", "A9z", "N5k"


@dataclass(frozen=True)
class TokenizeSettings:
    """How samples become tokens: `data.max_seq_len`, `data.train_on`, `data.enable_thinking`,
    `data.overlong`."""

    max_seq_len: int
    train_on: str = "all_assistant"
    enable_thinking: bool = True
    overlong: str = "drop"

    def __post_init__(self) -> None:
        if self.max_seq_len < 2:
            raise DataError(f"data.max_seq_len must be at least 2, got {self.max_seq_len}")
        if self.train_on not in TRAIN_ON:
            raise DataError(
                f"data.train_on={self.train_on!r} is unknown; use one of {', '.join(TRAIN_ON)}"
            )
        if self.overlong not in OVERLONG:
            raise DataError(
                f"data.overlong={self.overlong!r} is unknown; use one of {', '.join(OVERLONG)}"
            )


class Status(IntEnum):
    """What became of a sample: kept whole, kept truncated, or dropped (too long / nothing
    trained)."""

    KEPT = 0
    TRUNCATED = 1
    OVERLONG = 2
    UNTRAINED = 3


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

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except (OSError, ValueError) as err:
        raise DataError(f"cannot load a tokenizer from {model_dir}: {err}") from err


def require_chat_template(tokenizer: Any, model_dir: str | Path) -> None:
    """`CheckpointError` when the tokenizer has no chat template (chat samples need one)."""
    if not getattr(tokenizer, "chat_template", None):
        raise CheckpointError(
            f"the tokenizer in {model_dir} has no chat template (chat_template.jinja or "
            "tokenizer_config.json's chat_template), and chat samples are rendered with it: use "
            "the tokenizer files of the instruct/chat model, or prompt/completion rows"
        )


def _render(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    settings: TokenizeSettings,
    *,
    tools: Any = None,
    generation: bool = False,
) -> str:
    return tokenizer.apply_chat_template(
        messages,
        tools=tools,
        tokenize=False,
        add_generation_prompt=generation,
        enable_thinking=settings.enable_thinking,
    )


@dataclass(frozen=True)
class TemplateMarkers:
    """Texts the chat template puts around an assistant turn, probed on a tiny conversation.

    `header` opens every assistant turn; `given` is what the generation prompt adds after it
    (e.g. ``<think>\\n``); `empty_think` is what a turn without reasoning starts with after the
    header when it is the last turn (e.g. ``<think>\\n\\n</think>\\n\\n``); `eot` ends a turn.
    """

    header: str
    given: str
    empty_think: str
    eot: str

    @classmethod
    def probe(cls, tokenizer: Any, settings: TokenizeSettings) -> TemplateMarkers:
        user = {"role": "user", "content": _PROBE_USER}
        answer = {"role": "assistant", "content": _PROBE_ASSISTANT}
        follow = {"role": "user", "content": _PROBE_NEXT}
        try:
            context = _render(tokenizer, [user], settings)
            prompt = _render(tokenizer, [user], settings, generation=True)
            last = _render(tokenizer, [user, answer], settings)
            history = _render(tokenizer, [user, answer, follow], settings)
        except Exception as err:  # errors raised by the template itself (jinja2, raise_exception)
            raise DataError(f"the chat template fails on a one-turn conversation: {err}") from err
        parts = []
        for text in (prompt, last, history):
            if not text.startswith(context):
                raise DataError(
                    "the chat template renders the first user turn differently once an assistant "
                    "turn follows, so assistant turns cannot be located in its output"
                )
            parts.append(text[len(context) :])
        generated, last_turn, history_turn = parts
        if _PROBE_ASSISTANT not in last_turn or _PROBE_ASSISTANT not in history_turn:
            raise DataError("the chat template does not render the assistant content verbatim")
        last_header, _, eot = last_turn.partition(_PROBE_ASSISTANT)
        history_header = history_turn.partition(_PROBE_ASSISTANT)[0]
        # The common prefix of three texts (character by character, as wanted here).
        header = os.path.commonprefix([generated, last_header, history_header])  # noqa: RUF071
        if not header or not eot:
            raise DataError(
                "the chat template has no fixed assistant header or end-of-turn text, so "
                "assistant turns cannot be located in its output"
            )
        return cls(header, generated[len(header) :], last_header[len(header) :], eot)

    def assistant_spans(self, text: str, count: int, where: str) -> list[tuple[int, int]]:
        """The `[start, end)` trained characters of the `count` assistant turns in `text`."""
        if text.count(self.header) != count:
            raise DataError(
                f"{where}the rendered conversation holds the assistant header {self.header!r} "
                f"{text.count(self.header)} times for {count} assistant turns (a message contains "
                "the template's own markup); remove it from the message"
            )
        spans, cursor = [], 0
        for _ in range(count):
            start = text.index(self.header, cursor) + len(self.header)
            for skip in (self.empty_think, self.given):
                if skip and text.startswith(skip, start):
                    start += len(skip)
                    break
            end = text.find(self.eot, start)
            if end < 0:
                raise DataError(f"{where}an assistant turn has no end-of-turn {self.eot!r}")
            cursor = end + len(self.eot)
            spans.append((start, cursor))
        return spans


class SampleTokenizer:
    """Tokenizes samples of either format with one tokenizer and `TokenizeSettings`."""

    def __init__(self, tokenizer: Any, settings: TokenizeSettings) -> None:
        self.tokenizer = tokenizer
        self.settings = settings
        self._markers: TemplateMarkers | None = None

    @property
    def markers(self) -> TemplateMarkers:
        """The template's markers, probed on first use."""
        if self._markers is None:
            self._markers = TemplateMarkers.probe(self.tokenizer, self.settings)
        return self._markers

    def render_chat(self, sample: ChatSample) -> tuple[str, list[tuple[int, int]]]:
        """The template's text of the conversation and the trained character spans."""
        where = f"{sample.location}: " if sample.location else ""
        messages = [dict(message) for message in sample.messages]
        tools = [dict(tool) for tool in sample.tools] if sample.tools else None
        try:
            text = _render(self.tokenizer, messages, self.settings, tools=tools)
        except Exception as err:  # errors raised by the template itself (jinja2, raise_exception)
            raise DataError(f"{where}the chat template failed on this conversation: {err}") from err
        count = sum(message["role"] == "assistant" for message in messages)
        spans = self.markers.assistant_spans(text, count, where)
        if self.settings.train_on == "last_assistant":
            spans = spans[-1:]
        return text, spans

    def chat(self, sample: ChatSample) -> TokenizedSample:
        """Tokenize a conversation; only tokens overlapping trained spans are trained."""
        text, spans = self.render_chat(sample)
        encoding = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        loss_mask = [
            int(any(tok_start < end and tok_end > start for start, end in spans))
            for tok_start, tok_end in encoding["offset_mapping"]
        ]
        return TokenizedSample(list(encoding["input_ids"]), loss_mask)

    def prompt_completion(self, sample: PromptCompletionSample) -> TokenizedSample:
        """Prompt tokens (masked), then completion tokens and EOS (trained)."""
        eos = self.tokenizer.eos_token_id
        if eos is None:
            raise DataError(
                "the tokenizer has no eos_token, which prompt/completion samples end with"
            )
        prompt = list(self.tokenizer(sample.prompt, add_special_tokens=True)["input_ids"])
        completion = list(self.tokenizer(sample.completion, add_special_tokens=False)["input_ids"])
        completion.append(eos)
        return TokenizedSample(prompt + completion, [0] * len(prompt) + [1] * len(completion))

    def __call__(self, sample: SFTSample) -> tuple[TokenizedSample, Status]:
        """The tokenized sample (cut when `overlong=truncate`) and its `Status`.

        The first token of a sample is never a target (nothing precedes it), so a sample whose
        mask is 1 only there, or nowhere, is `UNTRAINED`.
        """
        if isinstance(sample, ChatSample):
            tokenized = self.chat(sample)
        else:
            tokenized = self.prompt_completion(sample)
        status = Status.KEPT
        limit = self.settings.max_seq_len
        if len(tokenized) > limit:
            if self.settings.overlong != "truncate":
                return tokenized, Status.OVERLONG
            tokenized = TokenizedSample(tokenized.input_ids[:limit], tokenized.loss_mask[:limit])
            status = Status.TRUNCATED
        if sum(tokenized.loss_mask[1:]) == 0:
            return tokenized, Status.UNTRAINED
        return tokenized, status


def trained_token_ids(sample: TokenizedSample) -> list[int]:
    """The ids of the tokens the sample trains, in order."""
    return [tok for tok, keep in zip(sample.input_ids, sample.loss_mask, strict=True) if keep]
