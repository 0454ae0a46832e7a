"""How a streamed REST response ends (GET /segments/{id}/export): Envoy's ext_proc filter
hands this service the gRPC trailers of the call behind it, and a call that ended in an
error is answered with an immediate response, which Envoy, the response headers and part
of the body being sent already, can only carry out by resetting the stream. An HTTP/1.1
caller then sees the connection close before the last chunk, an HTTP/2 caller a
RST_STREAM: a body cut short never looks complete. A call that ended well has its gRPC
trailers removed, so HTTP callers see nothing of gRPC.

The status (200) and the headers went out with the first rows, so this is the only way
left to say that the rest is missing; the gRPC status itself stays in the server's log.
It needs no key: the RPC behind the stream authenticated, and nothing here reads data.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ext_proc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc
from envoy.type.v3 import http_status_pb2

log = logging.getLogger(__name__)

# The ext_proc RPC Envoy calls; no key, no fair share, no budget of the Runner (rpc.py).
PROCESS_METHOD = "/envoy.service.ext_proc.v3.ExternalProcessor/Process"
# gRPC's own trailers: not for HTTP callers.
GRPC_TRAILERS = ("grpc-status", "grpc-message", "grpc-status-details-bin")
# The server's side channel to envoy/filter.lua (status.py); on a stream that ended in an
# error they are in the trailers.
SIDE_CHANNEL = ("x-http-status", "x-error-envelope", "x-retry-after")


def _value(header: base_pb2.HeaderValue) -> str:
    return str(header.raw_value.decode("utf-8", "replace") if header.raw_value else header.value)


def trailers_answer(trailers: dict[str, str]) -> ext_proc.ProcessingResponse:
    """The answer to a stream's gRPC trailers: strip them when it ended well (grpc-status
    0), else an immediate response, i.e. a reset of the stream."""
    status = trailers.get("grpc-status", "")
    if status == "0":
        return ext_proc.ProcessingResponse(
            response_trailers=ext_proc.TrailersResponse(
                header_mutation=ext_proc.HeaderMutation(
                    remove_headers=[*GRPC_TRAILERS, *SIDE_CHANNEL]
                )
            )
        )
    return ext_proc.ProcessingResponse(
        immediate_response=ext_proc.ImmediateResponse(
            status=http_status_pb2.HttpStatus(code=http_status_pb2.InternalServerError),
            details=f"stream_ended_with_grpc_status_{status or 'none'}",
        )
    )


class StreamEnd:
    """The ExternalProcessor servicer: it is sent response trailers only (envoy_config)."""

    async def Process(
        self,
        request_iterator: AsyncIterator[ext_proc.ProcessingRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[ext_proc.ProcessingResponse]:
        async for request in request_iterator:
            phase = request.WhichOneof("request")
            if phase == "response_trailers":
                trailers = {h.key: _value(h) for h in request.response_trailers.trailers.headers}
                answer = trailers_answer(trailers)
                if answer.HasField("immediate_response"):
                    log.info(
                        "REST stream reset: its call ended with grpc-status %s (%s)",
                        trailers.get("grpc-status", "none"),
                        trailers.get("grpc-message", ""),
                    )
                yield answer
            elif phase == "request_headers":
                # Not asked for (envoy_config), and harmless: let the request through.
                yield ext_proc.ProcessingResponse(request_headers=ext_proc.HeadersResponse())
            elif phase == "response_headers":
                yield ext_proc.ProcessingResponse(response_headers=ext_proc.HeadersResponse())
            else:
                log.warning("ext_proc sent %s, which it is not configured to send", phase)
                return


def add_to_server(server: grpc.aio.Server) -> None:
    """Serves the end-of-stream check of streamed REST responses on `server`."""
    external_processor_pb2_grpc.add_ExternalProcessorServicer_to_server(StreamEnd(), server)
