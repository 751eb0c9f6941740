"""The mesh model: the spec resolved into the flat, immutable facts the translators need.

The spec is what an operator wrote; the model is what is true now. It adds live overrides
(canary weights set from the CLI, drained endpoints) on top of the spec, resolves each
endpoint's pool into tier, cost and locality, and names each version's Envoy cluster.
Translators read only this, never the spec, so the data flows one way:
spec -> mesh model -> Envoy resources / routing table.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from controlplane.spec import Defaults, MeshSpec, ScoringSpec


@dataclass(frozen=True)
class EndpointModel:
    address: str
    pool: str
    tier: str
    cost_per_hour: float
    region: str
    zone: str
    drained: bool
    max_concurrency: int

    @property
    def ip(self) -> str:
        return self.address.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.address.rpartition(":")[2])


@dataclass(frozen=True)
class VersionModel:
    model: str
    name: str
    weight: int
    engine: str
    context_window: int
    upstream_protocol: str
    endpoints: tuple[EndpointModel, ...]

    @property
    def cluster(self) -> str:
        """One Envoy EDS cluster per model version: the unit canary weights split across."""
        return f"{self.model}/{self.name}"


@dataclass(frozen=True)
class ModelModel:
    name: str
    versions: tuple[VersionModel, ...]

    def version(self, name: str) -> VersionModel | None:
        return next((v for v in self.versions if v.name == name), None)


@dataclass(frozen=True)
class PriorityModel:
    name: str
    rank: int
    preferred_tiers: tuple[str, ...]
    strict_tiers: bool
    shed_threshold: float


@dataclass(frozen=True)
class Overrides:
    """Live changes made through the API on top of the spec; persisted with it."""

    weights: dict[str, dict[str, int]] = field(default_factory=dict)  # model -> version -> weight
    drained: frozenset[str] = frozenset()


@dataclass(frozen=True)
class MeshModel:
    version: int
    models: tuple[ModelModel, ...]
    priorities: tuple[PriorityModel, ...]
    defaults: Defaults
    scoring: ScoringSpec

    def model(self, name: str) -> ModelModel | None:
        return next((m for m in self.models if m.name == name), None)

    @property
    def endpoints(self) -> tuple[tuple[VersionModel, EndpointModel], ...]:
        return tuple((v, e) for m in self.models for v in m.versions for e in v.endpoints)


def build_mesh_model(spec: MeshSpec, overrides: Overrides = Overrides(), version: int = 0) -> MeshModel:
    pools = {p.name: p for p in spec.pools}

    def endpoint(e) -> EndpointModel:
        pool = pools[e.pool]
        return EndpointModel(
            address=e.address,
            pool=pool.name,
            tier=pool.tier,
            cost_per_hour=pool.cost_per_hour,
            region=pool.locality.region,
            zone=pool.locality.zone,
            drained=e.drained or e.address in overrides.drained,
            max_concurrency=e.max_concurrency,
        )

    models = tuple(
        ModelModel(
            name=m.name,
            versions=tuple(
                VersionModel(
                    model=m.name,
                    name=v.name,
                    weight=overrides.weights.get(m.name, {}).get(v.name, v.weight),
                    engine=v.engine,
                    context_window=v.context_window,
                    upstream_protocol=v.upstream_protocol,
                    endpoints=tuple(endpoint(e) for e in v.endpoints),
                )
                for v in m.versions
            ),
        )
        for m in spec.models
    )
    priorities = tuple(
        PriorityModel(p.name, rank, tuple(p.preferred_tiers), p.strict_tiers, p.shed_threshold)
        for rank, p in enumerate(spec.priorities)
    )
    return MeshModel(version, models, priorities, spec.defaults, spec.scoring)
