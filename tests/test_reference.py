"""The reference evaluator (tests/reference.py) on hand-checked cases of the extended
filter language (README.md, Filters), so that a mistake there is caught here instead of
being mirrored by the property test."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from tests.reference import RefContact, RefEvent, add_months, evaluate, ticks

NOW = datetime(2025, 6, 15, 12, 0, tzinfo=UTC)
ANN = uuid.UUID(int=1)


def contact(data: dict[str, Any], email: str = "ann@x.com") -> RefContact:
    return RefContact(ANN, email, True, data, NOW - timedelta(days=7), NOW)


def matches(
    f: dict[str, Any],
    data: dict[str, Any] | None = None,
    events: list[RefEvent] = (),  # type: ignore[assignment]
    now: datetime = NOW,
) -> bool:
    condition = {"logic": "AND", "groups": [{"filters": [f]}]}
    return evaluate(condition, contact(data or {}), list(events), now, {})


def event(name: str, at: datetime, **data: Any) -> RefEvent:
    return RefEvent(ANN, name, at, data)


# --- value operators ----------------------------------------------------------------------


def test_in_and_not_in_compare_as_equals() -> None:
    data = {"plan": "pro", "age": 5, "flag": True, "gone": None, "tags": ["pro"]}
    assert matches({"field": "data.plan", "operator": "in", "value": ["team", "pro"]}, data)
    assert not matches({"field": "data.plan", "operator": "in", "value": ["PRO", 5]}, data)
    assert matches({"field": "data.age", "operator": "in", "value": ["x", 5.0]}, data)
    assert not matches({"field": "data.age", "operator": "in", "value": ["5", True]}, data)
    assert not matches({"field": "data.flag", "operator": "in", "value": ["true", 1]}, data)
    assert matches({"field": "data.flag", "operator": "in", "value": [False, True]}, data)
    assert not matches({"field": "data.tags", "operator": "in", "value": ["pro"]}, data)
    assert matches({"field": "data.tags", "operator": "notIn", "value": ["pro"]}, data)
    assert matches({"field": "data.age", "operator": "notIn", "value": ["5", True, 6]}, data)
    assert not matches({"field": "data.age", "operator": "notIn", "value": [1, 5.0]}, data)


def test_not_in_never_matches_a_missing_key_or_null() -> None:
    data = {"gone": None}
    assert not matches({"field": "data.gone", "operator": "notIn", "value": ["a", 1]}, data)
    assert not matches({"field": "data.absent", "operator": "notIn", "value": ["a"]}, data)
    assert not matches({"field": "data.gone", "operator": "in", "value": ["null"]}, data)


def test_email_in_is_case_insensitive_and_string_only() -> None:
    assert matches({"field": "email", "operator": "in", "value": ["bob@x.com", "ANN@X.com"]})
    assert not matches({"field": "email", "operator": "in", "value": ["ann@x.co"]})
    assert matches({"field": "email", "operator": "notIn", "value": ["ann@x.co"]})
    assert not matches({"field": "email", "operator": "notIn", "value": ["Ann@X.Com"]})


def test_starts_and_ends_with_fold_case_and_need_a_string() -> None:
    data = {"plan": "Straße Pro", "n": 55, "code": "50%_off"}
    assert matches({"field": "data.plan", "operator": "startsWith", "value": "STRAßE"}, data)
    assert not matches({"field": "data.plan", "operator": "startsWith", "value": "STRASSE"}, data)
    assert matches({"field": "data.plan", "operator": "endsWith", "value": " pRO"}, data)
    assert not matches({"field": "data.plan", "operator": "endsWith", "value": "Straße"}, data)
    assert matches({"field": "data.plan", "operator": "startsWith", "value": ""}, data)
    assert not matches({"field": "data.n", "operator": "startsWith", "value": "5"}, data)
    assert not matches({"field": "data.missing", "operator": "endsWith", "value": ""}, data)
    # LIKE's wildcards are ordinary characters here.
    assert matches({"field": "data.code", "operator": "startsWith", "value": "50%_"}, data)
    assert not matches({"field": "data.code", "operator": "startsWith", "value": "5_"}, data)
    assert not matches({"field": "data.code", "operator": "endsWith", "value": "%"}, data)
    assert matches({"field": "email", "operator": "startsWith", "value": "ANN@"})
    assert matches({"field": "email", "operator": "endsWith", "value": "@X.COM"})
    assert not matches({"field": "email", "operator": "endsWith", "value": "ann"})


def test_between_is_inclusive_and_typed() -> None:
    data = {"age": 18, "s": "18", "when": "2025-06-08T12:00:00Z", "day": "2025-06-08"}
    assert matches({"field": "data.age", "operator": "between", "value": [18, 30]}, data)
    assert matches({"field": "data.age", "operator": "between", "value": [1, 18.0]}, data)
    assert not matches({"field": "data.age", "operator": "between", "value": [18.5, 30]}, data)
    assert not matches({"field": "data.s", "operator": "between", "value": [1, 30]}, data)
    stamps = ["2025-06-08T12:00:00Z", "2025-06-09"]
    assert matches({"field": "data.when", "operator": "between", "value": stamps}, data)
    stamps = ["2025-06-08T12:00:00.000001Z", "2025-06-09"]
    assert not matches({"field": "data.when", "operator": "between", "value": stamps}, data)
    # A date alone is midnight UTC, as for the other comparisons of data timestamps.
    assert matches(
        {"field": "data.day", "operator": "between", "value": ["2025-06-01", "2025-06-08"]}, data
    )
    assert not matches(
        {"field": "data.when", "operator": "between", "value": ["2025-06-01", "2025-06-08"]}, data
    )
    assert not matches({"field": "data.age", "operator": "between", "value": stamps}, data)


def test_array_contains_is_type_exact() -> None:
    data = {"tags": ["vip", 5, True, ["x"], {"a": 1}, None], "one": "vip", "nums": [5.0]}
    assert matches({"field": "data.tags", "operator": "arrayContains", "value": "vip"}, data)
    assert not matches({"field": "data.tags", "operator": "arrayContains", "value": "VIP"}, data)
    assert matches({"field": "data.tags", "operator": "arrayContains", "value": 5.0}, data)
    assert matches({"field": "data.nums", "operator": "arrayContains", "value": 5}, data)
    assert not matches({"field": "data.nums", "operator": "arrayContains", "value": "5"}, data)
    assert matches({"field": "data.tags", "operator": "arrayContains", "value": True}, data)
    assert not matches({"field": "data.tags", "operator": "arrayContains", "value": 1}, data)
    assert not matches({"field": "data.tags", "operator": "arrayContains", "value": "x"}, data)
    # A stored scalar is not an array holding itself.
    assert not matches({"field": "data.one", "operator": "arrayContains", "value": "vip"}, data)
    assert not matches({"field": "data.gone", "operator": "arrayContains", "value": "vip"}, data)


# --- time -----------------------------------------------------------------------------------


def _ticks(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> int:
    return ticks(datetime(year, month, day, hour, minute, tzinfo=UTC))


def test_calendar_months_clamp_to_the_month_end() -> None:
    assert add_months(_ticks(2025, 3, 31, 10, 30), -1) == _ticks(2025, 2, 28, 10, 30)
    assert add_months(_ticks(2024, 3, 31), -1) == _ticks(2024, 2, 29)
    assert add_months(_ticks(2025, 1, 31, 23, 59), 1) == _ticks(2025, 2, 28, 23, 59)
    assert add_months(_ticks(2025, 1, 15), -1) == _ticks(2024, 12, 15)
    assert add_months(_ticks(2025, 12, 31), 2) == _ticks(2026, 2, 28)
    assert add_months(_ticks(2025, 6, 15, 12), -12) == _ticks(2024, 6, 15, 12)
    assert add_months(_ticks(2025, 6, 15, 12), 0) == _ticks(2025, 6, 15, 12)


def test_months_window_from_a_month_end() -> None:
    now = datetime(2025, 3, 31, 12, tzinfo=UTC)
    feb28 = datetime(2025, 2, 28, 12, tzinfo=UTC)
    f = {"field": "data.t", "operator": "within", "value": 1, "unit": "months"}
    assert matches(f, {"t": feb28.isoformat()}, now=now)
    assert not matches(f, {"t": (feb28 - timedelta(microseconds=1)).isoformat()}, now=now)
    f = {"field": "data.t", "operator": "olderThan", "value": 1, "unit": "months"}
    assert matches(f, {"t": (feb28 - timedelta(microseconds=1)).isoformat()}, now=now)
    assert not matches(f, {"t": feb28.isoformat()}, now=now)
    # Events: the window is the same instant.
    f = {"field": "login", "operator": "triggeredWithin", "value": 1, "unit": "months"}
    assert matches(f, events=[event("login", feb28)], now=now)
    assert not matches(f, events=[event("login", feb28 - timedelta(microseconds=1))], now=now)


def test_weeks_are_seven_days_and_may_be_fractional() -> None:
    week_ago = NOW - timedelta(days=7)
    f = {"field": "createdAt", "operator": "within", "value": 1, "unit": "weeks"}
    assert matches(f)  # created exactly a week ago
    f = {"field": "createdAt", "operator": "within", "value": 0.5, "unit": "weeks"}
    assert not matches(f)
    f = {"field": "data.t", "operator": "olderThan", "value": 0.5, "unit": "weeks"}
    assert matches(f, {"t": (NOW - timedelta(days=3.5, microseconds=1)).isoformat()})
    assert not matches(f, {"t": (NOW - timedelta(days=3.5)).isoformat()})
    f = {"field": "login", "operator": "notTriggeredWithin", "value": 1, "unit": "weeks"}
    assert not matches(f, events=[event("login", week_ago)])
    assert matches(f, events=[event("login", week_ago - timedelta(microseconds=1))])


def test_within_next_runs_from_now_forward() -> None:
    f = {"field": "data.t", "operator": "withinNext", "value": 7, "unit": "days"}
    for moment, expected in [
        (NOW, True),
        (NOW - timedelta(microseconds=1), False),
        (NOW + timedelta(days=7), True),
        (NOW + timedelta(days=7, microseconds=1), False),
    ]:
        assert matches(f, {"t": moment.isoformat()}) is expected, moment
    assert not matches(f, {"t": 5})
    assert not matches(f, {"t": "next week"})
    assert not matches(f, {})
    f = {"field": "data.t", "operator": "withinNext", "value": 1, "unit": "months"}
    assert matches(f, {"t": "2025-07-15T12:00:00Z"})
    assert not matches(f, {"t": "2025-07-15T12:00:00.000001Z"})
    jan31 = datetime(2025, 1, 31, 8, tzinfo=UTC)
    assert matches(f, {"t": "2025-02-28T08:00:00Z"}, now=jan31)
    assert not matches(f, {"t": "2025-03-01T00:00:00Z"}, now=jan31)


# --- event operators ------------------------------------------------------------------------

BIG = {"field": "data.amount", "operator": "greaterThan", "value": 50}


def test_where_selects_occurrences_by_their_data() -> None:
    f = {"field": "event.purchase", "operator": "triggered", "where": [BIG]}
    assert matches(f, events=[event("purchase", NOW, amount=60)])
    assert not matches(f, events=[event("purchase", NOW, amount="60")])
    assert not matches(
        f, events=[event("purchase", NOW, amount=50), event("login", NOW, amount=99)]
    )
    both: list[dict[str, Any]] = [
        BIG,
        {"field": "data.currency", "operator": "in", "value": ["EUR", "USD"]},
    ]
    f = {"field": "purchase", "operator": "triggered", "where": both}
    assert not matches(f, events=[event("purchase", NOW, amount=60, currency="GBP")])
    assert matches(
        f,
        events=[
            event("purchase", NOW, amount=60, currency="GBP"),
            event("purchase", NOW, amount=70, currency="EUR"),
        ],
    )
    nested = {"field": "data.item.sku", "operator": "startsWith", "value": "AB"}
    f = {"field": "purchase", "operator": "triggered", "where": [nested]}
    assert matches(f, events=[event("purchase", NOW, item={"sku": "abc"})])
    assert not matches(f, events=[event("purchase", NOW, item="ABC")])


def test_where_with_triggered_older_than_reads_the_latest_matching_occurrence() -> None:
    f = {
        "field": "event.purchase",
        "operator": "triggeredOlderThan",
        "value": 7,
        "unit": "days",
        "where": [BIG],
    }
    old_big = event("purchase", NOW - timedelta(days=10), amount=100)
    new_small = event("purchase", NOW - timedelta(days=1), amount=10)
    new_big = event("purchase", NOW - timedelta(days=1), amount=100)
    assert matches(f, events=[old_big, new_small])  # the recent one does not match `where`
    assert not matches(f, events=[old_big, new_big])
    assert not matches(f, events=[new_small])


def test_not_triggered_with_where_ignores_other_occurrences() -> None:
    f: dict[str, Any] = {"field": "event.purchase", "operator": "notTriggered", "where": [BIG]}
    assert matches(f, events=[event("purchase", NOW, amount=10), event("purchase", NOW)])
    assert matches(f)
    assert not matches(f, events=[event("purchase", NOW - timedelta(days=400), amount=51)])
    f = {
        "field": "event.purchase",
        "operator": "notTriggeredWithin",
        "value": 1,
        "unit": "days",
        "where": [BIG],
    }
    assert matches(f, events=[event("purchase", NOW - timedelta(days=2), amount=99)])
    assert matches(f, events=[event("purchase", NOW, amount=9)])
    assert not matches(f, events=[event("purchase", NOW, amount=99)])


def test_where_negations_skip_occurrences_without_the_key() -> None:
    f = {
        "field": "purchase",
        "operator": "triggered",
        "where": [{"field": "data.coupon", "operator": "notEquals", "value": "X"}],
    }
    assert not matches(f, events=[event("purchase", NOW), event("purchase", NOW, coupon=None)])
    assert matches(f, events=[event("purchase", NOW, coupon="Y")])


def test_counts() -> None:
    logins = [event("login", NOW - timedelta(minutes=m)) for m in (1, 10, 29, 31)]

    def count(op: str, n: Any, **extra: Any) -> dict[str, Any]:
        return {"field": "event.login", "count": {"operator": op, "value": n}, **extra}

    window: dict[str, Any] = {"operator": "triggeredWithin", "value": 30, "unit": "minutes"}
    assert matches(count("greaterThanOrEqual", 3, **window), events=logins)
    assert not matches(count("greaterThan", 3, **window), events=logins)
    assert matches(count("equals", 4, operator="triggered"), events=logins)
    assert matches(count("equals", 4.0, operator="triggered"), events=logins)
    assert not matches(count("notEquals", 3, **window), events=logins)
    # A count that zero satisfies also matches contacts with no (matching) occurrence.
    assert matches(count("lessThan", 3, operator="triggered"))
    assert matches(count("lessThanOrEqual", 0, operator="triggered"))
    assert matches(count("equals", 0, **window), events=logins[3:])
    assert matches(count("notEquals", 5, operator="triggered"))
    assert matches(count("greaterThanOrEqual", 0, operator="triggered"))
    assert not matches(count("greaterThan", 0, operator="triggered"))
    assert not matches(count("lessThan", 3, **window), events=logins)
    where = [{"field": "data.ok", "operator": "equals", "value": True}]
    f = count("lessThan", 1, operator="triggered", where=where)
    assert matches(f, events=logins)  # none of them has ok: true


def test_aggregates() -> None:
    buys = [
        event("purchase", NOW - timedelta(days=1), amount=60),
        event("purchase", NOW - timedelta(days=2), amount=40.5),
        event("purchase", NOW - timedelta(days=3), amount="42"),
        event("purchase", NOW - timedelta(days=4), amount=True),
        event("purchase", NOW - timedelta(days=5), amount=None),
        event("purchase", NOW - timedelta(days=6)),
        event("purchase", NOW - timedelta(days=40), amount=1000),
    ]

    def agg(function: str, op: str, target: Any, **extra: Any) -> dict[str, Any]:
        aggregate = {"function": function, "field": "data.amount", "operator": op, "value": target}
        return {"field": "event.purchase", "aggregate": aggregate, **extra}

    window: dict[str, Any] = {"operator": "triggeredWithin", "value": 30, "unit": "days"}
    assert matches(agg("sum", "equals", 100.5, **window), events=buys)
    assert matches(agg("sum", "equals", 1100.5, operator="triggered"), events=buys)
    assert matches(agg("avg", "equals", 50.25, **window), events=buys)
    assert matches(agg("min", "equals", 40.5, **window), events=buys)
    assert matches(agg("max", "lessThan", 60.5, **window), events=buys)
    assert matches(agg("max", "equals", 1000, operator="triggered"), events=buys)
    assert not matches(agg("sum", "greaterThan", 100.5, **window), events=buys)
    # No numeric value at all: no match, whatever the comparison.
    strings = [event("purchase", NOW, amount="42"), event("purchase", NOW, amount=False)]
    for function in ("sum", "avg", "min", "max"):
        assert not matches(agg(function, "notEquals", 1, operator="triggered"), events=strings)
        assert not matches(agg(function, "lessThan", 1e9, operator="triggered"))
    # Exact decimals: 0.1 + 0.2 is 0.3, and averages are not rounded.
    tenths = [event("purchase", NOW, amount=0.1), event("purchase", NOW, amount=0.2)]
    assert matches(agg("sum", "equals", 0.3, operator="triggered"), events=tenths)
    assert matches(agg("avg", "equals", 0.15, operator="triggered"), events=tenths)
    thirds = [event("purchase", NOW, amount=a) for a in (1, 1, 2)]
    assert matches(
        agg("avg", "greaterThan", 1.3333333333333333, operator="triggered"), events=thirds
    )
    assert matches(agg("avg", "lessThan", 1.3333333333333335, operator="triggered"), events=thirds)
    # ... even past the 28 digits of Python's default decimal context.
    wide = [
        event("purchase", NOW, amount=a) for a in (10**16 + 1, 0.30000000000000004, -(10**16 + 1))
    ]
    assert matches(agg("sum", "equals", 0.30000000000000004, operator="triggered"), events=wide)
    assert matches(agg("avg", "greaterThan", 0.1, operator="triggered"), events=wide)
    assert matches(agg("avg", "lessThan", 0.10000000000000002, operator="triggered"), events=wide)
    # With a count, both must hold; with `where`, only matching occurrences are aggregated.
    f = agg("sum", "greaterThan", 50, **window, count={"operator": "greaterThan", "value": 2})
    assert matches(f, events=buys)  # six occurrences in the window, two of them numbers
    f = agg("sum", "greaterThan", 50, **window, count={"operator": "lessThan", "value": 2})
    assert not matches(f, events=buys)
    f = agg("sum", "equals", 60, operator="triggered", where=[BIG])
    assert matches(f, events=buys[:-1])
