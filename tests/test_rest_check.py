"""The check Envoy asks of the service before transcoding a REST request
(service/segments_service/rest_check.py): the HTTP rule a request maps to, and the Check
RPC itself, called on the test server as Envoy calls it: without a key."""

from __future__ import annotations

import json
from typing import Any

import grpc
import pytest
from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2, external_auth_pb2_grpc

from segments_service.errors import MethodNotAllowed, ValidationError
from segments_service.rest_check import ENVELOPE_BODY_HEADER, THREAD_BODY_BYTES, RestCheck
from segments_service.server import SERVICE_NAMES

CHECK = RestCheck(SERVICE_NAMES)


@pytest.mark.parametrize(
    ("method", "path", "request_message"),
    [
        ("GET", "/segments", "ListSegmentsRequest"),
        ("GET", "/segments/", "ListSegmentsRequest"),
        ("POST", "/segments", "CreateSegmentRequest"),
        ("PATCH", "/segments/abc/", "UpdateSegmentRequest"),
        ("DELETE", "/segments/abc/members", "RemoveSegmentMembersRequest"),
        ("POST", "/contacts/batch", "BatchUpsertContactsRequest"),
        # A literal path is its own binding's alone, not also an {id} of another's.
        ("GET", "/contacts/batch", None),
        ("POST", "/v1/track", "TrackRequest"),
        ("GET", "/contacts", "ListContactsRequest"),
        ("PATCH", "/contacts/abc", "UpdateContactRequest"),
        ("GET", "/contacts/abc/segments", "ListContactSegmentsRequest"),
        ("POST", "/segments/preview", "PreviewSegmentRequest"),
        ("GET", "/segments/preview", None),
        ("GET", "/segments/previews", "GetSegmentRequest"),
        ("GET", "/segments/a/contacts/b/explain", "ExplainMembershipRequest"),
        ("GET", "/segments/a/events", "ListSegmentEventsRequest"),
        ("GET", "/segments/a/history", "GetSegmentHistoryRequest"),
        ("PUT", "/segments", None),
        ("GET", "/segments/a/b/c", None),
        ("POST", "/v2/track", None),
        ("post", "/contacts", None),
    ],
)
def test_a_request_finds_its_http_rule(method: str, path: str, request_message: str | None) -> None:
    route = CHECK.find(method, path)
    assert (None if route is None else route.message.name) == request_message


def test_every_http_binding_has_a_route() -> None:
    assert len(CHECK.routes) == 27
    assert {r.body for r in CHECK.routes} == {"", "*"}
    members = CHECK.find("POST", "/segments/abc/members")
    assert members is not None and members.bound == ("id",)
    export = CHECK.find("GET", "/segments/abc/export")
    assert export is not None and export.message.name == "ExportSegmentCsvRequest"


def test_what_no_rule_takes_is_left_to_the_transcoder() -> None:
    assert CHECK.violations("POST", "/v2/track?x=1", b"{bad") == []


def test_a_rule_without_a_body_checks_the_query_only() -> None:
    assert CHECK.violations("DELETE", "/segments/abc", b"{bad") == []
    [found] = CHECK.violations("GET", "/segments?limit=5", b"")
    assert (found.field, found.code) == ("limit", "unknown_field")


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("PUT", "/segments/abc", ["DELETE", "GET", "PATCH"]),
        ("POST", "/contacts/abc", ["DELETE", "GET", "PATCH"]),
        ("GET", "/v1/track", ["POST"]),
        ("GET", "/segments/abc/members/", ["DELETE", "POST"]),
        ("DELETE", "/segments?x=1", ["GET", "POST"]),
        # The literal path's own methods, not those of /segments/{id} (which the
        # transcoder would take it for).
        ("PUT", "/segments/preview", ["POST"]),
        ("GET", "/contacts/batch/", ["POST"]),
        ("HEAD", "/contacts", ["GET", "POST"]),
        ("post", "/contacts", ["GET", "POST"]),
        # Served by Envoy itself, never transcoded, but a path like any other.
        ("POST", "/openapi.json", ["GET"]),
    ],
)
def test_a_method_the_path_does_not_serve_is_refused_with_the_paths_methods(
    method: str, path: str, allowed: list[str]
) -> None:
    refused = CHECK.refusal(method, path, b"{bad")
    assert isinstance(refused, MethodNotAllowed)
    assert list(refused.allowed) == allowed
    assert refused.message == (
        f"{method} is not allowed on {path.partition('?')[0]}; allowed: {', '.join(allowed)}"
    )


