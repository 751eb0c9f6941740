"""Prometheus metrics of one replica, named as vLLM (and the DCGM exporter) name them.

The mesh scrapes these exactly as it would scrape a real vLLM server, so the names, the
``model_name`` label and the units must match vLLM's. Each replica has its own registry
(many replicas share one process). Live gauges are read from the engine at scrape time by a
custom collector, so a scrape never sees a stale value; counters and histograms are fed by
engine events.

When a replica serves several models, the queue and batch gauges are split by model (their
sum is the engine's total) while the KV-cache and GPU gauges are engine-wide and repeated
under each label. The ``extra_waiting`` fault is reported under the first model.

A replica with LoRA adapters exports ``vllm:lora_requests_info`` as vLLM does: a gauge whose value
is the wall-clock time it was last current and whose labels carry the news (``running_lora_adapters``
and ``waiting_lora_adapters``: the adapters with running / waiting sequences, comma-separated;
``max_lora``). vLLM sets a new label set each step and never removes the old ones, so a scrape
holds earlier label sets too, with earlier times: a reader takes the newest. Here the label set is
taken at scrape time, and the last few earlier ones stay on the page.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from fleet.engine import Engine, Sequence

# vLLM's own bucket boundaries.
TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
    2560.0,
)
E2E_BUCKETS = (
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
    1920.0,
    7680.0,
)
TPOT_BUCKETS = (
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
# vLLM's 1-2-5 token buckets (build_1_2_5_buckets), up to the profiles' longest context.
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

LORA_INFO = "vllm:lora_requests_info"
# vLLM's label order: max_lora, waiting_lora_adapters, running_lora_adapters.
LORA_LABELS = ("max_lora", "waiting_lora_adapters", "running_lora_adapters")
LORA_HISTORY = 8  # earlier label sets kept on the page (vLLM keeps every one)


class ReplicaMetrics:
    """The registry of one replica; implements the engine's ``EngineListener``."""

    def __init__(self, replica: str, models: list[str], lora: bool = False) -> None:
        self.replica = replica
        self.models = list(models)
        self.lora = lora  # export vllm:lora_requests_info (vLLM does only with LoRA enabled)
        r = self.registry = CollectorRegistry(auto_describe=True)
        lbl = ["model_name"]
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prefill tokens processed.", lbl, registry=r)
        self.generation_tokens = Counter("vllm:generation_tokens", "Generation tokens processed.", lbl, registry=r)
        self.prefix_queries = Counter("vllm:prefix_cache_queries", "Prefix cache queries, in tokens.", lbl, registry=r)
        self.prefix_hits = Counter("vllm:prefix_cache_hits", "Prefix cache hits, in tokens.", lbl, registry=r)
        self.preemptions = Counter(
            "vllm:num_preemptions", "Cumulative number of preemptions from the engine.", lbl, registry=r
        )
        self.request_success = Counter(
            "vllm:request_success", "Finished requests.", ["model_name", "finished_reason"], registry=r
        )
        self.ttft = Histogram(
            "vllm:time_to_first_token_seconds", "Time to first token.", lbl, buckets=TTFT_BUCKETS, registry=r
        )
        self.e2e = Histogram(
            "vllm:e2e_request_latency_seconds", "End-to-end request latency.", lbl, buckets=E2E_BUCKETS, registry=r
        )
        self.tpot = Histogram(
            "vllm:time_per_output_token_seconds",
            "Mean time per output token of a request.",
            lbl,
            buckets=TPOT_BUCKETS,
            registry=r,
        )
        self.queue_time = Histogram(
            "vllm:request_queue_time_seconds", "Time spent waiting in the queue.", lbl, buckets=E2E_BUCKETS, registry=r
        )
        # Per finished request, as vLLM observes them: the time from admission to the first token,
        # and the prompt tokens it computed (prefix-cache hits excluded).
        self.prefill_time = Histogram(
            "vllm:request_prefill_time_seconds",
            "Histogram of time spent in PREFILL phase for request.",
            lbl,
            buckets=E2E_BUCKETS,
            registry=r,
        )
        self.prefill_computed = Histogram(
            "vllm:request_prefill_kv_computed_tokens",
            "Histogram of new KV tokens computed during prefill (excluding cached tokens).",
            lbl,
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        for m in self.models:  # make every series visible from the first scrape
            for metric in (
                self.prompt_tokens,
                self.generation_tokens,
                self.prefix_queries,
                self.prefix_hits,
                self.preemptions,
                self.ttft,
                self.e2e,
                self.tpot,
                self.queue_time,
                self.prefill_time,
                self.prefill_computed,
            ):
                metric.labels(model_name=m)

    def bind(self, engine: Engine) -> None:
        """Register the live gauges that read ``engine`` at scrape time."""
        self.registry.register(_LiveGauges(engine, self.replica, self.models, self.lora))

    def render(self) -> bytes:
        """The Prometheus text exposition."""
        return generate_latest(self.registry)

    # ---- EngineListener ----------------------------------------------------------------

    def on_prefill(self, model: str, prompt_tokens: int, cached_tokens: int) -> None:
        self.prompt_tokens.labels(model_name=model).inc(prompt_tokens)
        self.prefix_queries.labels(model_name=model).inc(prompt_tokens)
        if cached_tokens:
            self.prefix_hits.labels(model_name=model).inc(cached_tokens)

    def on_first_token(self, model: str, ttft_s: float) -> None:
        self.ttft.labels(model_name=model).observe(ttft_s)

    def on_tokens(self, model: str, count: int) -> None:
        self.generation_tokens.labels(model_name=model).inc(count)

    def on_preempt(self, seq: Sequence) -> None:
        self.preemptions.labels(model_name=seq.model).inc()

    def on_finish(self, seq: Sequence) -> None:
        assert seq.finished_at is not None and seq.admitted_at is not None
        model = seq.model
        self.request_success.labels(model_name=model, finished_reason=seq.finish_reason).inc()
        self.e2e.labels(model_name=model).observe(seq.finished_at - seq.arrival)
        self.queue_time.labels(model_name=model).observe(seq.admitted_at - seq.arrival)
        prefilled_at = seq.first_token_at if seq.first_token_at is not None else seq.finished_at
        self.prefill_time.labels(model_name=model).observe(prefilled_at - seq.admitted_at)
        self.prefill_computed.labels(model_name=model).observe(seq.prompt_tokens - seq.cached_tokens)
        if seq.generated > 1 and seq.first_token_at is not None:
            self.tpot.labels(model_name=model).observe((seq.finished_at - seq.first_token_at) / (seq.generated - 1))


class _LiveGauges(Collector):
    """Queue, batch, KV-cache and DCGM gauges, computed from the engine on each scrape."""

    def __init__(self, engine: Engine, replica: str, models: list[str], lora: bool = False) -> None:
        self.engine = engine
        self.replica = replica
        self.models = models
        self.lora = lora
        self._lora_seen: collections.OrderedDict[tuple[str, str, str], float] = collections.OrderedDict()

    def collect(self) -> Iterator[Metric]:
        e = self.engine
        p = e.profile
        waiting_by, running_by = e.counts_by_model()
        kv = e.kv_usage
        waiting = GaugeMetricFamily(
            "vllm:num_requests_waiting", "Requests waiting to be processed.", labels=["model_name"]
        )
        running = GaugeMetricFamily(
            "vllm:num_requests_running", "Requests in the running batch.", labels=["model_name"]
        )
        kv_new = GaugeMetricFamily(
            "vllm:kv_cache_usage_perc", "KV-cache usage, 1 means 100 percent.", labels=["model_name"]
        )
        kv_old = GaugeMetricFamily(
            "vllm:gpu_cache_usage_perc", "GPU KV-cache usage (older name).", labels=["model_name"]
        )
        slots = GaugeMetricFamily("vllm:num_requests_max", "Batch slots (max_num_seqs).", labels=["model_name"])
        for i, m in enumerate(self.models):
            extra = e.faults.extra_waiting if i == 0 else 0
            waiting.add_metric([m], waiting_by.get(m, 0) + extra)
            running.add_metric([m], running_by.get(m, 0))
            kv_new.add_metric([m], kv)
            kv_old.add_metric([m], kv)
            slots.add_metric([m], p.max_num_seqs)
        yield from (waiting, running, kv_new, kv_old, slots)

        dcgm = ["gpu", "UUID", "device", "modelName", "Hostname"]
        values = ["0", f"GPU-sim-{self.replica}", "nvidia0", p.device_name, self.replica]
        util = GaugeMetricFamily("DCGM_FI_DEV_GPU_UTIL", "GPU utilization (in %).", labels=dcgm)
        util.add_metric(values, round(e.gpu_util))
        kv_mib = (p.memory_total_mib - p.weights_mib) * kv
        used = min(p.memory_total_mib, p.weights_mib + kv_mib)
        fb_used = GaugeMetricFamily("DCGM_FI_DEV_FB_USED", "Framebuffer memory used (in MiB).", labels=dcgm)
        fb_used.add_metric(values, round(used))
        fb_free = GaugeMetricFamily("DCGM_FI_DEV_FB_FREE", "Framebuffer memory free (in MiB).", labels=dcgm)
        fb_free.add_metric(values, round(p.memory_total_mib - used))
        yield from (util, fb_used, fb_free)
        if self.lora:
            yield self._lora_info()

    def _lora_info(self) -> GaugeMetricFamily:
        running, waiting = self.engine.adapters_in_use()
        labels = (str(self.engine.lora.max_loras), ",".join(waiting), ",".join(running))
        seen = self._lora_seen
        seen[labels] = time.time()
        seen.move_to_end(labels)
        while len(seen) > LORA_HISTORY + 1:
            seen.popitem(last=False)
        info = GaugeMetricFamily(LORA_INFO, "Running stats on lora requests.", labels=list(LORA_LABELS))
        for values, at in seen.items():
            info.add_metric(list(values), at)
        return info
