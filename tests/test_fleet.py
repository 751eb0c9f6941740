"""Tests of the simulated GPU fleet (fleet/): it must behave like a GPU, honestly.

The mesh's load-aware tests rely on these properties: queueing beyond the batch slots,
slower decode in a bigger batch, prefix-cache hits, KV use that follows tokens held, and
faults that do what they say. Every fleet here listens on ephemeral loopback ports.

Speed is judged on the engine's own clock (``busy_s``: the modelled time of the steps it ran),
which a loaded machine does not stretch; of the wall clock the tests ask only that a reply took at
least its modelled time (the engine paces itself by it), a bound that load cannot break.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import openai
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from fleet import FleetConfig, FleetConfigError, ReplicaConfig, RunningFleet, start_fleet
from fleet.engine import Engine
from imesh.ports import free_ports

ROOT = Path(__file__).resolve().parent.parent
MODEL = "llama-3-8b"


# ---- helpers ------------------------------------------------------------------------------


def replica(
    name: str, gpu: str = "h100", models: tuple[str, ...] = (MODEL,), version: str | None = None, **overrides: Any
) -> ReplicaConfig:
    return ReplicaConfig(
        name=name, address="127.0.0.1:0", models=list(models), gpu=gpu, version=version, overrides=overrides
    )


async def fleet_of(*replicas: ReplicaConfig, seed: int = 1, time_scale: float = 1.0) -> RunningFleet:
    return await start_fleet(FleetConfig(seed=seed, time_scale=time_scale, replicas=list(replicas)))


async def scrape(session: aiohttp.ClientSession, url: str) -> dict[str, float]:
    """Metric samples by name, summed over label sets (parsed with prometheus_client)."""
    async with session.get(f"{url}/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[s.name] = out.get(s.name, 0.0) + s.value
    return out


async def chat(
    session: aiohttp.ClientSession, url: str, content: str, max_tokens: int | None = None, model: str = MODEL
) -> tuple[int, dict[str, Any], float]:
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": content}]}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    t0 = time.perf_counter()
    async with session.post(f"{url}/v1/chat/completions", json=body) as resp:
        data = await resp.json()
        return resp.status, data, time.perf_counter() - t0


async def stream_first_token(
    session: aiohttp.ClientSession, url: str, content: str, max_tokens: int, engine: Engine
) -> tuple[int, int]:
    """Stream a chat completion; return its status and ``engine.served`` (requests finished) when
    its first token arrived: at least as many as had finished when the engine emitted it."""
    body = {
        "model": MODEL,
        "stream": True,
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": content}],
    }
    finished_before = -1
    async with session.post(f"{url}/v1/chat/completions", json=body) as resp:
        async for line in resp.content:
            if finished_before < 0 and line.startswith(b"data: {"):
                choices = json.loads(line[len(b"data: ") :])["choices"]
                if choices and choices[0]["delta"].get("content"):
                    finished_before = engine.served
        return resp.status, finished_before


def long_text(n_words: int, tag: str = "w") -> str:
    return " ".join(f"{tag}{i}" for i in range(n_words))  # short words: one token each


def openai_client(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=f"{url}/v1", api_key="sim", max_retries=0, http_client=httpx.AsyncClient(trust_env=False)
    )


async def until(predicate: Any, timeout: float = 10.0) -> None:
    """Poll ``predicate()`` until true; the timeout, generous, only keeps a broken engine from hanging."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


@pytest.fixture
async def session():
    async with aiohttp.ClientSession() as s:
        yield s


# ---- config -------------------------------------------------------------------------------


