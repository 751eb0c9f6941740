"""The telemetry parts of Envoy's config: access logs (gRPC ALS + JSON lines) and OpenTelemetry tracing.

Kept out of translate_envoy.py so the routing translation reads on its own; translate_envoy calls
these with its ``EnvoyOptions``. Pure functions, no I/O.

- gRPC access log (``envoy.access_loggers.http_grpc``) to the static cluster ``imesh_xds``: the
  control plane's ALS servicer (controlplane/traffic/access_log.py) turns each entry into a RequestRecord.
  Envoy batches entries and flushes every ``access_log_flush_s``.
- File access log in JSON, one line per request (``access_log_path``, default stdout), for people
  and log shippers: request id, model, version, endpoint, priority, status, durations.
- Both logs share one filter (``log_filter``): every failure and every request the picker routed is
  logged, but only 1 in ``fast_path_log_sample`` of the successes Envoy routed on its own (the fast
  path). Logging costs Envoy about as much as the fast path's routing does (docs/benchmarks.md); the
  control plane weighs each sampled record as that many requests (controlplane/traffic/access_log.py).
- Tracing through Envoy's own OpenTelemetry tracer when ``tracing_collector`` names an OTLP/gRPC
  collector: Envoy continues an incoming ``traceparent`` (or starts a trace) and propagates it
  upstream, so a replica's spans join the client's trace.
"""

from __future__ import annotations

import ipaddress

from envoy.config.accesslog.v3 import accesslog_pb2
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2, base_pb2, config_source_pb2, grpc_service_pb2, protocol_pb2
from envoy.config.core.v3 import substitution_format_string_pb2 as sfs_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.trace.v3 import http_tracer_pb2, opentelemetry_pb2
from envoy.extensions.access_loggers.file.v3 import file_pb2
from envoy.extensions.access_loggers.grpc.v3 import als_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from envoy.type.matcher.v3 import metadata_pb2, value_pb2
from envoy.type.v3 import percent_pb2
from google.protobuf import struct_pb2, wrappers_pb2

from controlplane.translate.protobuf import pack, seconds
from protos.wire import (
    MODEL_HEADER,
    MODEL_ID_HEADER,
    PICK_METADATA_KEY,
    PICK_METADATA_NAMESPACE,
    PRIORITY_HEADER,
    TELEMETRY_METADATA_NAMESPACE,
    TELEMETRY_MODEL_KEY,
    TELEMETRY_OUTPUT_TOKENS_KEY,
    VERSION_HEADER,
    XDS_CLUSTER,
)

ALS_CLUSTER = XDS_CLUSTER  # the control plane's gRPC port (envoy/bootstrap.yaml), next to ADS
ALS_LOG_NAME = "imesh"
OTEL_CLUSTER = "imesh_otel"
LOGGED_STATUS = 400  # a response at or above this status is always logged
FAST_PATH_SAMPLE_RUNTIME_KEY = "imesh.access_log.fast_path_sample"

# Request/response headers the ALS entry carries beyond its fixed fields (controlplane/traffic/access_log.py
# reads them).
# Not x-imesh-model: the route removes it from the request before the log is written; the upstream
# cluster ("model/version") names the model of a routed request instead.
ALS_REQUEST_HEADERS = (MODEL_ID_HEADER, PRIORITY_HEADER)
ALS_RESPONSE_HEADERS = (VERSION_HEADER, "content-type")

# The JSON access log line. Values that are a single command operator keep their type (numbers stay numbers).
JSON_LOG_FORMAT: dict[str, str] = {
    "time": "%START_TIME%",
    "request_id": "%REQ(X-REQUEST-ID)%",
    "method": "%REQ(:METHOD)%",
    "path": "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%",
    "protocol": "%PROTOCOL%",
    "model": f"%RESP({MODEL_HEADER.upper()})%",  # set by the route when response headers are on
    # the ext_proc's, on a refusal
    "refused_model": f"%DYNAMIC_METADATA({TELEMETRY_METADATA_NAMESPACE}:{TELEMETRY_MODEL_KEY})%",
    "cluster": "%UPSTREAM_CLUSTER%",  # "model/version": the version Envoy's weighted split chose
    "version": f"%RESP({VERSION_HEADER.upper()})%",
    "endpoint": "%UPSTREAM_HOST%",
    "priority": f"%REQ({PRIORITY_HEADER.upper()})%",
    "status": "%RESPONSE_CODE%",
    "details": "%RESPONSE_CODE_DETAILS%",
    "flags": "%RESPONSE_FLAGS%",
    "duration_ms": "%DURATION%",
    "first_byte_ms": "%RESPONSE_DURATION%",  # to the first upstream byte: time to first token when streaming
    "upstream_ms": "%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)%",
    "attempts": "%UPSTREAM_REQUEST_ATTEMPT_COUNT%",
    "bytes_in": "%BYTES_RECEIVED%",
    "bytes_out": "%BYTES_SENT%",
    "output_tokens": f"%DYNAMIC_METADATA({TELEMETRY_METADATA_NAMESPACE}:{TELEMETRY_OUTPUT_TOKENS_KEY})%",
    "trace_id": "%TRACE_ID%",
}


