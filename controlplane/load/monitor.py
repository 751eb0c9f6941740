"""Scrape every replica's /metrics a few times a second and publish the live load.

The ext_proc picks a replica per request from this data, so two properties matter more than
anything else here:

* one slow or dead replica must never delay the readings of the others: each target has its own
  scrape task with a hard deadline, and all share one keep-alive ``httpx.AsyncClient``;
* consumers never poll: each publication is an immutable ``mesh_pb2.LoadReport`` with a monotonic
  ``sequence``, and subscribers ``await`` the next one (``reports()`` / ``wait_for_report``), which
  is what the control plane's ``MeshState.WatchLoad`` stream forwards.

Reports are published shortly after fresh readings land (coalesced over ``publish_delay_s``) and at
least once per interval as a heartbeat, so ``age_s`` keeps growing for a target that stopped
answering. No metrics registry lives here; ``on_reading`` / ``on_remove`` let the caller export
gauges.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field, replace

import httpx

from controlplane.load.metrics_parsing import ENGINES, EngineLoad, parse_engine_load
from controlplane.spec.resilience import HealthCheckSpec, readiness_path
from protos import mesh_pb2

log = logging.getLogger(__name__)

# address, the new reading (None when the scrape failed), seconds since the last good scrape.
ReadingCallback = Callable[[str, EngineLoad | None, float], None]
RemoveCallback = Callable[[str], None]

# Prometheus text format 0.0.4: the format prometheus_client's parser reads. Asking for it keeps
# servers that negotiate OpenMetrics from answering in a dialect we would have to special-case.
_ACCEPT = "text/plain;version=0.0.4;q=1.0, */*;q=0.1"


class MonitorStopped(RuntimeError):
    """Raised to waiters when the monitor stops, so subscriber streams can end cleanly."""


@dataclass(frozen=True, slots=True)
class ScrapeTarget:
    """One replica to scrape. ``address`` is the EDS host name ("ip:port") used as the key.

    ``metrics_port`` is for engines that serve metrics on a port other than the inference one
    (Triton: 8002); by default the metrics are on ``address`` itself (vLLM, SGLang).
    """

    address: str
    engine: str = "generic"
    path: str = "/metrics"
    metrics_port: int | None = None
    # The engine's readiness route, asked every readiness_interval_s: the same question Envoy's
    # active health check asks, so the picker and Envoy agree on who may get requests. "" = none.
    readiness_path: str = ""
    readiness_interval_s: float = 5.0

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"{self.address}: unknown engine {self.engine!r}")
        if not self.path.startswith("/"):
            raise ValueError(f"{self.address}: metrics path must start with '/', got {self.path!r}")

    @property
    def url(self) -> str:
        host, _, port = self.address.rpartition(":")
        if self.metrics_port is not None:
            port = str(self.metrics_port)
        return f"http://{host}:{port}{self.path}"

    @property
    def readiness_url(self) -> str:
        return f"http://{self.address}{self.readiness_path}"


@dataclass(slots=True)
class _EndpointState:
    target: ScrapeTarget
    load: EngineLoad = field(default_factory=EngineLoad)
    last_success: float | None = None  # monotonic clock
    latency_s: float = 0.0  # recent mean end-to-end latency; 0 = unknown
    # What a TTFT estimate needs, from the prefill and decode histograms; 0 = not measured yet.
    prefill_tokens_per_s: float = 0.0
    prefill_tokens_mean: float = 0.0
    decode_step_s: float = 0.0
    reachable: bool = False
    attempted: bool = False
    last_error: str = ""
    ready: bool = True  # the readiness route's last answer (True where none is probed)
    probed_at: float = -math.inf  # monotonic clock
    ejected_until: float = 0.0  # monotonic clock: passively ejected while now < this (ejection.py)


def targets_from_table(
    table: mesh_pb2.RoutingTable, *, path: str = "/metrics", health: HealthCheckSpec | None = None
) -> list[ScrapeTarget]:
    """Every endpoint of a routing table as a scrape target, with its version's engine, and with
    `health` its readiness route (the spec's resilience.health_checks, as Envoy checks it).

    Drained endpoints are kept: they still finish their running requests, and their load is
    what tells an operator when draining is done. An address listed twice keeps its first engine.
    """
    seen: dict[str, ScrapeTarget] = {}
    for model in table.models:
        for version in model.versions:
            engine = version.engine or "generic"
            if engine not in ENGINES:
                engine = "generic"
            probe = health if health is not None and health.enabled else None
            for endpoint in version.endpoints:
                if endpoint.address not in seen:
                    target = ScrapeTarget(endpoint.address, engine, path)
                    if probe is not None:
                        ready_at = readiness_path(engine, model.name, probe.path)
                        target = replace(target, readiness_path=ready_at, readiness_interval_s=probe.interval_s)
                    seen[endpoint.address] = target
    return list(seen.values())


class LoadMonitor:
    """Scrapes a changeable set of targets and publishes ``LoadReport`` snapshots.

    Use from one event loop: ``await start()``, ``set_targets(...)`` whenever the routing table
    changes, ``async for report in reports()`` per subscriber, ``await stop()``. Published reports
    are shared between subscribers and must be treated as read-only.
    """

    def __init__(
        self,
        targets: Iterable[ScrapeTarget] = (),
        *,
        interval_s: float = 0.1,
        timeout_s: float = 0.5,
        publish_delay_s: float | None = None,
        on_reading: ReadingCallback | None = None,
        on_remove: RemoveCallback | None = None,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        if interval_s <= 0 or timeout_s <= 0:
            raise ValueError("interval_s and timeout_s must be positive")
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        # Long enough for a round of fast loopback/LAN scrapes to land in one report, short enough
        # not to add noticeable staleness.
        self.publish_delay_s = min(0.01, interval_s / 10) if publish_delay_s is None else publish_delay_s
        self._on_reading = on_reading
        self._on_remove = on_remove
        self._client = client
        self._owns_client = client is None
        self._states: dict[str, _EndpointState] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._retiring: set[asyncio.Task[None]] = set()
        self._publisher: asyncio.Task[None] | None = None
        self._dirty = asyncio.Event()
        self._published = asyncio.Event()
        self._latest = mesh_pb2.LoadReport(sequence=0)
        self._running = False
        self._stopped = False
        self.set_targets(targets)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Open the HTTP client and start one scrape task per target plus the publisher."""
        if self._running:
            return
        if self._stopped:
            raise RuntimeError("a stopped LoadMonitor cannot be restarted; create a new one")
        if self._client is None:
            self._client = httpx.AsyncClient(
                timeout=httpx.Timeout(self.timeout_s),
                # No pool cap: a cap would let hanging targets hold every connection and starve
                # the healthy ones, which is exactly what per-target tasks are meant to prevent.
                limits=httpx.Limits(max_connections=None, max_keepalive_connections=None, keepalive_expiry=30.0),
                headers={"Accept": _ACCEPT},
                # Never send loopback/pod-network scrapes through an HTTP_PROXY from the env.
                trust_env=False,
            )
        self._running = True
        for address in self._states:
            self._spawn(address)
        self._publisher = asyncio.create_task(self._publish_loop(), name="load-monitor-publisher")

    async def stop(self) -> None:
        """Cancel every task, wait for them, close the client and release waiters."""
        if self._stopped:
            return
        self._running = False
        self._stopped = True
        tasks = [*self._tasks.values(), *self._retiring]
        if self._publisher is not None:
            tasks.append(self._publisher)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        self._retiring.clear()
        self._publisher = None
        if self._owns_client and self._client is not None:
            await self._client.aclose()
            self._client = None
        self._wake_waiters()

    async def __aenter__(self) -> LoadMonitor:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ------------------------------------------------------------------ targets

    def set_targets(self, targets: Iterable[ScrapeTarget]) -> None:
        """Replace the target set: new addresses start being scraped, missing ones are dropped.

        A target whose engine, path or port changed keeps its last reading and is scraped the new
        way from its next tick. Must be called on the monitor's event loop (or before start()).
        """
        wanted: dict[str, ScrapeTarget] = {}
        for target in targets:
            wanted[target.address] = target
        for address in [a for a in self._states if a not in wanted]:
            del self._states[address]
            task = self._tasks.pop(address, None)
            if task is not None:
                task.cancel()
                self._retiring.add(task)
                task.add_done_callback(self._retiring.discard)
            if self._on_remove is not None:
                self._call_safely(self._on_remove, address)
        for address, target in wanted.items():
            state = self._states.get(address)
            if state is None:
                self._states[address] = _EndpointState(target)
                if self._running:
                    self._spawn(address)
            elif state.target != target:
                state.target = target
        self._dirty.set()

    def eject(self, address: str, until: float) -> None:
        """Report `address` ejected until the monotonic time `until` (controlplane/load/ejection.py)."""
        state = self._states.get(address)
        if state is not None:
            state.ejected_until = until
            self._dirty.set()

    @property
    def targets(self) -> list[ScrapeTarget]:
        return [state.target for state in self._states.values()]

    # ------------------------------------------------------------------ reports

    def latest(self) -> mesh_pb2.LoadReport:
        """The last published report (sequence 0 and no endpoints before the first one)."""
        return self._latest

    async def wait_for_report(self, after_sequence: int = 0, timeout: float | None = None) -> mesh_pb2.LoadReport:
        """Return the first report with ``sequence > after_sequence``, waiting if needed.

        Raises ``TimeoutError`` after ``timeout`` seconds and :class:`MonitorStopped` once the
        monitor stops. A slow subscriber simply gets the newest report: load is latest-wins.
        """
        async with asyncio.timeout(timeout):
            while self._latest.sequence <= after_sequence:
                if self._stopped:
                    raise MonitorStopped("load monitor stopped")
                await self._published.wait()
        return self._latest

    async def reports(self, after_sequence: int | None = None) -> AsyncIterator[mesh_pb2.LoadReport]:
        """Yield each new report; the first yield is the current one if any was published.

        Ends when the monitor stops. Reports published while the consumer was busy are skipped.
        """
        seq = max(0, self._latest.sequence - 1) if after_sequence is None else after_sequence
        while True:
            try:
                report = await self.wait_for_report(seq)
            except MonitorStopped:
                return
            seq = report.sequence
            yield report

    def build_report(self) -> mesh_pb2.LoadReport:
        """A report of the current readings, not published and with the latest sequence number.

        Endpoints appear after their first scrape attempt: before it nothing is known, and
        reporting them unreachable would make the ext_proc avoid every new replica for a tick.
        ``age_s`` is infinite for an endpoint that has never answered.
        """
        now = time.monotonic()
        endpoints = []
        for address, state in self._states.items():
            if not state.attempted:
                continue
            load = state.load
            endpoints.append(
                mesh_pb2.EndpointLoad(
                    address=address,
                    waiting=load.waiting,
                    running=load.running,
                    kv_cache=load.kv_cache,
                    gpu_util=load.gpu_util,
                    age_s=math.inf if state.last_success is None else now - state.last_success,
                    reachable=state.reachable,
                    latency_s=state.latency_s,
                    prefill_tokens_per_s=state.prefill_tokens_per_s,
                    prefill_tokens_mean=state.prefill_tokens_mean,
                    decode_step_s=state.decode_step_s,
                    adapters=load.adapters,
                    max_adapters=load.max_adapters,
                    not_ready=not state.ready,
                    ejected=now < state.ejected_until,
                    slots=load.slots,
                )
            )
        return mesh_pb2.LoadReport(sequence=self._latest.sequence, endpoints=endpoints)

    def publish(self) -> mesh_pb2.LoadReport:
        """Publish a report of the current readings now and wake every waiter."""
        report = self.build_report()
        report.sequence = self._latest.sequence + 1
        self._latest = report
        self._wake_waiters()
        return report

    def _wake_waiters(self) -> None:
        # Swap-then-set: waiters of this publication wake, later waiters wait for the next one,
        # and no lock is needed on the publishing side.
        published, self._published = self._published, asyncio.Event()
        published.set()

    async def _publish_loop(self) -> None:
        loop = asyncio.get_running_loop()
        # At most about four publications per interval however the scrapes are phased: each one
        # copies every endpoint, which matters at thousands of replicas.
        min_gap = self.interval_s / 4
        last = -math.inf
        while True:
            try:
                async with asyncio.timeout(self.interval_s):
                    await self._dirty.wait()
                await asyncio.sleep(max(self.publish_delay_s, last + min_gap - loop.time()))
            except TimeoutError:
                pass  # heartbeat: ages advance even when nothing new arrived
            self._dirty.clear()
            self.publish()
            last = loop.time()

    # ------------------------------------------------------------------ scraping

    def _spawn(self, address: str) -> None:
        self._tasks[address] = asyncio.create_task(self._scrape_loop(address), name=f"load-scrape {address}")

    async def _scrape_loop(self, address: str) -> None:
        loop = asyncio.get_running_loop()
        # A random phase spreads a large fleet's scrapes over the interval instead of bursting.
        await asyncio.sleep(random.uniform(0, self.interval_s))
        next_at = loop.time()
        while True:
            state = self._states.get(address)
            if state is None:
                return
            await self._scrape_once(address, state)
            if state.target.readiness_path and loop.time() - state.probed_at >= state.target.readiness_interval_s:
                state.probed_at = loop.time()
                await self._probe_readiness(address, state)
            next_at += self.interval_s
            now = loop.time()
            if next_at < now:  # the scrape overran (slow target): skip missed ticks, don't burst
                next_at = now
            await asyncio.sleep(next_at - now)

    async def _probe_readiness(self, address: str, state: _EndpointState) -> None:
        assert self._client is not None
        try:
            async with asyncio.timeout(self.timeout_s):
                response = await self._client.get(state.target.readiness_url)
            ready = 200 <= response.status_code < 300
            why = f"{state.target.readiness_path} answered {response.status_code}"
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            ready, why = False, f"{state.target.readiness_path}: {_describe(exc)}"
        if ready != state.ready and self._states.get(address) is state:
            log.info("%s is %s (%s)", address, "ready again" if ready else "not ready", why)
            state.ready = ready
            self._dirty.set()

    async def _scrape_once(self, address: str, state: _EndpointState) -> None:
        target = state.target
        assert self._client is not None
        try:
            # httpx's timeout is per phase; this deadline also bounds a server that trickles bytes.
            async with asyncio.timeout(self.timeout_s):
                response = await self._client.get(target.url)
            response.raise_for_status()
            load = parse_engine_load(response.text, target.engine)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # any failure is one unreachable reading, never a dead task
            if state.reachable or not state.attempted:
                log.info("load scrape of %s (%s) failed: %s", address, target.url, _describe(exc))
            state.reachable = False
            state.last_error = _describe(exc)
            reading: EngineLoad | None = None
        else:
            state.latency_s = _recent_latency(state.load, load, state.latency_s)
            _derive_ttft_signals(state, load)
            state.load = load
            state.last_success = time.monotonic()
            state.reachable = True
            state.last_error = ""
            reading = load
        if self._states.get(address) is not state:
            return  # removed (or replaced) while the request was in flight
        state.attempted = True
        self._dirty.set()
        if self._on_reading is not None:
            age = math.inf if state.last_success is None else time.monotonic() - state.last_success
            self._call_safely(self._on_reading, address, reading, age)

    def last_error(self, address: str) -> str:
        """Why the last scrape of ``address`` failed ("" when it succeeded or is unknown)."""
        state = self._states.get(address)
        return state.last_error if state else ""

    @staticmethod
    def _call_safely(callback: Callable[..., None], *args: object) -> None:
        # A broken metrics hook must not stop the scraping that routing depends on.
        try:
            callback(*args)
        except Exception:
            log.exception("load monitor callback %r failed", callback)


def _recent_latency(previous: EngineLoad, current: EngineLoad, smoothed: float) -> float:
    """Mean latency of the requests that finished between two scrapes, smoothed (EWMA, 1/2).

    Unchanged when none finished; a counter reset (replica restart) starts over.
    """
    finished = current.latency_count - previous.latency_count
    spent = current.latency_sum - previous.latency_sum
    if finished <= 0 or spent < 0:
        return smoothed if finished == 0 else 0.0
    mean = spent / finished
    return mean if smoothed == 0.0 else 0.5 * smoothed + 0.5 * mean


def _derive_ttft_signals(state: _EndpointState, current: EngineLoad) -> None:
    """The prefill rate, the mean prompt and the decode step from the histograms' deltas between
    ``state.load`` (the previous scrape) and ``current``."""
    previous = state.load
    state.prefill_tokens_per_s = _window_ratio(
        (previous.prefill_tokens_sum, previous.prefill_time_sum),
        (current.prefill_tokens_sum, current.prefill_time_sum),
        state.prefill_tokens_per_s,
    )
    state.prefill_tokens_mean = _window_ratio(
        (previous.prefill_tokens_sum, previous.prefill_tokens_count),
        (current.prefill_tokens_sum, current.prefill_tokens_count),
        state.prefill_tokens_mean,
    )
    state.decode_step_s = _window_ratio(
        (previous.decode_step_sum, previous.decode_step_count),
        (current.decode_step_sum, current.decode_step_count),
        state.decode_step_s,
    )


def _window_ratio(previous: tuple[float, float], current: tuple[float, float], smoothed: float) -> float:
    """Δnumerator / Δdenominator of two cumulative counters between two scrapes, smoothed (EWMA, 1/2).

    A window in which nothing was observed (no request finished) keeps the last value: a replica
    that serves nothing for a while has not changed speed. A counter that went down was reset (the
    replica restarted): the window then counts from zero, as Prometheus's ``rate()`` does. 0 stays
    "not measured" until a window has something in it.
    """
    (num_before, den_before), (num, den) = previous, current
    if num < num_before or den < den_before:
        num_before = den_before = 0.0
    d_num, d_den = num - num_before, den - den_before
    if d_num <= 0.0 or d_den <= 0.0:
        return smoothed
    value = d_num / d_den
    return value if smoothed == 0.0 else 0.5 * smoothed + 0.5 * value


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
