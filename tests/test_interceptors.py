"""The request interceptor (interceptors.py): every method of our three services has its key
kind in the one table, a missing or malformed Authorization header is refused before the
handler runs (and so without a thread or a database connection), a request's budget is its
caller's deadline capped by the server's default, and other services pass untouched."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc
import pytest
from google.protobuf.descriptor import MethodDescriptor
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status
from sqlalchemy import event
from sqlalchemy.orm import Session, sessionmaker

from segments_api.v1 import contacts_pb2, events_pb2, segments_pb2, segments_pb2_grpc, webhooks_pb2
from segments_service.auth import KeyKind
from segments_service.database import make_engine, make_sessionmaker
from segments_service.interceptors import KEY_KINDS, RequestInterceptor, budget_seconds
from segments_service.rpc import SCOPE, RequestScope, current_scope
from segments_service.server import ServerThread
from tests.conftest import new_project

DEFAULT = 30.0  # the server's budget of a request whose caller set no deadline
LIST = "/segments.v1.SegmentService/ListSegments"
TRACK = "/segments.v1.EventService/Track"
Metadata = tuple[tuple[str, str | bytes], ...]


def our_methods() -> dict[str, MethodDescriptor]:
    """Every method of SegmentService, ContactService, EventService and WebhookService, by
    full name."""
    services = (
        segments_pb2.DESCRIPTOR.services_by_name["SegmentService"],
        contacts_pb2.DESCRIPTOR.services_by_name["ContactService"],
        events_pb2.DESCRIPTOR.services_by_name["EventService"],
        webhooks_pb2.DESCRIPTOR.services_by_name["WebhookService"],
    )
    return {f"/{s.full_name}/{m.name}": m for s in services for m in s.methods}


@dataclass
class Details:
    """grpc.HandlerCallDetails as the server gives it to an interceptor."""

    method: str
    invocation_metadata: Metadata


class Aborted(Exception):
    """What grpc.aio's abort raises to end the handler."""


class Context:
    """The part of grpc.aio's ServicerContext the interceptor uses."""

    def __init__(self, time_remaining: float | None) -> None:
        self.remaining = time_remaining
        self.status: grpc.Status | None = None

    def time_remaining(self) -> float | None:
        return self.remaining

    async def abort_with_status(self, status: grpc.Status) -> NoReturn:
        self.status = status
        raise Aborted

    def code(self) -> grpc.StatusCode | None:
        return None if self.status is None else self.status.code


@dataclass
class Outcome:
    answer: Any
    status: grpc.Status | None
    scopes: list[RequestScope]  # as the handler saw it, each time it ran
    after: RequestScope | None  # what the caller of the handler sees once it is done


def intercept(method: str, handler: grpc.RpcMethodHandler[Any, Any] | None) -> Any:
    """The handler the interceptor makes of `handler` for `method`."""

    async def continuation(_details: grpc.HandlerCallDetails) -> Any:
        return handler

    return asyncio.run(
        RequestInterceptor(DEFAULT).intercept_service(continuation, Details(method, ()))
    )


def call(
    method: str,
    metadata: Metadata,
    *,
    time_remaining: float | None = None,
    raw: bytes = b"",
) -> Outcome:
    """`method` called as grpc.aio calls it through the interceptor: the handler found, the
    interceptor's handler made of it, `raw` decoded by that handler, its behavior run."""
    scopes: list[RequestScope] = []

    async def behavior(_request: Any, _context: Any) -> str:
        scopes.append(current_scope())
        return "answered"

    found = grpc.unary_unary_rpc_method_handler(
        behavior,
        request_deserializer=segments_pb2.ListSegmentsRequest.FromString,
        response_serializer=segments_pb2.ListSegmentsResponse.SerializeToString,
    )

    async def continuation(_details: grpc.HandlerCallDetails) -> Any:
        return found

    async def run() -> Outcome:
        handler: Any = await RequestInterceptor(DEFAULT).intercept_service(
            continuation, Details(method, metadata)
        )
        context = Context(time_remaining)
        request = handler.request_deserializer(raw)
        try:
            answer = await handler.unary_unary(request, context)
        except Aborted:
            answer = None
        return Outcome(answer, context.status, scopes, SCOPE.get(None))

    return asyncio.run(run())


