"""Segment builds leave the request (README, "Builds"): BUILDING at once, built in the background in
slices without holding up writers, READY with exact membership and events, FAILED with
the previous condition serving, fair between projects, resumed after a crash."""

from __future__ import annotations

import signal
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest
from google.protobuf import json_format, struct_pb2
from sqlalchemy import Engine, select, text
from sqlalchemy.orm import Session, sessionmaker

from segments import Expression, F
from segments_api.v1 import contacts_pb2, events_pb2, resources_pb2, segments_pb2
from segments_service import builds, membership, segments, status, tables
from segments_service.builds import Builder, BuildSettings
from segments_service.errors import SegmentBuilding
from segments_service.fairness import FairShare, Limits
from segments_service.filters import parse_condition
from tests.conditions import as_proto
from tests.conftest import Project, Replicas, Stubs, new_project

THRESHOLD = 50
SETTINGS = BuildSettings(inline_contacts=THRESHOLD, slice=20, budget=60.0)
Status = resources_pb2.Segment.Status
PREMIUM = F.data("plan") == "premium"
BUYERS = F.event("purchase").triggered()


@pytest.fixture(autouse=True)
def small_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    """Projects above 50 contacts build in the background (the server reads it per call)."""
    monkeypatch.setenv("SEGMENTS_INLINE_BUILD_CONTACTS", str(THRESHOLD))


def add_contacts(stubs: Stubs, project: Project, n: int, start: int = 0) -> None:
    """Contacts c<i>@x.com; every other one on the premium plan."""
    requests = []
    for i in range(start, start + n):
        data = struct_pb2.Struct()
        data.update({"plan": "premium" if i % 2 == 0 else "free"})
        requests.append(contacts_pb2.UpsertContactRequest(email=f"c{i}@x.com", data=data))
    stubs.contacts.BatchUpsertContacts(
        contacts_pb2.BatchUpsertContactsRequest(contacts=requests), metadata=project.auth
    )


def set_plan(stubs: Stubs, project: Project, email: str, plan: str) -> None:
    data = struct_pb2.Struct()
    data.update({"plan": plan})
    stubs.contacts.UpsertContact(
        contacts_pb2.UpsertContactRequest(email=email, data=data),
        metadata=project.auth,
        timeout=10,
    )


def buy(stubs: Stubs, project: Project, *emails: str) -> None:
    stubs.events.IngestEvents(
        events_pb2.IngestEventsRequest(
            events=[events_pb2.IngestedEvent(email=e, event="purchase") for e in emails]
        ),
        metadata=project.auth,
        timeout=10,
    )


def create(
    stubs: Stubs, project: Project, name: str, condition: Expression, track: bool = True
) -> resources_pb2.Segment:
    return stubs.segments.CreateSegment(
        segments_pb2.CreateSegmentRequest(
            name=name, condition=as_proto(condition), track_membership=track
        ),
        metadata=project.auth,
        timeout=10,
    )


def get(stubs: Stubs, project: Project, segment_id: str) -> resources_pb2.Segment:
    return stubs.segments.GetSegment(
        segments_pb2.GetSegmentRequest(id=segment_id), metadata=project.auth
    )


def listed_emails(stubs: Stubs, project: Project, segment_id: str) -> tuple[int, list[str]]:
    got = stubs.segments.ListSegmentContacts(
        segments_pb2.ListSegmentContactsRequest(id=segment_id, page_size=100),
        metadata=project.auth,
    )
    return got.total, [c.email for c in got.data]


def expected(sessions: sessionmaker[Session], project: Project, segment_id: str) -> set[str]:
    """Emails of the contacts the segment's stored condition selects now, and the count
    CountMatchingContacts gives for it (checked equal)."""
    pid = uuid.UUID(project.id)
    with sessions.begin() as session:
        row = segments.get_row(session, pid, uuid.UUID(segment_id))
        count = segments.count_matching(session, pid, row.condition)
        ids = segments.member_ids(session, pid, parse_condition(row.condition)).subquery()
        c = tables.contacts.c
        emails = set(
            session.execute(
                select(c.email).where(c.project_id == pid, c.id.in_(select(ids.c.contact_id)))
            ).scalars()
        )
    assert len(emails) == count
    return emails


