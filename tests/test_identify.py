"""Request identification, error envelopes and the routing/load views built from the protos."""

from __future__ import annotations

import json
import math

import pytest

from extproc.errors import RequestError
from extproc.identify import estimate_tokens, identify, model_from_body, model_from_path, needs_body, parse_body
from extproc.routing_view import LoadView, RoutingView
from protos import mesh_pb2


def _table(**kwargs) -> mesh_pb2.RoutingTable:
    table = mesh_pb2.RoutingTable(
        version=7,
        models=[
            mesh_pb2.Model(
                name="llama",
                versions=[
                    mesh_pb2.ModelVersion(
                        name="v1",
                        weight=90,
                        cluster="llama/v1",
                        context_window=8192,
                        endpoints=[mesh_pb2.Endpoint(address="10.0.0.1:8000", pool="a100", tier="low-latency")],
                    ),
                    mesh_pb2.ModelVersion(
                        name="v2",
                        weight=10,
                        cluster="llama/v2",
                        endpoints=[mesh_pb2.Endpoint(address="10.0.0.2:8000", pool="l4", tier="cost-effective")],
                    ),
                ],
            ),
            mesh_pb2.Model(name="bert", versions=[mesh_pb2.ModelVersion(name="1", weight=100, cluster="bert/1")]),
        ],
        priorities=[
            mesh_pb2.PriorityClass(name="critical", rank=0, preferred_tiers=["low-latency"]),
            mesh_pb2.PriorityClass(name="standard", rank=1),
            mesh_pb2.PriorityClass(name="sheddable", rank=2, shed_threshold=0.5),
        ],
        default_priority="standard",
        max_body_bytes=1024,
    )
    for key, value in kwargs.items():
        setattr(table, key, value)
    return table


# ----------------------------------------------------------------------------- identify


def test_header_names_the_model_even_on_openai_and_kserve_paths():
    ident = identify({":method": "POST", ":path": "/v1/chat/completions", "x-model-id": "llama"})
    assert ident.model == "llama" and ident.version is None and not ident.needs_body

    # The header wins over the path, and its whole value is the name (no version split).
    ident = identify({":method": "POST", ":path": "/v2/models/bert/infer", "x-model-id": "llama:v2"})
    assert ident.model == "llama:v2" and ident.version is None


def test_kserve_path_names_the_model_and_pins_a_version():
    assert model_from_path("/v2/models/bert/infer") == ("bert", None)
    assert model_from_path("/v2/models/bert/versions/3/infer") == ("bert", "3")
    assert model_from_path("/v2/models/bert/versions/3/infer?x=1") == ("bert", "3")
    assert model_from_path("/v2/models/bert") == ("bert", None)
    assert model_from_path("/v2/models/my%2Dmodel/ready") == ("my-model", None)
    assert model_from_path("/v2/models/") == (None, None)
    assert model_from_path("/v2/health/ready") == (None, None)

    ident = identify({":method": "POST", ":path": "/v2/models/bert/versions/3/infer"})
    assert (ident.model, ident.version, ident.needs_body) == ("bert", "3", False)


def test_openai_posts_need_the_body_and_nothing_else_does():
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/completions?stream=1"):
        assert needs_body("POST", path)
        ident = identify({":method": "POST", ":path": path})
        assert ident.model is None and ident.needs_body
    assert not needs_body("GET", "/v1/chat/completions")
    assert not needs_body("POST", "/v1/other")
    ident = identify({":method": "GET", ":path": "/healthz"})
    assert ident.model is None and not ident.needs_body and ident.models_query is None


def test_models_listing_requests_are_recognised():
    assert identify({":method": "GET", ":path": "/v1/models"}).models_query == ""
    assert identify({":method": "GET", ":path": "/v1/models/llama"}).models_query == "llama"
    assert identify({":method": "POST", ":path": "/v1/models"}).models_query is None