def test_unknown_paths_are_left_to_the_transcoder() -> None:
    for method, path in (("PUT", "/v2/track"), ("GET", "/segments/a/b/c"), ("GET", "/")):
        assert CHECK.allowed(path.partition("?")[0]) == []
        assert CHECK.refusal(method, path, b"") is None
    # A method the path serves: its violations, if any.
    assert CHECK.refusal("GET", "/segments", b"") is None
    refused = CHECK.refusal("GET", "/segments/a/contacts?page_size=5", b"")
    assert isinstance(refused, ValidationError)
    assert [(v.field, v.code) for v in refused.violations] == [("page_size", "unknown_field")]


def check_request(method: str, path: str, body: Any, request_id: str = "") -> Any:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"x-request-id": request_id} if request_id else {}
    http = attribute_context_pb2.AttributeContext.HttpRequest(
        method=method, path=path, headers=headers, raw_body=raw
    )
    return external_auth_pb2.CheckRequest(
        attributes=attribute_context_pb2.AttributeContext(
            request=attribute_context_pb2.AttributeContext.Request(http=http)
        )
    )


def test_check_answers_envoy_without_a_key(channel: grpc.Channel) -> None:
    stub = external_auth_pb2_grpc.AuthorizationStub(channel)
    allowed = stub.Check(check_request("POST", "/contacts", {"email": "a@x.com"}), timeout=10)
    assert allowed.status.code == 0 and allowed.HasField("ok_response")

    bad = {"email": "a@x.com", "subscribed": "no"}
    denied = stub.Check(check_request("POST", "/contacts", bad, "trace-check"), timeout=10)
    assert denied.status.code != 0
    reply = denied.denied_response
    assert reply.status.code == 400
    headers = {h.header.key: h.header.value for h in reply.headers}
    assert headers == {"content-type": "application/json", ENVELOPE_BODY_HEADER: "1"}
    envelope = json.loads(reply.body)
    assert envelope["success"] is False and set(envelope) == {"success", "error", "timestamp"}
    assert envelope["error"] == {
        "code": "VALIDATION_ERROR",
        "message": 'subscribed: must be true or false; got "no"',
        "statusCode": 400,
        "requestId": "trace-check",
        "errors": [
            {
                "field": "subscribed",
                "message": 'must be true or false; got "no"',
                "code": "invalid_type",
            }
        ],
    }


def test_check_answers_405_with_allow(channel: grpc.Channel) -> None:
    stub = external_auth_pb2_grpc.AuthorizationStub(channel)
    denied = stub.Check(check_request("PUT", "/segments/abc", {}, "trace-405"), timeout=10)
    assert denied.status.code != 0
    reply = denied.denied_response
    assert reply.status.code == 405
    headers = {h.header.key: h.header.value for h in reply.headers}
    assert headers == {
        "content-type": "application/json",
        ENVELOPE_BODY_HEADER: "1",
        "allow": "DELETE, GET, PATCH",
    }
    envelope = json.loads(reply.body)
    assert set(envelope) == {"success", "error", "timestamp"}
    assert envelope["error"] == {
        "code": "METHOD_NOT_ALLOWED",
        "message": "PUT is not allowed on /segments/abc; allowed: DELETE, GET, PATCH",
        "statusCode": 405,
        "requestId": "trace-405",
    }


def test_large_bodies_are_checked_too(channel: grpc.Channel) -> None:
    stub = external_auth_pb2_grpc.AuthorizationStub(channel)
    contacts: list[dict[str, Any]] = [
        {"email": f"c{i}@x.com", "data": {"f": "x" * 200}} for i in range(400)
    ]
    assert len(json.dumps({"contacts": contacts})) > THREAD_BODY_BYTES
    allowed = stub.Check(
        check_request("POST", "/contacts/batch", {"contacts": contacts}), timeout=10
    )
    assert allowed.status.code == 0
    contacts[-1]["subscribed"] = "yes"
    denied = stub.Check(
        check_request("POST", "/contacts/batch", {"contacts": contacts}), timeout=10
    )
    errors = json.loads(denied.denied_response.body)["error"]["errors"]
    assert [e["field"] for e in errors] == ["contacts.399.subscribed"]
    # Without a request id (Envoy always sends one) the envelope still has one.
    assert json.loads(denied.denied_response.body)["error"]["requestId"]
