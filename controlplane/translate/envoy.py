"""Translate the mesh model into Envoy resources (CDS, EDS, LDS, RDS). Pure functions, no I/O.

The shape, and why:
- One EDS cluster per model version. Canary weights are RDS ``weighted_clusters`` over those
  clusters, so the split holds even when the ext_proc is down (fail-open) or bypassed.
- Each cluster balances with ``override_host``: the ext_proc writes its ranked host list
  (``ip:port,ip:port``) into dynamic metadata ``envoy.lb/x-imesh-endpoint``; Envoy takes the first
  listed host that belongs to the cluster it chose, and falls back to least-request when the
  list is absent. Clients cannot forge dynamic metadata.
- Routes match the internal header ``x-imesh-model`` that only the ext_proc sets (client copies
  are stripped first by a header_mutation filter), then, for fail-open, the client's own
  ``x-model-id`` and the KServe v2 path.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from envoy.config.cluster.v3 import circuit_breaker_pb2, cluster_pb2
from envoy.config.common.mutation_rules.v3 import mutation_rules_pb2
from envoy.config.core.v3 import (
    address_pb2,
    base_pb2,
    config_source_pb2,
    extension_pb2,
    health_check_pb2,
    protocol_pb2,
    substitution_format_string_pb2,
)
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.ext_proc.v3 import ext_proc_pb2, processing_mode_pb2
from envoy.extensions.filters.http.header_mutation.v3 import header_mutation_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.extensions.load_balancing_policies.least_request.v3 import least_request_pb2
from envoy.extensions.load_balancing_policies.override_host.v3 import override_host_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from envoy.type.matcher.v3 import string_pb2
from envoy.type.metadata.v3 import metadata_pb2
from google.protobuf import any_pb2, struct_pb2, wrappers_pb2

from controlplane.model.mesh_model import MeshModel, ModelModel, VersionModel
from controlplane.spec.resilience import ResilienceSpec, readiness_path
from controlplane.translate import resilience as translate_resilience
from controlplane.translate import telemetry as translate_telemetry
from controlplane.translate.memo import NO_MEMO, TranslationMemo, model_routes_key, routes_key
from controlplane.translate.protobuf import pack, seconds
from protos.wire import (
    BODY_MODEL_PATHS,
    ENDPOINT_HEADER,
    EXTPROC_CLUSTER,
    INTERNAL_HEADER_PREFIX,
    MODEL_HEADER,
    MODEL_ID_HEADER,
    MODEL_NOT_FOUND,
    MODELS_LIST_PATH,
    PICK_METADATA_KEY,
    PICK_METADATA_NAMESPACE,
    PICKER_UNAVAILABLE_CODE,
    POOL_HEADER,
    TELEMETRY_METADATA_NAMESPACE,
    VERSION_HEADER,
    error_body,
    error_envelope,
    error_type,
    models_list_body,
)

LISTENER_NAME = "imesh_http"
ROUTE_CONFIG_NAME = "imesh_routes"
EXTPROC_FILTER = "envoy.filters.http.ext_proc"
HOST_METADATA_NAMESPACE = "imesh"  # per-host EDS metadata {pool, tier}, read back by %UPSTREAM_METADATA%


@dataclass(frozen=True)
class EnvoyOptions:
    listener_host: str = "127.0.0.1"
    listener_port: int = 8080
    extproc_cluster: str = EXTPROC_CLUSTER
    extproc_timeout_s: float = 1.0
    # Telemetry (controlplane/translate/telemetry.py, docs/observability.md).
    grpc_access_log: bool = True  # stream every request to the control plane (RequestRecords, /metrics)
    access_log_flush_s: float = 0.5  # how long Envoy batches ALS entries
    access_log_path: str = "/dev/stdout"  # JSON access log lines; "" turns the file log off
    fast_path_log_sample: int = 10  # log 1 in N successes Envoy routed on its own; 1 logs every request
    tracing_collector: str = ""  # "host:port" of an OTLP/gRPC collector; "" turns tracing off
    trace_sampling_percent: float = 100.0  # of requests without a sampled traceparent
    trace_service_name: str = "inference-mesh"


@dataclass(frozen=True)
class EnvoyResources:
    clusters: dict[str, cluster_pb2.Cluster]
    endpoints: dict[str, endpoint_pb2.ClusterLoadAssignment]
    listeners: dict[str, listener_pb2.Listener]
    routes: dict[str, route_pb2.RouteConfiguration]


def translate(
    model: MeshModel, options: EnvoyOptions = EnvoyOptions(), memo: TranslationMemo | None = None
) -> EnvoyResources:
    """With a `memo` (controlplane/translate/memo.py), versions and models equal to the last build's
    get the same message objects back, so a one-endpoint change rebuilds one ClusterLoadAssignment."""
    memo = memo or NO_MEMO
    with memo.session(model, options):
        versions = [v for m in model.models for v in m.versions]
        # The memo's context includes model.resilience: a change to it rebuilds every cluster.
        per_version = {v.cluster: memo.get("version", v, _translate_version, v, model.resilience) for v in versions}
        clusters = {name: cluster for name, (cluster, _) in per_version.items()}
        otel = translate_telemetry.otel_cluster(options)
        if otel is not None:
            clusters[otel.name] = otel
        return EnvoyResources(
            clusters=clusters,
            endpoints={name: endpoints for name, (_, endpoints) in per_version.items()},
            listeners={LISTENER_NAME: translate_listener(model, options)},
            routes={ROUTE_CONFIG_NAME: memo.get("routes", routes_key(model), translate_routes, model, memo)},
        )


def _translate_version(
    version: VersionModel, resilience: ResilienceSpec
) -> tuple[cluster_pb2.Cluster, endpoint_pb2.ClusterLoadAssignment]:
    return translate_cluster(version, resilience), translate_endpoints(version)


# ---------------------------------------------------------------- helpers


def _extension(name: str, message) -> extension_pb2.TypedExtensionConfig:
    return extension_pb2.TypedExtensionConfig(name=name, typed_config=pack(message))


def _ads() -> config_source_pb2.ConfigSource:
    return config_source_pb2.ConfigSource(ads=config_source_pb2.AggregatedConfigSource(), resource_api_version="V3")


def _header(name: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=name, value=value),
        append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
    )


# ---------------------------------------------------------------- CDS / EDS


def translate_cluster(version: VersionModel, resilience: ResilienceSpec) -> cluster_pb2.Cluster:
    # Clusters differ only in name, upstream protocol and readiness path: copying a template is
    # ~10x cheaper than building the nested messages again for each of 1,250 clusters (same bytes).
    cluster = cluster_pb2.Cluster()
    cluster.CopyFrom(_cluster_template(version.upstream_protocol, resilience))
    cluster.name = version.cluster
    checks = resilience.health_checks
    check = translate_resilience.health_check(checks, readiness_path(version.engine, version.model, checks.path))
    if check is not None:
        cluster.health_checks.append(check)
    return cluster


@functools.lru_cache(maxsize=8)
def _cluster_template(upstream_protocol: str, resilience: ResilienceSpec) -> cluster_pb2.Cluster:
    """Everything of a version's cluster but its name. Shared: callers copy it, never change it."""
    override_host = override_host_pb2.OverrideHost(
        override_host_sources=[
            override_host_pb2.OverrideHost.OverrideHostSource(
                metadata=metadata_pb2.MetadataKey(
                    key=PICK_METADATA_NAMESPACE, path=[metadata_pb2.MetadataKey.PathSegment(key=PICK_METADATA_KEY)]
                )
            )
        ],
        fallback_policy=cluster_pb2.LoadBalancingPolicy(
            policies=[
                cluster_pb2.LoadBalancingPolicy.Policy(
                    typed_extension_config=_extension(
                        "envoy.load_balancing_policies.least_request", least_request_pb2.LeastRequest()
                    )
                )
            ]
        ),
    )
    # Replicas queue work themselves; Envoy's default of 1024 pending requests would shed first.
    unbounded = circuit_breaker_pb2.CircuitBreakers.Thresholds(
        max_connections=wrappers_pb2.UInt32Value(value=100_000),
        max_pending_requests=wrappers_pb2.UInt32Value(value=100_000),
        max_requests=wrappers_pb2.UInt32Value(value=100_000),
        max_retries=wrappers_pb2.UInt32Value(value=1_000),
        retry_budget=translate_resilience.retry_budget(resilience.retries),  # bounds retries in its place
    )
    explicit = http_protocol_options_pb2.HttpProtocolOptions.ExplicitHttpConfig
    if upstream_protocol == "http2":
        explicit_config = explicit(http2_protocol_options=protocol_pb2.Http2ProtocolOptions())
    else:
        explicit_config = explicit(http_protocol_options=protocol_pb2.Http1ProtocolOptions())
    protocol = http_protocol_options_pb2.HttpProtocolOptions(explicit_http_config=explicit_config)
    return cluster_pb2.Cluster(
        type=cluster_pb2.Cluster.EDS,
        eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(eds_config=_ads()),
        connect_timeout=seconds(1.0),
        load_balancing_policy=cluster_pb2.LoadBalancingPolicy(
            policies=[
                cluster_pb2.LoadBalancingPolicy.Policy(
                    typed_extension_config=_extension("envoy.load_balancing_policies.override_host", override_host)
                )
            ]
        ),
        circuit_breakers=circuit_breaker_pb2.CircuitBreakers(thresholds=[unbounded]),
        outlier_detection=translate_resilience.outlier_detection(resilience.outlier_detection),
        typed_extension_protocol_options={"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": pack(protocol)},
    )