def test_model_from_body_and_token_estimate():
    body = json.dumps(
        {"model": "llama", "messages": [{"role": "user", "content": "x" * 400}], "max_tokens": 100}
    ).encode()
    info = parse_body(body)
    assert info.model == "llama"
    assert info.tokens == 100 + 100  # 400 chars / 4 + max_tokens
    assert model_from_body(body) == "llama"

    # Multi-part content, max_completion_tokens preferred over max_tokens.
    doc = {
        "messages": [{"role": "user", "content": [{"type": "text", "text": "y" * 40}, {"type": "image_url"}]}],
        "max_completion_tokens": 5,
        "max_tokens": 999,
    }
    assert estimate_tokens(doc) == 15
    # Completions: a batch of prompts counts its largest; token ids count one each.
    assert estimate_tokens({"prompt": ["a" * 8, "b" * 80]}) == 20
    assert estimate_tokens({"prompt": [1, 2, 3, 4, 5]}) == 5
    assert estimate_tokens({"input": "z" * 12}) == 3
    assert estimate_tokens({}) == 0


@pytest.mark.parametrize("body", [b"{not json", b'{"model": "llama",}', b"\xff\xfe", b"", b"[1, 2"])
def test_malformed_json_is_400_with_the_envelope(body):
    with pytest.raises(RequestError) as info:
        parse_body(body)
    err = info.value
    assert err.status == 400 and err.code == "invalid_json"
    envelope = json.loads(err.envelope())
    assert envelope["error"]["type"] == "invalid_request_error"
    assert envelope["error"]["code"] == "invalid_json"
    assert "JSON" in envelope["error"]["message"]
    assert err.retry_after is None
    status, headers, rendered = err.render()
    assert status == 400 and ("content-type", "application/json") in headers and rendered == err.body


def test_malformed_json_message_says_where():
    with pytest.raises(RequestError) as info:
        parse_body(b'{"model": "llama",\n "x": }')
    assert "line 2" in info.value.message


def test_missing_model_is_400():
    for body in (b'{"messages": []}', b'{"model": 5}', b'{"model": ""}'):
        with pytest.raises(RequestError) as info:
            parse_body(body)
        assert info.value.status == 400 and info.value.code == "missing_model"
        assert "missing model" in json.loads(info.value.body)["error"]["message"]
    with pytest.raises(RequestError) as info:
        parse_body(b'["model"]')
    assert info.value.status == 400 and "array" in info.value.message


def test_body_over_the_limit_is_413():
    with pytest.raises(RequestError) as info:
        parse_body(b'{"model": "llama", "prompt": "' + b"x" * 2000 + b'"}', max_bytes=1024)
    assert info.value.status == 413


def test_priority_header_and_default():
    routing = RoutingView.from_proto(_table())
    assert identify({":path": "/", "x-priority": "critical"}).priority == "critical"
    assert identify({":path": "/"}).priority is None
    assert routing.priority("critical").name == "critical"
    assert routing.priority(None).name == "standard"
    # Unknown class names fall back to the default class; they are not an error.
    assert routing.priority("platinum").name == "standard"


def test_retry_after_on_429_and_503():
    shed = RequestError(429, "overloaded", "busy")
    assert shed.type == "rate_limit_error" and shed.retry_after == "1"
    assert ("retry-after", "1") in shed.headers()
    down = RequestError(503, "no_capacity", "none", retry_after_s=2.5)
    assert down.type == "service_unavailable" and down.retry_after == "3"
    assert RequestError(404, "model_not_found", "no").type == "not_found_error"


# ----------------------------------------------------------------------------- views


def test_routing_view_precomputes_what_requests_read():
    routing = RoutingView.from_proto(_table())
    assert routing.version == 7 and routing.max_body_bytes == 1024
    llama = routing.model("llama")
    assert [v.name for v in llama.routed] == ["v1", "v2"]
    assert llama.version("v1").context_window == 8192 and llama.version("v1").cluster == "llama/v1"
    ep = routing.endpoints["10.0.0.2:8000"]
    assert (ep.model, ep.version, ep.pool, ep.tier) == ("llama", "v2", "l4", "cost-effective")
    assert [p.name for p in routing.priority_order] == ["critical", "standard", "sheddable"]
    listing = json.loads(routing.models_list_body)
    assert listing == {
        "object": "list",
        "data": [
            {"id": "llama", "object": "model", "created": 0, "owned_by": "inference-mesh"},
            {"id": "bert", "object": "model", "created": 0, "owned_by": "inference-mesh"},
        ],
    }
    assert json.loads(llama.openai_body)["id"] == "llama"
    # No Scoring in the table: the spec's defaults, never zero thresholds.
    assert routing.scoring.saturation_queue == 5.0 and routing.scoring.queue_weight == 2.0


