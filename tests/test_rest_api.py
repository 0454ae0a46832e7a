"""The REST contract of docs/api.md, end to end through Envoy's gRPC-JSON transcoder:
status codes, exact body shapes, the error envelope, auth, project isolation and limits."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session, sessionmaker

from segments import F
from segments_service.auth import revoke_key
from tests.conditions import cond, flt
from tests.conftest import Project, Rest, new_project
from tests.rest_helpers import (
    Api,
    check_contact,
    check_error,
    check_segment,
    error_fields,
    parse_time,
)

PREMIUM = F.data("plan") == "premium"


@pytest.fixture
def api(rest: Rest, project: Project) -> Api:
    return Api(rest, project)


@pytest.fixture
def other(rest: Rest, other_project: Project) -> Api:
    return Api(rest, other_project)


def contact_count(engine: Engine, project: Project) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(
                text("SELECT count(*) FROM contacts WHERE project_id = :p"), {"p": project.id}
            ).scalar_one()
        )


def event_names(engine: Engine, project: Project) -> list[tuple[str, str]]:
    """(contact email, event name) of every recorded event, oldest first."""
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT c.email, e.name FROM events e JOIN contacts c "
                "ON c.project_id = e.project_id AND c.id = e.contact_id "
                "WHERE e.project_id = :p ORDER BY e.occurred_at, e.id"
            ),
            {"p": project.id},
        )
        return [(r.email, r.name) for r in rows]


# --- GET/POST /segments --------------------------------------------------------------


def test_list_segments_is_a_bare_array_newest_first(rest: Rest, api: Api, project: Project) -> None:
    resp = rest.get("/segments", key=project.secret_key)
    assert resp.status == 200
    assert resp.json == []
    first = api.create_segment("First", PREMIUM.to_dict())
    second = api.static_segment("Second")
    third = api.create_segment("Third", F.email.contains("@").to_dict())
    resp = rest.get("/segments", key=project.secret_key)
    assert resp.status == 200
    assert resp.headers["content-type"].startswith("application/json")
    body = resp.json
    assert isinstance(body, list)
    assert [s["id"] for s in body] == [third["id"], second["id"], first["id"]]
    for item in body:
        check_segment(item, project)
    assert body[1] == second


def test_create_dynamic_is_the_default(rest: Rest, project: Project) -> None:
    condition = (PREMIUM & F.subscribed.equals(True)).to_dict()
    resp = rest.post(
        "/segments", {"name": "Premium", "condition": condition}, key=project.secret_key
    )
    assert resp.status == 201
    seg = check_segment(resp.json, project)
    assert seg["name"] == "Premium"
    assert seg["description"] is None
    assert seg["type"] == "DYNAMIC"
    assert seg["condition"] == condition
    assert seg["trackMembership"] is False
    assert seg["memberCount"] == 0
    assert seg["createdAt"] == seg["updatedAt"]  # not yet updated
    # The raw JSON prints null and a number, not omitted fields or strings.
    raw = json.loads(resp.raw)
    assert "description" in raw and raw["description"] is None
    assert b'"memberCount":0' in resp.raw.replace(b" ", b"")


def test_create_with_every_field(rest: Rest, api: Api, project: Project) -> None:
    api.upsert("a@x.com", {"plan": "premium"})
    resp = rest.post(
        "/segments",
        {
            "name": "VIP",
            "description": "Paying customers",
            "type": "DYNAMIC",
            "condition": PREMIUM.to_dict(),
            "trackMembership": True,
        },
        key=project.secret_key,
    )
    assert resp.status == 201
    seg = check_segment(resp.json, project)
    assert seg["description"] == "Paying customers"
    assert seg["trackMembership"] is True
    assert seg["memberCount"] == 1
    assert api.segment(seg["id"]) == seg


def test_static_ignores_condition(rest: Rest, api: Api, project: Project) -> None:
    resp = rest.post(
        "/segments",
        {"name": "List", "type": "STATIC", "condition": PREMIUM.to_dict()},
        key=project.secret_key,
    )
    assert resp.status == 201
    seg = check_segment(resp.json, project)
    assert seg["type"] == "STATIC"
    assert seg["condition"] is None
    assert api.segment(seg["id"])["condition"] is None
    # Ignored means not validated either.
    resp = rest.post(
        "/segments",
        {"name": "List 2", "type": "STATIC", "condition": {"logic": "AND", "groups": []}},
        key=project.secret_key,
    )
    assert resp.status == 201
    assert resp.json["condition"] is None


def test_dynamic_needs_a_condition(rest: Rest, project: Project) -> None:
    for body in (
        {"name": "No condition"},
        {"name": "Explicit", "type": "DYNAMIC"},
        {"name": "Null", "condition": None},
    ):
        resp = rest.post("/segments", body, key=project.secret_key)
        check_error(resp, 400, "VALIDATION_ERROR", "condition")
    assert rest.get("/segments", key=project.secret_key).json == []


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"type": "STATIC"}, "name"),
        ({"name": "", "type": "STATIC"}, "name"),
        ({"name": "x" * 101, "type": "STATIC"}, "name"),
        ({"name": "ok", "description": "d" * 501, "type": "STATIC"}, "description"),
        ({"name": 5, "type": "STATIC"}, "name"),
        ({"name": "ok", "type": "SOMETIMES"}, "type"),
        ({"name": "ok", "type": "STATIC", "trackMembership": 1}, "trackMembership"),
    ],
)
def test_create_validation(rest: Rest, project: Project, body: dict[str, Any], field: str) -> None:
    resp = rest.post("/segments", body, key=project.secret_key)
    check_error(resp, 400, "VALIDATION_ERROR", field)
    assert rest.get("/segments", key=project.secret_key).json == []


def test_name_and_description_limits_are_inclusive(api: Api) -> None:
    assert api.create_segment("x", type="STATIC")["name"] == "x"
    seg = api.create_segment("n" * 100, type="STATIC", description="d" * 500)
    assert seg["name"] == "n" * 100 and seg["description"] == "d" * 500
    # Characters, not bytes.
    assert api.create_segment("é" * 100, type="STATIC")["name"] == "é" * 100


# --- GET/PATCH/DELETE /segments/{id} --------------------------------------------------


def test_get_segment_with_member_count(rest: Rest, api: Api, project: Project) -> None:
    seg = api.create_segment("Premium", PREMIUM.to_dict())
    api.batch([{"email": f"p{i}@x.com", "data": {"plan": "premium"}} for i in range(3)])
    api.upsert("free@x.com", {"plan": "free"})
    resp = rest.get(f"/segments/{seg['id']}", key=project.secret_key)
    assert resp.status == 200
    got = check_segment(resp.json, project)
    assert got["memberCount"] == 3
    assert {k: v for k, v in got.items() if k != "memberCount"} == {
        k: v for k, v in seg.items() if k != "memberCount"
    }


def test_patch_is_partial(api: Api) -> None:
    api.upsert("a@x.com", {"plan": "premium"})
    api.upsert("b@x.com", {"plan": "free"})
    seg = api.create_segment("Premium", PREMIUM.to_dict(), description="first")
    assert seg["memberCount"] == 1

    renamed = api.patch_segment(seg["id"], {"name": "Renamed"})
    assert renamed["name"] == "Renamed"
    for key in ("id", "description", "type", "condition", "trackMembership", "memberCount"):
        assert renamed[key] == seg[key], key
    assert renamed["createdAt"] == seg["createdAt"]
    assert parse_time(renamed["updatedAt"]) > parse_time(seg["updatedAt"])

    described = api.patch_segment(seg["id"], {"description": "second"})
    assert described["description"] == "second" and described["name"] == "Renamed"

    tracked = api.patch_segment(seg["id"], {"trackMembership": True})
    assert tracked["trackMembership"] is True
    assert tracked["condition"] == seg["condition"]

    free = (F.data("plan") == "free").to_dict()
    changed = api.patch_segment(seg["id"], {"condition": free})
    assert changed["condition"] == free
    assert changed["memberCount"] == 1
    assert api.members(seg["id"]) == ["b@x.com"]
    assert changed["name"] == "Renamed" and changed["description"] == "second"
    assert changed["trackMembership"] is True

    # An empty body changes nothing.
    same = api.patch_segment(seg["id"], {})
    assert {k: v for k, v in same.items() if k != "updatedAt"} == {
        k: v for k, v in changed.items() if k != "updatedAt"
    }

    # "" clears the description (prints null again).
    assert api.patch_segment(seg["id"], {"description": ""})["description"] is None


def test_patch_type_cannot_change(rest: Rest, api: Api, project: Project) -> None:
    dynamic = api.create_segment("Dyn", PREMIUM.to_dict())
    static = api.static_segment("Stat")
    resp = rest.patch(f"/segments/{dynamic['id']}", {"type": "STATIC"}, key=project.secret_key)
    check_error(resp, 400, "VALIDATION_ERROR", "type")
    resp = rest.patch(
        f"/segments/{static['id']}", {"type": "DYNAMIC", "name": "x"}, key=project.secret_key
    )
    check_error(resp, 400, "VALIDATION_ERROR", "type")
    assert api.segment(dynamic["id"])["type"] == "DYNAMIC"
    # Nothing else of the failed request was written.
    assert api.segment(static["id"])["name"] == "Stat"
    # Restating the current type is harmless.
    assert api.patch_segment(static["id"], {"type": "STATIC", "name": "S2"})["name"] == "S2"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"name": ""}, "name"),
        ({"name": "x" * 101}, "name"),
        ({"description": "d" * 501}, "description"),
        ({"condition": {"logic": "AND", "groups": []}}, "condition.groups"),
        ({"condition": cond(flt("data.plan", "bogusOp", "x"))}, None),
        ({"name": "New name", "condition": cond(flt("subscribed", "equals", "x"))}, None),
        ({"name": "New name", "trackMembership": True, "description": "d" * 501}, "description"),
    ],
)
def test_patch_validation_writes_nothing(
    rest: Rest, api: Api, project: Project, body: dict[str, Any], field: str | None
) -> None:
    seg = api.create_segment("Keep", PREMIUM.to_dict(), description="d")
    resp = rest.patch(f"/segments/{seg['id']}", body, key=project.secret_key)
    check_error(resp, 400, "VALIDATION_ERROR", field)
    assert api.segment(seg["id"]) == seg


def test_patch_static_ignores_condition(api: Api) -> None:
    seg = api.static_segment("List")
    patched = api.patch_segment(seg["id"], {"condition": PREMIUM.to_dict(), "name": "List 2"})
    assert patched["condition"] is None and patched["name"] == "List 2"


def test_delete_segment(rest: Rest, api: Api, project: Project) -> None:
    seg = api.create_segment("Gone", PREMIUM.to_dict())
    resp = rest.delete(f"/segments/{seg['id']}", key=project.secret_key)
    assert resp.status == 204
    assert resp.raw == b""
    assert resp.headers.get("content-length", "0") == "0"
    check_error(rest.get(f"/segments/{seg['id']}", key=project.secret_key), 404, "NOT_FOUND")
    check_error(rest.delete(f"/segments/{seg['id']}", key=project.secret_key), 404, "NOT_FOUND")
    check_error(
        rest.get(f"/segments/{seg['id']}/contacts", key=project.secret_key), 404, "NOT_FOUND"
    )
    assert rest.get("/segments", key=project.secret_key).json == []


def test_delete_referenced_segment_is_refused(rest: Rest, api: Api, project: Project) -> None:
    base = api.create_segment("Base", PREMIUM.to_dict())
    user = api.create_segment(
        "Subscribed premium",
        (F.segment(base["id"]).member() & F.subscribed.equals(True)).to_dict(),
    )
    resp = rest.delete(f"/segments/{base['id']}", key=project.secret_key)
    err = check_error(resp, 409, "SEGMENT_IN_USE")
    assert "Subscribed premium" in err["message"] and user["id"] in err["message"]
    assert api.segment(base["id"]) == base
    # Once the referencing segment is gone the base can go too.
    assert rest.delete(f"/segments/{user['id']}", key=project.secret_key).status == 204
    assert rest.delete(f"/segments/{base['id']}", key=project.secret_key).status == 204


def test_static_reference_also_blocks_delete(rest: Rest, api: Api, project: Project) -> None:
    base = api.static_segment("Beta")
    api.create_segment("Not beta", F.segment(base["id"]).not_member().to_dict())
    check_error(
        rest.delete(f"/segments/{base['id']}", key=project.secret_key), 409, "SEGMENT_IN_USE"
    )


# --- GET /segments/{id}/contacts ------------------------------------------------------


def test_contacts_listing_pagination(
    rest: Rest, api: Api, project: Project, engine: Engine
) -> None:
    emails = [f"m{i:02d}@x.com" for i in range(25)]
    api.batch([{"email": e, "data": {"plan": "premium"}} for e in emails])
    api.batch([{"email": f"free{i}@x.com", "data": {"plan": "free"}} for i in range(3)])
    # Distinct creation times: m00 is the newest.
    with engine.begin() as conn:
        for i, email in enumerate(emails):
            conn.execute(
                text(
                    "UPDATE contacts SET created_at = now() - make_interval(mins => :i) "
                    "WHERE project_id = :p AND email = :e"
                ),
                {"i": i + 1, "p": project.id, "e": email},
            )
    seg = api.create_segment("Premium", PREMIUM.to_dict())

    first = api.page(seg["id"])
    assert (first["total"], first["page"], first["pageSize"], first["totalPages"]) == (25, 1, 20, 2)
    assert [c["email"] for c in first["data"]] == emails[:20]
    second = api.page(seg["id"], "?page=2")
    assert (second["page"], second["pageSize"], second["totalPages"]) == (2, 20, 2)
    assert [c["email"] for c in second["data"]] == emails[20:]
    beyond = api.page(seg["id"], "?page=3")
    assert beyond["data"] == [] and beyond["total"] == 25 and beyond["page"] == 3

    assert api.page(seg["id"], "?page=0")["data"] == first["data"]
    assert api.page(seg["id"], "?page=0")["page"] == 1
    small = api.page(seg["id"], "?page=3&pageSize=7")
    assert (small["page"], small["pageSize"], small["totalPages"]) == (3, 7, 4)
    assert [c["email"] for c in small["data"]] == emails[14:21]
    capped = api.page(seg["id"], "?pageSize=1000")
    assert capped["pageSize"] == 100 and capped["totalPages"] == 1 and len(capped["data"]) == 25
    assert api.page(seg["id"], "?pageSize=0")["pageSize"] == 20

    for query, field in (
        ("?page=-1", "page"),
        ("?pageSize=-5", "pageSize"),
        ("?pageSize=x", "pageSize"),
    ):
        resp = rest.get(f"/segments/{seg['id']}/contacts{query}", key=project.secret_key)
        check_error(resp, 400, "VALIDATION_ERROR", field)


def test_dynamic_listing_ties_are_ordered_by_id(api: Api) -> None:
    # One batch: one statement, so every contact has the same createdAt.
    api.batch([{"email": f"t{i}@x.com", "data": {"plan": "premium"}} for i in range(9)])
    seg = api.create_segment("Ties", PREMIUM.to_dict())
    full = api.page(seg["id"], "?pageSize=100")["data"]
    assert len({c["createdAt"] for c in full}) == 1
    ids = [uuid.UUID(c["id"]) for c in full]
    assert ids in (sorted(ids), sorted(ids, reverse=True))
    paged = [c for p in range(1, 6) for c in api.page(seg["id"], f"?page={p}&pageSize=2")["data"]]
    assert paged == full


def test_static_listing_is_newest_added_first(api: Api) -> None:
    seg = api.static_segment()
    api.add(seg["id"], ["a@x.com"])
    api.add(seg["id"], ["b@x.com"])
    api.add(seg["id"], ["c@x.com"])
    api.upsert("d@x.com")  # older contact added last
    api.add(seg["id"], ["d@x.com", "a@x.com"])  # a is already a member: keeps its place
    assert api.members(seg["id"]) == ["d@x.com", "c@x.com", "b@x.com", "a@x.com"]
    body = api.page(seg["id"], "?pageSize=3")
    assert [c["email"] for c in body["data"]] == ["d@x.com", "c@x.com", "b@x.com"]
    assert (body["total"], body["totalPages"]) == (4, 2)


# --- POST/DELETE /segments/{id}/members -----------------------------------------------


def test_add_members(api: Api, engine: Engine, project: Project) -> None:
    api.upsert("known@x.com", subscribed=False)
    seg = api.static_segment()
    result = api.add(seg["id"], ["known@x.com", " New@X.com ", "not-an-email", "new@x.com", ""])
    assert set(result) == {"added", "created", "notFound"}
    assert result["added"] == 2 and result["created"] == 1
    assert sorted(result["notFound"]) == sorted(["not-an-email", ""])
    members = {c["email"]: c for c in api.page(seg["id"])["data"]}
    assert set(members) == {"known@x.com", "new@x.com"}
    assert members["new@x.com"]["subscribed"] is True
    assert members["known@x.com"]["subscribed"] is False  # existing contacts are untouched
    assert api.segment(seg["id"])["memberCount"] == 2
    # Invalid strings are never stored.
    assert contact_count(engine, project) == 2

    again = api.add(seg["id"], ["known@x.com"])
    assert again == {"added": 0, "created": 0, "notFound": []}


def test_add_members_without_creating(api: Api, engine: Engine, project: Project) -> None:
    api.upsert("known@x.com")
    seg = api.static_segment()
    result = api.add(seg["id"], ["KNOWN@x.com", "ghost@x.com", "bad@"], createMissing=False)
    assert result["added"] == 1 and result["created"] == 0
    assert sorted(result["notFound"]) == ["bad@", "ghost@x.com"]
    assert contact_count(engine, project) == 1
    assert api.members(seg["id"]) == ["known@x.com"]


def test_add_members_subscribed_for_new_contacts(api: Api) -> None:
    api.upsert("old@x.com")
    seg = api.static_segment()
    assert api.add(seg["id"], ["old@x.com", "new@x.com"], subscribed=False)["created"] == 1
    got = {c["email"]: c["subscribed"] for c in api.page(seg["id"])["data"]}
    assert got == {"old@x.com": True, "new@x.com": False}


def test_remove_members(rest: Rest, api: Api, project: Project) -> None:
    seg = api.static_segment()
    api.add(seg["id"], ["a@x.com", "b@x.com", "c@x.com"])
    resp = rest.delete(
        f"/segments/{seg['id']}/members",
        {"emails": [" A@x.com", "b@x.com", "nobody@x.com", "junk"]},
        key=project.secret_key,
    )
    assert resp.status == 200
    assert resp.json == {"removed": 2}
    assert api.members(seg["id"]) == ["c@x.com"]
    again = rest.delete(
        f"/segments/{seg['id']}/members", {"emails": ["a@x.com"]}, key=project.secret_key
    )
    assert again.json == {"removed": 0}


def test_members_limit(rest: Rest, api: Api, project: Project, engine: Engine) -> None:
    seg = api.static_segment()
    too_many = [f"u{i}@x.com" for i in range(501)]
    for method in (rest.post, rest.delete):
        resp = method(
            f"/segments/{seg['id']}/members", {"emails": too_many}, key=project.secret_key
        )
        check_error(resp, 400, "VALIDATION_ERROR", "emails")
    assert contact_count(engine, project) == 0
    # Exactly 500 is allowed.
    result = api.add(seg["id"], too_many[:500], createMissing=False)
    assert result["added"] == 0 and len(result["notFound"]) == 500


def test_members_on_dynamic_segment(rest: Rest, api: Api, project: Project, engine: Engine) -> None:
    seg = api.create_segment("Dyn", PREMIUM.to_dict())
    for method in (rest.post, rest.delete):
        resp = method(
            f"/segments/{seg['id']}/members", {"emails": ["a@x.com"]}, key=project.secret_key
        )
        err = check_error(resp, 400, "FAILED_PRECONDITION")
        assert "STATIC" in err["message"] or "DYNAMIC" in err["message"]
    assert contact_count(engine, project) == 0


# --- POST/GET/DELETE /contacts --------------------------------------------------------


def test_contact_upsert(rest: Rest, project: Project) -> None:
    key = project.secret_key
    resp = rest.post(
        "/contacts", {"email": "  Ada@Example.COM ", "data": {"plan": "free", "age": 36}}, key=key
    )
    assert resp.status == 201
    created = check_contact(resp.json)
    assert created["email"] == "ada@example.com"
    assert created["subscribed"] is True
    assert created["data"] == {"plan": "free", "age": 36}
    assert isinstance(created["data"]["age"], int)

    resp = rest.post(
        "/contacts",
        {"email": "ada@example.com", "subscribed": False, "data": {"plan": "premium", "x": 1}},
        key=key,
    )
    assert resp.status == 200
    updated = check_contact(resp.json)
    assert updated["id"] == created["id"]
    assert updated["subscribed"] is False
    assert updated["data"] == {"plan": "premium", "age": 36, "x": 1}
    assert updated["createdAt"] == created["createdAt"]
    assert parse_time(updated["updatedAt"]) > parse_time(created["updatedAt"])

    # Omitted subscribed keeps the stored value; null removes a key.
    resp = rest.post("/contacts", {"email": "ADA@example.com", "data": {"age": None}}, key=key)
    assert resp.status == 200
    again = check_contact(resp.json)
    assert again["subscribed"] is False
    assert again["data"] == {"plan": "premium", "x": 1}

    # No data at all keeps the data.
    resp = rest.post("/contacts", {"email": "ada@example.com", "subscribed": True}, key=key)
    assert resp.status == 200
    assert resp.json["data"] == {"plan": "premium", "x": 1} and resp.json["subscribed"] is True

    fetched = rest.get(f"/contacts/{created['id']}", key=key)
    assert fetched.status == 200
    assert check_contact(fetched.json) == resp.json


def test_contact_data_round_trips(rest: Rest, project: Project) -> None:
    data = {
        "nested": {"a": {"b": [1, "two", True, None]}},
        "float": 2.5,
        "big": 12345678901,
        "neg": -3,
        "flag": False,
        "text": "ünïcödé ✓",
        "it's; DROP TABLE contacts; --": "keys are data",
        "a.b": "dotted key",
    }
    resp = rest.post("/contacts", {"email": "d@x.com", "data": data}, key=project.secret_key)
    assert resp.status == 201
    assert resp.json["data"] == data


def test_new_contact_subscribed_false(rest: Rest, project: Project) -> None:
    resp = rest.post("/contacts", {"email": "u@x.com", "subscribed": False}, key=project.secret_key)
    assert resp.status == 201 and resp.json["subscribed"] is False
    resp = rest.post("/contacts", {"email": "u@x.com", "data": {"k": 1}}, key=project.secret_key)
    assert resp.status == 200 and resp.json["subscribed"] is False


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "email"),
        ({"email": ""}, "email"),
        ({"email": "   "}, "email"),
        ({"email": "no-at-sign"}, "email"),
        ({"email": "two@@x.com"}, "email"),
        ({"email": "a b@x.com"}, "email"),
        ({"email": 5}, "email"),
        ({"email": "ok@x.com", "subscribed": 1}, "subscribed"),
        ({"email": "ok@x.com", "data": [1]}, None),
    ],
)
def test_contact_validation(
    rest: Rest, project: Project, engine: Engine, body: dict[str, Any], field: str | None
) -> None:
    check_error(
        rest.post("/contacts", body, key=project.secret_key), 400, "VALIDATION_ERROR", field
    )
    assert contact_count(engine, project) == 0


def test_string_for_boolean_is_a_400(rest: Rest, project: Project, engine: Engine) -> None:
    resp = rest.post("/contacts", {"email": "s@x.com", "subscribed": "no"}, key=project.secret_key)
    check_error(resp, 400, "VALIDATION_ERROR", "subscribed")
    assert contact_count(engine, project) == 0


@pytest.mark.parametrize(
    "raw",
    [
        b'{"email":"n@x.com","data":{"x":NaN}}',
        b'{"email":"n@x.com","data":{"x":1e999}}',
        b'{"email":"n@x.com","data":{"x":-Infinity}}',
    ],
)
def test_non_finite_numbers_are_a_400(
    rest: Rest, project: Project, engine: Engine, raw: bytes
) -> None:
    check_error(rest.post("/contacts", raw=raw, key=project.secret_key), 400, "VALIDATION_ERROR")
    assert contact_count(engine, project) == 0


def test_get_and_delete_contact(rest: Rest, api: Api, project: Project) -> None:
    key = project.secret_key
    contact = api.upsert("del@x.com", {"plan": "premium"})
    seg = api.create_segment("Premium", PREMIUM.to_dict())
    static = api.static_segment()
    api.add(static["id"], ["del@x.com"])
    api.events([{"email": "del@x.com", "event": "signup"}])

    resp = rest.get(f"/contacts/{contact['id']}", key=key)
    assert resp.status == 200
    assert check_contact(resp.json) == contact

    resp = rest.delete(f"/contacts/{contact['id']}", key=key)
    assert resp.status == 204 and resp.raw == b""
    check_error(rest.get(f"/contacts/{contact['id']}", key=key), 404, "NOT_FOUND")
    check_error(rest.delete(f"/contacts/{contact['id']}", key=key), 404, "NOT_FOUND")
    assert api.segment(seg["id"])["memberCount"] == 0
    assert api.members(static["id"]) == []
    # The email can be used again: a new contact.
    resp = rest.post("/contacts", {"email": "del@x.com"}, key=key)
    assert resp.status == 201 and resp.json["id"] != contact["id"]
    assert resp.json["data"] == {}


# --- POST /v1/track -------------------------------------------------------------------


def test_track(rest: Rest, api: Api, project: Project, engine: Engine) -> None:
    seg = api.create_segment("Signed up", F.event("signup").triggered().to_dict())
    resp = rest.post(
        "/v1/track",
        {"event": "signup", "email": " New@X.com", "data": {"plan": "trial"}},
        key=project.public_key,
    )
    assert resp.status == 200
    body = resp.json
    assert set(body) == {"success", "data"} and body["success"] is True
    assert set(body["data"]) == {"contact", "event", "timestamp"}
    parse_time(body["data"]["timestamp"])
    contact = rest.get(f"/contacts/{body['data']['contact']}", key=project.secret_key)
    assert contact.status == 200
    assert contact.json["email"] == "new@x.com"
    assert contact.json["subscribed"] is True
    assert contact.json["data"] == {"plan": "trial"}
    assert event_names(engine, project) == [("new@x.com", "signup")]
    assert api.members(seg["id"]) == ["new@x.com"]

    # An existing contact: same id, subscribed applied, data merged.
    resp = rest.post(
        "/v1/track",
        {"event": "login", "email": "new@x.com", "subscribed": False, "data": {"seen": 1}},
        key=project.public_key,
    )
    assert resp.status == 200
    assert resp.json["data"]["contact"] == body["data"]["contact"]
    contact = rest.get(f"/contacts/{body['data']['contact']}", key=project.secret_key)
    assert contact.json["subscribed"] is False
    assert contact.json["data"] == {"plan": "trial", "seen": 1}
    assert contact_count(engine, project) == 1


def test_track_needs_the_public_key(rest: Rest, project: Project, engine: Engine) -> None:
    body = {"event": "signup", "email": "a@x.com"}
    check_error(rest.post("/v1/track", body, key=project.secret_key), 401, "INVALID_API_KEY")
    check_error(rest.post("/v1/track", body), 401, "MISSING_AUTH")
    check_error(rest.post("/v1/track", body, key="pk_unknown"), 401, "INVALID_API_KEY")
    assert contact_count(engine, project) == 0


@pytest.mark.parametrize(
    "event",
    [
        "",
        "   ",
        "email.opened",
        "email.open",
        "email.sent",
        "segment.x.entry",
        "segment.vip-customers.exit",
        "segment..entry",  # the slug of a name without letters or digits is empty
        "segment..exit",
        "contact.subscribed",
        "contact.unsubscribed",
    ],
)
def test_track_refuses_reserved_and_empty_names(
    rest: Rest, project: Project, engine: Engine, event: str
) -> None:
    resp = rest.post("/v1/track", {"event": event, "email": "a@x.com"}, key=project.public_key)
    check_error(resp, 400, "VALIDATION_ERROR", "event")
    assert contact_count(engine, project) == 0


def test_track_validation(rest: Rest, project: Project, engine: Engine) -> None:
    for body, field in (
        ({"event": "signup"}, "email"),
        ({"event": "signup", "email": "nope"}, "email"),
        ({"email": "a@x.com"}, "event"),
    ):
        resp = rest.post("/v1/track", body, key=project.public_key)
        check_error(resp, 400, "VALIDATION_ERROR", field)
    assert contact_count(engine, project) == 0


# --- POST /contacts/batch -------------------------------------------------------------


def test_contacts_batch(rest: Rest, api: Api, project: Project) -> None:
    api.upsert("old@x.com", {"a": 1, "b": 2}, subscribed=False)
    seg = api.create_segment("Premium", PREMIUM.to_dict())
    resp = rest.post(
        "/contacts/batch",
        {
            "contacts": [
                {"email": "OLD@x.com ", "data": {"b": None, "plan": "premium"}},
                {"email": "new1@x.com", "data": {"plan": "premium"}},
                {"email": "new2@x.com", "subscribed": False},
            ]
        },
        key=project.secret_key,
    )
    assert resp.status == 200
    assert resp.json == {"created": 2, "updated": 1}
    listed = {c["email"]: c for c in api.page(seg["id"])["data"]}
    assert set(listed) == {"old@x.com", "new1@x.com"}
    assert listed["old@x.com"]["data"] == {"a": 1, "plan": "premium"}
    assert listed["old@x.com"]["subscribed"] is False
    assert listed["new1@x.com"]["subscribed"] is True


def test_contacts_batch_limit(rest: Rest, api: Api, project: Project, engine: Engine) -> None:
    many = [{"email": f"c{i}@x.com"} for i in range(1001)]
    resp = rest.post("/contacts/batch", {"contacts": many}, key=project.secret_key)
    check_error(resp, 400, "VALIDATION_ERROR", "contacts")
    assert contact_count(engine, project) == 0
    assert api.batch(many[:1000]) == {"created": 1000, "updated": 0}
    assert contact_count(engine, project) == 1000


def test_contacts_batch_is_all_or_nothing(
    rest: Rest, api: Api, project: Project, engine: Engine
) -> None:
    api.upsert("old@x.com", {"v": 1})
    resp = rest.post(
        "/contacts/batch",
        {
            "contacts": [
                {"email": "old@x.com", "data": {"v": 2}},
                {"email": "fine@x.com"},
                {"email": "broken"},
            ]
        },
        key=project.secret_key,
    )
    check_error(resp, 400, "VALIDATION_ERROR", "contacts.2.email")
    assert contact_count(engine, project) == 1
    assert api.upsert("old@x.com")["data"] == {"v": 1}


def test_contacts_batch_needs_the_secret_key(rest: Rest, project: Project) -> None:
    body = {"contacts": [{"email": "a@x.com"}]}
    check_error(rest.post("/contacts/batch", body, key=project.public_key), 401, "INVALID_API_KEY")


# --- POST /events/batch ---------------------------------------------------------------


def test_events_batch(rest: Rest, api: Api, project: Project, engine: Engine) -> None:
    api.upsert("known@x.com")
    opened = api.create_segment("Opened", F.email_activity("opened").triggered().to_dict())
    resp = rest.post(
        "/events/batch",
        {
            "events": [
                {"email": "known@x.com", "event": "purchase", "data": {"amount": 5}},
                {"email": " Unknown@X.com", "event": "email.open"},
                {
                    "email": "known@x.com",
                    "event": "email.delivered",
                    "occurredAt": "2024-01-02T03:04:05Z",
                },
            ]
        },
        key=project.secret_key,
    )
    assert resp.status == 200
    assert resp.json == {"accepted": 3}
    assert contact_count(engine, project) == 2
    assert sorted(event_names(engine, project)) == [
        ("known@x.com", "email.delivered"),
        ("known@x.com", "purchase"),
        ("unknown@x.com", "email.open"),
    ]
    with engine.connect() as conn:
        occurred = conn.execute(
            text(
                "SELECT occurred_at FROM events WHERE project_id = :p AND name = 'email.delivered'"
            ),
            {"p": project.id},
        ).scalar_one()
    assert occurred.isoformat() == "2024-01-02T03:04:05+00:00"
    assert api.members(opened["id"]) == ["unknown@x.com"]


def test_events_batch_limit(rest: Rest, api: Api, project: Project, engine: Engine) -> None:
    many = [{"email": f"e{i % 10}@x.com", "event": "view"} for i in range(1001)]
    resp = rest.post("/events/batch", {"events": many}, key=project.secret_key)
    check_error(resp, 400, "VALIDATION_ERROR", "events")
    assert contact_count(engine, project) == 0
    api.events(many[:1000])
    assert contact_count(engine, project) == 10
    assert len(event_names(engine, project)) == 1000


@pytest.mark.parametrize(
    ("bad", "field"),
    [
        ({"email": "x@x.com", "event": ""}, "events.1.event"),
        ({"email": "not an email", "event": "view"}, "events.1.email"),
        ({"email": "x@x.com", "event": "view", "occurredAt": "yesterday"}, "events.1.occurredAt"),
    ],
)
def test_events_batch_is_all_or_nothing(
    rest: Rest, project: Project, engine: Engine, bad: dict[str, Any], field: str
) -> None:
    events = [{"email": "a@x.com", "event": "view"}, bad, {"email": "b@x.com", "event": "view"}]
    resp = rest.post("/events/batch", {"events": events}, key=project.secret_key)
    check_error(resp, 400, "VALIDATION_ERROR", field)
    assert contact_count(engine, project) == 0
    assert event_names(engine, project) == []


def test_events_batch_needs_the_secret_key(rest: Rest, project: Project) -> None:
    body = {"events": [{"email": "a@x.com", "event": "view"}]}
    check_error(rest.post("/events/batch", body, key=project.public_key), 401, "INVALID_API_KEY")
    check_error(rest.post("/events/batch", body), 401, "MISSING_AUTH")


NUL = "\u0000"


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/segments", {"name": f"a{NUL}b", "type": "STATIC"}, "name"),
        ("/segments", {"name": "ok", "description": NUL, "type": "STATIC"}, "description"),
        ("/segments", {"name": "ok", "condition": cond(flt("email", "contains", NUL))}, None),
        ("/segments", {"name": "ok", "condition": cond(flt("data.k", "equals", NUL))}, None),
        ("/segments", {"name": "ok", "condition": cond(flt(f"data.k{NUL}", "exists"))}, None),
        ("/contacts", {"email": "a@x.com", "data": {"k": f"a{NUL}"}}, "data.k"),
        ("/contacts", {"email": "a@x.com", "data": {"k": {"n": [NUL]}}}, "data.k.n.0"),
        ("/contacts", {"email": "a@x.com", "data": {f"k{NUL}": 1}}, None),
        ("/contacts", {"email": f"a{NUL}@x.com"}, "email"),
        (
            "/contacts/batch",
            {"contacts": [{"email": "a@x.com", "data": {"k": NUL}}]},
            "contacts.0.data.k",
        ),
        ("/events/batch", {"events": [{"email": "a@x.com", "event": f"e{NUL}"}]}, "events.0.event"),
        (
            "/events/batch",
            {"events": [{"email": "a@x.com", "event": "e", "data": {"x": NUL}}]},
            "events.0.data.x",
        ),
    ],
)
def test_nul_characters_are_a_400(
    rest: Rest, project: Project, engine: Engine, path: str, body: dict[str, Any], field: str | None
) -> None:
    """PostgreSQL cannot store U+0000 in text or jsonb: a 400 naming the value, not a 500."""
    check_error(rest.post(path, body, key=project.secret_key), 400, "VALIDATION_ERROR", field)
    assert contact_count(engine, project) == 0
    assert rest.get("/segments", key=project.secret_key).json == []


def test_nul_characters_in_track_are_a_400(rest: Rest, project: Project, engine: Engine) -> None:
    for body, field in (
        ({"email": "a@x.com", "event": f"e{NUL}"}, "event"),
        ({"email": "a@x.com", "event": "e", "data": {"x": NUL}}, "data.x"),
    ):
        resp = rest.post("/v1/track", body, key=project.public_key)
        check_error(resp, 400, "VALIDATION_ERROR", field)
    assert contact_count(engine, project) == 0


# --- authentication -------------------------------------------------------------------

Endpoint = tuple[str, str, Any]


def secret_endpoints(segment_id: str, contact_id: str) -> list[Endpoint]:
    """Every secret-key REST operation, with a plausible body."""
    return [
        ("GET", "/segments", None),
        ("POST", "/segments", {"name": "x", "type": "STATIC"}),
        ("GET", f"/segments/{segment_id}", None),
        ("PATCH", f"/segments/{segment_id}", {"name": "hijacked"}),
        ("DELETE", f"/segments/{segment_id}", None),
        ("GET", f"/segments/{segment_id}/contacts", None),
        ("POST", f"/segments/{segment_id}/members", {"emails": ["intruder@x.com"]}),
        ("DELETE", f"/segments/{segment_id}/members", {"emails": ["member@x.com"]}),
        ("POST", "/contacts", {"email": "intruder@x.com"}),
        ("GET", f"/contacts/{contact_id}", None),
        ("DELETE", f"/contacts/{contact_id}", None),
        ("POST", "/contacts/batch", {"contacts": [{"email": "intruder@x.com"}]}),
        ("POST", "/events/batch", {"events": [{"email": "intruder@x.com", "event": "x"}]}),
    ]


@pytest.fixture
def fixture_ids(api: Api) -> tuple[str, str]:
    """A STATIC segment with one member, and that member's contact id."""
    seg = api.static_segment("Guarded")
    api.add(seg["id"], ["member@x.com"])
    contact = api.upsert("member@x.com")
    return seg["id"], contact["id"]


