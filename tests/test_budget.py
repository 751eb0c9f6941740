"""Token budgets (extproc/budget.py) and the servicer's window check for every request: the cheap
bound from the body's size, the counts (estimate or the model's own tokenizer), and the decision
to read a header- or path-named request's body."""

from __future__ import annotations

import json

import yaml
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ext
from prometheus_client import CollectorRegistry
from tokenizers import Tokenizer

from controlplane.model.mesh_model import build_mesh_model
from controlplane.spec.schema import parse_spec
from controlplane.translate.table import translate_routing_table
from extproc.budget import (
    could_exceed,
    estimate_counter,
    output_tokens,
    prompt_bound,
    requested_tokens,
    tokenizer_counter,
    window_floor,
)
from extproc.mesh_view import MeshView
from extproc.prefix.tokens import TokenizerCache
from extproc.service import ExternalProcessor
from extproc.telemetry import ExtprocMetrics
from protos import mesh_pb2
from tests.kv_fixtures import words, write_tokenizer

WINDOW = 1000


def view_of(models: list[dict], max_body_bytes: int = 1 << 20) -> MeshView:
    """A MeshView of these spec models (each version on one endpoint), all endpoints idle."""
    n = 0
    for model in models:
        for version in model["versions"]:
            n += 1
            version.setdefault("endpoints", [{"address": f"10.0.0.{n}:80", "pool": "p"}])
    spec = {
        "apiVersion": "imesh/v1",
        "kind": "Mesh",
        "pools": [{"name": "p"}],
        "defaults": {"max_body_bytes": max_body_bytes},
        "models": models,
    }
    table = translate_routing_table(build_mesh_model(parse_spec(yaml.safe_dump(spec), "t")))
    view = MeshView()
    view.apply_table(table)
    assert view.routing is not None
    report = mesh_pb2.LoadReport(sequence=1)
    for address in view.routing.endpoints:
        report.endpoints.append(mesh_pb2.EndpointLoad(address=address, age_s=0.05, reachable=True, latency_s=1e-9))
    view.apply_load(report)
    return view


def model(name: str, *windows: int, tokenizer: str = "") -> dict:
    versions = [{"name": f"v{i + 1}", "weight": 100, "context_window": w} for i, w in enumerate(windows)]
    return {"name": name, "versions": versions, **({"tokenizer": tokenizer} if tokenizer else {})}


def headers(path: str = "/v1/chat/completions", method: str = "POST", end: bool = False, **more: str):
    items = {":path": path, ":method": method, **{k.replace("_", "-"): v for k, v in more.items()}}
    values = [base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in items.items()]
    return ext.HttpHeaders(headers=base_pb2.HeaderMap(headers=values), end_of_stream=end)


def asks_for_body(response: ext.ProcessingResponse) -> bool:
    return response.mode_override.request_body_mode == response.mode_override.BUFFERED


def refusal(response: ext.ProcessingResponse) -> str | None:
    """The error code of an immediate response, None for anything else."""
    if not response.HasField("immediate_response"):
        return None
    return json.loads(response.immediate_response.body)["error"]["code"]


def routed(response: ext.ProcessingResponse) -> bool:
    return "envoy.lb" in response.dynamic_metadata.fields


def chat(content: str, max_tokens: int = 0, **extra: object) -> bytes:
    body: dict = {"messages": [{"role": "user", "content": content}], **extra}
    if max_tokens:
        body["max_tokens"] = max_tokens
    return json.dumps(body).encode()


def write_padded_tokenizer(path) -> str:
    """kv_fixtures' tokenizer, saved padded and truncated to 128 tokens, as sentence-transformers
    models ship theirs (all-MiniLM-L6-v2's tokenizer.json does)."""
    tokenizer = Tokenizer.from_file(str(write_tokenizer(path)))
    tokenizer.enable_padding(length=128, pad_id=0, pad_token="[UNK]")
    tokenizer.enable_truncation(max_length=128)
    tokenizer.save(str(path))
    return str(path)


# ----------------------------------------------------------------------------- counting and bounds


