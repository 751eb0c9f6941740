"""Memoized translation: a rebuild re-translates only the model versions and models that changed.

Why: at 1,000 models and 10,000 endpoints a full translation costs a few hundred milliseconds, but
a typical change (one endpoint drained, one canary weight moved) touches one version or one model.
`translate_envoy.translate(model, options, memo)` asks the memo for each per-version and per-model
output; the memo hands back the very same protobuf objects as last time when their input is equal,
and `Snapshot(..., reuse=previous)` then reuses their serialized bytes and digests as well. Only the
changed resources are rebuilt, serialized, hashed, and (with delta xDS) sent.

The rule that keeps it correct: an entry is keyed by its own input (a frozen `VersionModel`,
`ModelModel` or tuple of them, compared by value), and everything else a translation may read is
the *context*: the `EnvoyOptions` plus every `MeshModel` field except `version` and `models`. When
the context changes, the memo forgets everything. Routes are keyed by their model *without its
endpoints* (`model_routes_key`): routes never depend on endpoints (that is what EDS is for), so a
one-endpoint change leaves the 2.6 MB route configuration of a 1,000-model mesh untouched. A
translation function that starts reading some other input must take it through its key or the
context; tests/test_scale.py checks that memoized and fresh translations produce byte-identical
resources after a series of changes.

Lookups go by identity first: `mesh_model.shared` hands back the very same `VersionModel` for an
unchanged version, so the memo finds it without hashing 10,000 endpoints. Only a key that is not
the same object is looked up by value (and entries found by identity are not re-indexed by value,
which would cost that hashing; a version whose shared object was forgotten is translated again).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from dataclasses import fields
from typing import Any, TypeVar

from controlplane.model.mesh_model import MeshModel

T = TypeVar("T")
_Entry = tuple[Any, list]  # (value, [(key, entry) of the entries built while computing it])


class TranslationMemo:
    """Outputs of the last build, keyed by input; see the module docstring for the rules."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.hits = 0
        self.misses = 0
        self.resets = 0  # context changes
        self._context: object = None
        self._entries: dict[tuple[str, Hashable], _Entry] = {}
        self._next: dict[tuple[str, Hashable], _Entry] = {}
        # (kind, id(key)) → (key, entry): found without hashing or comparing the key, when the model
        # hands back the very same object (mesh_model.shared); the entry keeps the key alive.
        self._ids: dict[tuple[str, int], tuple[Hashable, _Entry]] = {}
        self._next_ids: dict[tuple[str, int], tuple[Hashable, _Entry]] = {}
        self._stack: list[list] = []
        self._active = False

    @property
    def size(self) -> int:
        """Entries kept from the last build."""
        return len(self._entries)

    @contextmanager
    def session(self, model: MeshModel, options: object) -> Iterator[None]:
        """One build. Entries it did not use (directly or through a reused parent) are dropped."""
        if not self.enabled or self._active:  # disabled, or a nested translate() inside a build
            yield
            return
        context = (
            options,
            tuple((f.name, getattr(model, f.name)) for f in fields(model) if f.name not in ("version", "models")),
        )
        if context != self._context:
            if self._context is not None:
                self.resets += 1
            self._entries, self._ids, self._context = {}, {}, context
        self._next, self._next_ids, self._stack, self._active = {}, {}, [], True
        try:
            yield
        except BaseException:
            self._next, self._next_ids = {}, {}  # a failed build leaves the last good entries in place
            raise
        else:
            self._entries, self._next = self._next, {}
            self._ids, self._next_ids = self._next_ids, {}
        finally:
            self._active = False

    def get(self, kind: str, key: Hashable, build: Callable[..., T], *args: object) -> T:
        """`build(*args)`, or its output from the last build when `key` (of this `kind`) is equal."""
        if not self.enabled or not self._active:
            return build(*args)
        same = self._ids.get((kind, id(key)))
        if same is not None and same[0] is key:  # the very same object: no hashing, no comparing
            entry = same[1]
            self.hits += 1
            self._next_ids[(kind, id(key))] = same
            self._keep(entry[1])
        else:
            slot = (kind, key)
            found = self._entries.get(slot)
            if found is None:
                self.misses += 1
                self._stack.append([])
                try:
                    value = build(*args)
                finally:
                    children = self._stack.pop()
                entry = (value, children)
            else:
                entry = found
                self.hits += 1
                self._keep(entry[1])  # a reused parent keeps the entries it was built from
            self._next[slot] = entry
            self._next_ids[(kind, id(key))] = (key, entry)
        if self._stack:
            self._stack[-1].append(((kind, key), entry))
        return entry[0]

    def _keep(self, children: list) -> None:
        for slot, entry in children:
            self._next[slot] = entry
            self._next_ids[(slot[0], id(slot[1]))] = (slot[1], entry)
            self._keep(entry[1])


NO_MEMO = TranslationMemo(enabled=False)


def model_routes_key(model: Any) -> tuple:
    """A ModelModel's value without its versions' endpoints: everything its routes may depend on."""
    return (
        tuple(value for name, value in model.__dict__.items() if name != "versions"),
        tuple(tuple(value for name, value in v.__dict__.items() if name != "endpoints") for v in model.versions),
    )


def routes_key(mesh: Any) -> tuple:
    """The key of the whole route configuration: every model's `model_routes_key`, in order."""
    return tuple(model_routes_key(m) for m in mesh.models)
