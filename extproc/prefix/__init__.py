"""Prefix-cache affinity: send a request where its prompt's prefix is likely cached.

``prompt.prompt_text`` renders a request body into the text whose prefix matters,
``blocks.block_hashes`` cuts it into chained block hashes, ``index.PrefixIndex`` remembers which
replica holds which blocks (guessed from picks, or reported by the engine's KV events through
``kv_events.ReplicaFeed``, which ``subscriber.KVEventSubscriber`` feeds over ZMQ; a model's
tokenizer, ``tokens.py``, keys prompts as the events are keyed) and tells, per candidate, how
long a prefix it holds. Choosing with
that (sticky until saturated) is the scorer's business
(extproc/scheduler/scorers/prefix_affinity.py). docs/prefix-affinity.md has the model.
"""

from extproc.prefix.blocks import DEFAULT_BLOCKS, BlockConfig, block_hashes, token_block_hashes
from extproc.prefix.index import BlockKey, IndexSettings, IndexStats, PrefixIndex, PrefixIndexes
from extproc.prefix.prompt import prompt_text

__all__ = [
    "DEFAULT_BLOCKS",
    "BlockConfig",
    "BlockKey",
    "IndexSettings",
    "IndexStats",
    "PrefixIndex",
    "PrefixIndexes",
    "block_hashes",
    "prompt_text",
    "token_block_hashes",
]
