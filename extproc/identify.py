"""Which model, version and priority a request is for: the first thing done per request.

Order of evidence (docs/contracts.md, "Model identity"):

1. header ``x-model-id``: the whole value is the model name. The version is not taken from it:
   which version serves a request is the canary split's business (Envoy's weighted_clusters);
2. the KServe v2 REST path ``/v2/models/{name}[/versions/{v}]/...``; a version in the path pins
   that version;
3. the request body, when nothing above named the model (``Identity.needs_body``: the servicer
   asks Envoy for the body, one more round trip, only then):
   - the OpenAI endpoints' JSON ``model`` (``body_kind == "openai"``, ``parse_body``);
   - KServe v2 gRPC ``ModelInferRequest.model_name``/``model_version``
     (``body_kind == "kserve-grpc"``, ``parse_kserve_grpc_body``: a few bytes of protobuf wire
     format read by hand, no generated classes, no full decode of the tensors).
   ``parse_request_body(kind, body, max_bytes)`` dispatches on the kind.

The body is also read, with the model already named, when the model's scheduling profile ranks on
the prompt (prefix affinity, docs/prefix-affinity.md) and the request is a POST to an endpoint
whose body carries one (``carries_prompt``): the servicer then sets ``body_kind`` to
``PROMPT_BODY``, and ``parse_prompt_body`` reads it leniently (a body it cannot read costs the
request its affinity, never an error: the model is known already). The same happens on a POST
whose body may carry a prompt (``carries_tokens``) when its size says it could exceed the model's
context window (extproc/budget.py): the servicer counts its tokens.

A name may be a LoRA adapter's (the spec's ``versions[].adapters``): vLLM serves an adapter
named as the request's model. ``resolve_adapter`` turns it into its base model, which the request
is routed as, with the adapter noted for the scheduler (and a version when only one serves it).
The request itself still names the adapter, which tells the replica what to run.

Priority comes from header ``x-priority``. An unknown class name is *not* an error: it falls back
to the mesh's default priority (``RoutingView.priority``). A typo in a client's header should
not turn into failed requests, and the header cannot grant anything: the class only orders work.

Envoy hands header names lower-cased; the servicer passes them as a plain ``dict`` (HTTP/2
pseudo-headers included: ``:method``, ``:path``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from urllib.parse import unquote

from extproc.budget import requested_tokens
from extproc.errors import RequestError, body_too_large
from extproc.routing_view import AdapterView, RoutingView
from protos.wire import BODY_MODEL_PATHS, MODEL_ID_HEADER, MODELS_LIST_PATH, PRIORITY_HEADER

# POST endpoints whose body carries a prompt that prefix affinity can read (prefix/prompt.py).
PROMPT_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})
# Identity.body_kind when the model is named and the body is read only for its prompt.
PROMPT_BODY = "prompt"
# KServe v2 gRPC: unary inference only (a stream's body cannot be buffered before routing).
KSERVE_GRPC_INFER_PATH = "/inference.GRPCInferenceService/ModelInfer"
_MODELS_PREFIX = MODELS_LIST_PATH + "/"
_KSERVE_PREFIX = "/v2/models/"
_KSERVE_PREFIX_LEN = len(_KSERVE_PREFIX)


class Identity:
    """What the request headers say. ``model`` None with ``needs_body`` True: read the body.

    ``models_query``: None for an ordinary request; ``""`` for ``GET /v1/models`` (answer with
    ``RoutingView.models_list_body``); a name for ``GET /v1/models/{name}``
    (``ModelView.openai_body``).
    """

    __slots__ = ("model", "version", "priority", "path", "body_kind", "models_query", "requested_version")

    def __init__(
        self,
        model: str | None,
        version: str | None,
        priority: str | None,
        path: str,
        body_kind: str | None,
        models_query: str | None,
    ):
        self.model: str | None = model
        self.version: str | None = version
        # The client's version header (RoutingView.version_header): honoured only where the model's
        # spec allows it, which is known once the model is (the servicer decides, not this module).
        self.requested_version: str | None = None
        self.priority: str | None = priority
        self.path: str = path
        self.body_kind: str | None = body_kind  # None | "openai" | "kserve-grpc" | PROMPT_BODY
        self.models_query: str | None = models_query

    @property
    def needs_body(self) -> bool:
        return self.body_kind is not None

    def __repr__(self) -> str:
        return (
            f"Identity(model={self.model!r}, version={self.version!r}, priority={self.priority!r}, "
            f"path={self.path!r}, body_kind={self.body_kind!r}, models_query={self.models_query!r})"
        )


class BodyInfo:
    """What a parsed body says: the model, a version it pins (KServe gRPC ``model_version``; None
    otherwise) and an estimate of the tokens it asks for (prompt chars / 4 plus
    ``max_tokens``/``max_completion_tokens``; 0 when nothing says). ``doc``: the parsed JSON
    object (None for KServe gRPC), for the prompt's prefix."""

    __slots__ = ("model", "tokens", "version", "doc")

    def __init__(self, model: str, tokens: int, version: str | None = None, doc: dict | None = None):
        self.model = model
        self.tokens = tokens
        self.version = version
        self.doc = doc

    def __repr__(self) -> str:
        return f"BodyInfo(model={self.model!r}, tokens={self.tokens}, version={self.version!r})"


