"""Canaries: set, promote, roll back, and the progressive canary that steps itself through gates.

Every change is a new ``Overrides`` (the model's weights and its ``CanaryState`` together)
committed through ``DesiredState.set_overrides`` (the control plane): persisted atomically, pushed to Envoy as RDS
``weighted_clusters`` weights, and acknowledged only once Envoy accepted it. An Envoy NACK reverts
both and surfaces as ``ConfigRejected``.

The progressive canary is judged on the mesh's own evidence: ``VersionWindows`` is a
``RecordSink`` for the access-log ``RequestRecord`` stream and keeps, per (model, version) of a
model under canary, each finished request's time, outcome and duration. Each step collects fresh
evidence from the moment its weight was live; the gates are judged as soon as ``min_samples``
canary requests are in (a failing gate rolls back at once, it does not wait for the interval) and
a step advances once its interval is over with the gates passed. After the last step the canary
is promoted. State is persisted at every step; after a control-plane restart the canary resumes at
the same step, with a fresh evidence window (the records before the restart are gone).

Reads of the current state and the commit that follows are never separated by an ``await``, so
the controller and the API calls cannot interleave a read-modify-write.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

from controlplane.canary.state import (
    MANUAL,
    PROGRESSING,
    PROMOTED,
    ROLLED_BACK,
    CanaryState,
    Gates,
    canary_weights,
    promoted_weights,
    stable_version,
)
from controlplane.errors import ConfigRejected, Conflict, InvalidRequest
from controlplane.spec.schema import MeshSpec, ModelSpec
from controlplane.state.desired import DesiredState
from controlplane.state.overrides import Overrides
from controlplane.traffic.record import RequestRecord, weighted_percentile

log = logging.getLogger("imesh.canary")


# ---------------------------------------------------------------- evidence


@dataclass(frozen=True)
class GateReading:
    version: str
    samples: int
    errors: int
    p99_s: float
    window_s: float

    @property
    def error_rate(self) -> float:
        return self.errors / self.samples if self.samples else 0.0

    def summary(self) -> str:
        p99 = f", p99 {self.p99_s:.3f}s" if self.samples else ""
        return f"{self.samples} requests, {self.errors} failed ({self.error_rate:.1%}){p99}"


def is_failure(record: RequestRecord) -> bool:
    """What a gate counts against a version: the same as the mesh's error metrics (a 5xx, an Envoy
    upstream failure, or no answer at all). 429 (shed) is the mesh protecting itself, not a failure."""
    return record.error


class VersionWindows:
    """A ``RecordSink``: recent (time, failed, duration) per (model, version) of watched models.

    Called once per finished request, so it does one set lookup for unwatched models and one
    deque append otherwise. Windows are bounded by age (``horizon_s``) and size.
    """

    def __init__(
        self, horizon_s: float = 3600.0, max_per_version: int = 200_000, clock: Callable[[], float] = time.monotonic
    ):
        self._horizon = horizon_s
        self._max = max_per_version
        self._clock = clock
        self._watched: frozenset[str] = frozenset()
        # (model, version) -> (time, failed, duration, weight) of each record
        self._windows: dict[tuple[str, str], deque[tuple[float, bool, float, int]]] = {}

    def watch(self, models: Iterable[str]) -> None:
        """Keep records of these models only (those with an active canary); forget the others."""
        watched = frozenset(models)
        if watched != self._watched:
            self._watched = watched
            self._windows = {k: w for k, w in self._windows.items() if k[0] in watched}

    def __call__(self, record: RequestRecord) -> None:
        if record.model not in self._watched or not record.version:
            return
        key = (record.model, record.version)
        window = self._windows.get(key)
        if window is None:
            window = self._windows[key] = deque(maxlen=self._max)
        now = self._clock()
        window.append((now, is_failure(record), record.duration_s, record.weight))
        horizon = now - self._horizon
        while window[0][0] < horizon:
            window.popleft()

    def reading(self, model: str, version: str, since: float) -> GateReading:
        """Requests of ``model``/``version`` that finished at or after ``since`` (the clock's time)."""
        window = self._windows.get((model, version), ())
        durations = []
        requests = errors = 0
        for at, failed, duration, weight in reversed(window):
            if at < since:
                break
            durations.append((duration, weight))
            requests += weight
            errors += failed * weight
        return GateReading(
            version, requests, errors, weighted_percentile(durations, 0.99), max(self._clock() - since, 0.0)
        )


def judge(gates: Gates, reading: GateReading) -> tuple[str, str]:
    """("wait" | "fail" | "pass", why) for one step's evidence so far."""
    if reading.samples < gates.min_samples:
        return "wait", f"waiting for samples: {reading.samples}/{gates.min_samples} canary requests"
    if reading.error_rate > gates.max_error_rate:
        return "fail", (
            f"error rate {reading.error_rate:.1%} > {gates.max_error_rate:.1%} "
            f"({reading.errors} of {reading.samples} requests failed)"
        )
    if gates.max_p99_s > 0 and reading.p99_s > gates.max_p99_s:
        return "fail", f"p99 {reading.p99_s:.3f}s > {gates.max_p99_s:g}s over {reading.samples} requests"
    return "pass", reading.summary()


# ---------------------------------------------------------------- status


@dataclass(frozen=True)
class CanaryView:
    """A canary as the API reports it: the persisted state plus what is live now."""

    state: CanaryState
    weights: dict[str, int]
    readings: tuple[GateReading, ...]
    waiting_for: str


# ---------------------------------------------------------------- controller


class _Keep(enum.Enum):
    WEIGHTS = "keep"  # `_commit` leaves the model's weight override as it is


class CanaryController:
    """Canary operations for the mesh API, and the loop that drives progressive canaries."""

    def __init__(
        self,
        desired: DesiredState,
        windows: VersionWindows | None = None,
        tick_s: float = 0.2,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ):
        self._desired = desired
        self._clock = clock
        self._wall = wall
        self.windows = windows or VersionWindows(clock=clock)
        self.tick_s = tick_s
        self._began: dict[str, float] = {}  # model -> clock time its current weight went live
        self._waiting: dict[str, str] = {}  # model -> why its step is not advancing yet
        self._task: asyncio.Task | None = None
        self.resumed = asyncio.Event()  # set once canaries persisted before a restart are running again

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="canary-controller")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        await self._resume()
        while True:
            try:
                await self.tick()
            except Exception:  # the loop must outlive one bad tick; the canary state is persisted
                log.exception("canary controller tick failed")
            await asyncio.sleep(self.tick_s)

    async def _resume(self) -> None:
        """After a restart: active canaries carry on at their step, with fresh evidence."""
        for model, c in list(self._overrides.canaries.items()):
            if c.phase != PROGRESSING:
                continue
            state = c.with_event(
                self._wall(),
                f"control plane restarted: resuming step {c.step + 1}/{len(c.steps)} at {c.percent:g}% "
                "(evidence for this step is collected afresh)",
                step_started_at=self._wall(),
            )
            try:
                await self._commit(model, c, state)
            except (ConfigRejected, Conflict):
                log.exception("could not record the resumption of the canary of %s", model)
        self._watch()
        self.resumed.set()

    # ------------------------------------------------------------ state

    @property
    def _overrides(self) -> Overrides:
        return self._desired.state.overrides

    @property
    def _spec(self) -> MeshSpec:
        return self._desired.state.spec

    def _watch(self) -> None:
        self.windows.watch(m for m, c in self._overrides.canaries.items() if c.active)

    def weights(self, model: ModelSpec) -> dict[str, int]:
        """The model's effective weights now: overrides on top of the spec."""
        override = self._overrides.weights.get(model.name, {})
        return {v.name: override.get(v.name, v.weight) for v in model.versions}

    async def _commit(
        self,
        model: str,
        expected: CanaryState | None,
        state: CanaryState,
        weights: dict[str, int] | None | _Keep = _Keep.WEIGHTS,
    ) -> int:
        """Write ``state`` (and the model's weight override: a dict, None to drop it, or left as it
        is) if the model's canary is still ``expected``; return the config version."""
        overrides = self._overrides
        if overrides.canaries.get(model) is not expected:
            raise Conflict(f"the canary of {model} changed meanwhile; look at `imesh canary status {model}`")
        new_weights = dict(overrides.weights)
        if weights is None:
            new_weights.pop(model, None)
        elif weights is not _Keep.WEIGHTS:
            new_weights[model] = weights
        version = await self._desired.set_overrides(
            replace(overrides, weights=new_weights, canaries={**overrides.canaries, model: state})
        )
        self._began[model] = self._clock()
        self._waiting.pop(model, None)
        self._watch()
        return version

    def _model(self, name: str) -> ModelSpec:
        model = self._spec.model(name)
        if model is None:
            known = ", ".join(m.name for m in self._spec.models) or "none"
            raise InvalidRequest(f"unknown model {name!r} (models: {known})")
        return model

    def _canary_version(self, model: ModelSpec, version: str) -> list[str]:
        versions = [v.name for v in model.versions]
        if version not in versions:
            raise InvalidRequest(f"model {model.name!r} has no version {version!r} (versions: {', '.join(versions)})")
        if len(versions) < 2:
            raise InvalidRequest(
                f"model {model.name!r} has only version {version!r}: a canary needs another to split with"
            )
        return versions

    def _begin(self, model: ModelSpec, version: str, switching_to: str) -> CanaryState | None:
        """The active canary this call continues (same version), None for a new one; Conflict when
        another version's canary is in progress."""
        current = self._overrides.canaries.get(model.name)
        if current is None or not current.active:
            return None
        if current.version != version:
            raise Conflict(
                f"a canary of {model.name}/{current.version} is in progress ({current.phase}, {current.percent:g}%); "
                f"promote or roll it back before {switching_to} {version}"
            )
        return current

    # ------------------------------------------------------------ operations

    async def set_percent(self, name: str, version: str, percent: float) -> tuple[int, CanaryState]:
        """`canary set`: ``version`` gets ``percent``%, the others share the rest as before the canary."""
        model = self._model(name)
        versions = self._canary_version(model, version)
        if not 0.0 <= percent <= 100.0:
            raise InvalidRequest(f"percent must be between 0 and 100, got {percent:g}")
        current = self._begin(model, version, "giving traffic to")
        now = self._wall()
        if current is None:
            current_override = self._overrides.weights.get(name)
            state = CanaryState(
                model=name,
                version=version,
                phase=MANUAL,
                percent=percent,
                baseline_override=None if current_override is None else dict(current_override),
                baseline_weights=self.weights(model),
                step_started_at=now,
            )
            expected = self._overrides.canaries.get(name)
            message = f"canary {version} set to {percent:g}%"
        else:
            expected = current
            state = replace(current, phase=MANUAL, percent=percent, step_started_at=now)
            message = f"canary {version} set to {percent:g}%" + (
                " by the operator: automatic steps stopped" if current.phase == PROGRESSING else ""
            )
        weights = canary_weights(state.baseline_weights, versions, version, percent)
        state = state.with_event(now, message)
        return await self._commit(name, expected, state, weights), state

    async def start_progressive(
        self, name: str, version: str, steps: list[float], interval_s: float, gates: Gates
    ) -> tuple[int, CanaryState]:
        """`canary start`: the first step now; the controller advances or rolls back from there."""
        model = self._model(name)
        versions = self._canary_version(model, version)
        _check_progressive(steps, interval_s, gates)
        current = self._begin(model, version, "starting a canary of")
        if current is not None and current.phase == PROGRESSING:
            raise Conflict(f"a progressive canary of {name}/{version} is already running; see `imesh canary status`")
        now = self._wall()
        if current is None:
            current_override = self._overrides.weights.get(name)
            baseline_override = None if current_override is None else dict(current_override)
            baseline_weights = self.weights(model)
        else:  # a manual canary of the same version turns progressive, keeping its baseline
            baseline_override, baseline_weights = current.baseline_override, current.baseline_weights
        state = CanaryState(
            model=name,
            version=version,
            phase=PROGRESSING,
            percent=steps[0],
            baseline_override=baseline_override,
            baseline_weights=baseline_weights,
            steps=tuple(steps),
            step=0,
            interval_s=interval_s,
            gates=gates,
            step_started_at=now,
            history=current.history if current is not None else (),
        ).with_event(
            now,
            f"progressive canary of {version} started: steps {_steps(steps)}, every {interval_s:g}s, "
            f"gates: {_gates(gates)}; step 1/{len(steps)} at {steps[0]:g}%",
        )
        weights = canary_weights(baseline_weights, versions, version, steps[0])
        return await self._commit(name, self._overrides.canaries.get(name), state, weights), state

    async def promote(self, name: str, why: str = "promoted by the operator") -> tuple[int, CanaryState]:
        """The canary takes 100%; the version it replaced is recorded as ``previous_stable``."""
        model = self._model(name)
        current = self._overrides.canaries.get(name)
        if current is None or not current.active:
            raise Conflict(
                f"no canary in progress for {name}; start one with `imesh canary set {name} VERSION PERCENT`"
            )
        return await self._promote(model, current, why)

    async def _promote(self, model: ModelSpec, current: CanaryState, why: str) -> tuple[int, CanaryState]:
        previous = stable_version(current.baseline_weights, current.version)
        state = current.with_event(
            self._wall(),
            f"{why}: {current.version} at 100% (previous stable: {previous or 'none'})",
            phase=PROMOTED,
            percent=100.0,
            previous_stable=previous,
            reason=why,
        )
        weights = promoted_weights([v.name for v in model.versions], current.version)
        return await self._commit(model.name, current, state, weights), state

    async def rollback(self, name: str, reason: str = "requested by the operator") -> tuple[int, CanaryState]:
        """Restore the weights from before the canary: of an active canary, or undo a promotion."""
        model = self._model(name)
        current = self._overrides.canaries.get(name)
        if current is None or current.phase == ROLLED_BACK:
            raise Conflict(
                f"no canary of {name} to roll back"
                + (f" (the last one, of {current.version}, was already rolled back)" if current else "")
            )
        if current.phase == PROMOTED:
            promoted = promoted_weights([v.name for v in model.versions], current.version)
            if self._overrides.weights.get(name) != promoted:
                raise Conflict(
                    f"the weights of {name} changed since {current.version} was promoted; "
                    "rolling back now would undo that change too: set the weights you want instead"
                )
        return await self._rollback(model, current, reason)

    async def _rollback(self, model: ModelSpec, current: CanaryState, reason: str) -> tuple[int, CanaryState]:
        known = {v.name for v in model.versions}
        restored = None
        if current.baseline_override is not None:
            restored = {v: w for v, w in current.baseline_override.items() if v in known}
        baseline = {v: w for v, w in current.baseline_weights.items() if v in known}
        total = sum(baseline.values())
        state = current.with_event(
            self._wall(),
            f"rolled back: {reason}; weights restored to {_weights(baseline)}",
            phase=ROLLED_BACK,
            percent=100.0 * baseline.get(current.version, 0) / total if total else 0.0,
            reason=reason,
        )
        return await self._commit(model.name, current, state, restored), state

    # ------------------------------------------------------------ progressive steps

    async def tick(self) -> None:
        """Judge every progressing canary once: roll back, advance, promote, or keep waiting."""
        self._watch()
        for name, current in list(self._overrides.canaries.items()):
            if current.phase != PROGRESSING or self._overrides.canaries.get(name) is not current:
                continue
            model = self._spec.model(name)
            if model is None:
                continue
            began = self._began.setdefault(name, self._clock())
            reading = self.windows.reading(name, current.version, began)
            verdict, why = judge(current.gates or Gates(), reading)
            step = f"step {current.step + 1}/{len(current.steps)} at {current.percent:g}%"
            try:
                if verdict == "fail":
                    log.warning("canary %s/%s failed its gates at %s: %s", name, current.version, step, why)
                    await self._rollback(model, current, f"{step}: {why}")
                elif self._clock() - began < current.interval_s:
                    self._waiting[name] = f"{step}: {why}; {current.interval_s - (self._clock() - began):.1f}s left"
                elif verdict == "wait":
                    self._waiting[name] = f"{step}: {why}"
                else:
                    await self._advance(model, current, reading, step)
            except ConfigRejected as exc:
                log.error("Envoy rejected the canary of %s: %s", name, exc)
                latest = self._overrides.canaries.get(name)
                if latest is not None and latest.active:
                    await self._rollback(model, latest, f"Envoy rejected the next weights: {exc}")
            except Conflict:
                pass  # changed by an API call meanwhile; judged afresh on the next tick

    async def _advance(self, model: ModelSpec, current: CanaryState, reading: GateReading, step: str) -> None:
        passed = f"{step} passed ({reading.summary()})"
        following = current.step + 1
        if following >= len(current.steps):
            await self._promote(model, current, f"{passed}; all {len(current.steps)} steps passed")
            return
        percent = current.steps[following]
        now = self._wall()
        state = current.with_event(
            now,
            f"{passed}; step {following + 1}/{len(current.steps)} at {percent:g}%",
            step=following,
            percent=percent,
            step_started_at=now,
        )
        weights = canary_weights(current.baseline_weights, [v.name for v in model.versions], current.version, percent)
        await self._commit(model.name, current, state, weights)

    # ------------------------------------------------------------ status

    def status(self, name: str = "") -> list[CanaryView]:
        if name:
            self._model(name)
        views = []
        for model_name, state in sorted(self._overrides.canaries.items()):
            if name and model_name != name:
                continue
            model = self._spec.model(model_name)
            weights = self.weights(model) if model is not None else {}
            readings: tuple[GateReading, ...] = ()
            if state.active:
                since = self._began.get(model_name, self._clock())
                readings = (self.windows.reading(model_name, state.version, since),)
                stable = stable_version(state.baseline_weights, state.version)
                if stable:
                    readings += (self.windows.reading(model_name, stable, since),)
            views.append(
                CanaryView(state, weights, readings, self._waiting.get(model_name, "") if state.active else "")
            )
        return views


