"""Load signals: engine metric parsing on realistic expositions, and the live scraper end to end.

The end-to-end tests run small aiohttp replicas on 127.0.0.1 ephemeral ports whose metrics the test
changes, stops or makes hang, because what routing depends on is how readings follow the replicas:
a change shows up in the next scrape or so, a dead replica turns unreachable with a growing age,
and a hanging one stalls nobody. They count scrapes and order events rather than time them (a loaded
machine stretches every interval); the waits are deadlines against hanging only.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiohttp import web

from controlplane.load.metrics_parsing import (
    EngineLoad,
    parse_engine_load,
    sample_values,
    select_families,
    wanted_names,
)
from controlplane.load.monitor import LoadMonitor, MonitorStopped, ScrapeTarget, targets_from_table
from protos import mesh_pb2

# ---------------------------------------------------------------- fixtures in each engine's format

VLLM_V1 = """\
# HELP python_gc_objects_collected_total Objects collected during gc
# TYPE python_gc_objects_collected_total counter
python_gc_objects_collected_total{generation="0"} 12345.0
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 7.0
vllm:num_requests_running{engine="1",model_name="meta-llama/Llama-3.1-8B-Instruct"} 5.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 3.0
vllm:num_requests_waiting{engine="1",model_name="meta-llama/Llama-3.1-8B-Instruct"} 1.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 0.5
vllm:kv_cache_usage_perc{engine="1",model_name="meta-llama/Llama-3.1-8B-Instruct"} 0.25
# HELP vllm:gpu_cache_usage_perc GPU KV-cache usage. 1 means 100 percent usage. DEPRECATED.
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 0.99
# HELP vllm:prompt_tokens_total Number of prefill tokens processed.
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 9.1234e+06
# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.001",model_name="meta-llama/Llama-3.1-8B-Instruct"} 0.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.005",model_name="meta-llama/Llama-3.1-8B-Instruct"} 12.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="+Inf",model_name="meta-llama/Llama-3.1-8B-Instruct"} 40.0
vllm:time_to_first_token_seconds_count{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 40.0
vllm:time_to_first_token_seconds_sum{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 3.25
"""

# vLLM 0.5/0.6 (V0 engine): only the older KV name, one series per model.
VLLM_V0 = """\
# HELP vllm:num_requests_running Number of requests currently running on GPU.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="mistralai/Mistral-7B-Instruct-v0.3"} 2.0
# HELP vllm:num_requests_swapped Number of requests swapped to CPU.
# TYPE vllm:num_requests_swapped gauge
vllm:num_requests_swapped{model_name="mistralai/Mistral-7B-Instruct-v0.3"} 0.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{model_name="mistralai/Mistral-7B-Instruct-v0.3"} 6.0
# HELP vllm:gpu_cache_usage_perc GPU KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{model_name="mistralai/Mistral-7B-Instruct-v0.3"} 0.8125
"""

SGLANG = """\
# HELP sglang:num_running_reqs The number of running requests.
# TYPE sglang:num_running_reqs gauge
sglang:num_running_reqs{engine_type="unified",model_name="Qwen/Qwen2.5-7B-Instruct",pp_rank="0",tp_rank="0"} 9.0
# HELP sglang:num_queue_reqs The number of requests in the waiting queue.
# TYPE sglang:num_queue_reqs gauge
sglang:num_queue_reqs{engine_type="unified",model_name="Qwen/Qwen2.5-7B-Instruct",pp_rank="0",tp_rank="0"} 4.0
# HELP sglang:token_usage The token usage.
# TYPE sglang:token_usage gauge
sglang:token_usage{engine_type="unified",model_name="Qwen/Qwen2.5-7B-Instruct",pp_rank="0",tp_rank="0"} 0.62
# HELP sglang:gen_throughput The generation throughput (token/s).
# TYPE sglang:gen_throughput gauge
sglang:gen_throughput{engine_type="unified",model_name="Qwen/Qwen2.5-7B-Instruct",pp_rank="0",tp_rank="0"} 1234.5
# HELP sglang:prompt_tokens_total Number of prefill tokens processed.
# TYPE sglang:prompt_tokens_total counter
sglang:prompt_tokens_total{model_name="Qwen/Qwen2.5-7B-Instruct"} 512000.0
"""

TRITON = """\
# HELP nv_inference_request_success Number of successful inference requests, all batch sizes
# TYPE nv_inference_request_success counter
nv_inference_request_success{model="resnet50",version="1"} 1520
nv_inference_request_success{model="bert",version="2"} 88
# HELP nv_inference_pending_request_count Instantaneous number of pending requests awaiting execution per-model.
# TYPE nv_inference_pending_request_count gauge
nv_inference_pending_request_count{model="resnet50",version="1"} 3
nv_inference_pending_request_count{model="bert",version="2"} 2
# HELP nv_gpu_utilization GPU utilization rate [0.0 - 1.0)
# TYPE nv_gpu_utilization gauge
nv_gpu_utilization{gpu_uuid="GPU-6b4f5c1e-0000-0000-0000-000000000000"} 0.75
nv_gpu_utilization{gpu_uuid="GPU-6b4f5c1e-0000-0000-0000-000000000001"} 0.25
# HELP nv_gpu_memory_total_bytes GPU total memory, in bytes
# TYPE nv_gpu_memory_total_bytes gauge
nv_gpu_memory_total_bytes{gpu_uuid="GPU-6b4f5c1e-0000-0000-0000-000000000000"} 85899345920
nv_gpu_memory_total_bytes{gpu_uuid="GPU-6b4f5c1e-0000-0000-0000-000000000001"} 85899345920
# HELP nv_gpu_memory_used_bytes GPU used memory, in bytes
# TYPE nv_gpu_memory_used_bytes gauge
nv_gpu_memory_used_bytes{gpu_uuid="GPU-6b4f5c1e-0000-0000-0000-000000000000"} 42949672960
nv_gpu_memory_used_bytes{gpu_uuid="GPU-6b4f5c1e-0000-0000-0000-000000000001"} 8589934592
# HELP nv_gpu_power_usage GPU power usage in watts
# TYPE nv_gpu_power_usage gauge
nv_gpu_power_usage{gpu_uuid="GPU-6b4f5c1e-0000-0000-0000-000000000000"} 301.5
"""

TRTLLM = """\
# HELP trtllm_num_requests_waiting Number of requests waiting to be scheduled.
# TYPE trtllm_num_requests_waiting gauge
trtllm_num_requests_waiting{model_name="llama-70b-fp8"} 11
# HELP trtllm_num_requests_running Number of requests in the active batch.
# TYPE trtllm_num_requests_running gauge
trtllm_num_requests_running{model_name="llama-70b-fp8"} 32
# HELP trtllm_kv_cache_utilization Fraction of KV-cache blocks in use.
# TYPE trtllm_kv_cache_utilization gauge
trtllm_kv_cache_utilization{model_name="llama-70b-fp8"} 0.91
# HELP trtllm_request_success_total Count of successfully processed requests.
# TYPE trtllm_request_success_total counter
trtllm_request_success_total{model_name="llama-70b-fp8",finished_reason="stop"} 4096
"""

DCGM = """\
# HELP DCGM_FI_DEV_GPU_UTIL GPU utilization (in %).
# TYPE DCGM_FI_DEV_GPU_UTIL gauge
DCGM_FI_DEV_GPU_UTIL{gpu="0",UUID="GPU-aaaa",device="nvidia0",modelName="NVIDIA H100 80GB HBM3",Hostname="node-1"} 90
DCGM_FI_DEV_GPU_UTIL{gpu="1",UUID="GPU-bbbb",device="nvidia1",modelName="NVIDIA H100 80GB HBM3",Hostname="node-1"} 70
# HELP DCGM_FI_DEV_FB_FREE Framebuffer memory free (in MiB).
# TYPE DCGM_FI_DEV_FB_FREE gauge
DCGM_FI_DEV_FB_FREE{gpu="0",UUID="GPU-aaaa",device="nvidia0",modelName="NVIDIA H100 80GB HBM3",Hostname="node-1"} 60000
DCGM_FI_DEV_FB_FREE{gpu="1",UUID="GPU-bbbb",device="nvidia1",modelName="NVIDIA H100 80GB HBM3",Hostname="node-1"} 60000
# HELP DCGM_FI_DEV_FB_USED Framebuffer memory used (in MiB).
# TYPE DCGM_FI_DEV_FB_USED gauge
DCGM_FI_DEV_FB_USED{gpu="0",UUID="GPU-aaaa",device="nvidia0",modelName="NVIDIA H100 80GB HBM3",Hostname="node-1"} 20000
DCGM_FI_DEV_FB_USED{gpu="1",UUID="GPU-bbbb",device="nvidia1",modelName="NVIDIA H100 80GB HBM3",Hostname="node-1"} 20000
"""

# vLLM 0.11-style prefill and decode histograms (two engines, buckets trimmed), beside the names
# it keeps for older dashboards: what the TTFT estimate reads.
VLLM_PREFILL = """\
# HELP vllm:request_prefill_kv_computed_tokens Histogram of new KV tokens computed during prefill.
# TYPE vllm:request_prefill_kv_computed_tokens histogram
vllm:request_prefill_kv_computed_tokens_bucket{engine="0",le="1000.0",model_name="m"} 10.0
vllm:request_prefill_kv_computed_tokens_bucket{engine="0",le="+Inf",model_name="m"} 12.0
vllm:request_prefill_kv_computed_tokens_count{engine="0",model_name="m"} 12.0
vllm:request_prefill_kv_computed_tokens_sum{engine="0",model_name="m"} 9000.0
vllm:request_prefill_kv_computed_tokens_count{engine="1",model_name="m"} 8.0
vllm:request_prefill_kv_computed_tokens_sum{engine="1",model_name="m"} 3000.0
# HELP vllm:request_prompt_tokens Number of prefill tokens processed.
# TYPE vllm:request_prompt_tokens histogram
vllm:request_prompt_tokens_count{engine="0",model_name="m"} 12.0
vllm:request_prompt_tokens_sum{engine="0",model_name="m"} 24000.0
# HELP vllm:request_prefill_time_seconds Histogram of time spent in PREFILL phase for request.
# TYPE vllm:request_prefill_time_seconds histogram
vllm:request_prefill_time_seconds_bucket{engine="0",le="0.3",model_name="m"} 12.0
vllm:request_prefill_time_seconds_bucket{engine="0",le="+Inf",model_name="m"} 12.0
vllm:request_prefill_time_seconds_count{engine="0",model_name="m"} 12.0
vllm:request_prefill_time_seconds_sum{engine="0",model_name="m"} 0.5
vllm:request_prefill_time_seconds_count{engine="1",model_name="m"} 8.0
vllm:request_prefill_time_seconds_sum{engine="1",model_name="m"} 0.25
# HELP vllm:inter_token_latency_seconds Histogram of inter-token latency in seconds.
# TYPE vllm:inter_token_latency_seconds histogram
vllm:inter_token_latency_seconds_count{engine="0",model_name="m"} 400.0
vllm:inter_token_latency_seconds_sum{engine="0",model_name="m"} 8.0
# HELP vllm:time_per_output_token_seconds Histogram of time per output token in seconds. DEPRECATED.
# TYPE vllm:time_per_output_token_seconds histogram
vllm:time_per_output_token_seconds_count{engine="0",model_name="m"} 400.0
vllm:time_per_output_token_seconds_sum{engine="0",model_name="m"} 99.0
"""

# Older vLLM: all prompt tokens (no computed-tokens histogram) and only the older per-token name.
VLLM_PREFILL_OLDER = """\
# TYPE vllm:request_prompt_tokens histogram
vllm:request_prompt_tokens_count{model_name="m"} 4.0
vllm:request_prompt_tokens_sum{model_name="m"} 2000.0
# TYPE vllm:request_prefill_time_seconds histogram
vllm:request_prefill_time_seconds_count{model_name="m"} 4.0
vllm:request_prefill_time_seconds_sum{model_name="m"} 0.4
# TYPE vllm:time_per_output_token_seconds histogram
vllm:time_per_output_token_seconds_count{model_name="m"} 10.0
vllm:time_per_output_token_seconds_sum{model_name="m"} 0.3
"""


def test_vllm_sums_queues_and_averages_kv_across_engines() -> None:
    load = parse_engine_load(VLLM_V1, "vllm")
    # The newer KV name wins over the deprecated one that vLLM still exports beside it.
    assert load == EngineLoad(waiting=4.0, running=12.0, kv_cache=pytest.approx(0.375), gpu_util=-1.0)


def test_vllm_older_kv_name() -> None:
    assert parse_engine_load(VLLM_V0, "vllm") == EngineLoad(waiting=6, running=2, kv_cache=0.8125, gpu_util=-1)


def test_sglang() -> None:
    assert parse_engine_load(SGLANG, "sglang") == EngineLoad(waiting=4, running=9, kv_cache=0.62, gpu_util=-1)


def test_triton_kv_from_gpu_memory_and_native_gpu_util() -> None:
    load = parse_engine_load(TRITON, "triton")
    assert load.waiting == 5
    assert load.running == 0  # Triton has no running-batch gauge
    assert load.kv_cache == pytest.approx((40 + 8) / 160)
    assert load.gpu_util == pytest.approx(0.5)


def test_trtllm() -> None:
    assert parse_engine_load(TRTLLM, "trtllm") == EngineLoad(waiting=11, running=32, kv_cache=0.91, gpu_util=-1)


def test_dcgm_gives_gpu_util_on_any_engine_but_not_llm_kv() -> None:
    load = parse_engine_load(VLLM_V0 + DCGM, "vllm")
    assert load.gpu_util == pytest.approx(0.8)
    # vLLM preallocates GPU memory: framebuffer use must not stand in for its KV cache.
    assert load.kv_cache == 0.8125
    no_kv = "\n".join(line for line in VLLM_V0.splitlines() if "cache_usage" not in line) + "\n" + DCGM
    assert parse_engine_load(no_kv, "vllm").kv_cache == 0.0


def test_triton_falls_back_to_dcgm_framebuffer_and_prefers_own_gpu_util() -> None:
    no_mem = "\n".join(line for line in TRITON.splitlines() if "memory" not in line) + "\n"
    load = parse_engine_load(no_mem + DCGM, "triton")
    assert load.kv_cache == pytest.approx(40000 / 160000)
    assert load.gpu_util == pytest.approx(0.5)  # nv_gpu_utilization, not DCGM's 80 %


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (VLLM_V1, "vllm"),
        (SGLANG, "sglang"),
        (TRITON, "triton"),
        (TRTLLM, "trtllm"),
    ],
)
def test_generic_detects_the_engine(text: str, expected: str) -> None:
    assert parse_engine_load(text + DCGM, "generic") == parse_engine_load(text + DCGM, expected)


def test_missing_metrics_read_as_idle_and_unknown_gpu() -> None:
    unrelated = "# TYPE process_cpu_seconds_total counter\nprocess_cpu_seconds_total 12.5\n"
    for engine in ("vllm", "sglang", "triton", "trtllm", "generic"):
        assert parse_engine_load(unrelated, engine) == EngineLoad(0.0, 0.0, 0.0, -1.0)
        assert parse_engine_load("", engine) == EngineLoad()


def test_counters_untyped_nan_and_clamping() -> None:
    text = (
        # A counter: the parser names the family without _total, the samples keep it.
        "# TYPE trtllm_num_requests_waiting counter\n"
        "trtllm_num_requests_waiting_total 3\n"
        # No TYPE line at all.
        "trtllm_num_requests_running 4\n"
        # NaN before the first step, and a value out of range.
        'trtllm_kv_cache_utilization{rank="0"} NaN\n'
        'trtllm_kv_cache_utilization{rank="1"} 1.7\n'
    )
    assert parse_engine_load(text, "trtllm") == EngineLoad(waiting=3, running=4, kv_cache=1.0, gpu_util=-1)


def test_vllm_prefill_and_decode_histograms_prefer_computed_tokens_and_per_token_latency() -> None:
    load = parse_engine_load(VLLM_V1 + VLLM_PREFILL, "vllm")
    # Summed over the engines; the computed tokens, not all prompt tokens (24000 of them).
    assert (load.prefill_tokens_sum, load.prefill_tokens_count, load.prefill_time_sum) == (12000, 20, 0.75)
    # Inter-token latency, not the deprecated per-request name beside it.
    assert (load.decode_step_sum, load.decode_step_count) == (8.0, 400.0)
    assert load.waiting == 4.0  # the gauges as before


def test_older_vllm_prefill_histograms_fall_back_to_all_prompt_tokens() -> None:
    load = parse_engine_load(VLLM_PREFILL_OLDER, "vllm")
    assert (load.prefill_tokens_sum, load.prefill_tokens_count, load.prefill_time_sum) == (2000, 4, 0.4)
    assert (load.decode_step_sum, load.decode_step_count) == (0.3, 10.0)
    # And nothing of it on a scrape without them, nor on engines without those names.
    assert parse_engine_load(VLLM_V0, "vllm").prefill_time_sum == 0.0
    assert parse_engine_load(VLLM_PREFILL, "sglang") == EngineLoad()


def test_line_selection_changes_nothing_but_speed() -> None:
    text = VLLM_V1 + DCGM
    names = wanted_names("vllm")
    full = {k: v for k, v in sample_values(text).items() if k in names}
    assert sample_values(text, names) == full
    assert "time_to_first_token" not in select_families(text, names)
    # Label values that look like metric names or contain '#' do not confuse the selection.
    tricky = 'vllm:num_requests_waiting{model_name="vllm:num_requests_running # x"} 2\n'
    assert parse_engine_load(tricky, "vllm").waiting == 2


def test_malformed_text_and_unknown_engine_raise() -> None:
    with pytest.raises(ValueError):
        parse_engine_load("vllm:num_requests_waiting not-a-number\n", "vllm")
    with pytest.raises(ValueError):
        parse_engine_load(VLLM_V1, "tgi")


def test_targets_from_table() -> None:
    table = mesh_pb2.RoutingTable(
        models=[
            mesh_pb2.Model(
                name="llama",
                versions=[
                    mesh_pb2.ModelVersion(
                        name="v1",
                        engine="vllm",
                        endpoints=[
                            mesh_pb2.Endpoint(address="10.0.0.1:8000"),
                            mesh_pb2.Endpoint(address="10.0.0.2:8000", drained=True),
                        ],
                    ),
                    mesh_pb2.ModelVersion(name="v2", engine="", endpoints=[mesh_pb2.Endpoint(address="10.0.0.3:8000")]),
                ],
            )
        ]
    )
    targets = targets_from_table(table)
    assert [(t.address, t.engine) for t in targets] == [
        ("10.0.0.1:8000", "vllm"),
        ("10.0.0.2:8000", "vllm"),
        ("10.0.0.3:8000", "generic"),
    ]
    assert ScrapeTarget("10.0.0.9:8000", "triton", metrics_port=8002).url == "http://10.0.0.9:8002/metrics"


# ---------------------------------------------------------------- end to end against live replicas

INTERVAL = 0.05
TIMEOUT = 0.3
WAIT_S = 10.0  # deadline for a condition to hold; generous, it only keeps a broken monitor from hanging
# The scrape timeout where a replica hangs: the healthy one's readings must flow long before it.
HANG_TIMEOUT = 2.0


class FakeReplica:
    """An aiohttp server on 127.0.0.1 that serves vLLM-style metrics the test can change."""

    def __init__(self) -> None:
        self.waiting = 0.0
        self.kv = 0.1
        self.extra = ""  # more exposition, appended as is
        self.hang = False
        self.status = 200
        self.hits = 0
        self._release = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def _metrics(self, request: web.Request) -> web.Response:
        self.hits += 1
        if self.hang:
            await self._release.wait()
        body = (
            "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.\n"
            "# TYPE vllm:num_requests_waiting gauge\n"
            f'vllm:num_requests_waiting{{model_name="m"}} {self.waiting}\n'
            "# TYPE vllm:num_requests_running gauge\n"
            'vllm:num_requests_running{model_name="m"} 1.0\n'
            "# TYPE vllm:kv_cache_usage_perc gauge\n"
            f'vllm:kv_cache_usage_perc{{model_name="m"}} {self.kv}\n'
        ) + self.extra
        return web.Response(text=body, status=self.status, content_type="text/plain")

    async def start(self, port: int = 0) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        self._runner = web.AppRunner(app, shutdown_timeout=0.1, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        self._release.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


@pytest.fixture
async def replicas() -> AsyncIterator[Callable[[], Awaitable[FakeReplica]]]:
    started: list[FakeReplica] = []

    async def make() -> FakeReplica:
        replica = FakeReplica()
        await replica.start()
        started.append(replica)
        return replica

    yield make
    for replica in started:
        await replica.stop()


def _by_address(report: mesh_pb2.LoadReport) -> dict[str, mesh_pb2.EndpointLoad]:
    return {e.address: e for e in report.endpoints}


Readings = list[tuple[str, EngineLoad | None, float]]


def _waiting_read(readings: Readings, address: str, since: int) -> list[float | None]:
    """The queue each scrape of ``address`` read, from the ``since``-th reading on (None: failed)."""
    return [load.waiting if load else None for addr, load, _ in readings[since:] if addr == address]


async def _until(
    monitor: LoadMonitor, predicate: Callable[[dict[str, mesh_pb2.EndpointLoad]], bool], within: float
) -> mesh_pb2.LoadReport:
    """Wait for a published report satisfying ``predicate``; fail after ``within`` seconds."""
    seq = 0
    async with asyncio.timeout(within):
        while True:
            report = await monitor.wait_for_report(seq)
            seq = report.sequence
            if predicate(_by_address(report)):
                return report


async def test_report_follows_changes_and_a_stopped_replica(replicas) -> None:
    a, b = await replicas(), await replicas()
    readings: Readings = []
    started = time.monotonic()
    monitor = LoadMonitor(
        [ScrapeTarget(a.address, "vllm"), ScrapeTarget(b.address, "vllm")],
        interval_s=INTERVAL,
        timeout_s=TIMEOUT,
        on_reading=lambda addr, load, age: readings.append((addr, load, age)),
    )
    async with monitor:
        first = await _until(monitor, lambda e: len(e) == 2 and all(x.reachable for x in e.values()), WAIT_S)
        ep = _by_address(first)[a.address]
        assert (ep.waiting, ep.running, ep.kv_cache, ep.gpu_util) == (0, 1, pytest.approx(0.1), -1)
        # In seconds, on the monitor's clock: no older than the monitor itself.
        assert 0 <= ep.age_s <= time.monotonic() - started

        a.waiting, a.kv = 7, 0.9
        changed_at = len(readings)
        await _until(
            monitor, lambda e: e[a.address].waiting == 7 and e[a.address].kv_cache == pytest.approx(0.9), WAIT_S
        )
        # The scrape in flight at the change may still read the old queue; the next one reads the new.
        assert 7 in _waiting_read(readings, a.address, changed_at)[:2], readings[changed_at:]

        await b.stop()
        down = await _until(monitor, lambda e: not e[b.address].reachable, WAIT_S)
        age1 = _by_address(down)[b.address].age_s
        # Long enough that a's every scrape since b stopped has ended, well or in a timeout.
        later = await _until(monitor, lambda e: e[b.address].age_s > age1 + 2 * TIMEOUT + 3 * INTERVAL, WAIT_S)
        assert not _by_address(later)[b.address].reachable
        assert _by_address(later)[a.address].reachable
        # a's reading was taken after b's last one: a is still scraped, b's reading only ages.
        assert _by_address(later)[a.address].age_s < _by_address(later)[b.address].age_s
        assert monitor.last_error(b.address)

        # Sequence numbers only ever grow.
        assert later.sequence > down.sequence > first.sequence

    assert any(addr == b.address and load is None for addr, load, _ in readings)
    assert any(addr == a.address and load is not None and load.waiting == 7 for addr, load, _ in readings)


async def test_http_error_is_unreachable_and_recovery_is_seen(replicas) -> None:
    a = await replicas()
    async with LoadMonitor([ScrapeTarget(a.address, "vllm")], interval_s=INTERVAL, timeout_s=TIMEOUT) as monitor:
        await _until(monitor, lambda e: a.address in e and e[a.address].reachable, WAIT_S)
        a.status = 503
        await _until(monitor, lambda e: not e[a.address].reachable, WAIT_S)
        a.status, a.waiting = 200, 3
        await _until(monitor, lambda e: e[a.address].reachable and e[a.address].waiting == 3, WAIT_S)


async def test_hanging_replica_does_not_stall_the_others(replicas) -> None:
    fast, slow = await replicas(), await replicas()
    slow.hang = True
    readings: Readings = []
    async with LoadMonitor(
        [ScrapeTarget(fast.address, "vllm"), ScrapeTarget(slow.address, "vllm")],
        interval_s=INTERVAL,
        timeout_s=HANG_TIMEOUT,
        on_reading=lambda addr, load, age: readings.append((addr, load, age)),
    ) as monitor:
        # The fast replica is reported while the slow one's first scrape still hangs (a replica is
        # reported from its first scrape's end on).
        first = await _until(monitor, lambda e: fast.address in e and e[fast.address].reachable, WAIT_S)
        assert slow.address not in _by_address(first)

        # While the slow one hangs, the fast one's changes keep flowing, each in the next scrape or so.
        for value in (1, 2, 3):
            fast.waiting = value
            changed_at = len(readings)
            report = await _until(monitor, lambda e, value=value: e[fast.address].waiting == value, WAIT_S)
            assert slow.address not in _by_address(report)
            assert value in _waiting_read(readings, fast.address, changed_at)[:2], readings[changed_at:]

        report = await _until(monitor, lambda e: slow.address in e, HANG_TIMEOUT + WAIT_S)
        slow_ep = _by_address(report)[slow.address]
        assert not slow_ep.reachable and math.isinf(slow_ep.age_s)
        assert "timed out" in monitor.last_error(slow.address)
        # The fast replica's reading is newer than the start of the scrape that timed out.
        fast_ep = _by_address(report)[fast.address]
        assert fast_ep.reachable and fast_ep.age_s < HANG_TIMEOUT


async def test_heartbeats_are_published_while_no_reading_lands(replicas) -> None:
    silent = await replicas()
    silent.hang = True
    async with LoadMonitor([ScrapeTarget(silent.address, "vllm")], interval_s=INTERVAL, timeout_s=HANG_TIMEOUT) as m:
        # Reports come although no scrape has ended: heartbeats, so that ages keep advancing.
        report = await m.wait_for_report(3, timeout=WAIT_S)
        assert not report.endpoints and silent.hits <= 1


async def test_set_targets_adds_and_removes(replicas) -> None:
    a, b = await replicas(), await replicas()
    removed: list[str] = []
    monitor = LoadMonitor(
        [ScrapeTarget(a.address, "vllm")], interval_s=INTERVAL, timeout_s=TIMEOUT, on_remove=removed.append
    )
    await monitor.start()
    try:
        await _until(monitor, lambda e: set(e) == {a.address}, WAIT_S)
        b.waiting = 5
        monitor.set_targets([ScrapeTarget(a.address, "vllm"), ScrapeTarget(b.address, "vllm")])
        await _until(monitor, lambda e: set(e) == {a.address, b.address} and e[b.address].waiting == 5, WAIT_S)

        monitor.set_targets([ScrapeTarget(b.address, "vllm")])
        assert removed == [a.address]
        await _until(monitor, lambda e: set(e) == {b.address}, WAIT_S)
        hits = a.hits
        await asyncio.sleep(4 * INTERVAL)
        assert a.hits <= hits + 1  # at most the request already in flight
        assert [t.address for t in monitor.targets] == [b.address]
    finally:
        await monitor.stop()


async def test_subscribers_stream_and_end_on_stop_without_leaking_tasks(replicas) -> None:
    a = await replicas()
    before = asyncio.all_tasks()
    monitor = LoadMonitor([ScrapeTarget(a.address, "vllm")], interval_s=INTERVAL, timeout_s=TIMEOUT)
    await monitor.start()
    assert [t for t in asyncio.all_tasks() - before if t.get_name().startswith("load-")]
    seen: list[int] = []

    async def subscribe() -> None:
        async for report in monitor.reports():
            seen.append(report.sequence)

    subscriber = asyncio.create_task(subscribe())
    await monitor.wait_for_report(3, timeout=WAIT_S)
    # Reports keep coming with no change (heartbeats without any reading: the test above).
    await monitor.wait_for_report(monitor.latest().sequence + 4, timeout=WAIT_S)

    await monitor.stop()
    await asyncio.wait_for(subscriber, 1)  # the stream ends instead of hanging
    assert seen == sorted(seen) and len(set(seen)) == len(seen) and len(seen) >= 4
    with pytest.raises(MonitorStopped):
        await monitor.wait_for_report(monitor.latest().sequence)
    # The monitor's own tasks (aiohttp's server-side connection handlers are not ours to judge).
    leftover = [t for t in asyncio.all_tasks() - before if t.get_name().startswith("load-") and not t.done()]
    assert leftover == []


async def test_wait_for_report_times_out_when_not_started() -> None:
    monitor = LoadMonitor(interval_s=INTERVAL)
    with pytest.raises(TimeoutError):
        await monitor.wait_for_report(0, timeout=0.1)
    await monitor.stop()


def test_recent_latency_comes_from_histogram_deltas_between_scrapes():
    from controlplane.load.metrics_parsing import EngineLoad, parse_engine_load
    from controlplane.load.monitor import _recent_latency

    page = (
        "# TYPE vllm:e2e_request_latency_seconds histogram\n"
        'vllm:e2e_request_latency_seconds_bucket{le="+Inf",model_name="m"} 10\n'
        'vllm:e2e_request_latency_seconds_sum{model_name="m"} 5.0\n'
        'vllm:e2e_request_latency_seconds_count{model_name="m"} 10\n'
    )
    first = parse_engine_load(page, "vllm")
    assert (first.latency_sum, first.latency_count) == (5.0, 10.0)
    # 10 more requests took 20 s in all: a mean of 2 s, smoothed with the previous 0.5 s.
    second = EngineLoad(latency_sum=25.0, latency_count=20.0)
    assert _recent_latency(first, second, 0.5) == 0.5 * 0.5 + 0.5 * 2.0
    assert _recent_latency(second, second, 1.25) == 1.25  # nothing finished: unchanged
    assert _recent_latency(second, EngineLoad(), 1.25) == 0.0  # counters reset: start over


def _prefill_page(tokens: float, requests: float, prefill_s: float, step_sum: float, steps: float) -> str:
    return (
        "# TYPE vllm:request_prefill_kv_computed_tokens histogram\n"
        f'vllm:request_prefill_kv_computed_tokens_sum{{model_name="m"}} {tokens}\n'
        f'vllm:request_prefill_kv_computed_tokens_count{{model_name="m"}} {requests}\n'
        "# TYPE vllm:request_prefill_time_seconds histogram\n"
        f'vllm:request_prefill_time_seconds_sum{{model_name="m"}} {prefill_s}\n'
        f'vllm:request_prefill_time_seconds_count{{model_name="m"}} {requests}\n'
        "# TYPE vllm:inter_token_latency_seconds histogram\n"
        f'vllm:inter_token_latency_seconds_sum{{model_name="m"}} {step_sum}\n'
        f'vllm:inter_token_latency_seconds_count{{model_name="m"}} {steps}\n'
    )


def test_ttft_signals_come_from_histogram_deltas_and_survive_quiet_windows_and_resets():
    from controlplane.load.monitor import _derive_ttft_signals, _EndpointState

    state = _EndpointState(ScrapeTarget("10.0.0.1:80", "vllm"))

    def scrape(*page: float) -> tuple[float, float, float]:
        load = parse_engine_load(_prefill_page(*page), "vllm")
        _derive_ttft_signals(state, load)
        state.load = load
        return state.prefill_tokens_per_s, state.prefill_tokens_mean, state.decode_step_s

    assert scrape(0, 0, 0, 0, 0) == (0.0, 0.0, 0.0)  # nothing served yet: not measured
    # 4 requests computed 2000 tokens in 0.5 s of prefill; 100 tokens took 2 s.
    assert scrape(2000, 4, 0.5, 2.0, 100) == (4000.0, 500.0, 0.02)
    assert scrape(2000, 4, 0.5, 2.0, 100) == (4000.0, 500.0, 0.02)  # no traffic: the last known
    # 2 more computed 3000 tokens in 0.25 s (12000/s, a mean of 1500): smoothed half and half.
    assert scrape(5000, 6, 0.75, 2.0, 100) == (8000.0, 1000.0, 0.02)
    # The replica restarted: its counters count from zero again, and so does the window.
    assert scrape(1000, 1, 0.125, 0.5, 10) == (8000.0, 1000.0, 0.035)
    assert scrape(1000, 1, 0.125, 0.5, 10)[0] == 8000.0  # and a quiet window after it keeps them


async def test_the_report_carries_the_ttft_signals(replicas) -> None:
    a = await replicas()
    a.extra = _prefill_page(2000, 4, 0.5, 2.0, 100)
    async with LoadMonitor([ScrapeTarget(a.address, "vllm")], interval_s=INTERVAL, timeout_s=TIMEOUT) as monitor:
        report = await _until(monitor, lambda e: a.address in e and e[a.address].prefill_tokens_per_s > 0, WAIT_S)
        ep = _by_address(report)[a.address]
        assert (ep.prefill_tokens_per_s, ep.prefill_tokens_mean, ep.decode_step_s) == (4000.0, 500.0, 0.02)
        # Quiet windows after it keep the rate: it is the replica's speed, not its traffic.
        later = await monitor.wait_for_report(report.sequence + 3, timeout=WAIT_S)
        assert _by_address(later)[a.address].prefill_tokens_per_s == 4000.0


SLOTS_PAGE = """\
# TYPE vllm:num_requests_max gauge
vllm:num_requests_max{model_name="chat"} 8.0
vllm:num_requests_max{model_name="chat-lora"} 8.0
"""


def test_vllm_batch_slots_are_read_once_per_engine_not_summed_over_its_models() -> None:
    # The simulated fleet exports its max_num_seqs once per model name it serves on one engine.
    assert parse_engine_load(SLOTS_PAGE, "vllm").slots == 8.0
    assert parse_engine_load(VLLM_V1, "vllm").slots == 0.0  # not exported: unknown


async def test_the_report_carries_the_batch_slots(replicas) -> None:
    a = await replicas()
    a.extra = SLOTS_PAGE
    async with LoadMonitor([ScrapeTarget(a.address, "vllm")], interval_s=INTERVAL, timeout_s=TIMEOUT) as monitor:
        report = await _until(monitor, lambda e: a.address in e and e[a.address].slots > 0, WAIT_S)
        assert _by_address(report)[a.address].slots == 8.0
