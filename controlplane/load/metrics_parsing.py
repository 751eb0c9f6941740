"""Turn one replica's Prometheus exposition into the few load numbers routing needs.

Each serving engine names its queue, batch and KV-cache gauges differently; this module is the one
place that knows those names, so the rest of the mesh deals only in :class:`EngineLoad`. Parsing is
done by ``prometheus_client.parser`` (escaping, label quoting, NaN/Inf and ``:`` in names are its
problem, not ours). We only pre-select the lines of the metric families we want before handing the
text to it, because a vLLM scrape is mostly histogram buckets and the monitor reads every replica
ten times a second.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from protos.defaults import ENGINES  # the spec accepts the same list


@dataclass(frozen=True, slots=True)
class EngineLoad:
    """A replica's load at one instant, engine-neutral.

    ``kv_cache`` and ``gpu_util`` are fractions in 0..1; ``gpu_util`` is -1 when nothing on the
    scrape reports it, so a scorer can tell "idle" from "unknown".
    """

    waiting: float = 0.0
    running: float = 0.0
    kv_cache: float = 0.0
    gpu_util: float = -1.0
    # Cumulative end-to-end latency (histogram sum and count); the monitor turns deltas between
    # scrapes into a recent mean latency, which is what converts "requests sent" into "in flight".
    latency_sum: float = 0.0
    latency_count: float = 0.0
    # Cumulative prefill histograms (sums and counts), turned into rates between scrapes by the
    # monitor: prompt tokens computed over prefill seconds is the prefill rate, the tokens' sum over
    # their count the mean prompt of a request; the decode step is the per-token histogram's mean.
    prefill_tokens_sum: float = 0.0
    prefill_tokens_count: float = 0.0
    prefill_time_sum: float = 0.0
    decode_step_sum: float = 0.0
    decode_step_count: float = 0.0
    # LoRA (vLLM's vllm:lora_requests_info): the adapters with running or waiting sequences, running
    # ones first; and how many distinct adapters a batch may hold (0 = the engine does not say).
    adapters: tuple[str, ...] = ()
    max_adapters: int = 0
    # Batch slots (max_num_seqs): how many requests run at once, what turns a queue into a wait.
    # 0 = the engine does not say.
    slots: float = 0.0


@dataclass(frozen=True, slots=True)
class _EngineNames:
    """Metric names of one engine. Within each tuple the first name present wins (newest first)."""

    waiting: tuple[str, ...] = ()
    running: tuple[str, ...] = ()
    slots: tuple[str, ...] = ()  # gauge of the batch slots (max_num_seqs)
    kv_cache: tuple[str, ...] = ()
    gpu_util: tuple[str, ...] = ()  # engine-native, already 0..1
    latency: str = ""  # histogram family of end-to-end request latency in seconds
    # Histogram families of one request's prefill: the prompt tokens it computed and the seconds it
    # took. Both must be observed for the same requests (vLLM: when a request finishes), or a
    # window's tokens and seconds would belong to different requests.
    prefill_tokens: tuple[str, ...] = ()
    prefill_time: tuple[str, ...] = ()
    decode_step: tuple[str, ...] = ()  # histogram families of the time per output token, seconds
    # Gauge whose newest sample's labels list the active LoRA adapters (running_lora_adapters,
    # waiting_lora_adapters: comma-separated) and max_lora; its value is the time it was set.
    lora_info: str = ""
    # Only where the engine's own KV signal *is* GPU memory (Triton). vLLM, SGLang and TRT-LLM
    # preallocate most of the GPU at start, so memory in use says nothing about their KV pressure
    # and would make every replica look saturated.
    kv_from_memory: bool = False

    def all_names(self) -> tuple[str, ...]:
        latency = (self.latency + "_sum", self.latency + "_count") if self.latency else ()
        histograms = tuple(
            family + suffix
            for family in self.prefill_tokens + self.prefill_time + self.decode_step
            for suffix in ("_sum", "_count")
        )
        lora = (self.lora_info,) if self.lora_info else ()
        return self.waiting + self.running + self.slots + self.kv_cache + self.gpu_util + latency + histograms + lora


_NAMES: dict[str, _EngineNames] = {
    "vllm": _EngineNames(
        waiting=("vllm:num_requests_waiting",),
        running=("vllm:num_requests_running",),
        slots=("vllm:num_requests_max",),
        kv_cache=("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"),
        latency="vllm:e2e_request_latency_seconds",
        # Tokens actually computed (prefix-cache hits excluded, newer releases) before all prompt
        # tokens (older ones, which overstate the rate of a replica with many cache hits).
        prefill_tokens=("vllm:request_prefill_kv_computed_tokens", "vllm:request_prompt_tokens"),
        prefill_time=("vllm:request_prefill_time_seconds",),
        # Per token (one engine step each) before the per-request means of older and newer releases.
        decode_step=(
            "vllm:inter_token_latency_seconds",
            "vllm:time_per_output_token_seconds",
            "vllm:request_time_per_output_token_seconds",
        ),
        lora_info="vllm:lora_requests_info",
    ),
    "sglang": _EngineNames(
        waiting=("sglang:num_queue_reqs",),
        running=("sglang:num_running_reqs",),
        kv_cache=("sglang:token_usage",),
        latency="sglang:e2e_request_latency_seconds",
    ),
    "trtllm": _EngineNames(
        waiting=("trtllm_num_requests_waiting",),
        running=("trtllm_num_requests_running",),
        kv_cache=("trtllm_kv_cache_utilization",),
    ),
    "triton": _EngineNames(
        waiting=("nv_inference_pending_request_count",),
        gpu_util=("nv_gpu_utilization",),
        kv_from_memory=True,
    ),
}

# Order in which "generic" probes engines: the first whose own names appear on the scrape is used.
_GENERIC_ORDER = ("vllm", "sglang", "trtllm", "triton")

_TRITON_MEM_USED = "nv_gpu_memory_used_bytes"
_TRITON_MEM_TOTAL = "nv_gpu_memory_total_bytes"
_DCGM_UTIL = "DCGM_FI_DEV_GPU_UTIL"  # percent, 0..100
_DCGM_FB_USED = "DCGM_FI_DEV_FB_USED"  # MiB
_DCGM_FB_FREE = "DCGM_FI_DEV_FB_FREE"  # MiB
_SHARED_NAMES = (_TRITON_MEM_USED, _TRITON_MEM_TOTAL, _DCGM_UTIL, _DCGM_FB_USED, _DCGM_FB_FREE)
# The families whose labels are read, not only their values.
_LABELLED = frozenset(n.lora_info for n in _NAMES.values() if n.lora_info)
_RUNNING_ADAPTERS = "running_lora_adapters"
_WAITING_ADAPTERS = "waiting_lora_adapters"
_MAX_ADAPTERS = "max_lora"

# Label sets with their values, by sample name (only for the families in _LABELLED).
Labelled = dict[str, list[tuple[dict[str, str], float]]]


def wanted_names(engine: str) -> frozenset[str]:
    """Every sample name that :func:`parse_engine_load` may read for ``engine``."""
    engines = _GENERIC_ORDER if engine == "generic" else (_engine_key(engine),)
    names: set[str] = set(_SHARED_NAMES)
    for key in engines:
        names.update(_NAMES[key].all_names())
    return frozenset(names)


def _engine_key(engine: str) -> str:
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; expected one of {', '.join(ENGINES)}")
    return engine


def select_families(text: str, names: frozenset[str]) -> str:
    """Keep only the sample, HELP and TYPE lines of the named metrics.

    This does not interpret values or labels (the real parser still does); it only drops whole
    lines by their leading metric name, which cuts parse time on histogram-heavy scrapes by an
    order of magnitude. Counters' ``_total`` samples are matched too.
    """
    kept: list[str] = []
    for line in text.splitlines():
        if not line:
            continue
        if line[0] == "#":
            parts = line.split(None, 3)
            if len(parts) >= 3 and parts[1] in ("HELP", "TYPE") and _wanted(parts[2], names):
                kept.append(line)
            continue
        end = len(line)
        for sep in ("{", " ", "\t"):
            i = line.find(sep)
            if i != -1 and i < end:
                end = i
        if _wanted(line[:end], names):
            kept.append(line)
    kept.append("")
    return "\n".join(kept)


def _wanted(name: str, names: frozenset[str]) -> bool:
    return name in names or (name.endswith("_total") and name[:-6] in names)


def sample_values(text: str, names: frozenset[str] | None = None) -> dict[str, list[float]]:
    """Map each sample name to its values, one per label set, parsed by prometheus_client.

    Keyed by *sample* name, not family name: the parser strips ``_total`` from a counter family's
    name but keeps it on the samples, so the sample name is the stable key. NaN values (engines
    emit them before the first step) are dropped. ``names`` restricts the result and enables the
    line pre-selection. Raises ``ValueError`` on malformed exposition.
    """
    return _samples(text, names)[0]


def _samples(text: str, names: frozenset[str] | None = None) -> tuple[dict[str, list[float]], Labelled]:
    """``sample_values``, and the label sets of the ``_LABELLED`` families' samples."""
    if names is not None:
        text = select_families(text, names)
    values: dict[str, list[float]] = {}
    labelled: Labelled = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if names is not None and not _wanted(sample.name, names):
                continue
            value = float(sample.value)
            if math.isnan(value):
                continue
            values.setdefault(sample.name, []).append(value)
            if sample.name in _LABELLED:
                labelled.setdefault(sample.name, []).append((sample.labels, value))
    return values, labelled