def test_demo_fleet_matches_demo_mesh():
    fleet = FleetConfig.load(ROOT / "examples/demo/fleet.yaml")
    mesh = yaml.safe_load((ROOT / "examples/demo/mesh.yaml").read_text())
    want = {
        ep["address"]: (m["name"], v["name"]) for m in mesh["models"] for v in m["versions"] for ep in v["endpoints"]
    }
    have = {r.address: (r.models[0], r.version) for r in fleet.replicas}
    assert have == want
    gpus = {r.address: r.gpu for r in fleet.replicas}
    assert gpus == {
        "127.0.0.1:19000": "h100",
        "127.0.0.1:19001": "l4",
        "127.0.0.1:19002": "h100",
        "127.0.0.1:19003": "l4",
        "127.0.0.1:19004": "cpu",
    }


@pytest.mark.parametrize(
    ("replica_yaml", "field", "words"),
    [
        ("{name: b, address: '127.0.0.1:1', models: [m], gpu: h900}", "replicas[1].gpu", "unknown GPU profile"),
        ("{name: b, address: '10.0.0.1:1', models: [m]}", "replicas[1].address", "loopback"),
        ("{name: b, address: 'nope', models: [m]}", "replicas[1].address", "host:port"),
        (
            "{name: b, address: '127.0.0.1:1', models: [m], overrides: {slots: 3}}",
            "replicas[1].overrides",
            "unknown override",
        ),
        (
            "{name: b, address: '127.0.0.1:1', models: [m], overrides: {max_num_seqs: 0}}",
            "replicas[1].overrides",
            "positive integer",
        ),
        ("{name: b, address: '127.0.0.1:1', models: []}", "replicas[1].models", "at least 1"),
        ("{name: b, address: '127.0.0.1:1', models: [m], colour: red}", "replicas[1].colour", "Extra inputs"),
        ("{name: a, address: '127.0.0.1:2', models: [m]}", "(top level)", "duplicate replica name"),
    ],
)
def test_config_errors_name_file_and_field(tmp_path, replica_yaml, field, words):
    path = tmp_path / "bad-fleet.yaml"
    path.write_text(f"replicas:\n  - {{name: a, address: '127.0.0.1:0', models: [m]}}\n  - {replica_yaml}\n")
    with pytest.raises(FleetConfigError) as err:
        FleetConfig.load(path)
    msg = str(err.value)
    assert str(path) in msg and field in msg and words in msg, msg


def test_config_bad_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "f.yaml"
    bad.write_text("replicas: [\n")
    with pytest.raises(FleetConfigError, match="invalid YAML"):
        FleetConfig.load(bad)
    with pytest.raises(FleetConfigError, match="cannot read"):
        FleetConfig.load(tmp_path / "missing.yaml")


def test_overrides_apply_to_profile():
    r = replica("x", gpu="l4", max_num_seqs=3, kv_capacity_tokens=1234)
    p = r.profile()
    assert (p.max_num_seqs, p.kv_capacity_tokens, p.device_name) == (3, 1234, "NVIDIA L4")


# ---- OpenAI API ---------------------------------------------------------------------------


async def test_openai_client_chat_stream_and_non_stream():
    async with await fleet_of(replica("a"), time_scale=0.05) as fleet:
        client = openai_client(fleet["a"].url)
        resp = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hello there"}], max_tokens=7
        )
        assert resp.object == "chat.completion"
        assert resp.choices[0].finish_reason == "length"
        assert len(resp.choices[0].message.content.split()) == 7
        assert resp.usage.completion_tokens == 7
        assert resp.usage.prompt_tokens > 0
        assert resp.usage.total_tokens == resp.usage.prompt_tokens + 7

        stream = await client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "hello there"}],
            max_tokens=7,
            stream=True,
            stream_options={"include_usage": True},
        )
        text, usage, reasons = "", None, []
        async for chunk in stream:
            assert chunk.object == "chat.completion.chunk"
            if chunk.usage is not None:
                usage = chunk.usage
            for c in chunk.choices:
                text += c.delta.content or ""
                reasons.append(c.finish_reason)
        assert text == resp.choices[0].message.content  # deterministic: same prompt, same text
        assert usage is not None and usage.completion_tokens == 7
        assert reasons[-1] == "length"

        # Without max_tokens: a deterministic default length that ends with "stop".
        resp = await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
        assert resp.choices[0].finish_reason == "stop" and resp.usage.completion_tokens == 16
        await client.close()