def assert_untouched(api: Api, segment_id: str, contact_id: str) -> None:
    seg = api.segment(segment_id)
    assert seg["name"] == "Guarded"
    assert api.members(segment_id) == ["member@x.com"]
    resp = api.rest.get(f"/contacts/{contact_id}", key=api.key)
    assert resp.status == 200
    assert [s["id"] for s in api.rest.get("/segments", key=api.key).json] == [segment_id]


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        ({}, "MISSING_AUTH"),
        ({"Authorization": ""}, "MISSING_AUTH"),
        ({"Authorization": "Bearer"}, "MISSING_AUTH"),
        ({"Authorization": "Basic dXNlcjpwYXNz"}, "MISSING_AUTH"),
        ({"Authorization": "Bearer a b"}, "MISSING_AUTH"),
        ({"Authorization": "sk_nobearer"}, "MISSING_AUTH"),
        ({"Authorization": "Bearer sk_unknown_key_000000000000000000000"}, "INVALID_API_KEY"),
        ({"Authorization": "Bearer nonsense"}, "INVALID_API_KEY"),
    ],
)
def test_auth_failures_on_every_endpoint(
    rest: Rest,
    api: Api,
    fixture_ids: tuple[str, str],
    headers: dict[str, str],
    code: str,
) -> None:
    segment_id, contact_id = fixture_ids
    endpoints = [
        *secret_endpoints(segment_id, contact_id),
        ("POST", "/v1/track", {"event": "x", "email": "intruder@x.com"}),
    ]
    for method, path, body in endpoints:
        resp = rest.request(method, path, body, headers=headers)
        err = check_error(resp, 401, code)
        assert err["code"] in ("MISSING_AUTH", "INVALID_API_KEY"), (method, path)
    assert_untouched(api, segment_id, contact_id)


