"""The wire contract: names the control plane, the ext_proc and Envoy must spell alike.

The control plane writes Envoy's config (routes that match headers, clusters that read dynamic
metadata, an access log that reads both); the ext_proc sets those headers and that metadata per
request. A name spelled differently on one side is a silent failure (a route never matches, a
pick is ignored, a record loses its model), so each is defined here once and both sides import
it. docs/contracts.md describes the contract for people; this module is the contract for code.

Pure Python, standard library only: protos/ is imported by both sides and imports neither.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

__all__ = [
    "BODY_MODEL_PATHS",
    "BOOTSTRAP_CLUSTERS",
    "DETAILS_PREFIX",
    "ENDPOINT_HEADER",
    "ERROR_TYPES",
    "EXTPROC_CLUSTER",
    "INTERNAL_HEADER_PREFIX",
    "MODELS_LIST_PATH",
    "MODEL_HEADER",
    "MODEL_ID_HEADER",
    "MODEL_NOT_FOUND",
    "MODEL_OWNER",
    "PICKER_UNAVAILABLE_CODE",
    "PICK_METADATA_KEY",
    "PICK_METADATA_NAMESPACE",
    "POOL_HEADER",
    "PRIORITY_HEADER",
    "RATE_LIMITED_CODE",
    "SHED_CODE",
    "TELEMETRY_METADATA_NAMESPACE",
    "TELEMETRY_MODEL_KEY",
    "TELEMETRY_OUTPUT_TOKENS_KEY",
    "VERSION_HEADER",
    "XDS_CLUSTER",
    "error_body",
    "error_envelope",
    "error_type",
    "model_body",
    "model_entry",
    "models_list_body",
    "reply_details",
]

# ---------------------------------------------------------------- request headers a client sets

# The model, named outright: the ext_proc identifies by it first, and Envoy's fail-open and fast-path
# routes match it when the ext_proc does not run.
MODEL_ID_HEADER = "x-model-id"
# The priority class; the ext_proc applies it and the access log labels records with it.
PRIORITY_HEADER = "x-priority"

# POST endpoints whose model is named only in the JSON body: the ext_proc reads it there, and with
# the ext_proc unavailable Envoy's route for them answers an honest 503, not "unknown model".
BODY_MODEL_PATHS = frozenset(
    {
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/responses",
    }
)

# ---------------------------------------------------------------- the mesh's own headers

# Every header with this prefix is the mesh's: Envoy strips client copies before the ext_proc runs
# (so a client cannot pick a route), and the spec refuses it as a custom header name.
INTERNAL_HEADER_PREFIX = "x-imesh-"
# Set by the ext_proc on the request to select the model's route (and the version's, when pinned);
# the routes match on them and add the same names to the response.
MODEL_HEADER = INTERNAL_HEADER_PREFIX + "model"
VERSION_HEADER = INTERNAL_HEADER_PREFIX + "version"
# Response only: the replica that served and its pool (the access log reads the version header too).
ENDPOINT_HEADER = INTERNAL_HEADER_PREFIX + "endpoint"
POOL_HEADER = INTERNAL_HEADER_PREFIX + "pool"

# ---------------------------------------------------------------- dynamic metadata

# The pick: the ext_proc writes its ranked hosts ("ip:port,ip:port") here; each cluster's
# override_host policy reads it, and the access log filter always logs a request that carries it.
PICK_METADATA_NAMESPACE = "envoy.lb"
PICK_METADATA_KEY = "x-imesh-endpoint"  # a metadata key named like the response header, never a header
# The ext_proc's notes for the access log: the model a refused request named (it never reached a
# cluster that would name it) and a sampled response's output tokens.
TELEMETRY_METADATA_NAMESPACE = "imesh"
TELEMETRY_MODEL_KEY = "model"
TELEMETRY_OUTPUT_TOKENS_KEY = "output_tokens"

# ---------------------------------------------------------------- response code details

# An ext_proc immediate response carries details "imesh_<error code>" (or "imesh_model" for a model's
# entry); the access log tells a shed (the picker's 429) from a rate limit by them.
DETAILS_PREFIX = "imesh_"
SHED_CODE = "overloaded"
RATE_LIMITED_CODE = "rate_limited"


def reply_details(code: str) -> str:
    """The response code details of a request the ext_proc answered itself (``code``: the error's)."""
    return DETAILS_PREFIX + code


# ---------------------------------------------------------------- static clusters

# Defined by envoy/bootstrap.yaml, not by xDS: the control plane's own gRPC port (ADS, the mesh API
# and the access log stream) and the ext_proc. Snapshots may refer to them (tests/test_build.py
# checks the bootstrap spells them alike).
XDS_CLUSTER = "imesh_xds"
EXTPROC_CLUSTER = "imesh_extproc"
BOOTSTRAP_CLUSTERS = (XDS_CLUSTER, EXTPROC_CLUSTER)

# ---------------------------------------------------------------- the error envelope

# The envelope's "type" by HTTP status, as OpenAI's API names them; any other status is "api_error".
ERROR_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}
# The code of "no such model or version": Envoy's catch-all route and the ext_proc both answer it.
MODEL_NOT_FOUND = "model_not_found"
# The code of Envoy's answer to a body-named request when the ext_proc failed open (down, saturated
# or past its timeout): only the ext_proc reads bodies, so the model is unknown to Envoy, not absent.
PICKER_UNAVAILABLE_CODE = "picker_unavailable"


def error_type(status: int) -> str:
    return ERROR_TYPES.get(status, "api_error")


def error_envelope(type: str, message: str, code: str) -> dict[str, dict[str, str]]:  # noqa: A002 - the field's name
    """``{"error": {"type", "message", "code"}}``: every error the mesh itself answers (Envoy's
    direct responses and local replies, the ext_proc's immediate responses) has this shape."""
    return {"error": {"type": type, "message": message, "code": code}}


def error_body(type: str, message: str, code: str) -> str:  # noqa: A002 - the field's name
    """The envelope as compact JSON text: the same bytes whichever side answers."""
    return _compact(error_envelope(type, message, code))


# ---------------------------------------------------------------- /v1/models

# Envoy answers GET /v1/models from a route (so it works with the ext_proc down); the ext_proc
# answers GET /v1/models/{name}. Both describe a model alike. A LoRA adapter is listed as vLLM lists
# it: an entry of its own, with its base model as "parent".
MODELS_LIST_PATH = "/v1/models"
MODEL_OWNER = "inference-mesh"


def model_entry(name: str, parent: str | None = None) -> dict[str, str | int]:
    """One model (or, with ``parent``, one LoRA adapter of ``parent``) in OpenAI's model-list format."""
    entry: dict[str, str | int] = {"id": name, "object": "model", "created": 0, "owned_by": MODEL_OWNER}
    if parent is not None:
        entry["parent"] = parent
    return entry


def model_body(name: str, parent: str | None = None) -> str:
    """GET /v1/models/{name}: the model's (or adapter's) entry as compact JSON."""
    return _compact(model_entry(name, parent))


def models_list_body(names: Iterable[str], adapters: Iterable[tuple[str, str]] = ()) -> str:
    """GET /v1/models: every served model, in order, then every adapter ``(name, parent)``, as
    compact JSON."""
    data = [model_entry(name) for name in names] + [model_entry(name, parent) for name, parent in adapters]
    return _compact({"object": "list", "data": data})


def _compact(value: object) -> str:
    return json.dumps(value, separators=(",", ":"))
