"""Rows as users bring them -> one normalized sample: a conversation or a prompt/completion pair.

Accepted rows (column names configurable with `Columns`):

- OpenAI chat: ``{"messages": [...], "tools": [...]}``. A message has a `role` (system, user,
  assistant, tool) and a `content` (a string, null, or a list of ``{"type": "text", "text": ...}``
  parts, joined); an assistant message may carry `reasoning_content` and `tool_calls`
  (``{"type": "function", "function": {"name": ..., "arguments": ...}}`` or the bare function
  object, `arguments` a JSON string or an object; its null content becomes ""); a tool message
  may carry `name` and `tool_call_id`. `tools` is a list of function schemas, or a JSON string of
  one.
- ShareGPT: ``{"conversations": [{"from": ..., "value": ...}, ...], "system": ..., "tools": ...}``
  with `from` one of system, human, gpt, function_call (value: a JSON object ``{"name",
  "arguments"}`` or a list of them), observation; mapped to the OpenAI form above.
- Prompt/completion: ``{"prompt": "...", "completion": "..."}``.

Nulls inside tool schemas and tool-call arguments are dropped: Arrow (Parquet, datasets folders)
stores objects with different keys as one struct type and fills the keys a row lacks with null,
so only without them do the same rows render the same from every format. A row with images or
videos (an `images` / `videos` column, or image/video content parts) is refused: only text is
trained. Every problem raises `ValueError` naming the field (``messages[2].tool_calls[0]``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "function_call": "assistant",
    "observation": "tool",
    "tool": "tool",
}
MEDIA_COLUMNS = ("images", "videos", "image", "video")
MEDIA_PART_TYPES = ("image", "image_url", "video", "video_url", "input_image", "audio")


@dataclass
class Columns:
    """Column names of each format (`data.columns`), defaults as the formats name them (a plain
    dataclass: the config's `data.columns` is one, and Hydra overrides set its fields)."""

    messages: str = "messages"
    tools: str = "tools"
    conversations: str = "conversations"
    system: str = "system"
    prompt: str = "prompt"
    completion: str = "completion"

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, str]) -> Columns:
        """`Columns` with the given names replaced; an unknown key raises `ValueError`."""
        known = tuple(cls.__dataclass_fields__)
        unknown = sorted(set(mapping) - set(known))
        if unknown:
            raise ValueError(
                f"unknown data.columns key(s) {', '.join(unknown)}; the keys are {', '.join(known)}"
            )
        return cls(**{key: str(value) for key, value in mapping.items()})

    def describe(self) -> str:
        """The accepted row shapes, for error messages."""
        return (
            f'chat {{"{self.messages}": [...]}}, ShareGPT {{"{self.conversations}": [...]}} or '
            f'{{"{self.prompt}": ..., "{self.completion}": ...}} (other column names: data.columns)'
        )


@dataclass(frozen=True)
class ChatSample:
    """A conversation in the OpenAI form the chat template renders; assistant turns are trained."""

    messages: tuple[dict[str, Any], ...]
    tools: tuple[dict[str, Any], ...] | None = None
    location: str = field(default="", compare=False)


@dataclass(frozen=True)
class PromptCompletionSample:
    """A prompt (not trained) and its completion (trained, followed by EOS)."""

    prompt: str
    completion: str
    location: str = field(default="", compare=False)


SFTSample = ChatSample | PromptCompletionSample


def drop_nulls(value: Any) -> Any:
    """`value` with every null dict entry removed, recursively (lists keep their items)."""
    if isinstance(value, Mapping):
        return {str(k): drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list | tuple):
        return [drop_nulls(item) for item in value]
    return value


def _json_value(value: Any, where: str, kind: type) -> Any:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where} is a string but not valid JSON: {err.msg}") from err
    if not isinstance(value, kind):
        raise ValueError(f"{where} must be a JSON {kind.__name__}, got {type(value).__name__}")
    return drop_nulls(value)


def _text(content: Any, where: str) -> str | None:
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list | tuple):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, Mapping):
                raise ValueError(f"{where}[{j}] must be an object, got {type(part).__name__}")
            kind = part.get("type")
            if kind in MEDIA_PART_TYPES or any(
                part.get(key) is not None for key in MEDIA_PART_TYPES
            ):
                raise ValueError(
                    f"{where}[{j}] is an {kind or 'image/video'} part; only text is trained "
                    "(image and video training is not supported): remove such samples"
                )
            if not isinstance(part.get("text"), str):
                raise ValueError(f'{where}[{j}] needs a string "text"')
            texts.append(part["text"])
        return "".join(texts)
    raise ValueError(
        f"{where} must be a string, null or a list of text parts, got {type(content).__name__}"
    )


def _tool_call(call: Any, where: str) -> dict[str, Any]:
    if not isinstance(call, Mapping):
        raise ValueError(f"{where} must be an object, got {type(call).__name__}")
    function = call.get("function") if call.get("function") is not None else call
    if not isinstance(function, Mapping):
        raise ValueError(f"{where}.function must be an object")
    name = function.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError(f'{where} needs a string function "name"')
    arguments = function.get("arguments")
    arguments = {} if arguments is None else _json_value(arguments, f"{where}.arguments", dict)
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