def _first(values: dict[str, list[float]], candidates: Iterable[str]) -> list[float] | None:
    for name in candidates:
        for key in (name, name + "_total"):
            found = values.get(key)
            if found:
                return found
    return None


def _sum(series: list[float] | None) -> float:
    return max(0.0, sum(series)) if series else 0.0


def _largest(series: list[float] | None) -> float:
    """The largest sample, 0 for none: an engine's slots, labelled once per model it serves."""
    return max(series) if series else 0.0


def _mean(series: list[float] | None) -> float | None:
    # Fractions are averaged, not summed: several series of a fraction are several engines or GPUs
    # (data-parallel ranks, multi-GPU hosts), and their sum would exceed 1.
    return sum(series) / len(series) if series else None


def _histogram(values: dict[str, list[float]], families: Iterable[str]) -> tuple[float, float]:
    """``(sum, count)`` of the first histogram family with a ``_count`` on the scrape, each summed
    over its series (engines, models); ``(0, 0)`` when none is there."""
    for family in families:
        count = values.get(family + "_count")
        if count:
            return _sum(values.get(family + "_sum")), _sum(count)
    return 0.0, 0.0


def _clamp01(value: float) -> float:
    return min(1.0, max(0.0, value))


def _memory_fraction(values: dict[str, list[float]]) -> float | None:
    used, total = values.get(_TRITON_MEM_USED), values.get(_TRITON_MEM_TOTAL)
    if used and total and sum(total) > 0:
        return sum(used) / sum(total)
    used, free = values.get(_DCGM_FB_USED), values.get(_DCGM_FB_FREE)
    if used and free and sum(used) + sum(free) > 0:
        return sum(used) / (sum(used) + sum(free))
    return None


