"""Durable desired state: the applied spec, the live overrides and the config version.

Every change is written before it is acknowledged, atomically (temp file, fsync, rename,
fsync of the directory), so a crash mid-write leaves the previous state whole, and a restart
resumes with every change made through the CLI or API. The config version is stored too, so
it never goes backwards across restarts.

Damage from outside (a disk error, a hand edit, a truncated copy) is survived: before each
write the current file becomes ``state.json.prev`` (a hard link, so ``state.json`` is never
absent). A restart that finds ``state.json`` unreadable says which file and what is wrong,
keeps it as ``state.json.corrupt`` for inspection and resumes from ``.prev``, losing only the
last change; with no good copy it refuses to start and says how to proceed. One control plane
per directory (``lock.py``).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from controlplane.canary.state import CanaryState
from controlplane.errors import StateError
from controlplane.spec.schema import MeshSpec, SpecError, dump_spec, parse_spec
from controlplane.state.lock import StateDirLock
from controlplane.state.overrides import Overrides

STATE_FILE = "state.json"
PREVIOUS_SUFFIX = ".prev"
CORRUPT_SUFFIX = ".corrupt"

log = logging.getLogger("imesh.controlplane.state")


@dataclass(frozen=True)
class MeshState:
    spec: MeshSpec
    overrides: Overrides
    version: int


class _OverridesDocument(BaseModel):
    model_config = ConfigDict(extra="ignore")
    weights: dict[str, dict[str, int]] = {}
    drained: list[str] = []
    canaries: dict[str, dict[str, Any]] = {}  # absent in state written before canaries existed


class _StateDocument(BaseModel):
    """The file's shape, checked before any of it is believed."""

    model_config = ConfigDict(extra="ignore")
    version: int = Field(ge=1)
    spec_yaml: str
    overrides: _OverridesDocument = _OverridesDocument()


def write_atomically(path: Path, data: bytes, keep_previous: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if keep_previous and path.exists():
            _link_over(path, path.with_name(path.name + PREVIOUS_SUFFIX))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _link_over(source: Path, target: Path) -> None:
    """Make ``target`` another name of ``source``'s current contents, replacing it atomically."""
    staging = target.with_name(f".{target.name}.link")
    staging.unlink(missing_ok=True)
    os.link(source, staging)
    os.replace(staging, target)


class StateStore:
    """Holds the current MeshState and persists each new one before it becomes current.

    With a state directory it holds that directory's lock until ``close``.
    """

    def __init__(self, state_dir: Path | None, initial: MeshSpec):
        self._path = state_dir / STATE_FILE if state_dir else None
        self._lock = StateDirLock(state_dir) if state_dir else None
        if self._lock is not None:
            self._lock.acquire()
        try:
            restored = self._restore()
        except BaseException:
            self.close()
            raise
        self.restored = restored is not None
        self._state = restored or MeshState(initial, Overrides(), 1)
        if restored is None:
            self._persist(self._state)

    @property
    def state(self) -> MeshState:
        return self._state

    def close(self) -> None:
        if self._lock is not None:
            self._lock.release()

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
        write_atomically(self._path, json.dumps(document, indent=1).encode(), keep_previous=True)

    def _restore(self) -> MeshState | None:
        """The persisted state: the current file, else the previous one; None for a new directory."""
        if self._path is None:
            return None
        previous = self._path.with_name(self._path.name + PREVIOUS_SUFFIX)
        if not self._path.exists():
            if previous.exists():  # only a crash between two renames leaves this; .prev is the last ack
                return _read_state(previous)
            return None
        try:
            return _read_state(self._path)
        except StateError as damage:
            return self._fall_back(damage, previous)

    def _fall_back(self, damage: StateError, previous: Path) -> MeshState:
        assert self._path is not None
        if not previous.exists():
            raise StateError(f"{damage}\n{_RECOVERY.format(path=self._path)}") from None
        try:
            state = _read_state(previous)
        except StateError as also:
            raise StateError(f"{damage}\nits previous copy too: {also}\n{_RECOVERY.format(path=self._path)}") from None
        kept = self._path.with_name(self._path.name + CORRUPT_SUFFIX)
        os.replace(self._path, kept)
        log.error(
            "%s; resuming from the previous good copy %s (config version %d: the last change is lost); "
            "the damaged file is kept as %s",
            damage,
            previous,
            state.version,
            kept,
        )
        return state


_RECOVERY = (
    "The control plane will not start on it. Restore {path} from a backup, or move it away "
    "(mv {path} {path}.bad) to start afresh from --spec; its config version then starts at 1."
)


def _read_state(path: Path) -> MeshState:
    """Parse one state file; every way it can be wrong becomes a StateError naming the file."""
    try:
        raw = path.read_bytes()
        document = _StateDocument.model_validate_json(raw)
    except OSError as exc:
        raise StateError(f"state file {path} cannot be read: {exc.strerror or exc}") from None
    except ValidationError as exc:
        raise StateError(f"state file {path} is damaged: {_first_problem(exc)}") from None
    try:
        spec = parse_spec(document.spec_yaml, f"{path} (spec_yaml)")
        canaries = {m: CanaryState.from_json(c) for m, c in document.overrides.canaries.items()}
    except SpecError as exc:
        raise StateError(f"state file {path} holds a spec that no longer parses:\n{exc}") from None
    except (KeyError, TypeError, ValueError) as exc:
        raise StateError(f"state file {path} is damaged: a canary entry is malformed ({exc!r})") from None
    overrides = document.overrides
    return MeshState(
        spec=spec,
        overrides=Overrides(weights=overrides.weights, drained=frozenset(overrides.drained), canaries=canaries),
        version=document.version,
    )


def _first_problem(exc: ValidationError) -> str:
    error = exc.errors(include_url=False)[0]
    where = ".".join(str(part) for part in error["loc"])
    if error["type"] == "json_invalid":
        return f"not valid JSON ({error['msg'].removeprefix('Invalid JSON: ')}); was it truncated?"
    return f"{where or 'the document'}: {error['msg']}" + (
        f" ({exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    )
