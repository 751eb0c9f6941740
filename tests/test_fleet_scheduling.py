"""The simulated engine's step under load (fleet/scheduler.py): chunked prefill and preemption.

After vLLM V1: a step computes at most ``max_num_batched_tokens`` tokens, decodes first, so a long
prompt is prefilled over several steps while the running sequences keep emitting tokens; a request
is admitted when the KV cache holds its prompt, and when the growing batch runs out of KV the most
recently admitted sequence is preempted, to be prefilled again later. Each behaviour is checked
with its profile switch off too, so a test sees the difference the switch makes.

The engine runs for real on the event loop; a recording listener (the engine's own listener
interface, the one the metrics implement) sees every step as the engine ends it.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from fleet import FleetConfig, ReplicaConfig, start_fleet
from fleet.engine import Engine, Sequence
from fleet.profiles import get_profile

MODEL = "llama-3-8b"
FAST = {"decode_base_s": 0.001, "decode_per_seq_s": 0.0, "prefill_s_per_token": 0.0}


class Recorder:
    """An engine listener that notes, at the end of every step, what a callback says."""

    def __init__(self, probe: Any = None) -> None:
        self.probe = probe  # called once per step that emitted tokens
        self.steps: list[Any] = []
        self.preempted: list[Sequence] = []
        self.on_preempted: Any = None

    def on_prefill(self, model: str, prompt_tokens: int, cached_tokens: int) -> None:
        pass

    def on_first_token(self, model: str, ttft_s: float) -> None:
        pass

    def on_tokens(self, model: str, count: int) -> None:
        if self.probe is not None:
            self.steps.append(self.probe())

    def on_finish(self, seq: Sequence) -> None:
        pass

    def on_preempt(self, seq: Sequence) -> None:
        self.preempted.append(seq)
        if self.on_preempted is not None:
            self.on_preempted(seq)


def engine(listener: Recorder, **overrides: Any) -> Engine:
    e = Engine("e", get_profile("h100").with_overrides({**FAST, **overrides}), listener=listener)
    e.start()
    return e


async def until(predicate: Any, timeout: float = 20.0) -> None:
    """Poll ``predicate()``; the timeout, generous, only keeps a broken engine from hanging."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.002)


# ---- chunked prefill ----------------------------------------------------------------------


@pytest.mark.parametrize("chunked", [True, False])
async def test_a_long_prompt_prefills_in_chunks_while_the_batch_decodes(chunked):
    budget, prompt = 256, 2000
    holder: dict[str, Sequence] = {}

    def probe() -> tuple[int, int, bool, int]:
        long = holder["long"]
        return long.computed, long.target, long.prefilled, holder["decoding"].generated

    rec = Recorder(probe)
    e = engine(rec, max_num_batched_tokens=budget, enable_chunked_prefill=chunked)
    try:
        holder["decoding"] = decoding = e.submit(MODEL, 8, [], 400)
        holder["long"] = long = e.submit(MODEL, 8, [], 1)  # a stand-in until the long one comes
        await long.wait()
        rec.steps.clear()
        holder["long"] = long = e.submit(MODEL, prompt, [], 3)
        await long.wait()
        e.abort(decoding)
    finally:
        await e.stop()
    partial = [s for s in rec.steps if 0 < s[0] < s[1] and not s[2]]
    assert long.generated == 3 and long.finish_reason == "length"
    if not chunked:
        assert partial == []  # the whole prompt in the step that admitted it
        return
    # 2000 tokens at 255 a step (one token of the budget goes to the decode): 8 steps, the last
    # one completing the prefill and emitting the first token; the decoding sequence emitted in
    # every one of them.
    assert len(partial) == 7, partial
    computed = [s[0] for s in partial]
    assert computed == [budget - 1 + i * (budget - 1) for i in range(7)]
    decoded = [s[3] for s in partial]
    assert decoded == list(range(decoded[0], decoded[0] + 7))


async def test_chunks_skip_the_cached_prefix():
    rec = Recorder()
    e = engine(rec, max_num_batched_tokens=128)
    hashes = list(range(1000, 1100))  # 100 blocks of 16 tokens: a 1600-token prompt
    try:
        first = await e.submit(MODEL, 1600, hashes, 1).wait()
        steps = e.steps
        again = await e.submit(MODEL, 1600, hashes, 1).wait()
    finally:
        await e.stop()
    assert first.cached_tokens == 0 and e.steps - steps < 3 < steps
    assert again.cached_tokens == 1599  # every block but the last token, recomputed in one step


# ---- optimistic admission and preemption --------------------------------------------------


