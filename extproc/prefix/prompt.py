"""The prompt text whose prefix an engine can reuse, rendered from a parsed request body.

An engine caches the KV of the tokens its chat template produced; the ext_proc has no template,
so it renders its own canonical text with the property that matters: a conversation that extends
another renders to a text that extends the other's. Each chat message is
``RS role US content`` (ASCII record and unit separators, which ordinary text does not contain),
in the order given, so the system prompt, sent first, leads. A request's ``tools``, which chat
templates put into the system part, come before the messages as canonical JSON.

Recognised bodies:

* OpenAI chat (``messages``): content a string, None, or a list of parts; a ``text`` part is its
  text, any other part (image, audio, file) its canonical JSON, so two different images differ;
  an assistant message's ``tool_calls`` follow its content as canonical JSON;
* OpenAI completions (``prompt``): a string, a list of strings, token ids, or a list of token id
  lists; a batch renders as its prompts joined by RS (so the first prompt's prefix leads);
* anything else (KServe v2 ``inputs``, embeddings ``input``): None, no affinity.

Malformed input returns None and never raises: affinity is an optimisation, the request is
validated elsewhere. ``max_chars`` stops rendering once the text is that long (the block hasher
never looks further), so a huge body costs no more than the cap.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

RECORD = "\x1e"  # before each message, and between the prompts of a batch
UNIT = "\x1f"  # between a message's role and its content
PART = "\x1d"  # before a non-text content part, and before tool calls


class _Malformed(Exception):
    """The body is not a shape we render; the caller answers None."""


class _Text:
    """An append-only text that stops growing at ``limit`` characters."""

    __slots__ = ("_parts", "_length", "_limit")

    def __init__(self, limit: int | None):
        self._parts: list[str] = []
        self._length = 0
        self._limit = limit

    @property
    def full(self) -> bool:
        return self._limit is not None and self._length >= self._limit

    def add(self, piece: str) -> None:
        if not self.full:
            self._parts.append(piece)
            self._length += len(piece)

    def value(self) -> str:
        text = "".join(self._parts)
        return text if self._limit is None else text[: self._limit]


def prompt_text(body: object, max_chars: int | None = None) -> str | None:
    """The canonical prompt text of a parsed OpenAI request body, or None (see the module doc)."""
    if not isinstance(body, Mapping):
        return None
    out = _Text(max_chars)
    try:
        if "messages" in body:
            _render_chat(body, out)
        elif "prompt" in body:
            _render_prompt(body["prompt"], out)
        else:
            return None
    except _Malformed:
        return None
    return out.value()


def _canonical_json(value: object) -> str:
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    except (TypeError, ValueError, RecursionError):
        raise _Malformed from None


def _render_chat(body: Mapping[str, Any], out: _Text) -> None:
    messages = body["messages"]
    if type(messages) is not list or not messages:
        raise _Malformed
    tools = body.get("tools")
    if tools:
        out.add(PART + _canonical_json(tools))
    for message in messages:
        if out.full:
            return
        if type(message) is not dict or type(message.get("role")) is not str:
            raise _Malformed
        out.add(RECORD + message["role"] + UNIT)
        _render_content(message.get("content"), out)
        tool_calls = message.get("tool_calls")
        if tool_calls:
            out.add(PART + _canonical_json(tool_calls))


def _render_content(content: object, out: _Text) -> None:
    if content is None:
        return
    if type(content) is str:
        out.add(content)
        return
    if type(content) is not list:
        raise _Malformed
    for part in content:
        if type(part) is str:
            out.add(part)
        elif type(part) is dict and part.get("type") == "text":
            text = part.get("text")
            if type(text) is not str:
                raise _Malformed
            out.add(text)
        elif type(part) is dict and type(part.get("type")) is str:
            out.add(PART + _canonical_json(part))
        else:
            raise _Malformed


def _render_prompt(prompt: object, out: _Text) -> None:
    if type(prompt) is str:
        out.add(prompt)
        return
    if type(prompt) is not list or not prompt:
        raise _Malformed
    if all(type(item) is int for item in prompt):
        _render_ids(prompt, out)
        return
    for i, item in enumerate(prompt):
        if out.full:
            return
        if i:
            out.add(RECORD)
        if type(item) is str:
            out.add(item)
        elif type(item) is list and item and all(type(t) is int for t in item):
            _render_ids(item, out)
        else:
            raise _Malformed


def _render_ids(ids: list[int], out: _Text) -> None:
    # "1,2," cannot be a prefix of "1,23,": every id is terminated.
    for token in ids:
        if out.full:
            return
        out.add(f"{token},")
