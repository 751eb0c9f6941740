"""What the routing benchmark's numbers say about the picker and the fast path, and what would help.

The mechanisms are described from the code (extproc/scheduler/, controlplane/load/fast_path.py); the
figures come from the run, so the text stays true when the numbers move.
"""

from __future__ import annotations

import math

from bench._routing_results import Capacity, Results, Settings, capacity_shares
from bench._routing_setups import FAST, FLEET, LEAST_REQUEST, PICKER, RANDOM, ROUND_ROBIN

SLOW = FLEET[-1].name  # the slowest replica of bench/_routing_setups.py's fleet
FASTEST = FLEET[0].name


def _share(results: Results, setup: str, workload: str, load: float, replica: str) -> float:
    s = results.get(setup, workload, load)
    if s is None or not s.sent:
        return math.nan
    return s.sent.get(replica, 0) / sum(s.sent.values())


def _pct(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.0%}"


def text(results: Results, capacities: dict[str, Capacity], settings: Settings) -> str:
    load = 0.9 if 0.9 in results.loads else max(results.loads)
    shares = capacity_shares(capacities, "sharegpt")
    slow_cap = shares.get(SLOW, math.nan)
    speed = shares.get(FASTEST, math.nan) / slow_cap if slow_cap else math.nan

    def sent(setup: str, workload: str = "sharegpt") -> str:
        return _pct(_share(results, setup, workload, load, SLOW))

    def hit(setup: str) -> str:
        s = results.get(setup, "shared-prefix", load)
        return _pct(s.hit_rate) if s else "n/a"

    cache = sum(r.profile().prefix_cache_blocks * r.profile().block_size for r in FLEET)
    smallest = min(r.profile().prefix_cache_blocks * r.profile().block_size for r in FLEET)
    return "\n".join(
        [
            "### Reading",
            "",
            f"**The slow replica decides the tail.** Under saturation `{SLOW}` gets through {_pct(slow_cap)} "
            f"of the fleet's ShareGPT-like work, `{FASTEST}` about {speed:.0f}x as much (the distribution "
            f"table). ROUND_ROBIN and RANDOM give every replica the same share, so `{SLOW}` gets a quarter of "
            f"the requests ({sent(ROUND_ROBIN.key)} and {sent(RANDOM.key)} at {load:.0%} load) and its queue "
            "grows for the whole run: what is still queued when the run ends becomes errors, and their p90 and "
            "p99 run into seconds or are ∞ (more than 10% or 1% of the requests got no token). LEAST_REQUEST "
            f"equalises outstanding requests; that one replica gets through {speed:.0f}x less work is invisible "
            f"to it: it sent `{SLOW}` {sent(LEAST_REQUEST.key)}.",
            "",
            f"**The picker's tail is the slow replica too.** It sent `{SLOW}` {sent(PICKER.key)} of the "
            f"requests at {load:.0%} ({_pct(slow_cap)} of the capacity), and its slowest requests are the ones "
            'it sent there (the targets\' "why" column): what matters is not the share but the moment, a '
            f"request sent while `{SLOW}`'s 2 slots are busy. Its scores are absolute counts, not counts "
            "relative to what a replica can do: the queue term `S/(S + waiting + n)` (S = `saturation_queue`, "
            "5) is near 1 for a replica whose slots are full but whose queue is still empty, the running-batch "
            f"term ranks `{SLOW}` (2 running) above an H100 (8 running), and the free-KV term favours the "
            "replica that holds little because it runs little. Only the latency term (`fastest/latency`, "
            "weight 2 of 8) sees the speed, and it compares how long one request takes, not how many a replica "
            "serves at once: a replica with a quarter of the slots and a third of the speed scores only "
            "somewhat lower than a fast one while its queue is empty, and gets requests until its queue shows "
            "in the next scrape (100 ms). The in-flight term decays over `max_concurrency` requests, which the "
            "spec leaves at 0 here (then `saturation_queue`, 5: more than the slow replica's 2 slots).",
            "",
            f"**The fast path** balances with Envoy's least-request on EDS weights derived from queue and KV "
            f"only (controlplane/load/fast_path.py): a replica with an empty queue weighs 100 whatever its "
            "speed, drops to 1 once saturated (queue >= 5 or KV >= 80%), and weights change at most once a "
            "second and only by 20 points or more. The slow replica therefore alternates between a full share "
            f"and almost none ({sent(FAST.key)} of the requests at {load:.0%}): least-request's tail, plus the "
            "oscillation.",
            "",
            f"**No setup keeps a tenant's prefix in one place.** The fleet's prefix caches hold {cache:,} tokens "
            f"together, the smallest {smallest:,}; the {settings.tenants} tenants' system prompts "
            f"{settings.tenant_prompt_tokens:,}. A router that kept each tenant on a replica or two (with room "
            "for load) could hit on nearly every request after the first; every setup here spreads each "
            "tenant over every replica, and the replicas report prefix-cache hit rates of "
            f"{hit(PICKER.key)} (picker), {hit(FAST.key)} (fast path), {hit(LEAST_REQUEST.key)} "
            f"(LEAST_REQUEST), {hit(ROUND_ROBIN.key)} (ROUND_ROBIN) at {load:.0%}. What the picker gains in hit "
            "rate comes from sending more of the work to the replicas with the largest caches, not from "
            "keeping tenants apart: on this workload too its advantage is load balancing.",
            "",
            "**What would close the gaps** (for the scheduler's next version): score the expected wait, not "
            "the counts: (waiting + in flight) over the replica's slots, times its time per request (the "
            "replicas export their slots as `vllm:num_requests_max`, which the load monitor does not read "
            "yet; `max_concurrency` in the spec is the manual version); a prefix-affinity scorer (hash the "
            "prompt's leading blocks, prefer the replica that served that prefix recently, with a load bound), "
            "as the Gateway API Inference Extension's prefix-cache scorer does; and for the fast path, "
            "weights that start from each replica's capacity and are then discounted by its queue.",
            "",
        ]
    )
