"""What a replica tokenizes with: the stand-in of ``fleet.text``, or a real HF ``tokenizer.json``.

A real vLLM and a router that load the same tokenizer agree on a prompt's token ids; precise
prefix affinity (docs/prefix-affinity.md) relies on exactly that. A replica configured with
``tokenizer: path`` therefore tokenizes with the ``tokenizers`` library, as vLLM does, and its
pieces are the token ids themselves (``#<id>``, the form token-id prompts already take here), so
its prefix cache and its KV events carry the ids the router computes.

Without one, pieces are ``fleet.text``'s stand-ins and their ids (``piece_ids``) are a BLAKE2
digest of each piece: deterministic, so KV events still carry stable token ids, but no router
can reproduce them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

from tokenizers import Tokenizer

from fleet import text

Tokenize = Callable[[str], list[str]]
ID_PREFIX = "#"  # a piece that is a token id, as token-id prompts are rendered (fleet.openai_api)


class TokenizerError(ValueError):
    """A tokenizer file that cannot be loaded; the message names it."""


def load_tokenize(path: str | Path | None) -> Tokenize:
    """The replica's tokenize function: the stand-in without a path, else the HF tokenizer's ids."""
    if path is None:
        return text.tokenize
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:  # the library raises plain Exceptions for unreadable or invalid files
        raise TokenizerError(f"cannot load tokenizer {path}: {exc}") from None

    def tokenize(prompt: str) -> list[str]:
        # add_special_tokens, as vLLM's completions endpoint does by default.
        return [f"{ID_PREFIX}{i}" for i in tokenizer.encode(prompt).ids]

    return tokenize


def piece_ids(pieces: list[str]) -> list[int]:
    """The uint32 token id of each piece: its own for ``#<id>``, a digest of it otherwise."""
    return [_piece_id(p) for p in pieces]


def _piece_id(piece: str) -> int:
    if piece.startswith(ID_PREFIX) and piece[1:].isdigit():
        value = int(piece[1:])
        if value < 1 << 32:
            return value
    return int.from_bytes(hashlib.blake2b(piece.encode(), digest_size=4).digest(), "big")
