"""Token budgets end to end (real Envoy, control plane, ext_proc and simulated fleet): a prompt
longer than the model's context window is refused with 413 before any replica sees it, whether the
model is named by header, KServe path or body; with the model's tokenizer the mesh counts what
that tokenizer counts.

  chat   v1 (chat-a): the character estimate; window 4096 (the replica's own limit is 8192, so it
         would serve what the mesh lets through)
  exact  v1 (exact-a): the spec names the tokenizer.json the replica tokenizes with; window 4096
"""

from __future__ import annotations

import httpx
import pytest

from tests.harness import Replica, chat, make_mesh
from tests.kv_fixtures import words, write_tokenizer

WINDOW = 4096  # the harness's context_window
LONG = "lorem " * 4000  # 24,000 characters: about 6,000 tokens by the estimate, under the replica's 8,192


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("budgets")
    tokenizer = str(write_tokenizer(workdir / "tokenizer.json"))
    test_mesh = make_mesh(
        workdir, [Replica("chat-a", "chat", "v1"), Replica("exact-a", "exact", "v1", tokenizer=tokenizer)]
    )
    exact = next(m for m in test_mesh.spec["models"] if m["name"] == "exact")
    exact["tokenizer"] = tokenizer
    test_mesh.save_spec()
    with test_mesh.mesh:
        test_mesh.mesh.wait_for_completion("chat")
        test_mesh.mesh.wait_for_completion("exact")
        yield test_mesh


@pytest.fixture
def client(mesh):
    with httpx.Client(base_url=mesh.url, timeout=30) as http:
        yield http


def served(mesh, name: str) -> int:
    return httpx.get(f"http://{mesh.replica(name).address}/sim/state", timeout=5).json()["served"]


def assert_refused(response: httpx.Response) -> None:
    assert response.status_code == 413, response.text
    assert response.json()["error"]["code"] == "context_length_exceeded"
    assert "x-sim-replica" not in response.headers  # no replica answered


def kserve_text(text: str) -> dict:
    return {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": [text]}]}


def test_over_long_prompts_are_refused_before_any_replica_by_header_path_and_body(mesh, client):
    before = served(mesh, "chat-a")
    by_header = client.post("/v1/chat/completions", headers={"x-model-id": "chat"}, json=chat(None, LONG))
    assert_refused(by_header)
    assert_refused(client.post("/v1/completions", headers={"x-model-id": "chat"}, json={"prompt": LONG}))
    assert_refused(client.post("/v2/models/chat/infer", json=kserve_text(LONG)))
    assert_refused(client.post("/v2/models/chat/versions/v1/infer", json=kserve_text(LONG)))
    assert_refused(client.post("/v1/chat/completions", json=chat("chat", LONG)))

    def chunked(prompt: str, max_tokens: int = 2) -> httpx.Response:  # no Content-Length: always read
        parts = (b'{"prompt": "', prompt.encode(), b'", "max_tokens": %d}' % max_tokens)
        return client.post("/v1/completions", headers={"x-model-id": "chat"}, content=iter(parts))

    assert_refused(chunked(LONG))
    # Once the body is read the output limit counts too: this prompt fits, prompt + max_tokens not.
    prompt = "lorem " * 2400  # 3,600 tokens by the estimate
    assert_refused(chunked(prompt, max_tokens=600))
    assert served(mesh, "chat-a") == before

    fits = chunked(prompt, max_tokens=2)
    assert fits.status_code == 200, fits.text
    assert fits.headers["x-sim-replica"] == "chat-a"
    kserve = client.post("/v2/models/chat/infer", json=kserve_text("lorem " * 100))
    assert kserve.status_code == 200, kserve.text
    assert served(mesh, "chat-a") == before + 2


def test_with_the_models_tokenizer_the_mesh_counts_its_tokens(mesh, client):
    before = served(mesh, "exact-a")
    # WINDOW - 2 one-token words plus 2 output tokens: exactly the window by the tokenizer, though
    # the character estimate (about 5.9 characters a word) puts it far over.
    prompt = words(0, WINDOW - 2)
    assert len(prompt) // 4 > WINDOW
    fits = client.post("/v1/completions", headers={"x-model-id": "exact"}, json={"prompt": prompt, "max_tokens": 2})
    assert fits.status_code == 200, fits.text
    assert fits.headers["x-sim-replica"] == "exact-a"
    # One token more is over, by header and by body alike.
    over = {"prompt": words(0, WINDOW - 1), "max_tokens": 2}
    assert_refused(client.post("/v1/completions", headers={"x-model-id": "exact"}, json=over))
    assert_refused(client.post("/v1/completions", json=over | {"model": "exact"}))
    # The reverse: "a," is two tokens for this tokenizer, half a token for the estimate.
    assert_refused(client.post("/v1/completions", headers={"x-model-id": "exact"}, json={"prompt": "a," * 2100}))
    assert served(mesh, "exact-a") == before + 1
