"""LoRA adapter affinity, end to end: real Envoy, control plane, ext_proc and fleet.

  llama v1: replicas a, b, c, each able to serve the adapter sql-lora (one adapter slot each)

vLLM reports an adapter as active while it has running or waiting requests
(``vllm:lora_requests_info``), so "sql-lora is loaded on b" is a long sql-lora request running on
b, sent to b directly. b is also the busiest: it runs two long base-model requests besides, a and c
one each. Then sql-lora requests through the mesh (named in the body or in x-model-id) still go to
b: the adapter being active there outweighs a little load. Without the lora-affinity scorer they go
to a and c (b serves about none; checked by turning the scorer off). Base-model requests spread
over all three: the scorer rates only requests that name an adapter.

The adapters' load time is short here (1 ms): a replica that paid a long load would look slow to
the latency scorer for a while, which also keeps adapter requests off it; this test isolates
what lora-affinity itself does.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from imesh.client import MeshClient
from tests.harness import Replica, chat, make_mesh, send_many, wait_for_queues, wait_until

if TYPE_CHECKING:
    from tests.harness import TestMesh  # not imported at run time: pytest would try to collect it

ADAPTER = "sql-lora"
REPLICAS = [Replica("a", "llama", "v1"), Replica("b", "llama", "v1"), Replica("c", "llama", "v1")]
ADAPTER_REQUESTS = 20
TOKENS = 16  # of every request the test times; the latency scorer compares like with like
LONG_TOKENS = 8000  # at time scale 1 (8 ms a step) about a minute: longer than the test


@pytest.fixture(scope="module")
def mesh(tmp_path_factory) -> Iterator[TestMesh]:
    workdir = tmp_path_factory.mktemp("lora")
    test_mesh = make_mesh(workdir, [Replica(**vars(r)) for r in REPLICAS], time_scale=1.0)
    fleet = yaml.safe_load((workdir / "fleet.yaml").read_text())
    for replica in fleet["replicas"]:
        replica["adapters"] = [ADAPTER]
        replica["overrides"] = {"max_loras": 1, "adapter_load_s": 0.001}
    (workdir / "fleet.yaml").write_text(yaml.safe_dump(fleet))
    test_mesh.spec["models"][0]["versions"][0]["adapters"] = [ADAPTER]
    test_mesh.save_spec()
    with test_mesh.mesh:
        test_mesh.mesh.wait_for_completion("llama")
        yield test_mesh


class LongRequest:
    """A streamed completion sent straight to one replica, held open until ``close``."""

    def __init__(self, address: str, model: str):
        self._started = threading.Event()
        self._stop = threading.Event()
        body = {"model": model, "prompt": "hold", "max_tokens": LONG_TOKENS, "stream": True}
        self._thread = threading.Thread(target=self._run, args=(f"http://{address}/v1/completions", body))
        self._thread.start()
        assert self._started.wait(30), f"no first token from {address}"

    def _run(self, url: str, body: dict) -> None:
        with httpx.Client(timeout=30) as client, client.stream("POST", url, json=body) as response:
            for _ in response.iter_lines():
                self._started.set()
                if self._stop.is_set():
                    return  # closing the stream aborts the sequence on the replica

    def close(self) -> None:
        self._stop.set()
        self._thread.join(30)


def lora_state(test_mesh: TestMesh, name: str) -> dict:
    state = httpx.get(f"http://{test_mesh.replica(name).address}/sim/state", timeout=5).json()
    return {"running": state["running"], "adapters": state["lora"]["running_adapters"]}


def wait_for_adapters(test_mesh: TestMesh, adapters: dict[str, list[str]]) -> None:
    """Block until the control plane's load report shows each replica's active adapters as given
    and the ext_proc holds a load report sent after that."""
    want = {test_mesh.replica(name).address: active for name, active in adapters.items()}
    with MeshClient(test_mesh.mesh.control_plane_address) as client:

        def seen() -> bool:
            load = {e.address: list(e.adapters) for e in client.status().load.endpoints}
            return all(load.get(address) == active for address, active in want.items())

        wait_until(seen, what=f"the control plane reading the adapters {adapters}")
    wait_for_queues(test_mesh, dict.fromkeys(adapters, 0))  # and a later report at the ext_proc


def served(test_mesh: TestMesh, responses: list[httpx.Response]) -> collections.Counter:
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200]
    assert {r.headers["x-imesh-model"] for r in responses} == {"llama"}
    by_address = {r.address: r.name for r in test_mesh.replicas}
    return collections.Counter(by_address[r.headers["x-imesh-endpoint"]] for r in responses)


def report_after(test_mesh: TestMesh, moment: float) -> None:
    """Block until the ext_proc holds a load report whose readings were scraped after ``moment``
    (monotonic): reports come on every change and at least once per scrape interval."""
    url = f"http://{test_mesh.mesh.ports.host}:{test_mesh.mesh.ports.extproc_metrics}/metrics"
    seen_at = moment + 2 * test_mesh.mesh.scrape_interval_s

    def received_after() -> bool:
        asked_at = time.monotonic()
        text = httpx.get(url, timeout=5).text
        (age,) = [
            s.value
            for family in text_string_to_metric_families(text)
            if family.name == "imesh_extproc_load_report_age_seconds"
            for s in family.samples
        ]
        return asked_at - age > seen_at

    wait_until(received_after, what="a load report reaching the ext_proc")


def one_at_a_time(test_mesh: TestMesh, n: int, make_request) -> list[httpx.Response]:
    """``n`` requests in turn, each once the ext_proc has the load as it was after the one before:
    every request is a fresh decision on equal terms, not a trade against its predecessor in flight."""
    responses = []
    with httpx.Client(base_url=test_mesh.url, timeout=30) as client:
        for i in range(n):
            responses.append(make_request(client, i))
            report_after(test_mesh, time.monotonic())
    return responses


def adapter_request(client: httpx.Client, i: int) -> httpx.Response:
    if i % 2:  # named in x-model-id, the body naming none: resolved the same way
        return client.post("/v1/chat/completions", headers={"x-model-id": ADAPTER}, json=chat(None, max_tokens=TOKENS))
    return client.post("/v1/chat/completions", json=chat(ADAPTER, max_tokens=TOKENS))


def warm_latency(test_mesh: TestMesh) -> None:
    """A few short requests straight to each replica, so that the mesh knows every replica's recent
    latency (an unknown one scores neutral, below a known one) before the test compares them."""
    for replica in test_mesh.replicas:
        for _ in range(3):
            body = chat("llama", max_tokens=TOKENS)
            response = httpx.post(f"http://{replica.address}/v1/chat/completions", json=body, timeout=30)
            assert response.status_code == 200, response.text


def base_request(client: httpx.Client, i: int) -> httpx.Response:
    return client.post("/v1/chat/completions", json=chat("llama", max_tokens=TOKENS))


def test_adapter_requests_go_to_the_replica_with_the_adapter_loaded(mesh):
    warm_latency(mesh)
    holds = [LongRequest(mesh.replica("b").address, ADAPTER)]
    try:
        holds += [LongRequest(mesh.replica(name).address, "llama") for name in ("a", "b", "b", "c")]
        wait_for_adapters(mesh, {"a": [], "b": [ADAPTER], "c": []})
        adapter = served(mesh, one_at_a_time(mesh, ADAPTER_REQUESTS, adapter_request))
        base = served(mesh, send_many(mesh.url, 60, base_request, concurrency=6))
        # The premise held throughout: the long requests still run, sql-lora on b only.
        assert [lora_state(mesh, name) for name in ("a", "b", "c")] == [
            {"running": 1, "adapters": []},
            {"running": 3, "adapters": [ADAPTER]},
            {"running": 1, "adapters": []},
        ]
    finally:
        for hold in holds:
            hold.close()
    assert adapter["b"] >= 0.8 * ADAPTER_REQUESTS, adapter
    # The base model's requests spread over all three; holding sql-lora does not draw them to b.
    assert all(base[name] >= 6 for name in ("a", "b", "c")), base
    assert base["b"] < 30, base
