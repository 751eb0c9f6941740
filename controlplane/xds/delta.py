"""Incremental ("delta") ADS (`DeltaAggregatedResources`): one stream per Envoy, converging it to the
cache's snapshot resource by resource. Its sibling `sotw.py` is the State-of-the-World variant;
what both share is in `stream.py`; docs/xds.md.

Same rules as State-of-the-World, per resource instead of per type:
- Each resource's version is "<config version it was sent in>-<content digest>"
  (`Snapshot.resource_versions`) and only the digest is compared, so only new or changed
  resources are sent, removals go in `removed_resources`, and a reconnecting Envoy's
  `initial_resource_versions` spare it everything it already holds (even across a control-plane
  restart: equal content, equal digest).
- CDS → EDS → LDS → RDS; a cluster sent by CDS gets its ClusterLoadAssignment sent again right
  behind it, so an updated cluster finishes warming; LDS and RDS wait until Envoy has ACKed the
  snapshot's clusters and endpoints, so no route ever names a cluster that is still warming.
- Make-before-break: clusters Envoy holds that the snapshot drops are removed only once the
  snapshot's EDS/LDS/RDS are ACKed.
- Every response has its own nonce and gets its own ACK/NACK; an unknown nonce (an earlier
  stream's) is ignored, but the subscription changes in that request are honoured.
- A NACK goes to the cache (`record_nack`: the version is parked, the node rolled back to its
  last good snapshot, the message surfaced); the rejected resources' versions become unknown,
  so the rollback re-sends them, and nothing rejected is sent again (no resend loop).
- A type with nothing to send for a snapshot counts as ACKed once its earlier responses are,
  and once Envoy has subscribed to every EDS/RDS name the snapshot needs.
"""

from __future__ import annotations

import itertools
import logging
from collections import deque
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field

from envoy.service.discovery.v3 import discovery_pb2

from controlplane.xds.cache import SnapshotCache
from controlplane.xds.snapshot import CLUSTER, ENDPOINT, LISTENER, ROUTE, TYPE_ORDER, WILDCARD_TYPES, Snapshot
from controlplane.xds.stream import CONTROL_PLANE_ID, FINAL, UNION, StreamCore

log = logging.getLogger("imesh.xds")


_UNKNOWN = ""  # the version of a resource whose content Envoy holds is unknown (after a NACK)


def _digest_of(resource_version: str) -> str:
    """The content digest in a resource version this control plane sent ("<config version>-<digest>")."""
    return resource_version.rpartition("-")[2]


@dataclass(frozen=True)
class _SentResponse:
    """One delta response awaiting its ACK/NACK."""

    seq: int
    version: str  # the snapshot version it moved Envoy towards
    stage: str
    resources: dict[str, str]  # name → resource version sent
    removed: tuple[str, ...]


@dataclass
class _TypeState:
    """One type URL on one delta stream: Envoy's subscriptions, and what it holds, per resource."""

    subscribed: bool = False  # Envoy has sent a request for this type
    wildcard: bool = False  # subscribed to "*" (explicitly, or the legacy empty first request)
    names: set[str] = field(default_factory=set)  # explicitly subscribed names
    # name → version Envoy holds once it has processed everything sent (updated when sending, so
    # the next diff builds on it; a NACK turns the rejected names back into _UNKNOWN).
    envoy: dict[str, str] = field(default_factory=dict)
    force: set[str] = field(default_factory=set)  # to (re)send whatever Envoy's version: fresh subscriptions
    answer: bool = False  # a (wildcard) subscription awaits a response, even an empty one
    # The resource versions of the last diff, while nothing else changed since (`dirty` False): an
    # equal mapping next time means nothing to send, without comparing resource by resource.
    diffed: tuple[Mapping[str, str], str] | None = None  # (versions, stage)
    dirty: bool = True
    pending: dict[str, _SentResponse] = field(default_factory=dict)  # nonce → response not yet ACKed/NACKed
    synced: tuple[str, str] | None = None  # (snapshot version, stage) whose diff was sent in full
    reported: tuple[str, str] | None = None  # the last (version, stage) recorded as ACKed in the cache


