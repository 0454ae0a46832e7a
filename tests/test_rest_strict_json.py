"""Strict JSON shapes on the REST surface: Envoy's transcoder would read the strings "no",
"yes", "1", "t", ... as booleans, a lone value as a one-element list and nested arrays as
one flat list, and would drop unknown fields; the service's check of REST requests before
transcoding (rest_check.py, through Envoy's ext_authz) answers a 400 VALIDATION_ERROR naming
the field instead (docs/api.md: a wrong value type is a 400), against each request message
(its descriptor), and looks nowhere else, in particular not inside free-form `data` objects
or filter values."""

from __future__ import annotations

import http.client
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from sqlalchemy import Engine, text

from segments_api.v1 import resources_pb2, segments_pb2
from tests.conftest import ROOT, Project, Rest, Stubs
from tests.rest_helpers import Api, check_contact, check_error, check_segment, cond, flt

LENIENT_SPELLINGS = ["no", "yes", "1", "0", "t", "f", "true", "false", ""]


@pytest.fixture
def api(rest: Rest, project: Project) -> Api:
    return Api(rest, project)


def stored(engine: Engine, project: Project) -> dict[str, int]:
    """How many rows of each kind the project has."""
    counts = {}
    with engine.connect() as conn:
        for table in ("contacts", "events", "segments", "static_members"):
            counts[table] = int(
                conn.execute(
                    text(f"SELECT count(*) FROM {table} WHERE project_id = :p"), {"p": project.id}
                ).scalar_one()
            )
    return counts


PREMIUM = flt("data.plan", "equals", "premium")


@dataclass
class Targets:
    """A STATIC and a DYNAMIC segment to aim requests at, and what the project held then."""

    api: Api
    engine: Engine
    project: Project
    static: dict[str, Any]
    dynamic: dict[str, Any]
    before: dict[str, int]

    def unchanged(self) -> None:
        """Nothing stored, nothing changed."""
        assert stored(self.engine, self.project) == self.before
        assert self.api.segment(self.dynamic["id"]) == self.dynamic
        assert self.api.members(self.static["id"]) == []


@pytest.fixture
def targets(api: Api, engine: Engine, project: Project) -> Targets:
    static = api.static_segment("List")
    dynamic = api.create_segment("Premium", cond(PREMIUM))
    return Targets(api, engine, project, static, dynamic, stored(engine, project))


def check_rejected(resp: Any, field: str, got: str, reason: str = "must be true or false") -> None:
    err = check_error(resp, 400, "VALIDATION_ERROR", field)
    assert err["errors"] == [
        {"field": field, "message": f"{reason}; got {got}", "code": "invalid_type"}
    ], err
    assert err["message"] == f"{field}: {reason}; got {got}", err


@pytest.mark.parametrize("value", LENIENT_SPELLINGS)
def test_string_for_subscribed_on_upsert(
    rest: Rest, project: Project, engine: Engine, value: str
) -> None:
    resp = rest.post("/contacts", {"email": "s@x.com", "subscribed": value}, key=project.secret_key)
    check_rejected(resp, "subscribed", json.dumps(value))
    assert stored(engine, project)["contacts"] == 0


@pytest.mark.parametrize("value", [1, 0, {"a": 1}, [True]])
def test_other_non_booleans_for_subscribed(
    rest: Rest, project: Project, engine: Engine, value: Any
) -> None:
    resp = rest.post("/contacts", {"email": "s@x.com", "subscribed": value}, key=project.secret_key)
    check_rejected(resp, "subscribed", json.dumps(value))  # the value as sent
    assert stored(engine, project)["contacts"] == 0


