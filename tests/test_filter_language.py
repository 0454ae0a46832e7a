"""The filter language of README.md, Filters, beyond the reference's operators: value
operators (in, notIn, startsWith, endsWith, between, arrayContains), units weeks and
months, withinNext, and on event filters `where`, `count` and `aggregate`. Each scenario
goes through REST (and gRPC where it says so); tracked segments follow writes and the
passing of time; validation names the offending part by its dot path.

Time travel is done in SQL behind the service's back, as in test_rest_filters.py."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from google.protobuf import json_format
from sqlalchemy import Engine, select, text
from sqlalchemy.orm import Session, sessionmaker

from segments import InvalidArgumentError, SegmentsClient
from segments_service import segments, sweeper, tables
from segments_service.filters import add_months, parse_condition
from segments_service.membership import wakeups
from tests.conditions import cond, flt, groups_of
from tests.conftest import Project, Rest
from tests.rest_helpers import Api, check_error

F0 = "condition.groups.0.filters.0"


@pytest.fixture
def api(rest: Rest, project: Project, sessions: sessionmaker[Session]) -> Api:
    checked = Api(rest, project)
    checked.sessions = sessions  # type: ignore[attr-defined]
    return checked


def iso(dt: datetime) -> str:
    return dt.astimezone(UTC).isoformat().replace("+00:00", "Z")


def ago(**delta: float) -> datetime:
    return datetime.now(UTC) - timedelta(**delta)


def ahead(**delta: float) -> datetime:
    return datetime.now(UTC) + timedelta(**delta)


def selected(api: Api, condition: dict[str, Any]) -> set[str]:
    """Emails the condition selects: a fresh segment's members, which the count of
    CountMatchingContacts (by a statement of its own, by subtraction where it can) must
    agree with."""
    found = api.member_set(api.create_segment("probe", condition)["id"])
    sessions: sessionmaker[Session] = api.sessions  # type: ignore[attr-defined]
    with sessions.begin() as session:
        counted = segments.count_matching(session, uuid.UUID(api.project.id), condition)
    assert counted == len(found), condition
    return found


def refused(rest: Rest, project: Project, condition: Any, field: str) -> dict[str, Any]:
    resp = rest.post("/segments", {"name": "bad", "condition": condition}, key=project.secret_key)
    return check_error(resp, 400, "VALIDATION_ERROR", field)


def event(email: str, name: str, at: datetime | None = None, **data: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"email": email, "event": name}
    if data:
        out["data"] = data
    if at is not None:
        out["occurredAt"] = iso(at)
    return out


def set_data(engine: Engine, project: Project, email: str, data: dict[str, Any]) -> None:
    with engine.begin() as conn:
        done = conn.execute(
            text(
                "UPDATE contacts SET data = CAST(:d AS jsonb) WHERE project_id = :p AND email = :e"
            ),
            {"d": json.dumps(data), "p": project.id, "e": email},
        )
        assert done.rowcount == 1


def shift_events(engine: Engine, project: Project, name: str, delta: timedelta) -> None:
    with engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE events SET occurred_at = occurred_at + :d "
                "WHERE project_id = :p AND name = :n"
            ),
            {"d": delta, "p": project.id, "n": name},
        )


# --- value operators --------------------------------------------------------------------


def test_in_and_not_in_compare_as_equals_would(api: Api) -> None:
    api.upsert("pro@x.com", {"plan": "pro", "seats": 5})
    api.upsert("team@x.com", {"plan": "team", "seats": 5.0})
    api.upsert("free@x.com", {"plan": "free", "seats": "5"})
    api.upsert("none@x.com", {"plan": None})
    api.upsert("bare@x.com")
    assert selected(api, cond(flt("data.plan", "in", ["pro", "team"]))) == {
        "pro@x.com",
        "team@x.com",
    }
    # Type-exact: 5 is 5.0 but not "5"; a list may mix types.
    assert selected(api, cond(flt("data.seats", "in", [5, True]))) == {"pro@x.com", "team@x.com"}
    assert selected(api, cond(flt("data.seats", "in", ["5"]))) == {"free@x.com"}
    # A negation never matches a missing key or null.
    assert selected(api, cond(flt("data.plan", "notIn", ["pro", "team"]))) == {"free@x.com"}
    # On email: case-insensitive.
    assert selected(api, cond(flt("email", "in", ["PRO@x.com", "bare@X.COM", "no@x.com"]))) == {
        "pro@x.com",
        "bare@x.com",
    }
    assert selected(api, cond(flt("email", "notIn", ["PRO@x.com"]))) == {
        "team@x.com",
        "free@x.com",
        "none@x.com",
        "bare@x.com",
    }


def test_starts_with_and_ends_with_are_case_insensitive(api: Api) -> None:
    api.upsert("ann@acme.com", {"city": "Berlin"})
    api.upsert("bob@ACME.org", {"city": "bern"})
    api.upsert("cy@other.com", {"city": ["Berlin"]})
    api.upsert("di@other.com", {"city": 5})
    assert selected(api, cond(flt("email", "endsWith", "@ACME.com"))) == {"ann@acme.com"}
    assert selected(api, cond(flt("email", "startsWith", "B"))) == {"bob@acme.org"}
    assert selected(api, cond(flt("data.city", "startsWith", "BER"))) == {
        "ann@acme.com",
        "bob@acme.org",
    }
    # Only strings: an array holding one, or a number, is not one.
    assert selected(api, cond(flt("data.city", "endsWith", "LIN"))) == {"ann@acme.com"}
    assert selected(api, cond(flt("data.city", "endsWith", ""))) == {
        "ann@acme.com",
        "bob@acme.org",
    }


def test_between_numbers_and_timestamps_inclusive(api: Api) -> None:
    api.upsert("a@x.com", {"age": 18, "seen": "2025-01-01T00:00:00Z"})
    api.upsert("b@x.com", {"age": 30.0, "seen": "2025-01-31T23:59:59Z"})
    api.upsert("c@x.com", {"age": 31, "seen": "2025-02-01T00:00:00+01:00"})
    api.upsert("d@x.com", {"age": "20", "seen": "2025-02-01"})
    api.upsert("e@x.com", {"age": [20], "seen": 20250115})
    assert selected(api, cond(flt("data.age", "between", [18, 30]))) == {"a@x.com", "b@x.com"}
    assert selected(api, cond(flt("data.age", "between", [30.5, 31]))) == {"c@x.com"}
    january = ["2025-01-01T00:00:00Z", "2025-01-31T23:59:59Z"]
    # c@ is 2025-01-31T23:00Z: within; d@ is February (midnight UTC); e@ is a number.
    assert selected(api, cond(flt("data.seen", "between", january))) == {
        "a@x.com",
        "b@x.com",
        "c@x.com",
    }


def test_array_contains_is_type_exact(api: Api) -> None:
    api.upsert("vip@x.com", {"tags": ["vip", "beta"], "codes": [5]})
    api.upsert("also@x.com", {"tags": ["VIP"], "codes": [5.0, "x"]})
    api.upsert("nested@x.com", {"tags": [["vip"]], "codes": ["5"]})
    api.upsert("scalar@x.com", {"tags": "vip", "codes": 5})
    assert selected(api, cond(flt("data.tags", "arrayContains", "vip"))) == {"vip@x.com"}
    assert selected(api, cond(flt("data.codes", "arrayContains", 5))) == {
        "vip@x.com",
        "also@x.com",
    }
    assert selected(api, cond(flt("data.codes", "arrayContains", "5"))) == {"nested@x.com"}


def test_within_next_and_calendar_units(api: Api) -> None:
    api.upsert("soon@x.com", {"trialEndsAt": iso(ahead(days=3))})
    api.upsert("later@x.com", {"trialEndsAt": iso(ahead(days=10))})
    api.upsert("past@x.com", {"trialEndsAt": iso(ago(hours=1))})
    api.upsert("text@x.com", {"trialEndsAt": "soon"})
    assert selected(api, cond(flt("data.trialEndsAt", "withinNext", 7, "days"))) == {"soon@x.com"}
    assert selected(api, cond(flt("data.trialEndsAt", "withinNext", 2, "weeks"))) == {
        "soon@x.com",
        "later@x.com",
    }
    assert selected(api, cond(flt("data.trialEndsAt", "within", 1, "weeks"))) == {"past@x.com"}
    # Calendar months, either side of the edge.
    now = datetime.now(UTC)
    edge = add_months(now, -1)
    api.upsert("inside@x.com", {"renewed": iso(edge + timedelta(minutes=5))})
    api.upsert("outside@x.com", {"renewed": iso(edge - timedelta(minutes=5))})
    assert selected(api, cond(flt("data.renewed", "within", 1, "months"))) == {"inside@x.com"}
    assert selected(api, cond(flt("data.renewed", "olderThan", 1, "months"))) == {"outside@x.com"}


def test_add_months_clamps_to_the_month_end() -> None:
    assert add_months(datetime(2025, 3, 31, 12, tzinfo=UTC), -1) == datetime(
        2025, 2, 28, 12, tzinfo=UTC
    )
    assert add_months(datetime(2024, 3, 31, tzinfo=UTC), -1) == datetime(2024, 2, 29, tzinfo=UTC)
    assert add_months(datetime(2025, 1, 31, tzinfo=UTC), 13) == datetime(2026, 2, 28, tzinfo=UTC)
    assert add_months(datetime(2025, 1, 15, tzinfo=UTC), -12) == datetime(2024, 1, 15, tzinfo=UTC)


# --- event filters: where, count, aggregate ---------------------------------------------


def test_where_considers_only_matching_occurrences(api: Api) -> None:
    for email in ("big@x.com", "small@x.com", "text@x.com", "none@x.com"):
        api.upsert(email)
    api.events(
        [
            event("big@x.com", "purchase", ago(days=40), amount=80, currency="EUR"),
            event("big@x.com", "purchase", ago(days=2), amount=20, currency="USD"),
            event("small@x.com", "purchase", ago(days=1), amount=20, currency="USD"),
            event("text@x.com", "purchase", ago(days=1), amount="80"),
        ]
    )
    big = [flt("data.amount", "greaterThan", 50)]
    assert selected(api, cond({**flt("event.purchase", "triggered"), "where": big})) == {
        "big@x.com"
    }
    # The latest *matching* occurrence is 40 days old.
    older = {**flt("purchase", "triggeredOlderThan", 30, "days"), "where": big}
    assert selected(api, cond(older)) == {"big@x.com"}
    within = {**flt("purchase", "triggeredWithin", 30, "days"), "where": big}
    assert selected(api, cond(within)) == set()
    never = {**flt("event.purchase", "notTriggered"), "where": big}
    assert selected(api, cond(never)) == {"small@x.com", "text@x.com", "none@x.com"}
    usd = [flt("data.currency", "in", ["USD"]), flt("data.amount", "lessThanOrEqual", 20)]
    not_recent = {**flt("event.purchase", "notTriggeredWithin", 7, "days"), "where": usd}
    assert selected(api, cond(not_recent)) == {"text@x.com", "none@x.com"}


def test_count_in_a_window_at_minute_resolution(api: Api) -> None:
    for email in ("three@x.com", "two@x.com", "old@x.com", "none@x.com"):
        api.upsert(email)
    api.events(
        [event("three@x.com", "login", ago(minutes=m)) for m in (1, 10, 29)]
        + [event("two@x.com", "login", ago(minutes=m)) for m in (1, 10)]
        + [event("old@x.com", "login", ago(minutes=m)) for m in (1, 31, 45)]
    )
    at_least_3 = {
        **flt("event.login", "triggeredWithin", 30, "minutes"),
        "count": {"operator": "greaterThanOrEqual", "value": 3},
    }
    assert selected(api, cond(at_least_3)) == {"three@x.com"}
    ever_3 = {**flt("event.login", "triggered"), "count": {"operator": "equals", "value": 3}}
    assert selected(api, cond(ever_3)) == {"three@x.com", "old@x.com"}
    # A count zero satisfies matches contacts with none.
    fewer = {
        **flt("event.login", "triggeredWithin", 30, "minutes"),
        "count": {"operator": "lessThan", "value": 2},
    }
    assert selected(api, cond(fewer)) == {"old@x.com", "none@x.com"}
    not_two = {**flt("login", "triggered"), "count": {"operator": "notEquals", "value": 2}}
    assert selected(api, cond(not_two)) == {"three@x.com", "old@x.com", "none@x.com"}
    # Beside a contact field, and under OR (the set is combined, not only counted).
    assert selected(api, cond(fewer, flt("email", "startsWith", "o"))) == {"old@x.com"}
    assert selected(
        api, groups_of("OR", {"filters": [fewer]}, {"filters": [flt("email", "startsWith", "t")]})
    ) == {
        "old@x.com",
        "none@x.com",
        "three@x.com",
        "two@x.com",
    }


def test_aggregates_over_numeric_properties(api: Api) -> None:
    for email in ("spender@x.com", "small@x.com", "strings@x.com", "old@x.com"):
        api.upsert(email)
    api.events(
        [
            event("spender@x.com", "purchase", ago(days=3), amount=60),
            event("spender@x.com", "purchase", ago(days=10), amount=45.5),
            event("spender@x.com", "purchase", ago(days=12), amount="1000"),
            event("small@x.com", "purchase", ago(days=1), amount=99.99),
            event("strings@x.com", "purchase", ago(days=1), amount="500"),
            event("old@x.com", "purchase", ago(days=40), amount=500),
        ]
    )

    def agg(function: str, op: str, value: float, **window: Any) -> dict[str, Any]:
        base = (
            flt("event.purchase", "triggeredWithin", 30, "days")
            if window
            else flt("event.purchase", "triggered")
        )
        return {
            **base,
            "aggregate": {
                "function": function,
                "field": "data.amount",
                "operator": op,
                "value": value,
            },
        }

    assert selected(api, cond(agg("sum", "greaterThanOrEqual", 100, w=1))) == {"spender@x.com"}
    assert selected(api, cond(agg("sum", "greaterThanOrEqual", 100))) == {
        "spender@x.com",
        "old@x.com",
    }
    assert selected(api, cond(agg("avg", "equals", 52.75, w=1))) == {"spender@x.com"}
    assert selected(api, cond(agg("max", "lessThan", 100, w=1))) == {
        "spender@x.com",
        "small@x.com",
    }
    # No numeric value at all: no match, whatever the comparison.
    assert selected(api, cond(agg("min", "notEquals", 1, w=1))) == {
        "spender@x.com",
        "small@x.com",
    }
    both = {**agg("sum", "greaterThan", 50, w=1), "count": {"operator": "equals", "value": 1}}
    assert selected(api, cond(both)) == {"small@x.com"}


def test_the_language_over_grpc(client: SegmentsClient) -> None:
    client.upsert_contact("a@x.com", data={"plan": "pro"})
    client.upsert_contact("b@x.com", data={"plan": "team"})
    client.ingest_events([{"email": "a@x.com", "event": "purchase", "data": {"amount": 70}}])
    condition = cond(
        flt("data.plan", "in", ["pro", "team"]),
        {
            **flt("event.purchase", "triggeredWithin", 2, "weeks"),
            "where": [flt("data.amount", "between", [50, 100])],
            "count": {"operator": "greaterThanOrEqual", "value": 1},
            "aggregate": {
                "function": "sum",
                "field": "data.amount",
                "operator": "greaterThan",
                "value": 69.5,
            },
        },
    )
    segment = client.create_segment("grpc", condition=condition)
    assert segment.member_count == 1
    assert json_format.MessageToDict(segment.condition) == condition
    assert client.count_matching_contacts(condition) == 1
    bad = cond({**flt("event.purchase", "triggered"), "count": {"operator": "atLeast", "value": 1}})
    with pytest.raises(InvalidArgumentError) as caught:
        client.create_segment("bad", condition=bad)
    assert caught.value.status_code is grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in caught.value.field_violations] == [f"{F0}.count.operator"]


def test_stored_conditions_round_trip(api: Api) -> None:
    condition = cond(
        flt("email", "endsWith", "@acme.com"),
        flt("data.tags", "arrayContains", "vip"),
        flt("data.renewal", "withinNext", 1, "months"),
        {
            **flt("email.opened", "triggeredWithin", 2, "weeks"),
            "where": [flt("data.campaign", "startsWith", "spring")],
            "count": {"operator": "greaterThan", "value": 2},
        },
    )
    created = api.create_segment("round trip", condition)
    assert created["condition"] == condition
    assert api.segment(created["id"])["condition"] == condition
    assert parse_condition(condition).to_json() == condition


# --- validation -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bad", "field"),
    [
        (flt("data.plan", "in", []), f"{F0}.value"),
        (flt("data.plan", "in", list(range(101))), f"{F0}.value"),
        (flt("data.plan", "in", "pro"), f"{F0}.value"),
        (flt("data.plan", "in", ["pro", None]), f"{F0}.value.1"),
        (flt("data.plan", "in", ["pro", ["team"]]), f"{F0}.value.1"),
        (flt("email", "in", ["a@x.com", 5]), f"{F0}.value.1"),
        (flt("data.age", "between", [30, 18]), f"{F0}.value"),
        (flt("data.age", "between", [18]), f"{F0}.value"),
        (flt("data.age", "between", [18, "2025-01-01"]), f"{F0}.value"),
        (flt("data.age", "between", ["soon", "later"]), f"{F0}.value"),
        (flt("data.tags", "arrayContains", ["vip"]), f"{F0}.value"),
        (flt("data.name", "startsWith", 5), f"{F0}.value"),
        (flt("subscribed", "in", [True]), f"{F0}.operator"),
        (flt("createdAt", "between", ["2025-01-01", "2025-02-01"]), f"{F0}.operator"),
        (flt("createdAt", "withinNext", 7, "days"), f"{F0}.operator"),
        (flt("data.trial", "withinNext", 7), f"{F0}.unit"),
        (flt("data.trial", "within", 1.5, "months"), f"{F0}.value"),
        (flt("data.trial", "within", 1201, "months"), f"{F0}.value"),
        (flt("data.trial", "within", 5218, "weeks"), f"{F0}.value"),
        (
            {**flt("event.login", "triggered"), "count": {"operator": "atLeast", "value": 3}},
            f"{F0}.count.operator",
        ),
        (
            {**flt("event.login", "triggered"), "count": {"operator": "equals", "value": 2.5}},
            f"{F0}.count.value",
        ),
        (
            {**flt("event.login", "triggered"), "count": {"operator": "equals", "value": -1}},
            f"{F0}.count.value",
        ),
        (
            {**flt("event.login", "triggered"), "count": {"operator": "equals"}},
            f"{F0}.count.value",
        ),
        (
            {**flt("event.login", "notTriggered"), "count": {"operator": "equals", "value": 1}},
            f"{F0}.count",
        ),
        (
            {**flt("event.login", "triggeredOlderThan", 1, "days"), "aggregate": {}},
            f"{F0}.aggregate",
        ),
        ({**flt("data.plan", "exists"), "where": [flt("data.x", "exists")]}, f"{F0}.where"),
        (
            {**flt("event.buy", "triggered"), "where": [flt("email", "equals", "a@x.com")]},
            f"{F0}.where.0.field",
        ),
        (
            {**flt("event.buy", "triggered"), "where": [flt("data.at", "within", 1, "days")]},
            f"{F0}.where.0.operator",
        ),
        (
            {
                **flt("event.buy", "triggered"),
                "where": [flt("data.a", "exists"), flt("data.b", "in", [])],
            },
            f"{F0}.where.1.value",
        ),
        (
            {
                **flt("event.buy", "triggered"),
                "aggregate": {
                    "function": "median",
                    "field": "data.amount",
                    "operator": "equals",
                    "value": 1,
                },
            },
            f"{F0}.aggregate.function",
        ),
        (
            {
                **flt("event.buy", "triggered"),
                "aggregate": {
                    "function": "sum",
                    "field": "amount",
                    "operator": "equals",
                    "value": 1,
                },
            },
            f"{F0}.aggregate.field",
        ),
        (
            {
                **flt("event.buy", "triggered"),
                "aggregate": {
                    "function": "sum",
                    "field": "data.amount",
                    "operator": "equals",
                    "value": "1",
                },
            },
            f"{F0}.aggregate.value",
        ),
    ],
)
def test_wrong_shapes_are_400s_naming_the_part(
    rest: Rest, project: Project, bad: dict[str, Any], field: str
) -> None:
    error = refused(rest, project, cond(bad), field)
    assert [e["field"] for e in error["errors"]] == [field], error


def test_where_filters_count_toward_the_filter_limit() -> None:
    where = [flt(f"data.k{i}", "exists") for i in range(200)]
    with pytest.raises(Exception) as caught:
        parse_condition(cond({**flt("event.buy", "triggered"), "where": where}))
    assert [(v.field, v.code) for v in caught.value.violations] == [  # type: ignore[attr-defined]
        (f"{F0}.where.199", "too_many")
    ]


# --- tracked segments: writes and time ------------------------------------------------


class Recorded:
    """The entry/exit events a project records, read a step at a time: each call answers
    those recorded since the previous one (a set: one statement records them in any
    order)."""

    def __init__(self, engine: Engine, project: Project) -> None:
        self.engine = engine
        self.project = project
        self.seen = 0

    def new(self) -> set[tuple[str, str]]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                text(
                    "SELECT e.id, c.email, e.name FROM events e JOIN contacts c "
                    "ON c.project_id = e.project_id AND c.id = e.contact_id "
                    "WHERE e.project_id = :p AND e.name LIKE 'segment.%' AND e.id > :seen "
                    "ORDER BY e.id"
                ),
                {"p": self.project.id, "seen": self.seen},
            ).all()
        if rows:
            self.seen = rows[-1].id
        found = [(r.email, r.name) for r in rows]
        assert len(found) == len(set(found)), found  # exactly once
        return set(found)


def test_tracked_counts_enter_on_writes_and_exit_as_occurrences_age(
    api: Api, engine: Engine, sessions: sessionmaker[Session], project: Project
) -> None:
    recorded = Recorded(engine, project)
    api.upsert("a@x.com")
    api.upsert("b@x.com")
    condition = cond(
        {
            **flt("event.login", "triggeredWithin", 30, "minutes"),
            "count": {"operator": "greaterThanOrEqual", "value": 3},
        }
    )
    seg = api.create_segment("Busy", condition, trackMembership=True)
    lonely = api.create_segment(
        "Quiet",
        cond(
            {
                **flt("event.login", "triggeredWithin", 30, "minutes"),
                "count": {"operator": "lessThan", "value": 3},
            }
        ),
        trackMembership=True,
    )
    assert api.member_set(lonely["id"]) == {"a@x.com", "b@x.com"}
    assert recorded.new() == {
        ("a@x.com", "segment.quiet.entry"),
        ("b@x.com", "segment.quiet.entry"),
    }
    # Writes: the third login enters a@ at once.
    api.events([event("a@x.com", "login", ago(minutes=m)) for m in (2, 5)])
    assert api.member_set(seg["id"]) == set()
    assert recorded.new() == set()
    api.events([event("a@x.com", "login", ago(minutes=1))])
    assert api.member_set(seg["id"]) == {"a@x.com"}
    assert api.member_set(lonely["id"]) == {"b@x.com"}
    assert recorded.new() == {("a@x.com", "segment.busy.entry"), ("a@x.com", "segment.quiet.exit")}
    # A first full pass, then time passes: the oldest login leaves the window just now.
    pid = uuid.UUID(project.id)
    state = sweeper.SweepState()
    sweeper.sweep_once(engine, sessions, state, projects=[pid])
    assert state.since(pid) is not None  # the next pass is incremental
    shift_events(engine, project, "login", timedelta(minutes=-26))  # 28, 31 and 27 min old
    sweeper.sweep_once(engine, sessions, state, projects=[pid])
    assert api.member_set(seg["id"]) == set()
    assert api.member_set(lonely["id"]) == {"a@x.com", "b@x.com"}
    assert recorded.new() == {("a@x.com", "segment.busy.exit"), ("a@x.com", "segment.quiet.entry")}


def time_passes(engine: Engine, project: Project, delta: timedelta) -> None:
    """The instants at which the project's contacts turn come `delta` closer (as the
    clock moving on would bring them); the contacts' data is moved by the test."""
    with engine.begin() as conn:
        conn.execute(
            text("UPDATE contact_wakeups SET wake_at = wake_at - :d WHERE project_id = :p"),
            {"d": delta, "p": project.id},
        )