def translate_endpoints(version: VersionModel) -> endpoint_pb2.ClusterLoadAssignment:
    # Built in place (add() and field sets, shared host metadata): at 10,000 endpoints this is 3x
    # cheaper than nesting constructors, which copy every sub-message once more.
    by_locality: dict[tuple[str, str], list] = {}
    for endpoint in version.endpoints:
        by_locality.setdefault((endpoint.region, endpoint.zone), []).append(endpoint)
    assignment = endpoint_pb2.ClusterLoadAssignment(cluster_name=version.cluster)
    for (region, zone), endpoints in sorted(by_locality.items()):
        locality = assignment.endpoints.add()
        locality.locality.region = region
        locality.locality.zone = zone
        for endpoint in endpoints:
            lb_endpoint = locality.lb_endpoints.add()
            socket = lb_endpoint.endpoint.address.socket_address
            socket.address = endpoint.ip
            socket.port_value = endpoint.port
            if endpoint.drained:
                # Draining: Envoy's own balancing skips it too, so fail-open agrees with the picker.
                lb_endpoint.health_status = health_check_pb2.DRAINING
            lb_endpoint.metadata.CopyFrom(_host_metadata(endpoint.pool, endpoint.tier))
            if endpoint.lb_weight:  # fast path: load-aware weight for Envoy's own balancing
                lb_endpoint.load_balancing_weight.value = endpoint.lb_weight
    return assignment