def test_string_booleans_are_rejected_on_every_route(
    rest: Rest, project: Project, targets: Targets
) -> None:
    key = project.secret_key
    static, dynamic = targets.static, targets.dynamic
    ok = {"email": "ok@x.com", "subscribed": True, "data": {"subscribed": "yes"}}
    cases: list[tuple[str, str, Any, str, str]] = [
        ("POST", "/contacts", {"email": "a@x.com", "subscribed": "no"}, "subscribed", '"no"'),
        (
            "POST",
            "/contacts/batch",
            {"contacts": [ok, ok, {"email": "b@x.com"}, {"email": "c@x.com", "subscribed": "t"}]},
            "contacts.3.subscribed",
            '"t"',
        ),
        (
            "POST",
            "/contacts/batch",
            {"contacts": [{"email": "d@x.com", "subscribed": "yes"}]},
            "contacts.0.subscribed",
            '"yes"',
        ),
        (
            "POST",
            "/segments",
            {"name": "S", "type": "STATIC", "trackMembership": "yes"},
            "trackMembership",
            '"yes"',
        ),
        # The transcoder also takes proto field names; the error names the JSON one.
        (
            "POST",
            "/segments",
            {"name": "S", "type": "STATIC", "track_membership": "1"},
            "trackMembership",
            '"1"',
        ),
        (
            "PATCH",
            f"/segments/{dynamic['id']}",
            {"trackMembership": "no"},
            "trackMembership",
            '"no"',
        ),
        (
            "POST",
            f"/segments/{static['id']}/members",
            {"emails": ["m@x.com"], "createMissing": "yes"},
            "createMissing",
            '"yes"',
        ),
        (
            "POST",
            f"/segments/{static['id']}/members",
            {"emails": ["m@x.com"], "create_missing": "true"},
            "createMissing",
            '"true"',
        ),
        (
            "POST",
            f"/segments/{static['id']}/members",
            {"emails": ["m@x.com"], "createMissing": True, "subscribed": "no"},
            "subscribed",
            '"no"',
        ),
    ]
    for method, path, body, field, got in cases:
        check_rejected(rest.request(method, path, body, key=key), field, got)
    resp = rest.post(
        "/v1/track",
        {"event": "signup", "email": "t@x.com", "subscribed": "yes"},
        key=project.public_key,
    )
    check_rejected(resp, "subscribed", '"yes"')
    targets.unchanged()


def test_lists_must_be_arrays_on_every_route(
    rest: Rest, project: Project, targets: Targets
) -> None:
    key = project.secret_key
    static, dynamic = targets.static, targets.dynamic
    array, string, obj = "must be an array", "must be a string", "must be an object"
    nested = [["n1@x.com", "n2@x.com"]]
    members = f"/segments/{static['id']}/members"
    one = {"email": "o@x.com"}
    event = {"email": "o@x.com", "event": "p"}
    groups = {"filters": [PREMIUM]}
    deep = {
        "groups": [{"filters": [PREMIUM], "conditions": {"groups": [{"filters": [[PREMIUM]]}]}}]
    }
    cases: list[tuple[str, str, Any, str, Any, str]] = [
        ("POST", members, {"emails": "s@x.com"}, "emails", "s@x.com", array),
        ("POST", members, {"emails": nested}, "emails.0", nested[0], string),
        ("POST", members, {"emails": ["a@x.com", ["c@x.com"]]}, "emails.1", ["c@x.com"], string),
        ("DELETE", members, {"emails": "s@x.com"}, "emails", "s@x.com", array),
        ("POST", "/contacts/batch", {"contacts": one}, "contacts", one, array),
        ("POST", "/contacts/batch", {"contacts": [one, [one]]}, "contacts.1", [one], obj),
        ("POST", "/events/batch", {"events": event}, "events", event, array),
        (
            "POST",
            "/segments",
            {"name": "S", "condition": {"groups": groups}},
            "condition.groups",
            groups,
            array,
        ),
        (
            "POST",
            "/segments",
            {"name": "S", "condition": {"logic": "AND", "groups": [{"filters": PREMIUM}]}},
            "condition.groups.0.filters",
            PREMIUM,
            array,
        ),
        # Nested conditions are checked at any depth.
        (
            "PATCH",
            f"/segments/{dynamic['id']}",
            {"condition": deep},
            "condition.groups.0.conditions.groups.0.filters.0",
            [PREMIUM],
            obj,
        ),
    ]
    for method, path, body, field, value, reason in cases:
        check_rejected(rest.request(method, path, body, key=key), field, json.dumps(value), reason)
    targets.unchanged()


