"""Builders for the ext_proc ProcessingResponses the servicer sends back to Envoy.

Kept apart from the decision logic so the hot path reads as: decide, then build one response.
"""

from __future__ import annotations

from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ext
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2

from extproc.errors import RequestError
from protos.wire import MODEL_HEADER, PICK_METADATA_KEY, PICK_METADATA_NAMESPACE, VERSION_HEADER, reply_details

CONTINUE_HEADERS = ext.ProcessingResponse(request_headers=ext.HeadersResponse())
CONTINUE_BODY = ext.ProcessingResponse(request_body=ext.BodyResponse())

# Ask Envoy for the buffered body: only when no header named the model (each phase is a round trip).
SEND_BODY = ext.ProcessingResponse(
    request_headers=ext.HeadersResponse(),
    mode_override=processing_mode_pb2.ProcessingMode(request_body_mode=processing_mode_pb2.ProcessingMode.BUFFERED),
)


def _set(name: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=name, raw_value=value.encode()),
        append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
    )


def route_mutation(model: str, version: str | None = None) -> ext.CommonResponse:
    """Headers that select the model's route (the canary split), or one version's pinned route.

    Setting them clears Envoy's route cache, so the route is chosen on them.
    """
    headers = [_set(MODEL_HEADER, model)]
    if version is not None:
        headers.append(_set(VERSION_HEADER, version))
    return ext.CommonResponse(header_mutation=ext.HeaderMutation(set_headers=headers), clear_route_cache=True)


def routed(common: ext.CommonResponse, hosts: str, body_phase: bool) -> ext.ProcessingResponse:
    """Route to the pinned version and hand Envoy the ranked hosts through envoy.lb metadata."""
    metadata = struct_pb2.Struct()
    metadata.fields[PICK_METADATA_NAMESPACE].struct_value.fields[PICK_METADATA_KEY].string_value = hosts
    if body_phase:
        return ext.ProcessingResponse(request_body=ext.BodyResponse(response=common), dynamic_metadata=metadata)
    return ext.ProcessingResponse(request_headers=ext.HeadersResponse(response=common), dynamic_metadata=metadata)


def immediate(error: RequestError) -> ext.ProcessingResponse:
    """A refusal in the JSON error envelope, with Retry-After where the client should come back."""
    extra = (("retry-after", error.retry_after),) if error.retry_after else ()
    return json_reply(error.status, error.envelope(), reply_details(error.code), extra)


def json_reply(status: int, body: bytes, details: str, extra_headers=()) -> ext.ProcessingResponse:
    headers = [_set("content-type", "application/json")] + [_set(k, v) for k, v in extra_headers]
    return ext.ProcessingResponse(
        immediate_response=ext.ImmediateResponse(
            status=http_status_pb2.HttpStatus(code=status),
            headers=ext.HeaderMutation(set_headers=headers),
            body=body,
            details=details,
        )
    )