class DeltaStream:
    """One Envoy's incremental ADS stream. Created per RPC; `run()` yields the responses to send."""

    def __init__(self, cache: SnapshotCache, control_plane_id: str = CONTROL_PLANE_ID):
        self.cache = cache
        self._core: StreamCore[discovery_pb2.DeltaDiscoveryRequest] = StreamCore(cache, api="delta", kind="delta ADS")
        self.types = {t: _TypeState() for t in TYPE_ORDER}
        self.stale_ignored = 0
        self.responses = 0
        self._control_plane_id = control_plane_id
        self._target: Snapshot | None = None
        self._stage = FINAL
        self._seq = itertools.count(1)
        # (type URL, snapshot version, names sent, names removed) of the latest responses: for tests,
        # benchmarks and debugging ("which resources did that change send?").
        self.sent_log: deque[tuple[str, str, tuple[str, ...], tuple[str, ...]]] = deque(maxlen=1024)
        self.resources_sent = 0

    @property
    def node_id(self) -> str | None:
        return self._core.node_id

    def run(
        self, requests: AsyncIterator[discovery_pb2.DeltaDiscoveryRequest]
    ) -> AsyncIterator[discovery_pb2.DeltaDiscoveryResponse]:
        """Yield responses until Envoy closes the stream; cancellation (disconnect) cleans up too."""
        return self._core.run(requests, self._on_request, self._pump)

    # ------------------------------------------------------------ requests

    def _on_request(self, request: discovery_pb2.DeltaDiscoveryRequest) -> bool:
        """Update state from one request; False when it is for a type this control plane does not serve."""
        core = self._core
        if core.node_id is None:
            core.register(request.node.id)
            log.info("delta ADS stream %d from %s", core.id, core.node_id)
        type_url = request.type_url
        state = self.types.get(type_url)
        if state is None:
            log.debug("ignoring delta request for unsupported type %s", type_url)
            return False
        first = not state.subscribed
        state.subscribed = True
        subscribe = set(request.resource_names_subscribe)
        unsubscribe = set(request.resource_names_unsubscribe)
        if first or subscribe or unsubscribe:
            state.dirty = True
        if first:
            # Envoy reconnecting says what it holds: those need not be sent again if unchanged.
            state.envoy = {n: _digest_of(v) for n, v in request.initial_resource_versions.items()}
            if type_url in WILDCARD_TYPES and not subscribe:
                state.wildcard = True  # the legacy wildcard: an empty first request means "*"
        if "*" in subscribe:
            state.wildcard = True
        if state.wildcard and (first or "*" in subscribe):
            state.answer = True  # Envoy waits for a first response, even when there is nothing to send
        if "*" in unsubscribe:
            state.wildcard = False
        for name in subscribe - {"*"}:
            state.names.add(name)
            if not (first and name in state.envoy):
                state.force.add(name)  # a (re)subscription must be answered, even if unchanged
        for name in unsubscribe - {"*"}:
            state.names.discard(name)
            state.force.discard(name)
            if type_url not in WILDCARD_TYPES or not state.wildcard:
                state.envoy.pop(name, None)  # Envoy drops it: a later subscription starts afresh
        if request.response_nonce:
            self._on_reply(type_url, state, request)
        return True

    def _on_reply(self, type_url: str, state: _TypeState, request: discovery_pb2.DeltaDiscoveryRequest) -> None:
        sent = state.pending.pop(request.response_nonce, None)
        if sent is None:
            self.stale_ignored += 1  # an earlier stream's nonce, or answered already
            return
        # Envoy answers responses in order: any older one still pending was accepted on the way.
        for nonce in [n for n, s in state.pending.items() if s.seq < sent.seq]:
            del state.pending[nonce]
        if request.HasField("error_detail"):
            self._on_nack(type_url, state, sent, request.error_detail.message)
        else:
            self._settle(type_url)

    def _on_nack(self, type_url: str, state: _TypeState, sent: _SentResponse, message: str) -> None:
        # Envoy keeps its previous copy of whatever that response carried: now of unknown content.
        for name in sent.resources:
            if name in state.envoy:
                state.envoy[name] = _UNKNOWN
        for name in sent.removed:
            state.envoy.setdefault(name, _UNKNOWN)
        state.dirty = True
        state.synced = None  # this type is not at any version until the next diff is sent and ACKed
        version = sent.version
        target = self._target
        if target is not None and target.version != version:
            current = target.resource_versions(type_url)
            if any(current.get(name) == v for name, v in sent.resources.items()):
                version = target.version  # what Envoy rejected is still in the current snapshot
        self.cache.record_nack(self._core.node, type_url, version, message)
        self._core.wake()  # re-plan against whatever the cache now serves (the rollback, or nothing)

    # ------------------------------------------------------------ responses

    def _pump(self) -> list[discovery_pb2.DeltaDiscoveryResponse]:
        """Every response needed now to move Envoy towards the cache's snapshot, in CDS→EDS→LDS→RDS order."""
        node_id = self._core.node_id
        snapshot = self.cache.snapshot_for(node_id) if node_id else None
        if snapshot is None:
            return []
        version = snapshot.version
        cds = self.types[CLUSTER]
        if self._target is None or self._target.version != version:
            self._target = snapshot
            self._stage = UNION if self._clusters_to_remove(snapshot) else FINAL
        if self._stage == UNION and cds.reported == (version, UNION) and self._rest_reported(snapshot):
            self._stage = FINAL  # the new config is live everywhere: now drop the old clusters

        out: list[discovery_pb2.DeltaDiscoveryResponse] = []
        updated_clusters: set[str] = set()
        for type_url in TYPE_ORDER:
            state = self.types[type_url]
            if not state.subscribed:
                continue
            if type_url in (LISTENER, ROUTE) and not self._clusters_ready(snapshot):
                continue  # make-before-break: nothing may route to a cluster Envoy is still warming
            stage = self._stage if type_url == CLUSTER else FINAL
            if type_url == ENDPOINT:
                # EDS right behind every cluster CDS (re)sent, so that updated clusters finish warming.
                state.force |= updated_clusters & state.names
            response = self._diff(type_url, state, snapshot, stage)
            if response is not None:
                out.append(response)
                if type_url == CLUSTER:
                    updated_clusters = {r.name for r in response.resources}
            state.synced = (version, stage)
            self._settle(type_url)  # a type with nothing to send is done now: it may open the LDS/RDS gate
        return out

    def _clusters_ready(self, snapshot: Snapshot) -> bool:
        """Whether Envoy ACKed the snapshot's clusters and their endpoints (so they are warm)."""
        cds, eds = self.types[CLUSTER], self.types[ENDPOINT]
        if cds.subscribed and (cds.reported is None or cds.reported[0] != snapshot.version):
            return False
        return ENDPOINT not in snapshot.expected_types() or eds.reported == (snapshot.version, FINAL)

    def _clusters_to_remove(self, snapshot: Snapshot) -> set[str]:
        cds = self.types[CLUSTER]
        return set(cds.envoy) - snapshot.resources[CLUSTER].keys() if cds.wildcard else set()

    def _rest_reported(self, snapshot: Snapshot) -> bool:
        """Whether EDS/LDS/RDS of `snapshot` are ACKed, so the clusters it drops can go."""
        return all(self.types[t].reported == (snapshot.version, FINAL) for t in snapshot.expected_types() - {CLUSTER})

    def _diff(
        self, type_url: str, state: _TypeState, snapshot: Snapshot, stage: str
    ) -> discovery_pb2.DeltaDiscoveryResponse | None:
        versions = snapshot.resource_versions(type_url)
        unchanged = not state.dirty and state.diffed is not None and state.diffed == (versions, stage)
        if unchanged and not state.force and not state.answer:
            return None
        if state.wildcard:
            wanted: Iterable[str] = versions
        else:
            wanted = (
                [n for n in versions if n in state.names]
                if len(state.names) > len(versions)
                else [n for n in state.names if n in versions]
            )
        envoy, force = state.envoy, state.force
        changed = [n for n in wanted if n in force or envoy.get(n) != versions[n]]
        removed: list[str] = []
        if type_url in WILDCARD_TYPES and not (type_url == CLUSTER and stage == UNION):
            removed = [n for n in envoy if n not in versions]
        # A subscription to a name that does not exist is answered too: "removed" says so at once.
        removed += [n for n in force if n not in versions and n not in removed]
        force.clear()
        state.diffed, state.dirty = (versions, stage), False
        if not changed and not removed and not state.answer:
            return None
        state.answer = False
        for name in changed:
            envoy[name] = versions[name]
        for name in removed:
            envoy.pop(name, None)
        return self._respond(type_url, snapshot, stage, changed, removed)

    def _respond(
        self, type_url: str, snapshot: Snapshot, stage: str, changed: list[str], removed: list[str]
    ) -> discovery_pb2.DeltaDiscoveryResponse:
        state, node = self.types[type_url], self._core.node
        nonce = self._core.next_nonce()
        versions, anys = snapshot.resource_versions(type_url), snapshot.anys(type_url)
        response = discovery_pb2.DeltaDiscoveryResponse(
            system_version_info=snapshot.version, type_url=type_url, nonce=nonce
        )
        for name in changed:
            resource = response.resources.add()
            resource.name = name
            # "<config version it was sent in>-<content digest>": config_dump then tells an operator
            # which config version each resource comes from; only the digest is ever compared.
            resource.version = f"{snapshot.version}-{versions[name]}"
            resource.resource.CopyFrom(anys[name])
        response.removed_resources.extend(removed)
        response.control_plane.identifier = self._control_plane_id
        state.pending[nonce] = _SentResponse(
            next(self._seq), snapshot.version, stage, {n: versions[n] for n in changed}, tuple(removed)
        )
        self.responses += 1
        self.resources_sent += len(changed)
        self.sent_log.append((type_url, snapshot.version, tuple(changed), tuple(removed)))
        self.cache.record_sent(node, type_url, snapshot.version)
        log.debug(
            "-> %s delta %s v%s (%s) %d resources, %d removed",
            node,
            type_url.rsplit(".", 1)[-1],
            snapshot.version,
            stage,
            len(changed),
            len(removed),
        )
        return response

    def _settle(self, type_url: str) -> None:
        """Record the type as ACKed at its snapshot version once nothing it needs is outstanding."""
        state = self.types[type_url]
        target = self._target
        if not state.subscribed or state.pending or state.synced is None or state.synced == state.reported:
            return
        version, stage = state.synced
        if target is None or target.version != version:
            return
        if type_url == ENDPOINT and not target.eds_names() <= state.names:
            return  # Envoy has not asked for the endpoints of every cluster yet
        if type_url == ROUTE and not target.rds_names() <= state.names:
            return
        state.reported = state.synced
        self.cache.record_ack(self._core.node, type_url, version, final=stage == FINAL)