# ---------------------------------------------------------------- spec changes


def reconcile_overrides(old: MeshSpec, new: MeshSpec, overrides: Overrides) -> Overrides:
    """The overrides to keep when ``new`` replaces ``old``; Conflict if it would pull the rug from
    under an active canary.

    A model whose versions or weights the new spec changes takes the spec's weights (an operator
    who edits weights in the spec means them); a canary in progress forbids that change.
    """
    weights = dict(overrides.weights)
    canaries = dict(overrides.canaries)
    for model_name in set(weights) | set(canaries):
        before, after = old.model(model_name), new.model(model_name)
        if before is not None and after is not None and _split(before) == _split(after):
            continue
        canary = canaries.get(model_name)
        if canary is not None and canary.active:
            change = "removes the model" if after is None else "changes the model's versions or weights"
            raise Conflict(
                f"a canary of {model_name}/{canary.version} is in progress and this spec {change}; "
                f"promote or roll back the canary first (`imesh canary promote|rollback {model_name}`)"
            )
        weights.pop(model_name, None)
        if after is None:
            canaries.pop(model_name, None)
    return replace(overrides, weights=weights, canaries=canaries)


def _split(model: ModelSpec) -> tuple[tuple[str, int], ...]:
    return tuple((v.name, v.weight) for v in model.versions)