def stored(engine: Engine, project: Project, segment_id: str) -> set[str]:
    with engine.connect() as conn:
        return set(
            conn.execute(
                text(
                    "SELECT c.email FROM segment_members m JOIN contacts c "
                    "ON c.project_id = m.project_id AND c.id = m.contact_id "
                    "WHERE m.project_id = :p AND m.segment_id = :s"
                ),
                {"p": project.id, "s": segment_id},
            ).scalars()
        )


def entry_exit_events(engine: Engine, project: Project, slug: str) -> list[tuple[str, str]]:
    """(email, entry|exit) of the segment's events, in feed order."""
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT c.email, e.name FROM events e JOIN contacts c "
                "ON c.project_id = e.project_id AND c.id = e.contact_id "
                "WHERE e.project_id = :p AND e.name IN (:entry, :exit) ORDER BY e.feed_seq"
            ),
            {"p": project.id, "entry": f"segment.{slug}.entry", "exit": f"segment.{slug}.exit"},
        )
        return [(r.email, r.name.rsplit(".", 1)[1]) for r in rows]


def assert_events_follow_membership(events: list[tuple[str, str]], members: set[str]) -> None:
    """Per contact the events alternate entry, exit, entry...; members end entered."""
    last: dict[str, str] = {}
    for email, kind in events:
        assert last.get(email, "exit") != kind, f"two {kind} events in a row for {email}"
        last[email] = kind
    assert {e for e, k in last.items() if k == "entry"} == members


def build_rows(engine: Engine, project: Project) -> dict[str, int]:
    with engine.connect() as conn:
        return {
            table: conn.execute(
                text(f"SELECT count(*) FROM {table} WHERE project_id = :p"), {"p": project.id}
            ).scalar_one()
            for table in ("segment_builds", "segment_build_shadow", "segment_build_dirty")
        }


def test_a_small_project_still_builds_in_the_request(
    stubs: Stubs, project: Project, engine: Engine
) -> None:
    add_contacts(stubs, project, THRESHOLD)
    seg = create(stubs, project, "Premium", PREMIUM)
    assert seg.status == Status.READY
    assert seg.member_count == THRESHOLD // 2
    assert json_format.MessageToDict(seg)["statusReason"] is None
    assert len(stored(engine, project, seg.id)) == THRESHOLD // 2


def test_a_large_project_answers_building_and_the_builder_completes_it(
    stubs: Stubs, project: Project, engine: Engine, sessions: sessionmaker[Session]
) -> None:
    add_contacts(stubs, project, 60)
    seg = create(stubs, project, "Premium", PREMIUM)
    assert seg.status == Status.BUILDING
    assert seg.member_count == 30  # counted live within the response's second
    # Nothing is stored yet: counts and listings are answered from the condition.
    assert stored(engine, project, seg.id) == set()
    assert get(stubs, project, seg.id).member_count == 30
    listed = stubs.segments.ListSegments(segments_pb2.ListSegmentsRequest(), metadata=project.auth)
    assert [(s.status, s.member_count) for s in listed.segments] == [(Status.BUILDING, 30)]
    total, emails = listed_emails(stubs, project, seg.id)
    assert total == 30
    assert set(emails) == {f"c{i}@x.com" for i in range(0, 60, 2)}

    Builder(sessions, SETTINGS).run_until_idle()

    done = get(stubs, project, seg.id)
    assert done.status == Status.READY
    members = expected(sessions, project, seg.id)
    assert done.member_count == len(members) == 30
    assert stored(engine, project, seg.id) == members
    # The same page, in the same order, from the stored membership.
    assert listed_emails(stubs, project, seg.id) == (total, emails)
    events = entry_exit_events(engine, project, "premium")
    assert Counter(kind for _, kind in events) == {"entry": 30}
    assert_events_follow_membership(events, members)
    assert build_rows(engine, project) == {
        "segment_builds": 0,
        "segment_build_shadow": 0,
        "segment_build_dirty": 0,
    }