def _strip_query(path: str) -> str:
    q = path.find("?")
    return path if q < 0 else path[:q]


def model_from_path(path: str) -> tuple[str | None, str | None]:
    """``(model, version)`` from a KServe v2 REST path, ``(None, None)`` for any other path."""
    if not path.startswith(_KSERVE_PREFIX):
        return None, None
    parts = _strip_query(path)[_KSERVE_PREFIX_LEN:].split("/", 3)
    name = parts[0]
    if not name:
        return None, None
    if "%" in name:
        name = unquote(name)
    version = None
    if len(parts) >= 3 and parts[1] == "versions" and parts[2]:
        version = parts[2]
        if "%" in version:
            version = unquote(version)
    return name, version


def needs_body(method: str, path: str) -> bool:
    """True when only the JSON body can name the model: POST on an OpenAI endpoint.

    Call it when the headers gave no model (``identify`` does exactly that, and also asks for
    the body of a KServe gRPC ModelInfer: see ``Identity.body_kind``).
    """
    return method == "POST" and _strip_query(path) in BODY_MODEL_PATHS


def carries_prompt(method: str | None, path: str) -> bool:
    """True for a POST to an endpoint whose JSON body carries a prompt (``PROMPT_PATHS``)."""
    return method == "POST" and _strip_query(path) in PROMPT_PATHS


def carries_tokens(method: str | None, path: str) -> bool:
    """True for a POST whose JSON body may carry a prompt the context-window check counts: an
    OpenAI endpoint's (``BODY_MODEL_PATHS``) or a KServe v2 REST path's (``extproc/budget.py``)."""
    return method == "POST" and (path.startswith(_KSERVE_PREFIX) or _strip_query(path) in BODY_MODEL_PATHS)


def identify(headers: Mapping[str, str]) -> Identity:
    """Model, pinned version, priority name and body need from the request headers."""
    get = headers.get
    path = get(":path") or "/"
    priority = get(PRIORITY_HEADER) or None
    model = get(MODEL_ID_HEADER)
    if model:
        model = model.strip()
    version = None
    models_query = None
    body_kind = None
    if not model:
        model, version = model_from_path(path)
        if model is None:
            method = get(":method") or "GET"
            if needs_body(method, path):
                body_kind = "openai"
            elif path == KSERVE_GRPC_INFER_PATH:
                body_kind = "kserve-grpc"
            elif method == "GET" and path.startswith(MODELS_LIST_PATH):
                bare = _strip_query(path)
                if bare == MODELS_LIST_PATH or bare == _MODELS_PREFIX:
                    models_query = ""
                elif bare.startswith(_MODELS_PREFIX):
                    models_query = bare[len(_MODELS_PREFIX) :]
    if priority is not None:
        priority = priority.strip() or None
    return Identity(model, version, priority, path, body_kind, models_query)


def resolve_adapter(routing: RoutingView, name: str) -> AdapterView | None:
    """The LoRA adapter ``name`` is, if it is one: its base ``model`` is what the request is routed
    as, and its ``version`` (None: the model's split) what it pins. None for any other name (a
    model's, or one the mesh does not serve): one dict lookup, as it runs per request."""
    return routing.adapters.get(name)


