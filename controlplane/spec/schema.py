"""The mesh spec: the YAML an operator writes, validated with pydantic.

Every validation error names the source file, the field path (``models[0].versions[1].weight``)
and what was expected, because an operator fixing a spec at 3 a.m. should not have to guess.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails

from controlplane.spec.resilience import ResilienceSpec

# The scheduler's plugin catalogue, the one import from extproc/: names are defined once, there
# (the registry imports only the standard library; docs/scheduler.md).
from extproc.scheduler import registry as scheduler_plugins
from protos.defaults import (
    DEFAULT_INFLIGHT_WEIGHT,
    DEFAULT_KV_CACHE_WEIGHT,
    DEFAULT_LATENCY_WEIGHT,
    DEFAULT_PRIORITY,
    DEFAULT_QUEUE_WEIGHT,
    DEFAULT_SATURATION_KV,
    DEFAULT_SATURATION_QUEUE,
    DEFAULT_STALE_AFTER_S,
    Engine,
)
from protos.wire import INTERNAL_HEADER_PREFIX

# How Envoy chooses a replica (docs/benchmarks.md): "picker" asks the ext_proc per request;
# "fast" skips it for requests whose model a header or the KServe path names, and balances on
# load-aware EDS weights the control plane derives from the replicas' metrics.
RoutingMode = Literal["picker", "fast"]

_NAME = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"


class SpecError(ValueError):
    """A spec that cannot be used; ``problems`` holds one ``file: field: message`` line each."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


class _Strict(BaseModel):
    # Unknown keys are errors: a typo like `wieght` must not be silently ignored.
    model_config = ConfigDict(extra="forbid", frozen=True)


class Locality(_Strict):
    region: str = ""
    zone: str = ""


class Pool(_Strict):
    """A group of replicas on like hardware: the unit priority classes and costs refer to."""

    name: str = Field(pattern=_NAME)
    tier: str = Field(default="standard", pattern=_NAME, description="e.g. low-latency, cost-effective")
    cost_per_hour: float = Field(default=0.0, ge=0)
    locality: Locality = Locality()


class EndpointSpec(_Strict):
    address: str = Field(description="ip:port of one replica")
    pool: str
    drained: bool = False
    max_concurrency: int = Field(default=0, ge=0)
    kv_events: str = Field(
        default="",
        description="tcp://ip:port where the replica publishes vLLM's KV-cache events (precise prefix affinity)",
    )

    @field_validator("kv_events")
    @classmethod
    def _zmq_tcp(cls, value: str) -> str:
        if not value:
            return value
        scheme, sep, rest = value.partition("://")
        if scheme != "tcp" or not sep:
            raise ValueError(f"expected tcp://ip:port (a ZMQ endpoint), got {value!r}")
        _check_ip_port(rest, "tcp://ip:port (a ZMQ endpoint)", value)
        return value

    @field_validator("address")
    @classmethod
    def _ip_and_port(cls, value: str) -> str:
        # Envoy's EDS accepts only IP addresses; names are resolved by discovery, not here.
        _check_ip_port(value, "ip:port", value)
        return value


def _check_ip_port(host_port: str, expected: str, whole: str) -> None:
    host, sep, port = host_port.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected {expected}, got {whole!r}")
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        raise ValueError(f"expected an IP address before the port, got {host!r}") from None


class VersionSpec(_Strict):
    name: str = Field(pattern=_NAME)
    weight: int = Field(default=100, ge=0, le=10000)
    engine: Engine = "vllm"
    context_window: int = Field(default=0, ge=0, description="tokens; 0 = unknown")
    upstream_protocol: Literal["http1", "http2"] = Field(
        default="http1", description="how Envoy talks to the replicas: http2 for gRPC (KServe v2) servers"
    )
    endpoints: list[EndpointSpec] = Field(default_factory=list)
    adapters: list[Annotated[str, Field(pattern=_NAME)]] = Field(
        default_factory=list,
        description="LoRA adapters the version's replicas serve: names clients send as the model (docs/spec.md)",
    )

    @field_validator("adapters")
    @classmethod
    def _unique_adapters(cls, value: list[str]) -> list[str]:
        _no_repeats("adapter", value)
        return value