def test_the_estimate_counts_prompts_messages_batches_and_kserve_text():
    assert requested_tokens({"messages": [{"content": "x" * 40}, {"content": [{"text": "y" * 8}]}]}) == 12
    assert requested_tokens({"prompt": ["a" * 8, "b" * 80], "max_tokens": 5}) == 25  # a batch: its largest
    assert requested_tokens({"prompt": [1, 2, 3]}) == 3
    kserve = {"inputs": [{"datatype": "BYTES", "data": [["z" * 20], "z" * 20]}, {"datatype": "INT32", "data": [1]}]}
    assert requested_tokens(kserve) == 10
    assert requested_tokens({}) == 0 and output_tokens({"max_completion_tokens": 7, "max_tokens": 9}) == 7


def test_a_tokenizer_counts_what_it_encodes(tmp_path):
    tokenizer = Tokenizer.from_file(str(write_tokenizer(tmp_path / "t.json")))
    count = tokenizer_counter(tokenizer)
    text = words(0, 50) + " a,b.c"  # punctuation splits: more tokens than the words
    expected = len(tokenizer.encode(text).ids)
    assert expected > 50
    assert requested_tokens({"prompt": text, "max_tokens": 3}, count) == expected + 3
    assert requested_tokens({"prompt": [text, "w1"]}, count) == expected
    # Chat: the contents, newline-joined into one sequence.
    messages = [{"role": "system", "content": words(0, 10)}, {"role": "user", "content": words(10, 5)}]
    assert requested_tokens({"messages": messages}, count) == len(tokenizer.encode(words(0, 15)).ids) == 15
    assert requested_tokens({"messages": messages}) == estimate_counter([words(0, 10), words(10, 5)])


def test_a_loaded_tokenizer_neither_pads_nor_truncates(tmp_path):
    path = write_padded_tokenizer(tmp_path / "padded.json")
    assert len(Tokenizer.from_file(path).encode(words(0, 500)).ids) == 128  # as the file says
    tokenizer = TokenizerCache().get(path)
    assert tokenizer is not None
    count = tokenizer_counter(tokenizer)
    assert requested_tokens({"prompt": words(0, 500)}, count) == 500
    assert requested_tokens({"prompt": "w1 w2"}, count) == 2


def test_the_size_bound_is_bytes_for_a_tokenizer_and_a_quarter_for_the_estimate():
    assert prompt_bound(4001, precise=True) == 4001 and prompt_bound(4001, precise=False) == 1001
    assert could_exceed(4001, 1000, precise=False) and not could_exceed(4000, 1000, precise=False)
    assert could_exceed(1001, 1000, precise=True) and not could_exceed(1000, 1000, precise=True)
    assert could_exceed(None, 1000, precise=False)  # chunked: unknown size
    assert could_exceed(900, 1000, precise=True, output=101) and not could_exceed(None, 0, precise=True)


def test_the_window_floor_is_the_smallest_known_window_it_may_reach():
    routing = view_of([model("m", 2000, 0, 1000), model("open", 0)]).routing
    assert routing is not None
    m = routing.models["m"]
    assert window_floor(m, None) == 1000 and window_floor(m, "v1") == 2000 and window_floor(m, "v2") == 0
    assert window_floor(routing.models["open"], None) == 0


# ----------------------------------------------------------------------------- the servicer


def test_a_header_named_body_is_read_only_when_its_size_could_exceed_the_window():
    servicer = ExternalProcessor(view_of([model("m", WINDOW), model("open", 0)]))
    small = headers(x_model_id="m", content_length=str(4 * WINDOW))  # the estimate cannot exceed
    for message in (small, headers(x_model_id="open", content_length="99999"), headers(method="GET", x_model_id="m")):
        _, response = servicer.on_headers(message)
        assert not asks_for_body(response) and routed(response)
    for message in (headers(x_model_id="m", content_length=str(4 * WINDOW + 1)), headers(x_model_id="m")):
        _, response = servicer.on_headers(message)  # larger, or of unknown size (chunked)
        assert asks_for_body(response)