# ---------------------------------------------------------------- helpers


def _check_progressive(steps: list[float], interval_s: float, gates: Gates) -> None:
    if not steps:
        raise InvalidRequest("give at least one step, e.g. --steps 5,25,50,100")
    if any(not 0.0 < s <= 100.0 for s in steps):
        raise InvalidRequest(f"steps must be percentages above 0 and at most 100, got {_steps(steps)}")
    if any(b <= a for a, b in itertools.pairwise(steps)):
        raise InvalidRequest(f"steps must increase, got {_steps(steps)}")
    if not interval_s > 0:
        raise InvalidRequest(f"the interval must be above 0 seconds, got {interval_s:g}")
    if not 0.0 <= gates.max_error_rate <= 1.0:
        raise InvalidRequest(f"the maximum error rate must be between 0% and 100%, got {gates.max_error_rate:.2%}")
    if gates.max_p99_s < 0:
        raise InvalidRequest(f"the maximum p99 must be 0 (no gate) or more, got {gates.max_p99_s:g}s")


def _steps(steps: Iterable[float]) -> str:
    return ",".join(f"{s:g}" for s in steps)


def _gates(gates: Gates) -> str:
    p99 = f", p99 <= {gates.max_p99_s:g}s" if gates.max_p99_s > 0 else ""
    return f"error rate <= {gates.max_error_rate:.2%}{p99}, at least {gates.min_samples} requests per step"


def _weights(weights: dict[str, int]) -> str:
    total = sum(weights.values())
    return ", ".join(f"{v} {100.0 * w / total:g}%" if total else f"{v} 0%" for v, w in weights.items())
