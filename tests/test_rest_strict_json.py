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
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import pytest
from sqlalchemy import Engine, text

from tests.conftest import Project, Rest
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
    resp = rest.post(f"/segments/{static['id']}/members", {"emails": []}, key=key)
    assert resp.status == 200 and resp.json == {"added": 0, "created": 0, "notFound": []}
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
    # The proto name is taken too, as the transcoder takes it.
    resp = rest.get(f"{contacts}?page_size=5&page=1", key=project.secret_key)
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