def as_bytes(data: bytes) -> bytes:
    """A serializer that sends, or reads, a message's bytes as they are."""
    return data


def error_info(status: grpc.Status) -> error_details_pb2.ErrorInfo:
    raw = dict(status.trailing_metadata)["grpc-status-details-bin"]
    assert isinstance(raw, bytes)
    return _info_of(status_pb2.Status.FromString(raw))


def _info_of(status: Any) -> error_details_pb2.ErrorInfo:
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info
    raise AssertionError("no ErrorInfo")


# -- the table ---------------------------------------------------------------------------


def test_every_method_of_our_services_has_its_key_kind() -> None:
    assert sorted(KEY_KINDS) == sorted(our_methods())
    assert [m for m, kind in KEY_KINDS.items() if kind == "public"] == [TRACK]
    RequestInterceptor(DEFAULT)  # the server's table is accepted


def test_a_table_that_misses_a_method_or_names_another_is_refused() -> None:
    missing = {m: k for m, k in KEY_KINDS.items() if not m.endswith("/CountMatchingContacts")}
    with pytest.raises(ValueError, match="SegmentService/CountMatchingContacts has no key kind"):
        RequestInterceptor(DEFAULT, missing)
    stranger: dict[str, KeyKind] = {**KEY_KINDS, "/grpc.health.v1.Health/Check": "secret"}
    with pytest.raises(ValueError, match="Health/Check is not a method of our services"):
        RequestInterceptor(DEFAULT, stranger)
    misspelt: dict[str, KeyKind] = {
        **missing,
        "/segments.v1.SegmentService/CountMatching": "secret",
    }
    with pytest.raises(ValueError, match="CountMatching is not a method of our services"):
        RequestInterceptor(DEFAULT, misspelt)


def test_other_services_and_unknown_methods_pass_untouched() -> None:
    async def never(_request: Any, _context: Any) -> None:
        raise AssertionError("not called here")

    handler: grpc.RpcMethodHandler[Any, Any] = grpc.unary_unary_rpc_method_handler(never)
    for method in (
        "/grpc.health.v1.Health/Check",
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        "/envoy.service.auth.v3.Authorization/Check",
    ):
        assert intercept(method, handler) is handler
    # A method no service has stays unknown: grpc answers UNIMPLEMENTED.
    assert intercept("/segments.v1.SegmentService/Nothing", None) is None
    assert intercept(LIST, None) is None


# -- the header --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "authorization",
    [None, "", "Bearer", "Bearer  ", "Basic dXNlcjpwYXNz", "Bearer a b", "sk_nobearer"],
)
def test_a_missing_or_malformed_header_is_refused_before_the_handler(
    authorization: str | None,
) -> None:
    metadata: Metadata = (("x-request-id", "req-7"),)
    if authorization is not None:
        metadata += (("authorization", authorization),)
    outcome = call(LIST, metadata)
    assert outcome.scopes == []  # the handler never ran
    assert outcome.status is not None
    assert outcome.status.code == grpc.StatusCode.UNAUTHENTICATED
    info = error_info(outcome.status)
    assert (info.reason, info.metadata["httpStatus"]) == ("MISSING_AUTH", "401")
    assert info.metadata["requestId"] == "req-7"


