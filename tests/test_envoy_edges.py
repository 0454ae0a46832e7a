"""Envoy's edges (docs/limits.md): native gRPC callers going through Envoy get the service's status
and trailers untouched, server streams outlive the REST route timeout, retry delays and
deadlines reach REST callers in the envelope, and oversized or too deeply nested bodies
are answered, never reset."""

from __future__ import annotations

import http.client
import json
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import json_format, struct_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2_grpc
from grpc_status import rpc_status

from segments_api.v1 import (
    contacts_pb2,
    contacts_pb2_grpc,
    events_pb2_grpc,
    resources_pb2,
    segments_pb2,
    segments_pb2_grpc,
)
from segments_service import envoy_proxy
from segments_service.errors import AlreadyExists, RateLimited, ServiceError, Unavailable
from segments_service.status import to_status
from tests.conftest import ROOT, Project, Response, Rest, Stubs, free_port
from tests.rest_helpers import check_error

# The service's budget in the Envoys started here: REST requests time out in Envoy after
# this plus envoy_proxy.REST_TIMEOUT_MARGIN seconds.
SHORT_BUDGET = 0.5
SEGMENT_SERVICE = "segments.v1.SegmentService"
REST_TIMEOUT = SHORT_BUDGET + envoy_proxy.REST_TIMEOUT_MARGIN


def start_envoy(workdir: Path, grpc_port: int, **options: Any) -> Iterator[str]:
    """Envoy as `make run` configures it (with `options`) in front of `grpc_port`; yields
    its host:port."""
    http_port = free_port()
    config = envoy_proxy.render_config(
        http_port=http_port,
        upstreams=[("127.0.0.1", grpc_port)],
        descriptor_path=ROOT / "envoy" / "segments.pb",
        **options,
    )
    proc = envoy_proxy.start_envoy(config, workdir=workdir, log_path=workdir / "envoy.log")
    try:
        envoy_proxy.wait_ready(http_port, timeout=30, process=proc)
        yield f"127.0.0.1:{http_port}"
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="module")
def short_envoy(grpc_port: int, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The test server behind an Envoy whose REST route timeout is REST_TIMEOUT."""
    yield from start_envoy(
        tmp_path_factory.mktemp("envoy-short"), grpc_port, request_timeout=SHORT_BUDGET
    )


@pytest.fixture(scope="module")
def via_envoy(rest_url: str) -> Iterator[Stubs]:
    """gRPC stubs on a channel to Envoy's HTTP port (the REST fixture's Envoy)."""
    with grpc.insecure_channel(rest_url.removeprefix("http://")) as channel:
        yield Stubs(
            segments_pb2_grpc.SegmentServiceStub(channel),
            contacts_pb2_grpc.ContactServiceStub(channel),
            events_pb2_grpc.EventServiceStub(channel),
        )


# --- a server whose GetSegment answers what the test asks for, by id -----------------


def abort(context: grpc.ServicerContext, err: ServiceError, request_id: str) -> None:
    context.abort_with_status(to_status(err, request_id))


def scripted_get_segment(
    request: segments_pb2.GetSegmentRequest, context: grpc.ServicerContext
) -> resources_pb2.Segment:
    """GetSegment answering, by id: `unavailable`, `exists` as the service maps those
    errors; `limited` a 429 RATE_LIMITED envelope with a 7 s retry delay; `deadline`,
    `exhausted` bare gRPC statuses without any envelope, as grpcio itself sends them;
    `slow` only once the caller has gone."""
    request_id = str(dict(context.invocation_metadata()).get("x-request-id", "scripted"))
    if request.id == "unavailable":
        abort(context, Unavailable("the database is unreachable; retry the request"), request_id)
    if request.id == "exists":
        abort(context, AlreadyExists("a record with these values already exists"), request_id)
    if request.id == "limited":
        abort(context, RateLimited("too many requests for this project", 7.0), request_id)
    if request.id == "deadline":
        context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
    if request.id == "exhausted":
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many concurrent calls")
    if request.id == "slow":
        gone = threading.Event()
        context.add_callback(gone.set)
        gone.wait(30)
    return resources_pb2.Segment(id=request.id)


@pytest.fixture(scope="module")
def scripted_port() -> Iterator[int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    handler = grpc.unary_unary_rpc_method_handler(
        scripted_get_segment,
        request_deserializer=segments_pb2.GetSegmentRequest.FromString,
        response_serializer=resources_pb2.Segment.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler(SEGMENT_SERVICE, {"GetSegment": handler})]
    )
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield port
    server.stop(1).wait()


@pytest.fixture(scope="module")
def scripted_envoy(scripted_port: int, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    yield from start_envoy(
        tmp_path_factory.mktemp("envoy-scripted"), scripted_port, request_timeout=SHORT_BUDGET
    )


def trailers(err: Any) -> dict[str, Any]:
    call: Any = err
    return {key: value for key, value in call.trailing_metadata()}


def failure(call: Any, *args: Any, **kwargs: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as raised:
        call(*args, **kwargs)
    return raised.value


def without_timestamp(metadata: dict[str, str | bytes]) -> dict[str, Any]:
    """Trailing metadata, the envelope's timestamp (the time of the call) left out."""
    out: dict[str, Any] = dict(metadata)
    envelope = json.loads(out.pop("x-error-envelope"))
    del envelope["timestamp"]
    out["x-error-envelope"] = envelope
    return out


