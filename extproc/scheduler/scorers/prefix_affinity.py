"""``prefix-affinity``: prefer the replicas that probably hold the request's prompt prefix cached.

A request scorer (``interfaces.PromptScorer``). Per request, a candidate scores the fraction of
the request's prompt blocks it holds (matched leading blocks / request blocks, from the process's
``PrefixIndex``), times its *headroom*: 1 when idle, falling linearly to 0 as the replica nears
any saturation threshold (queue ``saturation_queue``, KV ``saturation_kv``, queue + batch
``max_concurrency``), 0 when saturated, ``NEUTRAL`` without a trusted reading.

Sticky until saturated, without piling on: the bonus is added to the load scores, which fall
with the work outstanding (the reading's queue and this process's requests in flight since), so a
peer wins once its load advantage exceeds the bonus; and the bonus itself fades to nothing as the
replica's queue approaches saturation, so no weight can hold a tenant on a replica the readings
call nearly full. ``drop-saturated`` already removes saturated replicas while others remain; when
all are saturated none gets a bonus. docs/prefix-affinity.md has the figures per weight.

Precise mode (docs/prefix-affinity.md): for a model with a tokenizer, a completions prompt is
hashed as blocks of ``block_tokens`` token ids (``blocks.token_block_hashes``), the keys the
engines' KV events are re-hashed into (``kv_events.TokenKeys``), so the index's entries from
events match it; ``block_tokens`` must be the engines' KV block size (vLLM's default 16).

Parameters (spec ``params``, strings): ``block_chars`` and ``max_blocks`` (how prompts are cut,
``blocks.BlockConfig``), ``block_tokens`` (precise mode's block), ``ttl_s``, ``max_entries``
and ``max_entries_per_replica`` (the index's expiry and bounds, ``index.IndexSettings``).
Profiles with the same index settings share one index per process.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

from tokenizers import Tokenizer

from extproc.budget import CHARS_PER_TOKEN
from extproc.prefix.blocks import DEFAULT_BLOCKS, BlockConfig, block_hashes, token_block_hashes
from extproc.prefix.index import IndexSettings, PrefixIndex, PrefixIndexes
from extproc.prefix.prompt import prompt_text
from extproc.prefix.tokens import prompt_token_ids
from extproc.routing_view import ScoringView
from extproc.scheduler.candidates import Candidate, FilterContext
from extproc.scheduler.interfaces import RequestTerm, SchedulingRequest
from extproc.scheduler.results import Pick
from extproc.scheduler.scorers import NEUTRAL

_DEFAULT_INDEX = IndexSettings()
DEFAULT_BLOCK_TOKENS = 16  # vLLM's default KV block size


class PrefixAffinityScorer:
    """Matched prefix fraction times headroom (a request scorer; see the module doc)."""

    name = "prefix-affinity"
    discounted = True  # an affinity: the profile discounts the term by the work outstanding

    def __init__(
        self,
        weight: float,
        block_chars: str = str(DEFAULT_BLOCKS.block_chars),
        max_blocks: str = str(DEFAULT_BLOCKS.max_blocks),
        ttl_s: str = str(_DEFAULT_INDEX.ttl_s),
        max_entries: str = str(_DEFAULT_INDEX.max_entries),
        max_entries_per_replica: str = str(_DEFAULT_INDEX.max_entries_per_replica),
        block_tokens: str = str(DEFAULT_BLOCK_TOKENS),
    ):
        self.weight = weight
        # ValueError on a bad value: the Picker logs it and routes on the default profile.
        self.blocks = BlockConfig(int(block_chars), int(max_blocks))
        self.block_tokens = int(block_tokens)
        if self.block_tokens < 1:
            raise ValueError(f"block_tokens must be >= 1, got {block_tokens!r}")
        self.settings = IndexSettings(float(ttl_s), int(max_entries), int(max_entries_per_replica))
        self.index: PrefixIndex | None = None  # the process's, from bind()

    def __repr__(self) -> str:
        return f"PrefixAffinityScorer(weight={self.weight:g}, {self.blocks}, {self.settings})"

    def bind(self, indexes: PrefixIndexes) -> None:
        self.index = indexes.get(self.settings)

    # -- the servicer's side -----------------------------------------------------------------

    def prefix_hashes(self, body: object, tokenizer: Tokenizer | None = None) -> tuple[int, ...]:
        """The chained block hashes of the body's prompt (``()``: no prompt, or shorter than a block)."""
        return self.prompt_blocks(body, tokenizer)[0]

    def prompt_blocks(self, body: object, tokenizer: Tokenizer | None) -> tuple[tuple[int, ...], float]:
        """The prompt's block hashes and the tokens a block stands for: token blocks when the
        model has a tokenizer and the request is a completion (precise mode), else character
        blocks (approximate; 0 tokens: the ``CHARS_PER_TOKEN`` estimate)."""
        blocks = self.blocks
        if tokenizer is not None:
            ids = prompt_token_ids(body, tokenizer)
            if ids is not None:
                size = self.block_tokens
                return tuple(token_block_hashes(ids[: size * blocks.max_blocks], size)), float(size)
        text = prompt_text(body, blocks.max_chars)
        return (tuple(block_hashes(text, blocks)) if text else ()), 0.0

    def record(self, pick: Pick, hashes: tuple[int, ...], now: float) -> float:
        """Note the prompt as cached on each routed version's primary: where it goes if Envoy's
        split chooses that version (each version is ranked on its own, so this is the answer per
        version). Returns the blocks it probably found cached, weighted by the versions' shares."""
        index = self.index
        if index is None or not hashes:
            return 0.0
        held = 0.0
        for address, share in pick.primaries:
            held += share * index.record(address, hashes, now)
        return held

    def cached_tokens(self, request: SchedulingRequest, addresses: Sequence[str]) -> Mapping[str, int]:
        """Prompt tokens of this request each replica probably holds (its matched leading blocks),
        for the scorers that weigh overlap in their own unit (``ttft``; ``interfaces.CacheAware``)."""
        index = self.index
        if index is None or not request.prefix_hashes:
            return {}
        tokens_per_block = request.block_tokens or self.blocks.block_chars / CHARS_PER_TOKEN
        matched = index.match(request.prefix_hashes, addresses, time.monotonic())
        return {a: int(depth * tokens_per_block) for a, depth in matched.items() if depth}

    # -- the scheduler's side ----------------------------------------------------------------

    def static(self, ctx: FilterContext, candidates: list[Candidate]) -> None:
        return None

    def inflight(self, ctx: FilterContext, candidates: list[Candidate]) -> None:
        return None

    def request(self, ctx: FilterContext, candidates: list[Candidate]) -> RequestTerm | None:
        index = self.index
        if index is None:
            return None
        scoring = ctx.scoring
        room = {c.address: h for c in candidates if (h := headroom(c, scoring)) > 0.0}
        if not room:
            return None  # all saturated: affinity does not choose among them
        match = index.match
        addresses = tuple(room)
        clock = time.monotonic

        def term(request: SchedulingRequest) -> Mapping[str, float] | None:
            hashes = request.prefix_hashes
            if not hashes:
                return None
            total = len(hashes)
            return {a: room[a] * depth / total for a, depth in match(hashes, addresses, clock()).items() if depth}

        return term


def headroom(c: Candidate, scoring: ScoringView) -> float:
    """1 (idle) .. 0 (at a saturation threshold): the smallest of the candidate's distances to its
    thresholds, each as a fraction; 0 when saturated; ``NEUTRAL`` without a trusted reading."""
    if c.saturated:
        return 0.0
    waiting, running, kv = c.waiting, c.running, c.kv_cache
    if waiting is None or running is None or kv is None:
        return NEUTRAL
    room = min(1.0 - waiting / scoring.saturation_queue, 1.0 - kv / scoring.saturation_kv)
    limit = c.endpoint.max_concurrency
    if limit > 0:
        room = min(room, 1.0 - (waiting + running) / limit)
    return max(0.0, room)
