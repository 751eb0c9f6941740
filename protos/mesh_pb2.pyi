from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Endpoint(_message.Message):
    __slots__ = ("address", "pool", "tier", "cost_per_hour", "region", "zone", "drained", "max_concurrency")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    COST_PER_HOUR_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    ZONE_FIELD_NUMBER: _ClassVar[int]
    DRAINED_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCURRENCY_FIELD_NUMBER: _ClassVar[int]
    address: str
    pool: str
    tier: str
    cost_per_hour: float
    region: str
    zone: str
    drained: bool
    max_concurrency: int
    def __init__(self, address: _Optional[str] = ..., pool: _Optional[str] = ..., tier: _Optional[str] = ..., cost_per_hour: _Optional[float] = ..., region: _Optional[str] = ..., zone: _Optional[str] = ..., drained: _Optional[bool] = ..., max_concurrency: _Optional[int] = ...) -> None: ...

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

class Model(_message.Message):
    __slots__ = ("name", "versions")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    name: str
    versions: _containers.RepeatedCompositeFieldContainer[ModelVersion]
    def __init__(self, name: _Optional[str] = ..., versions: _Optional[_Iterable[_Union[ModelVersion, _Mapping]]] = ...) -> None: ...

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
    __slots__ = ("queue_weight", "kv_cache_weight", "inflight_weight", "saturation_queue", "saturation_kv", "stale_after_s")
    QUEUE_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    INFLIGHT_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    SATURATION_QUEUE_FIELD_NUMBER: _ClassVar[int]
    SATURATION_KV_FIELD_NUMBER: _ClassVar[int]
    STALE_AFTER_S_FIELD_NUMBER: _ClassVar[int]
    queue_weight: float
    kv_cache_weight: float
    inflight_weight: float
    saturation_queue: float
    saturation_kv: float
    stale_after_s: float
    def __init__(self, queue_weight: _Optional[float] = ..., kv_cache_weight: _Optional[float] = ..., inflight_weight: _Optional[float] = ..., saturation_queue: _Optional[float] = ..., saturation_kv: _Optional[float] = ..., stale_after_s: _Optional[float] = ...) -> None: ...

class RoutingTable(_message.Message):
    __slots__ = ("version", "models", "priorities", "default_priority", "scoring", "max_body_bytes")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    PRIORITIES_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_PRIORITY_FIELD_NUMBER: _ClassVar[int]
    SCORING_FIELD_NUMBER: _ClassVar[int]
    MAX_BODY_BYTES_FIELD_NUMBER: _ClassVar[int]
    version: int
    models: _containers.RepeatedCompositeFieldContainer[Model]
    priorities: _containers.RepeatedCompositeFieldContainer[PriorityClass]
    default_priority: str
    scoring: Scoring
    max_body_bytes: int
    def __init__(self, version: _Optional[int] = ..., models: _Optional[_Iterable[_Union[Model, _Mapping]]] = ..., priorities: _Optional[_Iterable[_Union[PriorityClass, _Mapping]]] = ..., default_priority: _Optional[str] = ..., scoring: _Optional[_Union[Scoring, _Mapping]] = ..., max_body_bytes: _Optional[int] = ...) -> None: ...

class EndpointLoad(_message.Message):
    __slots__ = ("address", "waiting", "running", "kv_cache", "gpu_util", "age_s", "reachable", "latency_s")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    WAITING_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_FIELD_NUMBER: _ClassVar[int]
    GPU_UTIL_FIELD_NUMBER: _ClassVar[int]
    AGE_S_FIELD_NUMBER: _ClassVar[int]
    REACHABLE_FIELD_NUMBER: _ClassVar[int]
    LATENCY_S_FIELD_NUMBER: _ClassVar[int]
    address: str
    waiting: float
    running: float
    kv_cache: float
    gpu_util: float
    age_s: float
    reachable: bool
    latency_s: float
    def __init__(self, address: _Optional[str] = ..., waiting: _Optional[float] = ..., running: _Optional[float] = ..., kv_cache: _Optional[float] = ..., gpu_util: _Optional[float] = ..., age_s: _Optional[float] = ..., reachable: _Optional[bool] = ..., latency_s: _Optional[float] = ...) -> None: ...

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

class MeshStatus(_message.Message):
    __slots__ = ("config_version", "nodes", "table", "load")
    CONFIG_VERSION_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    TABLE_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    config_version: int
    nodes: _containers.RepeatedCompositeFieldContainer[EnvoyNodeStatus]
    table: RoutingTable
    load: LoadReport
    def __init__(self, config_version: _Optional[int] = ..., nodes: _Optional[_Iterable[_Union[EnvoyNodeStatus, _Mapping]]] = ..., table: _Optional[_Union[RoutingTable, _Mapping]] = ..., load: _Optional[_Union[LoadReport, _Mapping]] = ...) -> None: ...
