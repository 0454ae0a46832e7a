"""The filters package's model and the compiler's parts: a type per kind of filter, JSON
round trips, and the truth of each part of a condition selected per contact (what
explaining a match needs), checked against the reference evaluator."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Select, select, text
from sqlalchemy.orm import Session, sessionmaker

from segments import F
from segments_service import tables
from segments_service.filters import (
    CompileContext,
    DataFilter,
    EmailFilter,
    EventFilter,
    Kind,
    Op,
    SegmentDefinition,
    SegmentFilter,
    SubscribedFilter,
    TimeFilter,
    Window,
    compile_members,
    parse_condition,
)
from tests.conditions import Condition, as_json, cond, flt
from tests.reference import RefContact, RefEvent, RefSegment, evaluate

NOW = datetime(2025, 6, 15, 12, 0, tzinfo=UTC)
SEGMENT = uuid.UUID("00000000-0000-4000-8000-0000000000a1")


@pytest.mark.parametrize(
    ("given", "kind_type", "facts"),
    [
        (F.email.contains("Shop"), EmailFilter, {"value": "Shop"}),
        (F.subscribed.equals(True), SubscribedFilter, {"value": True}),
        (
            F.created_at > "2025-01-02",
            TimeFilter,
            {"kind": Kind.CREATED_AT, "day": date(2025, 1, 2), "timestamp": None},
        ),
        (
            F.updated_at.within(3, "hours"),
            TimeFilter,
            {"kind": Kind.UPDATED_AT, "window": Window(span=timedelta(hours=3))},
        ),
        (
            F.data("a", "b") < "2025-01-02T03:04:05Z",
            DataFilter,
            {"path": ("a", "b"), "timestamp": datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)},
        ),
        (F.data("vip").exists(), DataFilter, {"path": ("vip",), "value": None}),
        (
            F.email_activity("open").triggered_within(2, "days"),
            EventFilter,
            {"events": ("email.opened", "email.open"), "window": Window(span=timedelta(days=2))},
        ),
        # A bare name with an event operator: a spelling of the JSON the builder never writes.
        (
            cond(flt("purchase", "notTriggered")),
            EventFilter,
            {"events": ("purchase",), "window": None},
        ),
        (
            F.segment(str(SEGMENT)).not_member(),
            SegmentFilter,
            {"segment_id": SEGMENT, "events": (), "window": None},
        ),
    ],
)
def test_each_kind_parses_to_its_type_and_round_trips(
    given: Condition, kind_type: type, facts: dict[str, Any]
) -> None:
    raw = as_json(given)
    condition = parse_condition(raw)
    (f,) = condition.iter_filters()
    assert type(f) is kind_type
    assert f.operator is Op(raw["groups"][0]["filters"][0]["operator"])
    for name, expected in facts.items():
        assert getattr(f, name) == expected, name
    assert condition.to_json() == raw
    assert parse_condition(condition.to_json()) == condition


def test_nested_conditions_round_trip() -> None:
    # The nested AND of one filter is a shape the builder never writes (it would join the
    # filter to the group's own): spelled as JSON.
    raw = {
        "logic": "OR",
        "groups": [
            {"filters": [flt("email", "equals", "a@x.io"), flt("data.n", "greaterThan", 2.5)]},
            {
                "filters": [flt("event.signup", "triggered")],
                "conditions": {
                    "logic": "AND",
                    "groups": [{"filters": [flt("createdAt", "olderThan", 9, "minutes")]}],
                },
            },
        ],
    }
    condition = parse_condition(raw)
    assert condition.to_json() == raw
    assert parse_condition(condition.to_json()) == condition


REFERENCED = (F.data("plan") == "pro").to_dict()
# Spelled as JSON: the paths below name its groups as written; the builder would merge the
# nested AND's two one-filter groups, and write `purchase` as event.purchase.
CONDITION = {
    "logic": "OR",
    "groups": [
        {
            "filters": [
                flt("data.age", "greaterThanOrEqual", 30),
                flt("purchase", "triggeredWithin", 7, "days"),
            ]
        },
        {
            "filters": [flt("purchase", "notTriggered")],
            "conditions": {
                "logic": "AND",
                "groups": [
                    {"filters": [flt("email", "contains", "b")]},
                    {"filters": [flt(f"segment.{SEGMENT}", "notMemberOfSegment")]},
                ],
            },
        },
        {"filters": [flt(f"segment.{SEGMENT}", "memberOfSegment")]},
    ],
}


def part_of(path: str) -> dict[str, Any]:
    """The condition (a filter as a one-filter condition, a group as a one-group one) at
    a dot path of CONDITION."""
    steps = path.split(".")
    assert steps[0] == "condition"
    node: Any = CONDITION
    i = 1
    while i < len(steps):
        step = steps[i]
        if step == "condition":  # the referenced segment's condition
            node = REFERENCED
            i += 1
        elif step in ("groups", "filters"):
            node = node[step][int(steps[i + 1])]
            i += 2
        else:
            node = node[step]
            i += 1
    if "logic" in node:
        return dict(node)
    if "field" in node:
        return cond(node)
    return {"logic": "AND", "groups": [node]}  # a group


def statement_text(statement: Select[Any]) -> str:
    return str(statement.compile())


def test_each_part_of_a_condition_says_which_contacts_it_holds_for(
    sessions: sessionmaker[Session],
) -> None:
    contacts: list[tuple[str, dict[str, Any]]] = [
        ("ann@x.io", {"age": 41, "plan": "pro"}),
        ("bob@x.io", {"age": 20, "plan": "free"}),
        ("bea@x.io", {"plan": "pro"}),
        ("cid@x.io", {"age": "30"}),
    ]
    people = [RefContact(uuid.uuid4(), email, True, data, NOW, NOW) for email, data in contacts]
    events = [
        RefEvent(people[0].id, "purchase", NOW - timedelta(days=1)),
        RefEvent(people[3].id, "purchase", NOW - timedelta(days=30)),
    ]
    condition = parse_condition(CONDITION)
    segments = {SEGMENT: SegmentDefinition(SEGMENT, "DYNAMIC", parse_condition(REFERENCED))}
    reference = {SEGMENT: RefSegment("DYNAMIC", REFERENCED)}

    ctx = CompileContext(now=NOW, segments=segments, parts={})
    members = compile_members(condition, ctx, uuid.uuid4())
    plain = compile_members(condition, CompileContext(now=NOW, segments=segments), uuid.uuid4())
    assert ctx.parts is not None
    # Recording the parts leaves the statement as it is.
    assert statement_text(members) == statement_text(plain)
    assert set(ctx.parts) == {
        "condition",
        "condition.groups.0",
        "condition.groups.1",
        "condition.groups.2",
        "condition.groups.1.conditions.groups.0",
        "condition.groups.1.conditions.groups.1",
        "condition.groups.1.conditions.groups.1.filters.0.condition.groups.0",
        "condition.groups.2.filters.0.condition.groups.0",
        "condition.groups.0.filters.0",
        "condition.groups.0.filters.1",
        "condition.groups.1.filters.0",
        "condition.groups.1.conditions",
        "condition.groups.1.conditions.groups.0.filters.0",
        "condition.groups.1.conditions.groups.1.filters.0",
        "condition.groups.1.conditions.groups.1.filters.0.condition",
        "condition.groups.1.conditions.groups.1.filters.0.condition.groups.0.filters.0",
        "condition.groups.2.filters.0",
        "condition.groups.2.filters.0.condition",
        "condition.groups.2.filters.0.condition.groups.0.filters.0",
    }

    with sessions() as session:
        try:
            project = _project_with(session, people, events)
            ctx = CompileContext(now=NOW, segments=segments, parts={})
            members = compile_members(condition, ctx, project)
            assert ctx.parts is not None
            paths = sorted(ctx.parts)
            c = tables.contacts.c
            rows = session.execute(
                select(
                    c.email,
                    c.id.in_(members),
                    *(ctx.parts[p].truth() for p in paths),
                ).where(c.project_id == project)
            ).all()
        finally:
            session.rollback()

    by_email = {p.email: p for p in people}
    assert len(rows) == len(people)
    for email, member, *truths in rows:
        person = by_email[email]
        assert member is evaluate(CONDITION, person, events, NOW, reference), email
        for path, truth in zip(paths, truths, strict=True):
            expected = evaluate(part_of(path), person, events, NOW, reference)
            assert truth is expected, (email, path)
    # The parts tell contacts apart: not every part holds for everyone or no one.
    assert any(len({row[i] for row in rows}) == 2 for i in range(2, len(rows[0])))


def _project_with(session: Session, people: list[RefContact], events: list[RefEvent]) -> uuid.UUID:
    project: uuid.UUID = session.execute(
        text("INSERT INTO projects (name) VALUES ('parts') RETURNING id")
    ).scalar_one()
    for p in people:
        session.execute(
            text(
                "INSERT INTO contacts (project_id, id, email, data, created_at, updated_at) "
                "VALUES (:p, :id, :email, CAST(:data AS jsonb), :at, :at)"
            ),
            {"p": project, "id": p.id, "email": p.email, "data": json.dumps(p.data), "at": NOW},
        )
    for e in events:
        session.execute(
            text(
                "INSERT INTO events (project_id, contact_id, name, occurred_at) "
                "VALUES (:p, :c, :n, :at)"
            ),
            {"p": project, "c": e.contact_id, "n": e.name, "at": e.occurred_at},
        )
    return project
