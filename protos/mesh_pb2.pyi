from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Endpoint(_message.Message):
    __slots__ = ("address", "pool", "tier", "cost_per_hour", "region", "zone", "drained", "max_concurrency", "kv_events")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    COST_PER_HOUR_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    ZONE_FIELD_NUMBER: _ClassVar[int]
    DRAINED_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCURRENCY_FIELD_NUMBER: _ClassVar[int]
    KV_EVENTS_FIELD_NUMBER: _ClassVar[int]
    address: str
    pool: str
    tier: str
    cost_per_hour: float
    region: str
    zone: str
    drained: bool
    max_concurrency: int
    kv_events: str
    def __init__(self, address: _Optional[str] = ..., pool: _Optional[str] = ..., tier: _Optional[str] = ..., cost_per_hour: _Optional[float] = ..., region: _Optional[str] = ..., zone: _Optional[str] = ..., drained: _Optional[bool] = ..., max_concurrency: _Optional[int] = ..., kv_events: _Optional[str] = ...) -> None: ...

class ModelVersion(_message.Message):
    __slots__ = ("name", "weight", "cluster", "context_window", "engine", "endpoints")
    NAME_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_WINDOW_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    ENDPOINTS_FIELD_NUMBER: _ClassVar[int]
    name: str
    weight: int
    cluster: str
    context_window: int
    engine: str
    endpoints: _containers.RepeatedCompositeFieldContainer[Endpoint]
    def __init__(self, name: _Optional[str] = ..., weight: _Optional[int] = ..., cluster: _Optional[str] = ..., context_window: _Optional[int] = ..., engine: _Optional[str] = ..., endpoints: _Optional[_Iterable[_Union[Endpoint, _Mapping]]] = ...) -> None: ...

