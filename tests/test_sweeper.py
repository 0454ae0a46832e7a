"""The sweeper under the budgets of docs/limits.md: full comparisons in slices of contacts, every
statement under the background budget, projects served round-robin, and a slice over the
budget failing alone."""

from __future__ import annotations

import logging
import threading
import uuid
from collections import Counter
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session, sessionmaker

from segments import F, SegmentsClient
from segments_service import membership, sweeper
from tests.conftest import Project, new_project

# Premium contacts created in the last year: time-dependent, so the sweeper reads it.
PREMIUM_THIS_YEAR = (F.data("plan") == "premium") & F.created_at.within(365, "days")


def populate(client: SegmentsClient, count: int) -> tuple[str, list[str]]:
    """`count` contacts, premium at even positions of id order, and the segment; answers
    the segment id and the contact ids in id order."""
    ids = sorted(client.upsert_contact(f"c{i}@x.com").id for i in range(count))
    for n, contact_id in enumerate(ids):
        email = client.get_contact(contact_id).email
        client.upsert_contact(email, data={"plan": "premium" if n % 2 == 0 else "free"})
    segment = client.create_segment("Premium this year", condition=PREMIUM_THIS_YEAR)
    assert segment.member_count == (count + 1) // 2
    return segment.id, ids


def tamper(
    engine: Engine, project: Project, segment_id: str, drop: list[str], add: list[str]
) -> None:
    """Make stored memberships wrong (as a lost update would): `drop` members lose their
    row, non-members in `add` gain one; the count follows the rows."""
    with engine.begin() as conn:
        for contact_id in drop:
            gone = conn.execute(
                text(
                    "DELETE FROM segment_members WHERE project_id = :p AND segment_id = :s "
                    "AND contact_id = :c"
                ),
                {"p": project.id, "s": segment_id, "c": contact_id},
            )
            assert gone.rowcount == 1
        for contact_id in add:
            conn.execute(
                text(
                    "INSERT INTO segment_members "
                    "(project_id, segment_id, contact_id, contact_created_at) "
                    "SELECT project_id, :s, id, created_at FROM contacts "
                    "WHERE project_id = :p AND id = :c"
                ),
                {"p": project.id, "s": segment_id, "c": contact_id},
            )
        conn.execute(
            text("UPDATE segments SET member_count = member_count + :d WHERE id = :s"),
            {"d": len(add) - len(drop), "s": segment_id},
        )


def members(engine: Engine, segment_id: str) -> set[str]:
    with engine.connect() as conn:
        rows = conn.execute(
            text("SELECT contact_id FROM segment_members WHERE segment_id = :s"), {"s": segment_id}
        )
        return {str(r.contact_id) for r in rows}


def stale(sessions: sessionmaker[Session], project: Project, size: int) -> set[str]:
    with sessions() as session:
        found = sweeper.stale_contacts(session, uuid.UUID(project.id), size=size)
        session.rollback()
    assert len(found) == len(set(found))
    return {str(i) for i in found}


