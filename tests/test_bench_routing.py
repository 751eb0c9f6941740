"""The routing benchmark's building blocks (bench/routing.py): what it sends, when, and how it counts.

The benchmark itself runs with `python -m bench --only routing`; these check, cheaply and without
timing assertions, that its workloads and schedules are seeded and shaped as documented, that its
load generator measures a stream as a client sees it, and the two simulator hooks it relies on
(an empty prefix cache on demand, and a queued request aborted when its client goes away).
"""

from __future__ import annotations

import asyncio
import json
import math
import statistics

import aiohttp

from bench._loadgen import open_loop
from bench._routing_results import percentile, ratio
from bench._workload import (
    OUTPUT_MAX,
    PROMPT_MAX,
    PROMPT_MIN,
    SYSTEM_PROMPT_MIN,
    adapter_weights,
    lora_mix,
    poisson_offsets,
    shared_prefix,
    sharegpt_lengths,
    sharegpt_like,
)
from fleet import FleetConfig, ReplicaConfig, start_fleet
from fleet.openai_api import render_messages
from fleet.text import block_hashes, tokenize

MODEL = "chat"


# ---- schedules and workloads --------------------------------------------------------------


def test_poisson_schedule_is_seeded_increasing_and_has_the_rate_asked_for():
    offsets = poisson_offsets(seed=3, count=20_000, rate=50.0)
    assert offsets == poisson_offsets(seed=3, count=20_000, rate=50.0)
    assert offsets != poisson_offsets(seed=4, count=20_000, rate=50.0)
    gaps = [b - a for a, b in zip([0.0, *offsets], offsets, strict=False)]
    assert all(g > 0 for g in gaps)
    assert abs(statistics.fmean(gaps) - 1 / 50.0) < 0.02 / 50.0  # 20,000 draws: well inside 2%
    # Exponential gaps: the standard deviation equals the mean.
    assert abs(statistics.stdev(gaps) / statistics.fmean(gaps) - 1.0) < 0.05


def test_sharegpt_like_requests_are_seeded_and_within_the_filter():
    requests = sharegpt_like(seed=1, count=300, model=MODEL, output_scale=8)
    assert requests == sharegpt_like(seed=1, count=300, model=MODEL, output_scale=8)
    for r in requests:
        body = json.loads(r.body)
        assert body["model"] == MODEL and body["stream"] is True
        assert body["max_tokens"] == r.output_tokens <= math.ceil(OUTPUT_MAX / 8)
        # The token count the benchmark reports is the fleet's own.
        assert r.prompt_tokens == len(tokenize(render_messages(body["messages"])))


def test_sharegpt_lengths_have_a_long_tail_inside_vllms_filter():
    import random

    rng = random.Random(0)
    prompts, outputs = zip(*(sharegpt_lengths(rng) for _ in range(5_000)), strict=True)
    assert PROMPT_MIN <= min(prompts) and max(prompts) <= PROMPT_MAX
    assert statistics.median(outputs) < statistics.fmean(outputs)  # skewed right, like ShareGPT
    assert 100 < statistics.fmean(prompts) < 200 and 200 < statistics.fmean(outputs) < 400


def test_shared_prefix_requests_of_a_tenant_share_their_leading_blocks():
    requests = shared_prefix(seed=2, count=200, model=MODEL, tenants=4, output_scale=8)
    by_tenant: dict[int, list[list[int]]] = {}
    for r in requests:
        messages = json.loads(r.body)["messages"]
        assert r.tenant is not None
        by_tenant.setdefault(r.tenant, []).append(block_hashes(tokenize(render_messages(messages)), 16))
    assert len(by_tenant) == 4

    def common(a: list[int], b: list[int]) -> int:
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        return n

    first, second = (blocks[:2] for blocks in list(by_tenant.values())[:2])
    assert common(*first) >= SYSTEM_PROMPT_MIN // 16 - 1  # the whole system prompt, nearly
    assert common(first[0], second[0]) == 0  # another tenant's prompt shares nothing


