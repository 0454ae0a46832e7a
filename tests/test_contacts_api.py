"""Around the segments, over REST through Envoy: the project's contacts listing (cursor
pages, search, subscribed), PATCH of a contact, the segments a contact is in, and the
preview of a condition. Shapes, errors, project isolation and membership effects."""

from __future__ import annotations

import threading
import uuid
from typing import Any
from urllib.parse import quote

import pytest
from sqlalchemy import Engine, text

from segments import F
from tests.conditions import cond, flt
from tests.conftest import Project, Rest
from tests.rest_helpers import Api, check_contact, check_error, error_fields, parse_time

PREMIUM = F.data("plan") == "premium"
LISTING_KEYS = {"data", "cursor", "hasMore", "total"}


@pytest.fixture
def api(rest: Rest, project: Project) -> Api:
    return Api(rest, project)


@pytest.fixture
def other(rest: Rest, other_project: Project) -> Api:
    return Api(rest, other_project)


def listing(api: Api, query: str = "") -> dict[str, Any]:
    resp = api.rest.get(f"/contacts{query}", key=api.key)
    assert resp.status == 200, resp.raw[:500]
    body = resp.json
    assert set(body) == LISTING_KEYS, body
    assert isinstance(body["hasMore"], bool)
    assert isinstance(body["total"], int) and not isinstance(body["total"], bool)
    assert (body["cursor"] is None) == (not body["hasMore"]), body
    for contact in body["data"]:
        check_contact(contact)
    return dict(body)


def walk(api: Api, query: str = "", limit: int = 100) -> list[dict[str, Any]]:
    """Every contact the listing gives, page after page; checks the total of the first."""
    joiner = "&" if query else ""
    body = listing(api, f"?limit={limit}{joiner}{query}")
    total = body["total"]
    seen = list(body["data"])
    while body["hasMore"]:
        assert len(body["data"]) == limit
        body = listing(api, f"?limit={limit}&cursor={quote(body['cursor'])}{joiner}{query}")
        assert body["total"] == 0  # counted on the first page only
        seen += body["data"]
    assert total == len(seen)
    return seen


def newest_first(contacts: list[dict[str, Any]]) -> bool:
    keys = [(parse_time(c["createdAt"]), uuid.UUID(c["id"])) for c in contacts]
    return keys == sorted(keys, reverse=True)


def event_names(engine: Engine, project: Project) -> list[str]:
    with engine.connect() as conn:
        return list(
            conn.execute(
                text(
                    "SELECT name FROM events WHERE project_id = :p AND name LIKE 'segment.%' "
                    "ORDER BY feed_seq"
                ),
                {"p": project.id},
            ).scalars()
        )


# -- GET /contacts -------------------------------------------------------------------------


def test_an_empty_project_lists_nothing(api: Api) -> None:
    assert listing(api) == {"data": [], "cursor": None, "hasMore": False, "total": 0}


def test_contacts_are_listed_newest_first_with_the_total(api: Api) -> None:
    api.batch([{"email": f"u{i}@example.com"} for i in range(5)])
    api.upsert("last@example.com", {"plan": "pro"})
    body = listing(api)
    assert body["total"] == 6 and body["hasMore"] is False and body["cursor"] is None
    assert body["data"][0]["email"] == "last@example.com"
    assert body["data"][0]["data"] == {"plan": "pro"}
    assert newest_first(body["data"])
    assert {c["email"] for c in body["data"]} == {f"u{i}@example.com" for i in range(5)} | {
        "last@example.com"
    }


def test_pages_follow_the_cursor_to_the_end(api: Api) -> None:
    api.batch([{"email": f"p{i:02d}@example.com"} for i in range(25)])
    first = listing(api, "?limit=10")
    assert (len(first["data"]), first["hasMore"], first["total"]) == (10, True, 25)
    assert isinstance(first["cursor"], str) and first["cursor"]
    seen = walk(api, limit=10)
    assert len(seen) == len({c["id"] for c in seen}) == 25
    assert newest_first(seen)
    # Pages of another size give the same sequence.
    assert [c["id"] for c in walk(api, limit=7)] == [c["id"] for c in seen]


