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
            if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
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