def test_tracked_within_next_follows_the_clock(
    api: Api, engine: Engine, sessions: sessionmaker[Session], project: Project
) -> None:
    recorded = Recorded(engine, project)
    start = datetime.now(UTC)
    ends = {"soon@x.com": start + timedelta(days=2), "later@x.com": start + timedelta(days=9)}
    for email, at in ends.items():
        api.upsert(email, {"trialEndsAt": iso(at)})
    seg = api.create_segment(
        "Trial ending", cond(flt("data.trialEndsAt", "withinNext", 7, "days")), trackMembership=True
    )
    assert api.member_set(seg["id"]) == {"soon@x.com"}
    assert recorded.new() == {("soon@x.com", "segment.trial-ending.entry")}
    pid = uuid.UUID(project.id)
    state = sweeper.SweepState()
    sweeper.sweep_once(engine, sessions, state, projects=[pid])
    assert state.since(pid) is not None  # the next pass is incremental
    # Two days and a minute pass: soon@'s date has just passed, later@'s has just come
    # within reach of the seven days.
    delta = timedelta(days=2, minutes=1)
    for email, at in ends.items():
        set_data(engine, project, email, {"trialEndsAt": iso(at - delta)})
    time_passes(engine, project, delta)
    sweeper.sweep_once(engine, sessions, state, projects=[pid])
    assert api.member_set(seg["id"]) == {"later@x.com"}
    assert recorded.new() == {
        ("soon@x.com", "segment.trial-ending.exit"),
        ("later@x.com", "segment.trial-ending.entry"),
    }
    # A write moves a contact's instant with its data.
    api.upsert("soon@x.com", {"trialEndsAt": iso(start + timedelta(days=1))})
    assert recorded.new() == {("soon@x.com", "segment.trial-ending.entry")}
    with engine.connect() as conn:
        wake = conn.execute(
            text(
                "SELECT w.wake_at FROM contact_wakeups w JOIN contacts c "
                "ON c.project_id = w.project_id AND c.id = w.contact_id "
                "WHERE c.project_id = :p AND c.email = 'soon@x.com'"
            ),
            {"p": project.id},
        ).scalar_one()
    assert abs(wake - (start + timedelta(days=1))) < timedelta(seconds=1)


