"""What the KV-event tests share: a small deterministic HF tokenizer, and ZMQ subscribers.

The tokenizer is built with the ``tokenizers`` library itself (a WordLevel model over a fixed
vocabulary, whitespace pre-tokenized), written to a file, and loaded from that file by the fleet
and by the ext_proc alike, as a real vLLM and its router load one ``tokenizer.json``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import zmq
import zmq.asyncio
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace

from extproc.prefix.kv_events import KVEventBatch, decode_message
from fleet.text import WORDS

UNKNOWN = "[UNK]"


def write_tokenizer(path: Path) -> Path:
    """A tokenizer.json whose vocabulary is the fleet's sampler words plus ``w0`` .. ``w999``."""
    words = [UNKNOWN, *WORDS, *(f"w{i}" for i in range(1000))]
    tokenizer = Tokenizer(WordLevel({w: i for i, w in enumerate(dict.fromkeys(words))}, unk_token=UNKNOWN))
    tokenizer.pre_tokenizer = Whitespace()
    tokenizer.save(str(path))
    return path


def words(start: int, count: int) -> str:
    """``count`` distinct in-vocabulary words (one token each) from ``w<start>`` on."""
    return " ".join(f"w{i}" for i in range(start, start + count))


class Subscriber:
    """A SUB socket on one publisher, decoding each message with the ext_proc's decoder."""

    def __init__(self, endpoint: str):
        self.ctx = zmq.asyncio.Context()
        self.sock = self.ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SUBSCRIBE, b"")
        self.sock.connect(endpoint)

    async def frames(self, timeout_s: float = 10.0) -> list[bytes]:
        return await asyncio.wait_for(self.sock.recv_multipart(), timeout_s)

    async def batch(self, timeout_s: float = 10.0) -> tuple[int, KVEventBatch]:
        return decode_message(await self.frames(timeout_s))

    async def joined(self, poke: Callable[[int], Awaitable[object]], tries: int = 100) -> None:
        """Wait out ZMQ's slow joiner: poke the publisher (a new prompt each time) until a message
        arrives, then drain what is queued."""
        for i in range(tries):
            await poke(i)
            if await self.sock.poll(200):
                break
        else:
            raise AssertionError("no KV event reached the subscriber")
        while await self.sock.poll(300):
            await self.sock.recv_multipart()

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()
