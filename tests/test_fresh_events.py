"""Events stored at their batch's start settle some conditions without evaluating them
(membership.Dynamic.certain): what they settle, that batches still agree with evaluating
every contact, and that settled contacts are left out of the evaluation."""

from __future__ import annotations

import random
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from google.protobuf import struct_pb2, timestamp_pb2
from sqlalchemy import Engine, event, select
from sqlalchemy.orm import Session, sessionmaker

from segments import Expression, F, any_of
from segments_api.v1 import contacts_pb2, events_pb2, resources_pb2, segments_pb2
from segments_service import events, membership, tables
from tests.conditions import as_proto, loaded_segment
from tests.conftest import Project, Stubs

LOGIN, BUY, REFUND, VISIT = "login", "purchase", "refund", "visit"


def settles(
    condition: Expression, references: dict[uuid.UUID, Expression | None] | None = None
) -> tuple[set[str], set[str]]:
    certain = loaded_segment(condition, references).certain
    return set(certain.true), set(certain.false)


def test_what_a_fresh_event_settles() -> None:
    login = F.event(LOGIN)
    assert settles(login.triggered()) == ({LOGIN}, set())
    assert settles(login.triggered_within(7, "days")) == ({LOGIN}, set())
    assert settles(login.triggered_within(2, "months")) == ({LOGIN}, set())
    assert settles(login.triggered(count=F.count >= 1)) == ({LOGIN}, set())
    assert settles(login.triggered(count=F.count > 0)) == ({LOGIN}, set())
    assert settles(login.not_triggered()) == (set(), {LOGIN})
    assert settles(login.not_triggered_within(7, "days")) == (set(), {LOGIN})
    assert settles(login.triggered_older_than(7, "days")) == (set(), {LOGIN})
    # What one more occurrence does not decide on its own: more of them, their data, a
    # window shorter than a transaction may be old.
    assert settles(login.triggered(count=F.count >= 2)) == (set(), set())
    assert settles(login.triggered(count=F.count < 3)) == (set(), set())
    assert settles(login.triggered(where=[F.data("device") == "ios"])) == (set(), set())
    assert settles(F.event(BUY).triggered(aggregate=F.sum("amount") >= 100)) == (set(), set())
    assert settles(login.triggered_within(30, "minutes")) == (set(), set())
    assert settles(login.not_triggered_within(30, "minutes")) == (set(), set())
    # AND needs every part settled true, and one settled false fails it; OR the reverse.
    pro = F.data("plan") == "pro"
    assert settles(login.triggered() & pro) == (set(), set())
    assert settles(login.triggered() & F.event(REFUND).not_triggered()) == (set(), {REFUND})
    assert settles(login.triggered() & F.event(VISIT).triggered()) == (set(), set())
    either = any_of(login.triggered_within(7, "days"), F.event(VISIT).triggered())
    assert settles(either) == ({LOGIN, VISIT}, set())
    assert settles(any_of(login.not_triggered(), F.event(VISIT).not_triggered())) == (set(), set())
    assert settles(any_of(login.not_triggered(), pro)) == (set(), set())
    assert settles(any_of(login.not_triggered(), login.not_triggered_within(7, "days"))) == (
        set(),
        {LOGIN},
    )
    # Through references: a member of a dynamic segment as its condition, not a member
    # reversed; a list does not move with events.
    ref, static = uuid.uuid4(), uuid.uuid4()
    references: dict[uuid.UUID, Expression | None] = {ref: login.triggered(), static: None}
    assert settles(F.segment(str(ref)).member(), references) == ({LOGIN}, set())
    assert settles(F.segment(str(ref)).not_member(), references) == (set(), {LOGIN})
    assert settles(F.segment(str(static)).member(), references) == (set(), set())


