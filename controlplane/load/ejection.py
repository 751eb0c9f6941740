"""Passive ejection for the picker's path: replicas that keep failing are reported as ejected.

Envoy's outlier detection ejects hosts from its own balancing, but a pick the ext_proc made is
honoured by ``override_host`` whatever the host's health (Envoy 1.40's override-host balancer
does not look at it). So the picker must know too. This sink watches every request record (the
access log carries each picker-routed request, unsampled) and applies the spec's
``resilience.outlier_detection`` rules to the picker's path, the way Envoy applies them to its own:

- a 5xx from the replica that answered counts toward ``consecutive_5xx``;
- an Envoy upstream failure there (connect failure, reset, timeout), and each try the request
  made *before* the one that answered (``upstream_request_attempt_count`` tries walk the pick list
  in order), count toward ``consecutive_gateway_failure``: a retried request still tells on the
  replica it left;
- any success resets both counts;
- an ejection lasts ``base_ejection_s`` times the replica's ejection count (capped), and never
  takes out more than ``max_ejection_percent`` of a version's replicas.

The load report then marks the replica ``ejected`` until the time is up, and the picker treats it
as unreachable (it still goes to it if nothing better is left, as Envoy's panic mode would).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter

from controlplane.spec.resilience import OutlierDetectionSpec
from controlplane.traffic.record import RequestRecord

log = logging.getLogger("imesh.controlplane.ejection")

MAX_EJECTION_S = 300.0  # Envoy's default max_ejection_time


@dataclass(slots=True)
class _Host:
    version: str = ""  # "model/version" of its cluster
    five_xx: int = 0
    gateway: int = 0
    ejections: int = 0
    until: float = 0.0  # monotonic clock; ejected while now < until


class Ejections:
    """A RecordSink. ``configure`` on each routing table; ``on_eject(address, until)`` is told of each ejection."""

    def __init__(
        self,
        on_eject: Callable[[str, float], None],
        registry: CollectorRegistry | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._on_eject = on_eject
        self._clock = clock
        self._spec = OutlierDetectionSpec()
        self._hosts: dict[str, _Host] = {}
        self._members: dict[str, int] = {}  # version -> replica count
        self.ejected_total = Counter(
            "imesh_endpoint_ejections",
            "Replicas the control plane reported ejected to the pickers, by the rule that ejected them.",
            ("reason",),
            registry=registry,
        )

    def configure(self, spec: OutlierDetectionSpec, versions: Mapping[str, Iterable[str]]) -> None:
        """The rules, and which replicas make up each version (``"model/version" -> addresses``)."""
        self._spec = spec
        hosts: dict[str, _Host] = {}
        self._members = {}
        for version, addresses in versions.items():
            members = list(addresses)
            self._members[version] = len(members)
            for address in members:
                host = self._hosts.get(address) or _Host()
                host.version = version
                hosts[address] = host
        self._hosts = hosts

    def ejected(self, address: str) -> bool:
        host = self._hosts.get(address)
        return host is not None and self._clock() < host.until

    def __call__(self, record: RequestRecord) -> None:
        for address in record.failed_tries():
            self._failure(address, gateway=True)
        if not record.endpoint:
            return
        if record.upstream_failure or record.status == 0:
            self._failure(record.endpoint, gateway=True)
        elif record.status >= 500:
            self._failure(record.endpoint, gateway=False)
        else:
            host = self._hosts.get(record.endpoint)
            if host is not None:
                host.five_xx = host.gateway = 0

    def _failure(self, address: str, gateway: bool) -> None:
        host = self._hosts.get(address)
        if host is None or self._clock() < host.until:
            return
        spec = self._spec
        if gateway:
            host.gateway += 1
            reached = spec.consecutive_gateway_failure and host.gateway >= spec.consecutive_gateway_failure
        else:
            host.five_xx += 1
            reached = spec.consecutive_5xx and host.five_xx >= spec.consecutive_5xx
        if reached and self._may_eject(host):
            self._eject(address, host, "consecutive_gateway_failure" if gateway else "consecutive_5xx")

    def _may_eject(self, host: _Host) -> bool:
        members = self._members.get(host.version, 0)
        now = self._clock()
        out = sum(1 for h in self._hosts.values() if h.version == host.version and now < h.until)
        return out * 100 < self._spec.max_ejection_percent * members  # Envoy's rule: below the cap before this one

    def _eject(self, address: str, host: _Host, reason: str) -> None:
        host.ejections += 1
        host.five_xx = host.gateway = 0
        duration = min(self._spec.base_ejection_s * host.ejections, max(MAX_EJECTION_S, self._spec.base_ejection_s))
        host.until = self._clock() + duration
        self.ejected_total.labels(reason).inc()
        log.warning("%s ejected from the pickers for %.0f s (%s)", address, duration, reason.replace("_", " "))
        self._on_eject(address, host.until)
