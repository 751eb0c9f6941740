"""The ``ttft`` scorer end to end: real Envoy, control plane, ext_proc and a heterogeneous fleet.

One model on an h100-profile replica and an l4-profile one (fleet/profiles.py: the l4 prefills
8x slower and steps about 4x slower), scheduled by a profile of the ttft scorer alone. The
replicas' prefill histograms reach the ext_proc as measured prefill rates, so once each has
served a request the estimate sends most of the traffic to the h100, and the l4 only what the
h100's queue makes worth it.
"""

from __future__ import annotations

import httpx
import pytest

from tests.harness import Replica, chat, make_mesh, send_many, served_by

REQUESTS = 40
PROMPT_WORDS = 1000  # one token each: ~50 ms of prefill on the h100, ~400 ms on the l4


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    replicas = [Replica("h100", "m", "v1", gpu="h100"), Replica("l4", "m", "v1", gpu="l4")]
    # Real time (time_scale 1): steps of 10 to 400 ms stay well above a loaded machine's jitter.
    test_mesh = make_mesh(
        tmp_path_factory.mktemp("ttft"),
        replicas,
        time_scale=1.0,
        scheduling={"scorers": [{"type": "ttft", "weight": 1}]},
    )
    with test_mesh.mesh:
        test_mesh.mesh.wait_for_completion("m")
        yield test_mesh


def prompt(i: int) -> str:
    # A different first word each: no request hits another's cached prefix.
    return f"request{i} " + " ".join(f"w{j}" for j in range(PROMPT_WORDS))


def test_a_ttft_profile_sends_more_requests_to_the_faster_replica(mesh):
    def one(client: httpx.Client, i: int) -> httpx.Response:
        return client.post("/v1/chat/completions", json=chat("m", prompt(i), max_tokens=2))

    responses = send_many(mesh.url, REQUESTS, one, concurrency=4, timeout_s=60)
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200]
    counts = served_by(responses)
    fast, slow = counts[mesh.replica("h100").address], counts[mesh.replica("l4").address]
    assert fast + slow == REQUESTS, counts
    # Neutral scores (before both are measured) take turns; after that the h100 takes most.
    assert fast > 2 * slow, counts