def test_public_key_on_secret_endpoints(
    rest: Rest, api: Api, project: Project, fixture_ids: tuple[str, str]
) -> None:
    segment_id, contact_id = fixture_ids
    for method, path, body in secret_endpoints(segment_id, contact_id):
        resp = rest.request(method, path, body, key=project.public_key)
        check_error(resp, 401, "INVALID_API_KEY")
    assert_untouched(api, segment_id, contact_id)


def test_other_projects_key_is_not_enough(
    rest: Rest,
    api: Api,
    other_project: Project,
    engine: Engine,
    fixture_ids: tuple[str, str],
) -> None:
    """Cross-project: every endpoint taking an id answers 404 for another project's ids."""
    segment_id, contact_id = fixture_ids
    for method, path, body in secret_endpoints(segment_id, contact_id):
        if segment_id not in path and contact_id not in path:
            continue
        resp = rest.request(method, path, body, key=other_project.secret_key)
        check_error(resp, 404, "NOT_FOUND")
    assert_untouched(api, segment_id, contact_id)
    # Nor is anything of this project visible in the other's listing, and the failed
    # calls created nothing on either side.
    assert rest.get("/segments", key=other_project.secret_key).json == []
    assert contact_count(engine, other_project) == 0


def test_cross_project_dynamic_segment(
    rest: Rest, api: Api, other: Api, other_project: Project
) -> None:
    seg = api.create_segment("Premium", PREMIUM.to_dict())
    api.upsert("p@x.com", {"plan": "premium"})
    # The other project's identical email is another contact, never this segment's member.
    theirs = other.upsert("p@x.com", {"plan": "premium"})
    assert theirs["id"] != api.upsert("p@x.com")["id"]
    key = other_project.secret_key
    check_error(rest.get(f"/segments/{seg['id']}/contacts", key=key), 404, "NOT_FOUND")
    check_error(
        rest.patch(
            f"/segments/{seg['id']}", {"condition": F.email.contains("@").to_dict()}, key=key
        ),
        404,
        "NOT_FOUND",
    )
    assert api.members(seg["id"]) == ["p@x.com"]
    assert api.segment(seg["id"])["condition"] == PREMIUM.to_dict()