def test_writes_proceed_while_a_build_runs_and_are_caught_up(
    stubs: Stubs, project: Project, engine: Engine, sessions: sessionmaker[Session]
) -> None:
    add_contacts(stubs, project, 60)
    seg = create(stubs, project, "Buyers or premium", PREMIUM | BUYERS)
    pid = uuid.UUID(project.id)
    paused, resume = threading.Event(), threading.Event()

    def pause_in_the_first_compute(_session: Session, phase: str) -> None:
        if phase == builds.COMPUTE and not paused.is_set():
            paused.set()
            assert resume.wait(30)

    with ThreadPoolExecutor(max_workers=1) as pool:
        stepping = pool.submit(builds.step, sessions, pid, SETTINGS, pause_in_the_first_compute)
        assert paused.wait(30)
        # The step's transaction is open, holding the project's lock (shared) and its
        # first slice's shadow: contact writes and event ingestion still go through.
        set_plan(stubs, project, "c0@x.com", "free")  # leaves
        set_plan(stubs, project, "c1@x.com", "premium")  # enters
        buy(stubs, project, "c3@x.com", "new@x.com")  # enter (one of them new)
        set_plan(stubs, project, "c58@x.com", "free")  # leaves, in a later slice
        assert not stepping.done()
        resume.set()
        assert stepping.result(timeout=30)

    # More writes between the steps, while the build computes, applies and catches up.
    builder = Builder(sessions, SETTINGS)
    writes: Iterator[Callable[[], Any]] = iter(
        [
            lambda: set_plan(stubs, project, "c2@x.com", "free"),
            lambda: buy(stubs, project, "c5@x.com"),
            lambda: set_plan(stubs, project, "c0@x.com", "premium"),  # back again
            lambda: add_contacts(stubs, project, 3, start=100),
            lambda: set_plan(stubs, project, "c7@x.com", "premium"),
            lambda: stubs.contacts.DeleteContact(
                contacts_pb2.DeleteContactRequest(
                    id=stubs.contacts.UpsertContact(
                        contacts_pb2.UpsertContactRequest(email="c4@x.com"),
                        metadata=project.auth,
                    ).id
                ),
                metadata=project.auth,
            ),
        ]
    )
    while builder.run_round():
        write = next(writes, None)
        if write is not None:
            write()
    assert next(writes, None) is None  # every write happened during the build

    done = get(stubs, project, seg.id)
    assert done.status == Status.READY
    members = expected(sessions, project, seg.id)
    assert "c0@x.com" in members and "c1@x.com" in members and "new@x.com" in members
    assert "c2@x.com" not in members and "c4@x.com" not in members
    assert done.member_count == len(members)
    assert stored(engine, project, seg.id) == members
    assert_events_follow_membership(
        entry_exit_events(engine, project, "buyers-or-premium"), members
    )
    assert build_rows(engine, project)["segment_build_dirty"] == 0
    # READY again: writers evaluate it themselves.
    set_plan(stubs, project, "c9@x.com", "premium")
    assert "c9@x.com" in stored(engine, project, seg.id)


def over_budget(_session: Session, phase: str) -> None:
    if phase == builds.COMPUTE:
        _session.execute(text("SELECT pg_sleep(5)"))