def test_arrays_and_values_inside_free_form_fields_are_accepted(
    rest: Rest, api: Api, project: Project
) -> None:
    key = project.secret_key
    static = api.static_segment("List")
    resp = rest.post(f"/segments/{static['id']}/members", {"emails": ["a@x.com"]}, key=key)
    assert resp.status == 200 and resp.json["added"] == 1, resp.raw[:500]
    # `data` and a filter's `value` are free-form: arrays in them are data, not lists.
    resp = rest.post(
        "/events/batch",
        {"events": [{"email": "a@x.com", "event": "p", "data": {"groups": "x", "emails": [[1]]}}]},
        key=key,
    )
    assert resp.status == 200 and resp.json == {"accepted": 1}, resp.raw[:500]
    resp = rest.post(
        "/segments",
        {"name": "In", "condition": cond(flt("data.tags", "equals", "a"))},
        key=key,
    )
    assert resp.status == 201, resp.raw[:500]


def test_escaped_key_is_still_the_field(rest: Rest, project: Project, engine: Engine) -> None:
    # The transcoder decodes escapes in keys, so this is `subscribed` to it.
    raw = b'{"email":"e@x.com","subscrib\\u0065d":"no"}'
    check_rejected(rest.post("/contacts", raw=raw, key=project.secret_key), "subscribed", '"no"')
    assert stored(engine, project)["contacts"] == 0


def test_strings_inside_data_are_not_checked(rest: Rest, api: Api, project: Project) -> None:
    data = {
        "subscribed": "yes",
        "createMissing": "no",
        "trackMembership": "1",
        "nested": {"subscribed": "t", "list": [{"subscribed": "no"}, "subscribed"]},
        # Brackets, quotes, backslashes and escapes inside strings do not confuse the scan.
        "tricky": 'a"b\\c {[ ]} é 😀 \\"subscribed\\": "no"',
    }
    resp = rest.post(
        "/contacts", {"email": "a@x.com", "data": data, "subscribed": False}, key=project.secret_key
    )
    assert resp.status == 201, resp.raw[:500]
    contact = check_contact(resp.json)
    assert contact["data"] == data and contact["subscribed"] is False

    result = api.batch([{"email": "b@x.com", "data": data}, {"email": "c@x.com", "data": data}])
    assert result == {"created": 2, "updated": 0}

    resp = rest.post(
        "/v1/track", {"event": "e", "email": "d@x.com", "data": data}, key=project.public_key
    )
    assert resp.status == 200, resp.raw[:500]


def test_null_means_absent(rest: Rest, api: Api, project: Project) -> None:
    key = project.secret_key
    resp = rest.post("/contacts", {"email": "n@x.com", "subscribed": None}, key=key)
    assert resp.status == 201, resp.raw[:500]
    assert check_contact(resp.json)["subscribed"] is True  # the default

    resp = rest.post(
        "/contacts/batch", {"contacts": [{"email": "m@x.com", "subscribed": None}]}, key=key
    )
    assert resp.status == 200 and resp.json == {"created": 1, "updated": 0}, resp.raw[:500]

    resp = rest.post("/segments", {"name": "N", "type": "STATIC", "trackMembership": None}, key=key)
    assert resp.status == 201, resp.raw[:500]
    segment = check_segment(resp.json, project)

    resp = rest.patch(f"/segments/{segment['id']}", {"trackMembership": None}, key=key)
    assert resp.status == 200, resp.raw[:500]
    assert check_segment(resp.json, project)["trackMembership"] == segment["trackMembership"]

    resp = rest.post(
        f"/segments/{segment['id']}/members",
        {"emails": ["new@x.com"], "createMissing": None, "subscribed": None},
        key=key,
    )
    assert resp.status == 200, resp.raw[:500]
    # As if absent: createMissing defaults to true, subscribed to true.
    assert resp.json == {"added": 1, "created": 1, "notFound": []}, resp.json
    assert api.upsert("new@x.com")["subscribed"] is True


