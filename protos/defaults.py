"""Defaults the spec and the ext_proc must agree on.

The spec (controlplane/spec/schema.py) fills them in when an operator leaves a field out, and the
routing table carries the result; the ext_proc falls back to the same values when a table carries
none (an older control plane, or proto3's 0 for "unset"). Two copies would drift, and the picker
would then score replicas differently from what the spec documents.

Pure Python, standard library only: protos/ is imported by both sides and imports neither.
"""

from __future__ import annotations

from typing import Literal, get_args

__all__ = [
    "DEFAULT_INFLIGHT_WEIGHT",
    "DEFAULT_KV_CACHE_WEIGHT",
    "DEFAULT_LATENCY_WEIGHT",
    "DEFAULT_PRIORITY",
    "DEFAULT_QUEUE_WEIGHT",
    "DEFAULT_SATURATION_KV",
    "DEFAULT_SATURATION_QUEUE",
    "DEFAULT_STALE_AFTER_S",
    "ENGINES",
    "Engine",
]

# The serving engines whose metrics the load monitor reads (controlplane/load/metrics_parsing.py
# knows their metric names); "generic" probes for any of them. The spec accepts exactly these.
Engine = Literal["vllm", "sglang", "triton", "trtllm", "generic"]
ENGINES: tuple[str, ...] = get_args(Engine)

# The priority class of a request that names none (or an unknown one).
DEFAULT_PRIORITY = "standard"

# Scoring (docs/spec.md): weights of each load signal in a replica's score, and the thresholds past
# which a replica counts as saturated or its reading as stale.
DEFAULT_QUEUE_WEIGHT = 2.0
DEFAULT_KV_CACHE_WEIGHT = 2.0
DEFAULT_INFLIGHT_WEIGHT = 1.0
DEFAULT_LATENCY_WEIGHT = 2.0
DEFAULT_SATURATION_QUEUE = 5.0  # requests waiting
DEFAULT_SATURATION_KV = 0.8  # KV cache in use, 0..1
DEFAULT_STALE_AFTER_S = 2.0
