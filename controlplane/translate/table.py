"""Translate the mesh model into the routing table the ext_proc pickers consume (protos/mesh.proto)."""

from __future__ import annotations

from controlplane.model.mesh_model import MeshModel
from controlplane.spec.schema import SchedulingSpec
from protos import mesh_pb2


def translate_routing_table(model: MeshModel) -> mesh_pb2.RoutingTable:
    scoring = model.scoring
    return mesh_pb2.RoutingTable(
        version=model.version,
        models=[
            mesh_pb2.Model(
                name=m.name,
                versions=[
                    mesh_pb2.ModelVersion(
                        name=v.name,
                        weight=v.weight,
                        cluster=v.cluster,
                        context_window=v.context_window,
                        engine=v.engine,
                        endpoints=[
                            mesh_pb2.Endpoint(
                                address=e.address,
                                pool=e.pool,
                                tier=e.tier,
                                cost_per_hour=e.cost_per_hour,
                                region=e.region,
                                zone=e.zone,
                                drained=e.drained,
                                max_concurrency=e.max_concurrency,
                                kv_events=e.kv_events,
                            )
                            for e in v.endpoints
                        ],
                    )
                    for v in m.versions
                ],
                allow_version_override=m.allow_version_override,
                scheduling=_profile(model.model_scheduling.get(m.name)),
                adapters=[mesh_pb2.LoraAdapter(name=a.name, version=a.version) for a in m.adapters],
                tokenizer=m.tokenizer,
            )
            for m in model.models
        ],
        priorities=[
            mesh_pb2.PriorityClass(
                name=p.name,
                rank=p.rank,
                preferred_tiers=list(p.preferred_tiers),
                strict_tiers=p.strict_tiers,
                shed_threshold=p.shed_threshold,
            )
            for p in model.priorities
        ],
        default_priority=model.defaults.priority,
        scoring=mesh_pb2.Scoring(
            queue_weight=scoring.queue_weight,
            kv_cache_weight=scoring.kv_cache_weight,
            inflight_weight=scoring.inflight_weight,
            latency_weight=scoring.latency_weight,
            saturation_queue=scoring.saturation_queue,
            saturation_kv=scoring.saturation_kv,
            stale_after_s=scoring.stale_after_s,
        ),
        max_body_bytes=model.defaults.max_body_bytes,
        version_header=model.defaults.version_header,
        scheduling=_profile(model.scheduling),
    )


def _profile(spec: SchedulingSpec | None) -> mesh_pb2.SchedulingProfile | None:
    """None (the field unset) without a profile; scorers left out travel as an empty list."""
    if spec is None:
        return None
    return mesh_pb2.SchedulingProfile(
        filters=spec.filters,
        scorers=[mesh_pb2.PluginRef(type=s.type, weight=s.weight, params=s.params) for s in spec.scorers or ()],
    )
