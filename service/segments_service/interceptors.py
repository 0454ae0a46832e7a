"""The request interceptor: what every RPC of our services is given before its handler runs,
decided in one place.

For each method of SegmentService, ContactService, EventService and WebhookService, the
interceptor reads the invocation metadata once (the Authorization header, the request id,
Envoy's REST mark), refuses a missing or malformed Authorization header (UNAUTHENTICATED, MISSING_AUTH) before
any thread or database work, takes the key kind the method needs from KEY_KINDS, gives the
request its budget (`budget_seconds`) and hands all of it to the handler as an
`rpc.RequestScope`, through the context variable `rpc.SCOPE`. The key itself is looked up
later, in the request's own transaction (rpc.Runner), so a key revoked a moment ago is
refused at once.

It also turns a request that cannot be decoded into a VALIDATION_ERROR naming the reason,
where grpcio would end the call with a crash status before any of our code ran: grpc.aio
decodes a request with the deserializer of the handler the interceptors return, so the
handler returned here carries a deserializer that answers a marker instead of raising.

Around each such RPC it also sets the request id that log lines carry (logs.REQUEST_ID),
counts the RPC and times it by method and status code (metrics.RPC_REQUESTS,
RPC_DURATION), and logs one access line at DEBUG.

Methods without a kind here (health, reflection, any other service) pass through untouched.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import grpc
from google.protobuf.descriptor import ServiceDescriptor

from segments_api.v1 import contacts_pb2, events_pb2, segments_pb2, webhooks_pb2
from segments_service import logs, metrics
from segments_service.auth import KeyKind, bearer_token
from segments_service.errors import MissingAuth, ValidationError
from segments_service.rpc import REST_HEADER, SCOPE, Budget, RequestScope, abort

# One line per RPC of our services at DEBUG: method, status code, time (LOG_LEVEL=DEBUG).
access = logging.getLogger("segments_service.access")

Context = grpc.aio.ServicerContext[Any, Any]
Behavior = Callable[[Any, Context], Awaitable[Any]]

# Our services, by full name: the interceptor acts on their methods alone.
SERVICES: Mapping[str, ServiceDescriptor] = MappingProxyType(
    {
        service.full_name: service
        for service in (
            segments_pb2.DESCRIPTOR.services_by_name["SegmentService"],
            contacts_pb2.DESCRIPTOR.services_by_name["ContactService"],
            events_pb2.DESCRIPTOR.services_by_name["EventService"],
            webhooks_pb2.DESCRIPTOR.services_by_name["WebhookService"],
        )
    }
)

# The key each method needs, by the method's full name: every method of SERVICES, and only
# those (RequestInterceptor refuses a table that differs). Public keys (pk_) serve Track
# alone; everything else takes the project's secret key (sk_).
KEY_KINDS: Mapping[str, KeyKind] = MappingProxyType(
    {
        "/segments.v1.SegmentService/ListSegments": "secret",
        "/segments.v1.SegmentService/CreateSegment": "secret",
        "/segments.v1.SegmentService/GetSegment": "secret",
        "/segments.v1.SegmentService/UpdateSegment": "secret",
        "/segments.v1.SegmentService/DeleteSegment": "secret",
        "/segments.v1.SegmentService/ListSegmentContacts": "secret",
        "/segments.v1.SegmentService/AddSegmentMembers": "secret",
        "/segments.v1.SegmentService/RemoveSegmentMembers": "secret",
        "/segments.v1.SegmentService/WatchSegmentEvents": "secret",
        "/segments.v1.SegmentService/ExportSegmentContacts": "secret",
        "/segments.v1.SegmentService/CountMatchingContacts": "secret",
        "/segments.v1.SegmentService/PreviewSegment": "secret",
        "/segments.v1.SegmentService/ExplainMembership": "secret",
        "/segments.v1.SegmentService/ListSegmentEvents": "secret",
        "/segments.v1.SegmentService/GetSegmentHistory": "secret",
        "/segments.v1.SegmentService/ExportSegmentCsv": "secret",
        "/segments.v1.ContactService/UpsertContact": "secret",
        "/segments.v1.ContactService/BatchUpsertContacts": "secret",
        "/segments.v1.ContactService/GetContact": "secret",
        "/segments.v1.ContactService/DeleteContact": "secret",
        "/segments.v1.ContactService/ListContacts": "secret",
        "/segments.v1.ContactService/UpdateContact": "secret",
        "/segments.v1.ContactService/ListContactSegments": "secret",
        "/segments.v1.EventService/Track": "public",
        "/segments.v1.EventService/IngestEvents": "secret",
        "/segments.v1.WebhookService/CreateWebhook": "secret",
        "/segments.v1.WebhookService/ListWebhooks": "secret",
        "/segments.v1.WebhookService/GetWebhook": "secret",
        "/segments.v1.WebhookService/DeleteWebhook": "secret",
        "/segments.v1.WebhookService/ListWebhookDeliveries": "secret",
    }
)

REQUEST_ID_HEADER = "x-request-id"
MAX_REQUEST_ID = 128


def table_problems(kinds: Mapping[str, KeyKind]) -> list[str]:
    """How a key kind table differs from the methods of SERVICES: a method left out, a name
    that is none of their methods, a method the interceptor cannot wrap."""
    problems: list[str] = []
    for service in SERVICES.values():
        for method in service.methods:
            name = f"/{service.full_name}/{method.name}"
            if name not in kinds:
                problems.append(f"{name} has no key kind")
            elif method.client_streaming:
                problems.append(f"{name} streams requests, which the interceptor does not wrap")
    for name in kinds:
        service_name, _, method_name = name.removeprefix("/").partition("/")
        named = SERVICES.get(service_name)
        if named is None or method_name not in named.methods_by_name:
            problems.append(f"{name} is not a method of our services")
    return problems


def budget_seconds(time_remaining: float | None, default: float) -> float:
    """A request's budget: what is left of its caller's deadline, capped by the server's
    default (SEGMENTS_REQUEST_TIMEOUT); the default when the caller set no deadline."""
    return default if time_remaining is None else min(time_remaining, default)


@dataclass(frozen=True)
class Headers:
    """What an RPC needs of its invocation metadata (the first value of each key)."""

    authorization: str | None
    request_id: str  # the caller's (Envoy's over REST), else a new one
    rest: bool

    @classmethod
    def read(cls, metadata: tuple[tuple[str, str | bytes], ...] | None) -> Headers:
        found: dict[str, str] = {}
        for key, value in metadata or ():
            if isinstance(value, str) and key not in found:
                found[key] = value
        request_id = (found.get(REQUEST_ID_HEADER) or "")[:MAX_REQUEST_ID] or str(uuid.uuid4())
        return cls(found.get("authorization"), request_id, found.get(REST_HEADER) == "1")


@dataclass(frozen=True)
class _Undecodable:
    """A request protobuf could not parse (e.g. nested past its recursion limit)."""

    reason: str

    def error(self) -> ValidationError:
        return ValidationError.single(
            "",
            "the request could not be decoded (messages may nest at most about 100 "
            f"levels deep): {self.reason}",
            "undecodable",
        )


def _tolerant(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserialize is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as exc:
            return _Undecodable(str(exc) or type(exc).__name__)

    return parse


class RequestInterceptor(grpc.aio.ServerInterceptor):
    """Admits each RPC of our services: see the module's docstring."""

    def __init__(self, default_seconds: float, kinds: Mapping[str, KeyKind] = KEY_KINDS) -> None:
        problems = table_problems(kinds)
        if problems:
            raise ValueError("the key kind table does not fit our services: " + "; ".join(problems))
        self.kinds = kinds
        self.default_seconds = default_seconds

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        method = handler_call_details.method
        kind = self.kinds.get(method)
        handler = await continuation(handler_call_details)
        if kind is None or handler is None:
            return handler
        headers = Headers.read(handler_call_details.invocation_metadata)
        deserialize = _tolerant(handler.request_deserializer)
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._admitting(method, kind, headers, handler.unary_unary),
                deserialize,
                handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._admitting(method, kind, headers, handler.unary_stream),
                deserialize,
                handler.response_serializer,
            )
        # table_problems keeps methods that stream requests out of the table.
        raise TypeError(f"{method}: only methods with one request are admitted")

    def _admitting(
        self, method: str, kind: KeyKind, headers: Headers, behavior: Callable[..., Any]
    ) -> Behavior:
        """`behavior` (a coroutine function, answering or writing its responses), run only
        for a decoded request with a well-formed Authorization header, within its scope."""

        async def admitted(request: Any, context: Context) -> Any:
            # Logs written while handling it carry its id; entries and exits it writes are
            # measured from its arrival (metrics.TRACKER_LAG).
            request_token = logs.REQUEST_ID.set(headers.request_id)
            origin_token = metrics.set_tracking("write", time.time())
            started = time.perf_counter()
            code = "UNKNOWN"
            try:
                result = await admit(request, context)
                code = status_name(context.code(), "OK")
                return result
            except asyncio.CancelledError:
                code = "CANCELLED"
                raise
            except BaseException:
                code = status_name(context.code(), "UNKNOWN")
                raise
            finally:
                seconds = time.perf_counter() - started
                metrics.observe_rpc(method[1:], code, seconds)
                access.debug(
                    "%s %s %.1f ms",
                    method,
                    code,
                    seconds * 1000,
                    extra={"rpc": method, "code": code, "duration_ms": round(seconds * 1000, 3)},
                )
                metrics.reset_tracking(origin_token)
                logs.REQUEST_ID.reset(request_token)

        async def admit(request: Any, context: Context) -> Any:
            # An undecodable request is refused whatever its header says: the order the
            # service has always answered in.
            if isinstance(request, _Undecodable):
                await abort(context, request.error(), headers.request_id)
            try:
                key = bearer_token(headers.authorization)
            except MissingAuth as err:
                await abort(context, err, headers.request_id)
            scope = RequestScope(
                method=method,
                kind=kind,
                key=key,
                request_id=headers.request_id,
                rest=headers.rest,
                budget=Budget(budget_seconds(context.time_remaining(), self.default_seconds)),
                step_seconds=self.default_seconds,
            )
            token = SCOPE.set(scope)
            try:
                return await behavior(request, context)
            finally:
                SCOPE.reset(token)

        return admitted


def status_name(code: Any, default: str) -> str:
    """The name of a gRPC status code as the servicer context holds it (an enum or an int)."""
    if code is None:
        return default
    if isinstance(code, grpc.StatusCode):
        return code.name
    for known in grpc.StatusCode:
        if known.value[0] == code:
            return known.name
    return default