def test_a_sliced_full_pass_finds_the_same_stale_contacts(
    client: SegmentsClient,
    project: Project,
    engine: Engine,
    sessions: sessionmaker[Session],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    segment_id, ids = populate(client, 9)
    right = members(engine, segment_id)
    assert right == set(ids[0::2])
    # Wrong in the first, a middle and the last slice of two.
    tamper(engine, project, segment_id, drop=[ids[0], ids[8]], add=[ids[3]])
    expected = {ids[0], ids[8], ids[3]}
    assert stale(sessions, project, size=1000) == expected  # one slice: the whole project
    assert stale(sessions, project, size=2) == expected
    assert stale(sessions, project, size=1) == expected

    slices: list[Any] = []
    reads = sweeper.contact_slice

    def counted(session: Session, project_id: uuid.UUID, after: Any, size: int) -> Any:
        found = reads(session, project_id, after, size)
        slices.append(found)
        return found

    monkeypatch.setattr(sweeper, "contact_slice", counted)
    moved, now = sweeper.sweep_project(engine, sessions, uuid.UUID(project.id), size=2)
    assert (moved, now is not None) == (3, True)
    assert [len(s) for s in slices] == [2, 2, 2, 2, 1]
    assert [str(i) for s in slices for i in s] == ids
    assert members(engine, segment_id) == right
    assert client.get_segment(segment_id).member_count == len(right)
    assert stale(sessions, project, size=2) == set()


def test_every_sweep_statement_runs_under_the_background_budget(
    client: SegmentsClient,
    project: Project,
    engine: Engine,
    sessions: sessionmaker[Session],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    segment_id, ids = populate(client, 5)
    tamper(engine, project, segment_id, drop=[ids[0]], add=[ids[1]])
    seen: list[tuple[str, str]] = []

    def watched(name: str, inner: Any) -> Any:
        def call(session: Session, *args: Any, **kwargs: Any) -> Any:
            timeout = session.execute(text("SHOW statement_timeout")).scalar_one()
            seen.append((name, timeout))
            return inner(session, *args, **kwargs)

        return call

    for name in ("time_dependent_segments", "contact_slice", "stale_among", "crossed_contacts"):
        monkeypatch.setattr(sweeper, name, watched(name, getattr(sweeper, name)))
    monkeypatch.setattr(
        membership, "refresh_contacts", watched("refresh_contacts", membership.refresh_contacts)
    )
    pid = uuid.UUID(project.id)
    moved, now = sweeper.sweep_project(engine, sessions, pid, budget=7.25, size=2)
    assert moved == 2 and now is not None
    # An incremental pass too.
    sweeper.sweep_project(engine, sessions, pid, now - timedelta(minutes=1), budget=7.25)
    sweeper.sweep_once(engine, sessions, budget=7.25, projects=[pid])
    names = {name for name, _timeout in seen}
    assert names == {
        "time_dependent_segments",
        "contact_slice",
        "stale_among",
        "crossed_contacts",
        "refresh_contacts",
    }
    assert {timeout for _name, timeout in seen} == {"7250ms"}


def test_a_slice_over_the_budget_fails_alone(
    target: str,
    sessions: sessionmaker[Session],
    engine: Engine,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    first, second = new_project(sessions, "first"), new_project(sessions, "second")
    with (
        SegmentsClient(target, first.secret_key) as a,
        SegmentsClient(target, second.secret_key) as b,
    ):
        seg_a, ids_a = populate(a, 6)
        seg_b, ids_b = populate(b, 2)
    right_a, right_b = members(engine, seg_a), members(engine, seg_b)
    # One wrong membership in each slice of two of the first project, one in the second.
    tamper(engine, first, seg_a, drop=[ids_a[0], ids_a[2], ids_a[4]], add=[])
    tamper(engine, second, seg_b, drop=[ids_b[0]], add=[])

    compared: Counter[uuid.UUID] = Counter()
    compare = sweeper.stale_among

    def slow_second_slice(session: Session, project_id: uuid.UUID, *args: Any) -> Any:
        compared[project_id] += 1
        if project_id == uuid.UUID(first.id) and compared[project_id] == 2:
            session.execute(text("SELECT pg_sleep(30)"))  # cancelled by the budget
        return compare(session, project_id, *args)

    monkeypatch.setattr(sweeper, "stale_among", slow_second_slice)
    state = sweeper.SweepState()
    pids = [uuid.UUID(first.id), uuid.UUID(second.id)]
    with caplog.at_level(logging.WARNING, logger="segments_service.sweeper"):
        moved = sweeper.sweep_once(engine, sessions, state, budget=1.5, size=2, projects=pids)
    assert moved == 3
    assert compared[pids[0]] == 3  # the slice after the failed one was compared
    assert members(engine, seg_a) == right_a - {ids_a[2]}
    assert members(engine, seg_b) == right_b
    assert any("exceeded" in r.getMessage() for r in caplog.records)
    # The failed project's pass is not recorded as done: its next pass is full again.
    assert pids[0] not in state.swept and pids[1] in state.swept
    monkeypatch.setattr(sweeper, "stale_among", compare)
    assert sweeper.sweep_once(engine, sessions, state, budget=1.5, size=2, projects=pids[:1]) == 1
    assert members(engine, seg_a) == right_a


def test_projects_are_swept_round_robin(
    target: str,
    sessions: sessionmaker[Session],
    engine: Engine,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A large project's many slices do not hold back a small project's one."""
    large, small = new_project(sessions, "large"), new_project(sessions, "small")
    with (
        SegmentsClient(target, large.secret_key) as a,
        SegmentsClient(target, small.secret_key) as b,
    ):
        populate(a, 9)
        populate(b, 1)
    order: list[uuid.UUID] = []
    reads = sweeper.contact_slice

    def recorded(session: Session, project_id: uuid.UUID, after: Any, size: int) -> Any:
        order.append(project_id)
        return reads(session, project_id, after, size)

    monkeypatch.setattr(sweeper, "contact_slice", recorded)
    pids = [uuid.UUID(large.id), uuid.UUID(small.id)]
    sweeper.sweep_once(engine, sessions, budget=30, size=2, projects=pids)
    assert order == [pids[0], pids[1], pids[0], pids[0], pids[0], pids[0]]


def test_sweeps_log_nothing_at_info(
    engine: Engine,
    sessions: sessionmaker[Session],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    results = iter([0, 0, 4])
    done = threading.Event()
    budgets: list[float] = []

    def fake(_engine: Any, _sessions: Any, _state: Any, *, budget: float) -> int:
        budgets.append(budget)
        moved = next(results, 0)
        if moved:
            done.set()
        return moved

    monkeypatch.setattr(sweeper, "sweep_once", fake)
    running = sweeper.Sweeper(engine, sessions, 0.01, 12.5)
    with caplog.at_level(logging.DEBUG, logger="segments_service.sweeper"):
        running.start()
        try:
            assert done.wait(10)
        finally:
            running.stop()
            running.join(5)
    ours = [r for r in caplog.records if r.name == "segments_service.sweeper"]
    # Routine work, whatever it moved, is not news (the segments_sweep_* series count it).
    assert [r.levelno for r in ours][:3] == [logging.DEBUG, logging.DEBUG, logging.DEBUG]
    assert "re-evaluated 4 contacts" in ours[2].getMessage()
    assert set(budgets) == {12.5}
