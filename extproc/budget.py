"""Token budgets: how many tokens a request asks of a context window, counted before any replica.

A request needs its prompt plus its output limit (``max_completion_tokens``, ``max_tokens`` or
``max_output_tokens``) to fit the context window of the version that serves it; the picker
refuses one that fits no version's window (413 ``context_length_exceeded``, ``_fit_window``).

What is counted (``requested_tokens``), with a ``TextCounter``: the model's tokenizer where the
spec names one (``tokenizer_counter``: the ids that ``tokenizer.json`` encodes, its special
tokens included), else the estimate (``estimate_counter``: ``CHARS_PER_TOKEN`` characters a token):

* chat ``messages`` (and a Responses API ``input`` list of messages): the text of the contents
  (strings and text parts), newline-joined into one sequence. The chat template the engine
  wraps them in (role markers: a few tokens a message) is not counted: the ext_proc lacks it;
* completions ``prompt`` / embeddings ``input``: a string, or token ids (one token each); of a
  batch the largest prompt counts (each is its own sequence in the engine);
* KServe v2 JSON ``inputs``: the strings of its ``BYTES`` tensors, one sequence; numeric tensors,
  binary tensor data and gRPC bodies count nothing.

The cheap bound (``could_exceed``) decides whether counting, or reading the body at all, can
matter: a token of a real tokenizer covers at least one byte of text, and a JSON body is never
shorter than the text it carries (escapes only lengthen it; its braces and keys outweigh the few
special tokens a tokenizer adds), so the body's size in bytes bounds its prompt's tokens, and a
quarter of it bounds the estimate.
"""

from __future__ import annotations

from collections.abc import Callable

from tokenizers import Tokenizer

from extproc.routing_view import ModelView

# Text tokens are estimated at this many characters each (English text with BPE tokenizers runs
# at about 4), for a model whose spec names no tokenizer.
CHARS_PER_TOKEN = 4

# Counts the tokens of one sequence made of these texts (newline-joined).
TextCounter = Callable[[list[str]], int]


def estimate_counter(texts: list[str]) -> int:
    chars = sum(len(t) for t in texts)
    return (chars + CHARS_PER_TOKEN - 1) // CHARS_PER_TOKEN


def tokenizer_counter(tokenizer: Tokenizer) -> TextCounter:
    def count(texts: list[str]) -> int:
        return len(tokenizer.encode("\n".join(texts)).ids) if texts else 0

    return count


def output_tokens(doc: dict) -> int:
    """The output limit the body asks for (0: it names none)."""
    for name in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
        value = doc.get(name)
        if type(value) is int and value > 0:
            return value
    return 0


def requested_tokens(doc: dict, count: TextCounter = estimate_counter) -> int:
    """Prompt tokens (as the module docstring says) plus the output limit."""
    tokens = output_tokens(doc)
    messages = doc.get("messages")
    if type(messages) is list:
        return tokens + count(_message_texts(messages))
    prompt = doc.get("prompt")
    if prompt is None:
        prompt = doc.get("input")
    if prompt is not None:
        return tokens + _prompt_tokens(prompt, count)
    inputs = doc.get("inputs")
    if type(inputs) is list:
        return tokens + count(_tensor_texts(inputs))
    return tokens


def window_floor(model: ModelView, version: str | None) -> int:
    """The smallest known context window among the versions a request may reach (the pinned one,
    else the routed ones); 0 when none is known: nothing to check."""
    if version is not None:
        v = model.by_version.get(version)
        return v.context_window if v is not None else 0
    return min((v.context_window for v in model.routed if v.context_window), default=0)


def prompt_bound(size: int | None, precise: bool) -> int | None:
    """The most prompt tokens a body of ``size`` bytes can count (None: size unknown)."""
    if size is None:
        return None
    return size if precise else (size + CHARS_PER_TOKEN - 1) // CHARS_PER_TOKEN


def could_exceed(size: int | None, window: int, precise: bool, output: int = 0) -> bool:
    """Whether a body of ``size`` bytes (None: unknown, e.g. chunked) asking for ``output``
    tokens could need more than ``window`` tokens; ``precise``: counted by a tokenizer."""
    if window <= 0:
        return False
    bound = prompt_bound(size, precise)
    return bound is None or bound + output > window


def _content_texts(content: object, into: list[str]) -> None:
    """A chat message's content: a string, or a list of parts (strings, or dicts with "text")."""
    if type(content) is str:
        into.append(content)
    elif type(content) is list:
        for part in content:
            if type(part) is dict:
                text = part.get("text")
                if type(text) is str:
                    into.append(text)
            elif type(part) is str:
                into.append(part)


def _message_texts(messages: list) -> list[str]:
    texts: list[str] = []
    for message in messages:
        if type(message) is dict:
            _content_texts(message.get("content"), texts)
    return texts


def _prompt_tokens(prompt: object, count: TextCounter) -> int:
    """One ``prompt``/``input``: a string, token ids, a list of messages, or a batch (its largest)."""
    if type(prompt) is str:
        return count([prompt])
    if type(prompt) is not list or not prompt:
        return 0
    first = prompt[0]
    if type(first) is int:
        return len(prompt)  # already token ids
    if type(first) is dict:  # Responses API: a list of messages
        return count(_message_texts(prompt))
    largest = 0
    for item in prompt:
        if type(item) is str:
            tokens = count([item])
        elif type(item) is list:
            tokens = len(item)
        else:
            continue
        largest = max(largest, tokens)
    return largest


def _tensor_texts(inputs: list) -> list[str]:
    """The strings of a KServe v2 JSON request's BYTES tensors (``data`` may be nested lists)."""
    texts: list[str] = []
    for tensor in inputs:
        if type(tensor) is dict and tensor.get("datatype") == "BYTES":
            _strings(tensor.get("data"), texts)
    return texts


def _strings(data: object, into: list[str]) -> None:
    if type(data) is str:
        into.append(data)
    elif type(data) is list:
        for item in data:
            _strings(item, into)
