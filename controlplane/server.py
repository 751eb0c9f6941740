"""The control plane process: state store -> mesh model -> (Envoy snapshot, routing table), plus load.

Changes are debounced (~100 ms) into one rebuild, so a burst of CLI calls yields one config
version and one xDS push. Each rebuild produces both outputs from the same mesh model, so Envoy
and the ext_procs never disagree about which version of the config is current.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import grpc

from controlplane.api import mesh_api
from controlplane.broadcast import Latest
from controlplane.canary.controller import CanaryController, reconcile_overrides
from controlplane.errors import ConfigRejected
from controlplane.load.ejection import Ejections
from controlplane.load.fast_path import LoadWeights
from controlplane.load.monitor import LoadMonitor, targets_from_table
from controlplane.model.mesh_model import MeshModel, MeshModelMemo, build_mesh_model
from controlplane.spec.diff import diff_specs
from controlplane.spec.schema import MeshSpec, dump_spec
from controlplane.state.overrides import Overrides
from controlplane.state.store import MeshState, StateStore
from controlplane.traffic.observability import Observability
from controlplane.translate.envoy import EnvoyOptions, translate
from controlplane.translate.memo import TranslationMemo
from controlplane.translate.table import translate_routing_table
from controlplane.xds import server as ads_server
from controlplane.xds.cache import SnapshotCache
from controlplane.xds.snapshot import Snapshot, resources_by_type
from protos import mesh_pb2

log = logging.getLogger("imesh.controlplane")


@dataclass(frozen=True)
class ControlPlaneConfig:
    spec: MeshSpec
    state_dir: Path | None
    host: str = "127.0.0.1"
    grpc_port: int = 18000
    envoy: EnvoyOptions = EnvoyOptions()
    scrape_interval_s: float = 0.1
    debounce_s: float = 0.1
    ack_timeout_s: float = 5.0
    stats_window_s: float = 30.0  # the traffic window `imesh status` reports


class ControlPlane:
    def __init__(self, config: ControlPlaneConfig):
        self.config = config
        self.store = StateStore(config.state_dir, config.spec)
        self.cache = SnapshotCache()  # references to the bootstrap's static clusters are valid
        # Both memos keep what one rebuild hands to the next (docs/xds.md, "Build performance").
        self._model_memo = MeshModelMemo()
        self._translation_memo = TranslationMemo()
        self.tables: Latest[mesh_pb2.RoutingTable] = Latest()
        self.load_monitor = LoadMonitor(interval_s=config.scrape_interval_s)
        # Access-log records, /metrics and status traffic (docs/observability.md).
        self.observability = Observability(
            self.cache,
            self.load_monitor,
            lambda: self.config_version,
            stats_window_s=config.stats_window_s,
            log_sample=config.envoy.fast_path_log_sample,
        )
        self.request_records = self.observability.records  # add_sink(fn) to receive every RequestRecord
        self._rebuild_requested = asyncio.Event()
        self._rebuilt = asyncio.Condition()
        self._built_version = 0
        self._rejected: dict[int, str] = {}
        self._unconfirmed: dict[int, str] = {}  # config version -> the Envoys that had not ACKed it in time
        self._held_table: asyncio.Task | None = None  # publishes a late-ACKed version's routing table
        self._builds = 0  # rebuilds started: a held table is published only if no newer build exists
        self._tasks: list[asyncio.Task] = []
        self._server: grpc.aio.Server | None = None
        self.canary = CanaryController(self)
        # Replicas that keep failing the picker's requests (override_host ignores Envoy's ejections).
        self.ejections = Ejections(self.load_monitor.eject, registry=self.observability.registry)
        self.request_records.add_sink(self.ejections)
        self.load_weights = LoadWeights()  # EDS weights of the fast path's replicas (controlplane/load/fast_path.py)

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        await self._rebuild()  # the first snapshot is published before anyone can connect
        await self.load_monitor.start()
        self._server = grpc.aio.server()
        ads_server.add_to_server(self._server, self.cache)
        mesh_api.add_to_server(self._server, self)
        self.observability.add_to_server(self._server)  # Envoy's access log stream (ALS)
        self._server.add_insecure_port(f"{self.config.host}:{self.config.grpc_port}")
        await self._server.start()
        self._tasks.append(asyncio.create_task(self._debounced_rebuilds()))
        self._tasks.append(asyncio.create_task(self._follow_load()))
        self.request_records.add_sink(self.canary.windows)  # canary gates judge the access-log records
        self.canary.start()  # resumes a progressive canary where the persisted state left it
        log.info(
            "control plane serving on %s:%d, config version %d",
            self.config.host,
            self.config.grpc_port,
            self.config_version,
        )

    async def stop(self) -> None:
        await self.canary.stop()
        for task in self._tasks:
            task.cancel()
        if self._held_table is not None:
            self._held_table.cancel()
            self._tasks.append(self._held_table)
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.stop(grace=0.5)
        await self.load_monitor.stop()
        self.store.close()  # frees the state directory for the next control plane

    @property
    def ready(self) -> bool:
        return self._built_version > 0

    # ------------------------------------------------------------ changes

    @property
    def state(self) -> MeshState:
        """The desired state now: spec, overrides and config version (canary, drain and the API read it)."""
        return self.store.state

    @property
    def config_version(self) -> int:
        return self.store.state.version

    def spec_yaml(self) -> str:
        return dump_spec(self.store.state.spec)

    def diff(self, spec: MeshSpec) -> list[str]:
        return diff_specs(self.store.state.spec, spec)

    async def apply_spec(self, spec: MeshSpec) -> int:
        """Persist a new spec and return once Envoy applied it; raise ConfigRejected if Envoy refused it."""
        # Overrides for versions the new spec no longer has would be meaningless: drop them. Weights
        # the spec changes win over overrides; a canary in progress forbids that (Conflict).
        overrides = reconcile_overrides(self.store.state.spec, spec, self.store.state.overrides)
        return await self._commit_or_revert(spec=spec, overrides=_prune_overrides(overrides, spec))

    async def set_overrides(self, overrides: Overrides) -> int:
        return await self._commit_or_revert(overrides=overrides)

    async def _commit_or_revert(self, **change) -> int:
        previous = self.store.state
        version = await self._commit(**change)
        rejection = self._rejected.pop(version, None)
        if rejection is not None:
            # Envoy is already back on its last good config (the xDS cache rolled it back); make the
            # desired state say so too, as a new version, so nothing stays half-applied.
            await self._commit(spec=previous.spec, overrides=previous.overrides)
            raise ConfigRejected(f"Envoy rejected config version {version}: {rejection}")
        return version

    async def _commit(self, **change) -> int:
        state = self.store.commit(**change)
        self._rebuild_requested.set()
        async with self._rebuilt:
            await self._rebuilt.wait_for(lambda: self._built_version >= state.version)
        return state.version

    async def _debounced_rebuilds(self) -> None:
        # Leading edge: a change after a quiet spell is built at once, and what arrives within
        # debounce_s of a build's start waits for the next one. At most one config version per
        # window, so a burst still coalesces, and a lone `imesh canary set` does not sit out the
        # window first (docs/xds.md, "Convergence").
        last_build = -math.inf
        while True:
            await self._rebuild_requested.wait()
            wait = last_build + self.config.debounce_s - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)  # coalesce the rest of a burst into one version
            self._rebuild_requested.clear()
            last_build = time.monotonic()
            try:
                await self._rebuild()
            except Exception:  # a bad rebuild must not kill the loop; the last good config stays
                log.exception("rebuild failed; keeping the last published config")

    async def _follow_load(self) -> None:
        """Fast path: turn load reports into EDS weights; a rebuild only when they moved enough."""
        async for report in self.load_monitor.reports():
            try:
                if self.load_weights.update(self.store.state.spec, report, time.monotonic()) is not None:
                    self._rebuild_requested.set()
            except Exception:  # weights are an optimisation: never let them stop the loop
                log.exception("fast-path weights not updated")

    async def _rebuild(self) -> None:
        state = self.store.state
        started = time.perf_counter()
        self._builds += 1
        build = self._builds
        if self._held_table is not None:
            self._held_table.cancel()  # this build supersedes the version it held back
            self._held_table = None
        model = build_mesh_model(
            state.spec, state.overrides, state.version, lb_weights=self.load_weights.current, memo=self._model_memo
        )
        # Incremental: unchanged versions and models come back from the memo as the same messages,
        # and the snapshot reuses their serialized bytes (docs/xds.md, "Build performance").
        resources = translate(model, self.config.envoy, self._translation_memo)
        snapshot = Snapshot(str(state.version), resources_by_type(resources), reuse=self.cache.snapshot)
        log.debug("config version %d built in %.1f ms", state.version, (time.perf_counter() - started) * 1e3)
        published = await self.cache.publish(snapshot)
        self.store.bump_version(int(published.version))  # xDS and config versions stay one sequence
        outcome = await self._envoy_outcome(published.version, self.config.ack_timeout_s)
        if outcome.acked:
            await self._publish_table(model)  # only after Envoy has the routes may the pickers steer to them
        elif outcome.rejection is not None:
            self._rejected[state.version] = outcome.rejection
        else:
            # Not ACKed in time (a hung or slow Envoy): the change is saved and Envoy will get it,
            # but the pickers stay on the table Envoy is known to have until it confirms.
            self._unconfirmed[state.version] = outcome.pending
            while len(self._unconfirmed) > _UNCONFIRMED_KEPT:
                del self._unconfirmed[min(self._unconfirmed)]
            self._held_table = asyncio.create_task(self._publish_when_acked(published.version, model, build))
        async with self._rebuilt:
            self._built_version = state.version
            self._rebuilt.notify_all()
        log.info("config version %d published in %.1f ms", state.version, (time.perf_counter() - started) * 1e3)

    async def _publish_table(self, model: MeshModel) -> None:
        table = translate_routing_table(model)
        await self.tables.publish(table)
        self.load_monitor.set_targets(targets_from_table(table, health=model.resilience.health_checks))
        members = {v.cluster: [e.address for e in v.endpoints] for m in model.models for v in m.versions}
        self.ejections.configure(model.resilience.outlier_detection, members)
        self.observability.set_model(model)

    async def _publish_when_acked(self, version: str, model: MeshModel, build: int) -> None:
        # Not latency-critical any more (the caller was told): a slower poll for however long it takes.
        outcome = await self._envoy_outcome(version, timeout_s=math.inf, poll_s=0.1)
        if outcome.acked and build == self._builds:  # a newer build would have cancelled this task anyway
            log.info("config version %s ACKed late; the pickers now steer by it", version)
            await self._publish_table(model)

    def confirmation(self, version: int) -> str | None:
        """Why config version `version` is not confirmed as applied; None once every Envoy ACKed it."""
        pending = self._unconfirmed.get(version)
        if pending is None:
            return None
        return (
            f"config version {version} is saved, but {pending} not acknowledged it within "
            f"{self.config.ack_timeout_s:g} s; it is applied when Envoy catches up (`imesh status` shows "
            "each Envoy's version), and until then requests are routed by the previous version"
        )

    async def _envoy_outcome(self, version: str, timeout_s: float, poll_s: float = 0.01) -> EnvoyOutcome:
        """Wait (bounded) until every connected Envoy ACKed `version`, or one NACKed it."""
        deadline = time.monotonic() + timeout_s
        while True:
            nodes = [n for n in self.cache.node_statuses() if n.connected]
            for node in nodes:
                if node.nack is not None and node.nack.version == version:
                    kind = node.nack.type_url.rsplit(".", 1)[-1]
                    return EnvoyOutcome(rejection=f"{node.node_id} rejected {kind}: {node.nack.message}")
            behind = [n.node_id for n in nodes if not (n.synced_version and int(n.synced_version) >= int(version))]
            if not behind:
                return EnvoyOutcome(acked=True)
            if time.monotonic() > deadline:
                log.warning("config version %s not yet ACKed by %s after %.0fs", version, ", ".join(behind), timeout_s)
                return EnvoyOutcome(pending=_nodes_phrase(behind))
            await asyncio.sleep(poll_s)

    # ------------------------------------------------------------ status

    def _node_status(self, node) -> mesh_pb2.EnvoyNodeStatus:
        return mesh_pb2.EnvoyNodeStatus(
            node_id=node.node_id,
            connected=node.connected,
            acked_version=node.acked_version or "",
            last_nack_type=node.last_nack_type or "",
            last_nack_version=node.last_nack_version or "",
            last_nack_message=node.last_nack_message or "",
        )

    def status(self) -> mesh_pb2.MeshStatus:
        status = mesh_pb2.MeshStatus(
            config_version=self.config_version,
            nodes=[self._node_status(node) for node in self.cache.node_statuses()],
            table=self.tables.value,
            load=self.load_monitor.latest(),
        )
        return self.observability.fill_status(status)


_UNCONFIRMED_KEPT = 64  # recent versions whose callers may still ask why they are unconfirmed


@dataclass(frozen=True)
class EnvoyOutcome:
    """What the connected Envoys made of a config version: ACKed by all, NACKed, or still pending."""

    acked: bool = False
    rejection: str | None = None  # Envoy's own words
    pending: str = ""  # the Envoys not yet synced, as a phrase


def _nodes_phrase(node_ids: list[str]) -> str:
    return f"Envoy {node_ids[0]} has" if len(node_ids) == 1 else f"Envoys {', '.join(node_ids)} have"


def _prune_overrides(overrides: Overrides, spec: MeshSpec) -> Overrides:
    weights = {}
    for model, versions in overrides.weights.items():
        model_spec = spec.model(model)
        if model_spec is None:
            continue
        known = {v.name for v in model_spec.versions}
        kept = {v: w for v, w in versions.items() if v in known}
        if kept:
            weights[model] = kept
    addresses = {e.address for m in spec.models for v in m.versions for e in v.endpoints}
    return replace(overrides, weights=weights, drained=overrides.drained & addresses)