def assert_same_failure(direct: Any, through: Any) -> None:
    """Same code, message, google.rpc details and trailing metadata (to which Envoy only
    adds its own headers, such as date and x-request-id, in a trailers-only response)."""
    assert through.code() == direct.code()
    assert through.details() == direct.details()
    assert rpc_status.from_call(through) == rpc_status.from_call(direct)
    sent = without_timestamp(trailers(direct))
    got = without_timestamp(trailers(through))
    assert {key: got.get(key) for key in sent} == sent


def details(err: Any) -> list[Any]:
    """The google.rpc details of a failed call, unpacked."""
    status = rpc_status.from_call(err)
    assert isinstance(status, status_pb2.Status)
    unpacked: list[Any] = []
    for detail in status.details:
        for kind in (
            error_details_pb2.ErrorInfo,
            error_details_pb2.BadRequest,
            error_details_pb2.RetryInfo,
        ):
            message = kind()
            if detail.Unpack(message):
                unpacked.append(message)
    return unpacked


# --- native gRPC through Envoy ----------------------------------------------------------


def test_native_grpc_writes_report_ok_through_envoy(
    via_envoy: Stubs, stubs: Stubs, project: Project
) -> None:
    """Over REST these answer 201 and 204; a gRPC caller must see OK, not UNKNOWN."""
    condition = json_format.ParseDict(
        {"logic": "AND", "groups": [{"filters": [{"field": "data.plan", "operator": "exists"}]}]},
        resources_pb2.FilterCondition(),
    )
    created = via_envoy.segments.CreateSegment(
        segments_pb2.CreateSegmentRequest(name="Through Envoy", condition=condition),
        metadata=project.auth,
    )
    data = struct_pb2.Struct()
    data.update({"plan": "pro"})
    contact = via_envoy.contacts.UpsertContact(
        contacts_pb2.UpsertContactRequest(email="native@example.com", data=data),
        metadata=project.auth,
    )
    got = stubs.segments.GetSegment(
        segments_pb2.GetSegmentRequest(id=created.id), metadata=project.auth
    )
    assert got.name == "Through Envoy" and got.member_count == 1
    via_envoy.contacts.DeleteContact(
        contacts_pb2.DeleteContactRequest(id=contact.id), metadata=project.auth
    )
    via_envoy.segments.DeleteSegment(
        segments_pb2.DeleteSegmentRequest(id=created.id), metadata=project.auth
    )
    err = failure(
        stubs.segments.GetSegment,
        segments_pb2.GetSegmentRequest(id=created.id),
        metadata=project.auth,
    )
    assert err.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(
    ("method", "request_message", "code"),
    [
        ("GetSegment", segments_pb2.GetSegmentRequest(id=str(uuid.uuid4())), "NOT_FOUND"),
        (
            "CreateSegment",
            segments_pb2.CreateSegmentRequest(
                name="",
                condition=json_format.ParseDict(
                    {"logic": "AND", "groups": [{"filters": [{"field": "data.x"}]}]},
                    resources_pb2.FilterCondition(),
                ),
            ),
            "INVALID_ARGUMENT",
        ),
    ],
)
def test_native_grpc_errors_pass_through_envoy_untouched(
    method: str,
    request_message: Any,
    code: str,
    via_envoy: Stubs,
    stubs: Stubs,
    project: Project,
) -> None:
    metadata = (*project.auth, ("x-request-id", f"edge-{uuid.uuid4()}"))
    direct = failure(getattr(stubs.segments, method), request_message, metadata=metadata)
    through = failure(getattr(via_envoy.segments, method), request_message, metadata=metadata)
    assert through.code() == getattr(grpc.StatusCode, code)
    assert_same_failure(direct, through)
    kinds = {type(d) for d in details(through)}
    assert error_details_pb2.ErrorInfo in kinds
    if code == "INVALID_ARGUMENT":
        assert error_details_pb2.BadRequest in kinds