async def test_openai_completions_embeddings_models():
    async with await fleet_of(replica("a", models=(MODEL, "embedder")), time_scale=0.05) as fleet:
        client = openai_client(fleet["a"].url)
        comp = await client.completions.create(model=MODEL, prompt="once upon a time", max_tokens=5)
        assert comp.object == "text_completion" and comp.usage.completion_tokens == 5
        assert len(comp.choices[0].text.split()) == 5

        text = ""
        async for chunk in await client.completions.create(
            model=MODEL, prompt="once upon a time", max_tokens=5, stream=True
        ):
            text += "".join(c.text for c in chunk.choices)
        assert text == comp.choices[0].text

        emb = await client.embeddings.create(model="embedder", input=["a cat", "a dog"])  # base64 by default
        assert [d.index for d in emb.data] == [0, 1]
        assert len(emb.data[0].embedding) == 16 and emb.data[0].embedding != emb.data[1].embedding
        assert abs(sum(v * v for v in emb.data[0].embedding) - 1.0) < 1e-3
        again = await client.embeddings.create(model="embedder", input="a cat", encoding_format="float")
        assert again.data[0].embedding == pytest.approx(emb.data[0].embedding, abs=1e-5)
        assert emb.usage.prompt_tokens > 0

        models = await client.models.list()
        assert sorted(m.id for m in models.data) == sorted([MODEL, "embedder"])
        await client.close()