def test_contacts_inserted_while_paging_never_repeat_or_hide_others(api: Api) -> None:
    api.batch([{"email": f"old{i:03d}@example.com"} for i in range(120)])
    stop = threading.Event()
    written: list[str] = []

    def writer() -> None:
        n = 0
        while not stop.is_set() and n < 200:
            api.upsert(f"new{n:03d}@example.com")
            written.append(f"new{n:03d}@example.com")
            n += 1

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        body = listing(api, "?limit=7")
        seen = list(body["data"])
        while body["hasMore"]:
            body = listing(api, f"?limit=7&cursor={quote(body['cursor'])}")
            seen += body["data"]
    finally:
        stop.set()
        thread.join()
    ids = [c["id"] for c in seen]
    assert len(ids) == len(set(ids)), "a contact came twice"
    emails = {c["email"] for c in seen}
    assert {f"old{i:03d}@example.com" for i in range(120)} <= emails
    assert newest_first(seen)
    assert written, "the writer ran"


def test_search_is_a_case_insensitive_substring_of_the_email(api: Api) -> None:
    api.batch(
        [
            {"email": "ada.lovelace@engines.org"},
            {"email": "grace@navy.mil"},
            {"email": "ada_b@example.com"},
            {"email": "adab@example.com"},
            {"email": "100%real@example.com"},
        ]
    )
    assert {c["email"] for c in walk(api, "search=ADA")} == {
        "ada.lovelace@engines.org",
        "ada_b@example.com",
        "adab@example.com",
    }
    # No wildcards: `_` and `%` are themselves.
    assert [c["email"] for c in walk(api, "search=a_b")] == ["ada_b@example.com"]
    assert [c["email"] for c in walk(api, "search=" + quote("0%r"))] == ["100%real@example.com"]
    assert [c["email"] for c in walk(api, "search=" + quote(" NAVY.MIL "))] == ["grace@navy.mil"]
    assert walk(api, "search=nobody") == []
    # An empty search is no filter.
    assert len(walk(api, "search=")) == 5


def test_subscribed_filters_and_combines_with_search(api: Api) -> None:
    api.batch(
        [
            {"email": "in1@example.com"},
            {"email": "in2@other.org"},
            {"email": "out1@example.com", "subscribed": False},
            {"email": "out2@other.org", "subscribed": False},
        ]
    )
    assert {c["email"] for c in walk(api, "subscribed=true")} == {
        "in1@example.com",
        "in2@other.org",
    }
    unsubscribed = walk(api, "subscribed=false")
    assert {c["email"] for c in unsubscribed} == {"out1@example.com", "out2@other.org"}
    assert [c["email"] for c in walk(api, "subscribed=false&search=other")] == ["out2@other.org"]
    # Filters hold on every page (one batch: one createdAt, so the ids order them).
    assert walk(api, "subscribed=false", limit=1) == unsubscribed


def test_the_page_size_defaults_to_20_and_stops_at_100(api: Api) -> None:
    api.batch([{"email": f"s{i:03d}@example.com"} for i in range(105)])
    assert len(listing(api)["data"]) == 20
    assert len(listing(api, "?limit=0")["data"]) == 20
    assert len(listing(api, "?limit=1000")["data"]) == 100
    assert len(listing(api, "?limit=3")["data"]) == 3


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("?limit=-1", "limit"),
        ("?limit=abc", "limit"),
        ("?limit=1.5", "limit"),
        ("?subscribed=yes", "subscribed"),
        ("?cursor=not-a-cursor", "cursor"),
        ("?search=" + "a" * 255, "search"),
        ("?sort=email", "sort"),
    ],
)
def test_bad_listing_queries_are_400_naming_the_parameter(api: Api, query: str, field: str) -> None:
    check_error(api.rest.get(f"/contacts{query}", key=api.key), 400, "VALIDATION_ERROR", field)


def test_a_cursor_works_only_where_it_was_given(api: Api, other: Api) -> None:
    api.batch([{"email": f"c{i}@example.com"} for i in range(3)])
    other.batch([{"email": f"c{i}@example.com"} for i in range(3)])
    cursor = listing(api, "?limit=1")["cursor"]
    # Another project's key: refused, not a position in its own contacts.
    check_error(
        other.rest.get(f"/contacts?cursor={quote(cursor)}", key=other.key),
        400,
        "VALIDATION_ERROR",
        "cursor",
    )
    # Altered: refused.
    altered = cursor[:-2] + ("AA" if not cursor.endswith("AA") else "BB")
    check_error(
        api.rest.get(f"/contacts?cursor={quote(altered)}", key=api.key),
        400,
        "VALIDATION_ERROR",
        "cursor",
    )
    assert len(listing(api, f"?cursor={quote(cursor)}")["data"]) == 2


