"""One simulated replica: an aiohttp app in front of an ``Engine``.

It speaks what the mesh routes to: the OpenAI API (``fleet.openai_api``), KServe v2 REST
(``fleet.kserve``), vLLM-named Prometheus metrics (``fleet.metrics``) and a small fault
injection admin under ``/sim``, plus vLLM's ``POST /reset_prefix_cache``. Every response, errors included, carries
``x-sim-replica: <name>`` so a test can tell which replica served a request that went
through the mesh.
"""

from __future__ import annotations

import asyncio
import json
import random
from typing import Any

from aiohttp import web
from pydantic import ValidationError

from fleet import kserve, openai_api
from fleet.config import ReplicaConfig
from fleet.context import REPLICA_KEY, replica_of
from fleet.engine import Engine, EngineStopped, RequestTooLarge, Sequence
from fleet.errors import ApiError, render
from fleet.kv_publisher import KVEventPublisher
from fleet.metrics import CONTENT_TYPE, ReplicaMetrics
from fleet.profiles import GpuProfile
from fleet.text import block_hashes, prompt_key
from fleet.tokenizer import TokenizerError, load_tokenize, piece_ids

REPLICA_HEADER = "x-sim-replica"


class Replica:
    """A replica's engine, metrics, faults and HTTP server."""

    def __init__(
        self, config: ReplicaConfig, *, seed: int = 0, time_scale: float = 1.0, profile: GpuProfile | None = None
    ) -> None:
        self.config = config
        self.name = config.name
        self.models = list(config.models)
        self.adapters = list(config.adapters)  # LoRA adapters of models[0], requested by name as the model
        self.version = config.version
        self.seed = seed
        self.profile = profile or config.profile()
        self.metrics = ReplicaMetrics(self.name, self.models, lora=bool(self.adapters))
        self.engine = Engine(self.name, self.profile, time_scale=time_scale, listener=self.metrics)
        self.metrics.bind(self.engine)
        try:
            self.tokenize = load_tokenize(config.tokenizer)  # text -> pieces (fleet/tokenizer.py)
        except TokenizerError as exc:
            raise ValueError(f"replica {self.name}: {exc}") from None
        self.kv_events: KVEventPublisher | None = None  # bound in start()
        # Error injection draws from its own seeded stream: reproducible under --seed.
        self._rng = random.Random(f"{seed}\x1e{self.name}")
        self.draining = False  # set by drain(): readiness fails so the mesh sends nothing new
        self.errors_injected = 0
        self._runner: web.AppRunner | None = None
        self.host = config.host
        self.port = config.port
        self.app = self._build_app()

    @property
    def address(self) -> str:
        """host:port actually listened on (the bound port when the config said 0)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    # ---- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Start the engine and listen; raises ``OSError`` naming the address on failure."""
        self.engine.start()
        # handler_cancellation: a client that goes away cancels its handler, which aborts its
        # sequence even while it is still queued (vLLM aborts a disconnected request too).
        runner = web.AppRunner(
            self.app, access_log=None, handle_signals=False, shutdown_timeout=1.0, handler_cancellation=True
        )
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.config.host, self.config.port, backlog=1024)
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            await self.engine.stop()
            raise OSError(
                exc.errno, f"replica {self.name}: cannot listen on {self.config.address}: {exc.strerror or exc}"
            ) from exc
        self._runner = runner
        self.port = runner.addresses[0][1]
        if self.config.kv_events is not None:
            try:
                self.kv_events = KVEventPublisher(self.config.kv_events)
            except OSError as exc:
                await self.stop()
                raise OSError(exc.errno, f"replica {self.name}: {exc.strerror or exc}") from None
            self.engine.cache_listener = self.kv_events

    @property
    def ready(self) -> bool:
        return not (self.draining or self.engine.faults.not_ready)

    async def drain(self, window_s: float, poll_s: float = 0.05) -> bool:
        """Fail readiness (the mesh's health checks stop sending requests here), then wait until
        the engine has nothing queued or running, at most `window_s` wall seconds; True if it emptied."""
        self.draining = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + window_s
        while self.engine.num_waiting or self.engine.num_running:
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(poll_s)
        return True

    async def stop(self) -> None:
        """Abort in-flight requests (their clients get 503) and close the listener."""
        await self.engine.stop()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self.kv_events is not None:
            self.engine.cache_listener = None
            self.kv_events.close()
            self.kv_events = None

    # ---- shared request steps ----------------------------------------------------------

    async def apply_faults(self) -> None:
        """Stall, then maybe fail, as the active faults say (inference routes only)."""
        faults = self.engine.faults
        if faults.stall_s > 0:
            await asyncio.sleep(faults.stall_s)
        if faults.error_rate > 0 and self._rng.random() < faults.error_rate:
            self.errors_injected += 1
            raise ApiError(faults.error_status, f"injected fault on replica {self.name}", code="injected_fault")

    def check_fits(self, prompts: list[list[str]], max_tokens: int) -> None:
        """Reject (400) a request that could never fit, before any fault or queueing."""
        for tokens in prompts:
            self.engine.check_fits(max(1, len(tokens)), max_tokens)

    def submit(
        self, model: str, tokens: list[str], max_tokens: int, *, limit_reason: str = "length", streaming: bool = False
    ) -> Sequence:
        """Queue a tokenized prompt on the engine (an empty prompt still costs one token); a
        ``model`` that is one of this replica's adapters runs on the base model with that adapter."""
        base, adapter = self.base_of(model)
        return self.engine.submit(
            base,
            max(1, len(tokens)),
            block_hashes(tokens, self.profile.block_size),
            max_tokens,
            limit_reason=limit_reason,
            streaming=streaming,
            adapter=adapter,
            token_ids=piece_ids(tokens) if self.kv_events is not None else None,
        )

    def base_of(self, model: str) -> tuple[str, str | None]:
        """(base model, adapter): an adapter's name resolves to the first model with that adapter,
        as vLLM serves a LoRA adapter named in a request's ``model``."""
        if model in self.adapters:
            return self.models[0], model
        return model, None

    def text_key(self, model: str, tokens: list[str], choice: int = 0) -> bytes:
        """The sampler key of a prompt: same seed, model and prompt give the same text."""
        return prompt_key(self.seed, model, tokens if choice == 0 else [*tokens, f"\x00{choice}"])

    def check_model(self, model: str) -> None:
        if model not in self.models and model not in self.adapters:
            raise ApiError(
                404,
                f"The model `{model}` does not exist on replica {self.name}.",
                type="invalid_request_error",
                code="model_not_found",
            )

    def state(self) -> dict[str, Any]:
        return {
            **self.engine.state(),
            "address": self.address,
            "models": self.models,
            "adapters": self.adapters,
            "version": self.version,
            "errors_injected": self.errors_injected,
            "kv_events": self.kv_events.state() if self.kv_events is not None else None,
        }

    # ---- app -------------------------------------------------------------------------

    def _build_app(self) -> web.Application:
        app = web.Application(middlewares=[_error_middleware], client_max_size=64 * 1024 * 1024)
        app[REPLICA_KEY] = self
        app.on_response_prepare.append(self._stamp)
        openai_api.add_routes(app)
        kserve.add_routes(app)
        app.router.add_get("/metrics", _metrics)
        app.router.add_get("/health", _health)
        app.router.add_post("/sim/faults", _set_faults)
        app.router.add_delete("/sim/faults", _reset_faults)
        app.router.add_get("/sim/faults", _get_faults)
        app.router.add_get("/sim/state", _state)
        app.router.add_post("/reset_prefix_cache", _reset_prefix_cache)
        return app

    async def _stamp(self, request: web.Request, response: web.StreamResponse) -> None:
        response.headers[REPLICA_HEADER] = self.name
        # The W3C trace context the replica was called with, so tests can see what the mesh propagated
        # (a real engine would parent its own spans on it).
        traceparent = request.headers.get("traceparent")
        if traceparent:
            response.headers["x-sim-traceparent"] = traceparent


