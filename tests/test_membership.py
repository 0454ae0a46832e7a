"""Membership tracking (README.md, Membership): entry/exit events, exactly once, prompt, resumable feed."""

from __future__ import annotations

import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2, timestamp_pb2
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session, sessionmaker

from segments import Expression, F
from segments_api.v1 import contacts_pb2, events_pb2, resources_pb2, segments_pb2
from segments_service import events, membership, sweeper
from segments_service.database import make_engine, make_sessionmaker
from segments_service.membership import slugify
from tests.conditions import as_proto, loaded_segment
from tests.conftest import Project, Stubs


def upsert(stubs: Stubs, project: Project, email: str, **data: Any) -> resources_pb2.Contact:
    struct = struct_pb2.Struct()
    struct.update(data)
    return stubs.contacts.UpsertContact(
        contacts_pb2.UpsertContactRequest(email=email, data=struct), metadata=project.auth
    )


def create(
    stubs: Stubs, project: Project, name: str, condition: Expression, track: bool = True
) -> resources_pb2.Segment:
    return stubs.segments.CreateSegment(
        segments_pb2.CreateSegmentRequest(
            name=name, condition=as_proto(condition), track_membership=track
        ),
        metadata=project.auth,
    )


def segment_events(engine: Engine, project: Project) -> list[tuple[str, str]]:
    """(event name, contact email) of every entry/exit event, in recording order."""
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT e.name, c.email FROM events e JOIN contacts c "
                "ON c.project_id = e.project_id AND c.id = e.contact_id "
                "WHERE e.project_id = :p AND e.name LIKE 'segment.%' ORDER BY e.feed_seq"
            ),
            {"p": project.id},
        )
        return [(r.name, r.email) for r in rows]


def member_count(stubs: Stubs, project: Project, segment_id: str) -> int:
    got = stubs.segments.GetSegment(
        segments_pb2.GetSegmentRequest(id=segment_id), metadata=project.auth
    )
    return int(got.member_count)


PREMIUM = F.data("plan") == "premium"


def test_entry_and_exit_follow_contact_upserts(
    stubs: Stubs, project: Project, engine: Engine
) -> None:
    create(stubs, project, "VIP Customers!", PREMIUM)
    upsert(stubs, project, "a@x.com", plan="premium")
    # Recorded in the upsert's own transaction: visible as soon as the call returns.
    assert segment_events(engine, project) == [("segment.vip-customers.entry", "a@x.com")]
    upsert(stubs, project, "a@x.com", plan="premium")  # still a member: nothing new
    upsert(stubs, project, "a@x.com", plan="free")
    assert segment_events(engine, project) == [
        ("segment.vip-customers.entry", "a@x.com"),
        ("segment.vip-customers.exit", "a@x.com"),
    ]


def test_entry_event_data_and_count(stubs: Stubs, project: Project, engine: Engine) -> None:
    seg = create(stubs, project, "Premium", PREMIUM)
    upsert(stubs, project, "a@x.com", plan="premium")
    with engine.connect() as conn:
        data = conn.execute(
            text("SELECT data FROM events WHERE project_id = :p AND name LIKE 'segment.%'"),
            {"p": project.id},
        ).scalar_one()
    assert data == {"segmentId": seg.id, "segmentName": "Premium"}
    assert member_count(stubs, project, seg.id) == 1


def test_ingested_event_enters_event_segment(
    stubs: Stubs, project: Project, engine: Engine
) -> None:
    create(
        stubs,
        project,
        "Buyers",
        F.event("purchase").triggered_within(30, "days"),
    )
    started = time.monotonic()
    stubs.events.IngestEvents(
        events_pb2.IngestEventsRequest(
            events=[events_pb2.IngestedEvent(email="b@x.com", event="purchase")]
        ),
        metadata=project.auth,
    )
    assert segment_events(engine, project) == [("segment.buyers.entry", "b@x.com")]
    assert time.monotonic() - started < 2.0


def test_time_window_exit_comes_with_the_sweep(
    stubs: Stubs,
    project: Project,
    engine: Engine,
    sessions: sessionmaker[Session],
) -> None:
    seg = create(
        stubs,
        project,
        "Active",
        F.event("login").triggered_within(1, "minutes"),
    )
    occurred = timestamp_pb2.Timestamp()
    occurred.FromDatetime(datetime.now(UTC) - timedelta(seconds=58))
    stubs.events.IngestEvents(
        events_pb2.IngestEventsRequest(
            events=[events_pb2.IngestedEvent(email="c@x.com", event="login", occurred_at=occurred)]
        ),
        metadata=project.auth,
    )
    assert segment_events(engine, project) == [("segment.active.entry", "c@x.com")]
    time.sleep(2.5)  # the login is now more than a minute old
    assert sweeper.sweep_once(engine, sessions) >= 1
    assert segment_events(engine, project)[-1] == ("segment.active.exit", "c@x.com")
    # Swept again, nothing moves: the exit is recorded once.
    assert sweeper.sweep_once(engine, sessions) == 0
    assert segment_events(engine, project) == [
        ("segment.active.entry", "c@x.com"),
        ("segment.active.exit", "c@x.com"),
    ]
    assert member_count(stubs, project, seg.id) == 0