@pytest.mark.parametrize(
    "bad_id", ["not-a-uuid", "123", "00000000-0000-0000-0000-000000000000", str(uuid.uuid4())]
)
def test_unknown_and_non_uuid_ids_are_404(rest: Rest, project: Project, bad_id: str) -> None:
    for method, path, body in secret_endpoints(bad_id, bad_id):
        if bad_id not in path:
            continue
        resp = rest.request(method, path, body, key=project.secret_key)
        check_error(resp, 404, "NOT_FOUND")


# --- transport-level errors -----------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/nope"),
        ("GET", "/segments/a/b/c"),
        ("POST", "/v2/track"),
        ("PUT", "/nope"),
        ("GET", "/contacts/a/b"),
    ],
)
def test_unknown_path_is_a_404_envelope(
    rest: Rest, project: Project, method: str, path: str
) -> None:
    resp = rest.request(
        method, path, {} if method in ("POST", "PUT") else None, key=project.secret_key
    )
    check_error(resp, 404, "NOT_FOUND")


def test_unknown_query_parameter(rest: Rest, api: Api, project: Project) -> None:
    seg = api.static_segment()
    for path, param in (
        ("/segments?limit=5", "limit"),
        (f"/segments/{seg['id']}?expand=members", "expand"),
        (f"/segments/{seg['id']}/contacts?page=1&sort=email", "sort"),
    ):
        resp = rest.get(path, key=project.secret_key)
        err = check_error(resp, 400, "VALIDATION_ERROR", param)
        assert param in err["message"]


