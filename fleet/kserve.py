"""KServe v2 (Open Inference Protocol) REST routes of a replica.

Enough of the protocol for the mesh's routing and for ``tritonclient.http`` to interoperate:
server and model health, model metadata, and ``infer`` (plain JSON tensors and the binary
tensor data extension). Inference echoes each input tensor back as an output, so results
are deterministic, and goes through the engine queue as a short request (prompt sized by
the tensor, one output token), so KServe traffic loads a replica like chat traffic does.
"""

from __future__ import annotations

import json
import math
import struct
from typing import Any

from aiohttp import web

from fleet.context import ServingReplica, replica_of
from fleet.errors import ApiError

HEADER_LEN = "Inference-Header-Content-Length"

# struct codes of the fixed-size datatypes; BF16 is handled by bit shifting FP32.
_FORMATS = {
    "BOOL": "?",
    "UINT8": "B",
    "UINT16": "H",
    "UINT32": "I",
    "UINT64": "Q",
    "INT8": "b",
    "INT16": "h",
    "INT32": "i",
    "INT64": "q",
    "FP16": "e",
    "FP32": "f",
    "FP64": "d",
}
DATATYPES = frozenset(_FORMATS) | {"BF16", "BYTES"}


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/v2", server_metadata)
    r.add_get("/v2/health/live", live)
    r.add_get("/v2/health/ready", ready)
    r.add_get("/v2/models/{name}", model_metadata)
    r.add_get("/v2/models/{name}/versions/{version}", model_metadata)
    r.add_get("/v2/models/{name}/ready", model_ready)
    r.add_get("/v2/models/{name}/versions/{version}/ready", model_ready)
    r.add_post("/v2/models/{name}/infer", infer)
    r.add_post("/v2/models/{name}/versions/{version}/infer", infer)


def _model(replica: ServingReplica, request: web.Request) -> tuple[str, str]:
    """(model, version) of the path; 404 if this replica does not serve them."""
    name = request.match_info["name"]
    version = request.match_info.get("version")
    if name not in replica.models:
        raise ApiError(404, f"Request for unknown model: '{name}' is not found")
    if version is not None and replica.version is not None and version != replica.version:
        raise ApiError(404, f"Request for unknown model: '{name}' version {version} is not found")
    return name, version or replica.version or "1"


async def server_metadata(request: web.Request) -> web.Response:
    return web.json_response(
        {"name": "imesh-fleet", "version": "0.1.0", "extensions": ["binary_tensor_data", "model_repository"]}
    )


async def live(request: web.Request) -> web.Response:
    return web.json_response({"live": True})


async def ready(request: web.Request) -> web.Response:
    ok = replica_of(request).ready
    return web.json_response({"ready": ok}, status=200 if ok else 503)


async def model_metadata(request: web.Request) -> web.Response:
    replica = replica_of(request)
    name, version = _model(replica, request)
    return web.json_response(
        {
            "name": name,
            "versions": [version],
            "platform": "imesh-sim",
            "inputs": [{"name": "INPUT0", "datatype": "BYTES", "shape": [-1]}],
            "outputs": [{"name": "OUTPUT0", "datatype": "BYTES", "shape": [-1]}],
        }
    )


async def model_ready(request: web.Request) -> web.Response:
    replica = replica_of(request)
    name, version = _model(replica, request)
    ok = replica.ready
    return web.json_response({"name": name, "version": version, "ready": ok}, status=200 if ok else 503)


# ---- tensors ------------------------------------------------------------------------------


class Tensor:
    """An input tensor: its data as JSON values or as the raw bytes of the binary extension."""

    __slots__ = ("name", "datatype", "shape", "data", "raw")

    def __init__(self, name: str, datatype: str, shape: list[int], data: list[Any] | None, raw: bytes | None):
        self.name, self.datatype, self.shape, self.data, self.raw = name, datatype, shape, data, raw

    @property
    def count(self) -> int:
        return math.prod(self.shape)

    def values(self) -> list[Any]:
        """Flat JSON values (decoding binary data when needed)."""
        if self.data is not None:
            return self.data
        assert self.raw is not None
        if self.datatype == "BYTES":
            out, pos = [], 0
            while pos < len(self.raw):
                (n,) = struct.unpack_from("<I", self.raw, pos)
                out.append(self.raw[pos + 4 : pos + 4 + n].decode("utf-8", "replace"))
                pos += 4 + n
            return out
        if self.datatype == "BF16":
            halves = struct.unpack(f"<{self.count}H", self.raw)
            return [struct.unpack("<f", struct.pack("<I", h << 16))[0] for h in halves]
        return list(struct.unpack(f"<{self.count}{_FORMATS[self.datatype]}", self.raw))

    def binary(self) -> bytes:
        """The tensor in the binary extension's layout."""
        if self.raw is not None:
            return self.raw
        data = self.values()
        if self.datatype == "BYTES":
            parts = [(v if isinstance(v, str) else json.dumps(v)).encode() for v in data]
            return b"".join(struct.pack("<I", len(p)) + p for p in parts)
        if self.datatype == "BF16":
            return b"".join(struct.pack("<H", struct.unpack("<I", struct.pack("<f", v))[0] >> 16) for v in data)
        return struct.pack(f"<{len(data)}{_FORMATS[self.datatype]}", *data)