def test_real_booleans_are_applied(rest: Rest, api: Api, project: Project) -> None:
    key = project.secret_key
    resp = rest.post("/contacts", {"email": "f@x.com", "subscribed": False}, key=key)
    assert resp.status == 201 and resp.json["subscribed"] is False, resp.raw[:500]
    result = api.batch(
        [{"email": "g@x.com", "subscribed": False}, {"email": "h@x.com", "subscribed": True}]
    )
    assert result == {"created": 2, "updated": 0}

    on = api.create_segment("On", cond(flt("data.plan", "exists")), trackMembership=True)
    assert on["trackMembership"] is True
    assert api.patch_segment(on["id"], {"trackMembership": False})["trackMembership"] is False

    static = api.static_segment()
    result = api.add(static["id"], ["i@x.com"], createMissing=True, subscribed=False)
    assert result["created"] == 1, result
    resp = rest.post("/contacts", {"email": "i@x.com"}, key=key)
    assert resp.status == 200 and resp.json["subscribed"] is False, resp.raw[:500]

    resp = rest.post(
        "/v1/track",
        {"event": "e", "email": "g@x.com", "subscribed": True},
        key=project.public_key,
    )
    assert resp.status == 200, resp.raw[:500]


def big_batch(last_subscribed: Any) -> bytes:
    """About 900 KB: 1000 contacts with bools and escape-heavy `data`."""
    filler = 'x"\\{[' * 80 + "é" * 40
    contacts: list[dict[str, Any]] = [
        {"email": f"big{i}@x.com", "subscribed": i % 2 == 0, "data": {"f": filler, "i": [i, {}]}}
        for i in range(999)
    ]
    contacts.append({"email": "big999@x.com", "subscribed": last_subscribed})
    raw = json.dumps({"contacts": contacts}).encode()
    assert 850_000 < len(raw) < 1 << 20, len(raw)
    return raw


def test_large_valid_body_is_accepted(rest: Rest, project: Project, engine: Engine) -> None:
    resp = rest.post("/contacts/batch", raw=big_batch(True), key=project.secret_key)
    assert resp.status == 200, resp.raw[:500]
    assert resp.json == {"created": 1000, "updated": 0}
    assert stored(engine, project)["contacts"] == 1000


def test_large_body_with_a_bad_last_value(rest: Rest, project: Project, engine: Engine) -> None:
    resp = rest.post("/contacts/batch", raw=big_batch("no"), key=project.secret_key)
    check_rejected(resp, "contacts.999.subscribed", '"no"')
    assert stored(engine, project)["contacts"] == 0


@pytest.mark.parametrize(
    "raw",
    [
        b'{"email":"x@x.com","subscribed":"no",',
        b'{"email":"x@x.com","subscribed":"no"} trailing',
        b'{"email":"x@x.com","subscribed":"no}',
        # Not UTF-8: never echoed back in an error message.
        b'{"email":"x@x.com","subscribed":"\xff"}',
    ],
)
def test_malformed_json_is_refused_as_a_whole(
    rest: Rest, project: Project, engine: Engine, raw: bytes
) -> None:
    err = check_error(
        rest.post("/contacts", raw=raw, key=project.secret_key), 400, "VALIDATION_ERROR"
    )
    assert "true or false" not in err["message"], err
    assert err["message"].startswith("Malformed JSON: "), err
    assert err["errors"] == [{"field": "", "message": err["message"], "code": "malformed_json"}]
    assert stored(engine, project)["contacts"] == 0


def test_connection_stays_usable_after_a_rejection(rest_url: str, project: Project) -> None:
    url = urlsplit(rest_url)
    conn = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port, timeout=30)
    headers = {"content-type": "application/json", "authorization": f"Bearer {project.secret_key}"}
    try:
        conn.connect()
        sock = conn.sock
        for body, status in [
            ({"email": "k@x.com", "subscribed": "no"}, 400),
            ({"email": "k@x.com", "subscribed": True}, 201),
            ({"email": "k@x.com", "subscribed": "yes"}, 400),
            ({"email": "k@x.com", "subscribed": False}, 200),
        ]:
            conn.request("POST", "/contacts", body=json.dumps(body), headers=headers)
            resp = conn.getresponse()
            payload = resp.read()
            assert resp.status == status, payload[:500]
            # http.client would silently reconnect: the same socket means kept alive.
            assert conn.sock is sock, resp.headers
    finally:
        conn.close()