def test_a_failed_update_keeps_the_previous_condition_serving(
    stubs: Stubs, project: Project, engine: Engine, sessions: sessionmaker[Session]
) -> None:
    add_contacts(stubs, project, 60)
    seg = create(stubs, project, "Premium", PREMIUM)
    Builder(sessions, SETTINGS).run_until_idle()
    previous = get(stubs, project, seg.id).condition

    updated = stubs.segments.UpdateSegment(
        segments_pb2.UpdateSegmentRequest(id=seg.id, condition=as_proto(BUYERS)),
        metadata=project.auth,
    )
    assert updated.status == Status.BUILDING
    assert updated.member_count == 0  # nobody has bought yet
    set_plan(stubs, project, "c1@x.com", "premium")  # noted while building

    Builder(sessions, BuildSettings(THRESHOLD, 20, budget=0.2), hook=over_budget).run_until_idle()

    failed = get(stubs, project, seg.id)
    assert failed.status == Status.FAILED
    assert "budget" in failed.status_reason.string_value
    assert failed.condition == previous
    members = expected(sessions, project, seg.id)
    assert "c1@x.com" in members
    assert failed.member_count == len(members) == 31
    assert stored(engine, project, seg.id) == members
    assert_events_follow_membership(entry_exit_events(engine, project, "premium"), members)
    set_plan(stubs, project, "c3@x.com", "premium")  # served by the writers again
    assert "c3@x.com" in stored(engine, project, seg.id)

    # A later update with a condition tries again.
    buy(stubs, project, "c0@x.com")
    retried = stubs.segments.UpdateSegment(
        segments_pb2.UpdateSegmentRequest(id=seg.id, condition=as_proto(BUYERS)),
        metadata=project.auth,
    )
    assert retried.status == Status.BUILDING
    assert json_format.MessageToDict(retried)["statusReason"] is None
    Builder(sessions, SETTINGS).run_until_idle()
    ready = get(stubs, project, seg.id)
    assert ready.status == Status.READY
    assert stored(engine, project, seg.id) == {"c0@x.com"}
    assert ready.member_count == 1


def test_a_failed_create_is_answered_live(
    stubs: Stubs, project: Project, engine: Engine, sessions: sessionmaker[Session]
) -> None:
    add_contacts(stubs, project, 60)
    seg = create(stubs, project, "Premium", PREMIUM)
    Builder(sessions, BuildSettings(THRESHOLD, 20, budget=0.2), hook=over_budget).run_until_idle()
    failed = get(stubs, project, seg.id)
    assert failed.status == Status.FAILED
    assert failed.status_reason.string_value
    assert failed.member_count == 30
    assert listed_emails(stubs, project, seg.id)[0] == 30
    set_plan(stubs, project, "c1@x.com", "premium")
    assert get(stubs, project, seg.id).member_count == 31
    assert stored(engine, project, seg.id) == set()
    assert build_rows(engine, project)["segment_builds"] == 0


def test_deleting_a_segment_during_its_build(
    stubs: Stubs, project: Project, engine: Engine, sessions: sessionmaker[Session]
) -> None:
    add_contacts(stubs, project, 60)
    seg = create(stubs, project, "Premium", PREMIUM)
    builder = Builder(sessions, SETTINGS)
    for _ in range(6):  # computed, and partly applied
        builder.run_round()
    assert stored(engine, project, seg.id)
    stubs.segments.DeleteSegment(
        segments_pb2.DeleteSegmentRequest(id=seg.id), metadata=project.auth
    )
    builder.run_until_idle()
    assert stored(engine, project, seg.id) == set()
    assert build_rows(engine, project) == {
        "segment_builds": 0,
        "segment_build_shadow": 0,
        "segment_build_dirty": 0,
    }


