"""ADS over grpc.aio, State-of-the-World and incremental (delta): one stream per Envoy, converging it
to the cache's snapshot. `DeltaAdsStream` (below) applies the same rules per resource; docs/xds.md.

The rules, each from a known failure of other control planes:
- Types go out in the order CDS → EDS → LDS → RDS, all under the snapshot's one version, so a
  route never lands before the cluster it names.
- EDS is re-sent after every CDS response: a cluster added or changed by CDS warms until it gets its
  endpoints, and Envoy does not always re-request an EDS name it already asked for.
- Make-before-break: while a new snapshot removes clusters, CDS is first sent as old ∪ new; the
  pruned CDS follows only once EDS/LDS/RDS of the new version are ACKed, so no live route points
  at a deleted cluster in between.
- Nonces: a request whose response_nonce is not the last one sent for its type is stale and ignored.
  With the last nonce, no error_detail is an ACK and error_detail is a NACK; a NACKed version is
  never re-sent (the cache rolls the node back instead), so there is no resend loop.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import deque
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field

import grpc
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import any_pb2

from controlplane.xds.cache import SnapshotCache, Watch
from controlplane.xds.snapshot import CLUSTER, ENDPOINT, LISTENER, ROUTE, TYPE_ORDER, WILDCARD_TYPES, Snapshot

log = logging.getLogger("imesh.xds")

UNION, FINAL = "union", "final"  # the two CDS stages of make-before-break
_CHANGED = object()  # queue marker: the cache's target for this node moved
_END = object()  # queue marker: Envoy closed its side of the stream
_stream_ids = itertools.count(1)


class ProtocolError(ValueError):
    """Envoy broke the protocol (e.g. no node id on the first request): the stream is aborted."""


@dataclass
class _TypeState:
    """One type URL on one stream: what Envoy asked for, what was sent, what Envoy confirmed."""

    subscribed: bool = False
    names: frozenset[str] = frozenset()  # requested names (ignored for wildcard types)
    nonce: str = ""  # of the last response sent
    sent_version: str | None = None
    sent_stage: str = FINAL
    sent_names: frozenset[str] = frozenset()  # `names` when the last response was built
    sent: dict[str, any_pb2.Any] = field(default_factory=dict)  # resources in the last response
    acked_version: str | None = None
    acked_stage: str = FINAL
    acked: frozenset[str] = frozenset()  # resource names in the last ACKed response


class AdsStream:
    """One Envoy's ADS stream. Created per RPC; `run()` yields the responses to send."""

    def __init__(self, cache: SnapshotCache, control_plane_id: str = "imesh-controlplane"):
        self.cache = cache
        self.id = next(_stream_ids)
        self.node_id: str | None = None
        self.types = {t: _TypeState() for t in TYPE_ORDER}
        self.stale_ignored = 0
        self.responses = 0
        self._control_plane_id = control_plane_id
        self._nonces = itertools.count(1)
        self._queue: asyncio.Queue = asyncio.Queue()
        self._change_queued = False
        self._watch: Watch | None = None
        self._target: Snapshot | None = None
        self._stage = FINAL
        # Every cluster Envoy may hold (last ACKed CDS plus anything sent since): the "old" side of
        # make-before-break. SotW requests do not list them, so the stream has to remember.
        self._envoy_clusters: dict[str, any_pb2.Any] = {}

    async def run(
        self, requests: AsyncIterator[discovery_pb2.DiscoveryRequest]
    ) -> AsyncIterator[discovery_pb2.DiscoveryResponse]:
        """Yield responses until Envoy closes the stream; cancellation (disconnect) cleans up too."""
        reader = asyncio.create_task(self._read(requests), name=f"ads-read-{self.id}")
        try:
            while True:
                item = await self._queue.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                if item is _CHANGED:
                    self._change_queued = False
                elif not self._on_request(item):
                    continue
                for response in self._pump():
                    yield response
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
            if self._watch is not None:
                self._watch.close()
            log.info("ADS stream %d of %s closed", self.id, self.node_id)

    async def _read(self, requests: AsyncIterator[discovery_pb2.DiscoveryRequest]) -> None:
        try:
            async for request in requests:
                self._queue.put_nowait(request)
            self._queue.put_nowait(_END)
        except asyncio.CancelledError:
            raise
        except Exception as error:  # the stream broke: surface it in run()
            self._queue.put_nowait(error)

    def _wake(self) -> None:
        if not self._change_queued:
            self._change_queued = True
            self._queue.put_nowait(_CHANGED)

    # ------------------------------------------------------------ requests

    def _on_request(self, request: discovery_pb2.DiscoveryRequest) -> bool:
        """Update state from one request; False when it is to be ignored (stale or unknown)."""
        if self.node_id is None:
            if not request.node.id:
                raise ProtocolError("the first ADS request carries no node id")
            self.node_id = request.node.id
            log.info("ADS stream %d from %s (reports version %r)", self.id, self.node_id, request.version_info)
            self._watch = self.cache.connect(self.node_id, self._wake, request.version_info)
        type_url = request.type_url
        state = self.types.get(type_url)
        if state is None:
            log.debug("ignoring request for unsupported type %s", type_url)
            return False
        if request.response_nonce and state.nonce:
            if request.response_nonce != state.nonce:
                self.stale_ignored += 1  # a reply to a superseded response: the newer one will be answered
                return False
            self._on_reply(type_url, state, request)
        else:
            # A (re)subscription, or a nonce from an earlier stream: it needs an answer even if this
            # version went out before.
            state.sent_version = None
            if type_url == CLUSTER:
                self._envoy_clusters.update(self.cache.envoy_clusters(self.node_id, request.version_info))
                self._target = None  # re-plan: what Envoy holds may now include clusters to remove
        state.subscribed = True
        state.names = frozenset(request.resource_names)
        return True

    def _on_reply(self, type_url: str, state: _TypeState, request: discovery_pb2.DiscoveryRequest) -> None:
        version = state.sent_version or ""
        if request.HasField("error_detail"):
            self.cache.record_nack(self.node_id, type_url, version, request.error_detail.message)
            return
        state.acked_version, state.acked_stage, state.acked = version, state.sent_stage, frozenset(state.sent)
        if type_url == CLUSTER:
            self._envoy_clusters = dict(state.sent)
            self.cache.record_envoy_clusters(self.node_id, version, state.sent)
        self.cache.record_ack(self.node_id, type_url, version, final=state.sent_stage == FINAL)

    # ------------------------------------------------------------ responses

    def _pump(self) -> list[discovery_pb2.DiscoveryResponse]:
        """Every response needed now to move Envoy towards the cache's snapshot, in CDS→EDS→LDS→RDS order."""
        snapshot = self.cache.snapshot_for(self.node_id) if self.node_id else None
        if snapshot is None:
            return []
        version = snapshot.version
        if self._target is None or self._target.version != version:
            self._target = snapshot
            removed = self._envoy_clusters.keys() - snapshot.resources[CLUSTER].keys()
            self._stage = UNION if removed else FINAL
        cds = self.types[CLUSTER]
        union_acked = (cds.acked_version, cds.acked_stage) == (version, UNION)
        if self._stage == UNION and union_acked and self._rest_acked(snapshot):
            self._stage = FINAL  # the new config is live everywhere: now drop the old clusters

        out: list[discovery_pb2.DiscoveryResponse] = []
        cds_sent = False
        if cds.subscribed and (cds.sent_version, cds.sent_stage) != (version, self._stage):
            clusters = dict(snapshot.anys(CLUSTER))
            if self._stage == UNION:
                clusters = {**{n: a for n, a in self._envoy_clusters.items() if n not in clusters}, **clusters}
            out.append(self._respond(CLUSTER, version, clusters, self._stage))
            self._envoy_clusters.update(clusters)  # Envoy may apply it before we see the ACK
            cds_sent = True
        for type_url in (ENDPOINT, LISTENER, ROUTE):
            state = self.types[type_url]
            if not state.subscribed:
                continue
            anys = snapshot.anys(type_url)
            if type_url in WILDCARD_TYPES:
                if state.sent_version != version:
                    out.append(self._respond(type_url, version, dict(anys)))
            elif state.names and (
                state.sent_version != version or state.names != state.sent_names or (type_url == ENDPOINT and cds_sent)
            ):
                out.append(self._respond(type_url, version, {n: anys[n] for n in sorted(state.names) if n in anys}))
        return out

    def _rest_acked(self, snapshot: Snapshot) -> bool:
        """Whether EDS/LDS/RDS of `snapshot` are ACKed, so the clusters it drops can go."""
        for type_url in snapshot.expected_types() - {CLUSTER}:
            if self.types[type_url].acked_version != snapshot.version:
                return False
        return ROUTE not in snapshot.expected_types() or snapshot.rds_names() <= self.types[ROUTE].acked

    def _respond(
        self, type_url: str, version: str, resources: Mapping[str, any_pb2.Any], stage: str = FINAL
    ) -> discovery_pb2.DiscoveryResponse:
        state = self.types[type_url]
        state.nonce = f"{self.id}-{next(self._nonces)}"
        state.sent_version, state.sent_stage, state.sent_names, state.sent = (
            version,
            stage,
            state.names,
            dict(resources),
        )
        self.responses += 1
        self.cache.record_sent(self.node_id, type_url, version)
        response = discovery_pb2.DiscoveryResponse(version_info=version, type_url=type_url, nonce=state.nonce)
        response.resources.extend(resources.values())
        response.control_plane.identifier = self._control_plane_id
        short = type_url.rsplit(".", 1)[-1]
        log.debug("-> %s %s v%s (%s) %d resources", self.node_id, short, version, stage, len(resources))
        return response