def test_listing_needs_a_secret_key(rest: Rest, project: Project) -> None:
    check_error(rest.get("/contacts"), 401, "MISSING_AUTH")
    check_error(rest.get("/contacts", key=project.public_key), 401, "INVALID_API_KEY")
    check_error(rest.get("/contacts", key="sk_nonsense"), 401, "INVALID_API_KEY")


def test_a_project_never_lists_another_projects_contacts(api: Api, other: Api) -> None:
    api.upsert("secret@a.com", {"plan": "premium"})
    other.upsert("mine@b.com")
    assert [c["email"] for c in walk(other)] == ["mine@b.com"]
    assert walk(other, "search=secret") == []
    assert walk(other, "subscribed=true") == [walk(other)[0]]


# -- PATCH /contacts/{id} ------------------------------------------------------------------


def patch(api: Api, contact_id: str, body: Any) -> Any:
    resp = api.rest.patch(f"/contacts/{contact_id}", body, key=api.key)
    assert resp.status == 200, resp.raw[:500]
    return check_contact(resp.json)


def test_patch_merges_data_and_keeps_what_is_not_sent(api: Api) -> None:
    ada = api.upsert("ada@example.com", {"plan": "free", "seats": 1, "team": {"a": 1}})
    changed = patch(api, ada["id"], {"data": {"plan": "pro", "seats": None, "new": [1, 2]}})
    assert changed["data"] == {"plan": "pro", "team": {"a": 1}, "new": [1, 2]}
    assert (changed["id"], changed["email"], changed["subscribed"]) == (
        ada["id"],
        "ada@example.com",
        True,
    )
    assert changed["createdAt"] == ada["createdAt"]
    assert parse_time(changed["updatedAt"]) > parse_time(ada["updatedAt"])
    off = patch(api, ada["id"], {"subscribed": False})
    assert (off["subscribed"], off["data"]) == (False, changed["data"])
    moved = patch(api, ada["id"], {"email": "  Ada.Lovelace@Example.COM "})
    assert moved["email"] == "ada.lovelace@example.com"
    assert (moved["subscribed"], moved["data"]) == (False, changed["data"])
    got = api.rest.get(f"/contacts/{ada['id']}", key=api.key).json
    assert got == moved
    # The old email is free again: an upsert of it creates another contact.
    assert api.upsert("ada@example.com")["id"] != ada["id"]


def test_an_empty_patch_changes_nothing(api: Api) -> None:
    ada = api.upsert("ada@example.com", {"plan": "free"})
    assert patch(api, ada["id"], {}) == ada
    assert patch(api, ada["id"], {"data": {}}) == ada


def test_patch_to_a_taken_email_is_409(api: Api, engine: Engine) -> None:
    ada = api.upsert("ada@example.com")
    api.upsert("grace@example.com")
    err = check_error(
        api.rest.patch(f"/contacts/{ada['id']}", {"email": "GRACE@example.com"}, key=api.key),
        409,
        "ALREADY_EXISTS",
    )
    assert "grace@example.com" in err["message"]
    # Nothing of the refused request was written.
    assert api.rest.get(f"/contacts/{ada['id']}", key=api.key).json == ada
    # Its own email is not taken.
    assert (
        patch(api, ada["id"], {"email": "Ada@example.com", "subscribed": True})["id"] == ada["id"]
    )


def test_patch_of_an_unknown_contact_is_404(api: Api, other: Api) -> None:
    theirs = other.upsert("theirs@example.com", {"plan": "x"})
    for contact_id in (str(uuid.uuid4()), "not-a-uuid", theirs["id"]):
        check_error(
            api.rest.patch(f"/contacts/{contact_id}", {"subscribed": False}, key=api.key),
            404,
            "NOT_FOUND",
        )
    assert other.rest.get(f"/contacts/{theirs['id']}", key=other.key).json == theirs


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"email": "not an email"}, "email"),
        ({"email": ""}, "email"),
        ({"subscribed": "yes"}, "subscribed"),
        ({"subscribe": False}, "subscribe"),
        ({"data": [1]}, "data"),
        ({"id": "00000000-0000-0000-0000-000000000000"}, "id"),
    ],
)
def test_bad_patches_are_400_naming_the_field(api: Api, body: Any, field: str) -> None:
    ada = api.upsert("ada@example.com")
    resp = api.rest.patch(f"/contacts/{ada['id']}", body, key=api.key)
    check_error(resp, 400, "VALIDATION_ERROR")
    assert field in error_fields(resp), resp.json