def test_tracking_on_off_delete_and_rename(stubs: Stubs, project: Project, engine: Engine) -> None:
    upsert(stubs, project, "a@x.com", plan="premium")
    upsert(stubs, project, "b@x.com", plan="premium")
    seg = create(stubs, project, "Quiet", PREMIUM, track=False)
    assert seg.member_count == 2
    assert segment_events(engine, project) == []
    stubs.segments.UpdateSegment(
        segments_pb2.UpdateSegmentRequest(id=seg.id, track_membership=True), metadata=project.auth
    )
    assert sorted(segment_events(engine, project)) == [
        ("segment.quiet.entry", "a@x.com"),
        ("segment.quiet.entry", "b@x.com"),
    ]
    stubs.segments.UpdateSegment(
        segments_pb2.UpdateSegmentRequest(id=seg.id, name="Loud"), metadata=project.auth
    )
    upsert(stubs, project, "a@x.com", plan="free")
    assert segment_events(engine, project)[-1] == ("segment.loud.exit", "a@x.com")
    stubs.segments.UpdateSegment(
        segments_pb2.UpdateSegmentRequest(id=seg.id, track_membership=False), metadata=project.auth
    )
    upsert(stubs, project, "b@x.com", plan="free")
    stubs.segments.DeleteSegment(
        segments_pb2.DeleteSegmentRequest(id=seg.id), metadata=project.auth
    )
    assert len(segment_events(engine, project)) == 3  # no exits for off or deleted


def test_condition_change_records_the_difference(
    stubs: Stubs, project: Project, engine: Engine
) -> None:
    upsert(stubs, project, "a@x.com", plan="premium")
    upsert(stubs, project, "b@x.com", plan="free")
    seg = create(stubs, project, "Plan", PREMIUM)
    stubs.segments.UpdateSegment(
        segments_pb2.UpdateSegmentRequest(id=seg.id, condition=as_proto(F.data("plan") == "free")),
        metadata=project.auth,
    )
    assert sorted(segment_events(engine, project)) == [
        ("segment.plan.entry", "a@x.com"),
        ("segment.plan.entry", "b@x.com"),
        ("segment.plan.exit", "a@x.com"),
    ]


def test_a_new_condition_keeps_the_members_that_still_match(
    stubs: Stubs, project: Project, engine: Engine
) -> None:
    # A rebuild inserts only memberships it does not store yet: a@ stays without a new
    # entry, b@ leaves, c@ enters, and the count is the stored rows.
    upsert(stubs, project, "a@x.com", plan="premium", country="US")
    upsert(stubs, project, "b@x.com", plan="premium", country="DE")
    upsert(stubs, project, "c@x.com", plan="free", country="US")
    seg = create(stubs, project, "Shifting", PREMIUM)
    stubs.segments.UpdateSegment(
        segments_pb2.UpdateSegmentRequest(
            id=seg.id,
            condition=as_proto(F.data("country") == "US"),
        ),
        metadata=project.auth,
    )
    assert stored_members(engine, project) == {"Shifting": ["a@x.com", "c@x.com"]}
    assert member_count(stubs, project, seg.id) == 2
    recorded = segment_events(engine, project)
    # The create's entries, then the rebuild's changes (each statement's in any order).
    assert sorted(recorded[:2]) == [
        ("segment.shifting.entry", "a@x.com"),
        ("segment.shifting.entry", "b@x.com"),
    ]
    assert sorted(recorded[2:]) == [
        ("segment.shifting.entry", "c@x.com"),
        ("segment.shifting.exit", "b@x.com"),
    ]


def test_batches_after_a_definition_change_evaluate_the_new_one(
    stubs: Stubs, project: Project, engine: Engine
) -> None:
    # A batch's statement is built once per set of definitions and reused by the batches
    # after it: a new name, or a changed condition of a referenced segment, must reach the
    # next batch. Visits re-evaluate only "Active pro" (the one segment reading them).
    def within(event: str) -> Expression:
        return F.event(event).triggered_within(7, "days")

    def ingest(email: str, *names: str) -> None:
        for name in names:
            stubs.events.IngestEvents(
                events_pb2.IngestEventsRequest(
                    events=[events_pb2.IngestedEvent(email=email, event=name)]
                ),
                metadata=project.auth,
            )

    inner = create(stubs, project, "Active", within("click"), track=False)
    outer = create(
        stubs,
        project,
        "Active pro",
        F.segment(inner).member() & within("visit"),
    )
    ingest("a@x.com", "click", "visit")
    stubs.segments.UpdateSegment(
        segments_pb2.UpdateSegmentRequest(id=outer.id, name="Clicked pro"), metadata=project.auth
    )
    ingest("b@x.com", "click", "visit")
    stubs.segments.UpdateSegment(
        segments_pb2.UpdateSegmentRequest(id=inner.id, condition=as_proto(within("purchase"))),
        metadata=project.auth,
    )
    ingest("c@x.com", "purchase", "visit")
    ingest("d@x.com", "click", "visit")
    got = segment_events(engine, project)
    assert got[:2] == [
        ("segment.active-pro.entry", "a@x.com"),
        ("segment.clicked-pro.entry", "b@x.com"),
    ]
    assert sorted(got[2:4]) == [
        ("segment.clicked-pro.exit", "a@x.com"),
        ("segment.clicked-pro.exit", "b@x.com"),
    ]
    assert got[4:] == [("segment.clicked-pro.entry", "c@x.com")]
    assert member_count(stubs, project, inner.id) == 1
    assert member_count(stubs, project, outer.id) == 1