# ---------------------------------------------------------------- incremental (delta) ADS

_UNKNOWN = ""  # the version of a resource whose content Envoy holds is unknown (after a NACK)


def _digest_of(resource_version: str) -> str:
    """The content digest in a resource version this control plane sent ("<config version>-<digest>")."""
    return resource_version.rpartition("-")[2]


@dataclass(frozen=True)
class _DeltaSent:
    """One delta response awaiting its ACK/NACK."""

    seq: int
    version: str  # the snapshot version it moved Envoy towards
    stage: str
    resources: dict[str, str]  # name → resource version sent
    removed: tuple[str, ...]


@dataclass
class _DeltaTypeState:
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
    pending: dict[str, _DeltaSent] = field(default_factory=dict)  # nonce → response not yet ACKed/NACKed
    synced: tuple[str, str] | None = None  # (snapshot version, stage) whose diff was sent in full
    reported: tuple[str, str] | None = None  # the last (version, stage) recorded as ACKed in the cache


class DeltaAdsStream(AdsStream):
    """One Envoy's incremental ADS stream (`DeltaAggregatedResources`).

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

    def __init__(self, cache: SnapshotCache, control_plane_id: str = "imesh-controlplane"):
        super().__init__(cache, control_plane_id)
        self.types = {t: _DeltaTypeState() for t in TYPE_ORDER}  # type: ignore[assignment]
        self._seq = itertools.count(1)
        # (type URL, snapshot version, names sent, names removed) of the latest responses: for tests,
        # benchmarks and debugging ("which resources did that change send?").
        self.sent_log: deque[tuple[str, str, tuple[str, ...], tuple[str, ...]]] = deque(maxlen=1024)
        self.resources_sent = 0

    # ------------------------------------------------------------ requests

    def _on_request(self, request: discovery_pb2.DeltaDiscoveryRequest) -> bool:  # type: ignore[override]
        if self.node_id is None:
            if not request.node.id:
                raise ProtocolError("the first delta ADS request carries no node id")
            self.node_id = request.node.id
            log.info("delta ADS stream %d from %s", self.id, self.node_id)
            self._watch = self.cache.connect(self.node_id, self._wake, "", api="delta")
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
            self._on_delta_reply(type_url, state, request)
        return True

    def _on_delta_reply(
        self, type_url: str, state: _DeltaTypeState, request: discovery_pb2.DeltaDiscoveryRequest
    ) -> None:
        sent = state.pending.pop(request.response_nonce, None)
        if sent is None:
            self.stale_ignored += 1  # an earlier stream's nonce, or answered already
            return
        # Envoy answers responses in order: any older one still pending was accepted on the way.
        for nonce in [n for n, s in state.pending.items() if s.seq < sent.seq]:
            del state.pending[nonce]
        if request.HasField("error_detail"):
            self._on_delta_nack(type_url, state, sent, request.error_detail.message)
        else:
            self._settle(type_url)

    def _on_delta_nack(self, type_url: str, state: _DeltaTypeState, sent: _DeltaSent, message: str) -> None:
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
        self.cache.record_nack(self.node_id, type_url, version, message)
        self._wake()  # re-plan against whatever the cache now serves (the rollback, or nothing)

    # ------------------------------------------------------------ responses

    def _pump(self) -> list[discovery_pb2.DeltaDiscoveryResponse]:  # type: ignore[override]
        snapshot = self.cache.snapshot_for(self.node_id) if self.node_id else None
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
        self, type_url: str, state: _DeltaTypeState, snapshot: Snapshot, stage: str
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
        return self._delta_respond(type_url, snapshot, stage, changed, removed)

    def _delta_respond(
        self, type_url: str, snapshot: Snapshot, stage: str, changed: list[str], removed: list[str]
    ) -> discovery_pb2.DeltaDiscoveryResponse:
        state = self.types[type_url]
        nonce = f"{self.id}-{next(self._nonces)}"
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
        state.pending[nonce] = _DeltaSent(
            next(self._seq), snapshot.version, stage, {n: versions[n] for n in changed}, tuple(removed)
        )
        self.responses += 1
        self.resources_sent += len(changed)
        self.sent_log.append((type_url, snapshot.version, tuple(changed), tuple(removed)))
        self.cache.record_sent(self.node_id, type_url, snapshot.version)
        log.debug(
            "-> %s delta %s v%s (%s) %d resources, %d removed",
            self.node_id,
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
        self.cache.record_ack(self.node_id, type_url, version, final=stage == FINAL)


class AggregatedDiscoveryServicer(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):
    """`envoy.service.discovery.v3.AggregatedDiscoveryService`: State-of-the-World and incremental."""

    def __init__(self, cache: SnapshotCache, control_plane_id: str = "imesh-controlplane"):
        self.cache = cache
        self.control_plane_id = control_plane_id
        self.streams: set[AdsStream] = set()  # live ones, for introspection and tests

    async def StreamAggregatedResources(self, request_iterator, context):  # noqa: N802 (gRPC name)
        async for response in self._serve(AdsStream(self.cache, self.control_plane_id), request_iterator, context):
            yield response

    async def DeltaAggregatedResources(self, request_iterator, context):  # noqa: N802 (gRPC name)
        stream = DeltaAdsStream(self.cache, self.control_plane_id)
        async for response in self._serve(stream, request_iterator, context):
            yield response

    async def _serve(self, stream, request_iterator, context):
        """Run one Envoy stream (either variant), registered while it lives."""
        self.streams.add(stream)
        try:
            async for response in stream.run(request_iterator):
                yield response
        except ProtocolError as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        finally:
            self.streams.discard(stream)


def add_to_server(server: grpc.aio.Server, cache: SnapshotCache, **options) -> AggregatedDiscoveryServicer:
    """Serve ADS from `cache` on `server` (before `server.start()`); returns the servicer."""
    servicer = AggregatedDiscoveryServicer(cache, **options)
    ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(servicer, server)
    return servicer
