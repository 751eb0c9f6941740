"""One finished request as the mesh saw it: the unit the telemetry and the canary gates consume.

Records come from Envoy's gRPC access log stream (each request, after it ends), so they carry
what only the data path knows: the version Envoy's canary split chose, the replica that served,
status and timings. Consumers register as sinks; none of them sees Envoy's protos. A record may
stand for several requests (``weight``: Envoy samples the fast path's successes), so a sink counts
``weight`` requests and takes percentiles with ``weighted_percentile``.

Register a sink on the running control plane with ``control_plane.request_records.add_sink(fn)``;
``fn(record)`` is called on the control plane's event loop for every record, in arrival order, so it
must be quick and must not block (append to a deque, bump a counter). A sink that raises is logged
and skipped for that record; it stays registered.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

log = logging.getLogger("imesh.records")


@dataclass(frozen=True, slots=True)
class RequestRecord:
    model: str  # a model of the spec; "other" for a name the spec lacks; "" when none was identified
    version: str  # "" when the request never reached a version
    endpoint: str  # "ip:port" of the replica that served, "" if none
    pool: str  # the endpoint's pool in the spec, "" if none
    priority: str  # the spec's priority class it was treated as (none or an unknown name: the default)
    status: int  # HTTP status returned to the client (0 if the client went away first)
    duration_s: float  # request start to last byte sent downstream
    ttft_s: float | None  # request start to first upstream response byte: time to first token when streaming
    upstream_failure: bool  # Envoy's own failure flags (no healthy host, connect failure, reset, timeout)
    shed: bool  # refused by the mesh with 429 because replicas are saturated
    request_bytes: int
    response_bytes: int
    output_tokens: int | None = None  # when known: only for the sampled fraction (docs/observability.md)
    streamed: bool = False  # the response was a stream (text/event-stream): ttft_s is a real TTFT
    generation_s: float | None = None  # first to last upstream response byte (the decode phase when streamed)
    rate_limited: bool = False  # refused with 429 by a rate limit (not by saturation)
    details: str = ""  # Envoy's response code details, e.g. "via_upstream", "imesh_overloaded"
    request_id: str = ""  # x-request-id, to find the line in Envoy's JSON access log
    node: str = ""  # the Envoy that served it
    weight: int = 1  # requests it stands for: N for a fast-path success Envoy logged 1 in N of
    attempts: int = 1  # upstream tries Envoy made (retries included)
    picked: tuple[str, ...] = ()  # the picker's ranked hosts, which Envoy's tries walk in order; () if none

    def failed_tries(self) -> tuple[str, ...]:
        """The picked hosts tried before the one that answered: each of those tries failed."""
        if self.attempts <= 1 or not self.picked:
            return ()
        return tuple(h for h in self.picked[: self.attempts - 1] if h != self.endpoint)

    @property
    def error(self) -> bool:
        """Counts against the serving side: a 5xx, an Envoy upstream failure, or no answer at all (status 0:
        the client gave up before any response, usually on a replica too slow to answer)."""
        return self.status >= 500 or self.status == 0 or self.upstream_failure

    @property
    def output_tokens_per_s(self) -> float | None:
        """Decode speed: tokens over the generation time (streamed) or over the whole request."""
        if not self.output_tokens:
            return None
        span = self.generation_s if self.streamed and self.generation_s else self.duration_s
        return self.output_tokens / span if span and span > 0 else None


RecordSink = Callable[[RequestRecord], None]


def weighted_percentile(samples: Iterable[tuple[float, int]], q: float) -> float:
    """Nearest-rank ``q`` quantile of (value, weight) samples, each standing for ``weight`` requests:
    no interpolation past the largest value. 0 for no samples."""
    ordered = sorted(samples)
    if not ordered:
        return 0.0
    rank = max(1, math.ceil(sum(w for _, w in ordered) * q))
    seen = 0
    for value, weight in ordered:
        seen += weight
        if seen >= rank:
            return value
    return ordered[-1][0]


class RequestRecords:
    """The fan-out point: the access-log servicer emits, every registered sink receives.

    Sinks run inline (no queue, no task), so a record costs its sinks' time and nothing more;
    the access log stream itself buffers in Envoy, which batches entries per flush interval.
    """

    def __init__(self) -> None:
        self._sinks: tuple[RecordSink, ...] = ()
        self.received = 0  # records emitted since start, for tests and the control plane's own metrics
        self.sink_errors = 0

    def add_sink(self, sink: RecordSink) -> Callable[[], None]:
        """Register `sink`; returns a function that unregisters it."""
        self._sinks = (*self._sinks, sink)
        return lambda: self.remove_sink(sink)

    def remove_sink(self, sink: RecordSink) -> None:
        self._sinks = tuple(s for s in self._sinks if s is not sink)

    @property
    def sinks(self) -> tuple[RecordSink, ...]:
        return self._sinks

    def emit(self, record: RequestRecord) -> None:
        self.received += 1
        for sink in self._sinks:
            try:
                sink(record)
            except Exception:  # one broken consumer must not starve the others (or the metrics)
                self.sink_errors += 1
                if self.sink_errors <= 10 or self.sink_errors % 1000 == 0:
                    log.exception("request record sink %r failed (%d failures so far)", sink, self.sink_errors)