def detect_engine(values: dict[str, list[float]]) -> str | None:
    """The first engine whose own metric names appear in ``values``, or None."""
    for key in _GENERIC_ORDER:
        if _first(values, _NAMES[key].all_names()) is not None:
            return key
    return None


def _adapter_names(value: str | None) -> list[str]:
    return [name for name in (part.strip() for part in (value or "").split(",")) if name]


def _lora(series: list[tuple[dict[str, str], float]] | None) -> tuple[tuple[str, ...], int]:
    """(active adapters, max adapters) from the newest sample of a LoRA info gauge.

    vLLM sets a new label set each step and keeps the old ones, with older timestamps as values:
    only the newest is current. Its running and waiting adapters together are the active ones.
    """
    if not series:
        return (), 0
    labels = max(series, key=lambda sample: sample[1])[0]
    active = dict.fromkeys(_adapter_names(labels.get(_RUNNING_ADAPTERS)))
    active.update(dict.fromkeys(_adapter_names(labels.get(_WAITING_ADAPTERS))))
    limit = labels.get(_MAX_ADAPTERS, "")
    return tuple(active), int(limit) if limit.isdigit() else 0


def load_from_values(values: dict[str, list[float]], engine: str, labelled: Labelled | None = None) -> EngineLoad:
    """Reduce parsed samples to an :class:`EngineLoad`; missing metrics read as 0 (gpu as -1).
    ``labelled``: the label sets of ``_LABELLED`` families (the LoRA adapters), if parsed."""
    key = _engine_key(engine)
    if key == "generic":
        key = detect_engine(values) or "generic"
    names = _NAMES.get(key, _EngineNames())

    kv = _mean(_first(values, names.kv_cache))
    if kv is None and names.kv_from_memory:
        kv = _memory_fraction(values)

    gpu = _mean(_first(values, names.gpu_util))
    if gpu is None:
        dcgm = _mean(values.get(_DCGM_UTIL))
        gpu = None if dcgm is None else dcgm / 100.0
    adapters, max_adapters = _lora(labelled.get(names.lora_info)) if labelled and names.lora_info else ((), 0)

    prefill_tokens_sum, prefill_tokens_count = _histogram(values, names.prefill_tokens)
    prefill_time_sum, _ = _histogram(values, names.prefill_time)
    decode_step_sum, decode_step_count = _histogram(values, names.decode_step)
    return EngineLoad(
        waiting=_sum(_first(values, names.waiting)),
        running=_sum(_first(values, names.running)),
        kv_cache=0.0 if kv is None else _clamp01(kv),
        gpu_util=-1.0 if gpu is None else _clamp01(gpu),
        latency_sum=_sum(values.get(names.latency + "_sum")) if names.latency else 0.0,
        latency_count=_sum(values.get(names.latency + "_count")) if names.latency else 0.0,
        prefill_tokens_sum=prefill_tokens_sum,
        prefill_tokens_count=prefill_tokens_count,
        prefill_time_sum=prefill_time_sum,
        decode_step_sum=decode_step_sum,
        decode_step_count=decode_step_count,
        adapters=adapters,
        max_adapters=max_adapters,
        slots=_largest(_first(values, names.slots)),
    )


def parse_engine_load(text: str, engine: str) -> EngineLoad:
    """Parse one scrape of a replica running ``engine`` (vllm|sglang|triton|trtllm|generic).

    Raises ``ValueError`` for an unknown engine or malformed exposition text; the caller treats
    the latter as a failed scrape, since a half-read page would report a falsely idle replica.
    """
    values, labelled = _samples(text, wanted_names(engine))
    return load_from_values(values, engine, labelled)