def log_filter(options) -> accesslog_pb2.AccessLogFilter | None:
    """Log a request if the picker routed it, it failed (status >= 400 or any response flag), or it is
    the 1 in ``fast_path_log_sample`` of the rest; None (log all) when that is 1.

    controlplane/traffic/access_log.py ``sample_weight`` applies the same test to give each record its weight:
    keep the two in step."""
    one_in = options.fast_path_log_sample
    if one_in <= 1:
        return None
    picked = accesslog_pb2.MetadataFilter(
        matcher=metadata_pb2.MetadataMatcher(
            filter=PICK_METADATA_NAMESPACE,
            path=[metadata_pb2.MetadataMatcher.PathSegment(key=PICK_METADATA_KEY)],
            value=value_pb2.ValueMatcher(present_match=True),
        ),
        match_if_key_not_found=wrappers_pb2.BoolValue(value=False),
    )
    failed = accesslog_pb2.StatusCodeFilter(
        comparison=accesslog_pb2.ComparisonFilter(
            op=accesslog_pb2.ComparisonFilter.GE,
            value=base_pb2.RuntimeUInt32(default_value=LOGGED_STATUS, runtime_key="imesh.access_log.status"),
        )
    )
    sampled = accesslog_pb2.RuntimeFilter(
        runtime_key=FAST_PATH_SAMPLE_RUNTIME_KEY,
        percent_sampled=percent_pb2.FractionalPercent(
            numerator=1_000_000 // one_in, denominator=percent_pb2.FractionalPercent.MILLION
        ),
        use_independent_randomness=True,  # not x-request-id's hash: the same request id must not bias the sample
    )
    return accesslog_pb2.AccessLogFilter(
        or_filter=accesslog_pb2.OrFilter(
            filters=[
                accesslog_pb2.AccessLogFilter(metadata_filter=picked),  # first: true at once on picker routes
                accesslog_pb2.AccessLogFilter(status_code_filter=failed),
                accesslog_pb2.AccessLogFilter(response_flag_filter=accesslog_pb2.ResponseFlagFilter()),  # any flag
                accesslog_pb2.AccessLogFilter(runtime_filter=sampled),
            ]
        )
    )


def access_logs(options) -> list[accesslog_pb2.AccessLog]:
    """The HCM's access loggers for `options` (translate_envoy.EnvoyOptions)."""
    logs = []
    log_filter_ = log_filter(options)
    if options.grpc_access_log:
        grpc_log = als_pb2.HttpGrpcAccessLogConfig(
            common_config=als_pb2.CommonGrpcAccessLogConfig(
                log_name=ALS_LOG_NAME,
                grpc_service=grpc_service_pb2.GrpcService(
                    envoy_grpc=grpc_service_pb2.GrpcService.EnvoyGrpc(cluster_name=ALS_CLUSTER)
                ),
                transport_api_version=config_source_pb2.V3,
                buffer_flush_interval=seconds(options.access_log_flush_s),
            ),
            additional_request_headers_to_log=list(ALS_REQUEST_HEADERS),
            additional_response_headers_to_log=list(ALS_RESPONSE_HEADERS),
        )
        logs.append(
            accesslog_pb2.AccessLog(
                name="envoy.access_loggers.http_grpc", filter=log_filter_, typed_config=pack(grpc_log)
            )
        )
    if options.access_log_path:
        fmt = struct_pb2.Struct()
        fmt.update(JSON_LOG_FORMAT)
        file_log = file_pb2.FileAccessLog(
            path=options.access_log_path,
            log_format=sfs_pb2.SubstitutionFormatString(json_format=fmt),
        )
        logs.append(
            accesslog_pb2.AccessLog(name="envoy.access_loggers.file", filter=log_filter_, typed_config=pack(file_log))
        )
    return logs


def tracing(options) -> hcm_pb2.HttpConnectionManager.Tracing | None:
    """Envoy's OpenTelemetry tracer, or None when no collector is configured."""
    if not options.tracing_collector:
        return None
    otel = opentelemetry_pb2.OpenTelemetryConfig(
        grpc_service=grpc_service_pb2.GrpcService(
            envoy_grpc=grpc_service_pb2.GrpcService.EnvoyGrpc(cluster_name=OTEL_CLUSTER), timeout=seconds(1.0)
        ),
        service_name=options.trace_service_name,
    )
    return hcm_pb2.HttpConnectionManager.Tracing(
        random_sampling=percent_pb2.Percent(value=options.trace_sampling_percent),
        provider=http_tracer_pb2.Tracing.Http(name="envoy.tracers.opentelemetry", typed_config=pack(otel)),
        spawn_upstream_span=wrappers_pb2.BoolValue(value=True),
    )


def otel_cluster(options) -> cluster_pb2.Cluster | None:
    """A static HTTP/2 cluster for the OTLP collector ("host:port"), or None without tracing."""
    if not options.tracing_collector:
        return None
    host, _, port = options.tracing_collector.rpartition(":")
    protocol = http_protocol_options_pb2.HttpProtocolOptions(
        explicit_http_config=http_protocol_options_pb2.HttpProtocolOptions.ExplicitHttpConfig(
            http2_protocol_options=protocol_pb2.Http2ProtocolOptions()
        )
    )
    return cluster_pb2.Cluster(
        name=OTEL_CLUSTER,
        type=cluster_pb2.Cluster.STRICT_DNS if not _is_ip(host) else cluster_pb2.Cluster.STATIC,
        connect_timeout=seconds(1.0),
        load_assignment=endpoint_pb2.ClusterLoadAssignment(
            cluster_name=OTEL_CLUSTER,
            endpoints=[
                endpoint_components_pb2.LocalityLbEndpoints(
                    lb_endpoints=[
                        endpoint_components_pb2.LbEndpoint(
                            endpoint=endpoint_components_pb2.Endpoint(
                                address=address_pb2.Address(
                                    socket_address=address_pb2.SocketAddress(
                                        address=host.strip("[]"), port_value=int(port)
                                    )
                                )
                            )
                        )
                    ]
                )
            ],
        ),
        typed_extension_protocol_options={"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": pack(protocol)},
    )


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True