def test_native_grpc_already_exists_and_retry_info_pass_through(
    scripted_port: int, scripted_envoy: str
) -> None:
    with (
        grpc.insecure_channel(f"127.0.0.1:{scripted_port}") as direct_channel,
        grpc.insecure_channel(scripted_envoy) as envoy_channel,
    ):
        direct = segments_pb2_grpc.SegmentServiceStub(direct_channel)
        through = segments_pb2_grpc.SegmentServiceStub(envoy_channel)
        for scenario, code in (
            ("exists", grpc.StatusCode.ALREADY_EXISTS),
            ("unavailable", grpc.StatusCode.UNAVAILABLE),
        ):
            request = segments_pb2.GetSegmentRequest(id=scenario)
            metadata = (("x-request-id", f"edge-{uuid.uuid4()}"),)
            expected = failure(direct.GetSegment, request, metadata=metadata)
            got = failure(through.GetSegment, request, metadata=metadata)
            assert got.code() == code
            assert_same_failure(expected, got)
        retry = [d for d in details(got) if isinstance(d, error_details_pb2.RetryInfo)]
        assert [r.retry_delay.seconds for r in retry] == [1]
        assert trailers(got)["x-retry-after"] == "1"


# --- streams and timeouts ---------------------------------------------------------------


def test_watch_stream_through_envoy_outlives_the_rest_timeout(
    short_envoy: str, stubs: Stubs, project: Project
) -> None:
    condition = json_format.ParseDict(
        {"logic": "AND", "groups": [{"filters": [{"field": "data.plan", "operator": "exists"}]}]},
        resources_pb2.FilterCondition(),
    )
    stubs.segments.CreateSegment(
        segments_pb2.CreateSegmentRequest(
            name="Watched", condition=condition, track_membership=True
        ),
        metadata=project.auth,
    )

    def join(email: str) -> None:
        data = struct_pb2.Struct()
        data.update({"plan": "pro"})
        stubs.contacts.UpsertContact(
            contacts_pb2.UpsertContactRequest(email=email, data=data), metadata=project.auth
        )

    with grpc.insecure_channel(short_envoy) as channel:
        stream = segments_pb2_grpc.SegmentServiceStub(channel).WatchSegmentEvents(
            segments_pb2.WatchSegmentEventsRequest(), metadata=project.auth, timeout=30
        )
        stream.initial_metadata()  # open, from now
        opened = time.monotonic()
        join("first@example.com")
        assert next(stream).email == "first@example.com"
        # The stream must stay open, quiet, past the REST route timeout: waiting is the test.
        time.sleep(max(0.0, opened + REST_TIMEOUT + 1.5 - time.monotonic()))
        join("later@example.com")
        assert next(stream).email == "later@example.com"
        assert time.monotonic() - opened > REST_TIMEOUT + 1
        stream.cancel()


