"""LoRA adapters in the simulated fleet (fleet/lora.py, fleet/engine.py): vLLM's rules, honestly.

A request names an adapter as its ``model``; the base engine serves it with that adapter. Loading
an adapter onto the GPU costs ``adapter_load_s`` once; a batch holds at most ``max_loras``
distinct adapters (a request for another one waits without blocking the queue); a full GPU evicts
the least recently used adapter no running sequence uses; ``vllm:lora_requests_info`` says which
adapters have running and waiting sequences.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from fleet import FleetConfig, FleetConfigError, ReplicaConfig, start_fleet
from fleet.engine import Engine, Sequence
from fleet.profiles import get_profile

MODEL = "llama-3-8b"
LOAD_S = 0.05


def engine(max_loras: int = 1, load_s: float = LOAD_S, **overrides: Any) -> Engine:
    profile = get_profile("h100").with_overrides({"max_loras": max_loras, "adapter_load_s": load_s, **overrides})
    e = Engine("e", profile)
    e.start()
    return e


def submit(e: Engine, adapter: str | None, max_tokens: int = 2) -> Sequence:
    return e.submit(MODEL, 8, [], max_tokens, adapter=adapter)


async def until(predicate: Any, timeout: float = 10.0) -> None:
    """Poll ``predicate()``; the timeout, generous, only keeps a broken engine from hanging."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.002)


async def test_loading_an_adapter_costs_its_load_time_once():
    e = engine()
    try:
        first = await submit(e, "sql-lora").wait()
        second = await submit(e, "sql-lora").wait()
        base = await submit(e, None).wait()
    finally:
        await e.stop()
    assert e.lora.loads == 1 and e.lora.resident() == ["sql-lora"]
    assert first.admitted_at is not None and first.first_token_at is not None
    assert first.ready_at == pytest.approx(first.admitted_at + LOAD_S)  # the load, before its prefill
    assert first.first_token_at >= first.ready_at  # the engine waited for it (a bound load cannot break)
    assert second.admitted_at is not None and second.ready_at <= second.admitted_at  # resident: no wait
    assert base.ready_at == 0.0 and base.adapter is None
    assert first.model == second.model == MODEL  # the base engine serves it


async def test_the_batch_keeps_decoding_while_an_adapter_loads():
    e = engine(load_s=1.0)
    try:
        long = submit(e, None, max_tokens=400)
        await until(lambda: long.generated > 0)
        loading = submit(e, "sql-lora")
        await until(lambda: loading.admitted_at is not None)
        before = long.generated
        await until(lambda: long.generated > before + 5)  # tokens flow while the adapter loads
        assert not loading.prefilled and loading.generated == 0
        assert e.adapters_in_use() == (["sql-lora"], [])  # a loading sequence counts as running
        await loading.wait()
    finally:
        await e.stop()
    assert loading.generated == 2


async def test_a_batch_holds_at_most_max_loras_adapters_and_others_wait_without_blocking_the_queue():
    e = engine(max_loras=1)
    try:
        a = submit(e, "a", max_tokens=300)
        await until(lambda: a.prefilled)
        b = submit(e, "b")
        plain = submit(e, None)  # behind b in the queue
        await plain.wait()  # b's wait does not hold it up
        assert b.admitted_at is None and not b.finished
        assert e.adapters_in_use() == (["a"], ["b"])
        assert e.lora.resident() == ["a"]  # a running sequence's adapter is never evicted
        await b.wait()
        assert a.finished_at is not None and b.admitted_at is not None and b.admitted_at >= a.finished_at
    finally:
        await e.stop()
    assert (e.lora.loads, e.lora.evictions, e.lora.resident()) == (2, 1, ["b"])


async def test_a_full_gpu_evicts_the_least_recently_used_adapter_no_running_sequence_uses():
    e = engine(max_loras=2)
    try:
        for adapter in ("a", "b", "a"):  # a was used last
            await submit(e, adapter).wait()
        assert e.lora.resident() == ["b", "a"]
        await submit(e, "c").wait()
        assert e.lora.resident() == ["a", "c"] and e.lora.evictions == 1
        # With c running, a full GPU evicts a (idle), never c.
        c = submit(e, "c", max_tokens=200)
        await until(lambda: c.prefilled)
        await submit(e, "d").wait()
        assert e.lora.resident() == ["d", "c"] and not c.finished  # c, still running, was used by the last step
    finally:
        await e.stop()