def test_unknown_fields_are_refused_on_every_route(
    rest: Rest, project: Project, targets: Targets
) -> None:
    key = project.secret_key
    static, dynamic = targets.static, targets.dynamic
    members = f"/segments/{static['id']}/members"
    filters = [{**PREMIUM, "negate": True}]
    cases: list[tuple[str, str, Any, str]] = [
        ("POST", "/contacts", {"email": "u@x.com", "tags": ["vip"]}, "tags"),
        (
            "POST",
            "/contacts/batch",
            {"contacts": [{"email": "u@x.com", "plan": 1}]},
            "contacts.0.plan",
        ),
        (
            "POST",
            "/events/batch",
            {"events": [{"email": "u@x.com", "event": "e", "at": 1}]},
            "events.0.at",
        ),
        ("POST", "/segments", {"name": "S", "type": "STATIC", "kind": "STATIC"}, "kind"),
        (
            "PATCH",
            f"/segments/{dynamic['id']}",
            {"condition": {"logic": "AND", "groups": [{"filters": filters}]}},
            "condition.groups.0.filters.0.negate",
        ),
        ("POST", members, {"emails": ["u@x.com"], "createMising": False}, "createMising"),
        ("DELETE", members, {"emails": ["u@x.com"], "all": True}, "all"),
    ]
    for method, path, body, field in cases:
        err = check_error(rest.request(method, path, body, key=key), 400, "VALIDATION_ERROR")
        assert err["errors"] == [
            {"field": field, "message": "unknown field", "code": "unknown_field"}
        ], err
    resp = rest.post(
        "/v1/track", {"event": "e", "email": "u@x.com", "props": {}}, key=project.public_key
    )
    check_error(resp, 400, "VALIDATION_ERROR", "props")
    targets.unchanged()


def test_enums_name_their_spellings(rest: Rest, project: Project, targets: Targets) -> None:
    resp = rest.post("/segments", {"name": "S", "type": "static"}, key=project.secret_key)
    err = check_error(resp, 400, "VALIDATION_ERROR")
    message = 'must be one of DYNAMIC, STATIC; got "static"'
    assert err["errors"] == [{"field": "type", "message": message, "code": "invalid_enum"}]
    assert err["message"] == f"type: {message}"
    resp = rest.patch(
        f"/segments/{targets.dynamic['id']}",
        {"condition": {"logic": "XOR", "groups": [{"filters": [PREMIUM]}]}},
        key=project.secret_key,
    )
    err = check_error(resp, 400, "VALIDATION_ERROR", "condition.logic")
    assert err["errors"][0]["message"] == 'must be one of AND, OR; got "XOR"', err
    targets.unchanged()


def test_timestamps_and_strings_are_typed(rest: Rest, project: Project, engine: Engine) -> None:
    key = project.secret_key
    resp = rest.post(
        "/events/batch", {"events": [{"email": "t@x.com", "event": "e", "occurredAt": 5}]}, key=key
    )
    err = check_error(resp, 400, "VALIDATION_ERROR")
    assert err["errors"] == [
        {
            "field": "events.0.occurredAt",
            "message": "must be an RFC 3339 timestamp such as 2024-01-31T12:00:00Z",
            "code": "invalid_value",
        }
    ]
    resp = rest.post("/contacts", {"email": ["t@x.com"]}, key=key)
    err = check_error(resp, 400, "VALIDATION_ERROR")
    assert err["errors"] == [
        {"field": "email", "message": 'must be a string; got ["t@x.com"]', "code": "invalid_type"}
    ]
    assert stored(engine, project)["contacts"] == stored(engine, project)["events"] == 0


def test_a_body_may_not_set_what_the_path_sets(
    rest: Rest, project: Project, targets: Targets
) -> None:
    key = project.secret_key
    static, dynamic = targets.static, targets.dynamic
    for method, path, body in (
        ("PATCH", f"/segments/{dynamic['id']}", {"id": static["id"], "name": "Changed"}),
        ("POST", f"/segments/{dynamic['id']}/members", {"id": static["id"], "emails": ["a@x.com"]}),
    ):
        err = check_error(rest.request(method, path, body, key=key), 400, "VALIDATION_ERROR")
        assert err["errors"] == [
            {"field": "id", "message": "conflicts with the id in the URL path", "code": "conflict"}
        ], err
    targets.unchanged()