@web.middleware
async def _error_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """Render every failure in the protocol's own error format."""
    try:
        return await handler(request)
    except ApiError as err:
        return render(request.path, err)
    except RequestTooLarge as exc:
        return render(request.path, ApiError(400, str(exc), code="context_length_exceeded"))
    except EngineStopped as exc:
        return render(request.path, ApiError(503, f"replica is stopping: {exc}", code="unavailable"))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        msg = exc.reason if exc.status != 404 else f"no route for {request.method} {request.path}"
        return render(request.path, ApiError(exc.status, msg, headers=_allow(exc)))
    except (ConnectionResetError, asyncio.CancelledError):
        raise
    except Exception as exc:  # a bug: still answer in the envelope, and say so
        request.app.logger.exception("unhandled error on %s", request.path)
        return render(request.path, ApiError(500, f"internal error: {type(exc).__name__}: {exc}"))


def _allow(exc: web.HTTPException) -> dict[str, str]:
    allow = exc.headers.get("Allow")
    return {"Allow": allow} if allow else {}


async def _metrics(request: web.Request) -> web.Response:
    body = replica_of(request).metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


async def _health(request: web.Request) -> web.Response:
    """vLLM's health route: 503 while draining or under the ``not_ready`` fault."""
    if not replica_of(request).ready:
        return web.Response(status=503)
    return web.Response(status=200)


async def _set_faults(request: web.Request) -> web.Response:
    replica = replica_of(request)
    try:
        update = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"invalid JSON: {exc}", code="invalid_json") from None
    if not isinstance(update, dict):
        raise ApiError(400, "expected a JSON object of fault settings")
    try:
        replica.engine.faults = replica.engine.faults.merged(update)
    except ValidationError as exc:
        detail = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ApiError(400, f"invalid faults: {detail}", code="invalid_faults") from None
    return web.json_response(replica.engine.faults.model_dump())


async def _reset_faults(request: web.Request) -> web.Response:
    replica = replica_of(request)
    replica.engine.faults = type(replica.engine.faults)()
    return web.json_response(replica.engine.faults.model_dump())


async def _get_faults(request: web.Request) -> web.Response:
    return web.json_response(replica_of(request).engine.faults.model_dump())


async def _reset_prefix_cache(request: web.Request) -> web.Response:
    """vLLM's route of the same name: benchmarks start each run from a cold cache."""
    return web.json_response({"dropped_blocks": replica_of(request).engine.reset_prefix_cache()})


async def _state(request: web.Request) -> web.Response:
    return web.json_response(replica_of(request).state())


__all__ = ["REPLICA_HEADER", "REPLICA_KEY", "Replica", "replica_of"]
