"""A tracked segment's feed and history (README.md, REST): GET /segments/{id}/events reads
its entries and exits oldest first, resumable from any cursor, and GET
/segments/{id}/history counts them per hour or day with the segment's size; over REST and
gRPC, scoped to the caller's project."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, text

from segments import SegmentsClient
from tests.conditions import cond, flt
from tests.conftest import Project, Rest
from tests.rest_helpers import Api, check_error, parse_time


@pytest.fixture
def api(rest: Rest, project: Project) -> Api:
    return Api(rest, project)


def feed(api: Api, segment_id: str, query: str = "") -> dict[str, Any]:
    resp = api.rest.get(f"/segments/{segment_id}/events{query}", key=api.key)
    assert resp.status == 200, resp.raw[:500]
    body = resp.json
    assert set(body) == {"data", "nextCursor"}, body
    for event in body["data"]:
        assert set(event) == {"cursor", "type", "contactId", "email", "occurredAt"}, event
        assert event["type"] in ("entry", "exit")
        parse_time(event["occurredAt"])
    return dict(body)


def churn(api: Api) -> dict[str, Any]:
    """A tracked segment of `pro` contacts, and five changes to it."""
    seg = api.create_segment("Pro", cond(flt("data.plan", "equals", "pro")), trackMembership=True)
    api.upsert("a@x.com", {"plan": "pro"})  # a enters
    api.upsert("b@x.com", {"plan": "pro"})  # b enters
    api.upsert("a@x.com", {"plan": "free"})  # a exits
    api.upsert("c@x.com", {"plan": "pro"})  # c enters
    api.upsert("a@x.com", {"plan": "pro"})  # a enters again
    return dict(seg)


def test_the_feed_is_oldest_first_and_resumable_from_any_cursor(api: Api) -> None:
    api.upsert("bystander@x.com", {"plan": "free"})
    seg = churn(api)
    other = api.create_segment(
        "Free", cond(flt("data.plan", "equals", "free")), trackMembership=True
    )
    whole = feed(api, seg["id"])
    assert [(e["email"], e["type"]) for e in whole["data"]] == [
        ("a@x.com", "entry"),
        ("b@x.com", "entry"),
        ("a@x.com", "exit"),
        ("c@x.com", "entry"),
        ("a@x.com", "entry"),
    ]
    assert whole["nextCursor"] == whole["data"][-1]["cursor"]
    # Another segment's events are its own.
    assert [e["email"] for e in feed(api, other["id"])["data"]] == ["bystander@x.com"]
    # Pages of two, each resumed from the previous one's nextCursor.
    seen: list[dict[str, Any]] = []
    cursor = ""
    while True:
        page = feed(api, seg["id"], f"?limit=2&after={cursor}")
        assert len(page["data"]) <= 2
        seen += page["data"]
        if not page["data"]:
            assert page["nextCursor"] == cursor  # poll again with it
            break
        cursor = page["nextCursor"]
    assert seen == whole["data"]
    # From any cursor: what follows it, nothing before.
    third = whole["data"][2]["cursor"]
    assert feed(api, seg["id"], f"?after={third}")["data"] == whole["data"][3:]
    # New changes appear after the last cursor.
    api.upsert("b@x.com", {"plan": "free"})
    later = feed(api, seg["id"], f"?after={whole['nextCursor']}")["data"]
    assert [(e["email"], e["type"]) for e in later] == [("b@x.com", "exit")]


def test_feed_errors(api: Api, rest: Rest, project: Project, other_project: Project) -> None:
    seg = churn(api)
    untracked = api.create_segment("Quiet", cond(flt("data.plan", "exists")))
    base = f"/segments/{seg['id']}/events"
    check_error(
        rest.get(f"/segments/{untracked['id']}/events", key=api.key), 400, "VALIDATION_ERROR", "id"
    )
    check_error(rest.get(f"{base}?after=xyz", key=api.key), 400, "VALIDATION_ERROR", "after")
    check_error(rest.get(f"{base}?limit=-1", key=api.key), 400, "VALIDATION_ERROR", "limit")
    check_error(rest.get(f"/segments/{uuid.uuid4()}/events", key=api.key), 404, "NOT_FOUND")
    check_error(rest.get(base, key=other_project.secret_key), 404, "NOT_FOUND")
    check_error(rest.get(base), 401, "MISSING_AUTH")
    big = feed(api, seg["id"], "?limit=5000")  # capped, not refused
    assert len(big["data"]) == 5


def history(api: Api, segment_id: str, query: str = "") -> list[dict[str, Any]]:
    resp = api.rest.get(f"/segments/{segment_id}/history{query}", key=api.key)
    assert resp.status == 200, resp.raw[:500]
    assert set(resp.json) == {"data"}, resp.json
    buckets = resp.json["data"]
    for b in buckets:
        assert set(b) == {"start", "entries", "exits", "size"}, b
    return list(buckets)


def backdate(engine: Engine, project: Project, email: str, delta: timedelta) -> None:
    """Move a contact's entry/exit events back in time (as if they happened earlier)."""
    with engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE events e SET occurred_at = e.occurred_at - :d FROM contacts c "
                "WHERE c.project_id = e.project_id AND c.id = e.contact_id "
                "AND e.project_id = :p AND c.email = :e AND e.feed_seq IS NOT NULL"
            ),
            {"d": delta, "p": project.id, "e": email},
        )