def test_the_handler_sees_its_scope_and_only_while_it_runs() -> None:
    outcome = call(
        TRACK,
        (
            ("authorization", "bearer  pk_first "),
            ("x-request-id", "r" * 300),
            ("x-segments-rest", "1"),
            ("authorization", "Bearer sk_second"),  # a repeated key: the first value counts
        ),
    )
    assert (outcome.answer, outcome.status) == ("answered", None)
    (scope,) = outcome.scopes
    assert (scope.method, scope.kind, scope.key) == (TRACK, "public", "pk_first")
    assert (scope.request_id, scope.rest) == ("r" * 128, True)
    assert "pk_first" not in repr(scope)
    assert outcome.after is None
    with pytest.raises(RuntimeError, match="no request scope"):
        current_scope()

    (scope,) = call(LIST, (("authorization", "Bearer sk_x"), ("x-segments-rest", "0"))).scopes
    assert (scope.kind, scope.key, scope.rest) == ("secret", "sk_x", False)
    assert str(uuid.UUID(scope.request_id)) == scope.request_id  # none sent: one is made


def test_an_undecodable_request_is_invalid_before_its_header_is_read() -> None:
    # Field 1, announced 5 bytes long, with 2 sent; no Authorization header either: as
    # before the interceptor, an undecodable request is INVALID_ARGUMENT whatever it carries.
    outcome = call(LIST, (("x-request-id", "req-8"),), raw=b"\x0a\x05ab")
    assert outcome.scopes == []
    assert outcome.status is not None
    assert outcome.status.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "could not be decoded" in outcome.status.details
    info = error_info(outcome.status)
    assert (info.reason, info.metadata["requestId"]) == ("VALIDATION_ERROR", "req-8")


# -- the budget --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("deadline", "expected"),
    [(None, DEFAULT), (5.0, 5.0), (DEFAULT, DEFAULT), (120.0, DEFAULT), (0.0, 0.0)],
)
def test_the_budget_is_the_callers_deadline_capped_by_the_server_default(
    deadline: float | None, expected: float
) -> None:
    assert budget_seconds(deadline, DEFAULT) == expected
    before = time.monotonic()
    outcome = call(LIST, (("authorization", "Bearer sk_x"),), time_remaining=deadline)
    after = time.monotonic()
    (scope,) = outcome.scopes
    assert before + expected <= scope.budget.deadline <= after + expected
    # A stream's database steps each get the server's default, whatever the deadline (the
    # stream itself ends with its caller's deadline).
    assert scope.step_seconds == DEFAULT
    step = scope.step_budget()
    assert DEFAULT - 1 < step.remaining() <= DEFAULT


# -- on a real server --------------------------------------------------------------------


def test_a_call_without_a_key_takes_no_thread_and_no_connection(
    database_url: str, sessions: sessionmaker[Session]
) -> None:
    engine = make_engine(database_url, pool_size=2)
    checkouts: list[object] = []
    event.listen(engine, "checkout", lambda *args: checkouts.append(args))
    server = ServerThread("127.0.0.1:0", make_sessionmaker(engine))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            for method, descriptor in our_methods().items():
                for metadata in ((), (("authorization", "Basic dXNlcjpwYXNz"),)):
                    with pytest.raises(grpc.RpcError) as caught:
                        if descriptor.server_streaming:
                            stream = channel.unary_stream(method, as_bytes, as_bytes)
                            list(stream(b"", metadata=metadata, timeout=10))
                        else:
                            unary = channel.unary_unary(method, as_bytes, as_bytes)
                            unary(b"", metadata=metadata, timeout=10)
                    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED, method
                    status = rpc_status.from_call(caught.value)  # type: ignore[arg-type]
                    assert _info_of(status).reason == "MISSING_AUTH", method
            assert checkouts == []
            assert not any(pool._threads for pool in server.built.pools)
            # The same server takes both for a call with a key.
            project = new_project(sessions)
            segments_pb2_grpc.SegmentServiceStub(channel).ListSegments(
                segments_pb2.ListSegmentsRequest(), metadata=project.auth, timeout=10
            )
            assert checkouts
            assert any(pool._threads for pool in server.built.pools)
    finally:
        server.stop(1)
        engine.dispose()