def test_query_parameters_are_checked(rest: Rest, project: Project, targets: Targets) -> None:
    contacts = f"/segments/{targets.static['id']}/contacts"
    resp = rest.get(f"{contacts}?pageSize=ten", key=project.secret_key)
    err = check_error(resp, 400, "VALIDATION_ERROR")
    message = 'must be a 32-bit integer; got "ten"'
    assert err["errors"] == [{"field": "pageSize", "message": message, "code": "invalid_type"}]
    # Only the JSON name: the proto name, which the transcoder alone would take, is an
    # unknown parameter, named as it was sent.
    resp = rest.get(f"{contacts}?page_size=5&page=1", key=project.secret_key)
    err = check_error(resp, 400, "VALIDATION_ERROR")
    assert err["errors"] == [
        {"field": "page_size", "message": "unknown query parameter", "code": "unknown_field"}
    ]
    resp = rest.get(f"{contacts}?pageSize=5&page=1", key=project.secret_key)
    assert resp.status == 200 and resp.json["pageSize"] == 5, resp.raw[:300]
    resp = rest.post("/contacts?subscribed=true", {"email": "q@x.com"}, key=project.secret_key)
    err = check_error(resp, 400, "VALIDATION_ERROR")
    assert err["errors"] == [
        {"field": "subscribed", "message": "unknown query parameter", "code": "unknown_field"}
    ]
    targets.unchanged()


def test_a_refusal_carries_the_request_id(rest: Rest, project: Project) -> None:
    resp = rest.post(
        "/contacts",
        {"email": "r@x.com", "subscribed": "no"},
        key=project.secret_key,
        headers={"X-Request-Id": "trace-strict-1"},
    )
    err = check_error(resp, 400, "VALIDATION_ERROR", "subscribed")
    assert err["requestId"] == "trace-strict-1"
    leaked = {"x-envelope-body", "x-error-envelope", "x-http-status"}
    assert not leaked & set(resp.headers), resp.headers


# --- methods a path does not serve ------------------------------------------------------


def test_a_method_a_path_does_not_serve_is_405_with_allow(
    rest: Rest, project: Project, targets: Targets
) -> None:
    key = project.secret_key
    static, dynamic = targets.static, targets.dynamic
    contact = targets.api.upsert("m@x.com")
    before = stored(targets.engine, project)
    cases: list[tuple[str, str, Any, str]] = [
        ("PUT", f"/segments/{dynamic['id']}", {"name": "Changed"}, "DELETE, GET, PATCH"),
        ("POST", f"/contacts/{contact['id']}", {"email": "n@x.com"}, "DELETE, GET, PATCH"),
        ("PUT", "/segments", {"name": "S", "type": "STATIC"}, "GET, POST"),
        ("DELETE", "/segments", None, "GET, POST"),
        ("PATCH", f"/segments/{static['id']}/members", {"emails": ["a@x.com"]}, "DELETE, POST"),
        # A literal path is its own binding's alone: not a contact or segment id.
        ("PUT", "/contacts/batch", {"contacts": []}, "POST"),
        ("GET", "/contacts/batch", None, "POST"),
        ("DELETE", "/segments/preview", None, "POST"),
        ("GET", "/segments/preview/", None, "POST"),
        ("POST", "/openapi.json", {}, "GET"),
        ("TRACE", "/webhooks", None, "GET, POST"),
        # A GET without a query string too, of a path GET is not bound on.
        ("GET", "/v1/track", None, "POST"),
        ("GET", f"/segments/{static['id']}/members", None, "DELETE, POST"),
        ("GET", "/events/batch", None, "POST"),
        ("GET", "/v1/track?x=1", None, "POST"),
    ]
    for method, path, body, allow in cases:
        resp = rest.request(method, path, body, key=key, headers={"X-Request-Id": "m-405"})
        err = check_error(resp, 405, "METHOD_NOT_ALLOWED")
        assert resp.headers["allow"] == allow, (method, path, resp.headers)
        bare = path.partition("?")[0]
        assert err == {
            "code": "METHOD_NOT_ALLOWED",
            "message": f"{method} is not allowed on {bare}; allowed: {allow}",
            "statusCode": 405,
            "requestId": "m-405",
        }, (method, path)
        assert not {"x-envelope-body", "x-error-envelope"} & set(resp.headers)
    # Before any key is looked at: the method is wrong whoever asks.
    resp = rest.request("PUT", f"/segments/{dynamic['id']}")
    check_error(resp, 405, "METHOD_NOT_ALLOWED")
    # HEAD has no body, only the status and Allow.
    resp = rest.request("HEAD", "/segments", key=key)
    assert (resp.status, resp.headers["allow"], resp.raw) == (405, "GET, POST", b"")
    assert stored(targets.engine, project) == before
    assert targets.api.segment(dynamic["id"]) == dynamic
    assert rest.get(f"/contacts/{contact['id']}", key=key).json == contact