class ABSpec(_Strict):
    """A/B and testing options of one model (docs/canary.md)."""

    sticky_header: str | None = Field(
        default=None, description="overrides defaults.sticky_header for this model; '' turns stickiness off"
    )
    allow_version_override: bool = Field(
        default=False,
        description="honour the client's defaults.version_header (e.g. x-model-version) to force a version",
    )

    @field_validator("sticky_header")
    @classmethod
    def _sticky_header(cls, value: str | None) -> str | None:
        return _check_header_name(value) if value else value


class ModelSpec(_Strict):
    name: str = Field(pattern=_NAME)
    versions: list[VersionSpec] = Field(min_length=1)
    ab: ABSpec = ABSpec()
    routing_mode: RoutingMode | None = Field(default=None, description="overrides defaults.routing_mode for this model")
    scheduling: SchedulingSpec | None = Field(default=None, description="replaces the top-level scheduling profile")
    tokenizer: str = Field(
        default="",
        description="path of the model's HF tokenizer.json on the ext_proc's host (precise prefix affinity)",
    )

    @model_validator(mode="after")
    def _versions_are_coherent(self) -> ModelSpec:
        names = [v.name for v in self.versions]
        if len(set(names)) != len(names):
            raise ValueError(f"version names must be unique, got {names}")
        if sum(v.weight for v in self.versions) <= 0:
            raise ValueError("at least one version needs a weight above 0")
        if not self.tokenizer and any(e.kv_events for v in self.versions for e in v.endpoints):
            # The engine's events carry token ids; without the tokenizer no lookup could match them.
            raise ValueError("endpoints with kv_events need the model's tokenizer (docs/prefix-affinity.md)")
        return self


class PriorityClassSpec(_Strict):
    name: str = Field(pattern=_NAME)
    preferred_tiers: list[str] = Field(default_factory=list)
    strict_tiers: bool = False
    shed_threshold: float = Field(
        default=0.0, ge=0, le=1, description="fraction of saturated candidates that sheds this class; 0 = never"
    )


class ScoringSpec(_Strict):
    # Defaults shared with the ext_proc, which falls back to them (protos/defaults.py).
    queue_weight: float = Field(default=DEFAULT_QUEUE_WEIGHT, ge=0)
    kv_cache_weight: float = Field(default=DEFAULT_KV_CACHE_WEIGHT, ge=0)
    inflight_weight: float = Field(default=DEFAULT_INFLIGHT_WEIGHT, ge=0)
    latency_weight: float = Field(
        default=DEFAULT_LATENCY_WEIGHT, ge=0, description="weight of the replica's recent mean latency"
    )
    saturation_queue: float = Field(default=DEFAULT_SATURATION_QUEUE, gt=0)
    saturation_kv: float = Field(default=DEFAULT_SATURATION_KV, gt=0, le=1)
    stale_after_s: float = Field(default=DEFAULT_STALE_AFTER_S, gt=0)


def _known_filter(name: str) -> str:
    return scheduler_plugins.require("filter", name)


def _known_scorer(name: str) -> str:
    return scheduler_plugins.require("scorer", name)


class ScorerRef(_Strict):
    """One scorer of a profile: a plugin of extproc/scheduler/registry.py and its weight."""

    type: Annotated[str, AfterValidator(_known_scorer)]
    weight: float = Field(default=1.0, ge=0, allow_inf_nan=False, description="0 leaves the scorer out")
    params: dict[str, str] = Field(default_factory=dict, description="the plugin's own parameters")

    @field_validator("params")
    @classmethod
    def _known_params(cls, value: dict[str, str], info: ValidationInfo) -> dict[str, str]:
        kind = info.data.get("type")
        if kind is not None:  # an unknown type is reported on its own
            scheduler_plugins.check_params("scorer", kind, value)
        return value