@functools.lru_cache(maxsize=4096)
def _host_metadata(pool: str, tier: str) -> base_pb2.Metadata:
    """Per-host metadata `imesh: {pool, tier}` (for %UPSTREAM_METADATA%); shared, copied into each host."""
    metadata = struct_pb2.Struct()
    metadata.update({"pool": pool, "tier": tier})
    return base_pb2.Metadata(filter_metadata={HOST_METADATA_NAMESPACE: metadata})


# ---------------------------------------------------------------- LDS


def translate_listener(model: MeshModel, options: EnvoyOptions) -> listener_pb2.Listener:
    strip_internal = header_mutation_pb2.HeaderMutation(
        mutations=header_mutation_pb2.Mutations(
            request_mutations=[
                mutation_rules_pb2.HeaderMutation(
                    remove_on_match=mutation_rules_pb2.HeaderMutation.RemoveOnMatch(
                        key_matcher=string_pb2.StringMatcher(prefix=INTERNAL_HEADER_PREFIX)
                    )
                )
            ]
        )
    )
    ext_proc = ext_proc_pb2.ExternalProcessor(
        grpc_service=_grpc_service(options),
        # Fail open: with the picker down, Envoy still routes on RDS weights and least-request.
        failure_mode_allow=True,
        allow_mode_override=True,  # the picker asks for the body only when no header named the model
        processing_mode=processing_mode_pb2.ProcessingMode(
            request_header_mode=processing_mode_pb2.ProcessingMode.SEND,
            response_header_mode=processing_mode_pb2.ProcessingMode.SKIP,
            request_body_mode=processing_mode_pb2.ProcessingMode.NONE,
            response_body_mode=processing_mode_pb2.ProcessingMode.NONE,
            request_trailer_mode=processing_mode_pb2.ProcessingMode.SKIP,
            response_trailer_mode=processing_mode_pb2.ProcessingMode.SKIP,
        ),
        message_timeout=seconds(options.extproc_timeout_s),
        metadata_options=ext_proc_pb2.MetadataOptions(
            receiving_namespaces=ext_proc_pb2.MetadataOptions.MetadataNamespaces(
                # envoy.lb: the pick; imesh: the ext_proc's notes for the access log (model, output tokens)
                untyped=[PICK_METADATA_NAMESPACE, TELEMETRY_METADATA_NAMESPACE]
            )
        ),
    )
    manager = hcm_pb2.HttpConnectionManager(
        stat_prefix="imesh",
        codec_type=hcm_pb2.HttpConnectionManager.AUTO,
        rds=hcm_pb2.Rds(route_config_name=ROUTE_CONFIG_NAME, config_source=_ads()),
        http_filters=[
            hcm_pb2.HttpFilter(name="envoy.filters.http.header_mutation", typed_config=pack(strip_internal)),
            hcm_pb2.HttpFilter(name=EXTPROC_FILTER, typed_config=pack(ext_proc), disabled=has_fast_path(model)),
            hcm_pb2.HttpFilter(name="envoy.filters.http.router", typed_config=pack(router_pb2.Router())),
        ],
        local_reply_config=_local_reply_config(),
        access_log=translate_telemetry.access_logs(options),
        tracing=translate_telemetry.tracing(options),
    )
    return listener_pb2.Listener(
        name=LISTENER_NAME,
        address=address_pb2.Address(
            socket_address=address_pb2.SocketAddress(address=options.listener_host, port_value=options.listener_port)
        ),
        per_connection_buffer_limit_bytes=wrappers_pb2.UInt32Value(value=model.defaults.max_body_bytes),
        filter_chains=[
            listener_components_pb2.FilterChain(
                filters=[
                    listener_components_pb2.Filter(
                        name="envoy.filters.network.http_connection_manager", typed_config=pack(manager)
                    )
                ]
            )
        ],
    )


