"""Start and stop a whole fleet in the current event loop.

Tests use this in-process (``async with await start_fleet(cfg) as fleet``) to reach each
replica's engine directly; the CLI (``python -m fleet``) wraps the same call.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from types import TracebackType

from fleet.config import FleetConfig
from fleet.engine import Engine
from fleet.replica import Replica

log = logging.getLogger(__name__)

RunningReplica = Replica  # the public name of a started replica


class RunningFleet:
    """The started replicas, by name, in config order."""

    def __init__(self, config: FleetConfig, replicas: list[Replica]) -> None:
        self.config = config
        self.replicas: dict[str, Replica] = {r.name: r for r in replicas}
        self._stopped: set[str] = set()

    def __getitem__(self, name: str) -> Replica:
        return self.replicas[name]

    def __len__(self) -> int:
        return len(self.replicas)

    def engine(self, name: str) -> Engine:
        """The engine of replica ``name`` (its queue, KV use, faults, counters)."""
        return self.replicas[name].engine

    @property
    def addresses(self) -> dict[str, str]:
        """Replica name → the host:port it listens on (the bound port if the config said 0)."""
        return {name: r.address for name, r in self.replicas.items()}

    @property
    def urls(self) -> dict[str, str]:
        return {name: r.url for name, r in self.replicas.items()}

    async def stop_replica(self, name: str) -> None:
        """Take one replica down (as a crash would, from the mesh's point of view)."""
        if name not in self._stopped:
            self._stopped.add(name)
            await self.replicas[name].stop()

    async def restart_replica(self, name: str) -> Replica:
        """Bring a stopped replica back on the same address, with a fresh engine."""
        old = self.replicas[name]
        await self.stop_replica(name)
        cfg = old.config.model_copy(update={"address": old.address})
        fresh = Replica(cfg, seed=self.config.seed, time_scale=self.config.time_scale, profile=old.profile)
        await fresh.start()
        self.replicas[name] = fresh
        self._stopped.discard(name)
        return fresh

    async def drain(self, window_s: float) -> list[str]:
        """Drain every running replica at once (``Replica.drain``); the names of those not empty in time."""
        running = [r for name, r in self.replicas.items() if name not in self._stopped]
        emptied = await asyncio.gather(*(r.drain(window_s) for r in running))
        return [r.name for r, ok in zip(running, emptied, strict=True) if not ok]

    async def stop(self) -> None:
        """Stop every replica (idempotent)."""
        for name in list(self.replicas):
            try:
                await self.stop_replica(name)
            except Exception:  # keep stopping the others
                log.exception("stopping replica %s failed", name)

    async def __aenter__(self) -> RunningFleet:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()


async def start_fleet(
    config: FleetConfig | str | Path,
    *,
    time_scale: float | None = None,
    seed: int | None = None,
) -> RunningFleet:
    """Start every replica of ``config`` (a ``FleetConfig`` or a YAML path) and return when all listen.

    ``time_scale`` and ``seed`` override the config's. If any replica cannot listen, the ones
    already started are stopped and the ``OSError`` (naming the replica and address) is raised.
    """
    if not isinstance(config, FleetConfig):
        config = FleetConfig.load(config)
    updates: dict[str, object] = {}
    if time_scale is not None:
        updates["time_scale"] = time_scale
    if seed is not None:
        updates["seed"] = seed
    if updates:
        config = FleetConfig.model_validate({**config.model_dump(), **updates})
    started: list[Replica] = []
    try:
        for rc in config.replicas:
            replica = Replica(rc, seed=config.seed, time_scale=config.time_scale)
            await replica.start()
            started.append(replica)
            log.info("replica %s (%s, %s) listening on %s", rc.name, rc.gpu, ",".join(rc.models), replica.address)
    except BaseException:
        for replica in started:
            await replica.stop()
        raise
    return RunningFleet(config, started)