def test_the_lora_mix_is_seeded_names_its_adapter_in_body_and_header_and_follows_the_popularity():
    adapters = [f"lora-{i}" for i in range(8)]
    requests = lora_mix(seed=1, count=4000, model=MODEL, adapters=adapters, output_scale=8)
    assert requests == lora_mix(seed=1, count=4000, model=MODEL, adapters=adapters, output_scale=8)
    counts = {a: 0 for a in adapters}
    base = 0
    for r in requests:
        body = json.loads(r.body)
        if r.model is None:  # a base-model request: the run's model in the header
            assert body["model"] == MODEL
            base += 1
        else:  # an adapter, named as the model (vLLM) and in x-model-id (the fast path's route)
            assert body["model"] == r.model
            counts[r.model] += 1
    assert abs(base / len(requests) - 0.2) < 0.03
    weights = adapter_weights(len(adapters))
    assert weights[0] == max(weights) and abs(sum(weights) - 1) < 1e-9
    shares = [counts[a] / sum(counts.values()) for a in adapters]
    assert all(abs(share - w) < 0.03 for share, w in zip(shares, weights, strict=True))
    assert shares[0] > 2 * shares[3]  # Zipf-like: the head is much hotter than the tail


def test_percentiles_count_a_failed_request_as_infinitely_slow():
    values = [0.1] * 98 + [math.inf] * 2
    assert percentile(values, 50) == 0.1
    assert percentile(values, 99) == math.inf  # 2% failed: no finite p99 to show
    assert ratio(1.0, math.inf) == 0.0 and math.isnan(ratio(math.inf, math.inf))


# ---- the load generator and the fleet hooks, against one in-process replica --------------


def _replica(**overrides: float) -> ReplicaConfig:
    return ReplicaConfig(name="r", address="127.0.0.1:0", models=[MODEL], version=None, gpu="h100", overrides=overrides)


async def test_open_loop_measures_every_stream_it_sends():
    async with await start_fleet(FleetConfig(seed=1, time_scale=0.05, replicas=[_replica()])) as fleet:
        requests = sharegpt_like(seed=5, count=12, model=MODEL, output_scale=8)
        run = await open_loop(fleet["r"].url, MODEL, requests, poisson_offsets(5, 12, 40.0), grace_s=30)
    assert [o.error for o in run.outcomes] == [None] * 12
    for outcome, request in zip(run.outcomes, requests, strict=True):
        assert outcome.tokens == request.output_tokens
        assert outcome.replica == "r"
        assert outcome.ttft is not None and outcome.e2e is not None and 0 < outcome.ttft <= outcome.e2e
    assert 0 < run.window_tokens <= sum(r.output_tokens for r in requests)


async def test_reset_prefix_cache_makes_the_next_prompt_miss():
    body = {"model": MODEL, "max_tokens": 1, "messages": [{"role": "user", "content": "word " * 200}]}
    async with await start_fleet(FleetConfig(seed=1, time_scale=0.01, replicas=[_replica()])) as fleet:
        url = fleet["r"].url
        async with aiohttp.ClientSession() as session:

            async def cached() -> int:
                async with session.post(f"{url}/v1/chat/completions", json=body) as resp:
                    return (await resp.json())["usage"]["prompt_tokens_details"]["cached_tokens"]

            assert await cached() == 0
            assert await cached() > 0
            async with session.post(f"{url}/reset_prefix_cache") as resp:
                assert resp.status == 200 and (await resp.json())["dropped_blocks"] > 0
            assert await cached() == 0


async def test_a_queued_request_is_aborted_when_its_client_goes_away():
    long = {"model": MODEL, "stream": True, "max_tokens": 2000, "messages": [{"role": "user", "content": "x"}]}
    async with await start_fleet(FleetConfig(seed=1, time_scale=1.0, replicas=[_replica(max_num_seqs=1)])) as fleet:
        url, engine = fleet["r"].url, fleet.engine("r")
        async with aiohttp.ClientSession() as session:
            # Both answer with their headers at once (SSE); the second waits for the only slot.
            running = await session.post(f"{url}/v1/chat/completions", json=long)
            queued = await session.post(f"{url}/v1/chat/completions", json=long)
            for _ in range(200):
                if engine.num_waiting == 1:
                    break
                await asyncio.sleep(0.01)
            assert engine.num_running == 1 and engine.num_waiting == 1
            queued.close()  # the client gives up before its request was admitted
            for _ in range(200):
                if engine.num_waiting == 0:
                    break
                await asyncio.sleep(0.01)
            assert engine.num_waiting == 0 and engine.aborted == 1 and engine.num_running == 1
            running.close()
