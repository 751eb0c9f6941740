"""The ports one local mesh listens on, and free ports for meshes that run side by side.

Kept apart from `local_mesh.py` so that `imesh --help` (whose `up` options come from `MeshPorts`)
does not import the process machinery and its HTTP client.
"""

from __future__ import annotations

import dataclasses
import os
import random
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class EnvoyPorts:
    admin: int
    xds: int
    extproc: int
    host: str = "127.0.0.1"
    extproc_more: tuple[int, ...] = ()  # the other ext_proc workers' ports (python -m extproc --workers N)

    @property
    def extproc_ports(self) -> tuple[int, ...]:
        return (self.extproc, *self.extproc_more)


@dataclass(frozen=True)
class MeshPorts:
    """Defaults: docs/contracts.md, "Default ports"; tests use `MeshPorts.ephemeral()` so meshes run side by side."""

    listener: int = 8080
    admin: int = 9901
    control_plane: int = 18000
    control_plane_metrics: int = 9090
    extproc: int = 18001
    extproc_metrics: int = 9091
    host: str = "127.0.0.1"

    @classmethod
    def port_names(cls) -> tuple[str, ...]:
        """The fields that are ports (all but `host`), in declaration order."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.name != "host")

    @classmethod
    def ephemeral(cls, **fixed: int) -> MeshPorts:
        """Free ports for all but those given in `fixed`, which none of the free ones duplicates."""
        names = [name for name in cls.port_names() if name not in fixed]
        free = [port for port in free_ports(len(names) + len(fixed)) if port not in fixed.values()]
        return cls().with_ports({**fixed, **dict(zip(names, free[: len(names)], strict=True))})

    def with_ports(self, ports: Mapping[str, int]) -> MeshPorts:
        """A copy with the ports named (by field) changed."""
        unknown = set(ports) - set(self.port_names())
        if unknown:
            raise ValueError(f"not ports of MeshPorts: {sorted(unknown)}")
        changes: dict[str, Any] = dict(ports)  # names checked above; mypy cannot tell which fields they are
        return dataclasses.replace(self, **changes)

    @property
    def envoy(self) -> EnvoyPorts:
        return EnvoyPorts(admin=self.admin, xds=self.control_plane, extproc=self.extproc, host=self.host)


_handed_out: set[int] = set()


def free_ports(count: int) -> list[int]:
    """Distinct ports free right now, from below the kernel's ephemeral range.

    Ports the kernel hands out for port 0 come from the same range as the source ports of
    outgoing connections, so a port picked that way can be taken by a client socket before the
    server binds it. Ports below that range are only ever taken by an explicit bind. Parallel test
    workers (pytest-xdist) each draw from their own slice, and no port is handed out twice by one
    process, so two meshes starting at once cannot pick the same port.
    """
    start, stop = _port_slice()
    offset = random.randrange(stop - start)
    chosen: list[int] = []
    for i in range(stop - start):
        port = start + (offset + i) % (stop - start)
        if port in _handed_out:
            continue
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        chosen.append(port)
        if len(chosen) == count:
            _handed_out.update(chosen)
            return chosen
    raise RuntimeError(f"could not find {count} free ports in {start}-{stop}")


def _port_slice() -> tuple[int, int]:
    """This process's share of 20000 .. (start of the ephemeral range)."""
    low, _ = _ephemeral_range()
    top = min(low, 65_536)
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")  # "gw0", "gw1", ...; "" outside xdist
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0") or 0)
    if not worker.startswith("gw") or workers <= 0:
        return 20_000, top
    size = (top - 20_000) // workers
    index = int(worker[2:]) % workers
    return 20_000 + index * size, 20_000 + (index + 1) * size


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999
    return low, high
