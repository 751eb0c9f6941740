"""The floor of a Python gRPC ext_proc: grpc.aio + uvloop answering every stream with one constant
pick (route header + ``envoy.lb`` host list), no identification, no picking, no telemetry.

What the mesh's ext_proc costs above this is our own code; this much is grpcio's per-stream cost
and cannot be tuned away in Python. Used by bench/datapath.py:

    python bench/_extproc_floor.py PORT MODEL HOST[,HOST...] [bidi|unary]

``unary`` registers ``Process`` as a stream-unary method: grpcio then sends the one response with
the trailing status in a single batch, one completion (and its thread hand-off) fewer per stream.
On the wire Envoy sees what a bidi stream that answers once and closes would send; it cannot ask
for a second phase (the body), which is why the mesh's own ext_proc is not written that way.
"""

from __future__ import annotations

import gc
import sys

import grpc
import uvloop
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ext
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc
from google.protobuf import struct_pb2

from protos.wire import MODEL_HEADER, PICK_METADATA_KEY, PICK_METADATA_NAMESPACE


def constant_response(model: str, hosts: str) -> ext.ProcessingResponse:
    metadata = struct_pb2.Struct()
    metadata.fields[PICK_METADATA_NAMESPACE].struct_value.fields[PICK_METADATA_KEY].string_value = hosts
    header = base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=MODEL_HEADER, raw_value=model.encode()),
        append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
    )
    common = ext.CommonResponse(header_mutation=ext.HeaderMutation(set_headers=[header]), clear_route_cache=True)
    return ext.ProcessingResponse(request_headers=ext.HeadersResponse(response=common), dynamic_metadata=metadata)


class ConstantProcessor(external_processor_pb2_grpc.ExternalProcessorServicer):
    def __init__(self, response: ext.ProcessingResponse):
        self._response = response

    async def Process(self, requests, context):
        async for _ in requests:
            yield self._response
            return


async def serve(port: int, model: str, hosts: str, shape: str = "bidi") -> None:
    server = grpc.aio.server()
    response = constant_response(model, hosts)
    if shape == "unary":

        async def process(requests, context):
            async for _ in requests:
                return response

        handler = grpc.stream_unary_rpc_method_handler(
            process,
            request_deserializer=ext.ProcessingRequest.FromString,
            response_serializer=ext.ProcessingResponse.SerializeToString,
        )
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("envoy.service.ext_proc.v3.ExternalProcessor", {"Process": handler}),)
        )
    else:
        external_processor_pb2_grpc.add_ExternalProcessorServicer_to_server(ConstantProcessor(response), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 50, 50)
    print("floor ext_proc ready", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    uvloop.run(serve(int(sys.argv[1]), sys.argv[2], sys.argv[3], *sys.argv[4:5]))