def test_static_member_calls_emit_nothing(stubs: Stubs, project: Project, engine: Engine) -> None:
    seg = stubs.segments.CreateSegment(
        segments_pb2.CreateSegmentRequest(name="List", type=resources_pb2.Segment.STATIC),
        metadata=project.auth,
    )
    stubs.segments.AddSegmentMembers(
        segments_pb2.AddSegmentMembersRequest(id=seg.id, emails=["a@x.com", "b@x.com"]),
        metadata=project.auth,
    )
    stubs.segments.RemoveSegmentMembers(
        segments_pb2.RemoveSegmentMembersRequest(id=seg.id, emails=["a@x.com"]),
        metadata=project.auth,
    )
    assert segment_events(engine, project) == []
    assert member_count(stubs, project, seg.id) == 1


def test_segments_can_filter_on_entry_events(
    stubs: Stubs, project: Project, engine: Engine
) -> None:
    create(stubs, project, "VIP", PREMIUM)
    follow = create(
        stubs,
        project,
        "Ever VIP",
        F.event("segment.vip.entry").triggered(),
    )
    upsert(stubs, project, "a@x.com", plan="premium")
    upsert(stubs, project, "a@x.com", plan="free")  # left VIP, but entered it once
    assert member_count(stubs, project, follow.id) == 1
    assert ("segment.ever-vip.entry", "a@x.com") in segment_events(engine, project)


def test_member_of_segment_follows_referenced_changes(stubs: Stubs, project: Project) -> None:
    vip = create(stubs, project, "VIP", PREMIUM, track=False)
    subscribed_vip = create(
        stubs,
        project,
        "Subscribed VIP",
        F.segment(vip).member() & F.subscribed.equals(True),
        track=False,
    )
    upsert(stubs, project, "a@x.com", plan="premium")

    def count(seg_id: str) -> int:
        return member_count(stubs, project, seg_id)

    assert count(subscribed_vip.id) == 1
    # Changing the referenced condition recomputes the referencing segment too.
    stubs.segments.UpdateSegment(
        segments_pb2.UpdateSegmentRequest(id=vip.id, condition=as_proto(F.data("plan") == "x")),
        metadata=project.auth,
    )
    assert count(vip.id) == 0
    assert count(subscribed_vip.id) == 0


def test_contact_delete_keeps_counts_exact(stubs: Stubs, project: Project, engine: Engine) -> None:
    seg = create(stubs, project, "Premium", PREMIUM)
    contact = upsert(stubs, project, "a@x.com", plan="premium")
    upsert(stubs, project, "b@x.com", plan="premium")
    stubs.contacts.DeleteContact(
        contacts_pb2.DeleteContactRequest(id=contact.id), metadata=project.auth
    )
    assert member_count(stubs, project, seg.id) == 1


def test_watch_streams_live_and_resumes_without_gaps(stubs: Stubs, project: Project) -> None:
    create(stubs, project, "Premium", PREMIUM)
    stream = stubs.segments.WatchSegmentEvents(
        segments_pb2.WatchSegmentEventsRequest(), metadata=project.auth
    )
    stream.initial_metadata()  # open: its start is fixed, so no change below is missed
    sent_at = time.monotonic()
    for i in range(5):
        upsert(stubs, project, f"u{i}@x.com", plan="premium")
    first = [next(stream) for _ in range(3)]
    latency = time.monotonic() - sent_at
    stream.cancel()
    assert [e.email for e in first] == ["u0@x.com", "u1@x.com", "u2@x.com"]
    assert all(e.kind == segments_pb2.SegmentEvent.ENTRY for e in first)
    assert latency < 2.0
    for i in range(5):
        upsert(stubs, project, f"u{i}@x.com", plan="free")
    resumed = stubs.segments.WatchSegmentEvents(
        segments_pb2.WatchSegmentEventsRequest(after=first[-1].cursor), metadata=project.auth
    )
    rest = [next(resumed) for _ in range(7)]
    resumed.cancel()
    assert [(e.email, e.kind) for e in rest] == [
        ("u3@x.com", segments_pb2.SegmentEvent.ENTRY),
        ("u4@x.com", segments_pb2.SegmentEvent.ENTRY),
        *[(f"u{i}@x.com", segments_pb2.SegmentEvent.EXIT) for i in range(5)],
    ]
    cursors = [e.cursor for e in first + rest]
    assert len(set(cursors)) == len(cursors)


