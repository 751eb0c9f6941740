"""Error responses in the two wire formats a replica speaks.

OpenAI routes answer ``{"error": {"type", "message", "code", "param"}}`` (the envelope the
official client parses, and the one the mesh itself uses); KServe v2 routes answer
``{"error": "message"}`` as Triton and KServe servers do, which is what ``tritonclient``
expects.
"""

from __future__ import annotations

from aiohttp import web


class ApiError(Exception):
    """Raised by handlers; the replica's middleware renders it for the route's protocol."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or default_type(status)
        self.code = code
        self.headers = headers or {}


def default_type(status: int) -> str:
    """OpenAI's error ``type`` for a status."""
    if status in (401,):
        return "authentication_error"
    if status == 403:
        return "permission_error"
    if status == 404:
        return "not_found_error"
    if status == 429:
        return "rate_limit_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


def openai_error(
    status: int,
    message: str,
    *,
    type: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    body = {"error": {"type": type or default_type(status), "message": message, "code": code, "param": None}}
    return web.json_response(body, status=status, headers=headers)


def kserve_error(status: int, message: str, *, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


def is_kserve_path(path: str) -> bool:
    return path == "/v2" or path.startswith("/v2/")


def render(path: str, err: ApiError) -> web.Response:
    """Render ``err`` in the format of the protocol that ``path`` belongs to."""
    if is_kserve_path(path):
        return kserve_error(err.status, err.message, headers=err.headers)
    return openai_error(err.status, err.message, type=err.type, code=err.code, headers=err.headers)
