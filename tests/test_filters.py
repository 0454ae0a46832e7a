"""Filter conditions at the unit level: validation errors name the exact dot path, and
targeted SQL checks for the cases the property test (test_filter_properties.py) found."""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select, text
from sqlalchemy.orm import Session, sessionmaker

from segments import Expression, F, all_of, any_of
from segments.conditions import Unit
from segments_service import tables
from segments_service.errors import ValidationError
from segments_service.filters import (
    MAX_DEPTH,
    MAX_FILTERS,
    MAX_STRING_VALUE,
    CompileContext,
    Kind,
    Window,
    compile_count,
    compile_members,
    parse_condition,
    relative_values,
)
from tests.conditions import cond, flt
from tests.reference import RefContact, RefEvent, evaluate

F0 = "condition.groups.0.filters.0"


def violations(raw: Any) -> list[tuple[str, str]]:
    """(field, code) of every violation `parse_condition` reports for `raw`."""
    with pytest.raises(ValidationError) as caught:
        parse_condition(raw)
    return [(v.field, v.code) for v in caught.value.violations]


def fields(raw: Any) -> list[str]:
    return [f for f, _code in violations(raw)]


def nested(depth: int) -> dict[str, Any]:
    """A condition `depth` levels deep, one filter at the bottom."""
    inner: dict[str, Any] = cond(flt("data.level", "exists"))
    for _ in range(depth - 1):
        inner = {"logic": "OR", "groups": [{"conditions": inner}]}
    return inner


# --- validation: every kind of bad input, by dot path ------------------------------------


def test_unknown_operator_names_its_filter() -> None:
    raw = {
        "logic": "AND",
        "groups": [
            {"filters": [flt("email", "contains", "@")]},
            {"filters": [flt("data.plan", "beginsWith", "p"), flt("email", "contains", "@")]},
        ],
    }
    assert violations(raw) == [("condition.groups.1.filters.0.operator", "invalid_enum")]


def test_missing_operator_and_field() -> None:
    assert fields(cond({"field": "email", "value": "a"})) == [f"{F0}.operator"]
    assert fields(cond({"field": "email", "operator": "", "value": "a"})) == [f"{F0}.operator"]
    assert fields(cond({"operator": "equals", "value": "a"})) == [f"{F0}.field"]
    assert fields(cond({"field": 5, "operator": "equals", "value": "a"})) == [f"{F0}.field"]
    assert fields(cond("email equals a")) == [F0]  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "bad",
    [
        flt("subscribed", "equals", "true"),
        flt("subscribed", "equals", 1),
        flt("subscribed", "notEquals", "false"),
        flt("email", "equals", 5),
        flt("email", "contains", True),
        flt("data.note", "contains", 5),
        flt("data.note", "notContains", False),
        flt("data.age", "greaterThan", True),
        flt("data.age", "lessThan", "five"),
        flt("data.age", "greaterThanOrEqual", "5"),  # a numeric string is not a number
        flt("createdAt", "equals", "yesterday"),
        flt("createdAt", "greaterThan", True),
        flt("updatedAt", "lessThan", "2025-02-30"),
        flt("createdAt", "equals", "2025-06-15\n"),  # a trailing newline is not RFC 3339
        flt("createdAt", "equals", "2025-06-15T12:00:00.1234567890Z"),  # 10 fraction digits
        flt("data.age", "equals", {"a": 1}),
        flt("data.age", "equals", [1]),
        flt("createdAt", "within", "7", "days"),
        flt("createdAt", "within", 0, "days"),
        flt("createdAt", "olderThan", -1, "hours"),
        flt("createdAt", "within", True, "days"),
        flt("event.purchase", "triggeredWithin", "7", "days"),
        flt("event.purchase", "notTriggeredWithin", 0, "minutes"),
    ],
)
def test_wrong_value_type_names_the_value(bad: dict[str, Any]) -> None:
    assert fields(cond(bad)) == [f"{F0}.value"]