class SchedulingSpec(_Strict):
    """A scheduling profile (docs/scheduler.md): the ext_proc's filters, in order, and weighted scorers.

    ``scorers`` left out: today's scorers with the ``scoring:`` weights.
    """

    filters: list[Annotated[str, AfterValidator(_known_filter)]] = Field(
        default_factory=lambda: list(scheduler_plugins.DEFAULT_FILTERS)
    )
    scorers: list[ScorerRef] | None = None

    @field_validator("filters")
    @classmethod
    def _filters(cls, value: list[str]) -> list[str]:
        _no_repeats("filter", value)
        missing = [name for name in scheduler_plugins.REQUIRED_FILTERS if name not in value]
        if missing:
            raise ValueError(f"must include {missing} (a drained replica receives no new requests)")
        return value

    @field_validator("scorers")
    @classmethod
    def _scorers(cls, value: list[ScorerRef] | None) -> list[ScorerRef] | None:
        if value is None:
            return value
        if not value:
            raise ValueError("needs at least one scorer; leave `scorers` out for the default ones")
        _no_repeats("scorer", [s.type for s in value])
        return value


def _no_repeats(kind: str, names: list[str]) -> None:
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"each {kind} may appear once, repeated: {repeated}")


class Defaults(_Strict):
    priority: str = DEFAULT_PRIORITY
    response_headers: bool = Field(default=True, description="add x-imesh-* headers to responses")
    max_body_bytes: int = Field(default=4 * 1024 * 1024, gt=0)
    request_timeout_s: float = Field(default=300.0, gt=0)
    retries: int = Field(default=2, ge=0, le=10)
    routing_mode: RoutingMode = Field(
        default="picker",
        description="picker: the ext_proc picks a replica per request; fast: requests naming the model in "
        "x-model-id or the KServe path bypass the ext_proc and Envoy balances on load-aware EDS weights "
        "(no per-request shedding or tier preference)",
    )
    extra_response_headers: dict[str, str] = Field(
        default_factory=dict, description="Envoy header formatters, e.g. {x-served-by: '%UPSTREAM_HOST%'}"
    )
    sticky_header: str = Field(
        default="x-session-id",
        description="A/B stickiness: requests with the same value of this header get the same version "
        "(Envoy hashes it to choose among the weighted versions); '' turns it off. Per model: ab.sticky_header",
    )
    version_header: str = Field(
        default="x-model-version",
        description="header a client sets to force a version, honoured only where ab.allow_version_override",
    )

    @field_validator("extra_response_headers")
    @classmethod
    def _header_names(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            _check_header_name(name)
        return value

    @field_validator("sticky_header")
    @classmethod
    def _sticky_header(cls, value: str) -> str:
        return _check_header_name(value) if value else value

    @field_validator("version_header")
    @classmethod
    def _version_header(cls, value: str) -> str:
        return _check_header_name(value)


def _check_header_name(name: str) -> str:
    if not re.fullmatch(r"[a-z0-9-]+", name) or name.startswith(INTERNAL_HEADER_PREFIX):
        raise ValueError(
            f"header name {name!r}: expected lower-case letters, digits and '-', not {INTERNAL_HEADER_PREFIX}*"
        )
    return name


def _default_priorities() -> list[PriorityClassSpec]:
    return [
        PriorityClassSpec(name="critical", preferred_tiers=["low-latency"]),
        PriorityClassSpec(name="standard"),
        PriorityClassSpec(name="batch", preferred_tiers=["cost-effective"], shed_threshold=1.0),
        PriorityClassSpec(name="sheddable", preferred_tiers=["cost-effective"], shed_threshold=0.5),
    ]


class MeshSpec(_Strict):
    """The whole desired state of a mesh. Priorities are listed most important first."""

    api_version: Literal["imesh/v1"] = Field(default="imesh/v1", alias="apiVersion")
    kind: Literal["Mesh"] = "Mesh"
    defaults: Defaults = Defaults()
    scoring: ScoringSpec = ScoringSpec()
    scheduling: SchedulingSpec | None = Field(default=None, description="every model's profile; none: the default")
    resilience: ResilienceSpec = ResilienceSpec()
    priorities: list[PriorityClassSpec] = Field(default_factory=_default_priorities, min_length=1)
    pools: list[Pool] = Field(default_factory=list)
    models: list[ModelSpec] = Field(default_factory=list)

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @model_validator(mode="after")
    def _references_resolve(self) -> MeshSpec:
        problems: list[str] = []
        _require_unique("pools", [p.name for p in self.pools], problems)
        _require_unique("models", [m.name for m in self.models], problems)
        _require_unique("priorities", [p.name for p in self.priorities], problems)
        pools = {p.name for p in self.pools}
        seen: dict[str, str] = {}
        for mi, model in enumerate(self.models):
            for vi, version in enumerate(model.versions):
                for ei, endpoint in enumerate(version.endpoints):
                    where = f"models[{mi}].versions[{vi}].endpoints[{ei}]"
                    if endpoint.pool not in pools:
                        problems.append(f"{where}.pool: unknown pool {endpoint.pool!r}; defined: {sorted(pools)}")
                    owner = f"{model.name}/{version.name}"
                    if seen.setdefault(endpoint.address, owner) != owner:
                        problems.append(f"{where}.address: {endpoint.address} already serves {seen[endpoint.address]}")
        _check_adapters(self.models, problems)
        if self.defaults.priority not in {p.name for p in self.priorities}:
            problems.append(f"defaults.priority: {self.defaults.priority!r} is not a priority class")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def model(self, name: str) -> ModelSpec | None:
        return next((m for m in self.models if m.name == name), None)

    def pool(self, name: str) -> Pool | None:
        return next((p for p in self.pools if p.name == name), None)


def _check_adapters(models: list[ModelSpec], problems: list[str]) -> None:
    """An adapter's name is a name clients send as the model: it must name no model, nor adapters
    of two models (the mesh could not tell which base model serves it)."""
    model_names = {m.name for m in models}
    owner: dict[str, str] = {}
    for mi, model in enumerate(models):
        for vi, version in enumerate(model.versions):
            for ai, adapter in enumerate(version.adapters):
                where = f"models[{mi}].versions[{vi}].adapters[{ai}]"
                if adapter in model_names:
                    problems.append(f"{where}: adapter {adapter!r} is also the name of a model")
                elif owner.setdefault(adapter, model.name) != model.name:
                    problems.append(f"{where}: adapter {adapter!r} is already an adapter of model {owner[adapter]!r}")


def _require_unique(field: str, names: list[str], problems: list[str]) -> None:
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        problems.append(f"{field}: names must be unique, repeated: {duplicates}")


def parse_spec(text: str, source: str = "<spec>") -> MeshSpec:
    """Parse YAML text into a validated spec, or raise SpecError naming ``source`` and each field."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "?"
        raise SpecError([f"{source}: {where}: not valid YAML: {getattr(exc, 'problem', exc)}"]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SpecError([f"{source}: expected a mapping at the top level, got {type(data).__name__}"])
    try:
        return MeshSpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError([_describe(source, err) for err in exc.errors()]) from None


def load_spec(path: str | Path) -> MeshSpec:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise SpecError([f"{path}: cannot read: {exc.strerror}"]) from None
    return parse_spec(text, str(path))


def dump_spec(spec: MeshSpec) -> str:
    """Canonical YAML for a spec: what is persisted and what `GetSpec` returns."""
    data = spec.model_dump(mode="json", by_alias=True)
    return yaml.safe_dump(data, sort_keys=False)


def _describe(source: str, err: ErrorDetails) -> str:
    path = ""
    for part in err["loc"]:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    message = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        message = "unknown field (check the spelling)"
    got = err.get("input")
    if err["type"] not in ("extra_forbidden", "missing", "value_error") and not isinstance(got, (dict, list)):
        message += f" (got {got!r})"
    return f"{source}: {path or '<top>'}: {message}"