def test_patch_needs_a_secret_key(api: Api, project: Project) -> None:
    ada = api.upsert("ada@example.com")
    check_error(
        api.rest.patch(f"/contacts/{ada['id']}", {"subscribed": False}), 401, "MISSING_AUTH"
    )
    check_error(
        api.rest.patch(f"/contacts/{ada['id']}", {"subscribed": False}, key=project.public_key),
        401,
        "INVALID_API_KEY",
    )


def test_patch_moves_memberships_and_records_entries_and_exits(
    api: Api, project: Project, engine: Engine
) -> None:
    premium = api.create_segment("Premium", PREMIUM.to_dict(), trackMembership=True)
    at_acme = api.create_segment("Acme", F.email.contains("@acme.com").to_dict())
    ada = api.upsert("ada@example.com", {"plan": "free"})
    assert api.segment(premium["id"])["memberCount"] == 0
    patch(api, ada["id"], {"data": {"plan": "premium"}})
    assert api.member_set(premium["id"]) == {"ada@example.com"}
    patch(api, ada["id"], {"email": "ada@acme.com"})
    assert api.member_set(at_acme["id"]) == {"ada@acme.com"}
    patch(api, ada["id"], {"data": {"plan": None}})
    assert api.member_set(premium["id"]) == set()
    assert event_names(engine, project) == ["segment.premium.entry", "segment.premium.exit"]


# -- GET /contacts/{id}/segments -----------------------------------------------------------


def contact_segments(api: Api, contact_id: str) -> list[dict[str, Any]]:
    resp = api.rest.get(f"/contacts/{contact_id}/segments", key=api.key)
    assert resp.status == 200, resp.raw[:500]
    body = resp.json
    assert isinstance(body, list), body
    for item in body:
        assert set(item) == {"id", "name", "type"}, item
    return list(body)


def test_a_contact_lists_its_static_and_dynamic_segments(api: Api) -> None:
    premium = api.create_segment("Premium", PREMIUM.to_dict())
    api.create_segment("Free", (F.data("plan") == "free").to_dict())
    vips = api.static_segment("VIPs")
    api.static_segment("Others")
    ada = api.upsert("ada@example.com", {"plan": "premium"})
    api.add(vips["id"], ["ada@example.com"])
    assert contact_segments(api, ada["id"]) == [
        {"id": vips["id"], "name": "VIPs", "type": "STATIC"},
        {"id": premium["id"], "name": "Premium", "type": "DYNAMIC"},
    ]
    lonely = api.upsert("lonely@example.com")
    assert contact_segments(api, lonely["id"]) == []


def test_the_segments_of_an_unknown_contact_are_404(api: Api, other: Api) -> None:
    theirs = other.upsert("theirs@example.com")
    for contact_id in (str(uuid.uuid4()), "nope", theirs["id"]):
        check_error(api.rest.get(f"/contacts/{contact_id}/segments", key=api.key), 404, "NOT_FOUND")
    check_error(api.rest.get(f"/contacts/{theirs['id']}/segments"), 401, "MISSING_AUTH")


