"""One finished request as the mesh saw it: the unit the telemetry and the canary gates consume.

Records come from Envoy's gRPC access log stream (every request, after it ends), so they carry
what only the data path knows: the version Envoy's canary split chose, the replica that served,
status and timings. Consumers register as sinks; none of them sees Envoy's protos.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RequestRecord:
    model: str            # "" when no model was identified (404/400 before routing)
    version: str          # "" when the request never reached a version
    endpoint: str         # "ip:port" of the replica that served, "" if none
    pool: str
    priority: str
    status: int           # HTTP status returned to the client (0 if the client went away first)
    duration_s: float     # request start to last byte sent downstream
    ttft_s: float | None  # request start to first upstream response byte: time to first token when streaming
    upstream_failure: bool  # Envoy's own failure flags (no healthy host, connect failure, reset, timeout)
    shed: bool            # refused by the mesh with 429
    request_bytes: int
    response_bytes: int
    output_tokens: int | None = None  # when known (e.g. from the response's usage)


RecordSink = Callable[[RequestRecord], None]