def _grpc_service(options: EnvoyOptions):
    from envoy.config.core.v3 import grpc_service_pb2

    return grpc_service_pb2.GrpcService(
        envoy_grpc=grpc_service_pb2.GrpcService.EnvoyGrpc(cluster_name=options.extproc_cluster),
        timeout=seconds(options.extproc_timeout_s),
    )


def _local_reply_config() -> hcm_pb2.LocalReplyConfig:
    """Envoy's own upstream failures (no healthy host, connect failure) in the JSON envelope too."""
    from envoy.config.accesslog.v3 import accesslog_pb2

    envelope = struct_pb2.Struct()
    envelope.update(error_envelope(error_type(503), "%LOCAL_REPLY_BODY%", "%RESPONSE_FLAGS%"))
    upstream_failure = accesslog_pb2.AccessLogFilter(
        response_flag_filter=accesslog_pb2.ResponseFlagFilter(flags=["UH", "UF", "UO", "URX", "NC", "UC"])
    )
    return hcm_pb2.LocalReplyConfig(
        mappers=[
            hcm_pb2.ResponseMapper(
                filter=upstream_failure,
                status_code=wrappers_pb2.UInt32Value(value=503),
                body_format_override=substitution_format_string_pb2.SubstitutionFormatString(json_format=envelope),
                headers_to_add=[_header("retry-after", "1")],
            )
        ]
    )


