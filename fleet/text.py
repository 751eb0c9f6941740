"""Deterministic stand-ins for a tokenizer, a sampler and an embedding model.

Nothing here may depend on wall-clock time or process state (Python's ``hash`` is salted per
process, so we use BLAKE2): the same prompt under the same seed must give the same token
count, the same prefix-cache blocks and the same generated text in every run, on every
replica. That makes mesh tests reproducible whichever replica served them.
"""

from __future__ import annotations

import base64
import hashlib
import math
import re
import struct
from collections.abc import Iterable

_WORD = re.compile(r"\S+")
PIECE_CHARS = 4  # a "token" is at most this many characters of one whitespace-split word

# The vocabulary the simulated sampler draws from.
WORDS: tuple[str, ...] = (
    "the",
    "a",
    "model",
    "replica",
    "token",
    "cache",
    "batch",
    "queue",
    "latency",
    "mesh",
    "envoy",
    "route",
    "prefill",
    "decode",
    "kernel",
    "tensor",
    "memory",
    "bandwidth",
    "score",
    "weight",
    "canary",
    "version",
    "priority",
    "load",
    "signal",
    "stream",
    "request",
    "answer",
    "is",
    "of",
    "and",
    "to",
    "in",
    "for",
    "with",
    "on",
    "fast",
    "slow",
    "busy",
    "idle",
    "ready",
    "simple",
    "honest",
    "deterministic",
    "continuous",
    "block",
    "prefix",
    "hit",
    "miss",
    "gpu",
    "fleet",
    "node",
    "pool",
    "tier",
    "shed",
    "retry",
    "healthy",
    "metric",
    "window",
    "sample",
    "hello",
    "world",
    "yes",
    "no",
)


def tokenize(text: str) -> list[str]:
    """Split text into pseudo-tokens: whitespace words cut into pieces of 4 characters."""
    pieces: list[str] = []
    for word in _WORD.findall(text):
        pieces.extend(word[i : i + PIECE_CHARS] for i in range(0, len(word), PIECE_CHARS))
    return pieces


def _digest(data: bytes, size: int = 8) -> bytes:
    return hashlib.blake2b(data, digest_size=size).digest()


def block_hashes(tokens: list[str], block_size: int) -> list[int]:
    """Cumulative hashes of the prompt's full blocks, as vLLM's prefix cache keys them.

    Block ``i``'s hash covers every token up to the end of block ``i``, so a block only hits
    when the whole prefix before it matches too. A trailing partial block is not cached.
    """
    hashes: list[int] = []
    prev = b""
    for start in range(0, len(tokens) - block_size + 1, block_size):
        chunk = "\x1f".join(tokens[start : start + block_size]).encode()
        prev = _digest(prev + b"\x1e" + chunk)
        hashes.append(int.from_bytes(prev, "big"))
    return hashes


def prompt_key(seed: int, model: str, tokens: Iterable[str]) -> bytes:
    """A digest identifying (seed, model, prompt): the sampler's per-request stream key."""
    return _digest(f"{seed}\x1e{model}\x1e".encode() + "\x1f".join(tokens).encode(), 16)


def generated_word(key: bytes, index: int) -> str:
    """The ``index``-th generated token (a word with a leading space, except the first)."""
    pick = int.from_bytes(_digest(key + index.to_bytes(4, "big"), 4), "big") % len(WORDS)
    return WORDS[pick] if index == 0 else " " + WORDS[pick]


def generated_text(key: bytes, count: int) -> str:
    """The first ``count`` generated tokens, joined."""
    return "".join(generated_word(key, i) for i in range(count))


def embedding(seed: int, model: str, text: str, dim: int = 16) -> list[float]:
    """A small, unit-length, deterministic vector for a text."""
    raw = hashlib.blake2b(f"{seed}\x1e{model}\x1e{text}".encode(), digest_size=dim * 2).digest()
    vec = [(int.from_bytes(raw[i : i + 2], "big") / 32767.5) - 1.0 for i in range(0, dim * 2, 2)]
    norm = math.sqrt(sum(v * v for v in vec)) or 1.0
    return [round(v / norm, 6) for v in vec]


def embedding_base64(vec: list[float]) -> str:
    """Encode a vector as OpenAI's ``encoding_format: base64`` does (little-endian float32)."""
    return base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode()