def test_watch_rejects_bad_cursor_and_other_projects_are_invisible(
    stubs: Stubs, project: Project, other_project: Project
) -> None:
    with pytest.raises(grpc.RpcError) as err:
        next(
            stubs.segments.WatchSegmentEvents(
                segments_pb2.WatchSegmentEventsRequest(after="garbage"), metadata=project.auth
            )
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    create(stubs, other_project, "Premium", PREMIUM)
    stream = stubs.segments.WatchSegmentEvents(
        segments_pb2.WatchSegmentEventsRequest(), metadata=project.auth, timeout=1.5
    )
    upsert(stubs, other_project, "z@x.com", plan="premium")
    with pytest.raises(grpc.RpcError) as err:
        next(stream)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


@pytest.mark.parametrize(
    ("name", "slug"),
    [
        ("VIP Customers!", "vip-customers"),
        ("  Hello   World -- x ", "hello-world-x"),
        ("Café_VIP", "café_vip"),
        ("日本 Users", "日本-users"),
        ("a\tb\nc", "a-b-c"),
        ("--Edge--Case--", "edge-case"),
        ("!!!", ""),
    ],
)
def test_slug(name: str, slug: str) -> None:
    assert slugify(name) == slug


def ingest(stubs: Stubs, project: Project, *pairs: tuple[str, str]) -> int:
    reply = stubs.events.IngestEvents(
        events_pb2.IngestEventsRequest(
            events=[events_pb2.IngestedEvent(email=email, event=name) for email, name in pairs]
        ),
        metadata=project.auth,
    )
    return int(reply.accepted)


def orphan_events(engine: Engine) -> int:
    """Events whose contact does not exist: none may ever be left behind."""
    with engine.connect() as conn:
        return int(
            conn.execute(
                text(
                    "SELECT count(*) FROM events e WHERE NOT EXISTS (SELECT 1 FROM contacts c "
                    "WHERE c.project_id = e.project_id AND c.id = e.contact_id)"
                )
            ).scalar_one()
        )


def test_deleting_a_contact_deletes_its_history(
    stubs: Stubs, project: Project, engine: Engine
) -> None:
    buyers = create(stubs, project, "Buyers", F.event("purchase").triggered())
    # Events of several names, the segment's entry events among them, and a neighbour's.
    history = [("a@x.com", name) for name in ("purchase", "login", "email.opened", "zz last")]
    assert ingest(stubs, project, *history, ("b@x.com", "login"), ("b@x.com", "purchase")) == 6
    contact = stubs.contacts.GetContact(
        contacts_pb2.GetContactRequest(id=upsert(stubs, project, "a@x.com").id),
        metadata=project.auth,
    )
    stubs.contacts.DeleteContact(
        contacts_pb2.DeleteContactRequest(id=contact.id), metadata=project.auth
    )
    assert orphan_events(engine) == 0
    with engine.connect() as conn:
        left = conn.execute(
            text("SELECT name FROM events WHERE project_id = :p ORDER BY name"),
            {"p": project.id},
        ).scalars()
        assert list(left) == ["login", "purchase", "segment.buyers.entry"]
    # The same email later is a new contact with none of the old history: b stays alone.
    assert ingest(stubs, project, ("a@x.com", "login")) == 1
    assert member_count(stubs, project, buyers.id) == 1


def test_events_racing_a_delete_leave_no_orphans(
    stubs: Stubs, project: Project, engine: Engine
) -> None:
    # Each round deletes a contact while batches record events for it: the batch either
    # commits first (then the delete removes its events) or creates the contact again.
    for round_ in range(15):
        email = f"race{round_}@x.com"
        contact_id = upsert(stubs, project, email).id
        barrier = threading.Barrier(3)

        def record(email: str = email, barrier: threading.Barrier = barrier) -> None:
            barrier.wait()
            ingest(stubs, project, *[(email, "login")] * 20, ("other@x.com", "login"))

        def remove(contact_id: str = contact_id, barrier: threading.Barrier = barrier) -> None:
            barrier.wait()
            stubs.contacts.DeleteContact(
                contacts_pb2.DeleteContactRequest(id=contact_id), metadata=project.auth
            )

        with ThreadPoolExecutor(max_workers=3) as pool:
            for future in [pool.submit(record), pool.submit(record), pool.submit(remove)]:
                future.result()
        assert orphan_events(engine) == 0


def orphan_memberships(engine: Engine) -> int:
    """Memberships whose contact or segment does not exist (migration 0008 took their
    foreign keys away): none may ever be left behind."""
    with engine.connect() as conn:
        return int(
            conn.execute(
                text(
                    "SELECT count(*) FROM segment_members m "
                    "WHERE NOT EXISTS (SELECT 1 FROM contacts c "
                    "WHERE c.project_id = m.project_id AND c.id = m.contact_id) "
                    "OR NOT EXISTS (SELECT 1 FROM segments s "
                    "WHERE s.project_id = m.project_id AND s.id = m.segment_id)"
                )
            ).scalar_one()
        )


def stored_members(engine: Engine, project: Project) -> dict[str, list[str]]:
    """Segment name -> member emails, as stored in segment_members."""
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT s.name, c.email FROM segment_members m "
                "JOIN segments s ON s.project_id = m.project_id AND s.id = m.segment_id "
                "JOIN contacts c ON c.project_id = m.project_id AND c.id = m.contact_id "
                "WHERE m.project_id = :p ORDER BY s.name, c.email"
            ),
            {"p": project.id},
        )
        found: dict[str, list[str]] = {}
        for r in rows:
            found.setdefault(r.name, []).append(r.email)
        return found


