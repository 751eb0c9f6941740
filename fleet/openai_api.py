"""The OpenAI-compatible routes of a replica: chat, completions, embeddings, models.

Responses follow the OpenAI wire format closely enough for the official ``openai`` client
to parse them (including SSE streaming with ``stream_options.include_usage``), because the
mesh's end-to-end tests drive the fleet with that client. Generated text comes from the
deterministic sampler in ``fleet.text``; timing comes from the engine.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from fleet.context import ServingReplica, replica_of
from fleet.engine import EngineStopped, Sequence
from fleet.errors import ApiError
from fleet.text import embedding, embedding_base64, generated_text, generated_word, tokenize
from fleet.tokenizer import Tokenize
from protos.wire import MODEL_ID_HEADER

# Output length when the request names no max_tokens (the sequence then ends with "stop").
DEFAULT_OUTPUT_TOKENS = 16
MAX_EMBEDDING_DIM = 4096
DEFAULT_EMBEDDING_DIM = 16


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_get("/v1/models", list_models)


# ---- request parsing ----------------------------------------------------------------------


async def read_json_object(request: web.Request) -> dict[str, Any]:
    """The body as a JSON object, or a 400 in the OpenAI envelope."""
    raw = await request.read()
    try:
        body = json.loads(raw)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise ApiError(400, f"invalid JSON body: {exc}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_request")
    return body


def resolve_model(replica: ServingReplica, body: dict[str, Any], request: web.Request) -> str:
    """The body's ``model``; else the ``x-model-id`` header; else the replica's first model."""
    model = body.get("model")
    if model is None:
        model = request.headers.get(MODEL_ID_HEADER) or replica.models[0]
    if not isinstance(model, str):
        raise ApiError(400, "`model` must be a string", code="invalid_request")
    replica.check_model(model)
    return model


def output_budget(body: dict[str, Any]) -> tuple[int, str]:
    """(tokens to generate, finish_reason when reached): max_tokens → "length", default → "stop"."""
    value = body.get("max_completion_tokens", body.get("max_tokens"))
    if value is None:
        return DEFAULT_OUTPUT_TOKENS, "stop"
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ApiError(400, f"`max_tokens` must be a positive integer, got {value!r}", code="invalid_request")
    return value, "length"


def check_n(body: dict[str, Any]) -> None:
    n = body.get("n", 1)
    if n not in (1, None):
        raise ApiError(400, "the simulator supports n = 1 only", code="invalid_request")


def stream_flags(body: dict[str, Any]) -> tuple[bool, bool]:
    """(stream, include_usage)."""
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise ApiError(400, "`stream` must be a boolean", code="invalid_request")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise ApiError(400, "`stream_options` must be an object", code="invalid_request")
    return stream, bool(opts.get("include_usage"))


def render_messages(messages: Any) -> str:
    """Flatten chat messages into one prompt string, role markers included (a chat template)."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "`messages` must be a non-empty list", code="invalid_request")
    lines = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str):
            raise ApiError(400, f"messages[{i}] must be an object with a string `role`", code="invalid_request")
        content = msg.get("content")
        if content is None:
            text = ""
        elif isinstance(content, str):
            text = content
        elif isinstance(content, list):
            text = " ".join(
                str(part.get("text", "")) for part in content if isinstance(part, dict) and part.get("type") == "text"
            )
        else:
            raise ApiError(400, f"messages[{i}].content must be a string or a list of parts", code="invalid_request")
        lines.append(f"<|{msg['role']}|> {text}")
    lines.append("<|assistant|>")
    return "\n".join(lines)


def token_lists(value: Any, field: str, tokenize: Tokenize = tokenize) -> list[tuple[list[str], str]]:
    """Parse an OpenAI ``prompt``/``input``: text(s) or token id list(s) → [(tokens, text)]."""

    def is_ids(x: Any) -> bool:
        return isinstance(x, list) and bool(x) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)

    if isinstance(value, str):
        return [(tokenize(value), value)]
    if is_ids(value):
        return [([f"#{t}" for t in value], " ".join(map(str, value)))]
    if isinstance(value, list) and value:
        if all(isinstance(x, str) for x in value):
            return [(tokenize(x), x) for x in value]
        if all(is_ids(x) for x in value):
            return [([f"#{t}" for t in x], " ".join(map(str, x))) for x in value]
    raise ApiError(400, f"`{field}` must be a string, a list of strings or token id list(s)", code="invalid_request")


