"""event_stats: each contact's latest event per name, kept exact by the triggers on events
(migration 0006) whatever writes or removes events, and what event filters read."""

from __future__ import annotations

import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

from google.protobuf import timestamp_pb2
from sqlalchemy import Connection, Engine, text

from segments.v1 import contacts_pb2, events_pb2
from tests.conftest import Project, Stubs
from tests.test_membership import cond, create, member_count, upsert

RECOMPUTED = """
    SELECT name, contact_id, max(occurred_at) AS last_at FROM events
    WHERE project_id = :p GROUP BY name, contact_id ORDER BY name, contact_id
"""
STORED = """
    SELECT name, contact_id, last_at FROM event_stats
    WHERE project_id = :p ORDER BY name, contact_id
"""


def stats(conn: Connection, project_id: Any) -> list[tuple[str, uuid.UUID, datetime]]:
    return [tuple(r) for r in conn.execute(text(STORED), {"p": project_id})]


def recomputed(conn: Connection, project_id: Any) -> list[tuple[str, uuid.UUID, datetime]]:
    return [tuple(r) for r in conn.execute(text(RECOMPUTED), {"p": project_id})]


def assert_exact(engine: Engine, project: Project) -> list[tuple[str, uuid.UUID, datetime]]:
    with engine.connect() as conn:
        stored = stats(conn, project.id)
        assert stored == recomputed(conn, project.id)
    return stored


def at(days_ago: float) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(datetime.now(UTC) - timedelta(days=days_ago))
    return ts


def ingest_at(stubs: Stubs, project: Project, *rows: tuple[str, str, float]) -> None:
    stubs.events.IngestEvents(
        events_pb2.IngestEventsRequest(
            events=[
                events_pb2.IngestedEvent(email=email, event=name, occurred_at=at(days))
                for email, name, days in rows
            ]
        ),
        metadata=project.auth,
    )


def test_every_writer_keeps_the_latest_occurrence(
    stubs: Stubs, project: Project, engine: Engine
) -> None:
    create(stubs, project, "Buyers", cond({"field": "purchase", "operator": "triggered"}))
    # One batch with the same key twice, another with an older occurrence (it must not
    # move last_at back) and a newer one (it must).
    ingest_at(stubs, project, ("a@x.com", "purchase", 10), ("a@x.com", "purchase", 5))
    ingest_at(stubs, project, ("a@x.com", "purchase", 20), ("b@x.com", "login", 1))
    ingest_at(stubs, project, ("a@x.com", "purchase", 2))
    stubs.events.Track(
        events_pb2.TrackRequest(email="c@x.com", event="signup"), metadata=project.public_auth
    )
    stored = assert_exact(engine, project)
    names = sorted({name for name, _, _ in stored})
    # The entry event the tracked segment recorded is kept like any other.
    assert names == ["login", "purchase", "segment.buyers.entry", "signup"]
    purchase = [last for name, _, last in stored if name == "purchase"]
    assert len(purchase) == 1
    assert abs((datetime.now(UTC) - timedelta(days=2) - purchase[0]).total_seconds()) < 60


def test_removing_events_recomputes_and_deleting_a_contact_empties(
    stubs: Stubs, project: Project, engine: Engine
) -> None:
    ingest_at(stubs, project, ("a@x.com", "login", 30), ("a@x.com", "login", 3))
    ingest_at(stubs, project, ("a@x.com", "purchase", 4), ("b@x.com", "login", 1))
    a = upsert(stubs, project, "a@x.com").id
    with engine.begin() as conn:
        # a's latest login goes: the earlier one is the latest again.
        conn.execute(
            text(
                "DELETE FROM events WHERE id = (SELECT id FROM events WHERE project_id = :p "
                "AND contact_id = :c AND name = 'login' ORDER BY occurred_at DESC LIMIT 1)"
            ),
            {"p": project.id, "c": a},
        )
    stored = assert_exact(engine, project)
    logins = {str(c): last for name, c, last in stored if name == "login"}
    assert (datetime.now(UTC) - logins[a]).days == 30
    with engine.begin() as conn:
        # Moving occurrences in time (no writer does, but nothing may break the rule).
        conn.execute(
            text(
                "UPDATE events SET occurred_at = occurred_at - interval '100 days', "
                "name = 'old_purchase' WHERE project_id = :p AND name = 'purchase'"
            ),
            {"p": project.id},
        )
    stored = assert_exact(engine, project)
    assert "purchase" not in {name for name, _, _ in stored}
    stubs.contacts.DeleteContact(contacts_pb2.DeleteContactRequest(id=a), metadata=project.auth)
    stored = assert_exact(engine, project)
    assert {str(contact_id) for _, contact_id, _ in stored} == {
        upsert(stubs, project, "b@x.com").id
    }


def test_concurrent_batches_sharing_keys_finish_and_agree(
    stubs: Stubs, project: Project, engine: Engine
) -> None:
    # Four callers write the same (contact, name) keys in different orders at once: each
    # merges its rows in key order, so they wait for one another, never in a cycle.
    emails = [f"k{i}@x.com" for i in range(30)]
    names = ("login", "purchase", "page_view")
    barrier = threading.Barrier(4)

    def record(worker: int) -> None:
        rows = [(e, n, float(worker)) for e in emails for n in names]
        shift = worker * 13
        rows = rows[shift:] + rows[:shift]
        if worker % 2:
            rows.reverse()
        barrier.wait()
        for _ in range(3):
            ingest_at(stubs, project, *rows)

    with ThreadPoolExecutor(max_workers=4) as pool_:
        for future in [pool_.submit(record, w) for w in range(4)]:
            future.result()
    stored = assert_exact(engine, project)
    assert len(stored) == len(emails) * len(names)


def test_event_filters_read_the_latest_occurrence(stubs: Stubs, project: Project) -> None:
    ingest_at(stubs, project, ("old@x.com", "login", 200), ("old@x.com", "login", 120))
    ingest_at(stubs, project, ("back@x.com", "login", 200), ("back@x.com", "login", 1))
    upsert(stubs, project, "never@x.com")
    window = {"value": 90, "unit": "days"}
    expected = {
        "triggered": 2,
        "triggeredWithin": 1,  # back
        "triggeredOlderThan": 1,  # old: its latest login is 120 days ago
        "notTriggered": 1,  # never
        "notTriggeredWithin": 2,  # old and never
    }
    for operator, count in expected.items():
        f: dict[str, Any] = {"field": "login", "operator": operator}
        if "Within" in operator or "Older" in operator:
            f |= window
        seg = create(stubs, project, operator, cond(f), track=False)
        assert member_count(stubs, project, seg.id) == count, operator
