"""The scheduler's extension points, one small ``Protocol`` each (the GIE scheduler's shape).

A request's endpoints go through three stages (docs/scheduler.md):

* ``Filter`` (plan time): narrows the candidates of one model version;
* ``Scorer`` (plan time, evaluated per request): rates the survivors 0..1, higher is better, in
  one of two kinds: *static* (load readings only) or *in-flight* (also this process's own requests
  in flight, in the shape ``scale / (scale + base + n)``); a ``RequestScorer`` may also rate them
  on what the request itself says (``SchedulingRequest``: prefix-block hashes, an adapter);
* ``Selector`` (per request): the picker point; takes the best few of the compiled candidates.

Plan time runs once per routing table x load report x model x priority (``profile.py``); only the
selector and the request scorers' terms run per request, so those must be cheap.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from extproc.scheduler.candidates import Candidate, FilterContext

if TYPE_CHECKING:
    from tokenizers import Tokenizer

    from extproc.prefix.index import PrefixIndexes
    from extproc.scheduler.results import Pick

# One compiled candidate: ``(address, idle, a1, d1, a2, d2)``, its score with ``n`` requests in
# flight being ``a1/(d1+n) + a2/(d2+n)`` (``idle`` at n = 0); a profile with more than two distinct
# denominators appends a tuple of further ``(a, d)`` pairs (``profile.py``).
Entry = tuple


class SchedulingRequest:
    """What one request tells the scheduler beyond its model, version and priority.

    Built by the servicer when some scorer needs it; request scorers read the fields they know and
    ignore the rest. ``prefix_hashes``: hashes of the prompt's leading blocks, in order (for
    prefix-cache affinity), and ``block_tokens`` the prompt tokens one of them stands for (0: the
    scorer's estimate for character blocks); ``adapter``: the LoRA adapter the request names, if any.
    """

    __slots__ = ("tokens", "prefix_hashes", "adapter", "block_tokens")

    def __init__(
        self,
        tokens: int = 0,
        prefix_hashes: tuple[int, ...] = (),
        adapter: str | None = None,
        block_tokens: float = 0.0,
    ):
        self.tokens = tokens
        self.prefix_hashes = prefix_hashes
        self.adapter = adapter
        self.block_tokens = block_tokens

    def __repr__(self) -> str:
        blocks = len(self.prefix_hashes)
        return f"SchedulingRequest(tokens={self.tokens}, prefix_blocks={blocks}, adapter={self.adapter!r})"


# A request scorer's per-request half: address -> score 0..1 for the candidates it rates above 0
# (sparse: the others count 0); None when it has nothing to say about this request.
RequestTerm = Callable[[SchedulingRequest], Mapping[str, float] | None]


class Filter(Protocol):
    """Narrows the candidates of ONE model version (Envoy's weighted_clusters chooses the version).

    May return the same list or a new one. Depends only on the routing table and the load readings,
    never on the request. A filter that would drop everyone for lack of data keeps everyone.
    """

    name: str

    def __call__(self, ctx: FilterContext, candidates: list[Candidate]) -> list[Candidate]: ...


class Scorer(Protocol):
    """Rates the candidates of one version; the profile sums ``weight * score``.

    ``static``: one score per candidate from the readings alone (the profile discounts it by the
    work outstanding there). ``inflight``: one ``(scale, base)`` pair per candidate, the score with
    ``n`` in flight being ``scale / (scale + base + n)``. Both run once per plan; a scorer returns
    None from the kind it is not.
    """

    name: str
    weight: float

    def static(self, ctx: FilterContext, candidates: list[Candidate]) -> list[float] | None: ...

    def inflight(self, ctx: FilterContext, candidates: list[Candidate]) -> list[tuple[float, float]] | None: ...


@runtime_checkable
class RequestScorer(Scorer, Protocol):
    """A scorer that also reads the request (prefix affinity, adapter affinity).

    ``request`` runs once per plan and returns the per-request term (or None to abstain for this
    plan): whatever can be prepared from the candidates is prepared there, so the term itself is a
    few lookups. The profile adds ``weight * score`` to the candidate's score, as is; or, for a
    scorer with ``discounted = True`` (an affinity: the term rates what a replica holds, a prefix
    or an adapter), discounted by the work outstanding there as static scores are
    (``S / (S + waiting + n)``), so that holding it wins a replica the requests only while it is
    not much busier than its peers. (An optional attribute, not a protocol member: a scorer
    without it is undiscounted, e.g. ``ttft``, whose term is already a load-aware correction.)
    """

    def request(self, ctx: FilterContext, candidates: list[Candidate]) -> RequestTerm | None: ...


@runtime_checkable
class PromptScorer(RequestScorer, Protocol):
    """A request scorer that reads the prompt (prefix affinity); a profile has at most one.

    For a model whose profile has one, and only then, the servicer reads the request body, fills
    ``SchedulingRequest.prefix_hashes`` with ``prompt_blocks(body, tokenizer)`` (the model's
    tokenizer, None without one) and, after the pick, calls
    ``record`` with the pick. Its state is the process's: the ``Picker`` ``bind``s it to its
    ``PrefixIndexes`` when it builds the profile, so the state outlives the profile.
    """

    def bind(self, indexes: PrefixIndexes) -> None: ...

    def prefix_hashes(self, body: object, tokenizer: Tokenizer | None = None) -> tuple[int, ...]: ...

    def prompt_blocks(self, body: object, tokenizer: Tokenizer | None) -> tuple[tuple[int, ...], float]:
        """The prompt's block hashes and the prompt tokens one block stands for."""
        ...

    def record(self, pick: Pick, hashes: tuple[int, ...], now: float) -> float:
        """Note where the request went; returns the blocks it probably found cached there."""
        ...

    def cached_tokens(self, request: SchedulingRequest, addresses: Sequence[str]) -> Mapping[str, int]:
        """address -> prompt tokens of this request the replica probably holds cached (missing: none)."""
        ...


# What a scorer that weighs prefix overlap in its own unit (``ttft``: seconds of prefill saved)
# reads: address -> cached prompt tokens of this request, for the given candidates.
CachedTokens = Callable[[SchedulingRequest, Sequence[str]], Mapping[str, int]]


@runtime_checkable
class CacheAware(Protocol):
    """A scorer that reads prefix overlap from the profile's prompt scorer. The ``Picker`` sets
    ``overlap`` to the prompt scorer's ``cached_tokens`` when it builds a profile that has both."""

    overlap: CachedTokens | None


class Selector(Protocol):
    """The picker point: the best ``k`` addresses of one version's compiled entries, best first.

    ``entries`` come in rotation order (the profile rotates them per request), so a selector that
    keeps the first of equal scores lets ties take turns. ``inflight``: address -> requests this
    process has in flight there; ``bonus``: address -> the request scorers' weighted sum, or None.
    """

    name: str

    def select(
        self, entries: Sequence[Entry], inflight: Mapping[str, float], k: int, bonus: Mapping[str, float] | None
    ) -> list[str]: ...


class PluginTimer(Protocol):
    """Where plugin times go (extproc/telemetry.py's ``ExtprocMetrics``)."""

    def plugin_time(self, plugin: str, extension_point: str, seconds: float) -> None:
        """One plugin's work for one plan (summed over the plan's versions)."""
        ...

    def rank_timer(self) -> Callable[[float], None] | None:
        """The observer for one request's ranking (pre-bound), or None when timing is off."""
        ...