@pytest.mark.parametrize(
    "raw",
    [b"{bad", b'{"name": "x",}', b"", b"[1, 2]", b'"just a string"', b'{"name": "x"} trailing'],
)
def test_malformed_json(rest: Rest, project: Project, raw: bytes) -> None:
    resp = rest.post("/segments", raw=raw, key=project.secret_key)
    if raw == b"":
        # An empty body is an empty request: it fails validation, never crashes.
        check_error(resp, 400, "VALIDATION_ERROR", "name")
    else:
        check_error(resp, 400, "VALIDATION_ERROR")
    assert rest.get("/segments", key=project.secret_key).json == []


def test_wrong_json_types_name_the_field(rest: Rest, api: Api, project: Project) -> None:
    seg = api.static_segment()
    cases: list[tuple[Callable[[], Any], str]] = [
        (lambda: rest.post("/contacts", {"email": ["a@x.com"]}, key=project.secret_key), ""),
        (
            lambda: rest.post(
                f"/segments/{seg['id']}/members", {"emails": [1]}, key=project.secret_key
            ),
            "emails.0",
        ),
        (
            lambda: rest.post(
                "/events/batch",
                {"events": [{"email": "a@x.com", "event": 7}]},
                key=project.secret_key,
            ),
            "events.0.event",
        ),
    ]
    for call, field in cases:
        resp = call()
        check_error(resp, 400, "VALIDATION_ERROR", field or None)