def test_rest_requests_time_out_in_the_envelope(scripted_envoy: str) -> None:
    rest = Rest(f"http://{scripted_envoy}")
    started = time.monotonic()
    resp = rest.get("/segments/slow", key="sk_any")
    elapsed = time.monotonic() - started
    check_error(resp, 504, "DEADLINE_EXCEEDED")
    assert REST_TIMEOUT - 0.5 <= elapsed < REST_TIMEOUT + 5, elapsed


# --- retry delays and bare gRPC statuses over REST --------------------------------------


@pytest.mark.parametrize(
    ("scenario", "status", "code", "retry_after"),
    [
        ("unavailable", 503, "SERVICE_UNAVAILABLE", "1"),
        ("limited", 429, "RATE_LIMITED", "7"),
        ("exhausted", 429, "RATE_LIMITED", "1"),
        ("deadline", 504, "DEADLINE_EXCEEDED", None),
        ("exists", 409, "ALREADY_EXISTS", None),
    ],
)
def test_rest_errors_carry_retry_after_and_the_envelope(
    scripted_envoy: str, scenario: str, status: int, code: str, retry_after: str | None
) -> None:
    resp = Rest(f"http://{scripted_envoy}").get(f"/segments/{scenario}", key="sk_any")
    check_error(resp, status, code)
    assert resp.headers.get("retry-after") == retry_after, resp.headers
    leaked = {"x-retry-after", "x-http-status", "x-error-envelope", "grpc-status"}
    assert not leaked & set(resp.headers), resp.headers


def test_requests_the_service_cannot_check_are_refused(scripted_envoy: str) -> None:
    """The scripted server has no Authorization service: a REST request Envoy must have
    checked (a body, a query string) is refused 503, never transcoded unchecked; a GET
    without a query string needs no check and is answered."""
    rest = Rest(f"http://{scripted_envoy}")
    for resp in (
        rest.post("/contacts", {"email": "a@x.com"}, key="sk_any"),
        rest.get("/segments/exists?expand=1", key="sk_any"),
    ):
        check_error(resp, 503, "SERVICE_UNAVAILABLE")
        assert resp.headers.get("retry-after") == "1", resp.headers
        assert "x-envelope-body" not in resp.headers, resp.headers
    check_error(rest.get("/segments/exists", key="sk_any"), 409, "ALREADY_EXISTS")


# --- bodies too large or too deep ---------------------------------------------------------


def raw_post(base: str, path: str, body: bytes, key: str) -> tuple[int, dict[str, str], bytes]:
    """POST over a plain HTTP/1.1 connection; a reset connection raises."""
    host, port = base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request(
            "POST",
            path,
            body=body,
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"},
        )
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


@pytest.mark.parametrize("size", [(1 << 20) + 1, 3 << 20])
def test_bodies_over_1_mib_are_413_in_the_envelope(
    rest_url: str, project: Project, size: int
) -> None:
    prefix = b'{"email": "big@example.com", "data": {"blob": "'
    body = prefix + b"x" * (size - len(prefix) - 3) + b'"}}'
    assert len(body) == size
    status, headers, raw = raw_post(rest_url, "/contacts", body, project.secret_key)
    check_error(Response(status, headers, raw), 413, "PAYLOAD_TOO_LARGE")


@pytest.mark.parametrize("depth", [65, 100, 1000, 20000])
def test_json_nested_deeper_than_64_is_400_in_the_envelope(
    rest_url: str, project: Project, depth: int
) -> None:
    # Written out: json.dumps itself refuses the deepest ones.
    data = '{"k":' * (depth - 1) + '"leaf"' + "}" * (depth - 1)
    body = f'{{"email": "deep{depth}@example.com", "data": {data}}}'.encode()
    status, headers, raw = raw_post(rest_url, "/contacts", body, project.secret_key)
    check_error(Response(status, headers, raw), 400, "VALIDATION_ERROR")