def _message(item: Any, where: str) -> dict[str, Any]:
    if not isinstance(item, Mapping):
        raise ValueError(f"{where} must be an object, got {type(item).__name__}")
    role = item.get("role")
    if role not in ROLES:
        raise ValueError(f"{where}.role is {role!r}; expected one of {', '.join(ROLES)}")
    message: dict[str, Any] = {
        "role": role,
        "content": _text(item.get("content"), f"{where}.content"),
    }
    if role == "assistant":
        reasoning = item.get("reasoning_content")
        if reasoning is not None:
            if not isinstance(reasoning, str):
                raise ValueError(f"{where}.reasoning_content must be a string")
            message["reasoning_content"] = reasoning
        calls = item.get("tool_calls")
        if calls is not None:
            if not isinstance(calls, list | tuple):
                raise ValueError(f"{where}.tool_calls must be a list")
            if calls:
                message["tool_calls"] = [
                    _tool_call(call, f"{where}.tool_calls[{j}]") for j, call in enumerate(calls)
                ]
    elif role == "tool":
        for key in ("name", "tool_call_id"):
            if isinstance(item.get(key), str):
                message[key] = item[key]
    if message["content"] is None:
        if "tool_calls" not in message:
            raise ValueError(f'{where} has no "content"')
        message["content"] = ""
    return message


def _sharegpt(turns: Any, system: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(turns, list | tuple):
        raise ValueError(f"{where} must be a list of objects, got {type(turns).__name__}")
    messages: list[dict[str, Any]] = []
    if isinstance(system, str) and system:
        messages.append({"role": "system", "content": system})
    for i, turn in enumerate(turns):
        at = f"{where}[{i}]"
        if not isinstance(turn, Mapping):
            raise ValueError(f"{at} must be an object, got {type(turn).__name__}")
        sender, value = turn.get("from"), turn.get("value")
        if sender not in SHAREGPT_ROLES:
            raise ValueError(
                f"{at}.from is {sender!r}; expected one of {', '.join(SHAREGPT_ROLES)}"
            )
        if not isinstance(value, str):
            raise ValueError(f"{at}.value must be a string, got {type(value).__name__}")
        if sender == "function_call":
            calls = _json_value(value, f"{at}.value", object)
            calls = calls if isinstance(calls, list) else [calls]
            tool_calls = [_tool_call(call, f"{at}.value") for call in calls]
            messages.append({"role": "assistant", "content": "", "tool_calls": tool_calls})
        else:
            messages.append({"role": SHAREGPT_ROLES[sender], "content": value})
    return messages


def _check_chat(messages: list[dict[str, Any]], where: str) -> None:
    if not messages:
        raise ValueError(f"{where} is empty")
    if not any(message["role"] == "assistant" for message in messages):
        raise ValueError(f"{where} has no assistant turn, so nothing would be trained")


def _refuse_media(record: Mapping[str, Any]) -> None:
    for key in MEDIA_COLUMNS:
        value = record.get(key)
        if value is not None and value != [] and value != "":
            raise ValueError(
                f'has "{key}": image and video training is not supported yet, and training the '
                "text alone would silently drop them; remove such samples or the column"
            )


def parse_record(record: Any, columns: Columns | None = None, location: str = "") -> SFTSample:
    """Normalize one row (a mapping) into a sample, reading the column names `columns` (default:
    the formats' own names); raises `ValueError` saying what is wrong."""
    if not isinstance(record, Mapping):
        raise ValueError(f"expected an object, got {type(record).__name__}")
    _refuse_media(record)
    c = columns or Columns()
    present = [
        key
        for key in (c.messages, c.conversations, c.prompt, c.completion)
        if record.get(key) is not None
    ]
    chat = c.messages in present or c.conversations in present
    prompt = c.prompt in present or c.completion in present
    if chat and prompt:
        raise ValueError(
            f'has both a conversation and "{c.prompt}"/"{c.completion}"; use one format per row'
        )
    if c.messages in present and c.conversations in present:
        raise ValueError(f'has both "{c.messages}" and "{c.conversations}"; use one per row')
    if c.messages in present:
        items = record[c.messages]
        if not isinstance(items, list | tuple):
            raise ValueError(
                f'"{c.messages}" must be a list of objects, got {type(items).__name__}'
            )
        messages = [_message(item, f"{c.messages}[{i}]") for i, item in enumerate(items)]
        _check_chat(messages, f'"{c.messages}"')
    elif c.conversations in present:
        messages = _sharegpt(record[c.conversations], record.get(c.system), c.conversations)
        _check_chat(messages, f'"{c.conversations}"')
    elif prompt:
        for key in (c.prompt, c.completion):
            if not isinstance(record.get(key), str):
                got = type(record.get(key)).__name__ if key in present else "nothing"
                raise ValueError(f'"{key}" must be a string, got {got}')
        return PromptCompletionSample(record[c.prompt], record[c.completion], location)
    else:
        keys = ", ".join(sorted(map(str, record))) or "none"
        raise ValueError(f"is none of the supported formats: {c.describe()}; its columns: {keys}")
    tools = record.get(c.tools)
    if tools is not None and tools != "":
        tools = _json_value(tools, f'"{c.tools}"', list)
        if not all(isinstance(tool, dict) for tool in tools):
            raise ValueError(f'"{c.tools}" must be a list of objects')
    return ChatSample(tuple(messages), tuple(tools) if tools else None, location)