def test_a_sweep_reads_only_the_contacts_due(
    api: Api, engine: Engine, sessions: sessionmaker[Session], project: Project
) -> None:
    """After the pass that computes them, a sweep re-evaluates the contacts whose instant
    has come, not every contact with a timestamp."""
    start = datetime.now(UTC)
    api.batch(
        [
            {"email": f"c{i}@x.com", "data": {"renewed": iso(start - timedelta(days=i))}}
            for i in range(20)
        ]
    )
    seg = api.create_segment("Renewed", cond(flt("data.renewed", "within", 30, "days")))
    assert len(api.member_set(seg["id"])) == 20
    pid = uuid.UUID(project.id)
    state = sweeper.SweepState()
    sweeper.sweep_once(engine, sessions, state, projects=[pid])  # full: computes them
    assert sweeper.sweep_once(engine, sessions, state, projects=[pid]) == 0
    # 25 days pass: c5@ .. c19@ (renewed 5 to 19 days before) are now over 30 days old.
    delta = timedelta(days=25)
    for i in range(20):
        set_data(
            engine, project, f"c{i}@x.com", {"renewed": iso(start - timedelta(days=i) - delta)}
        )
    time_passes(engine, project, delta)
    assert sweeper.sweep_once(engine, sessions, state, projects=[pid]) == 15
    assert api.member_set(seg["id"]) == {f"c{i}@x.com" for i in range(5)}


