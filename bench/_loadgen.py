"""The routing benchmark's load generator: streamed chat completions over aiohttp, on loopback.

* ``open_loop``: every request is sent at its scheduled time whether or not earlier ones have
  finished (so a slow system cannot slow the arrivals down and hide its own queueing); latencies
  are measured from the *scheduled* time, so a client that falls behind its schedule shows up in
  them instead of hiding them (``Run.max_lag_s`` says how far behind it fell). The run is bounded:
  what has not finished ``grace_s`` after the last arrival is cancelled and counted as an error.
  Throughput is what arrived while requests were arriving (from the ``WARMUP_FRACTION`` point of
  the schedule, once the fleet has filled, to the last scheduled send): the rate the system
  delivered under that offered load, not diluted by the drain of the last ones.
* ``closed_loop``: ``concurrency`` clients, each sending its next request when the last one ended:
  enough of them and every replica has a queue, which is how fleet capacity is measured.

TTFT is when the first content token arrives: the replicas' first SSE event carries only the
assistant's role, every later one a token (``"delta":{"content":...}``), and the bytes are scanned
for that, not parsed, so the client spends little CPU per token.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import aiohttp

from bench._workload import Request
from fleet.replica import REPLICA_HEADER  # which simulated replica answered
from protos.wire import MODEL_ID_HEADER

PATH = "/v1/chat/completions"
TOKEN_EVENT = b'"delta":{"content":'  # in every SSE event that carries a generated token
ERROR_EVENT = b'"error":'  # an error the replica reports inside the stream

WARMUP_FRACTION = 0.1  # of an open loop's schedule, before its throughput window starts

T = TypeVar("T")


@dataclass
class Outcome:
    """One request as the client saw it; times in seconds on the loop's clock."""

    scheduled: float
    sent: float | None = None
    first_token: float | None = None
    finished: float | None = None
    tokens: int = 0
    replica: str | None = None
    error: str | None = None  # None: a complete 200 stream
    group: str | None = None  # what it shares with other requests: its tenant's prefix, its LoRA adapter

    @property
    def ok(self) -> bool:
        return self.error is None and self.finished is not None

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.scheduled

    @property
    def e2e(self) -> float | None:
        return self.finished - self.scheduled if self.ok and self.finished is not None else None


@dataclass
class Run:
    outcomes: list[Outcome]
    window_s: float  # the throughput window: the warm-up's end to the last scheduled send
    window_tokens: int  # output tokens received in that window
    window_completions: int  # requests that completed (fine) in it
    max_lag_s: float  # how late the client sent its latest request


def _session() -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(limit=0)  # one connection per concurrent stream, kept alive
    return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None, sock_connect=5))


async def _stream(
    session: aiohttp.ClientSession,
    url: str,
    headers: dict[str, str],
    request: Request,
    outcome: Outcome,
    on_tokens: Callable[[float, int], None] | None = None,
) -> None:
    loop = asyncio.get_running_loop()
    outcome.sent = loop.time()
    try:
        async with session.post(url, data=request.body, headers=headers) as response:
            outcome.replica = response.headers.get(REPLICA_HEADER)
            if response.status != 200:
                outcome.error = f"HTTP {response.status}"
                await response.read()
                return
            tail = b""
            async for chunk in response.content.iter_any():
                data = tail + chunk
                count = data.count(TOKEN_EVENT)
                if count:
                    now = loop.time()
                    if outcome.first_token is None:
                        outcome.first_token = now
                    outcome.tokens += count
                    if on_tokens is not None:
                        on_tokens(now, count)
                if ERROR_EVENT in data:
                    outcome.error = "error in stream"
                tail = data[-(len(TOKEN_EVENT) - 1) :]
            outcome.finished = loop.time()
            if outcome.error is None and outcome.tokens < request.output_tokens:
                outcome.error = f"stream ended after {outcome.tokens} of {request.output_tokens} tokens"
    except (aiohttp.ClientError, OSError) as exc:
        outcome.error = type(exc).__name__


