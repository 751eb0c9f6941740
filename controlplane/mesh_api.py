"""The control plane's own gRPC API (protos/mesh.proto): state streams for ext_procs, admin for the CLI."""

from __future__ import annotations

import grpc

from controlplane.errors import ConfigRejected
from controlplane.spec import SpecError, parse_spec
from protos import mesh_pb2, mesh_pb2_grpc


class MeshStateServicer(mesh_pb2_grpc.MeshStateServicer):
    """Streams the newest routing table and load report to every ext_proc; never a backlog."""

    def __init__(self, control_plane):
        self._cp = control_plane

    async def WatchRoutingTable(self, request, context):
        async for table in self._cp.tables.subscribe():
            yield table

    async def WatchLoad(self, request, context):
        async for report in self._cp.load_monitor.reports():
            yield report


class MeshAdminServicer(mesh_pb2_grpc.MeshAdminServicer):
    def __init__(self, control_plane):
        self._cp = control_plane

    async def ApplySpec(self, request, context):
        try:
            spec = parse_spec(request.spec_yaml, request.source_name or "<spec>")
        except SpecError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        diff = self._cp.diff(spec)
        version = self._cp.config_version
        if diff and not request.dry_run:
            try:
                version = await self._cp.apply_spec(spec)
            except ConfigRejected as exc:
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        return mesh_pb2.ApplySpecResponse(changed=bool(diff), diff=diff, config_version=version)

    async def GetSpec(self, request, context):
        return mesh_pb2.SpecDocument(spec_yaml=self._cp.spec_yaml(), config_version=self._cp.config_version)

    async def GetStatus(self, request, context):
        return self._cp.status()


def add_to_server(server: grpc.aio.Server, control_plane) -> None:
    mesh_pb2_grpc.add_MeshStateServicer_to_server(MeshStateServicer(control_plane), server)
    mesh_pb2_grpc.add_MeshAdminServicer_to_server(MeshAdminServicer(control_plane), server)