def _flatten(value: Any) -> list[Any]:
    if not isinstance(value, list):
        return [value]
    out: list[Any] = []
    for v in value:
        out.extend(_flatten(v))
    return out


def parse_request(raw: bytes, header_len: str | None) -> tuple[dict[str, Any], list[Tensor]]:
    """Parse an infer request body (JSON, optionally followed by binary tensor data)."""
    if header_len is not None:
        if not header_len.isdigit() or int(header_len) > len(raw):
            raise ApiError(400, f"invalid {HEADER_LEN}: {header_len!r}")
        json_part, blob = raw[: int(header_len)], raw[int(header_len) :]
    else:
        json_part, blob = raw, b""
    try:
        body = json.loads(json_part)
    except ValueError as exc:
        raise ApiError(400, f"failed to parse the request JSON: {exc}") from None
    if not isinstance(body, dict) or not isinstance(body.get("inputs"), list) or not body["inputs"]:
        raise ApiError(400, "the request must be a JSON object with a non-empty `inputs` list")
    tensors, pos = [], 0
    for i, inp in enumerate(body["inputs"]):
        where = f"inputs[{i}]"
        if not isinstance(inp, dict) or not isinstance(inp.get("name"), str):
            raise ApiError(400, f"{where} must be an object with a string `name`")
        dtype, shape = inp.get("datatype"), inp.get("shape")
        if dtype not in DATATYPES:
            raise ApiError(400, f"{where}: unsupported datatype {dtype!r}")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise ApiError(400, f"{where}: `shape` must be a list of non-negative integers")
        size = (inp.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or size < 0 or pos + size > len(blob):
                raise ApiError(400, f"{where}: binary_data_size {size!r} exceeds the binary data")
            t = Tensor(inp["name"], dtype, shape, None, blob[pos : pos + size])
            pos += size
            if dtype not in ("BYTES",) and len(t.raw or b"") != t.count * (
                2 if dtype == "BF16" else struct.calcsize(_FORMATS[dtype])
            ):
                raise ApiError(400, f"{where}: {size} bytes do not match shape {shape} of {dtype}")
        else:
            if "data" not in inp:
                raise ApiError(400, f"{where}: missing `data`")
            data = _flatten(inp["data"])
            t = Tensor(inp["name"], dtype, shape, data, None)
            if len(data) != t.count:
                raise ApiError(400, f"{where}: {len(data)} values do not match shape {shape}")
        tensors.append(t)
    return body, tensors


async def infer(request: web.Request) -> web.Response:
    replica = replica_of(request)
    name, version = _model(replica, request)
    body, tensors = parse_request(await request.read(), request.headers.get(HEADER_LEN))

    requested = body.get("outputs")
    if requested is not None and (
        not isinstance(requested, list)
        or not all(isinstance(o, dict) and isinstance(o.get("name"), str) for o in requested)
    ):
        raise ApiError(400, "`outputs` must be a list of objects with a string `name`")
    binary_default = bool((body.get("parameters") or {}).get("binary_data_output"))
    if requested:
        outs = [(o["name"], bool((o.get("parameters") or {}).get("binary_data", binary_default))) for o in requested]
    else:
        outs = [(f"OUTPUT{i}", binary_default) for i in range(len(tensors))]

    # A short engine request: ~4 tensor elements per "token", one output token, and no
    # prefix caching (tensors are not prompts).
    prompt = min(max(1, sum(t.count for t in tensors) // 4), max(1, replica.profile.max_model_len - 1))
    replica.engine.check_fits(prompt, 1)
    await replica.apply_faults()
    seq = replica.engine.submit(name, prompt, [], 1)
    try:
        await seq.wait()
    finally:
        replica.engine.abort(seq)

    json_outputs, blobs = [], []
    for k, (out_name, as_binary) in enumerate(outs):
        src = tensors[min(k, len(tensors) - 1)]
        out: dict[str, Any] = {"name": out_name, "datatype": src.datatype, "shape": src.shape}
        if as_binary:
            blob = src.binary()
            out["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            out["data"] = src.values()
        json_outputs.append(out)
    result: dict[str, Any] = {"model_name": name, "model_version": version, "outputs": json_outputs}
    if "id" in body:
        result["id"] = body["id"]
    header = json.dumps(result, separators=(",", ":")).encode()
    if not blobs:
        return web.Response(body=header, content_type="application/json")
    return web.Response(
        body=header + b"".join(blobs),
        headers={HEADER_LEN: str(len(header)), "Content-Type": "application/octet-stream"},
    )