def test_wakeups_of_calendar_months_err_early_never_late(
    sessions: sessionmaker[Session], project: Project, api: Api
) -> None:
    """A month-long window on 2025-01-31T10:00Z turns when its start passes that instant:
    at 2025-03-01T00:00Z, since a month before any moment of late February is still in
    January. The wake instants are the shifted date and the next month's first instant."""
    api.upsert("a@x.com", {"renewed": "2025-01-31T10:00:00Z"})
    condition = parse_condition(cond(flt("data.renewed", "olderThan", 1, "months")))
    (f,) = condition.iter_filters()
    t = datetime(2025, 1, 31, 10, tzinfo=UTC)
    # Where the compiler's answer turns.
    assert add_months(datetime(2025, 2, 28, 23, 59, tzinfo=UTC), -1) < t
    assert add_months(datetime(2025, 3, 1, tzinfo=UTC), -1) > t

    def wake(now: datetime) -> datetime | None:
        c = tables.contacts.c
        query = select(wakeups.next_change([f], now)).where(c.project_id == uuid.UUID(project.id))
        with sessions.begin() as session:
            session.execute(text("SET LOCAL timezone = 'Pacific/Chatham'"))  # no effect
            found: datetime | None = session.execute(query).scalar_one()
            return found

    assert wake(datetime(2025, 2, 1, tzinfo=UTC)) == datetime(2025, 2, 28, 10, tzinfo=UTC)
    assert wake(datetime(2025, 2, 28, 11, tzinfo=UTC)) == datetime(2025, 3, 1, tzinfo=UTC)
    assert wake(datetime(2025, 3, 1, 0, 0, 1, tzinfo=UTC)) is None


