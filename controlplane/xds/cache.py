"""The snapshot cache between the model (what Envoy should run) and the ADS streams (what it runs).

Why a cache and not a direct push: Envoy NACKs, disconnects and reconnects on its own schedule, so
the cache keeps, per node, what was asked (the target), what was confirmed (ACKed versions, the last
snapshot fully applied) and what went wrong (the last NACK, with Envoy's message), and the streams
converge each Envoy towards the target from that state.

Versions are owned by the cache: decimal integers that only increase, even across a revert (the
last good config is re-sent under a new number) and across a control-plane restart (a reconnecting
Envoy's reported version bumps the counter), so "version N is newer" always holds for an operator.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace

from google.protobuf import any_pb2

from controlplane.xds.snapshot import InconsistentSnapshotError, Snapshot, check_consistency
from protos.wire import BOOTSTRAP_CLUSTERS  # defined statically by envoy/bootstrap.yaml: valid targets

log = logging.getLogger("imesh.xds")

AckHook = Callable[[str, str, float], None]  # (node_id, version, seconds from change to full ACK)
NackHook = Callable[[str, str, str, str], None]  # (node_id, type_url, rejected version, Envoy's message)


@dataclass(frozen=True)
class NackInfo:
    type_url: str
    version: str
    message: str
    at: float  # wall-clock time


@dataclass(frozen=True)
class Convergence:
    node_id: str
    version: str
    seconds: float
    revert: bool  # True when this was the rollback to the last good config after a NACK


@dataclass
class NodeStatus:
    """What an operator (`imesh status`) wants to know about one Envoy."""

    node_id: str
    streams: int = 0
    target_version: str | None = None  # what the cache is converging this node to
    synced_version: str | None = None  # last snapshot every type ACKed
    acked: dict[str, str] = field(default_factory=dict)  # type URL → last ACKed version
    last_ack_at: float | None = None  # wall-clock time
    nack: NackInfo | None = None  # kept until a newly published snapshot is fully ACKed
    last_nack: NackInfo | None = None  # the latest rejection ever, for the operator: never cleared
    parked_versions: tuple[str, ...] = ()  # rejected versions, never re-sent to this node
    sent: dict[str, int] = field(default_factory=dict)  # responses sent per type URL
    xds_api: str = ""  # "sotw" or "delta": the variant of the node's latest ADS stream

    @property
    def connected(self) -> bool:
        return self.streams > 0

    # Flat views for the mesh API's EnvoyNodeStatus. The last NACK outlives `nack`: once a
    # rollback is fully ACKed the node is healthy again, but the operator still needs Envoy's words.
    @property
    def acked_version(self) -> str | None:
        return self.synced_version

    @property
    def last_nack_type(self) -> str | None:
        return self.last_nack.type_url if self.last_nack else None

    @property
    def last_nack_version(self) -> str | None:
        return self.last_nack.version if self.last_nack else None

    @property
    def last_nack_message(self) -> str | None:
        return self.last_nack.message if self.last_nack else None

    @property
    def in_sync(self) -> bool:
        return self.target_version is not None and self.synced_version == self.target_version


@dataclass
class _Node:
    status: NodeStatus
    override: Snapshot | None = None
    good: Snapshot | None = None  # last snapshot the node fully ACKed
    revert: Snapshot | None = None  # `good` re-versioned after a NACK
    rejected: set[str] = field(default_factory=set)
    target_since: float = 0.0  # monotonic time the current target became this node's target
    watchers: set[Callable[[], None]] = field(default_factory=set)
    # The clusters Envoy last ACKed (version, name → Any): lets a reconnecting stream keep
    # make-before-break, because SotW requests do not say which clusters Envoy holds.
    envoy_clusters: tuple[str, dict[str, any_pb2.Any]] | None = None


class Watch:
    """A stream's registration with the cache; `close()` on disconnect."""

    def __init__(self, cache: SnapshotCache, node_id: str, callback: Callable[[], None]):
        self._cache: SnapshotCache | None = cache
        self.node_id, self._callback = node_id, callback

    def close(self) -> None:
        if self._cache is not None:
            self._cache._disconnect(self.node_id, self._callback)
            self._cache = None


