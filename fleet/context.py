"""How route handlers find their replica (kept apart to avoid an import cycle)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from fleet.replica import Replica

REPLICA_KEY: web.AppKey[Replica] = web.AppKey("replica")


def replica_of(request: web.Request) -> Replica:
    """The replica whose app is serving ``request``."""
    return request.app[REPLICA_KEY]