# ---------------------------------------------------------------- RDS


def translate_routes(model: MeshModel, memo: TranslationMemo | None = None) -> route_pb2.RouteConfiguration:
    # Memoized per model: _model_routes may read its model (but not its endpoints: that is EDS's
    # job) and the memo's context (defaults, priorities, scoring), never another model.
    memo = memo or NO_MEMO
    routes = [_models_list_route(model)]
    for m in model.models:
        routes += memo.get("model-routes", model_routes_key(m), _model_routes, m, model)
    routes += _picker_unavailable_routes()
    routes.append(_unknown_model_route())
    config = route_pb2.RouteConfiguration(
        name=ROUTE_CONFIG_NAME,
        virtual_hosts=[route_components_pb2.VirtualHost(name="models", domains=["*"], routes=routes)],
        # Stale internal headers never reach a replica or the client.
        request_headers_to_remove=[MODEL_HEADER, VERSION_HEADER],
        # Envoy rejects direct-response bodies over 4 KiB unless told otherwise; /v1/models lists
        # every model (85 KB at 1,000 models).
        max_direct_response_body_size_bytes=wrappers_pb2.UInt32Value(value=_direct_body_limit(routes)),
    )
    if has_fast_path(model):  # the listener's ext_proc is off by default then: on everywhere but the fast routes
        config.typed_per_filter_config[EXTPROC_FILTER].CopyFrom(_extproc_enabled())
    return config


def _direct_body_limit(routes: list[route_components_pb2.Route]) -> int:
    largest = max(
        (
            len(r.direct_response.body.inline_string.encode())
            for r in routes
            if r.WhichOneof("action") == "direct_response"
        ),
        default=0,
    )
    return max(4096, largest)


def _models_list_route(model: MeshModel) -> route_components_pb2.Route:
    """GET /v1/models is answered by Envoy itself, so it works even with the picker down."""
    body = models_list_body(
        (m.name for m in model.models), ((a.name, m.name) for m in model.models for a in m.adapters)
    )
    return route_components_pb2.Route(
        name="models-list",
        match=route_components_pb2.RouteMatch(path=MODELS_LIST_PATH),
        direct_response=route_components_pb2.DirectResponseAction(
            status=200, body=base_pb2.DataSource(inline_string=body)
        ),
        response_headers_to_add=[_header("content-type", "application/json")],
    )


def _picker_unavailable_routes() -> list[route_components_pb2.Route]:
    """A body-named request only reaches these when the ext_proc failed open (down, overloaded, past
    its timeout): had it run, it would have named the route or refused the request itself. The model
    may well exist, so the answer is 503 with Retry-After, not the catch-all's 404."""
    body = error_body(
        error_type(503),
        f"the mesh's picker is unavailable, so the model named in the body cannot be read; retry, "
        f"or name the model in the {MODEL_ID_HEADER} header to route without the picker",
        PICKER_UNAVAILABLE_CODE,
    )
    no_model_header = route_components_pb2.HeaderMatcher(name=MODEL_ID_HEADER, present_match=False)
    post = exact(":method", "POST")
    return [
        route_components_pb2.Route(
            name=f"picker-unavailable{path}",
            match=route_components_pb2.RouteMatch(path=path, headers=[post, no_model_header]),
            direct_response=route_components_pb2.DirectResponseAction(
                status=503, body=base_pb2.DataSource(inline_string=body)
            ),
            response_headers_to_add=[_header("content-type", "application/json"), _header("retry-after", "1")],
        )
        for path in sorted(BODY_MODEL_PATHS)
    ]


def _unknown_model_route() -> route_components_pb2.Route:
    return route_components_pb2.Route(
        name="unknown-model",
        match=route_components_pb2.RouteMatch(prefix="/"),
        direct_response=route_components_pb2.DirectResponseAction(
            status=404,
            body=base_pb2.DataSource(
                inline_string=error_body(
                    error_type(404), f"no served model matches this request (set {MODEL_ID_HEADER})", MODEL_NOT_FOUND
                )
            ),
        ),
        response_headers_to_add=[_header("content-type", "application/json")],
    )