def test_where_and_aggregate_stay_exact_on_writes(
    api: Api, engine: Engine, project: Project
) -> None:
    recorded = Recorded(engine, project)
    api.upsert("a@x.com")
    spent = cond(
        {
            **flt("event.purchase", "triggeredWithin", 30, "days"),
            "where": [flt("data.currency", "equals", "USD")],
            "aggregate": {
                "function": "sum",
                "field": "data.amount",
                "operator": "greaterThanOrEqual",
                "value": 100,
            },
        }
    )
    seg = api.create_segment("Spent 100", spent, trackMembership=True)
    api.events([event("a@x.com", "purchase", amount=60, currency="USD")])
    api.events([event("a@x.com", "purchase", amount=60, currency="EUR")])
    assert api.member_set(seg["id"]) == set()
    api.events([event("a@x.com", "purchase", amount=40, currency="USD")])
    assert api.member_set(seg["id"]) == {"a@x.com"}
    assert recorded.new() == {("a@x.com", "segment.spent-100.entry")}


def test_an_average_is_compared_exactly(api: Api) -> None:
    """4/3 is more than 1.3333333333333333 and not equal to it, though a numeric average
    rounded to its scale would say otherwise."""
    api.upsert("a@x.com")
    api.events([event("a@x.com", "purchase", ago(days=1), amount=n) for n in (1, 1, 2)])
    third = 1.3333333333333333

    def avg(op: str) -> dict[str, Any]:
        return cond(
            {
                **flt("event.purchase", "triggered"),
                "aggregate": {
                    "function": "avg",
                    "field": "data.amount",
                    "operator": op,
                    "value": third,
                },
            }
        )

    assert selected(api, avg("greaterThan")) == {"a@x.com"}
    assert selected(api, avg("equals")) == set()
    assert selected(api, avg("notEquals")) == {"a@x.com"}