def test_unknown_paths_stay_404(rest: Rest, project: Project) -> None:
    for method, path in (
        ("GET", "/nowhere"),
        ("PUT", "/nowhere"),
        ("POST", "/v2/track"),
        ("GET", "/segments/a/b/c"),
        ("GET", "/segments/a/b/c?page=1"),
        ("DELETE", "/openapi.json/x"),
    ):
        resp = rest.request(method, path, key=project.secret_key)
        check_error(resp, 404, "NOT_FOUND")
        assert "allow" not in resp.headers, (method, path)


# --- query parameters go by their JSON names ----------------------------------------------


def _query_operations() -> list[tuple[str, str, str]]:
    """(method, path template, JSON name) of every query parameter of the REST surface, as
    the OpenAPI document lists them."""
    document = json.loads((ROOT / "openapi" / "openapi.json").read_text())
    return [
        (method.upper(), path, parameter["name"])
        for path, operations in document["paths"].items()
        for method, operation in operations.items()
        for parameter in operation.get("parameters", [])
        if parameter["in"] == "query"
    ]


# A value each query parameter takes.
QUERY_VALUES = {
    "limit": "5",
    "cursor": "",
    "search": "a",
    "subscribed": "true",
    "page": "1",
    "pageSize": "5",
    "after": "",
    "interval": "day",
    "from": "2026-01-01T00:00:00Z",
    "to": "2026-01-02T00:00:00Z",
}


def _snake(name: str) -> str:
    return re.sub(r"([A-Z])", lambda m: "_" + m[1].lower(), name)


def test_every_query_parameter_goes_by_its_json_name_only(
    rest: Rest, project: Project, targets: Targets
) -> None:
    """Each route's query parameters: the JSON name is taken; the proto name (`page_size`)
    and any other spelling (`Limit`) is an unknown parameter, named as it was sent."""
    operations = _query_operations()
    assert {name for _, _, name in operations} == set(QUERY_VALUES)
    assert ("GET", "/segments/{id}/contacts", "pageSize") in operations
    tracked = targets.api.create_segment("Tracked", cond(PREMIUM), trackMembership=True)
    for method, template, name in operations:
        path = template.replace("{id}", tracked["id"])
        value = QUERY_VALUES[name]
        resp = rest.request(method, f"{path}?{name}={value}", key=project.secret_key)
        # 404 for a webhook this project does not have: past the check either way.
        assert resp.status in (200, 404), (method, path, name, resp.raw[:300])
        for spelling in {_snake(name), name[0].upper() + name[1:]} - {name}:
            resp = rest.request(method, f"{path}?{spelling}={value}", key=project.secret_key)
            err = check_error(resp, 400, "VALIDATION_ERROR")
            assert err["errors"] == [
                {"field": spelling, "message": "unknown query parameter", "code": "unknown_field"}
            ], (method, path, spelling)


# --- members calls take 1 to 500 emails ----------------------------------------------------


