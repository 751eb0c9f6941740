"""A simulated GPU fleet: model replicas that behave like vLLM engines on real GPUs.

The demo (`imesh up --demo`), the end-to-end tests and the benchmarks need replicas whose
load signals are honest: a replica with a full batch really queues, a slow GPU really
decodes slower, a long prompt is prefilled in chunks between decode steps and a busy KV cache
really fills up, and then preempts (``fleet.scheduler``). That is what lets tests assert that the
mesh's load-aware picker avoids loaded or slow replicas. A replica may serve LoRA adapters of
its model, named as the request's model, with vLLM's slot limit, load time and metric
(``fleet.lora``, ``fleet.metrics``), and publish vLLM's KV-cache events over ZMQ, tokenizing
with an HF tokenizer so a router can key them (``fleet.kv_publisher``, ``fleet.tokenizer``).
Everything runs in one process and
one event loop, so a fleet of many replicas stays cheap.

Public API::

    from fleet import FleetConfig, ReplicaConfig, start_fleet
    fleet = await start_fleet(FleetConfig.load("examples/demo/fleet.yaml"))
    fleet.engine("llama-h100-a").state()
    await fleet.stop()
"""

from fleet.config import FleetConfig, FleetConfigError, ReplicaConfig
from fleet.runner import RunningFleet, RunningReplica, start_fleet

__all__ = [
    "FleetConfig",
    "FleetConfigError",
    "ReplicaConfig",
    "RunningFleet",
    "RunningReplica",
    "start_fleet",
]