def test_what_a_contact_without_events_is() -> None:
    """A contact a batch created, with none of the events a condition reads: settled where
    occurrences, lists, its empty data and its subscription decide, open where its email or
    timestamps could."""
    login = F.event(LOGIN)

    def blank(
        condition: Expression, references: dict[uuid.UUID, Expression | None] | None = None
    ) -> bool | None:
        return loaded_segment(condition, references).blank

    assert blank(login.triggered()) is False
    assert blank(login.triggered_within(7, "days", count=F.count >= 2)) is False
    assert blank(login.triggered_within(7, "days", count=F.count < 2)) is True
    assert blank(login.triggered(count=F.count == 0)) is True
    assert blank(F.event(BUY).triggered(aggregate=F.sum("amount") < 100)) is False
    assert blank(login.triggered_older_than(7, "days")) is False
    assert blank(login.not_triggered()) is True
    assert blank(login.not_triggered_within(7, "days", where=[F.data("ios") == True])) is True  # noqa: E712
    # No data: a missing key fails every test, negations too, but notExists.
    pro = F.data("plan") == "pro"
    assert blank(pro) is False
    assert blank(F.data("plan") != "pro") is False
    assert blank(F.data("plan").not_in(["pro"])) is False
    assert blank(F.data("plan").not_contains("p")) is False
    assert blank(F.data("plan").exists()) is False
    assert blank(F.data("plan").not_exists()) is True
    # Subscribed, as a batch of events creates its contacts.
    assert blank(F.subscribed == True) is True  # noqa: E712
    assert blank(F.subscribed != True) is False  # noqa: E712
    assert blank(F.subscribed == False) is False  # noqa: E712
    # Its email and its timestamps are its own.
    gmail = F.email.contains("@gmail.")
    assert blank(gmail) is None
    assert blank(F.created_at.within(7, "days")) is None
    assert blank(pro & login.triggered()) is False
    assert blank(pro & login.not_triggered()) is False
    assert blank(gmail & login.not_triggered()) is None
    assert blank(any_of(pro, login.not_triggered())) is True
    assert blank(any_of(gmail, login.triggered())) is None
    assert blank(any_of(pro, login.triggered())) is False
    assert blank(any_of(login.triggered(), F.event(VISIT).triggered())) is False
    ref, static = uuid.uuid4(), uuid.uuid4()
    references: dict[uuid.UUID, Expression | None] = {ref: login.triggered(), static: None}
    assert blank(F.segment(str(ref)).member(), references) is False
    assert blank(F.segment(str(ref)).not_member(), references) is True
    assert blank(F.segment(str(static)).member(), references) is False
    assert blank(F.segment(str(static)).not_member() & gmail, references) is None
    assert blank(F.segment(str(static)).not_member() & F.data("x").not_exists(), references)


def create(stubs: Stubs, project: Project, name: str, condition: Expression) -> str:
    made = stubs.segments.CreateSegment(
        segments_pb2.CreateSegmentRequest(
            name=name, condition=as_proto(condition), track_membership=True
        ),
        metadata=project.auth,
    )
    return str(made.id)


def stored_and_evaluated(
    sessions: sessionmaker[Session], project: Project
) -> dict[str, tuple[set[uuid.UUID], set[uuid.UUID]]]:
    """Per segment: its stored members, and its condition evaluated over every contact."""
    project_id = uuid.UUID(project.id)
    m = tables.segment_members.c
    out = {}
    with sessions.begin() as session:
        now = membership.db_now(session)
        for seg in membership.dynamic_segments(session, project_id):
            stored = set(
                session.execute(
                    select(m.contact_id).where(m.project_id == project_id, m.segment_id == seg.id)
                ).scalars()
            )
            evaluated = set(session.execute(seg.members(project_id, now)).scalars())
            out[seg.name] = (stored, evaluated)
    return out


