"""Seeded request streams for the routing benchmark: what is asked, and when.

Nothing is downloaded: prompts are generated words, lengths are drawn from distributions shaped
after published statistics, and every draw comes from a ``random.Random`` seeded by the caller, so
a seed gives the same requests and the same arrival times in every run.

* ``sharegpt_like``: chat requests whose prompt and output lengths follow ShareGPT as vLLM's
  paper reports it (Kwon et al., SOSP 2023, Fig. 11: mean prompt 161 tokens, mean output 338),
  drawn from log-normal distributions with those means and kept under the filter of vLLM's
  ``benchmark_serving.py`` (prompt 4..1024 tokens, prompt + output <= 2048) and an output of at
  most 1024; the output lengths are then divided by ``output_scale`` (what a cell of a thousand
  streamed requests costs this machine's CPUs is mostly output tokens, and a run lasts until its
  longest request has finished on the slowest replica);
* ``shared_prefix``: a multi-tenant workload: ``tenants`` long system prompts (thousands of
  tokens each), every request one tenant's system prompt plus a short user turn, the tenant drawn
  uniformly; the replicas' prefix caches decide what the system prompts cost;
* ``lora_mix``: ShareGPT-like requests, most of them for one of ``adapters`` LoRA adapters of the
  model (named as the ``model``, as vLLM serves them), the adapter drawn with a Zipf-like
  popularity (the i-th most popular with weight 1 / i^``zipf_s``), the rest for the base model;
  a replica's batch holds few distinct adapters, so where each adapter's requests go matters;
* ``poisson_offsets``: open-loop arrival times, exponential inter-arrival gaps at a given rate.

Prompts are words of exactly ``WORD_CHARS`` letters: the simulated fleet's tokenizer makes one
token of each (fleet/text.py), so token counts here are what the replicas count.
"""

from __future__ import annotations

import functools
import json
import math
import random
import string
from dataclasses import dataclass

from fleet.openai_api import render_messages
from fleet.text import PIECE_CHARS, tokenize

WORD_CHARS = PIECE_CHARS

# ShareGPT as vLLM's paper reports it; sigma is ours (a long right tail, as in its histograms).
SHAREGPT_PROMPT_MEAN = 161
SHAREGPT_OUTPUT_MEAN = 338
SHAREGPT_SIGMA = 1.0
# vLLM benchmark_serving.py's filter on sampled ShareGPT requests.
PROMPT_MIN, PROMPT_MAX, TOTAL_MAX = 4, 1024, 2048
OUTPUT_MIN, OUTPUT_MAX = 4, 1024  # the upper bound is ours

# The LoRA mix: the share of requests naming an adapter, and the popularity's exponent.
LORA_SHARE = 0.8
LORA_ZIPF_S = 1.0

# The shared-prefix workload.
SYSTEM_PROMPT_MIN, SYSTEM_PROMPT_MAX = 2000, 4000
USER_TURN_MEAN = 60


@dataclass(frozen=True)
class Request:
    """One streamed chat completion, encoded once before the run."""

    body: bytes
    prompt_tokens: int  # as the fleet's tokenizer counts the rendered chat
    output_tokens: int  # max_tokens: the simulated replica generates exactly this many
    tenant: int | None = None  # shared-prefix workload: whose system prompt
    model: str | None = None  # what x-model-id names when not the run's model: a LoRA adapter


def _lognormal(rng: random.Random, mean: float, sigma: float) -> float:
    """A log-normal draw with the given mean (not median)."""
    return rng.lognormvariate(math.log(mean) - sigma * sigma / 2, sigma)


def _words(rng: random.Random, count: int) -> str:
    letters = string.ascii_lowercase
    return " ".join("".join(rng.choices(letters, k=WORD_CHARS)) for _ in range(count))


