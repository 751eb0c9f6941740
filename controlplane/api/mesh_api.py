"""The control plane's own gRPC API (protos/mesh.proto): state streams for ext_procs, admin for the CLI."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import NoReturn, TypeAlias, TypeVar

import grpc

from controlplane.api.ports import MeshAdmin, MeshService, StateFeeds
from controlplane.api.route_table import route_entries
from controlplane.canary.controller import CanaryView, reconcile_overrides
from controlplane.canary.drain import set_drain
from controlplane.canary.state import CanaryState, Gates
from controlplane.errors import ConfigRejected, Conflict, InvalidRequest
from controlplane.model.mesh_model import build_mesh_model
from controlplane.spec.schema import SpecError, parse_spec
from protos import mesh_pb2, mesh_pb2_grpc

T = TypeVar("T")
Context: TypeAlias = grpc.aio.ServicerContext


class MeshStateServicer(mesh_pb2_grpc.MeshStateServicer):
    """Streams the newest routing table and load report to every ext_proc; never a backlog."""

    def __init__(self, feeds: StateFeeds):
        self._feeds = feeds

    async def WatchRoutingTable(
        self, request: mesh_pb2.WatchRequest, context: Context
    ) -> AsyncIterator[mesh_pb2.RoutingTable]:
        async for table in self._feeds.tables.subscribe():
            yield table

    async def WatchLoad(self, request: mesh_pb2.WatchRequest, context: Context) -> AsyncIterator[mesh_pb2.LoadReport]:
        async for report in self._feeds.load_monitor.reports():
            yield report


class MeshAdminServicer(mesh_pb2_grpc.MeshAdminServicer):
    def __init__(self, admin: MeshAdmin):
        self._admin = admin

    async def ApplySpec(self, request: mesh_pb2.ApplySpecRequest, context: Context) -> mesh_pb2.ApplySpecResponse:
        try:
            spec = parse_spec(request.spec_yaml, request.source_name or "<spec>")
        except SpecError as exc:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        diff = self._admin.diff(spec)
        version = self._admin.config_version
        try:
            state = self._admin.state
            kept = reconcile_overrides(state.spec, spec, state.overrides)  # a dry run says so too
            diff += [
                f"~ models.{m}: the spec's weights replace the live ones set by `imesh canary`"
                for m in sorted(set(state.overrides.weights) - set(kept.weights))
                if diff
            ]
            if diff and not request.dry_run:
                version = await self._admin.apply_spec(spec)
                await self._confirmed(context, version)
        except (ConfigRejected, Conflict) as exc:
            await _abort(context, grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        return mesh_pb2.ApplySpecResponse(changed=bool(diff), diff=diff, config_version=version)

    async def GetSpec(self, request: mesh_pb2.GetSpecRequest, context: Context) -> mesh_pb2.SpecDocument:
        return mesh_pb2.SpecDocument(spec_yaml=self._admin.spec_yaml(), config_version=self._admin.config_version)

    async def GetStatus(self, request: mesh_pb2.StatusRequest, context: Context) -> mesh_pb2.MeshStatus:
        return self._admin.status()

    async def GetRoutes(self, request: mesh_pb2.RoutesRequest, context: Context) -> mesh_pb2.RoutesResponse:
        state = self._admin.state
        # A one-off build, without the control plane's memo: a query must not change what the next
        # rebuild reuses (this build has no live EDS weights, so its versions differ from the rebuild's).
        model = build_mesh_model(state.spec, state.overrides, state.version)
        return mesh_pb2.RoutesResponse(config_version=state.version, routes=route_entries(model))

    async def _confirmed(self, context: Context, version: int) -> None:
        """A change an Envoy has not ACKed is not reported as applied: DEADLINE_EXCEEDED says why."""
        if (unconfirmed := self._admin.confirmation(version)) is not None:
            await _abort(context, grpc.StatusCode.DEADLINE_EXCEEDED, unconfirmed)

    # ------------------------------------------------------------ canary and drain
    # Each maps the control plane's errors to a status the CLI turns into a clear message:
    # INVALID_ARGUMENT (unknown name, bad value), FAILED_PRECONDITION (state forbids it, or Envoy
    # rejected the change: its own message), DEADLINE_EXCEEDED (saved, but an Envoy has not ACKed
    # it yet), nothing half-applied either way.

    async def SetCanary(self, request: mesh_pb2.SetCanaryRequest, context: Context) -> mesh_pb2.CanaryChange:
        return await self._canary_change(
            context, self._admin.canary.set_percent(request.model, request.version, request.percent)
        )

    async def StartCanary(self, request: mesh_pb2.StartCanaryRequest, context: Context) -> mesh_pb2.CanaryChange:
        gates = Gates(request.gates.max_error_rate, request.gates.max_p99_s, request.gates.min_samples)
        return await self._canary_change(
            context,
            self._admin.canary.start_progressive(
                request.model, request.version, list(request.steps), request.interval_s, gates
            ),
        )

    async def PromoteCanary(self, request: mesh_pb2.CanaryRef, context: Context) -> mesh_pb2.CanaryChange:
        return await self._canary_change(context, self._admin.canary.promote(request.model))

    async def RollbackCanary(self, request: mesh_pb2.CanaryRef, context: Context) -> mesh_pb2.CanaryChange:
        return await self._canary_change(context, self._admin.canary.rollback(request.model))

    async def GetCanaryStatus(
        self, request: mesh_pb2.CanaryStatusRequest, context: Context
    ) -> mesh_pb2.CanaryStatusResponse:
        views = await _guarded(context, _immediate(lambda: self._admin.canary.status(request.model)))
        return mesh_pb2.CanaryStatusResponse(canaries=[canary_proto(v) for v in views])

    async def SetDrain(self, request: mesh_pb2.DrainRequest, context: Context) -> mesh_pb2.DrainResponse:
        result = await _guarded(context, set_drain(self._admin, request.address, request.drained))
        if result.changed:
            await self._confirmed(context, result.config_version)
        return mesh_pb2.DrainResponse(
            config_version=result.config_version, changed=result.changed, model=result.model, version=result.version
        )

    async def _canary_change(
        self, context: Context, operation: Awaitable[tuple[int, CanaryState]]
    ) -> mesh_pb2.CanaryChange:
        version, state = await _guarded(context, operation)
        await self._confirmed(context, version)
        view = next(v for v in self._admin.canary.status(state.model) if v.state.model == state.model)
        return mesh_pb2.CanaryChange(config_version=version, canary=canary_proto(view))


async def _immediate(fn: Callable[[], T]) -> T:
    return fn()


async def _guarded(context: Context, operation: Awaitable[T]) -> T:
    try:
        return await operation
    except InvalidRequest as exc:
        await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
    except (Conflict, ConfigRejected) as exc:
        await _abort(context, grpc.StatusCode.FAILED_PRECONDITION, str(exc))


async def _abort(context: Context, code: grpc.StatusCode, details: str) -> NoReturn:
    """End the RPC with `code`. grpc.aio's `abort` always raises; grpc ships no types that say so."""
    await context.abort(code, details)
    raise AssertionError("ServicerContext.abort returned")