def test_one_projects_queue_does_not_delay_anothers_first_build(
    stubs: Stubs, engine: Engine, sessions: sessionmaker[Session]
) -> None:
    busy, quiet = new_project(sessions, "busy"), new_project(sessions, "quiet")
    add_contacts(stubs, busy, 60)
    add_contacts(stubs, quiet, 60)
    queued = [create(stubs, busy, f"Busy {i}", PREMIUM) for i in range(5)]
    first = create(stubs, quiet, "Quiet", PREMIUM)
    builder = Builder(sessions, SETTINGS)
    while get(stubs, quiet, first.id).status != Status.READY:
        assert builder.run_round()
    ready = [get(stubs, busy, s.id).status == Status.READY for s in queued]
    assert sum(ready) <= 1  # the busy project's other builds still wait their turn
    builder.run_until_idle()
    assert all(get(stubs, busy, s.id).status == Status.READY for s in queued)


class Crash(BaseException):
    """The server dies in the middle of a step (its transaction never commits)."""


def test_a_build_stopped_mid_step_resumes_exactly(
    stubs: Stubs, project: Project, engine: Engine, sessions: sessionmaker[Session]
) -> None:
    add_contacts(stubs, project, 60)
    seg = create(stubs, project, "Premium", PREMIUM)
    applied = 0

    def crash_in_the_second_apply(session: Session, phase: str) -> None:
        nonlocal applied
        if phase == builds.APPLY:
            applied += 1
            if applied == 2:
                raise Crash

    builder = Builder(sessions, SETTINGS, hook=crash_in_the_second_apply)
    with pytest.raises(Crash):
        builder.run_until_idle()
    assert 0 < len(stored(engine, project, seg.id)) < 30  # one slice applied, then the crash
    Builder(sessions, SETTINGS).run_until_idle()  # another server takes over
    members = expected(sessions, project, seg.id)
    assert stored(engine, project, seg.id) == members
    assert get(stubs, project, seg.id).member_count == len(members) == 30
    events = entry_exit_events(engine, project, "premium")
    assert Counter(kind for _, kind in events) == {"entry": 30}
    assert_events_follow_membership(events, members)


def test_a_live_count_that_cannot_finish_in_time_is_segment_building(
    stubs: Stubs, project: Project, engine: Engine, sessions: sessionmaker[Session]
) -> None:
    add_contacts(stubs, project, 60)
    seg = create(stubs, project, "Buyers", BUYERS)
    with engine.connect() as blocker:
        blocker.execute(text("LOCK TABLE events IN ACCESS EXCLUSIVE MODE"))
        with sessions.begin() as session:
            session.execute(text("SET LOCAL statement_timeout = 200"))
            with pytest.raises(SegmentBuilding) as raised:
                segments.get_segment(session, uuid.UUID(project.id), uuid.UUID(seg.id))
        blocker.rollback()
    err = raised.value
    assert (err.code, err.http_status) == ("SEGMENT_BUILDING", 503)
    mapped = status.to_status(err, "req")
    assert mapped.code == grpc.StatusCode.UNAVAILABLE
    details = [v for k, v in mapped.trailing_metadata if k == "grpc-status-details-bin"]
    assert len(details) == 1 and isinstance(details[0], bytes)
    assert b"google.rpc.RetryInfo" in details[0]


def test_segments_referencing_a_rebuilt_one_are_rebuilt_too(
    stubs: Stubs, project: Project, engine: Engine, sessions: sessionmaker[Session]
) -> None:
    add_contacts(stubs, project, 60)
    base = create(stubs, project, "Base", PREMIUM)
    Builder(sessions, SETTINGS).run_until_idle()
    member = F.segment(base).member()
    subscribed = F.subscribed.equals(True)
    uses = create(stubs, project, "Uses base", member & subscribed)
    Builder(sessions, SETTINGS).run_until_idle()
    assert len(stored(engine, project, uses.id)) == 30

    stubs.segments.UpdateSegment(
        segments_pb2.UpdateSegmentRequest(id=base.id, condition=as_proto(BUYERS)),
        metadata=project.auth,
    )
    assert get(stubs, project, uses.id).status == Status.BUILDING
    assert get(stubs, project, uses.id).member_count == 0  # live, with the new condition
    buy(stubs, project, "c1@x.com", "c2@x.com")
    Builder(sessions, SETTINGS).run_until_idle()
    for seg in (base, uses):
        done = get(stubs, project, seg.id)
        assert done.status == Status.READY
        assert stored(engine, project, seg.id) == expected(sessions, project, seg.id)
        assert done.member_count == 2
    events = entry_exit_events(engine, project, "uses-base")
    assert_events_follow_membership(events, {"c1@x.com", "c2@x.com"})


