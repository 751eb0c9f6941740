"""The wire contract: what the control plane tells Envoy and what the ext_proc tells Envoy agree.

Both sides import the names from protos/wire.py; these tests check the places where their outputs
meet, spelled out as literals where the wire fixes them (docs/contracts.md).
"""

from __future__ import annotations

import json

from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.extensions.load_balancing_policies.override_host.v3 import override_host_pb2
from google.protobuf import json_format

from controlplane.model.mesh_model import build_mesh_model
from controlplane.spec.schema import parse_spec
from controlplane.translate.envoy import translate
from controlplane.translate.table import translate_routing_table
from extproc.errors import RequestError
from extproc.responses import immediate, route_mutation, routed
from extproc.routing_view import RoutingView

SPEC = """
defaults: {version_header: x-model-version}
pools: [{name: p}]
models:
  - name: llama
    ab: {allow_version_override: true}
    versions: [{name: v1, endpoints: [{address: 10.0.0.1:8000, pool: p}]}]
  - name: bert
    versions: [{name: "1", endpoints: [{address: 10.0.0.2:8000, pool: p}]}]
"""


def _mesh():
    model = build_mesh_model(parse_spec(SPEC))
    return translate(model), RoutingView.from_proto(translate_routing_table(model))


def _routes(resources):
    return {r.name: r for r in resources.routes["imesh_routes"].virtual_hosts[0].routes}


def test_envoy_and_extproc_error_bodies_are_the_same_bytes():
    routes = _routes(_mesh()[0])
    for name in ("unknown-model", "llama/forced-unknown"):
        reply = routes[name].direct_response
        body = reply.body.inline_string
        error = json.loads(body)["error"]
        assert set(error) == {"type", "message", "code"}
        assert error["code"] == "model_not_found" and error["type"] == "not_found_error"
        # The ext_proc answering the same error (status, code, message) sends the same bytes.
        assert RequestError(reply.status, error["code"], error["message"]).envelope() == body.encode()
        sent = immediate(RequestError(reply.status, error["code"], error["message"])).immediate_response
        assert sent.body == body.encode() and sent.status.code == reply.status == 404


def test_envoys_own_failures_use_the_same_envelope():
    manager = hcm_pb2.HttpConnectionManager()
    _mesh()[0].listeners["imesh_http"].filter_chains[0].filters[0].typed_config.Unpack(manager)
    (mapper,) = manager.local_reply_config.mappers
    envelope = json_format.MessageToDict(mapper.body_format_override.json_format)
    assert mapper.status_code.value == 503
    assert set(envelope) == {"error"} and set(envelope["error"]) == {"type", "message", "code"}
    assert envelope["error"]["type"] == RequestError(503, "no_capacity", "").type == "service_unavailable"


def test_models_listing_and_entry_agree():
    resources, routing = _mesh()
    listing = _routes(resources)["models-list"].direct_response.body.inline_string
    assert listing.encode() == routing.models_list_body  # Envoy's route and the ext_proc's view, byte for byte
    entries = json.loads(listing)["data"]
    assert entries == [
        {"id": "llama", "object": "model", "created": 0, "owned_by": "inference-mesh"},
        {"id": "bert", "object": "model", "created": 0, "owned_by": "inference-mesh"},
    ]
    assert [json.loads(routing.model(e["id"]).openai_body) for e in entries] == entries


def test_the_pick_lands_where_override_host_reads_it():
    resources, _ = _mesh()
    lb = override_host_pb2.OverrideHost()
    resources.clusters["llama/v1"].load_balancing_policy.policies[0].typed_extension_config.typed_config.Unpack(lb)
    (source,) = lb.override_host_sources
    assert (source.metadata.key, [p.key for p in source.metadata.path]) == ("envoy.lb", ["x-imesh-endpoint"])
    response = routed(route_mutation("llama"), "10.0.0.1:8000,10.0.0.9:1", body_phase=False)
    picked = response.dynamic_metadata.fields[source.metadata.key].struct_value.fields[source.metadata.path[0].key]
    assert picked.string_value == "10.0.0.1:8000,10.0.0.9:1"


def test_the_route_headers_the_extproc_sets_are_the_ones_the_routes_match():
    routes = _routes(_mesh()[0])
    matched = {(h.name, h.string_match.exact) for h in routes["llama/v1/pinned"].match.headers}
    pinned = route_mutation("llama", "v1").header_mutation.set_headers
    assert {(h.header.key, h.header.raw_value.decode()) for h in pinned} == matched
    assert matched == {("x-imesh-model", "llama"), ("x-imesh-version", "v1")}
    assert {h.name for h in routes["llama/header"].match.headers} == {"x-model-id"}