def test_building_segments_are_answered_from_their_condition(
    api: Api, monkeypatch: pytest.MonkeyPatch, engine: Engine
) -> None:
    """A segment being built has no current membership stored: the contact is evaluated
    against its condition (the test server runs no builder, so it stays BUILDING)."""
    api.batch([{"email": f"c{i}@example.com", "data": {"plan": "free"}} for i in range(5)])
    ada = api.upsert("ada@example.com", {"plan": "premium"})
    was_free = api.create_segment("Was free", (F.data("plan") == "free").to_dict())
    monkeypatch.setenv("SEGMENTS_INLINE_BUILD_CONTACTS", "2")
    building = api.create_segment("Premium", PREMIUM.to_dict())
    assert building["status"] == "BUILDING"
    assert contact_segments(api, ada["id"]) == [
        {"id": building["id"], "name": "Premium", "type": "DYNAMIC"}
    ]
    # A new condition: stored rows are the previous condition's, and do not count.
    changed = api.patch_segment(was_free["id"], {"condition": PREMIUM.to_dict()})
    assert changed["status"] == "BUILDING"
    free = api.rest.get("/contacts?search=c0@", key=api.key).json["data"][0]
    assert contact_segments(api, free["id"]) == []
    assert {s["id"] for s in contact_segments(api, ada["id"])} == {
        building["id"],
        was_free["id"],
    }
    # Writes to a building segment's contacts are answered at once.
    patch(api, ada["id"], {"data": {"plan": "free"}})
    assert contact_segments(api, ada["id"]) == []
    # A first build that failed has nothing stored either.
    with engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE segments SET status = 'FAILED', status_reason = 'test', "
                "membership_state = 'none' WHERE project_id = :p AND id = :s"
            ),
            {"p": api.project.id, "s": building["id"]},
        )
    patch(api, ada["id"], {"data": {"plan": "premium"}})
    assert building["id"] in {s["id"] for s in contact_segments(api, ada["id"])}


# -- POST /segments/preview ----------------------------------------------------------------


def preview(api: Api, condition: Any) -> dict[str, Any]:
    resp = api.rest.post("/segments/preview", {"condition": condition}, key=api.key)
    assert resp.status == 200, resp.raw[:500]
    body = resp.json
    assert set(body) == {"memberCount", "sample"}, body
    for contact in body["sample"]:
        check_contact(contact)
    return dict(body)


def test_preview_counts_and_samples_members(api: Api, engine: Engine) -> None:
    api.batch(
        [{"email": f"m{i:02d}@example.com", "data": {"plan": "premium"}} for i in range(12)]
        + [{"email": f"f{i}@example.com", "data": {"plan": "free"}} for i in range(3)]
    )
    newest = api.upsert("newest@example.com", {"plan": "premium"})
    with engine.connect() as conn:
        before = conn.execute(text("SELECT count(*) FROM segments")).scalar_one()
    body = preview(api, PREMIUM.to_dict())
    assert body["memberCount"] == 13
    assert len(body["sample"]) == 10
    assert newest_first(body["sample"])
    assert all(c["data"] == {"plan": "premium"} for c in body["sample"])
    everyone = {c["id"]: c for c in walk(api) if c["data"]["plan"] == "premium"}
    assert newest["id"] in everyone
    # Ten distinct members, each as the contact reads.
    assert len({c["id"] for c in body["sample"]}) == 10
    assert all(everyone[c["id"]] == c for c in body["sample"])
    assert preview(api, (F.data("plan") == "free").to_dict())["memberCount"] == 3
    assert preview(api, (F.data("plan") == "none").to_dict()) == {"memberCount": 0, "sample": []}
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM segments")).scalar_one() == before


def test_preview_validates_as_create_does(api: Api, other: Api) -> None:
    resp = api.rest.post(
        "/segments/preview",
        {"condition": cond(flt("data.plan", "equals", "x"), flt("email", "sometimes", "x"))},
        key=api.key,
    )
    check_error(resp, 400, "VALIDATION_ERROR", "condition.groups.0.filters.1.operator")
    check_error(
        api.rest.post("/segments/preview", {}, key=api.key), 400, "VALIDATION_ERROR", "condition"
    )
    check_error(
        api.rest.post("/segments/preview", {"condition": cond(), "name": "x"}, key=api.key),
        400,
        "VALIDATION_ERROR",
        "name",
    )
    theirs = other.static_segment("Theirs")
    check_error(
        api.rest.post(
            "/segments/preview",
            {"condition": F.segment(theirs["id"]).member().to_dict()},
            key=api.key,
        ),
        400,
        "VALIDATION_ERROR",
        "condition.groups.0.filters.0.field",
    )
    check_error(api.rest.post("/segments/preview", {"condition": cond()}), 401, "MISSING_AUTH")


def test_preview_sees_only_the_projects_contacts(api: Api, other: Api) -> None:
    api.upsert("a@example.com", {"plan": "premium"})
    other.upsert("b@example.com", {"plan": "premium"})
    body = preview(other, PREMIUM.to_dict())
    assert body["memberCount"] == 1
    assert [c["email"] for c in body["sample"]] == ["b@example.com"]