def _model_routes(m: ModelModel, model: MeshModel) -> list[route_components_pb2.Route]:
    """Routes for one model, most specific first: pinned versions, then the weighted split."""
    routes = []
    for v in m.versions:
        routes.append(
            _route(
                f"{m.name}/{v.name}/pinned",
                route_components_pb2.RouteMatch(
                    prefix="/", headers=[exact(MODEL_HEADER, m.name), exact(VERSION_HEADER, v.name)]
                ),
                _version_action(m, v, model),
                m,
                model,
                pinned=v,
            )
        )
    split = _weighted_action(m, model)
    routes.append(
        _route(
            f"{m.name}",
            route_components_pb2.RouteMatch(prefix="/", headers=[exact(MODEL_HEADER, m.name)]),
            split,
            m,
            model,
        )
    )
    # Fail-open matches: used only when the picker did not run (down or timed out).
    for v in m.versions:
        routes.append(
            _route(
                f"{m.name}/{v.name}/kserve-path",
                route_components_pb2.RouteMatch(prefix=f"/v2/models/{m.name}/versions/{v.name}/"),
                _version_action(m, v, model),
                m,
                model,
                pinned=v,
            )
        )
    routes.append(
        _route(
            f"{m.name}/kserve-path", route_components_pb2.RouteMatch(prefix=f"/v2/models/{m.name}/"), split, m, model
        )
    )
    if m.allow_version_override:
        routes += _forced_version_routes(m, model)
    routes.append(
        _route(
            f"{m.name}/header",
            route_components_pb2.RouteMatch(prefix="/", headers=[exact(MODEL_ID_HEADER, m.name)]),
            split,
            m,
            model,
        )
    )
    routes += _adapter_routes(m, model, split)
    if m.routing_mode == "fast":
        # Fast path: a request whose own header or path names this model skips the ext_proc and
        # Envoy balances it (override_host's least-request fallback) on the load-aware EDS
        # weights. Routes on x-imesh-model keep it: only a picker run (a body-named model) gets there.
        for route in routes:
            if not any(h.name == MODEL_HEADER for h in route.match.headers):
                route.typed_per_filter_config[EXTPROC_FILTER].CopyFrom(_extproc_disabled())
    return routes


def _adapter_routes(
    m: ModelModel, model: MeshModel, split: route_components_pb2.RouteAction
) -> list[route_components_pb2.Route]:
    """Fail-open twins of the ext_proc's adapter resolution: a LoRA adapter named in x-model-id goes
    to its base model's clusters (the split, or the one version that serves it); the request, its
    model still the adapter's name, tells the replica which adapter to run."""
    routes = []
    for a in m.adapters:
        match = route_components_pb2.RouteMatch(
            prefix="/", headers=[route_components_pb2.HeaderMatcher(name=MODEL_ID_HEADER, string_match=_exact(a.name))]
        )
        pinned = m.version(a.version) if a.version else None
        action = _version_action(m, pinned, model) if pinned is not None else split
        routes.append(_route(f"{m.name}/adapter/{a.name}", match, action, m, model, pinned=pinned))
    return routes


def _exact(value: str) -> string_pb2.StringMatcher:
    return string_pb2.StringMatcher(exact=value)


def exact(name: str, value: str) -> route_components_pb2.HeaderMatcher:
    """A route matcher: header ``name`` equals ``value``."""
    return route_components_pb2.HeaderMatcher(name=name, string_match=_exact(value))


def has_fast_path(model: MeshModel) -> bool:
    return any(m.routing_mode == "fast" for m in model.models)


# With a fast path in the mesh, the ext_proc filter is off by default in the listener and on for
# every route (route-configuration level) except the fast routes, which turn it off with a
# FilterConfig: Envoy then does not even create the filter for them, which saves about 25 µs of
# Envoy CPU per request over a filter that is created and then disables itself per route
# (docs/benchmarks.md). Without a fast path the listener is as it always was.


