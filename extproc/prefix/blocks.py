"""Chained hashes of a prompt's fixed-size blocks: the keys of the prefix index.

Block ``i``'s hash is ``H(hash[i-1] || bytes of block i)``, the chain starting from
``H(seed)``. Equal hashes at position ``i`` mean (up to a 2**-64 collision) that the whole prompt
up to the end of block ``i`` is equal, which is what an engine's prefix cache needs: a cached
block is only usable after all the blocks before it. Only full blocks are hashed, as an engine
caches only full KV blocks; a trailing partial block is ignored.

Blocks are measured in *characters*, not tokens: the data path has no tokenizer per model (it
would cost a tokenizer load per model and a tokenization per request), and a character block
is a stable stand-in: ~4 characters per token, so 64 characters are ~16 tokens, vLLM's default
block. The ``tokenizers`` library could give true token blocks later (the model's tokenizer
and chat template in the ext_proc); ``token_block_hashes`` already chains token ids the same way.

``block_hashes`` chains XXH3-64 (``xxhash``): block ``i``'s hash is XXH3 of its bytes seeded with
hash ``i-1``, the chain starting from ``chain_root(seed)``. It is per request on the data path, and
XXH3 is about 5x cheaper there than BLAKE2b (docs/benchmarks.md, the scheduler hot path); a prompt
that is all ASCII, as most are, is encoded once and sliced. Not salted per process as ``hash()`` is,
so every ext_proc worker computes the same keys. Not cryptographic: a client that crafted colliding
prompts could only attract its own requests to a replica, which it can do by sharing a prefix
anyway. ``token_block_hashes`` (the key vLLM's KV events are mapped onto) chains BLAKE2b with an
8-byte digest. Cost is O(characters hashed); ``max_blocks`` caps that per request, so a 100k-token
prompt costs the same as one of ``max_blocks`` blocks.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import xxhash

DIGEST_BYTES = 8
_ENCODING = "utf-8"
# JSON can carry lone surrogates ("\\ud800"); they must hash, not raise.
_ERRORS = "surrogatepass"


@dataclass(frozen=True, slots=True)
class BlockConfig:
    """How prompts are cut: ``block_chars`` per block, at most ``max_blocks`` blocks hashed."""

    block_chars: int = 64
    max_blocks: int = 4096

    def __post_init__(self) -> None:
        if self.block_chars < 1 or self.max_blocks < 0:
            raise ValueError(f"block_chars must be >= 1 and max_blocks >= 0, got {self}")

    @property
    def max_chars(self) -> int:
        """The longest prompt prefix that can matter: what the renderer may stop at."""
        return self.block_chars * self.max_blocks


DEFAULT_BLOCKS = BlockConfig()


def chain_root(seed: bytes = b"") -> bytes:
    """The chain's start: a seed (e.g. a model or adapter name) gives a separate key space."""
    return hashlib.blake2b(seed, digest_size=DIGEST_BYTES).digest()


def block_hashes(text: str, config: BlockConfig = DEFAULT_BLOCKS, seed: bytes = b"") -> list[int]:
    """The chained hashes of ``text``'s full blocks, at most ``config.max_blocks`` of them."""
    size = config.block_chars
    end = min(len(text) // size, config.max_blocks) * size
    xxh3 = xxhash.xxh3_64_intdigest
    prev = int.from_bytes(chain_root(seed), "big")
    out: list[int] = []
    append = out.append
    head = text[:end]
    if head.isascii():  # a character is a byte: encode once, slice the bytes
        data = head.encode("ascii")
        for start in range(0, end, size):
            prev = xxh3(data[start : start + size], prev)
            append(prev)
        return out
    for start in range(0, end, size):
        prev = xxh3(head[start : start + size].encode(_ENCODING, _ERRORS), prev)
        append(prev)
    return out


def token_block_hashes(token_ids: Sequence[int], block_size: int, parent: int | None = None) -> list[int]:
    """Chained hashes of full blocks of token ids (uint32 little-endian), continuing ``parent``.

    The same chain as ``block_hashes`` over a different alphabet: what a tokenizing ext_proc
    would compute, and what ``kv_events.TokenKeys`` recomputes from an engine's BlockStored.
    """
    blake2b = hashlib.blake2b
    prev = chain_root() if parent is None else parent.to_bytes(DIGEST_BYTES, "big")
    out: list[int] = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        data = struct.pack(f"<{block_size}I", *token_ids[start : start + block_size])
        prev = blake2b(prev + data, digest_size=DIGEST_BYTES).digest()
        out.append(int.from_bytes(prev, "big"))
    return out