def pressure(e: Engine, n: int = 4, prompt: int = 200, out: int = 300) -> list[Sequence]:
    """``n`` requests whose prompts fit the cache together but whose outputs do not."""
    return [e.submit(MODEL, prompt, [7000 + 100 * i + b for b in range(prompt // 16)], out) for i in range(n)]


@pytest.mark.parametrize("optimistic", [True, False])
async def test_kv_pressure_preempts_the_newest_and_everyone_completes(optimistic):
    rec = Recorder(lambda: (e.num_running, sum(e.scheduler.blocks(s.kv_tokens) for s in e._running)))
    e = engine(rec, kv_capacity_tokens=1024, optimistic_admission=optimistic)
    try:
        seqs = pressure(e)
        await asyncio.wait_for(asyncio.gather(*(s.wait() for s in seqs)), 60)
    finally:
        await e.stop()
    assert [s.generated for s in seqs] == [300] * 4
    assert {s.finish_reason for s in seqs} == {"length"}
    assert max(held for _, held in rec.steps) <= e.scheduler.capacity_blocks  # KV blocks held
    assert e.state()["preemptions"] == e.preemptions == len(rec.preempted)
    if not optimistic:
        assert e.preemptions == 0
        assert max(running for running, _ in rec.steps) == 2  # 500 tokens each, 1024 in all
        return
    assert max(running for running, _ in rec.steps) == 4  # 200-token prompts: all four at once
    assert e.preemptions >= 1
    assert seqs[0].preemptions == 0  # the oldest is never the victim
    assert rec.preempted[0] is seqs[3]  # the most recently admitted goes first


async def test_aborting_a_preempted_request_drops_it():
    rec = Recorder()
    e = engine(rec, kv_capacity_tokens=1024)
    # The first preempted request's client goes away the moment it is preempted.
    rec.on_preempted = lambda seq: e.abort(seq) if len(rec.preempted) == 1 else None
    try:
        seqs = pressure(e)
        await until(lambda: bool(rec.preempted))
        victim = rec.preempted[0]
        assert victim.finish_reason == "abort" and victim.kv_tokens == 0
        assert victim not in e._waiting and victim not in e._running
        rest = [s for s in seqs if s is not victim]
        await asyncio.wait_for(asyncio.gather(*(s.wait() for s in rest)), 60)
    finally:
        await e.stop()
    assert all(s.generated == 300 for s in rest)
    assert e.aborted == 1 and e.kv_tokens_held == 0


async def test_aborting_a_partly_prefilled_request_frees_its_kv():
    rec = Recorder()
    e = engine(rec, max_num_batched_tokens=64, decode_base_s=0.005)
    try:
        long = e.submit(MODEL, 4000, [], 5)  # 63 steps of prefill
        await until(lambda: long.started and long.computed > 0)
        assert not long.prefilled and e.kv_tokens_held == long.computed > 0
        assert e.state()["prefilling"] == 1
        e.abort(long)
        assert e.kv_tokens_held == 0 and e.num_running == 0 and long.finish_reason == "abort"
        after = await asyncio.wait_for(e.submit(MODEL, 8, [], 2).wait(), 20)  # nothing stuck
    finally:
        await e.stop()
    assert after.generated == 2


# ---- through a replica's HTTP API ---------------------------------------------------------


async def test_preemptions_in_metrics_and_state_and_full_replies():
    overrides = {**FAST, "kv_capacity_tokens": 1024, "max_num_seqs": 8}
    replica = ReplicaConfig(name="a", address="127.0.0.1:0", models=[MODEL], gpu="h100", overrides=overrides)
    prompt = " ".join(f"w{i}" for i in range(200))  # one token a word

    async with await start_fleet(FleetConfig(seed=1, replicas=[replica])) as fleet, aiohttp.ClientSession() as http:
        url = fleet["a"].url

        async def stream(tag: str) -> int:
            """Stream a completion; return how many tokens arrived (one a chunk with text)."""
            body = {"model": MODEL, "prompt": f"{tag} {prompt}", "max_tokens": 300, "stream": True}
            tokens = 0
            async with http.post(f"{url}/v1/completions", json=body) as resp:
                assert resp.status == 200
                async for line in resp.content:
                    if line.startswith(b"data: {"):
                        choices = json.loads(line[len(b"data: ") :]).get("choices")
                        tokens += bool(choices and choices[0].get("text"))
            return tokens

        got = await asyncio.wait_for(asyncio.gather(*(stream(t) for t in "abcd")), 60)
        async with http.get(f"{url}/metrics") as resp:
            text = await resp.text()
        async with http.get(f"{url}/sim/state") as resp:
            state = await resp.json()
    samples = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    assert got == [300] * 4
    assert state["preemptions"] >= 1
    assert samples["vllm:num_preemptions_total"] == state["preemptions"]
    assert state["served"] == 4 and state["kv_tokens_held"] == 0
