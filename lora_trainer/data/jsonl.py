"""Read JSONL SFT files: one sample per line, chat `messages` or `prompt`/`completion`.

A line is either ``{"messages": [{"role": ..., "content": ...}, ...]}`` with at least one assistant
turn, or ``{"prompt": ..., "completion": ...}`` with string values. Other top-level keys (ids,
sources) and other message keys are ignored. Blank lines are skipped. Any other line raises
`DataError` naming the file, the line number and what is wrong.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_trainer.errors import DataError

ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class Message:
    """One chat turn."""

    role: str
    content: str


@dataclass(frozen=True)
class ChatSample:
    """A conversation; the assistant turns are trained. `location` is ``file:line`` for errors."""

    messages: tuple[Message, ...]
    location: str = field(default="", compare=False)


@dataclass(frozen=True)
class PromptCompletionSample:
    """A prompt (not trained) and its completion (trained, followed by EOS)."""

    prompt: str
    completion: str
    location: str = field(default="", compare=False)


SFTSample = ChatSample | PromptCompletionSample


def _parse_messages(value: Any) -> tuple[Message, ...]:
    if not isinstance(value, list):
        raise ValueError(f'"messages" must be a list of objects, got {type(value).__name__}')
    messages = []
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise ValueError(f"messages[{i}] must be an object, got {type(item).__name__}")
        role, content = item.get("role"), item.get("content")
        if not isinstance(role, str):
            raise ValueError(f'messages[{i}] needs a string "role", got {role!r}')
        if role not in ROLES:
            raise ValueError(f"messages[{i}] has unknown role {role!r}; expected one of {ROLES}")
        if not isinstance(content, str):
            raise ValueError(
                f'messages[{i}] needs a string "content", got {type(content).__name__}'
            )
        messages.append(Message(role, content))
    if not any(message.role == "assistant" for message in messages):
        raise ValueError("the conversation has no assistant turn, so nothing would be trained")
    return tuple(messages)


def parse_record(record: Any, location: str = "") -> SFTSample:
    """Turn one decoded JSON value into a sample; raises `ValueError` saying what is wrong."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    is_chat = "messages" in record
    is_prompt = "prompt" in record or "completion" in record
    if is_chat and is_prompt:
        raise ValueError('has both "messages" and "prompt"/"completion"; use one format per line')
    if is_chat:
        return ChatSample(_parse_messages(record["messages"]), location)
    if is_prompt:
        for key in ("prompt", "completion"):
            if key not in record:
                raise ValueError(f'has no "{key}"; a prompt/completion sample needs both')
            if not isinstance(record[key], str):
                raise ValueError(f'"{key}" must be a string, got {type(record[key]).__name__}')
        return PromptCompletionSample(record["prompt"], record["completion"], location)
    raise ValueError(
        'is neither a chat sample ({"messages": [...]}) nor a prompt/completion sample '
        '({"prompt": ..., "completion": ...}); keys: ' + ", ".join(sorted(map(str, record)))
    )


def read_jsonl(path: str | Path) -> list[SFTSample]:
    """Every sample of the JSONL file at `path`, in file order.

    Raises `DataError` for a missing or unreadable file, a file without samples, and for the first
    bad line (``path:line: what is wrong``).
    """
    path = Path(path)
    samples: list[SFTSample] = []
    try:
        with path.open("rb") as f:
            for lineno, raw in enumerate(f, start=1):
                location = f"{path}:{lineno}"
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise DataError(f"{location}: not valid UTF-8 ({err.reason})") from err
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(
                        f"{location}: invalid JSON: {err.msg} (column {err.colno})"
                    ) from err
                try:
                    samples.append(parse_record(record, location))
                except ValueError as err:
                    raise DataError(f"{location}: {err}") from err
    except OSError as err:
        raise DataError(f"cannot read the dataset file {path}: {err.strerror or err}") from err
    if not samples:
        raise DataError(f"the dataset file {path} has no samples")
    return samples
