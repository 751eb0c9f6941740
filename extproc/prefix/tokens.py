"""Precise mode's lookup side: a request's prompt as the engine's token ids.

An engine's KV events carry token ids (``kv_events.TokenKeys`` re-hashes them with our chain,
``blocks.token_block_hashes``); a lookup matches them only if the ext_proc hashes the very same
ids. So a model whose spec names a ``tokenizer`` (an HF ``tokenizer.json``, the file the engine
loads) has its prompts tokenized here, as the engine does:

* completions: a string prompt is encoded with the tokenizer's own special tokens (vLLM's
  ``add_special_tokens`` default for completions); a token-id prompt is used as it is; of a
  batch, the first prompt counts (each prompt is its own sequence in the engine);
* chat: the engine applies the model's chat template, which the ext_proc does not have; chat
  requests stay on the approximate character blocks (``prompt.py``) even for such a model.

Tokenizers load once per path per process (``TokenizerCache``); a file that cannot be loaded is
logged once and the model stays approximate. The context-window check counts with the same
tokenizers (extproc/budget.py).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from tokenizers import Tokenizer

log = logging.getLogger("imesh.extproc.prefix")


class TokenizerCache:
    """Tokenizers by path, each loaded once (None: it could not be)."""

    def __init__(self) -> None:
        self._loaded: dict[str, Tokenizer | None] = {}

    def get(self, path: str) -> Tokenizer | None:
        if not path:
            return None
        if path not in self._loaded:
            self._loaded[path] = _load(path)
        return self._loaded[path]


def _load(path: str) -> Tokenizer | None:
    try:
        tokenizer = Tokenizer.from_file(path)
    except Exception as exc:  # the library raises plain Exceptions for missing or invalid files
        log.error("cannot load tokenizer %s (%s): its model stays on estimates (tokens, prefixes)", path, exc)
        return None
    # An engine encodes a prompt as it is: a tokenizer.json's padding (to a batch length) and
    # truncation (to the model's training length) would pad the ids and cap the counts.
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


def prompt_token_ids(body: object, tokenizer: Tokenizer) -> list[int] | None:
    """The token ids of a completions request's (first) prompt; None for anything else."""
    if not isinstance(body, Mapping) or "messages" in body:
        return None
    prompt = body.get("prompt")
    if type(prompt) is list and prompt and type(prompt[0]) is not int:
        prompt = prompt[0]  # a batch: its first prompt
    if type(prompt) is str:
        return tokenizer.encode(prompt).ids if prompt else None
    if type(prompt) is list and prompt and all(type(t) is int and 0 <= t < 1 << 32 for t in prompt):
        return prompt
    return None