def test_deleting_a_segment_deletes_its_memberships(
    stubs: Stubs, project: Project, engine: Engine
) -> None:
    gone = create(stubs, project, "Gone", PREMIUM, track=False)
    kept = create(stubs, project, "Kept", PREMIUM, track=False)
    for email in ("a@x.com", "b@x.com"):
        upsert(stubs, project, email, plan="premium")
    upsert(stubs, project, "c@x.com", plan="free")
    assert stored_members(engine, project) == {
        "Gone": ["a@x.com", "b@x.com"],
        "Kept": ["a@x.com", "b@x.com"],
    }
    stubs.segments.DeleteSegment(
        segments_pb2.DeleteSegmentRequest(id=gone.id), metadata=project.auth
    )
    assert stored_members(engine, project) == {"Kept": ["a@x.com", "b@x.com"]}
    assert orphan_memberships(engine) == 0
    assert member_count(stubs, project, kept.id) == 2


def test_deleting_a_segment_waits_for_writers_of_memberships(
    stubs: Stubs, project: Project, engine: Engine, sessions: sessionmaker[Session]
) -> None:
    # A writer holds the project's membership lock from loading the definitions it
    # evaluates until it commits; the delete must not run in between.
    seg = create(stubs, project, "Busy", PREMIUM, track=False)
    upsert(stubs, project, "a@x.com", plan="premium")
    with sessions.begin() as writer:
        membership.lock_shared(writer, uuid.UUID(project.id))
        with ThreadPoolExecutor(max_workers=1) as pool:
            deleting = pool.submit(
                stubs.segments.DeleteSegment,
                segments_pb2.DeleteSegmentRequest(id=seg.id),
                metadata=project.auth,
            )
            deadline = time.monotonic() + 10
            while not advisory_waiters(engine) and time.monotonic() < deadline:
                time.sleep(0.02)
            assert advisory_waiters(engine) == 1
            assert not deleting.done()
            writer.commit()
            deleting.result(timeout=10)
    assert stored_members(engine, project) == {}
    assert orphan_memberships(engine) == 0


def advisory_waiters(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(
                text("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted")
            ).scalar_one()
        )


def test_memberships_racing_deletes_leave_no_orphans(
    stubs: Stubs, project: Project, engine: Engine
) -> None:
    # Each round, batches make a contact enter two segments while one of the segments and
    # the contact are deleted: whatever commits first, no membership may outlive either.
    steady = create(stubs, project, "Steady", F.event("login").triggered())
    for round_ in range(10):
        email = f"race{round_}@x.com"
        contact_id = upsert(stubs, project, email).id
        doomed = create(stubs, project, f"Doomed {round_}", F.event("login").triggered())
        barrier = threading.Barrier(4)

        def record(email: str = email, barrier: threading.Barrier = barrier) -> None:
            barrier.wait()
            ingest(stubs, project, *[(email, "login")] * 20, ("other@x.com", "login"))

        def drop_segment(seg_id: str = doomed.id, barrier: threading.Barrier = barrier) -> None:
            barrier.wait()
            stubs.segments.DeleteSegment(
                segments_pb2.DeleteSegmentRequest(id=seg_id), metadata=project.auth
            )

        def drop_contact(
            contact_id: str = contact_id, barrier: threading.Barrier = barrier
        ) -> None:
            barrier.wait()
            stubs.contacts.DeleteContact(
                contacts_pb2.DeleteContactRequest(id=contact_id), metadata=project.auth
            )

        with ThreadPoolExecutor(max_workers=4) as pool:
            tasks = [pool.submit(record), pool.submit(record)]
            tasks += [pool.submit(drop_segment), pool.submit(drop_contact)]
            for future in tasks:
                future.result()
        assert orphan_memberships(engine) == 0
        # The surviving segment's count is exactly its stored members.
        members = stored_members(engine, project).get("Steady", [])
        assert member_count(stubs, project, steady.id) == len(members)
        assert "other@x.com" in members