async def test_error_envelopes_and_replica_header(session):
    async with await fleet_of(replica("edge-1"), time_scale=0.05) as fleet:
        url = fleet["edge-1"].url
        async with session.post(f"{url}/v1/chat/completions", data=b"{not json") as resp:
            assert resp.status == 400
            assert resp.headers["x-sim-replica"] == "edge-1"
            err = (await resp.json())["error"]
            assert err["type"] == "invalid_request_error" and err["message"] and "code" in err
        status, body, _ = await chat(session, url, "hi", model="no-such-model")
        assert status == 404 and body["error"]["code"] == "model_not_found"
        async with session.post(f"{url}/v1/chat/completions", json={"model": MODEL, "messages": []}) as resp:
            assert resp.status == 400
        async with session.post(
            f"{url}/v1/chat/completions",
            json={"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 100000},
        ) as resp:
            assert resp.status == 400 and (await resp.json())["error"]["code"] == "context_length_exceeded"
        async with session.get(f"{url}/nowhere") as resp:
            assert resp.status == 404 and resp.headers["x-sim-replica"] == "edge-1"
            assert "error" in await resp.json()
        for path in ("/metrics", "/v2/health/ready", "/sim/state", "/v1/models"):
            async with session.get(f"{url}{path}") as resp:
                assert resp.status == 200 and resp.headers["x-sim-replica"] == "edge-1"

        client = openai_client(url)
        with pytest.raises(openai.NotFoundError):
            await client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
        await client.close()


# ---- the engine's behaviour ---------------------------------------------------------------


async def test_profiles_rank_h100_before_l4_before_cpu(session):
    async with await fleet_of(
        replica("h", gpu="h100"), replica("l", gpu="l4"), replica("c", gpu="cpu"), time_scale=0.1
    ) as fleet:
        waited, modelled = {}, {}
        for name in ("h", "l", "c"):
            status, _, waited[name] = await chat(session, fleet[name].url, "the same prompt", max_tokens=10)
            assert status == 200
            modelled[name] = fleet.engine(name).busy_s
        assert modelled["h"] < modelled["l"] < modelled["c"], modelled
        assert all(waited[name] >= modelled[name] for name in modelled), (waited, modelled)


async def test_more_requests_than_slots_queue_up(session):
    async with await fleet_of(replica("a", max_num_seqs=2, decode_base_s=0.01, decode_per_seq_s=0.0)) as fleet:
        url, engine = fleet["a"].url, fleet.engine("a")
        tasks = [asyncio.create_task(stream_first_token(session, url, f"request {i}", 20, engine)) for i in range(8)]
        seen_waiting, seen_running = 0.0, 0.0
        while not all(t.done() for t in tasks):
            m = await scrape(session, url)
            seen_waiting = max(seen_waiting, m["vllm:num_requests_waiting"])
            seen_running = max(seen_running, m["vllm:num_requests_running"])
            await asyncio.sleep(0.02)
        results = await asyncio.gather(*tasks)
        assert all(status == 200 for status, _ in results)
        assert seen_running == 2  # never more than the slots
        assert seen_waiting >= 4
        m = await scrape(session, url)
        assert m["vllm:num_requests_waiting"] == 0 and m["vllm:num_requests_running"] == 0
        assert m["vllm:request_success_total"] == 8
        assert m["vllm:generation_tokens_total"] == 160
        assert m["vllm:time_to_first_token_seconds_count"] == 8
        assert m["vllm:e2e_request_latency_seconds_count"] == 8
        # Two at a time, first come first served: the k-th request admitted (from 0) starts once
        # all but one of the k before it have finished, so the last waited for three batches.
        finished_before = sorted(n for _, n in results)
        assert all(n >= k - 1 for k, n in enumerate(finished_before)), finished_before
        assert finished_before[-1] >= 6, finished_before


async def test_decode_slows_down_with_a_bigger_batch(session):
    cfg = replica("a", max_num_seqs=16, decode_base_s=0.002, decode_per_seq_s=0.002, prefill_s_per_token=0.0)
    async with await fleet_of(cfg) as fleet:
        url, engine = fleet["a"].url, fleet.engine("a")
        _, _, solo_waited = await chat(session, url, "alone", max_tokens=30)  # 30 steps of 4 ms
        solo_step = engine.busy_s / engine.steps
        assert engine.last_batch == 1 and solo_waited >= engine.busy_s
        crowd = [asyncio.create_task(chat(session, url, f"crowd {i}", max_tokens=30)) for i in range(8)]
        step_by_batch: dict[int, float] = {}  # the modelled time of a step, by the batch it decoded
        while not all(t.done() for t in crowd):
            step_by_batch[engine.last_batch] = engine.last_step_s
            await asyncio.sleep(0.001)
        assert all(status == 200 for status, _, _ in await asyncio.gather(*crowd))
        assert max(step_by_batch) == 8, step_by_batch  # they decoded together
        assert step_by_batch[8] > 2.5 * solo_step, (solo_step, step_by_batch)  # 18 ms against 4
        assert engine.steps >= 60


async def test_repeated_prompt_prefills_faster(session):
    cfg = replica("a", prefill_s_per_token=0.0005, decode_base_s=0.001, decode_per_seq_s=0.0)
    async with await fleet_of(cfg) as fleet:
        url, engine = fleet["a"].url, fleet.engine("a")
        prompt = long_text(800)  # ~800 tokens → ~0.4 s of prefill when uncached
        _, first, waited_first = await chat(session, url, prompt, max_tokens=1)
        t_first = engine.busy_s
        _, second, _ = await chat(session, url, prompt, max_tokens=1)
        t_second = engine.busy_s - t_first
        assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
        assert cached >= second["usage"]["prompt_tokens"] - 16
        assert t_first > 0.3 and t_second < t_first / 4, (t_first, t_second)
        assert waited_first >= t_first
        # A prompt sharing only the first half hits only that half.
        _, third, _ = await chat(session, url, long_text(400) + " " + long_text(400, tag="x"), max_tokens=1)
        assert 300 < third["usage"]["prompt_tokens_details"]["cached_tokens"] < 500
        m = await scrape(session, url)
        assert m["vllm:prefix_cache_hits_total"] == cached + third["usage"]["prompt_tokens_details"]["cached_tokens"]
        assert m["vllm:prefix_cache_queries_total"] == m["vllm:prompt_tokens_total"]
        # Per finished request, as vLLM: the prompt tokens it computed (hits excluded) and the time
        # from admission to its first token: here one step each, paced to at least its modelled
        # time but for the moment between the engine waking and admitting it.
        hits = m["vllm:prefix_cache_hits_total"]
        assert m["vllm:request_prefill_kv_computed_tokens_count"] == 3
        assert m["vllm:request_prefill_kv_computed_tokens_sum"] == m["vllm:prompt_tokens_total"] - hits
        assert m["vllm:request_prefill_time_seconds_count"] == 3
        assert m["vllm:request_prefill_time_seconds_sum"] >= 0.9 * engine.busy_s


async def test_kv_cache_use_follows_tokens_held(session):
    cfg = replica(
        "a", kv_capacity_tokens=2000, max_num_seqs=8, decode_base_s=0.01, decode_per_seq_s=0.0, prefill_s_per_token=0.0
    )
    async with await fleet_of(cfg) as fleet:
        url, engine = fleet["a"].url, fleet.engine("a")
        task = asyncio.create_task(chat(session, url, long_text(400), max_tokens=100))
        await until(lambda: engine.num_running == 1)
        steps = engine.steps
        await until(lambda: engine.steps >= steps + 5)
        early = (await scrape(session, url))["vllm:kv_cache_usage_perc"]
        steps = engine.steps
        await until(lambda: engine.steps >= steps + 20)  # 20 more tokens held, with 50 or more to go
        m = await scrape(session, url)
        later = m["vllm:kv_cache_usage_perc"]
        assert m["vllm:gpu_cache_usage_perc"] == later
        assert engine.num_running == 1  # still generating
        assert 0.15 < early < later < 0.3, (early, later)  # ~400 prompt + generated, of 2000
        await task
        assert (await scrape(session, url))["vllm:kv_cache_usage_perc"] == 0

        # Admission respects KV capacity: each prompt is ~800 tokens (what optimistic admission
        # claims; with its 100 outputs, ~900), so only 2 of 5 run at once although 8 slots are free.
        tasks = [
            asyncio.create_task(chat(session, url, long_text(800, tag="abcde"[i]), max_tokens=100)) for i in range(5)
        ]
        await until(lambda: engine.num_running + engine.num_waiting == 5)
        steps = engine.steps
        await until(lambda: engine.steps >= steps + 5)  # admissions happen at step starts
        state = engine.state()
        assert state["running"] == 2 and state["waiting"] == 3
        assert 0.8 < state["kv_cache_usage"] <= 1.0
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def test_error_injection_rate_and_reset(session):
    async with await fleet_of(replica("a"), time_scale=0.01) as fleet:
        url = fleet["a"].url
        async with session.post(f"{url}/sim/faults", json={"error_rate": 0.3, "error_status": 503}) as resp:
            assert resp.status == 200 and (await resp.json())["error_rate"] == 0.3
        results = await asyncio.gather(*(chat(session, url, f"r{i}", max_tokens=1) for i in range(200)))
        statuses = [s for s, _, _ in results]
        assert set(statuses) == {200, 503}
        assert 40 <= statuses.count(503) <= 80, statuses.count(503)
        err = next(b for s, b, _ in results if s == 503)["error"]
        assert err["type"] == "server_error" and err["code"] == "injected_fault"
        async with session.delete(f"{url}/sim/faults") as resp:
            assert (await resp.json())["error_rate"] == 0
        results = await asyncio.gather(*(chat(session, url, f"r{i}", max_tokens=1) for i in range(20)))
        assert {s for s, _, _ in results} == {200}
        async with session.get(f"{url}/sim/state") as resp:
            state = await resp.json()
        assert (
            state["errors_injected"] == statuses.count(503) and state["served"] == 200 - state["errors_injected"] + 20
        )


async def test_fault_admin_rejects_bad_values(session):
    async with await fleet_of(replica("a"), time_scale=0.05) as fleet:
        url = fleet["a"].url
        for bad in ({"error_rate": 2}, {"slowdown": 0}, {"bogus": 1}, {"error_status": 200}):
            async with session.post(f"{url}/sim/faults", json=bad) as resp:
                assert resp.status == 400, bad
                assert "error" in await resp.json()
        async with session.post(f"{url}/sim/faults", data=b"[") as resp:
            assert resp.status == 400
        async with session.get(f"{url}/sim/faults") as resp:
            assert await resp.json() == {
                "error_rate": 0.0,
                "error_status": 500,
                "stall_s": 0.0,
                "slowdown": 1.0,
                "extra_waiting": 0,
                "not_ready": False,
                "crash_after_tokens": 0,
            }


async def test_slowdown_and_stall(session):
    cfg = replica("a", decode_base_s=0.005, decode_per_seq_s=0.0, prefill_s_per_token=0.0)
    async with await fleet_of(cfg) as fleet:
        url, engine = fleet["a"].url, fleet.engine("a")
        _, _, _ = await chat(session, url, "x", max_tokens=20)  # 0.1 s modelled
        base = engine.busy_s
        await session.post(f"{url}/sim/faults", json={"slowdown": 4})
        _, _, slow_waited = await chat(session, url, "x", max_tokens=20)  # 0.4 s modelled
        slow = engine.busy_s - base
        assert slow > 3 * base, (base, slow)
        assert slow_waited >= slow
        await session.delete(f"{url}/sim/faults")
        await session.post(f"{url}/sim/faults", json={"stall_s": 0.3})
        _, _, stalled = await chat(session, url, "x", max_tokens=1)
        assert stalled >= 0.3  # a stall is wall seconds by definition; load only lengthens it


async def test_extra_waiting_and_gpu_util_in_metrics(session):
    cfg = replica("a", max_num_seqs=4, decode_base_s=0.01, decode_per_seq_s=0.0)
    async with await fleet_of(cfg) as fleet:
        url = fleet["a"].url
        await session.post(f"{url}/sim/faults", json={"extra_waiting": 7})
        m = await scrape(session, url)
        assert m["vllm:num_requests_waiting"] == 7 and m["DCGM_FI_DEV_GPU_UTIL"] == 0
        tasks = [asyncio.create_task(chat(session, url, f"q{i}", max_tokens=30)) for i in range(2)]
        await until(lambda: fleet.engine("a").num_running == 2)
        m = await scrape(session, url)
        assert m["DCGM_FI_DEV_GPU_UTIL"] == 50 and m["vllm:num_requests_running"] == 2
        assert m["DCGM_FI_DEV_FB_USED"] + m["DCGM_FI_DEV_FB_FREE"] == fleet["a"].profile.memory_total_mib
        await asyncio.gather(*tasks)


async def test_not_ready_fault_fails_readiness_only(session):
    async with await fleet_of(replica("a", version="v1"), time_scale=0.05) as fleet:
        url = fleet["a"].url
        await session.post(f"{url}/sim/faults", json={"not_ready": True})
        for path, status in (
            ("/v2/health/live", 200),
            ("/v2/health/ready", 503),
            ("/health", 503),
            (f"/v2/models/{MODEL}/ready", 503),
        ):
            async with session.get(f"{url}{path}") as resp:
                assert resp.status == status, path


async def test_same_seed_same_text():
    prompt = [{"role": "user", "content": "tell me about meshes"}]

    async def text_of(seed: int) -> list[str]:
        async with await fleet_of(replica("a"), replica("b", gpu="l4"), seed=seed, time_scale=0.02) as fleet:
            out = []
            for name in ("a", "b"):
                client = openai_client(fleet[name].url)
                resp = await client.chat.completions.create(model=MODEL, messages=prompt, max_tokens=12)
                out.append(resp.choices[0].message.content)
                await client.close()
            return out

    first, again, other = await text_of(5), await text_of(5), await text_of(6)
    assert first == again
    assert first[0] == first[1]  # the replica does not change the text, only the timing
    assert other[0] != first[0]


async def test_client_disconnect_frees_the_slot(session):
    async with await fleet_of(replica("a", decode_base_s=0.01, decode_per_seq_s=0.0)) as fleet:
        url, engine = fleet["a"].url, fleet.engine("a")
        body = {"model": MODEL, "stream": True, "max_tokens": 500, "messages": [{"role": "user", "content": "x"}]}
        resp = await session.post(f"{url}/v1/chat/completions", json=body)
        await resp.content.readline()
        assert engine.num_running == 1
        resp.close()
        await until(lambda: engine.num_running == 0)
        assert engine.aborted == 1


async def test_stop_and_restart_one_replica(session):
    async with await fleet_of(replica("a"), replica("b"), time_scale=0.05) as fleet:
        url_a = fleet["a"].url
        await fleet.stop_replica("a")
        with pytest.raises(aiohttp.ClientConnectionError):
            await chat(session, url_a, "x", max_tokens=1)
        assert (await chat(session, fleet["b"].url, "x", max_tokens=1))[0] == 200
        fresh = await fleet.restart_replica("a")
        assert fresh.url == url_a and fleet.engine("a") is fresh.engine
        assert (await chat(session, url_a, "x", max_tokens=1))[0] == 200


# ---- KServe v2 ----------------------------------------------------------------------------


async def test_kserve_v2_rest(session):
    async with await fleet_of(replica("k", models=("intent-classifier",), version="v1"), time_scale=0.05) as fleet:
        url = fleet["k"].url
        base = f"{url}/v2/models/intent-classifier"
        async with session.get(f"{url}/v2/health/live") as resp:
            assert resp.status == 200
        async with session.get(base) as resp:
            meta = await resp.json()
            assert meta["name"] == "intent-classifier" and meta["versions"] == ["v1"]
        async with session.get(f"{base}/ready") as resp:
            assert resp.status == 200
        req = {
            "id": "42",
            "inputs": [{"name": "INPUT0", "shape": [2, 2], "datatype": "FP32", "data": [[1.0, 2.0], [3.0, 4.0]]}],
        }
        for path in (f"{base}/infer", f"{base}/versions/v1/infer"):
            async with session.post(path, json=req) as resp:
                assert resp.status == 200, await resp.text()
                out = await resp.json()
            assert out["model_name"] == "intent-classifier" and out["model_version"] == "v1" and out["id"] == "42"
            assert out["outputs"] == [
                {"name": "OUTPUT0", "datatype": "FP32", "shape": [2, 2], "data": [1.0, 2.0, 3.0, 4.0]}
            ]
        async with session.post(f"{base}/versions/v9/infer", json=req) as resp:
            assert resp.status == 404 and "error" in await resp.json()
        async with session.post(f"{url}/v2/models/nope/infer", json=req) as resp:
            assert resp.status == 404
        async with session.post(f"{base}/infer", data=b"{oops") as resp:
            assert resp.status == 400 and isinstance((await resp.json())["error"], str)
        bad = {"inputs": [{"name": "INPUT0", "shape": [3], "datatype": "FP32", "data": [1.0]}]}
        async with session.post(f"{base}/infer", json=bad) as resp:
            assert resp.status == 400
        assert fleet.engine("k").served == 2  # infer goes through the engine


async def test_kserve_v2_with_tritonclient_binary_tensors():
    np = pytest.importorskip("numpy")
    httpclient = pytest.importorskip("tritonclient.http.aio")
    async with await fleet_of(replica("k", models=("intent-classifier",), version="v1"), time_scale=0.05) as fleet:
        client = httpclient.InferenceServerClient(url=fleet["k"].address)
        try:
            assert await client.is_server_ready()
            assert await client.is_model_ready("intent-classifier", "v1")
            data = np.arange(6, dtype=np.float32).reshape(2, 3)
            inp = httpclient.InferInput("INPUT0", [2, 3], "FP32")
            inp.set_data_from_numpy(data, binary_data=True)
            words = httpclient.InferInput("TEXT", [2], "BYTES")
            words.set_data_from_numpy(np.array([b"book a flight", b"hi"], dtype=np.object_), binary_data=False)
            outputs = [
                httpclient.InferRequestedOutput("OUTPUT0", binary_data=True),
                httpclient.InferRequestedOutput("OUTPUT1", binary_data=True),
            ]
            result = await client.infer("intent-classifier", [inp, words], model_version="v1", outputs=outputs)
            assert np.array_equal(result.as_numpy("OUTPUT0"), data)
            assert list(result.as_numpy("OUTPUT1")) == [b"book a flight", b"hi"]
        finally:
            await client.close()


# ---- CLI ----------------------------------------------------------------------------------


def test_cli_runs_until_sigterm(tmp_path):
    ports = free_ports(2)
    cfg = {
        "seed": 3,
        "time_scale": 1.0,
        "replicas": [
            {"name": f"r{i}", "address": f"127.0.0.1:{p}", "models": [MODEL], "gpu": gpu}
            for i, (p, gpu) in enumerate(zip(ports, ("h100", "cpu"), strict=True))
        ],
    }
    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with (
        (tmp_path / "stderr.log").open("w+") as errlog,
        subprocess.Popen(
            [sys.executable, "-m", "fleet", "--config", str(path), "--time-scale", "0.1"],
            stdout=subprocess.PIPE,
            stderr=errlog,
            text=True,
            env=env,
            cwd=ROOT,
        ) as proc,
    ):
        try:
            line = proc.stdout.readline()
            assert line.strip() == "fleet ready: 2 replicas", (line, errlog.seek(0), errlog.read())
            with httpx.Client(trust_env=False, timeout=5) as http:
                for p in ports:
                    assert http.get(f"http://127.0.0.1:{p}/v2/health/ready").status_code == 200
                r = http.post(
                    f"http://127.0.0.1:{ports[1]}/v1/chat/completions",
                    json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
                )
                assert r.status_code == 200 and r.headers["x-sim-replica"] == "r1"
                # SIGTERM drains: a stream already running finishes, readiness says "not ready" meanwhile.
                body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 60}
                with http.stream(
                    "POST", f"http://127.0.0.1:{ports[1]}/v1/chat/completions", json={**body, "stream": True}
                ) as stream:
                    chunks = stream.iter_text()
                    first = next(chunks)
                    proc.send_signal(signal.SIGTERM)
                    deadline = time.monotonic() + 10
                    while http.get(f"http://127.0.0.1:{ports[1]}/health").status_code != 503:
                        assert time.monotonic() < deadline, "readiness still 200 after SIGTERM"
                    assert http.get(f"http://127.0.0.1:{ports[0]}/v2/health/ready").status_code == 503
                    text = first + "".join(chunks)
                assert "data: [DONE]" in text and text.count('"delta"') >= 60
            assert proc.wait(timeout=10) == 0
            assert proc.stdout.read() == ""  # the ready line is the only stdout
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_cli_bad_config_exits_2_naming_the_field(tmp_path):
    path = tmp_path / "fleet.yaml"
    path.write_text(json.dumps({"replicas": [{"name": "a", "address": "127.0.0.1:1", "models": ["m"], "gpu": "tpu"}]}))
    proc = subprocess.run(
        [sys.executable, "-m", "fleet", "--config", str(path)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        cwd=ROOT,
        timeout=30,
    )
    assert proc.returncode == 2
    assert str(path) in proc.stderr and "replicas[0].gpu" in proc.stderr
    assert proc.stdout == ""