# ---- response pieces ----------------------------------------------------------------------


def usage(prompt: int, completion: int, cached: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


async def run_sse(
    request: web.Request,
    seq: Sequence,
    first: list[dict[str, Any]],
    per_token: Callable[[int], dict[str, Any]],
    last: Callable[[], list[dict[str, Any]]],
) -> web.StreamResponse:
    """Stream one sequence as SSE; a client that goes away aborts the sequence."""
    replica = replica_of(request)
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    try:  # a disconnect raises ConnectionResetError here; aiohttp ignores it after we abort
        await resp.prepare(request)
        for obj in first:
            await resp.write(sse(obj))
        crash_after = replica.engine.faults.crash_after_tokens
        async for index in seq.stream():
            await resp.write(sse(per_token(index)))
            if crash_after and index + 1 >= crash_after:
                _crash(request)
                return resp
        for obj in last():
            await resp.write(sse(obj))
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
    except EngineStopped as exc:  # headers are gone: report in-stream, as vLLM does
        await resp.write(
            sse(
                {
                    "error": {
                        "type": "server_error",
                        "message": f"replica is stopping: {exc}",
                        "code": "unavailable",
                        "param": None,
                    }
                }
            )
        )
        await resp.write_eof()
    finally:
        if not seq.finished:
            replica.engine.abort(seq)
    return resp


def _crash(request: web.Request) -> None:
    """The connection goes away mid-body without an end, as when the replica's process dies."""
    if request.transport is not None:
        request.transport.abort()


# ---- handlers -----------------------------------------------------------------------------


async def chat_completions(request: web.Request) -> web.StreamResponse:
    replica = replica_of(request)
    body = await read_json_object(request)
    model = resolve_model(replica, body, request)
    tokens = replica.tokenize(render_messages(body.get("messages")))
    max_tokens, reason = output_budget(body)
    stream, include_usage = stream_flags(body)
    check_n(body)
    replica.check_fits([tokens], max_tokens)
    await replica.apply_faults()

    seq = replica.submit(model, tokens, max_tokens, limit_reason=reason, streaming=stream)
    key = replica.text_key(model, tokens)
    rid = f"chatcmpl-{replica.name}-{seq.id}"
    created = int(time.time())
    base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model}

    if not stream:
        try:
            await seq.wait()
        finally:
            replica.engine.abort(seq)  # no-op when finished; frees the slot if we were cancelled
        return web.json_response(
            {
                "id": rid,
                "object": "chat.completion",
                "created": created,
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": generated_text(key, seq.generated)},
                        "logprobs": None,
                        "finish_reason": seq.finish_reason,
                    }
                ],
                "usage": usage(seq.prompt_tokens, seq.generated, seq.cached_tokens),
                "system_fingerprint": None,
            }
        )

    def per_token(i: int) -> dict[str, Any]:
        return {
            **base,
            "choices": [
                {"index": 0, "delta": {"content": generated_word(key, i)}, "logprobs": None, "finish_reason": None}
            ],
        }

    def last() -> list[dict[str, Any]]:
        out = [{**base, "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": seq.finish_reason}]}]
        if include_usage:
            out.append({**base, "choices": [], "usage": usage(seq.prompt_tokens, seq.generated, seq.cached_tokens)})
        return out

    first = [
        {
            **base,
            "choices": [
                {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
            ],
        }
    ]
    return await run_sse(request, seq, first, per_token, last)


async def completions(request: web.Request) -> web.StreamResponse:
    replica = replica_of(request)
    body = await read_json_object(request)
    model = resolve_model(replica, body, request)
    prompts = token_lists(body.get("prompt"), "prompt", replica.tokenize)
    max_tokens, reason = output_budget(body)
    stream, include_usage = stream_flags(body)
    check_n(body)
    if stream and len(prompts) > 1:
        raise ApiError(400, "the simulator streams a single prompt only", code="invalid_request")
    replica.check_fits([t for t, _ in prompts], max_tokens)
    await replica.apply_faults()

    seqs = [replica.submit(model, t, max_tokens, limit_reason=reason, streaming=stream) for t, _ in prompts]
    keys = [replica.text_key(model, t) for t, _ in prompts]
    rid = f"cmpl-{replica.name}-{seqs[0].id}"
    created = int(time.time())
    base = {"id": rid, "object": "text_completion", "created": created, "model": model}

    if not stream:
        try:
            await asyncio.gather(*(s.wait() for s in seqs))
        finally:
            for s in seqs:
                replica.engine.abort(s)
        return web.json_response(
            {
                **base,
                "choices": [
                    {
                        "index": i,
                        "text": generated_text(k, s.generated),
                        "logprobs": None,
                        "finish_reason": s.finish_reason,
                    }
                    for i, (s, k) in enumerate(zip(seqs, keys, strict=True))
                ],
                "usage": usage(
                    sum(s.prompt_tokens for s in seqs),
                    sum(s.generated for s in seqs),
                    sum(s.cached_tokens for s in seqs),
                ),
                "system_fingerprint": None,
            }
        )

    seq, key = seqs[0], keys[0]

    def per_token(i: int) -> dict[str, Any]:
        return {
            **base,
            "choices": [{"index": 0, "text": generated_word(key, i), "logprobs": None, "finish_reason": None}],
        }

    def last() -> list[dict[str, Any]]:
        out = [{**base, "choices": [{"index": 0, "text": "", "logprobs": None, "finish_reason": seq.finish_reason}]}]
        if include_usage:
            out.append({**base, "choices": [], "usage": usage(seq.prompt_tokens, seq.generated, seq.cached_tokens)})
        return out

    return await run_sse(request, seq, [], per_token, last)


async def embeddings(request: web.Request) -> web.Response:
    replica = replica_of(request)
    body = await read_json_object(request)
    model = resolve_model(replica, body, request)
    inputs = token_lists(body.get("input"), "input", replica.tokenize)
    fmt = body.get("encoding_format") or "float"
    if fmt not in ("float", "base64"):
        raise ApiError(400, "`encoding_format` must be 'float' or 'base64'", code="invalid_request")
    dim = body.get("dimensions") or DEFAULT_EMBEDDING_DIM
    if isinstance(dim, bool) or not isinstance(dim, int) or not 1 <= dim <= MAX_EMBEDDING_DIM:
        raise ApiError(400, f"`dimensions` must be an integer in 1..{MAX_EMBEDDING_DIM}", code="invalid_request")
    replica.check_fits([t for t, _ in inputs], 0)
    await replica.apply_faults()

    # Prefill only: an embedding is one engine step of prompt processing, no decode.
    seqs = [replica.submit(model, t, 0, limit_reason="stop") for t, _ in inputs]
    try:
        await asyncio.gather(*(s.wait() for s in seqs))
    finally:
        for s in seqs:
            replica.engine.abort(s)
    data = []
    for i, (_, text) in enumerate(inputs):
        vec = embedding(replica.seed, model, text, dim)
        data.append({"object": "embedding", "index": i, "embedding": embedding_base64(vec) if fmt == "base64" else vec})
    prompt = sum(s.prompt_tokens for s in seqs)
    return web.json_response(
        {
            "object": "list",
            "data": data,
            "model": model,
            "usage": {"prompt_tokens": prompt, "total_tokens": prompt},
        }
    )


async def list_models(request: web.Request) -> web.Response:
    """The models, then their LoRA adapters with ``parent`` (vLLM lists adapters so)."""
    replica = replica_of(request)
    base = replica.models[0]
    entries = [(m, None) for m in replica.models] + [(a, base) for a in replica.adapters]
    return web.json_response(
        {
            "object": "list",
            "data": [
                {
                    "id": name,
                    "object": "model",
                    "created": 0,
                    "owned_by": "imesh-fleet",
                    "root": name,
                    "parent": parent,
                    "max_model_len": replica.profile.max_model_len,
                }
                for name, parent in entries
            ],
        }
    )
