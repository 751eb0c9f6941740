"""`DesiredState`: the desired state as the operations that change it see it.

Canary and drain operations (controlplane/canary/) read the current spec and overrides and commit
new overrides; nothing else of the control plane is theirs to reach. `ControlPlane`
(controlplane/server.py) is one: `set_overrides` persists the change, pushes it to Envoy and
returns its config version once Envoy ACKed it (ConfigRejected when Envoy refused it).
"""

from __future__ import annotations

from typing import Protocol

from controlplane.state.overrides import Overrides
from controlplane.state.store import MeshState


class DesiredState(Protocol):
    @property
    def state(self) -> MeshState:
        """The current spec, overrides and config version."""
        ...

    async def set_overrides(self, overrides: Overrides) -> int:
        """Commit `overrides` in place of the current ones; the new config version."""
        ...