# ---- over HTTP: the OpenAI API and the metrics ---------------------------------------------


def lora_series(text: str) -> list[tuple[dict[str, str], float]]:
    return [
        (s.labels, s.value)
        for family in text_string_to_metric_families(text)
        if family.name == "vllm:lora_requests_info"
        for s in family.samples
    ]


@pytest.fixture
async def fleet():
    config = FleetConfig(
        seed=1,
        replicas=[
            ReplicaConfig(
                name="lora",
                address="127.0.0.1:0",
                models=[MODEL],
                adapters=["sql-lora", "chat-lora"],
                overrides={"max_loras": 1, "adapter_load_s": 0.01},
            ),
            ReplicaConfig(name="plain", address="127.0.0.1:0", models=[MODEL]),
        ],
    )
    running = await start_fleet(config)
    try:
        yield running
    finally:
        await running.stop()


async def test_adapters_are_served_listed_and_reported_as_vllm_does(fleet):
    url, plain_url = fleet.urls["lora"], fleet.urls["plain"]
    e = fleet.engine("lora")
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{url}/v1/models") as resp:
            listed = {m["id"]: m["parent"] for m in (await resp.json())["data"]}
        assert listed == {MODEL: None, "sql-lora": MODEL, "chat-lora": MODEL}

        long_body = {"model": "sql-lora", "prompt": "select", "max_tokens": 2000, "stream": True}
        async with session.post(f"{url}/v1/completions", json=long_body) as stream:
            await until(lambda: e.num_running == 1)
            other = {**long_body, "model": "chat-lora"}
            waiting = asyncio.create_task(session.post(f"{url}/v1/completions", json=other))
            await until(lambda: e.num_waiting == 1)
            before = time.time()
            async with session.get(f"{url}/metrics") as resp:
                series = lora_series(await resp.text())
            newest_labels, newest_at = max(series, key=lambda s: s[1])
            assert newest_labels == {
                "max_lora": "1",
                "running_lora_adapters": "sql-lora",
                "waiting_lora_adapters": "chat-lora",
            }
            assert before <= newest_at <= time.time()  # a wall-clock timestamp, as vLLM's
            stream.close()  # the client goes away: its sequence is aborted
        await until(lambda: e.adapters_in_use() == (["chat-lora"], []))
        (await waiting).close()
        await until(lambda: e.num_running == 0)

        async with session.post(f"{url}/v1/chat/completions", json={"model": "sql-lora", "messages": []}) as resp:
            assert resp.status == 400  # the adapter's requests are validated as any other
        body = {"model": "sql-lora", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        async with session.post(f"{url}/v1/chat/completions", json=body) as resp:
            assert resp.status == 200 and (await resp.json())["model"] == "sql-lora"
        async with session.post(f"{plain_url}/v1/chat/completions", json=body) as resp:
            assert resp.status == 404  # a replica without the adapter does not serve it
        async with session.get(f"{url}/metrics") as resp:
            text = await resp.text()
        newest_labels, _ = max(lora_series(text), key=lambda s: s[1])
        assert newest_labels["running_lora_adapters"] == newest_labels["waiting_lora_adapters"] == ""
        assert 'vllm:generation_tokens_total{model_name="llama-3-8b"}' in text  # counted under the base model
        async with session.get(f"{plain_url}/metrics") as resp:
            assert lora_series(await resp.text()) == []  # no LoRA, no metric (as vLLM without --enable-lora)
        async with session.get(f"{url}/sim/state") as resp:
            state = await resp.json()
    assert state["adapters"] == ["sql-lora", "chat-lora"]
    assert state["lora"]["max_loras"] == 1 and state["lora"]["resident"] == ["sql-lora"]


def test_adapter_names_are_checked():
    with pytest.raises(FleetConfigError, match=r"fleet.yaml: replicas\[0\]: .*adapters: \['m'\] are also model names"):
        FleetConfig.from_dict(
            {"replicas": [{"name": "a", "address": "127.0.0.1:1", "models": ["m"], "adapters": ["m"]}]}, "fleet.yaml"
        )
    with pytest.raises(FleetConfigError, match=r"replicas\[0\].overrides: max_loras must be a positive integer"):
        FleetConfig.from_dict(
            {"replicas": [{"name": "a", "address": "127.0.0.1:1", "models": ["m"], "overrides": {"max_loras": 0}}]},
            "fleet.yaml",
        )