def parse_body(body: bytes, max_bytes: int = 0) -> BodyInfo:
    """Parse an OpenAI request body once: its ``model`` and the requested-token estimate.

    Raises ``RequestError``: 413 when ``max_bytes`` (> 0) is exceeded, 400 ``invalid_json`` when the
    body is not JSON (the message says where), 400 ``missing_model`` when it has no ``model`` string.
    """
    if max_bytes and len(body) > max_bytes:
        raise body_too_large(len(body), max_bytes)
    if not body:
        raise RequestError(400, "invalid_json", 'the request body is empty; expected a JSON object with a "model"')
    try:
        doc = json.loads(body)
    except json.JSONDecodeError as exc:
        raise RequestError(
            400,
            "invalid_json",
            f"the request body is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})",
        ) from None
    except (ValueError, RecursionError) as exc:  # bad UTF-8, absurd nesting
        raise RequestError(400, "invalid_json", f"the request body is not valid JSON: {exc}") from None
    if type(doc) is not dict:
        raise RequestError(400, "invalid_json", f"the request body must be a JSON object, got a JSON {_json_kind(doc)}")
    model = doc.get("model")
    if type(model) is not str or not model:
        raise RequestError(
            400,
            "missing_model",
            'missing model: the request body has no "model" string '
            f'(name the model in "model" or in {MODEL_ID_HEADER})',
        )
    return BodyInfo(model, estimate_tokens(doc), doc=doc)


def parse_prompt_body(body: bytes, max_bytes: int = 0) -> dict | None:
    """The JSON object of a body read only for its prompt, or None when it is not one (or is larger
    than ``max_bytes``, > 0): never an error, the model is named elsewhere."""
    if not body or (max_bytes and len(body) > max_bytes):
        return None
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):  # JSONDecodeError, bad UTF-8, absurd nesting
        return None
    return doc if type(doc) is dict else None


def model_from_body(body: bytes) -> str:
    """The JSON body's ``model`` string; ``RequestError`` 400 as in ``parse_body``."""
    return parse_body(body).model


def _json_kind(value: object) -> str:
    if isinstance(value, list):
        return "array"
    if isinstance(value, str):
        return "string"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    return "number"


def estimate_tokens(doc: dict) -> int:
    """Requested tokens by the estimate (``extproc/budget.py``: prompt chars / 4, or token-id
    count, plus the output limit)."""
    return requested_tokens(doc)


def parse_kserve_grpc_body(body: bytes, max_bytes: int = 0) -> BodyInfo:
    """``ModelInferRequest.model_name`` (field 1) and ``model_version`` (field 2) from a gRPC body.

    Reads the 5-byte gRPC frame header and the protobuf wire format up to those two fields
    (serializers write fields in number order, so the tensors that follow are never walked).
    Raises ``RequestError`` 400 when the frame is compressed, truncated or has no model name; the
    servicer should answer a gRPC client with the matching grpc-status.
    """
    if max_bytes and len(body) > max_bytes:
        raise body_too_large(len(body), max_bytes)
    if len(body) < 5:
        raise RequestError(400, "invalid_request", "the gRPC request body is shorter than a gRPC frame header")
    if body[0] != 0:
        raise RequestError(
            400,
            "invalid_request",
            f"a compressed gRPC message cannot be routed by its model_name; send the model in {MODEL_ID_HEADER}",
        )
    end = 5 + int.from_bytes(body[1:5], "big")
    if end > len(body):
        end = len(body)
    model = version = None
    pos = 5
    try:
        while pos < end:
            key, pos = _varint(body, pos)
            field, wire = key >> 3, key & 7
            if wire == 2:
                length, pos = _varint(body, pos)
                if field <= 2 and pos + length > end:
                    raise IndexError("truncated field")
                if field == 1:
                    model = body[pos : pos + length].decode()
                elif field == 2:
                    version = body[pos : pos + length].decode()
                pos += length
            elif wire == 0:
                _, pos = _varint(body, pos)
            elif wire == 1:
                pos += 8
            elif wire == 5:
                pos += 4
            else:
                break
            if field >= 2 and model is not None:
                break
    except (IndexError, UnicodeDecodeError):
        raise RequestError(400, "invalid_request", "the gRPC request is not a valid ModelInferRequest") from None
    if not model:
        raise RequestError(400, "missing_model", "missing model: the ModelInferRequest has no model_name")
    return BodyInfo(model, 0, version or None)


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise IndexError("varint too long")


def parse_request_body(kind: str, body: bytes, max_bytes: int = 0) -> BodyInfo:
    """Parse a body of ``Identity.body_kind`` ``kind`` ("openai" or "kserve-grpc")."""
    if kind == "kserve-grpc":
        return parse_kserve_grpc_body(body, max_bytes)
    return parse_body(body, max_bytes)