def test_concurrent_batches_for_one_contact_see_each_others_events(
    stubs: Stubs, project: Project, engine: Engine
) -> None:
    # Membership needs both events; they arrive in two batches at the same moment. Each
    # batch alone sees one event, so unless the second evaluation waits for the first
    # and sees its event, the contact would never enter.
    both = create(
        stubs,
        project,
        "Both",
        F.event("signup").triggered() & F.event("purchase").triggered(),
    )
    emails = [f"both{i}@x.com" for i in range(20)]
    for email in emails:
        upsert(stubs, project, email)
    for email in emails:
        barrier = threading.Barrier(2)

        def record(name: str, email: str = email, barrier: threading.Barrier = barrier) -> None:
            barrier.wait()
            # Unrelated contacts and events in the same batches, as real traffic has.
            ingest(stubs, project, (email, name), ("noise@x.com", "page_view"))

        with ThreadPoolExecutor(max_workers=2) as pool:
            for future in [pool.submit(record, "signup"), pool.submit(record, "purchase")]:
                future.result()
    assert member_count(stubs, project, both.id) == len(emails)
    entries = [e for name, e in segment_events(engine, project) if name == "segment.both.entry"]
    assert sorted(entries) == sorted(emails)


def logins_an_hour_earlier(engine: Engine, project: Project) -> None:
    """Move the project's logins an hour back, behind the service's back (no re-evaluation)."""
    with engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE events SET occurred_at = occurred_at - interval '1 hour' "
                "WHERE project_id = :p AND name = 'login'"
            ),
            {"p": project.id},
        )


def test_a_batch_re_evaluates_only_contacts_with_events_a_segment_reads(
    stubs: Stubs, project: Project, engine: Engine, sessions: sessionmaker[Session]
) -> None:
    # Both contacts' logins are moved out of the one-minute window behind the service's
    # back, so both memberships are due to end. A batch re-evaluates, per segment, only
    # the contacts that got an event the segment reads: busy@ (logout) leaves at once,
    # quiet@ (page_view, which no condition reads) only with the next sweep.
    create(
        stubs,
        project,
        "Active",
        F.event("login").triggered_within(1, "minutes") & F.event("logout").not_triggered(),
    )
    ingest(stubs, project, ("quiet@x.com", "login"), ("busy@x.com", "login"))
    logins_an_hour_earlier(engine, project)
    ingest(stubs, project, ("quiet@x.com", "page_view"), ("busy@x.com", "logout"))
    entered = {("segment.active.entry", "quiet@x.com"), ("segment.active.entry", "busy@x.com")}
    assert set(segment_events(engine, project)) == entered | {("segment.active.exit", "busy@x.com")}
    sweeper.sweep_project(engine, sessions, uuid.UUID(project.id))
    assert set(segment_events(engine, project)) == entered | {
        ("segment.active.exit", "busy@x.com"),
        ("segment.active.exit", "quiet@x.com"),
    }


def test_one_batch_moves_each_segment_for_its_own_contacts(
    stubs: Stubs, project: Project, engine: Engine
) -> None:
    # Two segments read different events, so one batch re-evaluates different contacts for
    # each: every (segment, contact) pair in question leaves, and no other.
    create(stubs, project, "No refund", F.event("refund").not_triggered())
    create(stubs, project, "No churn", F.event("churn").not_triggered())
    ingest(stubs, project, ("a@x.com", "login"), ("b@x.com", "login"), ("c@x.com", "login"))
    ingest(stubs, project, ("a@x.com", "refund"), ("b@x.com", "churn"), ("c@x.com", "login"))
    exits = {(n, e) for n, e in segment_events(engine, project) if n.endswith(".exit")}
    assert exits == {("segment.no-refund.exit", "a@x.com"), ("segment.no-churn.exit", "b@x.com")}
    listed = stubs.segments.ListSegments(segments_pb2.ListSegmentsRequest(), metadata=project.auth)
    assert sorted((s.name, s.member_count) for s in listed.segments) == [
        ("No churn", 2),
        ("No refund", 2),
    ]