def test_body_over_one_mebibyte(rest: Rest, project: Project, engine: Engine) -> None:
    filler = "x" * 900
    contacts = [{"email": f"big{i}@x.com", "data": {"f": filler}} for i in range(1200)]
    raw = json.dumps({"contacts": contacts}).encode()
    assert len(raw) > 1 << 20
    resp = rest.post("/contacts/batch", raw=raw, key=project.secret_key)
    check_error(resp, 413, "PAYLOAD_TOO_LARGE")
    assert contact_count(engine, project) == 0
    # Just under the limit is fine (and then fails only on the batch's own limit rules).
    ok = json.dumps({"contacts": contacts[:1000]}).encode()
    assert len(ok) < 1 << 20
    resp = rest.post("/contacts/batch", raw=ok, key=project.secret_key)
    assert resp.status == 200, resp.raw[:300]
    assert resp.json == {"created": 1000, "updated": 0}


def test_body_id_cannot_override_the_path(rest: Rest, api: Api, project: Project) -> None:
    target = api.static_segment("Target")
    victim = api.static_segment("Victim")
    key = project.secret_key
    resp = rest.patch(f"/segments/{target['id']}", {"id": victim["id"], "name": "Changed"}, key=key)
    if resp.status == 200:
        assert resp.json["id"] == target["id"]
        assert api.segment(target["id"])["name"] == "Changed"
    else:
        check_error(resp, 400, "VALIDATION_ERROR", "id")
        assert api.segment(target["id"])["name"] == "Target"
    assert api.segment(victim["id"])["name"] == "Victim"

    resp = rest.post(
        f"/segments/{target['id']}/members", {"id": victim["id"], "emails": ["a@x.com"]}, key=key
    )
    assert resp.status in (200, 400), resp.raw
    assert api.members(victim["id"]) == []