def _headers(model: str) -> dict[str, str]:
    # The model in a header as well as in the body: the fast path routes on the header only.
    return {"content-type": "application/json", MODEL_ID_HEADER: model}


def _group(request: Request) -> str | None:
    if request.tenant is not None:
        return f"tenant {request.tenant}"
    return request.model


def _named(headers: dict[str, str], request: Request) -> dict[str, str]:
    """The request's own model header when it names one (a LoRA adapter), else the run's."""
    return headers if request.model is None else _headers(request.model)


async def open_loop(
    base_url: str, model: str, requests: Sequence[Request], offsets: Sequence[float], grace_s: float
) -> Run:
    """Send ``requests[i]`` at ``offsets[i]`` seconds from now; stop ``grace_s`` after the last."""
    loop = asyncio.get_running_loop()
    url, headers = base_url + PATH, _headers(model)
    start = loop.time() + 0.05
    outcomes = [Outcome(scheduled=start + offset, group=_group(r)) for r, offset in zip(requests, offsets, strict=True)]
    window_start = outcomes[int(WARMUP_FRACTION * len(outcomes))].scheduled
    window_end = outcomes[-1].scheduled
    in_window = [0]

    def count_tokens(now: float, n: int) -> None:
        if window_start <= now <= window_end:
            in_window[0] += n

    async with _session() as session:
        tasks = []
        max_lag = 0.0
        for request, outcome in zip(requests, outcomes, strict=True):
            delay = outcome.scheduled - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            max_lag = max(max_lag, loop.time() - outcome.scheduled)
            tasks.append(
                asyncio.create_task(_stream(session, url, _named(headers, request), request, outcome, count_tokens))
            )
        _, pending = await asyncio.wait(tasks, timeout=max(0.0, window_end + grace_s - loop.time()))
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    for outcome in outcomes:
        if outcome.finished is None and outcome.error is None:
            outcome.error = f"not finished {grace_s:g} s after the last arrival"
    completions = sum(
        1 for o in outcomes if o.ok and o.finished is not None and window_start <= o.finished <= window_end
    )
    return Run(outcomes, window_end - window_start, in_window[0], completions, max_lag)


@dataclass
class Saturation(Generic[T]):
    """What a closed loop delivered between its warm-up and its end."""

    seconds: float
    requests: int
    tokens: int
    by_replica: dict[str, int] = field(default_factory=dict)
    probes: tuple[T, T] | None = None  # what ``probe`` returned at the window's start and end

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.seconds

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


async def closed_loop(
    base_url: str,
    model: str,
    requests: Sequence[Request],
    concurrency: int,
    seconds: float,
    warmup_s: float,
    probe: Callable[[], Awaitable[T]],
) -> Saturation[T]:
    """``concurrency`` clients back to back for ``seconds``; counts what finished after ``warmup_s``,
    and calls ``probe`` (e.g. the replicas' counters) when that window starts and when it ends."""
    loop = asyncio.get_running_loop()
    url, headers = base_url + PATH, _headers(model)
    begin = loop.time()
    window_start, window_end = begin + warmup_s, begin + seconds
    result: Saturation[T] = Saturation(seconds - warmup_s, 0, 0)
    feed = itertools.cycle(requests)

    def count_tokens(now: float, n: int) -> None:
        if window_start <= now <= window_end:
            result.tokens += n

    async def client() -> None:
        while loop.time() < window_end:
            outcome = Outcome(scheduled=loop.time())
            request = next(feed)
            await _stream(session, url, _named(headers, request), request, outcome, count_tokens)
            if outcome.ok and outcome.finished is not None and window_start <= outcome.finished <= window_end:
                result.requests += 1
                name = outcome.replica or "?"
                result.by_replica[name] = result.by_replica.get(name, 0) + 1

    async with _session() as session:
        tasks = [asyncio.create_task(client()) for _ in range(concurrency)]
        await asyncio.sleep(max(0.0, window_start - loop.time()))
        first = await probe()
        await asyncio.sleep(max(0.0, window_end - loop.time()))
        result.probes = (first, await probe())
        for task in tasks:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*tasks, return_exceptions=True)
    return result