class SnapshotCache:
    """Holds the snapshot every node should run (a global one, plus optional per-node overrides)."""

    def __init__(
        self,
        known_static_clusters: Iterable[str] = BOOTSTRAP_CLUSTERS,
        *,
        on_ack: AckHook | None = None,
        on_nack: NackHook | None = None,
        initial_version: int = 0,
        history: int = 1000,
    ):
        self.known_static_clusters = frozenset(known_static_clusters)
        self.ack_hooks: list[AckHook] = [on_ack] if on_ack else []
        self.nack_hooks: list[NackHook] = [on_nack] if on_nack else []
        self.convergence: deque[Convergence] = deque(maxlen=history)
        self._counter = initial_version
        self._current: Snapshot | None = None
        self._nodes: dict[str, _Node] = {}
        self._published_at: dict[str, float] = {}  # version → monotonic publish time (bounded)
        self._wakeup = asyncio.Event()

    # ------------------------------------------------------------ publishing

    @property
    def snapshot(self) -> Snapshot | None:
        """The global snapshot last published."""
        return self._current

    async def publish(self, snapshot: Snapshot, node_id: str | None = None) -> Snapshot:
        """Check, version and publish `snapshot` (to all nodes, or as one node's override).

        Raises InconsistentSnapshotError, before anything is sent, when it has dangling references.
        Returns the snapshot as published, with its version: the caller's if it is an integer above
        every version used so far, else the next free one. An identical config is not re-published.
        """
        problems = check_consistency(snapshot, self.known_static_clusters)
        if problems:
            log.warning("refusing to publish an inconsistent snapshot: %s", "; ".join(problems))
            raise InconsistentSnapshotError(problems)
        if node_id is None:
            previous = self._current
        else:
            previous = self._nodes[node_id].override if node_id in self._nodes else None
        if snapshot.same_resources(previous):
            return previous  # type: ignore[return-value]  # nothing changed: no new version, no push
        stamped = self._stamp(snapshot)
        if node_id is None:
            self._current = stamped
            self._changed(self._nodes.values())
        else:
            node = self._node(node_id)
            node.override = stamped
            self._changed([node])
        log.info("published snapshot version %s%s", stamped.version, f" for node {node_id}" if node_id else "")
        return stamped

    def clear_override(self, node_id: str) -> None:
        """Let `node_id` follow the global snapshot again."""
        if node_id in self._nodes and self._nodes[node_id].override is not None:
            self._nodes[node_id].override = None
            self._changed([self._nodes[node_id]])

    def snapshot_for(self, node_id: str) -> Snapshot | None:
        """What `node_id` should run now: its target, or the revert while its target is parked."""
        node = self._nodes.get(node_id)
        target = (node.override if node else None) or self._current
        if node is None or target is None or target.version not in node.rejected:
            return target
        if node.revert is not None and node.revert.version not in node.rejected:
            return node.revert
        return None  # nothing safe to send: Envoy keeps what it has

    async def next_snapshot(self, node_id: str, after_version: str | None) -> Snapshot:
        """Wait until `node_id` should run a snapshot other than `after_version`."""
        while True:
            snapshot = self.snapshot_for(node_id)
            if snapshot is not None and snapshot.version != after_version:
                return snapshot
            await self._wakeup.wait()

    # ------------------------------------------------------------ status

    def status(self, node_id: str) -> NodeStatus:
        node = self._nodes.get(node_id)
        if node is None:
            return NodeStatus(node_id)
        return replace(
            node.status,
            acked=dict(node.status.acked),
            sent=dict(node.status.sent),
            parked_versions=tuple(sorted(node.rejected, key=_version_key)),
        )

    def statuses(self) -> dict[str, NodeStatus]:
        return {node_id: self.status(node_id) for node_id in self._nodes}

    def node_statuses(self) -> list[NodeStatus]:
        return [self.status(node_id) for node_id in sorted(self._nodes)]

    # ------------------------------------------------------------ stream side

    def connect(
        self, node_id: str, on_change: Callable[[], None], reported_version: str = "", api: str = "sotw"
    ) -> Watch:
        """Register a stream of `node_id`; `on_change` is called (synchronously) when its target moves.

        `reported_version` is the version_info of the stream's first request: after a control-plane
        restart it is the previous incarnation's version, which the counter must exceed (delta
        requests carry none: their per-resource versions are content digests, valid across restarts).
        `api` is "sotw" or "delta", shown in the node's status.
        """
        node = self._node(node_id)
        node.watchers.add(on_change)
        node.status.streams += 1
        node.status.xds_api = api
        self._observe_version(reported_version)
        target = self.snapshot_for(node_id)
        if target is not None and node.status.synced_version != target.version:
            node.target_since = time.monotonic()  # convergence counts from connect, not from publish
        return Watch(self, node_id, on_change)

    def record_sent(self, node_id: str, type_url: str, version: str) -> None:
        sent = self._node(node_id).status.sent
        sent[type_url] = sent.get(type_url, 0) + 1

    def record_ack(self, node_id: str, type_url: str, version: str, final: bool = True) -> None:
        """An ACK; `final=False` for the transitional CDS of make-before-break, which does not count."""
        node = self._node(node_id)
        node.status.last_ack_at = time.time()
        if final:
            node.status.acked[type_url] = version
            self._check_synced(node)

    def record_nack(self, node_id: str, type_url: str, version: str, message: str) -> None:
        """Envoy rejected `version` of `type_url`: park it and roll the node back to its last good config."""
        node = self._node(node_id)
        node.status.nack = node.status.last_nack = NackInfo(type_url, version, message, time.time())
        log.warning("Envoy %s rejected %s version %s: %s", node_id, type_url.rsplit(".", 1)[-1], version, message)
        for hook in self.nack_hooks:
            _call_hook(hook, node_id, type_url, version, message)
        served = self.snapshot_for(node_id)
        if served is None or served.version != version or version in node.rejected:
            return  # an older version, already superseded: nothing to undo
        node.rejected.add(version)
        if node.revert is not None and version == node.revert.version:
            log.error(
                "Envoy %s rejected the rollback %s too: parking, Envoy keeps its current config", node_id, version
            )
        elif node.good is None:
            log.error("Envoy %s rejected %s and has no known-good config: parking", node_id, version)
        else:
            node.revert = node.good.with_version(self._next_version())
            self._published_at[node.revert.version] = time.monotonic()
            log.warning("rolling Envoy %s back to version %s as %s", node_id, node.good.version, node.revert.version)
        self._changed([node])

    def record_envoy_clusters(self, node_id: str, version: str, clusters: Mapping[str, any_pb2.Any]) -> None:
        self._node(node_id).envoy_clusters = (version, dict(clusters))

    def envoy_clusters(self, node_id: str, version: str) -> dict[str, any_pb2.Any]:
        """The clusters Envoy holds if it reports CDS `version`; empty when unknown."""
        node = self._nodes.get(node_id)
        if node and node.envoy_clusters and version and node.envoy_clusters[0] == version:
            return dict(node.envoy_clusters[1])
        return {}

    # ------------------------------------------------------------ internals

    def _node(self, node_id: str) -> _Node:
        node = self._nodes.get(node_id)
        if node is None:
            node = self._nodes[node_id] = _Node(NodeStatus(node_id))
            served = self.snapshot_for(node_id)
            node.status.target_version = served.version if served else None
            node.target_since = time.monotonic()
        return node

    def _disconnect(self, node_id: str, callback: Callable[[], None]) -> None:
        node = self._nodes[node_id]
        node.watchers.discard(callback)
        node.status.streams -= 1

    def _next_version(self) -> str:
        self._counter += 1
        return str(self._counter)

    def _stamp(self, snapshot: Snapshot) -> Snapshot:
        if not snapshot.version:
            stamped = snapshot.with_version(self._next_version())
        elif snapshot.version.isdigit() and int(snapshot.version) > self._counter:
            self._counter = int(snapshot.version)  # the caller's numbering (e.g. the store's) is kept
            stamped = snapshot
        else:
            # A rollback or an Envoy from an earlier run already used this number: take the next one.
            stamped = snapshot.with_version(self._next_version())
            log.info("version %r is taken or not numeric: publishing as %s", snapshot.version, stamped.version)
        self._published_at[stamped.version] = time.monotonic()
        while len(self._published_at) > 4096:
            del self._published_at[next(iter(self._published_at))]
        return stamped

    def _observe_version(self, reported: str) -> None:
        """Keep versions increasing when an Envoy reports one from a previous control-plane run."""
        if not reported.isdigit() or reported in self._published_at or int(reported) < self._counter:
            return
        self._counter = int(reported)
        log.info("Envoy reports version %s from an earlier run: numbering continues above it", reported)
        if self._current is not None:
            self._current = self._restamp(self._current)
        for node in self._nodes.values():
            if node.override is not None:
                node.override = self._restamp(node.override)
        self._changed(self._nodes.values())

    def _restamp(self, snapshot: Snapshot) -> Snapshot:
        restamped = snapshot.with_version(self._next_version())
        self._published_at[restamped.version] = self._published_at.get(snapshot.version, time.monotonic())
        return restamped

    def _changed(self, nodes: Iterable[_Node]) -> None:
        now = time.monotonic()
        for node in list(nodes):
            served = self.snapshot_for(node.status.node_id)
            version = served.version if served else None
            if version != node.status.target_version:
                node.status.target_version = version
                published = now if version is None else self._published_at.get(version, now)
                node.target_since = published if node.status.connected else now
            for callback in list(node.watchers):
                callback()
        self._wakeup.set()
        self._wakeup = asyncio.Event()

    def _check_synced(self, node: _Node) -> None:
        served = self.snapshot_for(node.status.node_id)
        if served is None or node.status.synced_version == served.version:
            return
        if any(node.status.acked.get(t) != served.version for t in served.expected_types()):
            return
        node.good = served
        node.status.synced_version = served.version
        is_revert = node.revert is not None and served.version == node.revert.version
        if not is_revert:
            node.status.nack = None  # a new config is fully applied: the old rejection is history
            node.revert = None
            live = {s.version for s in (self._current, node.override) if s is not None}
            node.rejected &= live
        seconds = max(0.0, time.monotonic() - node.target_since)
        self.convergence.append(Convergence(node.status.node_id, served.version, seconds, is_revert))
        log.info("Envoy %s runs version %s (%.3fs after the change)", node.status.node_id, served.version, seconds)
        for hook in self.ack_hooks:
            _call_hook(hook, node.status.node_id, served.version, seconds)


def _version_key(version: str) -> tuple[int, str]:
    return (int(version), "") if version.isdigit() else (-1, version)


def _call_hook(hook: Callable[..., object], *args: object) -> None:
    try:
        hook(*args)
    except Exception:  # a broken metrics hook must not break config distribution
        log.exception("xDS hook %r failed", hook)
