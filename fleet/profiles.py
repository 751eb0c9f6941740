"""GPU profiles: how fast a replica prefills and decodes, and how much it can hold.

The numbers are shaped after an 8B-parameter model in vLLM on each device, scaled down in
KV capacity so that a demo or a test can fill a cache with a few requests. What matters for
the mesh is the ordering and the shape of the costs, not the absolute values:

* prefill costs time per uncached prompt token (compute bound);
* every engine step costs ``decode_base_s + decode_per_seq_s * batch`` (memory bound, and
  slower as the batch grows, which is what makes a loaded replica a worse pick);
* ``max_num_seqs`` bounds the batch (continuous batching slots), and
  ``kv_capacity_tokens`` bounds the tokens the running batch may hold;
* a step computes at most ``max_num_batched_tokens`` tokens (decodes first, then prefill chunks)
  when ``enable_chunked_prefill`` is on, as vLLM V1's scheduler does; off, a prompt is prefilled
  whole in the step that admits it;
* ``optimistic_admission`` (vLLM's way) admits a request when the KV cache holds its prompt and
  preempts the newest sequence when the cache runs out; off, a request is admitted only when the
  cache can hold its prompt plus ``max_tokens``, and nothing is ever preempted (fleet/scheduler.py);
* ``max_loras`` bounds the distinct LoRA adapters of one batch (and on the GPU), and loading
  an adapter that is not resident costs ``adapter_load_s`` (fleet/lora.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class GpuProfile:
    """The performance envelope of one simulated replica (all times at ``time_scale`` 1)."""

    name: str
    device_name: str  # what DCGM reports as modelName
    max_num_seqs: int  # concurrent sequence slots (continuous batching)
    kv_capacity_tokens: int  # KV cache size, in tokens
    prefill_s_per_token: float  # prefill cost per uncached prompt token
    decode_base_s: float  # fixed cost of one engine step
    decode_per_seq_s: float  # added step cost per running sequence
    max_model_len: int  # longest prompt + output a request may ask for
    block_size: int = 16  # tokens per KV / prefix-cache block
    prefix_cache_blocks: int = 4096  # LRU bound of the prefix cache
    memory_total_mib: int = 81559  # DCGM framebuffer total
    weights_mib: int = 16384  # framebuffer used by the model weights
    max_loras: int = 1  # LoRA adapters per batch and on the GPU (vLLM's --max-loras, default 1)
    adapter_load_s: float = 0.25  # loading one adapter's weights onto the GPU
    # vLLM V1's defaults for its OpenAI server: chunked prefill on, a per-step budget of 8192 tokens
    # on GPUs of 70 GiB or more other than the A100 (2048 there and below), optimistic admission
    # with recompute preemption.
    enable_chunked_prefill: bool = True
    max_num_batched_tokens: int = 8192  # tokens one step computes (decodes + prefill chunks)
    optimistic_admission: bool = True  # admit on the prompt's KV, preempt under pressure

    def with_overrides(self, overrides: dict[str, Any]) -> GpuProfile:
        """Return a copy with some fields replaced (unknown fields raise ``TypeError``)."""
        if not overrides:
            return self
        return dataclasses.replace(self, **overrides)


PROFILES: dict[str, GpuProfile] = {
    p.name: p
    for p in (
        GpuProfile(
            name="h100",
            device_name="NVIDIA H100 80GB HBM3",
            max_num_seqs=32,
            kv_capacity_tokens=65536,
            prefill_s_per_token=0.00005,
            decode_base_s=0.008,
            decode_per_seq_s=0.0002,
            max_model_len=8192,
            prefix_cache_blocks=8192,
            memory_total_mib=81559,
        ),
        GpuProfile(
            name="a100",
            device_name="NVIDIA A100-SXM4-80GB",
            max_num_seqs=24,
            kv_capacity_tokens=49152,
            prefill_s_per_token=0.0001,
            decode_base_s=0.012,
            decode_per_seq_s=0.0003,
            max_model_len=8192,
            prefix_cache_blocks=6144,
            memory_total_mib=81920,
            max_num_batched_tokens=2048,
        ),
        GpuProfile(
            name="l4",
            device_name="NVIDIA L4",
            max_num_seqs=8,
            kv_capacity_tokens=16384,
            prefill_s_per_token=0.0004,
            decode_base_s=0.03,
            decode_per_seq_s=0.002,
            max_model_len=8192,
            prefix_cache_blocks=2048,
            memory_total_mib=23034,
            max_num_batched_tokens=2048,
        ),
        GpuProfile(
            name="cpu",
            device_name="CPU",
            max_num_seqs=2,
            kv_capacity_tokens=4096,
            prefill_s_per_token=0.004,
            decode_base_s=0.12,
            decode_per_seq_s=0.02,
            max_model_len=2048,
            prefix_cache_blocks=512,
            memory_total_mib=32768,
            max_num_batched_tokens=2048,
        ),
    )
}

# Fields a replica's `overrides:` may set (the name and device stay the profile's).
OVERRIDABLE = frozenset(f.name for f in dataclasses.fields(GpuProfile)) - {"name"}


def get_profile(name: str) -> GpuProfile:
    """Look a profile up by name; ``KeyError`` names the known ones."""
    try:
        return PROFILES[name]
    except KeyError:
        raise KeyError(f"unknown GPU profile {name!r}; known: {', '.join(sorted(PROFILES))}") from None