@functools.lru_cache(maxsize=1)
def _extproc_disabled() -> any_pb2.Any:
    return pack(route_components_pb2.FilterConfig(disabled=True))


@functools.lru_cache(maxsize=1)
def _extproc_enabled() -> any_pb2.Any:
    per_route = ext_proc_pb2.ExtProcPerRoute()
    per_route.overrides.SetInParent()  # no override: the listener's config, switched on
    return pack(per_route)


def _forced_version_routes(m: ModelModel, model: MeshModel) -> list[route_components_pb2.Route]:
    """Fail-open twins of the ext_proc's forced version: the client's version header, honoured
    only for models whose spec allows it, pins that version; an unknown one is 404 either way."""
    by_id = exact(MODEL_ID_HEADER, m.name)
    header = model.defaults.version_header
    routes = [
        _route(
            f"{m.name}/{v.name}/forced",
            route_components_pb2.RouteMatch(prefix="/", headers=[by_id, exact(header, v.name)]),
            _version_action(m, v, model),
            m,
            model,
            pinned=v,
        )
        for v in m.versions
    ]
    routes.append(
        route_components_pb2.Route(
            name=f"{m.name}/forced-unknown",
            match=route_components_pb2.RouteMatch(
                prefix="/", headers=[by_id, route_components_pb2.HeaderMatcher(name=header, present_match=True)]
            ),
            direct_response=route_components_pb2.DirectResponseAction(
                status=404,
                body=base_pb2.DataSource(
                    inline_string=error_body(
                        error_type(404), f"model {m.name!r} has no version named in {header}", MODEL_NOT_FOUND
                    )
                ),
            ),
            response_headers_to_add=[_header("content-type", "application/json")],
        )
    )
    return routes


def _route(name, match, action, m: ModelModel, model: MeshModel, pinned: VersionModel | None = None):
    headers = []
    if model.defaults.response_headers:
        headers = [
            _header(MODEL_HEADER, m.name),
            _header(ENDPOINT_HEADER, "%UPSTREAM_HOST%"),
            _header(POOL_HEADER, f"%UPSTREAM_METADATA({HOST_METADATA_NAMESPACE}:pool)%"),
        ]
        if pinned is not None:  # a weighted split carries the version header per cluster instead
            headers.append(_header(VERSION_HEADER, pinned.name))
    headers += [_header(k, v) for k, v in model.defaults.extra_response_headers.items()]
    return route_components_pb2.Route(name=name, match=match, route=action, response_headers_to_add=headers)


def _retry_policy(model: MeshModel) -> route_components_pb2.RetryPolicy:
    return translate_resilience.retry_policy(model.resilience.retries, model.defaults.retries)


def _version_action(m: ModelModel, v: VersionModel, model: MeshModel) -> route_components_pb2.RouteAction:
    action = _base_action(model)
    action.cluster = v.cluster
    return action


def _weighted_action(m: ModelModel, model: MeshModel) -> route_components_pb2.RouteAction:
    action = _base_action(model)
    if m.sticky_header:
        # A/B stickiness: the version is chosen by a hash of the session header instead of at
        # random, so one session sees one version for as long as the weights hold (a request
        # without the header is split at random as usual).
        action.hash_policy.add(header=route_components_pb2.RouteAction.HashPolicy.Header(header_name=m.sticky_header))
        action.weighted_clusters.use_hash_policy.value = True
    for v in m.versions:
        entry = action.weighted_clusters.clusters.add(name=v.cluster, weight=wrappers_pb2.UInt32Value(value=v.weight))
        if model.defaults.response_headers:
            entry.response_headers_to_add.append(_header(VERSION_HEADER, v.name))
    return action


def _base_action(model: MeshModel) -> route_components_pb2.RouteAction:
    return route_components_pb2.RouteAction(
        timeout=seconds(model.defaults.request_timeout_s),
        retry_policy=_retry_policy(model),
    )