@pytest.mark.parametrize("method", ["POST", "DELETE"])
def test_members_calls_take_1_to_500_emails(
    rest: Rest, project: Project, targets: Targets, method: str
) -> None:
    members = f"/segments/{targets.static['id']}/members"
    for emails, message in (
        ([], "must hold 1 to 500 emails, got none"),
        ([f"e{i}@x.com" for i in range(501)], "at most 500 emails per call, got 501"),
    ):
        resp = rest.request(method, members, {"emails": emails}, key=project.secret_key)
        err = check_error(resp, 400, "VALIDATION_ERROR", "emails")
        assert [(e["field"], e["message"]) for e in err["errors"]] == [("emails", message)]
    # Absent is empty.
    resp = rest.request(method, members, {}, key=project.secret_key)
    check_error(resp, 400, "VALIDATION_ERROR", "emails")
    targets.unchanged()
    emails = [f"e{i}@x.com" for i in range(500)]
    resp = rest.request(method, members, {"emails": emails}, key=project.secret_key)
    assert resp.status == 200, resp.raw[:300]


def test_members_email_count_over_grpc(stubs: Stubs, project: Project, targets: Targets) -> None:
    static = targets.static["id"]

    def add(emails: list[str]) -> object:
        request = segments_pb2.AddSegmentMembersRequest(id=static, emails=emails)
        return stubs.segments.AddSegmentMembers(request, metadata=project.auth)

    def remove(emails: list[str]) -> object:
        request = segments_pb2.RemoveSegmentMembersRequest(id=static, emails=emails)
        return stubs.segments.RemoveSegmentMembers(request, metadata=project.auth)

    calls: list[Callable[[list[str]], object]] = [add, remove]
    for call in calls:
        for emails in ([], [f"e{i}@x.com" for i in range(501)]):
            with pytest.raises(grpc.RpcError) as failed:
                call(emails)
            assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert bad_fields(failed.value) == ["emails"]
    targets.unchanged()


def bad_fields(err: grpc.RpcError) -> list[str]:
    """The fields of the google.rpc.BadRequest of a failed call."""
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None
    fields = []
    for detail in status.details:
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            fields += [v.field for v in bad.field_violations]
    return fields


# --- only DYNAMIC segments track membership ------------------------------------------------


def test_a_static_segment_cannot_track_membership(
    rest: Rest, project: Project, targets: Targets
) -> None:
    key = project.secret_key
    resp = rest.post("/segments", {"name": "x", "type": "STATIC", "trackMembership": True}, key=key)
    err = check_error(resp, 400, "VALIDATION_ERROR", "trackMembership")
    assert err["errors"][0]["code"] == "invalid_value"
    static = targets.static["id"]
    for body in ({"trackMembership": True}, {"name": "Renamed", "trackMembership": True}):
        resp = rest.patch(f"/segments/{static}", body, key=key)
        check_error(resp, 400, "VALIDATION_ERROR", "trackMembership")
    assert targets.api.segment(static) == targets.static
    targets.unchanged()
    # false is what a STATIC segment is anyway.
    resp = rest.post(
        "/segments", {"name": "y", "type": "STATIC", "trackMembership": False}, key=key
    )
    assert resp.status == 201 and resp.json["trackMembership"] is False, resp.raw[:300]
    assert targets.api.patch_segment(static, {"trackMembership": False})["name"] == "List"


def test_a_static_segment_cannot_track_membership_over_grpc(
    stubs: Stubs, project: Project, targets: Targets
) -> None:
    STATIC = resources_pb2.Segment.STATIC
    with pytest.raises(grpc.RpcError) as failed:
        stubs.segments.CreateSegment(
            segments_pb2.CreateSegmentRequest(name="x", type=STATIC, track_membership=True),
            metadata=project.auth,
        )
    assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_fields(failed.value) == ["trackMembership"]
    with pytest.raises(grpc.RpcError) as failed:
        stubs.segments.UpdateSegment(
            segments_pb2.UpdateSegmentRequest(id=targets.static["id"], track_membership=True),
            metadata=project.auth,
        )
    assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_fields(failed.value) == ["trackMembership"]
    targets.unchanged()
