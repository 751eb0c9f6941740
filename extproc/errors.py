"""Errors the mesh itself answers, in the OpenAI error envelope.

``{"error": {"type": ..., "message": ..., "code": ...}}`` (protos/wire.py builds it, for Envoy's
direct responses too) with the HTTP status of docs/contracts.md's table ("Errors");
429 and 503 carry ``Retry-After`` (whole seconds, as HTTP wants). The servicer turns a
``RequestError`` into an ext_proc ImmediateResponse with ``status``, ``headers()`` and ``body``.
"""

from __future__ import annotations

import math

from protos.wire import MODEL_NOT_FOUND, error_body, error_type

# Retry-After defaults: a shed request may come back almost at once (load moves in tens of ms);
# "no replica at all" usually means a deployment or scale-up, which takes longer.
SHED_RETRY_AFTER_S = 1.0
NO_CAPACITY_RETRY_AFTER_S = 5.0

_JSON_HEADER = ("content-type", "application/json")


class RequestError(Exception):
    """A request the mesh answers itself.

    ``code`` is a short snake_case string (``invalid_json``, ``missing_model``, ``model_not_found``,
    ``context_length_exceeded``, ``overloaded``, ``no_capacity``...); ``type`` defaults from the
    status (400 -> invalid_request_error, 404 -> not_found_error, 429 -> rate_limit_error,
    503 -> service_unavailable). 429 and 503 always carry ``retry_after_s``.
    """

    __slots__ = ("status", "code", "message", "type", "retry_after_s", "_envelope")

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        type: str | None = None,  # noqa: A002 - the envelope's own field name
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.type = type or error_type(status)
        if retry_after_s is None and status in (429, 503):
            retry_after_s = SHED_RETRY_AFTER_S if status == 429 else NO_CAPACITY_RETRY_AFTER_S
        self.retry_after_s = retry_after_s
        self._envelope: bytes | None = None

    def envelope(self) -> bytes:
        """The JSON envelope, as bytes for the ImmediateResponse body (rendered once)."""
        body = self._envelope
        if body is None:
            body = self._envelope = error_body(self.type, self.message, self.code).encode()
        return body

    @property
    def body(self) -> bytes:
        """Same as ``envelope()``."""
        return self.envelope()

    @property
    def retry_after(self) -> str | None:
        """``Retry-After`` header value (delay-seconds, rounded up, at least 1), or None."""
        if self.retry_after_s is None:
            return None
        return str(max(1, math.ceil(self.retry_after_s)))

    def headers(self) -> tuple[tuple[str, str], ...]:
        """Response headers: content-type, plus retry-after when there is one."""
        retry = self.retry_after
        if retry is None:
            return (_JSON_HEADER,)
        return (_JSON_HEADER, ("retry-after", retry))

    def render(self) -> tuple[int, tuple[tuple[str, str], ...], bytes]:
        """``(status, headers, body)`` in one call."""
        return self.status, self.headers(), self.body

    def __repr__(self) -> str:
        return f"RequestError({self.status}, {self.code!r}, {self.message!r})"


def model_not_found(name: str) -> RequestError:
    return RequestError(404, MODEL_NOT_FOUND, f"the model {name!r} does not exist in this mesh")


def body_too_large(size: int, limit: int) -> RequestError:
    return RequestError(
        413, "request_too_large", f"the request body is {size} bytes; this mesh accepts at most {limit}"
    )