@pytest.mark.parametrize(
    "bad",
    [
        flt("createdAt", "within", 7),
        flt("data.signup", "olderThan", 7),
        flt("event.purchase", "triggeredWithin", 7),
        flt("purchase", "triggeredOlderThan", 7),
        flt("email.opened", "notTriggeredWithin", 7),
        flt("createdAt", "within", 7, "fortnights"),  # not a unit
        flt("createdAt", "within", 7, "Days"),
        flt("data.plan", "equals", "premium", "days"),  # a unit where none belongs
        flt("event.purchase", "triggered", None, "days"),
        flt("data.plan", "exists", None, "days"),
    ],
)
def test_unit_problems_name_the_unit(bad: dict[str, Any]) -> None:
    assert fields(cond(bad)) == [f"{F0}.unit"]


@pytest.mark.parametrize(
    "bad",
    [
        flt("data.plan", "exists", True),
        flt("data.plan", "notExists", "x"),
        flt("event.purchase", "triggered", 1),
        flt("email.opened", "notTriggered", True),
        flt(f"segment.{uuid.uuid4()}", "memberOfSegment", True),
        flt(f"segment.{uuid.uuid4()}", "notMemberOfSegment", "x"),
    ],
)
def test_a_value_where_none_belongs(bad: dict[str, Any]) -> None:
    assert violations(cond(bad)) == [(f"{F0}.value", "unexpected")]


@pytest.mark.parametrize(
    "bad",
    [
        flt("data.plan", "equals"),
        flt("email", "contains"),
        flt("createdAt", "greaterThan"),
        flt("createdAt", "within", None, "days"),
        flt("event.purchase", "triggeredWithin", None, "days"),
    ],
)
def test_a_missing_value(bad: dict[str, Any]) -> None:
    assert fields(cond(bad)) == [f"{F0}.value"]


@pytest.mark.parametrize(
    "bad",
    [
        flt("foo", "equals", "x"),
        flt("Email", "equals", "x"),
        flt("created_at", "greaterThan", "2025-01-01"),
        flt("data", "exists"),
        flt("data.", "exists"),
        flt("data.a..b", "exists"),
        flt("data.a.", "exists"),
        flt("event.", "triggered"),
        flt("email.read", "triggered"),  # unknown email activity
        flt("email.", "triggered"),
        flt("email.Opened", "triggered"),
        flt("segment.not-a-uuid", "memberOfSegment"),
        flt("segment.", "memberOfSegment"),
        flt("purchase", "equals", "x"),  # a bare name is an event only for event operators
    ],
)
def test_unknown_fields_name_the_field(bad: dict[str, Any]) -> None:
    assert fields(cond(bad)) == [f"{F0}.field"]


@pytest.mark.parametrize(
    "bad",
    [
        flt("email", "within", 1, "days"),
        flt("email", "exists"),
        flt("subscribed", "contains", "t"),
        flt("createdAt", "contains", "2025"),
        flt("createdAt", "exists"),
        flt("data.plan", "triggered"),
        flt("event.purchase", "equals", "x"),
        flt("email.opened", "exists"),
        flt(f"segment.{uuid.uuid4()}", "equals", "x"),
        flt("data.plan", "memberOfSegment"),
    ],
)
def test_operator_that_does_not_apply_names_the_operator(bad: dict[str, Any]) -> None:
    assert violations(cond(bad)) == [(f"{F0}.operator", "invalid_operator")]