def canary_proto(view: CanaryView) -> mesh_pb2.CanaryState:
    state = view.state
    gates = state.gates
    return mesh_pb2.CanaryState(
        model=state.model,
        version=state.version,
        phase=state.phase,
        percent=state.percent,
        steps=list(state.steps),
        step=state.step,
        interval_s=state.interval_s,
        gates=mesh_pb2.CanaryGates(
            max_error_rate=gates.max_error_rate, max_p99_s=gates.max_p99_s, min_samples=gates.min_samples
        )
        if gates is not None
        else None,
        step_started_at_unix_s=state.step_started_at,
        baseline_weights=state.baseline_weights,
        weights=view.weights,
        previous_stable=state.previous_stable,
        reason=state.reason,
        readings=[
            mesh_pb2.GateReading(
                version=r.version,
                samples=r.samples,
                errors=r.errors,
                error_rate=r.error_rate,
                p99_s=r.p99_s,
                window_s=r.window_s,
            )
            for r in view.readings
        ],
        history=[mesh_pb2.CanaryEvent(at_unix_s=e.at, message=e.message) for e in state.history],
        waiting_for=view.waiting_for,
    )


def add_to_server(server: grpc.aio.Server, control_plane: MeshService) -> None:
    mesh_pb2_grpc.add_MeshStateServicer_to_server(MeshStateServicer(control_plane), server)
    mesh_pb2_grpc.add_MeshAdminServicer_to_server(MeshAdminServicer(control_plane), server)
