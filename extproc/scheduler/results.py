"""What the scheduler answers for one request: a ``Pick`` (hosts for ``envoy.lb``), or a refusal
whose ``error()`` is the ``RequestError`` to answer with: ``Shed`` 429, ``NoCapacity`` 503,
``TooLarge`` 413, ``NotFound`` 404.
"""

from __future__ import annotations

from extproc.errors import NO_CAPACITY_RETRY_AFTER_S, SHED_RETRY_AFTER_S, RequestError
from protos.wire import MODEL_NOT_FOUND, SHED_CODE


class Pick:
    """Where a request may go.

    ``hosts``: ``ip:port`` ranked best first, the best few of EVERY routed version interleaved by
    rank (Envoy uses the first one that belongs to the cluster its weighted_clusters chose);
    ``header_value`` is them joined for ``dynamic_metadata["envoy.lb"]["x-imesh-endpoint"]``.
    ``primary_by_version``: version name -> its best host. ``primaries``: ``(host, share)`` per
    version, share being the version's fraction of the traffic (for in-flight bookkeeping).
    ``version``/``cluster``: set when the request must go to one version (pinned by the KServe
    path, by the context window, or because the other versions have no routable endpoint): the
    servicer routes it to that cluster. None: Envoy's canary split decides.
    """

    __slots__ = ("model", "hosts", "primary_by_version", "primaries", "version", "cluster")

    def __init__(
        self,
        model: str,
        hosts: tuple[str, ...],
        primary_by_version: dict[str, str],
        primaries: tuple[tuple[str, float], ...],
        version: str | None,
        cluster: str | None,
    ):
        self.model: str = model
        self.hosts: tuple[str, ...] = hosts
        self.primary_by_version: dict[str, str] = primary_by_version
        self.primaries: tuple[tuple[str, float], ...] = primaries
        self.version: str | None = version
        self.cluster: str | None = cluster

    @property
    def primary(self) -> str:
        return self.hosts[0]

    @property
    def header_value(self) -> str:
        return ",".join(self.hosts)

    def __repr__(self) -> str:
        return f"Pick({self.model!r}, hosts={self.hosts}, version={self.version!r})"


class Refusal:
    """A request the mesh answers itself; ``error()`` gives the ``RequestError`` to send."""

    __slots__ = ("reason", "retry_after_s", "_body")
    status = 500
    code = "internal_error"

    def __init__(self, reason: str, retry_after_s: float | None = None):
        self.reason = reason
        self.retry_after_s = retry_after_s
        self._body: bytes | None = None

    def error(self) -> RequestError:
        """A fresh ``RequestError`` (safe to raise); its envelope is rendered once per refusal,
        and a refusal lives as long as its plan, so a shed storm does not re-encode JSON."""
        err = RequestError(self.status, self.code, self.reason, retry_after_s=self.retry_after_s)
        if self._body is None:
            self._body = err.envelope()
        else:
            err._envelope = self._body
        return err

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.reason!r})"


class Shed(Refusal):
    """429 with Retry-After: enough candidates are saturated that this priority class waits."""

    __slots__ = ()
    status = 429
    code = SHED_CODE

    def __init__(self, reason: str, retry_after_s: float = SHED_RETRY_AFTER_S):
        super().__init__(reason, retry_after_s)


class NoCapacity(Refusal):
    """503 with Retry-After: no routable endpoint (none, all drained, none in a strict tier)."""

    __slots__ = ()
    status = 503
    code = "no_capacity"

    def __init__(self, reason: str, retry_after_s: float = NO_CAPACITY_RETRY_AFTER_S):
        super().__init__(reason, retry_after_s)


class TooLarge(Refusal):
    """413: the requested tokens exceed the context window of every version that could serve it."""

    __slots__ = ()
    status = 413
    code = "context_length_exceeded"


class NotFound(Refusal):
    """404: no such model, or no such version of it."""

    __slots__ = ()
    status = 404
    code = MODEL_NOT_FOUND


PickResult = Pick | Refusal  # a refusal is a Shed, NoCapacity, TooLarge or NotFound