def test_turning_tracking_on_enters_every_member_once(
    stubs: Stubs, project: Project, engine: Engine, sessions: sessionmaker[Session]
) -> None:
    add_contacts(stubs, project, 60)
    seg = create(stubs, project, "Premium", PREMIUM, track=False)
    Builder(sessions, SETTINGS).run_until_idle()
    assert entry_exit_events(engine, project, "premium") == []

    on = stubs.segments.UpdateSegment(
        segments_pb2.UpdateSegmentRequest(id=seg.id, track_membership=True),
        metadata=project.auth,
    )
    assert on.status == Status.BUILDING
    assert on.member_count == 30  # the stored count it had
    set_plan(stubs, project, "c0@x.com", "free")  # leaves while building
    set_plan(stubs, project, "c1@x.com", "premium")  # enters while building
    Builder(sessions, SETTINGS).run_until_idle()
    members = expected(sessions, project, seg.id)
    assert get(stubs, project, seg.id).status == Status.READY
    assert stored(engine, project, seg.id) == members
    events = entry_exit_events(engine, project, "premium")
    assert Counter(kind for _, kind in events) == {"entry": 30}
    assert_events_follow_membership(events, members)


def test_builders_of_several_servers_never_build_twice(
    stubs: Stubs, project: Project, engine: Engine, sessions: sessionmaker[Session]
) -> None:
    add_contacts(stubs, project, 60)
    created = [create(stubs, project, f"Premium {i}", PREMIUM) for i in range(3)]
    servers = [Builder(sessions, BuildSettings(THRESHOLD, 7, 60.0), period=0.01) for _ in range(3)]
    for builder in servers:
        builder.start()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and any(
            get(stubs, project, seg.id).status != Status.READY for seg in created
        ):
            time.sleep(0.05)
    finally:
        for builder in servers:
            builder.stop()
        for builder in servers:
            builder.join(timeout=10)
    for i, seg in enumerate(created):
        assert get(stubs, project, seg.id).status == Status.READY
        members = expected(sessions, project, seg.id)
        assert stored(engine, project, seg.id) == members
        events = entry_exit_events(engine, project, f"premium-{i}")
        assert Counter(kind for _, kind in events) == {"entry": 30}


def test_a_failed_update_rebuilds_the_segments_referencing_it_with_the_previous_condition(
    stubs: Stubs, project: Project, engine: Engine, sessions: sessionmaker[Session]
) -> None:
    add_contacts(stubs, project, 60)
    base = create(stubs, project, "Base", PREMIUM)
    uses = create(stubs, project, "Uses base", F.segment(base).member())
    Builder(sessions, SETTINGS).run_until_idle()
    stubs.segments.UpdateSegment(
        segments_pb2.UpdateSegmentRequest(id=base.id, condition=as_proto(BUYERS)),
        metadata=project.auth,
    )
    computed = 0

    def first_compute_over_budget(session: Session, phase: str) -> None:
        nonlocal computed
        if phase == builds.COMPUTE:
            computed += 1
            if computed == 1:  # the base's build is the oldest
                over_budget(session, phase)

    Builder(
        sessions, BuildSettings(THRESHOLD, 20, budget=0.2), hook=first_compute_over_budget
    ).run_until_idle()
    assert get(stubs, project, base.id).status == Status.FAILED
    assert get(stubs, project, uses.id).status == Status.READY
    for seg in (base, uses):
        assert stored(engine, project, seg.id) == expected(sessions, project, seg.id)
        assert get(stubs, project, seg.id).member_count == 30
    # The dependent's events: 30 entries at its creation, nothing since.
    events = entry_exit_events(engine, project, "uses-base")
    assert Counter(kind for _, kind in events) == {"entry": 30}


