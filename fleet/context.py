"""How route handlers find the replica serving a request, and what they may use of it.

`ServingReplica` is that part of `fleet.replica.Replica`, so the route modules (`openai_api`,
`kserve`) depend on this module only, and `replica` imports them without an import cycle.
"""

from __future__ import annotations

from typing import Any, Protocol

from aiohttp import web

from fleet.engine import Engine, Sequence
from fleet.metrics import ReplicaMetrics
from fleet.profiles import GpuProfile


class ServingReplica(Protocol):
    """What a request's handlers use of the replica serving it (`fleet.replica.Replica` is one)."""

    @property
    def name(self) -> str: ...
    @property
    def models(self) -> list[str]: ...
    @property
    def adapters(self) -> list[str]: ...  # LoRA adapters of models[0], served when named as the model
    @property
    def version(self) -> str | None: ...  # the KServe v2 version served; None accepts any
    @property
    def seed(self) -> int: ...
    @property
    def profile(self) -> GpuProfile: ...
    @property
    def engine(self) -> Engine: ...
    @property
    def metrics(self) -> ReplicaMetrics: ...

    @property
    def ready(self) -> bool: ...  # what the readiness routes answer: not draining, no not_ready fault

    def tokenize(self, text: str) -> list[str]:
        """A prompt's pieces: the stand-in tokens, or ``#<id>`` of the replica's HF tokenizer."""
        ...

    async def apply_faults(self) -> None:
        """Stall, then maybe fail, as the active faults say (inference routes only)."""
        ...

    def check_fits(self, prompts: list[list[str]], max_tokens: int) -> None:
        """Reject (400) a request that could never fit, before any fault or queueing."""
        ...

    def check_model(self, model: str) -> None:
        """404 unless this replica serves `model` (a model or one of its adapters)."""
        ...

    def submit(
        self, model: str, tokens: list[str], max_tokens: int, *, limit_reason: str = "length", streaming: bool = False
    ) -> Sequence:
        """Queue a tokenized prompt on the engine."""
        ...

    def text_key(self, model: str, tokens: list[str], choice: int = 0) -> bytes:
        """The sampler key of a prompt: same seed, model and prompt give the same text."""
        ...

    def state(self) -> dict[str, Any]: ...


REPLICA_KEY: web.AppKey[ServingReplica] = web.AppKey("replica")


def replica_of(request: web.Request) -> ServingReplica:
    """The replica whose app is serving ``request``."""
    return request.app[REPLICA_KEY]