def test_batches_agree_with_evaluating_every_contact(
    stubs: Stubs, project: Project, sessions: sessionmaker[Session]
) -> None:
    """Segments a fresh event settles, beside ones it does not, through references and
    negations; batches of fresh and backdated events, for known and new contacts. After
    each batch every segment's stored members are its condition's."""
    login, buy, refund = F.event(LOGIN), F.event(BUY), F.event(REFUND)
    pro = F.data("plan") == "pro"
    buyers = create(stubs, project, "Buyers", buy.triggered_within(7, "days"))
    conditions: dict[str, Expression] = {
        "Active": login.triggered_within(7, "days"),
        "Ever logged in": login.triggered(),
        "Pro and active": pro & login.triggered_within(7, "days"),
        "Logged in or bought": any_of(login.triggered_within(1, "days"), buy.triggered()),
        "Frequent": login.triggered_within(30, "days", count=F.count >= 2),
        "Lapsed": login.triggered_older_than(7, "days"),
        "Never refunded": refund.not_triggered(),
        "Buyer without refund": buy.triggered() & refund.not_triggered_within(30, "days"),
        "Not a recent buyer": F.segment(buyers).not_member(),
        "Recent buyer, logged in": F.segment(buyers).member() & login.triggered(),
        "Quiet": login.not_triggered_within(7, "days") & buy.not_triggered_within(7, "days"),
        "Big spender": buy.triggered(aggregate=F.sum("amount") >= 100),
        "Few logins": login.triggered_within(30, "days", count=F.count < 2),
        "Pro without refund": pro & refund.not_triggered(),
        "Pro or never bought": any_of(pro, buy.not_triggered()),
        # What a new contact's empty data and subscription decide.
        "Not pro": F.data("plan") != "pro",
        "No plan": F.data("plan").not_exists(),
        "No plan, subscribed": F.data("plan").not_exists() & (F.subscribed == True),  # noqa: E712
        "Unsubscribed": F.subscribed == False,  # noqa: E712
        "Outside these plans": F.data("plan").not_in(["pro", "team"]),
        "Gmail, never bought": F.email.contains("@gmail.") & buy.not_triggered(),
        "New this week": F.created_at.within(7, "days"),
    }
    rng = random.Random(7)
    emails = [f"c{i}@x.com" for i in range(12)]
    # Known contacts with data, and one unsubscribed: members of what a new contact is not.
    for i, (plan, subscribed) in enumerate([("pro", True), ("team", True), ("free", False)]):
        data = struct_pb2.Struct()
        data.update({"plan": plan})
        stubs.contacts.UpsertContact(
            contacts_pb2.UpsertContactRequest(email=emails[i], data=data, subscribed=subscribed),
            metadata=project.auth,
        )
    for name, condition in conditions.items():
        create(stubs, project, name, condition)
    for batch in range(10):
        items = []
        for _ in range(rng.randint(3, 12)):
            email = (
                rng.choice(emails) if rng.random() < 0.85 else f"new{batch}-{rng.random()}@x.com"
            )
            item = events_pb2.IngestedEvent(email=email, event=rng.choice([LOGIN, BUY, REFUND]))
            if item.event == BUY:
                item.data.update({"amount": rng.choice([20, 60, 120])})
            if rng.random() < 0.3:
                ago = timestamp_pb2.Timestamp()
                ago.FromDatetime(datetime.now(UTC) - timedelta(days=rng.choice([2, 10, 40])))
                item.occurred_at.CopyFrom(ago)
            items.append(item)
        stubs.events.IngestEvents(
            events_pb2.IngestEventsRequest(events=items), metadata=project.auth
        )
        for name, (stored, evaluated) in stored_and_evaluated(sessions, project).items():
            assert stored == evaluated, (batch, name)
    # The batches moved the segments a fresh event settles, both ways.
    found = stored_and_evaluated(sessions, project)
    assert found["Active"][0] and found["Never refunded"][0]
    assert len(found["Never refunded"][0]) < 12
    # New contacts entered what their empty data and subscription make them members of.
    new = len(found["No plan"][0]) - 9
    assert new > 0
    assert len(found["No plan, subscribed"][0]) == len(found["No plan"][0])
    assert len(found["Not pro"][0]) == len(found["Outside these plans"][0]) + 1 == 2
    assert len(found["Unsubscribed"][0]) == 1
    assert len(found["New this week"][0]) == 12 + new


def test_settled_contacts_are_not_evaluated(
    stubs: Stubs, project: Project, engine: Engine, sessions: sessionmaker[Session]
) -> None:
    """The batch's statement is given a fresh login's contact as a member of "Active" and
    leaves it out of the contacts it evaluates, as it does a fresh refund's from "Never
    refunded"; a backdated login is evaluated."""
    active = create(stubs, project, "Active", F.event(LOGIN).triggered_within(7, "days"))
    create(stubs, project, "Never refunded", F.event(REFUND).not_triggered())
    project_id = uuid.UUID(project.id)
    emails = ["fresh@x.com", "old@x.com", "refund@x.com"]
    # Known contacts: a new one meets every segment.
    stubs.events.IngestEvents(
        events_pb2.IngestEventsRequest(
            events=[events_pb2.IngestedEvent(email=e, event=VISIT) for e in emails]
        ),
        metadata=project.auth,
    )
    seen: list[dict[str, Any]] = []

    def capture(
        _conn: Any, _cursor: Any, statement: str, parameters: Any, _ctx: Any, _many: bool
    ) -> None:
        if "segment_members" in statement and isinstance(parameters, dict):
            seen.append(dict(parameters))

    event.listen(engine, "before_cursor_execute", capture)
    try:
        with sessions.begin() as session:
            events.ingest(
                session,
                project_id,
                [
                    events.IngestItem("fresh@x.com", LOGIN, None, {}),
                    events.IngestItem(
                        "old@x.com", LOGIN, datetime.now(UTC) - timedelta(days=2), {}
                    ),
                    events.IngestItem("refund@x.com", REFUND, None, {}),
                ],
            )
    finally:
        event.remove(engine, "before_cursor_execute", capture)
    with sessions.begin() as session:
        ids = dict(
            session.execute(
                select(tables.contacts.c.email, tables.contacts.c.id).where(
                    tables.contacts.c.project_id == project_id
                )
            ).all()
        )
    (params,) = [p for p in seen if any(k.startswith("certain_") for k in p)]
    given = {i for k, v in params.items() if k.startswith("certain_") for i in v}
    evaluated = {i for k, v in params.items() if k.startswith("scope_") for i in v}
    assert given == {ids["fresh@x.com"]}
    assert ids["fresh@x.com"] not in evaluated and ids["refund@x.com"] not in evaluated
    assert ids["old@x.com"] in evaluated
    got = stubs.segments.GetSegment(
        segments_pb2.GetSegmentRequest(id=active), metadata=project.auth
    )
    assert isinstance(got, resources_pb2.Segment) and got.member_count == 2
    assert stored_and_evaluated(sessions, project)["Never refunded"][0] == {
        ids["fresh@x.com"],
        ids["old@x.com"],
    }