@pytest.mark.parametrize("number", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize(
    "make",
    [
        lambda n: flt("data.age", "equals", n),
        lambda n: flt("data.age", "greaterThan", n),
        lambda n: flt("createdAt", "equals", n),
        lambda n: flt("createdAt", "within", n, "days"),
        lambda n: flt("event.purchase", "triggeredWithin", n, "days"),
    ],
)
def test_non_finite_numbers(number: float, make: Any) -> None:
    assert violations(cond(make(number))) == [(f"{F0}.value", "invalid_number")]


def test_string_value_limit() -> None:
    parse_condition((F.data("note") == "x" * MAX_STRING_VALUE).to_dict())
    parse_condition(F.data("note").contains("é" * MAX_STRING_VALUE).to_dict())
    assert violations(cond(flt("data.note", "equals", "x" * (MAX_STRING_VALUE + 1)))) == [
        (f"{F0}.value", "too_long")
    ]
    assert violations(cond(flt("email", "contains", "é" * (MAX_STRING_VALUE + 1)))) == [
        (f"{F0}.value", "too_long")
    ]


def test_depth_limit() -> None:
    parse_condition(nested(MAX_DEPTH))
    path = "condition" + ".groups.0.conditions" * MAX_DEPTH
    assert violations(nested(MAX_DEPTH + 1)) == [(path, "too_deep")]


def test_filter_count_limit() -> None:
    at_limit = [F.data("n") == i for i in range(MAX_FILTERS)]
    parse_condition(any_of(all_of(*at_limit[:120]), all_of(*at_limit[120:])).to_dict())
    many = [flt("data.n", "equals", i) for i in range(MAX_FILTERS)]
    over = {
        "logic": "OR",
        "groups": [
            {"filters": many[:120]},
            {"conditions": cond(*many[120:], flt("data.n", "equals", -1))},
        ],
    }
    # Filter 201 is the 81st filter of the nested group.
    assert violations(over) == [("condition.groups.1.conditions.groups.0.filters.80", "too_many")]


@pytest.mark.parametrize(
    ("raw", "path"),
    [
        (
            {"logic": "XOR", "groups": [{"filters": [flt("email", "contains", "@")]}]},
            "condition.logic",
        ),
        ({"groups": [{"filters": [flt("email", "contains", "@")]}]}, "condition.logic"),
        (
            {"logic": "and", "groups": [{"filters": [flt("email", "contains", "@")]}]},
            "condition.logic",
        ),
        ({"logic": "AND"}, "condition.groups"),
        ({"logic": "AND", "groups": []}, "condition.groups"),
        ({"logic": "AND", "groups": {"filters": []}}, "condition.groups"),
        ({"logic": "AND", "groups": [{}]}, "condition.groups.0"),
        ({"logic": "AND", "groups": [{"filters": []}]}, "condition.groups.0"),
        ({"logic": "AND", "groups": ["x"]}, "condition.groups.0"),
        (
            {"logic": "AND", "groups": [{"filters": {"field": "email"}}]},
            "condition.groups.0.filters",
        ),
        ({"logic": "AND", "groups": [{"conditions": "x"}]}, "condition.groups.0.conditions"),
        ([], "condition"),
        (None, "condition"),
    ],
)
def test_structure_errors(raw: Any, path: str) -> None:
    assert fields(raw) == [path]


def test_errors_deep_inside_name_the_whole_path() -> None:
    raw = {
        "logic": "AND",
        "groups": [
            {
                "filters": [flt("email", "contains", "@")],
                "conditions": {
                    "logic": "OR",
                    "groups": [
                        {"filters": [flt("data.a", "exists")]},
                        {"filters": [flt("data.a", "exists"), flt("data.b", "within", 3)]},
                    ],
                },
            },
        ],
    }
    assert fields(raw) == ["condition.groups.0.conditions.groups.1.filters.1.unit"]


def test_every_problem_is_reported_at_once() -> None:
    raw = {
        "logic": "AND",
        "groups": [
            {"filters": [flt("subscribed", "equals", "true"), flt("nope", "equals", 1)]},
            {"filters": [flt("email", "beginsWith", "a")]},
        ],
    }
    assert fields(raw) == [
        "condition.groups.0.filters.0.value",
        "condition.groups.0.filters.1.field",
        "condition.groups.1.filters.0.operator",
    ]


def test_error_paths_follow_the_given_base() -> None:
    with pytest.raises(ValidationError) as caught:
        parse_condition(cond(flt("email", "nope", "a")), "segments.3.condition")
    assert [v.field for v in caught.value.violations] == [
        "segments.3.condition.groups.0.filters.0.operator"
    ]


# --- validation: inputs that used to escape as exceptions other than ValidationError ------


@pytest.mark.parametrize(
    "bad",
    [
        # Window spans that overflow timedelta (were OverflowError, a 500).
        flt("createdAt", "within", 1e300, "days"),
        flt("createdAt", "within", 10**30, "minutes"),
        flt("event.purchase", "triggeredWithin", 10**400, "hours"),
        # Just over the 36525-day limit.
        flt("createdAt", "within", 36526, "days"),
        flt("createdAt", "within", 36525 * 24 + 1, "hours"),
        # Offsets moving a timestamp outside years 1..9999 (were OverflowError).
        flt("createdAt", "equals", "9999-12-31T23:59:00-15:00"),
        flt("data.signup", "greaterThan", "0001-01-01T00:00:00+15:00"),
        # Epoch milliseconds out of range.
        flt("createdAt", "equals", 10**30),
        flt("createdAt", "greaterThan", -1e300),
    ],
)
def test_out_of_range_values_are_validation_errors(bad: dict[str, Any]) -> None:
    assert fields(cond(bad)) == [f"{F0}.value"]


def test_window_limit_is_inclusive() -> None:
    windows: list[tuple[int, Unit]] = [(36525, "days"), (36525 * 24 * 60, "minutes")]
    for value, unit in windows:
        parsed = next(parse_condition(F.created_at.within(value, unit).to_dict()).iter_filters())
        assert parsed.window == Window(span=timedelta(days=36525))
        with pytest.raises(ValidationError) as caught:
            parse_condition(cond(flt("createdAt", "within", value + 1, unit)))
        assert [(v.field, v.code) for v in caught.value.violations] == [
            ("condition.groups.0.filters.0.value", "too_big")
        ]


def test_epoch_milliseconds_are_exact() -> None:
    # value / 1000 as a float lost microseconds after about year 2242. JSON numbers as the
    # parser reads them: the builder takes whole milliseconds only, and the last is fractional.
    for millis, expected in [
        (253402300799999, datetime(9999, 12, 31, 23, 59, 59, 999000, tzinfo=UTC)),
        (10413792000001, datetime(2300, 1, 1, 0, 0, 0, 1000, tzinfo=UTC)),
        (-1, datetime(1969, 12, 31, 23, 59, 59, 999000, tzinfo=UTC)),
        (1749988800123.456, datetime(2025, 6, 15, 12, 0, 0, 123456, tzinfo=UTC)),
    ]:
        parsed = next(parse_condition(cond(flt("createdAt", "equals", millis))).iter_filters())
        assert parsed.timestamp == expected, millis


def test_value_timestamps() -> None:
    def parsed(value: str) -> Any:
        return next(parse_condition((F.created_at == value).to_dict()).iter_filters())

    assert parsed("2025-06-15T12:00:00.123456789Z").timestamp == datetime(
        2025, 6, 15, 12, 0, 0, 123456, tzinfo=UTC
    )
    assert parsed("2025-06-15T14:00:00+02:00").timestamp == datetime(2025, 6, 15, 12, tzinfo=UTC)
    assert parsed("2025-06-15T12:00:00").timestamp == datetime(2025, 6, 15, 12, tzinfo=UTC)
    assert parsed("2025-06-15").day is not None and parsed("2025-06-15").timestamp is None


def test_bare_event_names_and_aliases() -> None:
    # The bare name is a spelling of the JSON the builder never writes.
    f = next(parse_condition(cond(flt("purchase", "triggeredWithin", 7, "days"))).iter_filters())
    assert (f.kind, f.events) == (Kind.EVENT, ("purchase",))
    f = next(parse_condition(F.email_activity("click").triggered().to_dict()).iter_filters())
    assert set(f.events) == {"email.clicked", "email.click"}


# --- SQL: targeted cases -----------------------------------------------------------------

NOW = datetime(2025, 6, 15, 12, 0, tzinfo=UTC)


def _select(
    sessions: sessionmaker[Session],
    data: dict[str, dict[str, Any]],
    condition: Expression,
    created: dict[str, datetime] | None = None,
) -> set[str]:
    """Emails the compiled `condition` selects among contacts {email: data}; checked against
    the reference evaluator too."""
    created = created or {}
    with sessions() as session:
        try:
            return _select_in(session, data, condition.to_dict(), created)
        finally:
            session.rollback()


def _select_in(
    session: Session,
    data: dict[str, dict[str, Any]],
    raw: dict[str, Any],
    created: dict[str, datetime],
) -> set[str]:
    people = [
        RefContact(uuid.uuid4(), email, True, d, created.get(email, NOW), NOW)
        for email, d in data.items()
    ]
    project = _project_with(session, people)
    c = tables.contacts.c
    members = compile_members(parse_condition(raw), CompileContext(now=NOW), project)
    found = set(
        session.execute(select(c.email).where(c.project_id == project, c.id.in_(members))).scalars()
    )
    expected = {p.email for p in people if evaluate(raw, p, [], NOW, {})}
    assert found == expected
    return found


def _project_with(
    session: Session, people: list[RefContact], events: Sequence[RefEvent] = ()
) -> uuid.UUID:
    """A new project holding these contacts and events; answers its id."""
    project: uuid.UUID = session.execute(
        text("INSERT INTO projects (name) VALUES ('filters') RETURNING id")
    ).scalar_one()
    for p in people:
        session.execute(
            text(
                "INSERT INTO contacts (project_id, id, email, data, created_at, updated_at) "
                "VALUES (:p, :id, :email, CAST(:data AS jsonb), :created, :updated)"
            ),
            {
                "p": project,
                "id": p.id,
                "email": p.email,
                "data": json.dumps(p.data),
                "created": p.created_at,
                "updated": p.updated_at,
            },
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


def test_data_paths_walk_objects_not_arrays(sessions: sessionmaker[Session]) -> None:
    # PostgreSQL's #> reads "0" as an array index; data.<a>.<b> names object keys only.
    data: dict[str, dict[str, Any]] = {
        "array@x.com": {"tags": ["vip", "x"]},
        "object@x.com": {"tags": {"0": "vip"}},
        "nested@x.com": {"a": [{"b": "vip"}]},
        "deep@x.com": {"a": {"0": {"b": "vip"}}},
        "neg@x.com": {"tags": ["x", "vip"]},
    }
    assert _select(sessions, data, F.data("tags.0").exists()) == {"object@x.com"}
    assert _select(sessions, data, F.data("tags.0").not_exists()) == {
        "array@x.com",
        "nested@x.com",
        "deep@x.com",
        "neg@x.com",
    }
    assert _select(sessions, data, F.data("tags.0").contains("VIP")) == {"object@x.com"}
    assert _select(sessions, data, F.data("tags.0") != "x") == {"object@x.com"}
    assert _select(sessions, data, F.data("tags.-1").exists()) == set()
    assert _select(sessions, data, F.data("a.0.b") == "vip") == {"deep@x.com"}
    assert _select(sessions, data, F.data("a.0.b").exists()) == {"deep@x.com"}


def test_number_comparisons_read_any_key_and_numbers_only(
    sessions: sessionmaker[Session],
) -> None:
    # Keys with characters that mean something in a JSON path (not ".": it separates
    # keys in a field name): quoted, escaped.
    key = 'a\tb "c" \\ $d\n'
    data: dict[str, dict[str, Any]] = {
        "n@x.com": {key: 5},
        "big@x.com": {key: 12345678901234567890.5},
        "s@x.com": {key: "7"},
        "arr@x.com": {key: [9]},
        "null@x.com": {key: None},
        "nested@x.com": {"o": {key: 6}},
        "nested-arr@x.com": {"o": [{key: 6}]},
    }
    field = F.data(key)
    assert _select(sessions, data, field > 4.5) == {"n@x.com", "big@x.com"}
    assert _select(sessions, data, field <= 5) == {"n@x.com"}
    assert _select(sessions, data, F.data("o", key) >= 6) == {"nested@x.com"}
    assert _select(sessions, data, field < 1e300) == {"n@x.com", "big@x.com"}


def test_date_only_bounds_at_the_end_of_time(sessions: sessionmaker[Session]) -> None:
    # The day after 9999-12-31 does not fit Python's datetime (was OverflowError).
    last = datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)
    created = {"last@x.com": last, "now@x.com": NOW}
    data: dict[str, dict[str, Any]] = {"last@x.com": {}, "now@x.com": {}}
    last_day = "9999-12-31"
    cases: list[tuple[Expression, set[str]]] = [
        (F.created_at == last_day, {"last@x.com"}),
        (F.created_at != last_day, {"now@x.com"}),
        (F.created_at > last_day, set()),
        (F.created_at >= last_day, {"last@x.com"}),
        (F.created_at < last_day, {"now@x.com"}),
        (F.created_at <= last_day, {"last@x.com", "now@x.com"}),
    ]
    for condition, expected in cases:
        assert _select(sessions, data, condition, created) == expected, condition


def test_stored_timestamps_beyond_python_range(sessions: sessionmaker[Session]) -> None:
    # Valid stored strings whose offset moves them past year 9999 or before year 1 are
    # instants to PostgreSQL; the reference evaluator handles them as such.
    data: dict[str, dict[str, Any]] = {
        "late@x.com": {"at": "9999-12-31T23:59:59-15:00"},
        "early@x.com": {"at": "0001-01-01T00:00:00+15:00"},
        "now@x.com": {"at": "2025-06-15T12:00:00Z"},
    }
    at = F.data("at")
    assert _select(sessions, data, at > "9999-12-31T23:59Z") == {"late@x.com"}
    assert _select(sessions, data, at < "0001-01-01T00:00Z") == {"early@x.com"}
    assert _select(sessions, data, at.older_than(1, "days")) == {"early@x.com"}
    assert _select(sessions, data, at.within(1, "minutes")) == {"now@x.com"}


def test_edges_are_exact(sessions: sessionmaker[Session]) -> None:
    week = NOW - timedelta(days=7)
    created = {"edge@x.com": week, "before@x.com": week - timedelta(microseconds=1)}
    data: dict[str, dict[str, Any]] = {"edge@x.com": {}, "before@x.com": {}}
    assert _select(sessions, data, F.created_at.within(7, "days"), created) == {"edge@x.com"}
    assert _select(sessions, data, F.created_at.older_than(7, "days"), created) == {"before@x.com"}
    assert _select(sessions, data, F.created_at.within(168, "hours"), created) == {"edge@x.com"}


def test_data_window_edges_are_exact(sessions: sessionmaker[Session]) -> None:
    # A data timestamp is within the window from its start to now, both included.
    week = NOW - timedelta(days=7)
    micro = timedelta(microseconds=1)
    data: dict[str, dict[str, Any]] = {
        "start@x.com": {"at": week.isoformat()},
        "before@x.com": {"at": (week - micro).isoformat()},
        "now@x.com": {"at": NOW.isoformat()},
        "future@x.com": {"at": (NOW + micro).isoformat()},
        "text@x.com": {"at": "last week"},
    }
    assert _select(sessions, data, F.data("at").within(7, "days")) == {"start@x.com", "now@x.com"}
    assert _select(sessions, data, F.data("at").older_than(7, "days")) == {"before@x.com"}


# Conditions whose members differ between NOW and ten days before it.
WINDOWED = [
    F.event("login").triggered_within(7, "days"),
    F.event("login").triggered_older_than(7, "days"),
    F.event("login").not_triggered_within(7, "days"),
    F.created_at.within(7, "days"),
    F.updated_at.older_than(7, "days"),
    F.data("at").within(7, "days"),
    F.data("at").older_than(7, "days"),
    F.data("at").within(7, "days") & F.event("login").triggered_within(7, "days"),
]


@pytest.mark.parametrize("condition", WINDOWED)
def test_a_statement_compiled_relative_to_its_instant_serves_any_instant(
    sessions: sessionmaker[Session], condition: Expression
) -> None:
    # Compiled once with the instant's values as parameters (what membership does for
    # batches of events), the statement must select, at every instant it is given, what a
    # statement compiled at that instant selects.
    raw = condition.to_dict()
    earlier = NOW - timedelta(days=10)
    ages = {"fresh@x.com": 3, "recent@x.com": 12, "old@x.com": 25}
    people = [
        RefContact(
            uuid.uuid4(),
            email,
            True,
            {"at": (NOW - timedelta(days=d)).isoformat()},
            NOW - timedelta(days=d),
            NOW - timedelta(days=d),
        )
        for email, d in ages.items()
    ]
    events = [RefEvent(p.id, "login", p.created_at) for p in people[:2]]
    with sessions() as session:
        project = _project_with(session, people, events)
        c = tables.contacts.c
        relative: dict[str, Any] = {}
        once = compile_members(
            parse_condition(raw), CompileContext(now=earlier, relative=relative), project
        )
        assert relative, "the instant's values are parameters"

        def selected(members: Any, params: dict[str, Any]) -> set[str]:
            query = select(c.email).where(c.project_id == project, c.id.in_(members))
            return set(session.execute(query, params).scalars())

        try:
            answers = {}
            for instant in (earlier, NOW):
                expected = {p.email for p in people if evaluate(raw, p, events, instant, {})}
                fresh = compile_members(parse_condition(raw), CompileContext(now=instant), project)
                assert selected(fresh, {}) == expected
                assert selected(once, relative_values(relative, instant)) == expected
                answers[instant] = expected
            assert answers[earlier] != answers[NOW]
        finally:
            session.rollback()


def _in_offset(instant: datetime, offset: str) -> str:
    """`instant` written as a local time at `offset` ("Z", "", "+15:59", "-1559", ...)."""
    if offset in ("", "Z", "z"):
        return instant.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f") + offset
    sign = -1 if offset[0] == "-" else 1
    digits = offset[1:].replace(":", "")
    shift = sign * timedelta(hours=int(digits[:2]), minutes=int(digits[2:] or 0))
    return (instant.astimezone(UTC) + shift).strftime("%Y-%m-%dT%H:%M:%S.%f") + offset


def test_data_timestamps_far_from_utc_keep_their_instant(sessions: sessionmaker[Session]) -> None:
    # Comparisons of data timestamps first compare the text's date with the bounds' dates;
    # a string at an offset of up to 15:59 carries a date up to a day away from its UTC
    # date, and must still be judged by its instant.
    week = NOW - timedelta(days=7)
    second = timedelta(seconds=1)
    offsets = ["-15:59", "-1200", "+15:59", "+0930", "Z", ""]
    data: dict[str, dict[str, Any]] = {}
    for name, instant in [
        ("start", week),
        ("before", week - second),
        ("now", NOW),
        ("after", NOW + second),
        ("mid", NOW - timedelta(days=3)),
    ]:
        for n, offset in enumerate(offsets):
            data[f"{name}{n}@x.com"] = {"at": _in_offset(instant, offset)}
    # Date-only strings are midnight UTC: the window's first day is out, its last day in.
    data["day-start@x.com"] = {"at": week.strftime("%Y-%m-%d")}
    data["day-now@x.com"] = {"at": NOW.strftime("%Y-%m-%d")}
    data["day-next@x.com"] = {"at": (NOW + timedelta(days=1)).strftime("%Y-%m-%d")}
    every = range(len(offsets))

    within = _select(sessions, data, F.data("at").within(7, "days"))
    assert within == (
        {f"{name}{n}@x.com" for name in ("start", "now", "mid") for n in every} | {"day-now@x.com"}
    )
    older = _select(sessions, data, F.data("at").older_than(7, "days"))
    assert older == {f"before{n}@x.com" for n in every} | {"day-start@x.com"}
    # Absolute bounds: the text date is a day off the bound's date on both sides.
    bound = _in_offset(week, "Z")
    later = _select(sessions, data, F.data("at") >= bound)
    assert later == within | {f"after{n}@x.com" for n in every} | {"day-next@x.com"}
    earlier = _select(sessions, data, F.data("at") < bound)
    assert earlier == older


def test_data_timestamp_bounds_at_the_calendar_ends(sessions: sessionmaker[Session]) -> None:
    # Within two days of year 1 or 9999 the date test has no bound to give; the exact
    # comparison alone decides.
    data: dict[str, dict[str, Any]] = {
        "first@x.com": {"at": "0001-01-01T00:00:00Z"},
        "second@x.com": {"at": "0001-01-02"},
        "last@x.com": {"at": "9999-12-31T23:30:00Z"},
    }
    after = F.data("at") > "0001-01-01"
    assert _select(sessions, data, after) == {"second@x.com", "last@x.com"}
    before = F.data("at") < "9999-12-31T23:00:00Z"
    assert _select(sessions, data, before) == {"first@x.com", "second@x.com"}


def test_nul_characters_are_refused_where_they_are() -> None:
    raw = cond(flt("data.pl\x00an", "exists"), flt("email", "contains", "a\x00b"))
    assert fields(raw) == [
        "condition.groups.0.filters.0.field",
        "condition.groups.0.filters.1.value",
    ]


def _tables_read(condition: Expression) -> set[str]:
    statement = compile_members(
        parse_condition(condition.to_dict()), CompileContext(now=NOW), uuid.uuid4()
    )
    sql = str(statement.compile()).lower()
    return {
        name
        for name in ("contacts", "events", "static_members")
        if f"from {name}" in sql or f"join {name}" in sql
    }


@pytest.mark.parametrize(
    ("condition", "reads"),
    [
        # Positive event filters are sets of ids from `events` alone: every event row
        # references a contact of its project, so `contacts` has nothing to add.
        (
            F.event("purchase").triggered_within(30, "days")
            & F.email_activity("clicked").not_triggered(),
            {"events"},
        ),
        (
            F.event("login").triggered_older_than(9, "days") | F.event("signup").triggered(),
            {"events"},
        ),
        # A contact field brings in `contacts`, joined to the event set.
        (F.event("purchase").triggered() & (F.data("plan") == "pro"), {"events", "contacts"}),
        # Contact fields only: one scan of `contacts`.
        ((F.data("plan") == "pro") | F.email.contains("x"), {"contacts"}),
        # Everyone without an event: the anti-join needs the contacts.
        (F.event("purchase").not_triggered(), {"contacts", "events"}),
    ],
)
def test_event_conditions_read_only_the_tables_they_need(
    condition: Expression, reads: set[str]
) -> None:
    assert _tables_read(condition) == reads


@pytest.mark.parametrize(
    ("condition", "subtracts"),
    [
        (F.event("purchase").not_triggered(), True),
        (F.event("login").not_triggered_within(30, "days"), True),
        (F.segment(str(uuid.uuid4())).not_member(), False),
        (F.event("purchase").not_triggered() & F.subscribed.equals(True), False),
        (F.event("purchase").triggered(), False),
    ],
)
def test_everyone_but_a_set_is_counted_by_subtraction(
    condition: Expression, subtracts: bool
) -> None:
    # count(contacts) - count(the set): two index reads, no anti-join probing every contact.
    # An unknown segment reference matches nobody, so its negation is a plain predicate.
    statement = compile_count(
        parse_condition(condition.to_dict()), CompileContext(now=NOW), uuid.uuid4()
    )
    sql = " ".join(str(statement.compile()).lower().split())
    assert (" - (select count(" in sql) == subtracts, sql
    if subtracts:
        assert "not (exists" not in sql, sql
        assert "count(distinct events.contact_id)" in sql, sql


@pytest.mark.parametrize(
    ("condition", "distinct_count"),
    [
        (F.event("purchase").triggered(), True),
        (F.email_activity("opened").triggered_within(7, "days"), True),
        # Sets made of several parts are counted as the rows of their statement.
        (F.event("purchase").triggered() & F.event("login").triggered(), False),
        (F.event("login").triggered_older_than(9, "days"), False),
    ],
)
def test_a_lone_event_set_is_counted_as_distinct_contacts(
    condition: Expression, distinct_count: bool
) -> None:
    # count(DISTINCT contact_id) sorts the ids; counting SELECT DISTINCT hashes them first.
    statement = compile_count(
        parse_condition(condition.to_dict()), CompileContext(now=NOW), uuid.uuid4()
    )
    sql = " ".join(str(statement.compile()).lower().split())
    assert ("count(distinct events.contact_id)" in sql) == distinct_count, sql


@pytest.mark.parametrize(
    ("condition", "scanned", "in_filter"),
    [
        # The timestamp's parse in the aggregate's FILTER; the scan keeps its leading date.
        (F.data("renewed").within(30, "days"), ['COLLATE "C"'], ["segments_timestamp"]),
        (F.data("renewed").within_next(7, "days"), ['COLLATE "C"'], ["segments_timestamp"]),
        (F.data("renewed") > "2024-03-01", ['COLLATE "C"'], ["segments_timestamp"]),
        # Other tests stay in the scan, where an index may serve them.
        (
            F.data("plan").equals("pro") & F.data("renewed").older_than(9, "days"),
            ["contacts.data @>"],
            ["segments_timestamp"],
        ),
        # A disjunction holding a parse goes to the FILTER whole.
        (
            F.data("renewed").within(30, "days") | F.data("plan").equals("pro"),
            [],
            ["segments_timestamp", "contacts.data @>"],
        ),
        (F.data("age") > 30, ["jsonb_path_match"], []),
    ],
)
def test_a_count_parses_timestamps_in_its_aggregate(
    condition: Expression, scanned: list[str], in_filter: list[str]
) -> None:
    # PostgreSQL charges a scan's quals for every row it reads: in the WHERE clause the
    # parse made an index scan over the project's contacts look cheaper than the
    # sequential scan that is twice as fast (see compile._split_parsing).
    statement = compile_count(
        parse_condition(condition.to_dict()), CompileContext(now=NOW), uuid.uuid4()
    )
    sql = " ".join(str(statement.compile()).split())
    head, _, where = sql.partition(" FROM contacts WHERE ")
    assert where, sql
    assert ("FILTER (WHERE" in head) == bool(in_filter), sql
    for fragment in in_filter:
        assert fragment in head and fragment not in where, sql
    for fragment in scanned:
        assert fragment in where and fragment not in head, sql
    assert where.startswith("contacts.project_id = "), sql