def test_a_large_rebuild_refreshes_the_members_statistics(
    stubs: Stubs, project: Project, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The planner reads pg_class.reltuples; stale after a bulk insert, it chose to hash a
    # whole segment for a batch's exits. ANALYZE counts every row of a small table.
    monkeypatch.setattr(membership.refresh, "ANALYZE_AFTER_ROWS", 20)
    for i in range(25):
        upsert(stubs, project, f"p{i}@x.com", plan="premium")
    create(stubs, project, "Premium", PREMIUM, track=False)
    with engine.connect() as conn:
        estimated = conn.execute(
            text("SELECT reltuples FROM pg_class WHERE oid = 'segment_members'::regclass")
        ).scalar_one()
        rows = conn.execute(text("SELECT count(*) FROM segment_members")).scalar_one()
    assert rows >= 25
    assert estimated == rows


def test_rebuilds_run_under_the_background_budget(
    sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(membership.locks, "BACKGROUND_TIMEOUT", 90.0)
    with sessions.begin() as session:
        assert session.execute(text("SHOW statement_timeout")).scalar_one() == "1min"
        membership.rebuild(session, uuid.uuid4(), [], emit=False)
        assert session.execute(text("SHOW statement_timeout")).scalar_one() == "90s"
    with sessions.begin() as session:  # for that transaction only
        assert session.execute(text("SHOW statement_timeout")).scalar_one() == "1min"


def test_sweeps_after_the_first_read_only_window_edges(
    stubs: Stubs, project: Project, engine: Engine, sessions: sessionmaker[Session]
) -> None:
    pid = uuid.UUID(project.id)
    pinged = create(
        stubs,
        project,
        "Pinged",
        F.event("ping").triggered_within(0.05, "minutes"),
    )
    starting = create(
        stubs,
        project,
        "Starting",
        F.data("startsAt").within(1, "minutes"),
    )
    state = sweeper.SweepState()
    sweeper.sweep_once(engine, sessions, state)  # the first pass compares everything
    assert state.swept[pid][1] == 0
    ingest(stubs, project, ("a@x.com", "ping"))
    soon = datetime.now(UTC) + timedelta(seconds=2)
    upsert(stubs, project, "b@x.com", startsAt=soon.isoformat())
    assert (member_count(stubs, project, pinged.id), member_count(stubs, project, starting.id)) == (
        1,
        0,
    )
    with sessions.begin() as session:
        # Nothing has crossed an edge yet: a@'s ping is 3 s from leaving, b@'s start 2 s
        # from arriving.
        now = membership.db_now(session)
        assert sweeper.crossed_contacts(session, pid, state.swept[pid][0], now) == []
    time.sleep(3.2)
    with sessions.begin() as session:
        now = membership.db_now(session)
        crossed = sweeper.crossed_contacts(session, pid, state.swept[pid][0], now)
        emails = session.execute(
            text("SELECT email FROM contacts WHERE project_id = :p AND id = ANY(:ids)"),
            {"p": pid, "ids": crossed},
        )
        assert sorted(emails.scalars()) == ["a@x.com", "b@x.com"]
    sweeper.sweep_once(engine, sessions, state)
    assert state.swept[pid][1] == 1  # an incremental pass
    expected = {
        ("segment.pinged.entry", "a@x.com"),
        ("segment.pinged.exit", "a@x.com"),
        ("segment.starting.entry", "b@x.com"),
    }
    assert set(segment_events(engine, project)) == expected
    sweeper.sweep_once(engine, sessions, state)
    assert set(segment_events(engine, project)) == expected


def test_every_so_often_a_sweep_compares_everything() -> None:
    state = sweeper.SweepState()
    pid, now = uuid.uuid4(), datetime.now(UTC)
    assert state.since(pid) is None
    state.record(pid, now, full=True)
    for n in range(1, sweeper.FULL_EVERY):
        assert state.since(pid) == now
        state.record(pid, now, full=False)
        assert state.swept[pid][1] == n
    assert state.since(pid) is None


def test_the_events_that_can_take_a_contact_out_of_a_segment() -> None:
    buyer = F.event("purchase").triggered_within(7, "days")
    assert loaded_segment(buyer).exit_event_names == frozenset()
    assert loaded_segment(buyer & (F.data("plan") == "pro")).exit_event_names == frozenset()
    assert (
        loaded_segment(F.event("login").triggered(count=F.count >= 3)).exit_event_names
        == frozenset()
    )
    assert loaded_segment(
        buyer & F.event("refund").not_triggered_within(30, "days")
    ).exit_event_names == {"refund"}
    assert loaded_segment(F.event("login").triggered(count=F.count < 3)).exit_event_names == {
        "login"
    }
    assert loaded_segment(F.event("login").triggered_older_than(30, "days")).exit_event_names == {
        "login"
    }
    assert loaded_segment(
        F.event("purchase").triggered(aggregate=F.sum("amount") >= 100)
    ).exit_event_names == {"purchase"}
    # Through references: a member of a segment of buyers can only enter; not a member of
    # it, a purchase can take the contact out; a list does not move with events.
    ref, other, static = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    references: dict[uuid.UUID, Expression | None] = {
        ref: buyer,
        other: F.event("logout").not_triggered(),
        static: None,
    }
    assert loaded_segment(F.segment(str(ref)).member(), references).exit_event_names == frozenset()
    assert loaded_segment(F.segment(str(ref)).not_member(), references).exit_event_names == {
        "purchase"
    }
    assert loaded_segment(F.segment(str(other)).member(), references).exit_event_names == {"logout"}
    assert (
        loaded_segment(F.segment(str(other)).not_member(), references).exit_event_names
        == frozenset()
    )
    assert (
        loaded_segment(F.segment(str(static)).not_member(), references).exit_event_names
        == frozenset()
    )


def test_a_batch_probes_exits_only_where_its_events_can_cause_them(
    stubs: Stubs, project: Project, engine: Engine, sessions: sessionmaker[Session]
) -> None:
    # "Active" can only gain members from logins, "Not a buyer" only lose them to
    # purchases, and "Buyers" lose them to purchases through notMemberOfSegment's reversal.
    # Both contacts' logins are moved out of the window behind the service's back: their
    # memberships of "Active" are due to end by the clock, which the sweep records, not a
    # batch whose login (dated before the window) cannot have taken them out.
    create(stubs, project, "Active", F.event("login").triggered_within(1, "minutes"))
    create(stubs, project, "Not a buyer", F.event("purchase").not_triggered())
    buyers = create(stubs, project, "Buyers", F.event("purchase").triggered())
    create(stubs, project, "Not buyers", F.segment(buyers.id).not_member())
    ingest(stubs, project, ("a@x.com", "login"), ("b@x.com", "login"))
    logins_an_hour_earlier(engine, project)
    before = set(segment_events(engine, project))
    old = timestamp_pb2.Timestamp()
    old.FromDatetime(datetime.now(UTC) - timedelta(hours=2))
    stubs.events.IngestEvents(
        events_pb2.IngestEventsRequest(
            events=[
                events_pb2.IngestedEvent(email="a@x.com", event="login", occurred_at=old),
                events_pb2.IngestedEvent(email="b@x.com", event="purchase"),
            ]
        ),
        metadata=project.auth,
    )
    moved = set(segment_events(engine, project)) - before
    assert moved == {
        ("segment.not-a-buyer.exit", "b@x.com"),
        ("segment.buyers.entry", "b@x.com"),
        ("segment.not-buyers.exit", "b@x.com"),
    }
    sweeper.sweep_project(engine, sessions, uuid.UUID(project.id))
    assert set(segment_events(engine, project)) - before - moved == {
        ("segment.active.exit", "a@x.com"),
        ("segment.active.exit", "b@x.com"),
    }


def test_loaded_segments_are_reused_until_their_definition_changes(
    stubs: Stubs, project: Project, sessions: sessionmaker[Session]
) -> None:
    """Batches load the project's segments each time; an unchanged one comes back as the
    same object (its event names and signature worked out once), a changed one anew."""
    inner = create(stubs, project, "Inner", F.event("click").triggered_within(7, "days"))
    outer = create(stubs, project, "Outer", F.segment(inner).member(), track=False)

    def loaded() -> dict[str, membership.Dynamic]:
        with sessions.begin() as session:
            found = membership.dynamic_segments(session, uuid.UUID(project.id))
        return {str(seg.id): seg for seg in found}

    first = loaded()
    again = loaded()
    assert again[inner.id] is first[inner.id] and again[outer.id] is first[outer.id]
    assert first[inner.id].event_names == {"click"}
    assert first[outer.id].event_names == {"click"}
    stubs.segments.UpdateSegment(
        segments_pb2.UpdateSegmentRequest(
            id=inner.id, condition=as_proto(F.event("visit").triggered_within(7, "days"))
        ),
        metadata=project.auth,
    )
    changed = loaded()
    # The referencing segment's definition changed with the one it references.
    assert changed[inner.id] is not first[inner.id]
    assert changed[outer.id] is not first[outer.id]
    assert changed[inner.id].event_names == changed[outer.id].event_names == {"visit"}
    stubs.segments.UpdateSegment(
        segments_pb2.UpdateSegmentRequest(id=outer.id, name="Outer renamed"),
        metadata=project.auth,
    )
    renamed = loaded()
    assert renamed[outer.id] is not changed[outer.id] and renamed[outer.id].name == "Outer renamed"
    assert renamed[inner.id] is changed[inner.id]


def test_a_batchs_statement_is_planned_once_per_connection(
    stubs: Stubs, project: Project, database_url: str
) -> None:
    """The statement that re-evaluates a batch's contacts is prepared from its fifth run on
    a connection and keeps one generic plan; the other statements stay planned per run."""
    clicked = create(stubs, project, "Clicked", F.event("click").triggered_within(7, "days"))
    engine = make_engine(database_url, pool_size=1, max_overflow=0)
    try:
        sessions = make_sessionmaker(engine)
        for i in range(8):
            with sessions.begin() as session:
                events.ingest(
                    session,
                    uuid.UUID(project.id),
                    [events.IngestItem(f"p{i}@x.com", "click", None, {})],
                )
        with engine.connect() as conn:
            plans = conn.execute(
                text(
                    "SELECT generic_plans, custom_plans FROM pg_prepared_statements "
                    "WHERE statement LIKE '%segment_members%' AND statement LIKE '%feed_positions%'"
                )
            ).all()
            mode = conn.execute(text("SHOW plan_cache_mode")).scalar_one()
    finally:
        engine.dispose()
    assert [(generic > 0, custom) for generic, custom in plans] == [(True, 0)]
    assert mode == "force_custom_plan"
    assert member_count(stubs, project, clicked.id) == 8