def test_history_counts_entries_exits_and_size_per_bucket(
    api: Api, engine: Engine, project: Project
) -> None:
    seg = churn(api)  # now: a in (entered, left, entered), b and c in
    backdate(engine, project, "b@x.com", timedelta(days=2))
    backdate(engine, project, "c@x.com", timedelta(days=1))
    days = history(api, seg["id"], "?interval=day")
    assert len(days) == 31  # thirty days before today, and today
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    assert parse_time(days[-1]["start"]) == today
    assert parse_time(days[0]["start"]) == today - timedelta(days=30)
    tail = [(b["entries"], b["exits"], b["size"]) for b in days[-3:]]
    assert tail == [(1, 0, 1), (1, 0, 2), (2, 1, 3)]
    assert all((b["entries"], b["exits"], b["size"]) == (0, 0, 0) for b in days[:-3])
    assert days[-1]["size"] == api.segment(seg["id"])["memberCount"]
    # Hours, in a range given: the bucket holding `from` to the one holding `to`.
    now = datetime.now(UTC)
    start = (now - timedelta(hours=50)).isoformat().replace("+00:00", "Z")
    end = (now - timedelta(hours=47)).isoformat().replace("+00:00", "Z")
    hours = history(api, seg["id"], f"?interval=hour&from={start}&to={end}")
    assert len(hours) == 4
    assert sum(b["entries"] for b in hours) == 1  # b@, two days ago
    assert hours[-1]["size"] == 1


def test_history_errors(api: Api, rest: Rest, other_project: Project) -> None:
    seg = churn(api)
    untracked = api.create_segment("Quiet", cond(flt("data.plan", "exists")))
    base = f"/segments/{seg['id']}/history"
    for query, field in (
        ("?interval=week", "interval"),
        ("?from=yesterday", "from"),
        ("?to=2024-13-01T00:00:00Z", "to"),
        ("?from=2024-02-01T00:00:00Z&to=2024-01-01T00:00:00Z", "from"),
        ("?interval=hour&from=2020-01-01T00:00:00Z&to=2024-01-01T00:00:00Z", "from"),
    ):
        check_error(rest.get(base + query, key=api.key), 400, "VALIDATION_ERROR", field)
    check_error(
        rest.get(f"/segments/{untracked['id']}/history", key=api.key), 400, "VALIDATION_ERROR", "id"
    )
    check_error(rest.get(base, key=other_project.secret_key), 404, "NOT_FOUND")


def test_feed_and_history_over_grpc(client: SegmentsClient) -> None:
    seg = client.create_segment(
        "Pro", condition=cond(flt("data.plan", "equals", "pro")), track_membership=True
    )
    for email in ("a@x.com", "b@x.com"):
        client.upsert_contact(email, data={"plan": "pro"})
    first = client.list_segment_events(seg.id, limit=1)
    assert [e.email for e in first.data] == ["a@x.com"]
    rest = client.list_segment_events(seg.id, after=first.next_cursor)
    assert [(e.email, e.type) for e in rest.data] == [("b@x.com", "entry")]
    buckets = client.segment_history(seg.id, interval="hour", start=datetime.now(UTC))
    assert [(b.entries, b.exits, b.size) for b in buckets] == [(2, 0, 2)]
