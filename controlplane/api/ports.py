"""What the mesh API (mesh_api.py) needs from the control plane, and nothing more.

`ControlPlane` (controlplane/server.py) is a `MeshService`; the servicers take these protocols,
so what they may reach is written down here and checked by mypy.
"""

from __future__ import annotations

from typing import Protocol

from controlplane.broadcast import Latest
from controlplane.canary.controller import CanaryController
from controlplane.load.monitor import LoadMonitor
from controlplane.spec.schema import MeshSpec
from controlplane.state.desired import DesiredState
from protos import mesh_pb2


class StateFeeds(Protocol):
    """What `MeshStateServicer` streams to the ext_procs."""

    @property
    def tables(self) -> Latest[mesh_pb2.RoutingTable]: ...

    @property
    def load_monitor(self) -> LoadMonitor: ...


class MeshAdmin(DesiredState, Protocol):
    """What `MeshAdminServicer` serves the CLI from: the desired state, and the operations on it."""

    @property
    def config_version(self) -> int: ...

    @property
    def canary(self) -> CanaryController: ...

    def spec_yaml(self) -> str: ...

    def diff(self, spec: MeshSpec) -> list[str]:
        """The changes `spec` would make to the applied spec, one line each."""
        ...

    async def apply_spec(self, spec: MeshSpec) -> int:
        """Apply `spec`; the new config version once Envoy ACKed it."""
        ...

    def confirmation(self, version: int) -> str | None:
        """Why config version `version` is not confirmed as applied (an Envoy has not ACKed it); None if it is."""
        ...

    def status(self) -> mesh_pb2.MeshStatus: ...


class MeshService(StateFeeds, MeshAdmin, Protocol):
    """Both: what `add_to_server` hands the two servicers."""
