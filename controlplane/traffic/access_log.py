"""Envoy's gRPC access log service (ALS): every finished request, streamed to the control plane.

Why ALS and not the replicas' metrics or the ext_proc: only Envoy sees the whole request (the
version its weighted split chose, the replica that actually served after retries, the status
the client got, Envoy's own failures, and the time to first upstream byte), and it reports all of
that from C++, batched per flush interval, at no cost to the request path.

Each entry becomes a ``RequestRecord`` (controlplane/traffic/record.py) and goes to every sink.
Labels are resolved against the mesh model of the moment (``MeshLabels``): the upstream cluster
names model and version, the upstream host names the endpoint and so its pool; requests that never
reached a cluster (shed, unknown model) fall back to what the ext_proc left in dynamic metadata.

Envoy logs only 1 in N of the successes it routed on its own (the fast path; translate_telemetry's
``log_filter``), so such a record carries ``weight`` N and every sink counts it as N requests.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import grpc
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc

from controlplane.model.mesh_model import MeshModel
from controlplane.traffic.record import RequestRecord, RequestRecords
from controlplane.translate.telemetry import LOGGED_STATUS
from protos.wire import (
    MODEL_ID_HEADER,
    PICK_METADATA_KEY,
    PICK_METADATA_NAMESPACE,
    PRIORITY_HEADER,
    RATE_LIMITED_CODE,
    SHED_CODE,
    TELEMETRY_METADATA_NAMESPACE,
    TELEMETRY_MODEL_KEY,
    TELEMETRY_OUTPUT_TOKENS_KEY,
    VERSION_HEADER,
    reply_details,
)

log = logging.getLogger("imesh.accesslog")

# What the ext_proc's immediate responses say when it shed a request or a rate limit refused it.
SHED_DETAILS = reply_details(SHED_CODE)
RATE_LIMITED_DETAILS = reply_details(RATE_LIMITED_CODE)

# Envoy's response flags that mean the upstream side failed, not the client or the mesh's policy.
_UPSTREAM_FAILURE_FLAGS = frozenset(
    (
        "failed_local_healthcheck",
        "no_healthy_upstream",
        "upstream_request_timeout",
        "upstream_remote_reset",
        "upstream_connection_failure",
        "upstream_connection_termination",
        "upstream_overflow",
        "upstream_retry_limit_exceeded",
        "upstream_max_stream_duration_reached",
        "upstream_protocol_error",  # e.g. a replica that died mid-body (the stream was cut: UPE)
        "no_cluster_found",
    )
)


@dataclass(frozen=True)
class MeshLabels:
    """What the spec allows as label values, resolved once per config version (immutable, swapped whole)."""

    clusters: dict[str, tuple[str, str]] = field(default_factory=dict)  # Envoy cluster -> (model, version)
    pools: dict[str, str] = field(default_factory=dict)  # endpoint "ip:port" -> pool
    models: frozenset[str] = frozenset()
    versions: frozenset[tuple[str, str]] = frozenset()
    priorities: frozenset[str] = frozenset()
    default_priority: str = ""

    @classmethod
    def from_model(cls, model: MeshModel) -> MeshLabels:
        return cls(
            clusters={v.cluster: (m.name, v.name) for m in model.models for v in m.versions},
            pools={e.address: e.pool for _, e in model.endpoints},
            models=frozenset(m.name for m in model.models),
            versions=frozenset((m.name, v.name) for m in model.models for v in m.versions),
            priorities=frozenset(p.name for p in model.priorities) | {model.defaults.priority},
            default_priority=model.defaults.priority,
        )

    def model(self, name: str) -> str:
        return name if not name or name in self.models else "other"

    def priority(self, name: str) -> str:
        """The class a request was treated as: the picker gives unknown names the default class too."""
        return name if name in self.priorities else self.default_priority


def _seconds(duration) -> float:
    return duration.seconds + duration.nanos * 1e-9


def _address(address) -> str:
    socket = address.socket_address
    if not socket.address:
        return ""
    host = f"[{socket.address}]" if ":" in socket.address else socket.address
    return f"{host}:{socket.port_value}"


def _upstream_failure(set_flags: list) -> bool:
    return any(value and field.name in _UPSTREAM_FAILURE_FLAGS for field, value in set_flags)


def sample_weight(common: accesslog_pb2.AccessLogCommon, status: int, set_flags: list, one_in: int) -> int:
    """How many requests an entry stands for: ``one_in`` for a success Envoy routed without a pick
    (logged 1 in ``one_in``), 1 for the rest (always logged). The same test as Envoy's log filter."""
    if one_in <= 1 or status >= LOGGED_STATUS or set_flags:
        return 1
    return 1 if _pick_value(common) is not None else one_in