def test_a_batch_no_segment_can_change_writes_no_membership(
    stubs: Stubs, project: Project, engine: Engine, sessions: sessionmaker[Session]
) -> None:
    """Events of a name no segment reads, for contacts the batch creates, where each
    segment's condition fails for a contact without data or events: no membership
    statement runs. A segment their empty data makes them members of brings it back."""
    create(stubs, project, "Pro", F.data("plan") == "pro")
    create(stubs, project, "Active", F.event(LOGIN).triggered_within(7, "days"))
    create(
        stubs,
        project,
        "Never refunded, pro",
        F.event(REFUND).not_triggered() & (F.data("plan") == "pro"),
    )
    project_id = uuid.UUID(project.id)
    statements: list[str] = []

    def capture(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        statements.append(statement)

    def visits(*emails: str) -> None:
        statements.clear()
        event.listen(engine, "before_cursor_execute", capture)
        try:
            with sessions.begin() as session:
                events.ingest(
                    session, project_id, [events.IngestItem(e, VISIT, None, {}) for e in emails]
                )
        finally:
            event.remove(engine, "before_cursor_execute", capture)

    visits("a@x.com", "b@x.com")
    assert not [s for s in statements if "segment_members" in s]
    no_plan = create(stubs, project, "No plan", F.data("plan").not_exists())
    visits("c@x.com")
    assert [s for s in statements if "INSERT INTO segment_members" in s]
    got = stubs.segments.GetSegment(
        segments_pb2.GetSegmentRequest(id=no_plan), metadata=project.auth
    )
    assert got.member_count == 3
    for name, (stored, evaluated) in stored_and_evaluated(sessions, project).items():
        assert stored == evaluated, name


def test_what_is_settled_for_a_new_contact_is_what_evaluating_it_answers(
    project: Project, sessions: sessionmaker[Session]
) -> None:
    """Every test of contact data and subscription Dynamic.blank settles, against the
    compiled condition evaluated on a contact a batch of events created."""
    project_id = uuid.UUID(project.id)
    with sessions.begin() as session:
        events.ingest(session, project_id, [events.IngestItem("new@x.com", VISIT, None, {})])
    plan, at = F.data("plan"), F.data("trialEndsAt")
    filters = [
        plan == "pro",
        plan != "pro",
        plan.contains("p"),
        plan.not_contains("p"),
        plan.starts_with("p"),
        plan.ends_with("o"),
        plan.in_(["pro", "team"]),
        plan.not_in(["pro", "team"]),
        plan.exists(),
        plan.not_exists(),
        plan.array_contains("pro"),
        F.data("seats") > 1,
        F.data("seats") < 1,
        F.data("seats") >= 0,
        F.data("seats") <= 0,
        F.data("seats").between(0, 10),
        at.within(7, "days"),
        at.older_than(7, "days"),
        at.within_next(7, "days"),
        F.data("a.b") != 1,
        F.subscribed == True,  # noqa: E712
        F.subscribed == False,  # noqa: E712
        F.subscribed != True,  # noqa: E712
        F.subscribed != False,  # noqa: E712
    ]
    with sessions.begin() as session:
        now = membership.db_now(session)
        for f in filters:
            seg = loaded_segment(f)
            assert seg.blank is not None, f.to_dict()
            members = set(session.execute(seg.members(project_id, now)).scalars())
            assert seg.blank == bool(members), f.to_dict()