def test_a_server_killed_mid_build_leaves_a_build_another_server_finishes(
    replicas: Replicas,
    project: Project,
    engine: Engine,
    sessions: sessionmaker[Session],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SEGMENTS_BUILD_SLICE", "500")
    a = replicas()
    for start in range(0, 10_000, 1000):
        a.contacts.BatchUpsertContacts(
            contacts_pb2.BatchUpsertContactsRequest(
                contacts=[
                    contacts_pb2.UpsertContactRequest(email=f"m{i}@x.com")
                    for i in range(start, start + 1000)
                ]
            ),
            metadata=project.auth,
        )
    everyone = F.subscribed.equals(True)
    seg = a.segments.CreateSegment(
        segments_pb2.CreateSegmentRequest(
            name="Everyone", condition=as_proto(everyone), track_membership=True
        ),
        metadata=project.auth,
    )
    assert seg.status == Status.BUILDING
    # Kill the server once its Builder has applied part of the build.
    deadline = time.monotonic() + 60
    with engine.connect() as conn:
        while time.monotonic() < deadline:
            applied = conn.execute(
                text(
                    "SELECT count(*) FROM segment_members WHERE project_id = :p AND segment_id = :s"
                ),
                {"p": project.id, "s": seg.id},
            ).scalar_one()
            conn.commit()
            if applied:
                break
            time.sleep(0.005)
        else:
            pytest.fail("the build never started applying")
    a.proc.send_signal(signal.SIGKILL)
    a.proc.wait(10)
    assert build_rows(engine, project)["segment_builds"] == 1
    assert 0 < len(stored(engine, project, seg.id)) < 10_000

    b = replicas()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        done = b.segments.GetSegment(
            segments_pb2.GetSegmentRequest(id=seg.id), metadata=project.auth
        )
        if done.status == Status.READY:
            break
        time.sleep(0.1)
    assert done.status == Status.READY
    assert done.member_count == 10_000
    assert len(stored(engine, project, seg.id)) == 10_000
    events = entry_exit_events(engine, project, "everyone")
    assert len(events) == 10_000 and {kind for _, kind in events} == {"entry"}
    assert len({email for email, _ in events}) == 10_000


def test_a_large_build_refreshes_the_members_statistics_before_catching_up(
    stubs: Stubs,
    project: Project,
    engine: Engine,
    sessions: sessionmaker[Session],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The catch-up runs the writers' scoped statement, which stale statistics misplan.
    monkeypatch.setattr(membership.refresh, "ANALYZE_AFTER_ROWS", 20)
    add_contacts(stubs, project, 60)
    create(stubs, project, "Premium", PREMIUM, track=False)
    seen: list[tuple[float, int]] = []

    def at_catch_up(session: Session, phase: str) -> None:
        if phase == builds.CATCHUP:
            row = session.execute(
                text(
                    "SELECT reltuples, (SELECT count(*) FROM segment_members) "
                    "FROM pg_class WHERE oid = 'segment_members'::regclass"
                )
            ).one()
            seen.append((float(row[0]), int(row[1])))

    Builder(sessions, SETTINGS, hook=at_catch_up).run_until_idle()
    assert len(seen) == 1
    estimated, rows = seen[0]
    assert rows >= 30 and estimated == rows


def first_member(engine: Engine, project: Project, segment_id: str) -> str:
    """The email of the segment's stored member with the lowest contact id."""
    with engine.connect() as conn:
        email: str = conn.execute(
            text(
                "SELECT c.email FROM segment_members m JOIN contacts c "
                "ON c.project_id = m.project_id AND c.id = m.contact_id "
                "WHERE m.project_id = :p AND m.segment_id = :s ORDER BY m.contact_id LIMIT 1"
            ),
            {"p": project.id, "s": segment_id},
        ).scalar_one()
        return email


def step_until(builder: Builder, phases: list[str], phase: str) -> None:
    """Rounds until a step of `phase` has committed."""
    for _ in range(100):
        builder.run_round()
        if phase in phases:
            return
    pytest.fail(f"no {phase} step")


def test_tracking_on_enters_a_member_written_after_its_slice_once(
    stubs: Stubs, project: Project, engine: Engine, sessions: sessionmaker[Session]
) -> None:
    add_contacts(stubs, project, 60)
    seg = create(stubs, project, "Premium", PREMIUM, track=False)
    Builder(sessions, SETTINGS).run_until_idle()
    stubs.segments.UpdateSegment(
        segments_pb2.UpdateSegmentRequest(id=seg.id, track_membership=True),
        metadata=project.auth,
    )
    phases: list[str] = []
    builder = Builder(sessions, SETTINGS, hook=lambda _s, phase: phases.append(phase))
    step_until(builder, phases, builds.APPLY)
    # Entered by the first apply step, then written: caught up, not entered again.
    written = first_member(engine, project, seg.id)
    set_plan(stubs, project, written, "premium")
    builder.run_until_idle()
    members = expected(sessions, project, seg.id)
    events = entry_exit_events(engine, project, "premium")
    assert Counter(kind for _, kind in events) == {"entry": 30}
    assert_events_follow_membership(events, members)


def test_a_new_condition_during_a_tracking_build_enters_each_member_once(
    stubs: Stubs, project: Project, engine: Engine, sessions: sessionmaker[Session]
) -> None:
    add_contacts(stubs, project, 60)
    seg = create(stubs, project, "Premium", PREMIUM, track=False)
    Builder(sessions, SETTINGS).run_until_idle()
    stubs.segments.UpdateSegment(
        segments_pb2.UpdateSegmentRequest(id=seg.id, track_membership=True),
        metadata=project.auth,
    )
    phases: list[str] = []
    builder = Builder(sessions, SETTINGS, hook=lambda _s, phase: phases.append(phase))
    step_until(builder, phases, builds.APPLY)
    subscribed = F.subscribed.equals(True)
    stubs.segments.UpdateSegment(
        segments_pb2.UpdateSegmentRequest(id=seg.id, condition=as_proto(PREMIUM & subscribed)),
        metadata=project.auth,
    )
    builder.run_until_idle()
    members = expected(sessions, project, seg.id)
    assert len(members) == 30
    events = entry_exit_events(engine, project, "premium")
    assert Counter(kind for _, kind in events) == {"entry": 30}
    assert_events_follow_membership(events, members)


def test_the_builder_rests_only_while_requests_are_served(
    sessions: sessionmaker[Session],
) -> None:
    """After a busy round the Builder rests as long as the round took if a request started
    or ran meanwhile, and starts the next round at once on an idle server."""
    fair = FairShare(Limits(concurrency=2))
    builder = Builder(sessions, SETTINGS, foreground=fair.activity)
    project = uuid.uuid4()

    idle = fair.activity()
    assert builder.rest_after(2.0, idle) == 0.0

    with fair.unary.hold(project):
        # A request in flight when the round ends.
        assert builder.rest_after(2.0, idle) == 2.0
        running = fair.activity()
    # In flight when the round started, done since.
    assert builder.rest_after(2.0, running) == 2.0
    # Started and done within the round.
    before = fair.activity()
    with fair.unary.hold(project):
        pass
    assert builder.rest_after(0.5, before) == 0.5
    # Nothing since.
    quiet = fair.activity()
    assert builder.rest_after(0.5, quiet) == 0.0
    # Without a reading of the foreground, the Builder always rests.
    assert Builder(sessions, SETTINGS).rest_after(1.5, (0, 0)) == 1.5