def test_over_long_prompts_are_refused_whether_named_by_header_path_or_body():
    servicer = ExternalProcessor(view_of([model("m", WINDOW)]))
    long_chat = chat("x" * (4 * WINDOW + 4))
    kserve = json.dumps({"inputs": [{"name": "t", "datatype": "BYTES", "shape": [1], "data": ["x" * 4100]}]})
    cases = [
        (headers(x_model_id="m", content_length=str(len(long_chat))), long_chat),
        (headers("/v2/models/m/infer", content_length=str(len(kserve))), kserve.encode()),
        (headers("/v2/models/m/versions/v1/infer"), kserve.encode()),
        (headers(), json.loads(long_chat) | {"model": "m"}),
    ]
    for message, body in cases:
        identity, response = servicer.on_headers(message)
        assert asks_for_body(response)
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        assert refusal(servicer.on_body(identity, raw)) == "context_length_exceeded"
    # The output limit counts: the same prompt fits with 200 more tokens, not with 300.
    identity, _ = servicer.on_headers(headers(x_model_id="m"))
    assert routed(servicer.on_body(identity, chat("x" * 3000, max_tokens=200)))
    identity, _ = servicer.on_headers(headers(x_model_id="m"))
    assert refusal(servicer.on_body(identity, chat("x" * 3000, max_tokens=300))) == "context_length_exceeded"


def test_a_larger_version_takes_what_the_smaller_cannot():
    servicer = ExternalProcessor(view_of([model("m", WINDOW, 4 * WINDOW)]))
    identity, _ = servicer.on_headers(headers(x_model_id="m"))
    response = servicer.on_body(identity, chat("x" * (8 * WINDOW)))
    assert routed(response)
    pinned = {
        h.header.key: h.header.raw_value.decode() for h in response.request_body.response.header_mutation.set_headers
    }
    assert "v2" in pinned.values(), pinned


def test_a_body_over_the_limit_that_could_exceed_the_window_is_413_request_too_large():
    registry = CollectorRegistry()
    servicer = ExternalProcessor(view_of([model("m", WINDOW)], max_body_bytes=8000), metrics=ExtprocMetrics(registry))
    _, response = servicer.on_headers(headers(x_model_id="m", content_length="9000"))
    assert refusal(response) == "request_too_large"
    identity, _ = servicer.on_headers(headers(x_model_id="m"))
    assert refusal(servicer.on_body(identity, chat("x" * 5000))) == "context_length_exceeded"
    reasons = {
        s.labels["reason"]: s.value
        for metric in registry.collect()
        if metric.name == "imesh_extproc_refusals"
        for s in metric.samples
        if s.name.endswith("_total")
    }
    assert reasons == {"request_too_large": 1.0, "context_length_exceeded": 1.0}


def test_with_the_models_tokenizer_the_window_check_counts_its_tokens(tmp_path):
    path = write_padded_tokenizer(tmp_path / "t.json")  # padding and truncation are ignored
    servicer = ExternalProcessor(view_of([model("exact", WINDOW, tokenizer=path), model("rough", WINDOW)]))

    def check(name: str, body: bytes) -> str | None:
        identity, response = servicer.on_headers(headers(x_model_id=name, content_length=str(len(body))))
        answer = servicer.on_body(identity, body) if asks_for_body(response) else response
        return "routed" if routed(answer) else refusal(answer)

    # WINDOW - 2 words: WINDOW - 2 tokens by the tokenizer, but over WINDOW by the character estimate.
    fits = chat(words(0, WINDOW - 2), max_tokens=2)
    assert requested_tokens(json.loads(fits)) > WINDOW
    assert check("exact", fits) == "routed"
    assert check("rough", fits) == "context_length_exceeded"
    assert check("exact", chat(words(0, WINDOW - 1), max_tokens=2)) == "context_length_exceeded"
    # The reverse: punctuation is a token a character for this tokenizer, a quarter for the estimate.
    dense = chat("a," * 600)
    assert requested_tokens(json.loads(dense)) < WINDOW
    assert check("rough", dense) == "routed"  # 1,245 bytes: too small for the estimate to exceed, not read
    assert check("exact", dense) == "context_length_exceeded"