class LoraAdapter(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class Model(_message.Message):
    __slots__ = ("name", "versions", "allow_version_override", "scheduling", "adapters", "tokenizer")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    ALLOW_VERSION_OVERRIDE_FIELD_NUMBER: _ClassVar[int]
    SCHEDULING_FIELD_NUMBER: _ClassVar[int]
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FIELD_NUMBER: _ClassVar[int]
    name: str
    versions: _containers.RepeatedCompositeFieldContainer[ModelVersion]
    allow_version_override: bool
    scheduling: SchedulingProfile
    adapters: _containers.RepeatedCompositeFieldContainer[LoraAdapter]
    tokenizer: str
    def __init__(self, name: _Optional[str] = ..., versions: _Optional[_Iterable[_Union[ModelVersion, _Mapping]]] = ..., allow_version_override: _Optional[bool] = ..., scheduling: _Optional[_Union[SchedulingProfile, _Mapping]] = ..., adapters: _Optional[_Iterable[_Union[LoraAdapter, _Mapping]]] = ..., tokenizer: _Optional[str] = ...) -> None: ...

class PriorityClass(_message.Message):
    __slots__ = ("name", "rank", "preferred_tiers", "strict_tiers", "shed_threshold")
    NAME_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    PREFERRED_TIERS_FIELD_NUMBER: _ClassVar[int]
    STRICT_TIERS_FIELD_NUMBER: _ClassVar[int]
    SHED_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    name: str
    rank: int
    preferred_tiers: _containers.RepeatedScalarFieldContainer[str]
    strict_tiers: bool
    shed_threshold: float
    def __init__(self, name: _Optional[str] = ..., rank: _Optional[int] = ..., preferred_tiers: _Optional[_Iterable[str]] = ..., strict_tiers: _Optional[bool] = ..., shed_threshold: _Optional[float] = ...) -> None: ...

class Scoring(_message.Message):
    __slots__ = ("queue_weight", "kv_cache_weight", "inflight_weight", "saturation_queue", "saturation_kv", "stale_after_s", "latency_weight")
    QUEUE_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    INFLIGHT_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    SATURATION_QUEUE_FIELD_NUMBER: _ClassVar[int]
    SATURATION_KV_FIELD_NUMBER: _ClassVar[int]
    STALE_AFTER_S_FIELD_NUMBER: _ClassVar[int]
    LATENCY_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    queue_weight: float
    kv_cache_weight: float
    inflight_weight: float
    saturation_queue: float
    saturation_kv: float
    stale_after_s: float
    latency_weight: float
    def __init__(self, queue_weight: _Optional[float] = ..., kv_cache_weight: _Optional[float] = ..., inflight_weight: _Optional[float] = ..., saturation_queue: _Optional[float] = ..., saturation_kv: _Optional[float] = ..., stale_after_s: _Optional[float] = ..., latency_weight: _Optional[float] = ...) -> None: ...

class PluginRef(_message.Message):
    __slots__ = ("type", "weight", "params")
    class ParamsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    TYPE_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    type: str
    weight: float
    params: _containers.ScalarMap[str, str]
    def __init__(self, type: _Optional[str] = ..., weight: _Optional[float] = ..., params: _Optional[_Mapping[str, str]] = ...) -> None: ...

class SchedulingProfile(_message.Message):
    __slots__ = ("filters", "scorers")
    FILTERS_FIELD_NUMBER: _ClassVar[int]
    SCORERS_FIELD_NUMBER: _ClassVar[int]
    filters: _containers.RepeatedScalarFieldContainer[str]
    scorers: _containers.RepeatedCompositeFieldContainer[PluginRef]
    def __init__(self, filters: _Optional[_Iterable[str]] = ..., scorers: _Optional[_Iterable[_Union[PluginRef, _Mapping]]] = ...) -> None: ...

class RoutingTable(_message.Message):
    __slots__ = ("version", "models", "priorities", "default_priority", "scoring", "max_body_bytes", "version_header", "scheduling")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    PRIORITIES_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_PRIORITY_FIELD_NUMBER: _ClassVar[int]
    SCORING_FIELD_NUMBER: _ClassVar[int]
    MAX_BODY_BYTES_FIELD_NUMBER: _ClassVar[int]
    VERSION_HEADER_FIELD_NUMBER: _ClassVar[int]
    SCHEDULING_FIELD_NUMBER: _ClassVar[int]
    version: int
    models: _containers.RepeatedCompositeFieldContainer[Model]
    priorities: _containers.RepeatedCompositeFieldContainer[PriorityClass]
    default_priority: str
    scoring: Scoring
    max_body_bytes: int
    version_header: str
    scheduling: SchedulingProfile
    def __init__(self, version: _Optional[int] = ..., models: _Optional[_Iterable[_Union[Model, _Mapping]]] = ..., priorities: _Optional[_Iterable[_Union[PriorityClass, _Mapping]]] = ..., default_priority: _Optional[str] = ..., scoring: _Optional[_Union[Scoring, _Mapping]] = ..., max_body_bytes: _Optional[int] = ..., version_header: _Optional[str] = ..., scheduling: _Optional[_Union[SchedulingProfile, _Mapping]] = ...) -> None: ...

class EndpointLoad(_message.Message):
    __slots__ = ("address", "waiting", "running", "kv_cache", "gpu_util", "age_s", "reachable", "latency_s", "prefill_tokens_per_s", "prefill_tokens_mean", "decode_step_s", "adapters", "max_adapters", "not_ready", "ejected", "slots")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    WAITING_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_FIELD_NUMBER: _ClassVar[int]
    GPU_UTIL_FIELD_NUMBER: _ClassVar[int]
    AGE_S_FIELD_NUMBER: _ClassVar[int]
    REACHABLE_FIELD_NUMBER: _ClassVar[int]
    LATENCY_S_FIELD_NUMBER: _ClassVar[int]
    PREFILL_TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    PREFILL_TOKENS_MEAN_FIELD_NUMBER: _ClassVar[int]
    DECODE_STEP_S_FIELD_NUMBER: _ClassVar[int]
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    MAX_ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    NOT_READY_FIELD_NUMBER: _ClassVar[int]
    EJECTED_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    address: str
    waiting: float
    running: float
    kv_cache: float
    gpu_util: float
    age_s: float
    reachable: bool
    latency_s: float
    prefill_tokens_per_s: float
    prefill_tokens_mean: float
    decode_step_s: float
    adapters: _containers.RepeatedScalarFieldContainer[str]
    max_adapters: int
    not_ready: bool
    ejected: bool
    slots: float
    def __init__(self, address: _Optional[str] = ..., waiting: _Optional[float] = ..., running: _Optional[float] = ..., kv_cache: _Optional[float] = ..., gpu_util: _Optional[float] = ..., age_s: _Optional[float] = ..., reachable: _Optional[bool] = ..., latency_s: _Optional[float] = ..., prefill_tokens_per_s: _Optional[float] = ..., prefill_tokens_mean: _Optional[float] = ..., decode_step_s: _Optional[float] = ..., adapters: _Optional[_Iterable[str]] = ..., max_adapters: _Optional[int] = ..., not_ready: _Optional[bool] = ..., ejected: _Optional[bool] = ..., slots: _Optional[float] = ...) -> None: ...

class LoadReport(_message.Message):
    __slots__ = ("sequence", "endpoints")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    ENDPOINTS_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    endpoints: _containers.RepeatedCompositeFieldContainer[EndpointLoad]
    def __init__(self, sequence: _Optional[int] = ..., endpoints: _Optional[_Iterable[_Union[EndpointLoad, _Mapping]]] = ...) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ("client_id",)
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    def __init__(self, client_id: _Optional[str] = ...) -> None: ...

class ApplySpecRequest(_message.Message):
    __slots__ = ("spec_yaml", "source_name", "dry_run")
    SPEC_YAML_FIELD_NUMBER: _ClassVar[int]
    SOURCE_NAME_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    spec_yaml: str
    source_name: str
    dry_run: bool
    def __init__(self, spec_yaml: _Optional[str] = ..., source_name: _Optional[str] = ..., dry_run: _Optional[bool] = ...) -> None: ...

class ApplySpecResponse(_message.Message):
    __slots__ = ("changed", "diff", "config_version")
    CHANGED_FIELD_NUMBER: _ClassVar[int]
    DIFF_FIELD_NUMBER: _ClassVar[int]
    CONFIG_VERSION_FIELD_NUMBER: _ClassVar[int]
    changed: bool
    diff: _containers.RepeatedScalarFieldContainer[str]
    config_version: int
    def __init__(self, changed: _Optional[bool] = ..., diff: _Optional[_Iterable[str]] = ..., config_version: _Optional[int] = ...) -> None: ...

class GetSpecRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SpecDocument(_message.Message):
    __slots__ = ("spec_yaml", "config_version")
    SPEC_YAML_FIELD_NUMBER: _ClassVar[int]
    CONFIG_VERSION_FIELD_NUMBER: _ClassVar[int]
    spec_yaml: str
    config_version: int
    def __init__(self, spec_yaml: _Optional[str] = ..., config_version: _Optional[int] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class EnvoyNodeStatus(_message.Message):
    __slots__ = ("node_id", "connected", "acked_version", "last_nack_type", "last_nack_version", "last_nack_message")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    CONNECTED_FIELD_NUMBER: _ClassVar[int]
    ACKED_VERSION_FIELD_NUMBER: _ClassVar[int]
    LAST_NACK_TYPE_FIELD_NUMBER: _ClassVar[int]
    LAST_NACK_VERSION_FIELD_NUMBER: _ClassVar[int]
    LAST_NACK_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    connected: bool
    acked_version: str
    last_nack_type: str
    last_nack_version: str
    last_nack_message: str
    def __init__(self, node_id: _Optional[str] = ..., connected: _Optional[bool] = ..., acked_version: _Optional[str] = ..., last_nack_type: _Optional[str] = ..., last_nack_version: _Optional[str] = ..., last_nack_message: _Optional[str] = ...) -> None: ...

class TrafficStats(_message.Message):
    __slots__ = ("model", "version", "endpoint", "requests", "errors", "shed", "rate_rps", "p50_s", "p99_s", "ttft_p50_s")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    SHED_FIELD_NUMBER: _ClassVar[int]
    RATE_RPS_FIELD_NUMBER: _ClassVar[int]
    P50_S_FIELD_NUMBER: _ClassVar[int]
    P99_S_FIELD_NUMBER: _ClassVar[int]
    TTFT_P50_S_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: str
    endpoint: str
    requests: int
    errors: int
    shed: int
    rate_rps: float
    p50_s: float
    p99_s: float
    ttft_p50_s: float
    def __init__(self, model: _Optional[str] = ..., version: _Optional[str] = ..., endpoint: _Optional[str] = ..., requests: _Optional[int] = ..., errors: _Optional[int] = ..., shed: _Optional[int] = ..., rate_rps: _Optional[float] = ..., p50_s: _Optional[float] = ..., p99_s: _Optional[float] = ..., ttft_p50_s: _Optional[float] = ...) -> None: ...

class MeshStatus(_message.Message):
    __slots__ = ("config_version", "nodes", "table", "load", "traffic_window_s", "endpoint_traffic", "version_traffic", "model_traffic")
    CONFIG_VERSION_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    TABLE_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    TRAFFIC_WINDOW_S_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_TRAFFIC_FIELD_NUMBER: _ClassVar[int]
    VERSION_TRAFFIC_FIELD_NUMBER: _ClassVar[int]
    MODEL_TRAFFIC_FIELD_NUMBER: _ClassVar[int]
    config_version: int
    nodes: _containers.RepeatedCompositeFieldContainer[EnvoyNodeStatus]
    table: RoutingTable
    load: LoadReport
    traffic_window_s: float
    endpoint_traffic: _containers.RepeatedCompositeFieldContainer[TrafficStats]
    version_traffic: _containers.RepeatedCompositeFieldContainer[TrafficStats]
    model_traffic: _containers.RepeatedCompositeFieldContainer[TrafficStats]
    def __init__(self, config_version: _Optional[int] = ..., nodes: _Optional[_Iterable[_Union[EnvoyNodeStatus, _Mapping]]] = ..., table: _Optional[_Union[RoutingTable, _Mapping]] = ..., load: _Optional[_Union[LoadReport, _Mapping]] = ..., traffic_window_s: _Optional[float] = ..., endpoint_traffic: _Optional[_Iterable[_Union[TrafficStats, _Mapping]]] = ..., version_traffic: _Optional[_Iterable[_Union[TrafficStats, _Mapping]]] = ..., model_traffic: _Optional[_Iterable[_Union[TrafficStats, _Mapping]]] = ...) -> None: ...

class CanaryGates(_message.Message):
    __slots__ = ("max_error_rate", "max_p99_s", "min_samples")
    MAX_ERROR_RATE_FIELD_NUMBER: _ClassVar[int]
    MAX_P99_S_FIELD_NUMBER: _ClassVar[int]
    MIN_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    max_error_rate: float
    max_p99_s: float
    min_samples: int
    def __init__(self, max_error_rate: _Optional[float] = ..., max_p99_s: _Optional[float] = ..., min_samples: _Optional[int] = ...) -> None: ...

class GateReading(_message.Message):
    __slots__ = ("version", "samples", "errors", "error_rate", "p99_s", "window_s")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    ERROR_RATE_FIELD_NUMBER: _ClassVar[int]
    P99_S_FIELD_NUMBER: _ClassVar[int]
    WINDOW_S_FIELD_NUMBER: _ClassVar[int]
    version: str
    samples: int
    errors: int
    error_rate: float
    p99_s: float
    window_s: float
    def __init__(self, version: _Optional[str] = ..., samples: _Optional[int] = ..., errors: _Optional[int] = ..., error_rate: _Optional[float] = ..., p99_s: _Optional[float] = ..., window_s: _Optional[float] = ...) -> None: ...

class CanaryEvent(_message.Message):
    __slots__ = ("at_unix_s", "message")
    AT_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    at_unix_s: float
    message: str
    def __init__(self, at_unix_s: _Optional[float] = ..., message: _Optional[str] = ...) -> None: ...

class CanaryState(_message.Message):
    __slots__ = ("model", "version", "phase", "percent", "steps", "step", "interval_s", "gates", "step_started_at_unix_s", "baseline_weights", "weights", "previous_stable", "reason", "readings", "history", "waiting_for")
    class BaselineWeightsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class WeightsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    PERCENT_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    GATES_FIELD_NUMBER: _ClassVar[int]
    STEP_STARTED_AT_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    BASELINE_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_STABLE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    READINGS_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    WAITING_FOR_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: str
    phase: str
    percent: float
    steps: _containers.RepeatedScalarFieldContainer[float]
    step: int
    interval_s: float
    gates: CanaryGates
    step_started_at_unix_s: float
    baseline_weights: _containers.ScalarMap[str, int]
    weights: _containers.ScalarMap[str, int]
    previous_stable: str
    reason: str
    readings: _containers.RepeatedCompositeFieldContainer[GateReading]
    history: _containers.RepeatedCompositeFieldContainer[CanaryEvent]
    waiting_for: str
    def __init__(self, model: _Optional[str] = ..., version: _Optional[str] = ..., phase: _Optional[str] = ..., percent: _Optional[float] = ..., steps: _Optional[_Iterable[float]] = ..., step: _Optional[int] = ..., interval_s: _Optional[float] = ..., gates: _Optional[_Union[CanaryGates, _Mapping]] = ..., step_started_at_unix_s: _Optional[float] = ..., baseline_weights: _Optional[_Mapping[str, int]] = ..., weights: _Optional[_Mapping[str, int]] = ..., previous_stable: _Optional[str] = ..., reason: _Optional[str] = ..., readings: _Optional[_Iterable[_Union[GateReading, _Mapping]]] = ..., history: _Optional[_Iterable[_Union[CanaryEvent, _Mapping]]] = ..., waiting_for: _Optional[str] = ...) -> None: ...

class SetCanaryRequest(_message.Message):
    __slots__ = ("model", "version", "percent")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PERCENT_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: str
    percent: float
    def __init__(self, model: _Optional[str] = ..., version: _Optional[str] = ..., percent: _Optional[float] = ...) -> None: ...

class StartCanaryRequest(_message.Message):
    __slots__ = ("model", "version", "steps", "interval_s", "gates")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    GATES_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: str
    steps: _containers.RepeatedScalarFieldContainer[float]
    interval_s: float
    gates: CanaryGates
    def __init__(self, model: _Optional[str] = ..., version: _Optional[str] = ..., steps: _Optional[_Iterable[float]] = ..., interval_s: _Optional[float] = ..., gates: _Optional[_Union[CanaryGates, _Mapping]] = ...) -> None: ...

class CanaryRef(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class CanaryChange(_message.Message):
    __slots__ = ("config_version", "canary")
    CONFIG_VERSION_FIELD_NUMBER: _ClassVar[int]
    CANARY_FIELD_NUMBER: _ClassVar[int]
    config_version: int
    canary: CanaryState
    def __init__(self, config_version: _Optional[int] = ..., canary: _Optional[_Union[CanaryState, _Mapping]] = ...) -> None: ...

class CanaryStatusRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class CanaryStatusResponse(_message.Message):
    __slots__ = ("canaries",)
    CANARIES_FIELD_NUMBER: _ClassVar[int]
    canaries: _containers.RepeatedCompositeFieldContainer[CanaryState]
    def __init__(self, canaries: _Optional[_Iterable[_Union[CanaryState, _Mapping]]] = ...) -> None: ...

class DrainRequest(_message.Message):
    __slots__ = ("address", "drained")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    DRAINED_FIELD_NUMBER: _ClassVar[int]
    address: str
    drained: bool
    def __init__(self, address: _Optional[str] = ..., drained: _Optional[bool] = ...) -> None: ...

class DrainResponse(_message.Message):
    __slots__ = ("config_version", "changed", "model", "version")
    CONFIG_VERSION_FIELD_NUMBER: _ClassVar[int]
    CHANGED_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    config_version: int
    changed: bool
    model: str
    version: str
    def __init__(self, config_version: _Optional[int] = ..., changed: _Optional[bool] = ..., model: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class RoutesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RouteEntry(_message.Message):
    __slots__ = ("name", "match", "destination", "sticky_header")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MATCH_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_FIELD_NUMBER: _ClassVar[int]
    STICKY_HEADER_FIELD_NUMBER: _ClassVar[int]
    name: str
    match: str
    destination: str
    sticky_header: str
    def __init__(self, name: _Optional[str] = ..., match: _Optional[str] = ..., destination: _Optional[str] = ..., sticky_header: _Optional[str] = ...) -> None: ...

class RoutesResponse(_message.Message):
    __slots__ = ("config_version", "routes")
    CONFIG_VERSION_FIELD_NUMBER: _ClassVar[int]
    ROUTES_FIELD_NUMBER: _ClassVar[int]
    config_version: int
    routes: _containers.RepeatedCompositeFieldContainer[RouteEntry]
    def __init__(self, config_version: _Optional[int] = ..., routes: _Optional[_Iterable[_Union[RouteEntry, _Mapping]]] = ...) -> None: ...
