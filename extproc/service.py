"""The ext_proc gRPC servicer: one bidirectional stream per HTTP request, inside Envoy's data path.

Per request: identify the model (headers first; the body only when nothing else names it, when
the model's scheduling profile ranks on the prompt: prefix affinity, or when the body's size says
it could exceed the model's context window: token budgets, extproc/budget.py), pick replicas from
live load, and answer with the route headers plus the ranked host list in
``envoy.lb`` dynamic metadata. Refusals (unknown model, shed, too large) are immediate responses
in the JSON error envelope. Until the first routing table arrives, requests pass through
untouched and Envoy routes them on its own (fail-open), as it does when this process is down.

Prefix affinity (docs/prefix-affinity.md): for a model whose profile has a prompt scorer, and
only then, the prompt is rendered and hashed into ``SchedulingRequest.prefix_hashes`` (as the
model's token ids when the spec names its tokenizer: precise mode), and after the pick the scorer
records where the request went (the primary of each routed version) in the process's prefix
index. Other requests hash nothing.

Token budgets (docs/contracts.md, "Token budgets"): a body that was read is counted (the model's
tokenizer where the spec names one and the size says it could matter, else the estimate) and the
picker refuses, 413, what fits no version's context window.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as ext
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc

from extproc.budget import could_exceed, output_tokens, requested_tokens, tokenizer_counter, window_floor
from extproc.errors import RequestError, body_too_large, model_not_found
from extproc.identify import (
    PROMPT_BODY,
    Identity,
    carries_prompt,
    carries_tokens,
    identify,
    parse_prompt_body,
    parse_request_body,
    resolve_adapter,
)
from extproc.mesh_view import MeshView
from extproc.prefix.tokens import TokenizerCache
from extproc.responses import (
    CONTINUE_BODY,
    CONTINUE_HEADERS,
    SEND_BODY,
    immediate,
    json_reply,
    route_mutation,
    routed,
)
from extproc.routing_view import AdapterView, RoutingView
from extproc.scheduler.interfaces import PromptScorer, SchedulingRequest
from extproc.scheduler.picker import Picker
from extproc.scheduler.results import Pick
from extproc.telemetry import ExtprocMetrics, TokenMeter, TokenSampler, note_model
from protos.wire import reply_details

log = logging.getLogger("imesh.extproc")


class ExternalProcessor(external_processor_pb2_grpc.ExternalProcessorServicer):
    def __init__(
        self,
        view: MeshView,
        picker: Picker | None = None,
        metrics: ExtprocMetrics | None = None,
        token_sample_rate: float = 0.0,
        tokenizers: TokenizerCache | None = None,
    ):
        self._view = view
        self._metrics = metrics or ExtprocMetrics(enabled=False)
        self._picker = picker or Picker(timer=self._metrics)
        self._sampler = TokenSampler(token_sample_rate)  # output-token counting (extproc/telemetry.py)
        self._tokenizers = tokenizers or TokenizerCache()  # the models' tokenizers (precise prefix affinity)
        # model -> the CommonResponse that selects its weighted route; built once, copied per request
        self._model_routes: dict[str, ext.CommonResponse] = {}

    async def Process(  # noqa: N802 (gRPC name)
        self, requests: AsyncIterator[ext.ProcessingRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[ext.ProcessingResponse]:
        identity: Identity | None = None
        meter: TokenMeter | None = None
        metrics = self._metrics
        async for request in requests:
            started = time.perf_counter_ns()
            phase = request.WhichOneof("request")
            if phase == "request_headers":
                identity, response = self.on_headers(request.request_headers)
                if identity is not None and self._sampler.due(identity.path) and response.HasField("request_headers"):
                    response, meter = TokenSampler.ask_for_body(response), TokenMeter()
            elif phase == "request_body":
                response = self.on_body(identity, request.request_body.body)
            elif phase == "response_body" and meter is not None:
                response = meter.feed(request.response_body, metrics)
            else:  # a phase we did not ask for (e.g. a mode change raced): let it through unchanged
                response = _continue(phase)
            metrics.decision(phase, started)
            yield response

    # ------------------------------------------------------------ phases

    def on_headers(self, message: ext.HttpHeaders) -> tuple[Identity | None, ext.ProcessingResponse]:
        view = self._view
        routing = view.routing
        if routing is None:
            return None, CONTINUE_HEADERS
        headers = {h.key: h.raw_value.decode() if h.raw_value else h.value for h in message.headers.headers}
        identity = identify(headers)
        if routing.version_header:
            identity.requested_version = headers.get(routing.version_header) or None
        if identity.models_query is not None:
            return identity, self._models_response(routing, identity.models_query)
        if identity.model is not None:
            if not message.end_of_stream:
                reads = self._reads_prompt(routing, identity, headers)
                window = self._window_to_check(routing, identity, headers)
                if isinstance(window, RequestError):
                    self._metrics.refused(routing, identity.model, identity.priority, window.code)
                    return identity, note_model(immediate(window), identity.model)
                if reads or window:
                    identity.body_kind = PROMPT_BODY
                    return identity, SEND_BODY
            return identity, self._route(
                routing,
                identity.model,
                identity.version,
                identity.priority,
                0,
                body_phase=False,
                requested=identity.requested_version,
            )
        if identity.needs_body:
            length = headers.get("content-length")
            if length is not None and length.isdigit() and int(length) > routing.max_body_bytes:
                error = body_too_large(int(length), routing.max_body_bytes)
                self._metrics.refused(routing, None, identity.priority, error.code)
                return identity, immediate(error)
            if message.end_of_stream:
                return identity, immediate(RequestError(400, "missing_body", "request has no body naming a model"))
            return identity, SEND_BODY
        # Nothing names a model on a path that is not an inference API: Envoy's routes answer (404).
        return identity, CONTINUE_HEADERS

    def on_body(self, identity: Identity | None, body: bytes) -> ext.ProcessingResponse:
        routing = self._view.routing
        kind = identity.body_kind if identity is not None else None  # None: no body was asked for
        if identity is None or routing is None or kind is None:
            return CONTINUE_BODY
        if kind == PROMPT_BODY and identity.model is not None:  # named in the headers; read for its prompt
            return self._route(
                routing,
                identity.model,
                identity.version,
                identity.priority,
                0,
                body_phase=True,
                requested=identity.requested_version,
                doc=parse_prompt_body(body, routing.max_body_bytes),
                size=len(body),
            )
        try:
            info = parse_request_body(kind, body, routing.max_body_bytes)
        except RequestError as error:
            self._metrics.refused(routing, None, identity.priority, error.code)
            return immediate(error)
        return self._route(
            routing,
            info.model,
            info.version or identity.version,
            identity.priority,
            info.tokens,
            body_phase=True,
            requested=identity.requested_version,
            doc=info.doc,
            size=len(body),
        )

    def _reads_prompt(self, routing: RoutingView, identity: Identity, headers: dict[str, str]) -> bool:
        """Whether to read the body of a request whose headers name the model, for its prompt: only
        on an endpoint whose body carries one, for a model whose profile ranks on it, and within
        the body limit (a larger body is routed on its headers alone, as without affinity)."""
        if identity.model is None or not carries_prompt(headers.get(":method"), identity.path):
            return False
        adapter = resolve_adapter(routing, identity.model)  # a LoRA adapter's: its base model's profile
        if self._picker.prompt_scorer(routing, adapter.model if adapter else identity.model) is None:
            return False
        length = headers.get("content-length")
        limit = routing.max_body_bytes
        return not (limit and length is not None and length.isdigit() and int(length) > limit)

    def _window_to_check(self, routing: RoutingView, identity: Identity, headers: dict[str, str]) -> int | RequestError:
        """For a request whose headers or path name the model: the context window its body must be
        read to check (0: none; its size says it cannot exceed the smallest window it may reach,
        or the model has none), or the 413 for a body over the limit that might exceed it. The
        output limit is in the body: a body too small to be read is not checked for it."""
        assert identity.model is not None
        if not carries_tokens(headers.get(":method"), identity.path):
            return 0
        model, version, _ = self._resolve(routing, identity.model, identity.version, identity.requested_version)
        m = routing.model(model)
        if m is None:
            return 0
        window = window_floor(m, version)
        length = headers.get("content-length")
        size = int(length) if length is not None and length.isdigit() else None
        if not could_exceed(size, window, bool(m.tokenizer)):
            return 0
        limit = routing.max_body_bytes
        if limit and size is not None and size > limit:
            return body_too_large(size, limit)
        return window

    # ------------------------------------------------------------ decisions

    def _resolve(
        self, routing: RoutingView, model: str, version: str | None, requested: str | None
    ) -> tuple[str, str | None, AdapterView | None]:
        """The model and version a request is routed as: a LoRA adapter's name becomes its base
        model (and the version only it serves), and a forced version applies where the spec
        allows it; elsewhere the header is ignored, as Envoy's fail-open routes ignore it
        (docs/canary.md)."""
        adapter = resolve_adapter(routing, model)
        if adapter is not None:
            model, version = adapter.model, version or adapter.version
        if requested is not None and version is None:
            m = routing.model(model)
            if m is not None and m.allow_version_override:
                version = requested
        return model, version, adapter

    def _count(self, routing: RoutingView, model: str, version: str | None, doc: dict, size: int, estimate: int) -> int:
        """The tokens a read body asks for: by the model's tokenizer when the spec names one and the
        body's size says it could exceed the window (tokenizing costs CPU), else the estimate
        (``estimate``, 0: not made yet). Within the bound either count fits, and scorers take either."""
        m = routing.model(model)
        tokenizer = self._tokenizers.get(m.tokenizer) if m is not None else None
        if m is None or tokenizer is None or not could_exceed(size, window_floor(m, version), True, output_tokens(doc)):
            return estimate or requested_tokens(doc)
        return requested_tokens(doc, tokenizer_counter(tokenizer))

    def _route(
        self,
        routing: RoutingView,
        model: str,
        version: str | None,
        priority: str | None,
        tokens: int,
        body_phase: bool,
        requested: str | None = None,
        doc: dict | None = None,
        size: int = 0,
    ) -> ext.ProcessingResponse:
        """``doc``: the parsed JSON body of ``size`` bytes, when one was read: its tokens are
        counted for the context-window check (``tokens`` is then the estimate, or 0), and its
        prompt read by a prompt scorer."""
        view = self._view
        model, version, adapter = self._resolve(routing, model, version, requested)
        if doc is not None:
            tokens = self._count(routing, model, version, doc, size, tokens)
        prompt: PromptScorer | None = None
        request: SchedulingRequest | None = None
        if doc is not None:
            prompt = self._picker.prompt_scorer(routing, model)
            if prompt is not None:
                m = routing.model(model)
                tokenizer = self._tokenizers.get(m.tokenizer) if m is not None else None
                hashes, block_tokens = prompt.prompt_blocks(doc, tokenizer)
                if hashes:
                    request = SchedulingRequest(tokens, hashes, block_tokens=block_tokens)
        if adapter is not None:  # for lora-affinity
            if request is None:
                request = SchedulingRequest(tokens, adapter=adapter.name)
            else:
                request.adapter = adapter.name
        result = self._picker.pick(
            routing, view.load, model, priority, view.recent_picks, version=version, tokens=tokens, request=request
        )
        if not isinstance(result, Pick):
            self._metrics.refused(routing, model, priority, result.code)
            return note_model(immediate(result.error()), model)  # the access log's model for it
        self._metrics.picked(routing, result.model, priority)
        view.note_pick(result.primaries)
        if prompt is not None and request is not None:
            hashes, now = request.prefix_hashes, time.monotonic()
            held = prompt.record(result, hashes, now)
            self._metrics.prefix_routed(len(hashes), held, self._picker.prefix.stats, now)
        if result.version is not None:
            common = route_mutation(result.model, result.version)
        else:
            common = self._model_routes.get(result.model)
            if common is None:
                common = self._model_routes.setdefault(result.model, route_mutation(result.model))
        return routed(common, result.header_value, body_phase)

    @property
    def picker(self) -> Picker:
        return self._picker

    def prepare(self) -> None:
        """After a new routing table: build its profiles, so the prefix indexes engine events feed
        exist before the first request, and load the models' tokenizers off the request path."""
        routing = self._view.routing
        if routing is None:
            return
        for name, model in routing.models.items():
            self._picker.prompt_scorer(routing, name)
            self._tokenizers.get(model.tokenizer)

    def _models_response(self, routing: RoutingView, name: str) -> ext.ProcessingResponse:
        if name == "":
            return CONTINUE_HEADERS  # GET /v1/models: Envoy answers from its route, even with us down
        body = routing.entry_body(name)  # a model's or a LoRA adapter's
        if body is None:
            return immediate(model_not_found(name))
        return json_reply(200, body, reply_details("model"))


def _continue(phase: str | None) -> ext.ProcessingResponse:
    if phase == "request_body":
        return CONTINUE_BODY
    response = ext.ProcessingResponse()
    if phase:
        getattr(response, phase).SetInParent()
    return response