def _request(
    model: str, messages: list[dict[str, str]], output_tokens: int, tenant: int | None, named: str | None = None
) -> Request:
    body = {
        "model": model,
        "messages": messages,
        "max_tokens": output_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    prompt_tokens = sum(_message_tokens(m["role"], m["content"]) for m in messages) + _template_end()
    return Request(json.dumps(body, separators=(",", ":")).encode(), prompt_tokens, output_tokens, tenant, named)


@functools.lru_cache(maxsize=256)  # a tenant's system prompt is counted once
def _message_tokens(role: str, content: str) -> int:
    """Tokens one message adds to the rendered chat: the template puts each message on its own
    line and the tokenizer splits on whitespace, so the counts of the messages add up."""
    return len(tokenize(render_messages([{"role": role, "content": content}]))) - _template_end()


@functools.cache
def _template_end() -> int:
    """Tokens the chat template adds after the last message (the assistant's turn marker)."""
    one = [{"role": "user", "content": "x"}]
    return 2 * len(tokenize(render_messages(one))) - len(tokenize(render_messages(one * 2)))


def sharegpt_lengths(rng: random.Random) -> tuple[int, int]:
    """(prompt, output) tokens of one ShareGPT-like request, before output scaling."""
    while True:
        prompt = round(_lognormal(rng, SHAREGPT_PROMPT_MEAN, SHAREGPT_SIGMA))
        output = round(_lognormal(rng, SHAREGPT_OUTPUT_MEAN, SHAREGPT_SIGMA))
        if PROMPT_MIN <= prompt <= PROMPT_MAX and OUTPUT_MIN <= output <= OUTPUT_MAX and prompt + output <= TOTAL_MAX:
            return prompt, output


def scaled_output(output: int, output_scale: float) -> int:
    return max(1, math.ceil(output / output_scale))


def sharegpt_like(seed: int, count: int, model: str, output_scale: float) -> list[Request]:
    rng = random.Random(f"sharegpt/{seed}")
    out = []
    for _ in range(count):
        prompt, output = sharegpt_lengths(rng)
        # The chat template adds a few tokens around the user's words (fleet/openai_api.py).
        messages = [{"role": "user", "content": _words(rng, prompt)}]
        out.append(_request(model, messages, scaled_output(output, output_scale), None))
    return out


def tenant_prompts(seed: int, tenants: int) -> list[str]:
    rng = random.Random(f"tenants/{seed}")
    return [_words(rng, rng.randint(SYSTEM_PROMPT_MIN, SYSTEM_PROMPT_MAX)) for _ in range(tenants)]


def shared_prefix(seed: int, count: int, model: str, tenants: int, output_scale: float) -> list[Request]:
    systems = tenant_prompts(seed, tenants)
    rng = random.Random(f"shared-prefix/{seed}")
    out = []
    for _ in range(count):
        tenant = rng.randrange(tenants)
        user = max(1, round(_lognormal(rng, USER_TURN_MEAN, SHAREGPT_SIGMA / 2)))
        _, output = sharegpt_lengths(rng)
        messages = [{"role": "system", "content": systems[tenant]}, {"role": "user", "content": _words(rng, user)}]
        out.append(_request(model, messages, scaled_output(output, output_scale), tenant))
    return out


def adapter_weights(adapters: int, zipf_s: float = LORA_ZIPF_S) -> list[float]:
    """Each adapter's share of the adapter requests, most popular first (1 / i^s, normalised)."""
    raw = [1.0 / (i + 1) ** zipf_s for i in range(adapters)]
    return [w / sum(raw) for w in raw]


def lora_mix(
    seed: int, count: int, model: str, adapters: list[str], output_scale: float, share: float = LORA_SHARE
) -> list[Request]:
    """ShareGPT-like requests, ``share`` of them for an adapter of ``model`` (Zipf-like popularity)."""
    rng = random.Random(f"lora/{seed}")
    weights = adapter_weights(len(adapters))
    out = []
    for _ in range(count):
        prompt, output = sharegpt_lengths(rng)
        adapter = rng.choices(adapters, weights)[0] if rng.random() < share else None
        messages = [{"role": "user", "content": _words(rng, prompt)}]
        out.append(_request(adapter or model, messages, scaled_output(output, output_scale), None, adapter))
    return out


def poisson_offsets(seed: int, count: int, rate: float) -> list[float]:
    """Send times (seconds from the start) of ``count`` Poisson arrivals at ``rate`` per second."""
    if rate <= 0:
        raise ValueError(f"rate must be positive, got {rate}")
    rng = random.Random(f"arrivals/{seed}")
    t = 0.0
    out = []
    for _ in range(count):
        t += rng.expovariate(rate)
        out.append(t)
    return out