def test_concurrent_upserts_of_one_email_make_one_contact(
    rest: Rest, project: Project, engine: Engine
) -> None:
    def upsert(i: int) -> Any:
        return rest.post(
            "/contacts", {"email": " Same@X.com", "data": {f"k{i}": i}}, key=project.secret_key
        )

    with ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(upsert, range(12)))
    assert sorted(r.status for r in responses) == [200] * 11 + [201]
    assert len({r.json["id"] for r in responses}) == 1
    assert contact_count(engine, project) == 1
    final = rest.get(f"/contacts/{responses[0].json['id']}", key=project.secret_key).json
    assert final["data"] == {f"k{i}": i for i in range(12)}


# --- freshness ------------------------------------------------------------------------


def test_counts_and_listings_reflect_the_previous_write(
    rest: Rest, api: Api, project: Project
) -> None:
    key = project.secret_key
    premium = api.create_segment("Premium", PREMIUM.to_dict())
    buyers = api.create_segment("Buyers", F.event("purchase").triggered().to_dict())
    static = api.static_segment()
    both = api.create_segment(
        "Premium listed",
        (F.segment(premium["id"]).member() & F.segment(static["id"]).member()).to_dict(),
    )
    a = api.upsert("a@x.com", {"plan": "premium"})
    assert api.segment(premium["id"])["memberCount"] == 1
    assert [c["email"] for c in api.page(premium["id"])["data"]] == ["a@x.com"]

    rest.post(
        "/contacts/batch",
        {"contacts": [{"email": "b@x.com", "data": {"plan": "premium"}}]},
        key=key,
    )
    assert api.segment(premium["id"])["memberCount"] == 2
    assert api.segment(both["id"])["memberCount"] == 0

    api.add(static["id"], ["a@x.com"])
    assert api.segment(static["id"])["memberCount"] == 1
    assert api.members(both["id"]) == ["a@x.com"]

    api.upsert("a@x.com", {"plan": "free"})
    assert api.members(premium["id"]) == ["b@x.com"]
    assert api.segment(both["id"])["memberCount"] == 0

    rest.post("/v1/track", {"event": "purchase", "email": "c@x.com"}, key=project.public_key)
    assert api.members(buyers["id"]) == ["c@x.com"]
    api.events([{"email": "b@x.com", "event": "purchase"}])
    assert api.segment(buyers["id"])["memberCount"] == 2

    api.upsert("a@x.com", {"plan": "premium"})
    assert api.segment(both["id"])["memberCount"] == 1
    rest.delete(f"/segments/{static['id']}/members", {"emails": ["a@x.com"]}, key=key)
    assert api.segment(both["id"])["memberCount"] == 0

    assert rest.delete(f"/contacts/{a['id']}", key=key).status == 204
    assert api.members(premium["id"]) == ["b@x.com"]
    # The list of segments carries the same current counts.
    counts = {s["name"]: s["memberCount"] for s in rest.get("/segments", key=key).json}
    assert counts == {"Premium": 1, "Buyers": 2, "List": 0, "Premium listed": 0}


def test_list_segments_with_trailing_slash(rest: Rest, api: Api, project: Project) -> None:
    seg = api.static_segment()
    resp = rest.get("/segments/", key=project.secret_key)
    if resp.status == 404:
        check_error(resp, 404, "NOT_FOUND")
    else:
        assert resp.status == 200
        assert resp.json == [seg]


def test_revoked_key_is_refused(rest: Rest, sessions: sessionmaker[Session]) -> None:
    fresh = new_project(sessions, "revoked")
    assert rest.get("/segments", key=fresh.secret_key).status == 200
    with sessions.begin() as session:
        revoke_key(session, fresh.secret_key)
    check_error(rest.get("/segments", key=fresh.secret_key), 401, "INVALID_API_KEY")


def test_request_id_is_echoed(rest: Rest, project: Project) -> None:
    resp = rest.get(
        "/segments/not-a-uuid", key=project.secret_key, headers={"X-Request-Id": "trace-123"}
    )
    err = check_error(resp, 404, "NOT_FOUND")
    assert err["requestId"] == "trace-123"
    assert error_fields(resp) == []