def test_routing_view_without_the_default_class_synthesises_one():
    routing = RoutingView.from_proto(mesh_pb2.RoutingTable(default_priority="standard"))
    assert routing.priority("anything").name == "standard"
    assert routing.default_priority.shed_threshold == 0


def test_load_view_ages_readings():
    report = mesh_pb2.LoadReport(
        sequence=3,
        endpoints=[
            mesh_pb2.EndpointLoad(address="a:1", waiting=2, kv_cache=0.5, age_s=0.25, reachable=True),
            mesh_pb2.EndpointLoad(address="b:1", age_s=math.inf, reachable=False),
        ],
    )
    load = LoadView.from_proto(report, received_at=100.0)
    assert load.sequence == 3
    assert load.get("a:1").age(101.0) == pytest.approx(1.25)
    assert load.get("a:1").waiting == 2
    assert load.get("b:1").age(100.0) == math.inf and not load.get("b:1").reachable


# ----------------------------------------------------------------------------- KServe v2 gRPC


def _grpc_frame(message: bytes, compressed: bool = False) -> bytes:
    return bytes([1 if compressed else 0]) + len(message).to_bytes(4, "big") + message


def _model_infer_request(name: str, version: str = "") -> bytes:
    # ModelInferRequest wire format by hand: model_name = 1, model_version = 2, id = 3,
    # raw_input_contents = 7 (a tensor that must not be walked).
    def field(number: int, value: bytes) -> bytes:
        return bytes([number << 3 | 2, len(value)]) + value

    out = field(1, name.encode())
    if version:
        out += field(2, version.encode())
    return out + field(3, b"req-1") + field(7, b"\x00" * 100)


def test_kserve_grpc_model_from_body():
    from extproc.identify import parse_kserve_grpc_body, parse_request_body

    ident = identify({":method": "POST", ":path": "/inference.GRPCInferenceService/ModelInfer"})
    assert ident.model is None and ident.needs_body and ident.body_kind == "kserve-grpc"
    info = parse_request_body(ident.body_kind, _grpc_frame(_model_infer_request("bert", "3")))
    assert (info.model, info.version, info.tokens) == ("bert", "3", 0)
    assert parse_kserve_grpc_body(_grpc_frame(_model_infer_request("bert"))).version is None
    # A header still wins, no body phase.
    assert not identify(
        {":method": "POST", ":path": "/inference.GRPCInferenceService/ModelInfer", "x-model-id": "bert"}
    ).needs_body
    for bad in (b"\x00\x00", _grpc_frame(b"\x0a\x05be"), _grpc_frame(_model_infer_request("bert"), compressed=True)):
        with pytest.raises(RequestError) as info:
            parse_kserve_grpc_body(bad)
        assert info.value.status == 400
    with pytest.raises(RequestError) as info:
        parse_kserve_grpc_body(_grpc_frame(b"\x1a\x01x"))  # only an id
    assert info.value.code == "missing_model"


def test_kserve_grpc_parser_agrees_with_the_real_message():
    service_pb2 = pytest.importorskip("tritonclient.grpc.service_pb2")
    from extproc.identify import parse_kserve_grpc_body

    request = service_pb2.ModelInferRequest(model_name="resnet", model_version="2", id="x")
    request.inputs.add(name="in", datatype="FP32", shape=[1, 3])
    request.raw_input_contents.append(b"\x01" * 12)
    info = parse_kserve_grpc_body(_grpc_frame(request.SerializeToString()))
    assert (info.model, info.version) == ("resnet", "2")
