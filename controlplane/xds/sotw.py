"""State-of-the-World ADS (`StreamAggregatedResources`): one stream per Envoy, converging it to the
cache's snapshot a whole type at a time. Its sibling `delta.py` applies the same rules per
resource; what both share is in `stream.py`; docs/xds.md.

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

import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field

from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2

from controlplane.xds.cache import SnapshotCache
from controlplane.xds.snapshot import CLUSTER, ENDPOINT, LISTENER, ROUTE, TYPE_ORDER, WILDCARD_TYPES, Snapshot
from controlplane.xds.stream import CONTROL_PLANE_ID, FINAL, UNION, StreamCore

log = logging.getLogger("imesh.xds")


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


class SotwStream:
    """One Envoy's State-of-the-World ADS stream. Created per RPC; `run()` yields the responses to send."""

    def __init__(self, cache: SnapshotCache, control_plane_id: str = CONTROL_PLANE_ID):
        self.cache = cache
        self._core: StreamCore[discovery_pb2.DiscoveryRequest] = StreamCore(cache, api="sotw", kind="ADS")
        self.types = {t: _TypeState() for t in TYPE_ORDER}
        self.stale_ignored = 0
        self.responses = 0
        self._control_plane_id = control_plane_id
        self._target: Snapshot | None = None
        self._stage = FINAL
        # Every cluster Envoy may hold (last ACKed CDS plus anything sent since): the "old" side of
        # make-before-break. SotW requests do not list them, so the stream has to remember.
        self._envoy_clusters: dict[str, any_pb2.Any] = {}

    @property
    def node_id(self) -> str | None:
        return self._core.node_id

    def run(
        self, requests: AsyncIterator[discovery_pb2.DiscoveryRequest]
    ) -> AsyncIterator[discovery_pb2.DiscoveryResponse]:
        """Yield responses until Envoy closes the stream; cancellation (disconnect) cleans up too."""
        return self._core.run(requests, self._on_request, self._pump)

    # ------------------------------------------------------------ requests

    def _on_request(self, request: discovery_pb2.DiscoveryRequest) -> bool:
        """Update state from one request; False when it is to be ignored (stale or unknown)."""
        core = self._core
        if core.node_id is None:
            core.register(request.node.id, request.version_info)
            log.info("ADS stream %d from %s (reports version %r)", core.id, core.node_id, request.version_info)
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
                self._envoy_clusters.update(self.cache.envoy_clusters(core.node, request.version_info))
                self._target = None  # re-plan: what Envoy holds may now include clusters to remove
        state.subscribed = True
        state.names = frozenset(request.resource_names)
        return True

    def _on_reply(self, type_url: str, state: _TypeState, request: discovery_pb2.DiscoveryRequest) -> None:
        version, node = state.sent_version or "", self._core.node
        if request.HasField("error_detail"):
            self.cache.record_nack(node, type_url, version, request.error_detail.message)
            return
        state.acked_version, state.acked_stage, state.acked = version, state.sent_stage, frozenset(state.sent)
        if type_url == CLUSTER:
            self._envoy_clusters = dict(state.sent)
            self.cache.record_envoy_clusters(node, version, state.sent)
        self.cache.record_ack(node, type_url, version, final=state.sent_stage == FINAL)

    # ------------------------------------------------------------ responses

    def _pump(self) -> list[discovery_pb2.DiscoveryResponse]:
        """Every response needed now to move Envoy towards the cache's snapshot, in CDS→EDS→LDS→RDS order."""
        node_id = self._core.node_id
        snapshot = self.cache.snapshot_for(node_id) if node_id else None
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
        state, node = self.types[type_url], self._core.node
        state.nonce = self._core.next_nonce()
        state.sent_version, state.sent_stage, state.sent_names, state.sent = (
            version,
            stage,
            state.names,
            dict(resources),
        )
        self.responses += 1
        self.cache.record_sent(node, type_url, version)
        response = discovery_pb2.DiscoveryResponse(version_info=version, type_url=type_url, nonce=state.nonce)
        response.resources.extend(resources.values())
        response.control_plane.identifier = self._control_plane_id
        short = type_url.rsplit(".", 1)[-1]
        log.debug("-> %s %s v%s (%s) %d resources", node, short, version, stage, len(resources))
        return response
