"""Durable desired state: the applied spec, the live overrides and the config version.

Every change is written before it is acknowledged, atomically (temp file, fsync, rename,
fsync of the directory), so a crash mid-write leaves the previous state whole, and a restart
resumes with every change made through the CLI or API. The config version is stored too, so
it never goes backwards across restarts.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

from controlplane.canary.state import CanaryState
from controlplane.spec.schema import MeshSpec, dump_spec, parse_spec
from controlplane.state.overrides import Overrides

STATE_FILE = "state.json"


@dataclass(frozen=True)
class MeshState:
    spec: MeshSpec
    overrides: Overrides
    version: int


def write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class StateStore:
    """Holds the current MeshState and persists each new one before it becomes current."""

    def __init__(self, state_dir: Path | None, initial: MeshSpec):
        self._path = state_dir / STATE_FILE if state_dir else None
        restored = self._load()
        self._state = restored or MeshState(initial, Overrides(), 1)
        if restored is None:
            self._persist(self._state)

    @property
    def state(self) -> MeshState:
        return self._state

    @property
    def restored(self) -> bool:
        return self._path is not None and self._path.exists()

    def commit(self, spec: MeshSpec | None = None, overrides: Overrides | None = None) -> MeshState:
        """Persist a change with the next config version, then make it current."""
        new = MeshState(
            spec=spec if spec is not None else self._state.spec,
            overrides=overrides if overrides is not None else self._state.overrides,
            version=self._state.version + 1,
        )
        self._persist(new)
        self._state = new
        return new

    def bump_version(self, at_least: int) -> None:
        """Move the version forward (never back), e.g. past versions the xDS cache used for a revert."""
        if at_least > self._state.version:
            self._state = replace(self._state, version=at_least)
            self._persist(self._state)

    def _persist(self, state: MeshState) -> None:
        if self._path is None:
            return
        document = {
            "version": state.version,
            "spec_yaml": dump_spec(state.spec),
            "overrides": {
                "weights": state.overrides.weights,
                "drained": sorted(state.overrides.drained),
                "canaries": {m: c.to_json() for m, c in sorted(state.overrides.canaries.items())},
            },
        }
        write_atomically(self._path, json.dumps(document, indent=1).encode())

    def _load(self) -> MeshState | None:
        if self._path is None or not self._path.exists():
            return None
        document = json.loads(self._path.read_text())
        overrides = document.get("overrides", {})
        return MeshState(
            spec=parse_spec(document["spec_yaml"], str(self._path)),
            overrides=Overrides(
                weights={m: dict(v) for m, v in overrides.get("weights", {}).items()},
                drained=frozenset(overrides.get("drained", [])),
                # absent in state written before canaries existed
                canaries={m: CanaryState.from_json(c) for m, c in overrides.get("canaries", {}).items()},
            ),
            version=int(document["version"]),
        )