def to_record(
    entry: accesslog_pb2.HTTPAccessLogEntry, labels: MeshLabels, node: str = "", one_in: int = 1
) -> RequestRecord:
    """One access log entry as a RequestRecord, labelled by the current mesh model; ``one_in`` is
    Envoy's fast-path log sampling (``EnvoyOptions.fast_path_log_sample``)."""
    common, request, response = entry.common_properties, entry.request, entry.response
    # ListFields: only the response flags that are set (usually none), not a getattr per possible flag.
    set_flags = common.response_flags.ListFields()
    meta = common.metadata.filter_metadata.get(TELEMETRY_METADATA_NAMESPACE)
    meta_fields = meta.fields if meta is not None else {}
    request_headers, response_headers = request.request_headers, response.response_headers

    model, version = labels.clusters.get(common.upstream_cluster, ("", ""))
    if not model:  # never reached a cluster: what the ext_proc identified, else what the client asked for
        name = meta_fields[TELEMETRY_MODEL_KEY].string_value if TELEMETRY_MODEL_KEY in meta_fields else ""
        model = labels.model(name or request_headers.get(MODEL_ID_HEADER, ""))
    if not version:
        version = response_headers.get(VERSION_HEADER, "")
        if version and (model, version) not in labels.versions:
            version = "other"
    endpoint = _address(common.upstream_remote_address) if common.HasField("upstream_remote_address") else ""

    status = response.response_code.value if response.HasField("response_code") else 0
    details = response.response_code_details
    first = (
        _seconds(common.time_to_first_upstream_rx_byte) if common.HasField("time_to_first_upstream_rx_byte") else None
    )
    last = _seconds(common.time_to_last_upstream_rx_byte) if common.HasField("time_to_last_upstream_rx_byte") else None
    if common.HasField("duration"):
        duration = _seconds(common.duration)
    elif common.HasField("time_to_last_downstream_tx_byte"):
        duration = _seconds(common.time_to_last_downstream_tx_byte)
    else:
        duration = 0.0
    tokens = (
        meta_fields[TELEMETRY_OUTPUT_TOKENS_KEY].number_value if TELEMETRY_OUTPUT_TOKENS_KEY in meta_fields else None
    )
    shed = status == 429 and details == SHED_DETAILS
    return RequestRecord(
        model=model,
        version=version,
        endpoint=endpoint,
        pool=labels.pools.get(endpoint, ""),
        priority=labels.priority(request_headers.get(PRIORITY_HEADER, "")),
        status=status,
        duration_s=duration,
        ttft_s=first,
        upstream_failure=_upstream_failure(set_flags),
        shed=shed,
        request_bytes=request.request_body_bytes,
        response_bytes=response.response_body_bytes,
        output_tokens=int(tokens) if tokens is not None else None,
        streamed=response_headers.get("content-type", "").startswith("text/event-stream"),
        generation_s=(last - first) if first is not None and last is not None else None,
        rate_limited=status == 429
        and not shed
        and (details == RATE_LIMITED_DETAILS or common.response_flags.rate_limited),
        details=details,
        request_id=request.request_id,
        node=node,
        weight=sample_weight(common, status, set_flags, one_in),
        attempts=max(1, common.upstream_request_attempt_count),
        picked=_picked(common),
    )


def _pick_value(common: accesslog_pb2.AccessLogCommon) -> str | None:
    """The picker's pick ("ip:port,ip:port") in the request's dynamic metadata; None without one."""
    pick = common.metadata.filter_metadata.get(PICK_METADATA_NAMESPACE)
    if pick is None or PICK_METADATA_KEY not in pick.fields:
        return None
    return pick.fields[PICK_METADATA_KEY].string_value


def _picked(common: accesslog_pb2.AccessLogCommon) -> tuple[str, ...]:
    """The picker's ranked hosts, best first."""
    return tuple(h.strip() for h in (_pick_value(common) or "").split(",") if h.strip())


class AccessLogServicer(als_pb2_grpc.AccessLogServiceServicer):
    """``envoy.service.accesslog.v3.AccessLogService``: one client stream per Envoy (per worker)."""

    def __init__(self, records: RequestRecords, labels: MeshLabels | None = None, one_in: int = 1):
        self.records = records
        self.labels = labels or MeshLabels()  # replaced whole by the control plane on every rebuild
        self.one_in = one_in  # Envoy's fast-path log sampling: a sampled success stands for this many
        self.streams = 0
        self.entries = 0

    async def StreamAccessLogs(self, request_iterator, context):  # noqa: N802 (gRPC name)
        node = ""
        self.streams += 1
        try:
            async for message in request_iterator:
                if message.HasField("identifier"):
                    node = message.identifier.node.id  # only on a stream's first message
                if not message.HasField("http_logs"):
                    continue
                labels, emit, one_in = self.labels, self.records.emit, self.one_in
                for entry in message.http_logs.log_entry:
                    try:
                        record = to_record(entry, labels, node, one_in)
                    except Exception:  # an entry we cannot read must not end the stream
                        log.exception("unreadable access log entry from %s", node)
                        continue
                    self.entries += 1
                    emit(record)
        finally:
            self.streams -= 1
        return als_pb2.StreamAccessLogsResponse()


def add_to_server(
    server: grpc.aio.Server, records: RequestRecords, labels: MeshLabels | None = None, one_in: int = 1
) -> AccessLogServicer:
    servicer = AccessLogServicer(records, labels, one_in)
    als_pb2_grpc.add_AccessLogServiceServicer_to_server(servicer, server)
    return servicer
