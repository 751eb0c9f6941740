"""Drain and undrain one replica live: `imesh endpoint drain|undrain ADDR`.

A drained endpoint stays in its EDS cluster with health status DRAINING, so Envoy's own balancing
(fail-open) skips it and the picker drops it too, while requests already on it finish: nothing
is cut, no connection is closed. The flag is an override on top of the spec, persisted like every
other change; an endpoint the spec itself marks ``drained: true`` can only be undrained by the spec.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from controlplane.errors import Conflict, InvalidRequest
from controlplane.state.desired import DesiredState


@dataclass(frozen=True)
class DrainResult:
    config_version: int
    changed: bool
    model: str
    version: str


async def set_drain(desired: DesiredState, address: str, drained: bool) -> DrainResult:
    state = desired.state
    owner = next(
        ((m, v, e) for m in state.spec.models for v in m.versions for e in v.endpoints if e.address == address), None
    )
    if owner is None:
        known = sorted(e.address for m in state.spec.models for v in m.versions for e in v.endpoints)
        raise InvalidRequest(f"no endpoint {address!r} in the mesh (endpoints: {', '.join(known) or 'none'})")
    model, version, endpoint = owner
    if not drained and endpoint.drained:
        raise Conflict(f"{address} is drained by the spec itself (drained: true); change the spec to undrain it")
    overrides = state.overrides
    current = overrides.drained
    wanted = current | {address} if drained else current - {address}
    if wanted == current:
        return DrainResult(state.version, False, model.name, version.name)
    config_version = await desired.set_overrides(replace(overrides, drained=frozenset(wanted)))
    return DrainResult(config_version, True, model.name, version.name)
