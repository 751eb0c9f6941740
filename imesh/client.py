"""A small client for the control plane's MeshAdmin API, turning gRPC errors into readable ones."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

import grpc

from protos import mesh_pb2, mesh_pb2_grpc

DEFAULT_SERVER = "127.0.0.1:18000"
SERVER_ENV = "IMESH_SERVER"
T = TypeVar("T")


class MeshError(RuntimeError):
    """An error to show the operator as is: the control plane's message, or why it is unreachable."""


def default_server() -> str:
    return os.environ.get(SERVER_ENV, DEFAULT_SERVER)


# What grpc-core says when the client's own deadline passed; the control plane's DEADLINE_EXCEEDED
# (a change saved but not ACKed by every Envoy in time) carries its own explanation instead.
_LOCAL_DEADLINE = "Deadline Exceeded"


def _unreachable(exc: grpc.RpcError) -> bool:
    if exc.code() == grpc.StatusCode.UNAVAILABLE:
        return True
    return exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED and (exc.details() or _LOCAL_DEADLINE) == _LOCAL_DEADLINE


class MeshClient:
    def __init__(self, server: str | None = None, timeout_s: float = 10.0):
        self.server = server or default_server()
        self._timeout = timeout_s
        self._channel = grpc.insecure_channel(self.server)
        self._admin = mesh_pb2_grpc.MeshAdminStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> MeshClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, method: Callable[..., T], request) -> T:
        try:
            return method(request, timeout=self._timeout)
        except grpc.RpcError as exc:
            if _unreachable(exc):
                raise MeshError(
                    f"cannot reach the control plane at {self.server} ({exc.code().name}); "
                    f"is `imesh up` running? (set --server or ${SERVER_ENV})"
                ) from None
            raise MeshError(exc.details() or exc.code().name) from None

    def apply(self, spec_yaml: str, source: str, dry_run: bool = False) -> mesh_pb2.ApplySpecResponse:
        return self._call(
            self._admin.ApplySpec, mesh_pb2.ApplySpecRequest(spec_yaml=spec_yaml, source_name=source, dry_run=dry_run)
        )

    def spec(self) -> mesh_pb2.SpecDocument:
        return self._call(self._admin.GetSpec, mesh_pb2.GetSpecRequest())

    def status(self) -> mesh_pb2.MeshStatus:
        return self._call(self._admin.GetStatus, mesh_pb2.StatusRequest())

    def routes(self) -> mesh_pb2.RoutesResponse:
        return self._call(self._admin.GetRoutes, mesh_pb2.RoutesRequest())

    def set_canary(self, model: str, version: str, percent: float) -> mesh_pb2.CanaryChange:
        return self._call(
            self._admin.SetCanary, mesh_pb2.SetCanaryRequest(model=model, version=version, percent=percent)
        )

    def start_canary(
        self,
        model: str,
        version: str,
        steps: list[float],
        interval_s: float,
        max_error_rate: float,
        max_p99_s: float,
        min_samples: int,
    ) -> mesh_pb2.CanaryChange:
        gates = mesh_pb2.CanaryGates(max_error_rate=max_error_rate, max_p99_s=max_p99_s, min_samples=min_samples)
        request = mesh_pb2.StartCanaryRequest(
            model=model, version=version, steps=steps, interval_s=interval_s, gates=gates
        )
        return self._call(self._admin.StartCanary, request)

    def promote(self, model: str) -> mesh_pb2.CanaryChange:
        return self._call(self._admin.PromoteCanary, mesh_pb2.CanaryRef(model=model))

    def rollback(self, model: str) -> mesh_pb2.CanaryChange:
        return self._call(self._admin.RollbackCanary, mesh_pb2.CanaryRef(model=model))

    def canary_status(self, model: str = "") -> mesh_pb2.CanaryStatusResponse:
        return self._call(self._admin.GetCanaryStatus, mesh_pb2.CanaryStatusRequest(model=model))

    def set_drain(self, address: str, drained: bool) -> mesh_pb2.DrainResponse:
        return self._call(self._admin.SetDrain, mesh_pb2.DrainRequest(address=address, drained=drained))
