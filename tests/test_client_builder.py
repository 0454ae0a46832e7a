"""The condition builder (segments.F): the JSON it builds, how & and | nest, the mistakes it
refuses, that the service counts a built condition as it counts the same JSON, and that the
README's filter cookbook builds what it shows."""

from __future__ import annotations

import json
import re
from datetime import UTC, date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import json_format

from segments import (
    Aggregate,
    Count,
    Expression,
    F,
    FilterExpression,
    InvalidArgumentError,
    InvalidRequestError,
    SegmentsClient,
    all_of,
    any_of,
    segment_condition,
)
from segments_api.v1 import resources_pb2
from segments_service.errors import ValidationError
from segments_service.filters import parse_condition
from tests.conditions import as_proto, flt, groups_of

SEGMENT_ID = "0b7c3f4e-1d2a-4c5b-9e8f-7a6b5c4d3e2f"
MOMENT = datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC)
MOMENT_TEXT = "2024-05-06T07:08:09+00:00"


# (builder expression, the filter it must build, its repr)
FILTERS: list[tuple[Expression, dict[str, Any], str]] = [
    (
        F.email == "ann@acme.com",
        flt("email", "equals", "ann@acme.com"),
        "F.email == 'ann@acme.com'",
    ),
    (F.email.equals("a@b.co"), flt("email", "equals", "a@b.co"), "F.email == 'a@b.co'"),
    (F.email != "x@y.z", flt("email", "notEquals", "x@y.z"), "F.email != 'x@y.z'"),
    (
        F.email.contains("@acme.com"),
        flt("email", "contains", "@acme.com"),
        "F.email.contains('@acme.com')",
    ),
    (
        F.email.not_contains("@test"),
        flt("email", "notContains", "@test"),
        "F.email.not_contains('@test')",
    ),
    (F.subscribed == True, flt("subscribed", "equals", True), "F.subscribed == True"),  # noqa: E712
    (F.subscribed != False, flt("subscribed", "notEquals", False), "F.subscribed != False"),  # noqa: E712
    (F.subscribed.equals(False), flt("subscribed", "equals", False), "F.subscribed == False"),
    (F.data("plan") == "pro", flt("data.plan", "equals", "pro"), "F.data('plan') == 'pro'"),
    (F.data("n") == 5, flt("data.n", "equals", 5), "F.data('n') == 5"),
    (F.data("vip") == True, flt("data.vip", "equals", True), "F.data('vip') == True"),  # noqa: E712
    (F.data("plan") != "free", flt("data.plan", "notEquals", "free"), "F.data('plan') != 'free'"),
    (F.data("age") > 18, flt("data.age", "greaterThan", 18), "F.data('age') > 18"),
    (F.data("age") < 65.5, flt("data.age", "lessThan", 65.5), "F.data('age') < 65.5"),
    (F.data("age") >= 18, flt("data.age", "greaterThanOrEqual", 18), "F.data('age') >= 18"),
    (F.data("age") <= 65, flt("data.age", "lessThanOrEqual", 65), "F.data('age') <= 65"),
    # Reflected: 18 <= F.data("age") is F.data("age") >= 18.
    (
        18 <= F.data("age"),  # noqa: SIM300
        flt("data.age", "greaterThanOrEqual", 18),
        "F.data('age') >= 18",
    ),
    (
        F.data("address", "city").contains("ber"),
        flt("data.address.city", "contains", "ber"),
        "F.data('address.city').contains('ber')",
    ),
    (
        F.data("name").not_contains("bot"),
        flt("data.name", "notContains", "bot"),
        "F.data('name').not_contains('bot')",
    ),
    (F.data("x").exists(), flt("data.x", "exists"), "F.data('x').exists()"),
    (F.data("a.b").not_exists(), flt("data.a.b", "notExists"), "F.data('a.b').not_exists()"),
    (
        F.data("renewed") > MOMENT,
        flt("data.renewed", "greaterThan", "2024-05-06T07:08:09+00:00"),
        "F.data('renewed') > '2024-05-06T07:08:09+00:00'",
    ),
    (
        F.data("trial").within(timedelta(hours=36)),
        flt("data.trial", "within", 36, "hours"),
        "F.data('trial').within(36, 'hours')",
    ),
    (
        F.data("trial").older_than(2, "days"),
        flt("data.trial", "olderThan", 2, "days"),
        "F.data('trial').older_than(2, 'days')",
    ),
    (
        F.created_at.within(7, "days"),
        flt("createdAt", "within", 7, "days"),
        "F.created_at.within(7, 'days')",
    ),
    (
        F.updated_at.older_than(90, "minutes"),
        flt("updatedAt", "olderThan", 90, "minutes"),
        "F.updated_at.older_than(90, 'minutes')",
    ),
    (
        F.created_at == date(2024, 5, 6),
        flt("createdAt", "equals", "2024-05-06"),
        "F.created_at == '2024-05-06'",
    ),
    (
        F.created_at < datetime(2024, 5, 6, 9, 8, 9, 123456, tzinfo=timezone(timedelta(hours=2))),
        flt("createdAt", "lessThan", "2024-05-06T09:08:09.123456+02:00"),
        "F.created_at < '2024-05-06T09:08:09.123456+02:00'",
    ),
    (
        F.updated_at >= 1714979289000,
        flt("updatedAt", "greaterThanOrEqual", 1714979289000),
        "F.updated_at >= 1714979289000",
    ),
    (
        F.event("login").triggered(),
        flt("event.login", "triggered"),
        "F.event('login').triggered()",
    ),
    (
        F.event("login").triggered_within(30, "minutes"),
        flt("event.login", "triggeredWithin", 30, "minutes"),
        "F.event('login').triggered_within(30, 'minutes')",
    ),
    (
        F.event("purchase").triggered_older_than(timedelta(days=30)),
        flt("event.purchase", "triggeredOlderThan", 30, "days"),
        "F.event('purchase').triggered_older_than(30, 'days')",
    ),
    (
        F.event("purchase").not_triggered(),
        flt("event.purchase", "notTriggered"),
        "F.event('purchase').not_triggered()",
    ),
    (
        F.event("segment.vip.entry").not_triggered_within(1.5, "hours"),
        flt("event.segment.vip.entry", "notTriggeredWithin", 1.5, "hours"),
        "F.event('segment.vip.entry').not_triggered_within(1.5, 'hours')",
    ),
    (
        F.email_activity("opened").triggered_within(7, "days"),
        flt("email.opened", "triggeredWithin", 7, "days"),
        "F.email_activity('opened').triggered_within(7, 'days')",
    ),
    (
        F.email_activity("bounce").triggered(),
        flt("email.bounce", "triggered"),
        "F.email_activity('bounce').triggered()",
    ),
    (
        F.segment(SEGMENT_ID).member(),
        flt(f"segment.{SEGMENT_ID}", "memberOfSegment"),
        f"F.segment('{SEGMENT_ID}').member()",
    ),
    (
        F.segment(resources_pb2.Segment(id=SEGMENT_ID)).not_member(),
        flt(f"segment.{SEGMENT_ID}", "notMemberOfSegment"),
        f"F.segment('{SEGMENT_ID}').not_member()",
    ),
    # --- the value operators of README's Filters --------------------------------------------------
    (
        F.email.in_(["ann@acme.com", "bob@acme.com"]),
        flt("email", "in", ["ann@acme.com", "bob@acme.com"]),
        "F.email.in_(['ann@acme.com', 'bob@acme.com'])",
    ),
    (F.email.not_in(("x@y.z",)), flt("email", "notIn", ["x@y.z"]), "F.email.not_in(['x@y.z'])"),
    (F.email.starts_with("ann"), flt("email", "startsWith", "ann"), "F.email.starts_with('ann')"),
    (
        F.email.ends_with("@acme.com"),
        flt("email", "endsWith", "@acme.com"),
        "F.email.ends_with('@acme.com')",
    ),
    (
        F.data("plan").in_(["pro", "team"]),
        flt("data.plan", "in", ["pro", "team"]),
        "F.data('plan').in_(['pro', 'team'])",
    ),
    # Each element keeps its JSON type (equality is type-exact); a timestamp is spelled as ==
    # spells it.
    (
        F.data("k").in_(v for v in ("5", 5, 1.5, True, MOMENT)),
        flt("data.k", "in", ["5", 5, 1.5, True, MOMENT_TEXT]),
        f"F.data('k').in_(['5', 5, 1.5, True, '{MOMENT_TEXT}'])",
    ),
    (
        F.data("plan").not_in(["free"]),
        flt("data.plan", "notIn", ["free"]),
        "F.data('plan').not_in(['free'])",
    ),
    (
        F.data("name").starts_with("Dr "),
        flt("data.name", "startsWith", "Dr "),
        "F.data('name').starts_with('Dr ')",
    ),
    (
        F.data("site").ends_with(".de"),
        flt("data.site", "endsWith", ".de"),
        "F.data('site').ends_with('.de')",
    ),
    (
        F.data("age").between(18, 30),
        flt("data.age", "between", [18, 30]),
        "F.data('age').between(18, 30)",
    ),
    (
        F.data("x").between(0.5, 1),
        flt("data.x", "between", [0.5, 1]),
        "F.data('x').between(0.5, 1)",
    ),
    # Equal ends are a range of one value.
    (F.data("x").between(7, 7), flt("data.x", "between", [7, 7]), "F.data('x').between(7, 7)"),
    (
        F.data("renewed").between(MOMENT, "2024-06-01T00:00:00Z"),
        flt("data.renewed", "between", [MOMENT_TEXT, "2024-06-01T00:00:00Z"]),
        f"F.data('renewed').between('{MOMENT_TEXT}', '2024-06-01T00:00:00Z')",
    ),
    (
        F.data("day").between(date(2024, 5, 1), date(2024, 5, 31)),
        flt("data.day", "between", ["2024-05-01", "2024-05-31"]),
        "F.data('day').between('2024-05-01', '2024-05-31')",
    ),
    (
        F.data("tags").array_contains("vip"),
        flt("data.tags", "arrayContains", "vip"),
        "F.data('tags').array_contains('vip')",
    ),
    (
        F.data("lucky").array_contains(7),
        flt("data.lucky", "arrayContains", 7),
        "F.data('lucky').array_contains(7)",
    ),
    (
        F.data("flags").array_contains(False),
        flt("data.flags", "arrayContains", False),
        "F.data('flags').array_contains(False)",
    ),
    (
        F.data("trialEndsAt").within_next(7, "days"),
        flt("data.trialEndsAt", "withinNext", 7, "days"),
        "F.data('trialEndsAt').within_next(7, 'days')",
    ),
    (
        F.data("renewsAt").within_next(timedelta(hours=36)),
        flt("data.renewsAt", "withinNext", 36, "hours"),
        "F.data('renewsAt').within_next(36, 'hours')",
    ),
    # --- weeks and months ------------------------------------------------------------------
    (
        F.data("renewsAt").within_next(1, "months"),
        flt("data.renewsAt", "withinNext", 1, "months"),
        "F.data('renewsAt').within_next(1, 'months')",
    ),
    (
        F.created_at.within(2, "weeks"),
        flt("createdAt", "within", 2, "weeks"),
        "F.created_at.within(2, 'weeks')",
    ),
    (
        F.updated_at.older_than(3, "months"),
        flt("updatedAt", "olderThan", 3, "months"),
        "F.updated_at.older_than(3, 'months')",
    ),
    # A timedelta keeps its old spelling (14 days, not 2 weeks).
    (
        F.data("seen").older_than(timedelta(weeks=2)),
        flt("data.seen", "olderThan", 14, "days"),
        "F.data('seen').older_than(14, 'days')",
    ),
    (
        F.event("login").not_triggered_within(1.5, "weeks"),
        flt("event.login", "notTriggeredWithin", 1.5, "weeks"),
        "F.event('login').not_triggered_within(1.5, 'weeks')",
    ),
    # --- counts, where and aggregates --------------------------------------------------------
    (
        F.event("login").triggered_within(30, "minutes", count=F.count >= 3),
        {
            **flt("event.login", "triggeredWithin", 30, "minutes"),
            "count": {"operator": "greaterThanOrEqual", "value": 3},
        },
        "F.event('login').triggered_within(30, 'minutes', count=F.count >= 3)",
    ),
    (
        F.event("login").triggered(count=F.count == 0),
        {**flt("event.login", "triggered"), "count": {"operator": "equals", "value": 0}},
        "F.event('login').triggered(count=F.count == 0)",
    ),
    (
        F.event("login").triggered(count=F.count != 1),
        {**flt("event.login", "triggered"), "count": {"operator": "notEquals", "value": 1}},
        "F.event('login').triggered(count=F.count != 1)",
    ),
    (
        F.event("login").triggered(count=F.count > 1),
        {**flt("event.login", "triggered"), "count": {"operator": "greaterThan", "value": 1}},
        "F.event('login').triggered(count=F.count > 1)",
    ),
    (
        F.event("login").triggered(count=F.count < 3),
        {**flt("event.login", "triggered"), "count": {"operator": "lessThan", "value": 3}},
        "F.event('login').triggered(count=F.count < 3)",
    ),
    # Reflected, as 18 <= F.data("age") is: 5 >= F.count is F.count <= 5.
    (
        F.event("login").triggered(count=5 >= F.count),  # noqa: SIM300
        {
            **flt("event.login", "triggered"),
            "count": {"operator": "lessThanOrEqual", "value": 5},
        },
        "F.event('login').triggered(count=F.count <= 5)",
    ),
    (
        F.event("purchase").triggered(where=[F.data("amount") > 50]),
        {
            **flt("event.purchase", "triggered"),
            "where": [flt("data.amount", "greaterThan", 50)],
        },
        "F.event('purchase').triggered(where=[F.data('amount') > 50])",
    ),
    # `where` ANDs its filters: a list, or one expression joined by &.
    (
        F.event("purchase").triggered(
            where=(F.data("amount") > 50) & F.data("currency").in_(["EUR", "USD"])
        ),
        {
            **flt("event.purchase", "triggered"),
            "where": [
                flt("data.amount", "greaterThan", 50),
                flt("data.currency", "in", ["EUR", "USD"]),
            ],
        },
        "F.event('purchase').triggered(where=[F.data('amount') > 50,"
        " F.data('currency').in_(['EUR', 'USD'])])",
    ),
    (
        F.event("purchase").triggered_older_than(
            30, "days", where=F.data("sku").starts_with("book-")
        ),
        {
            **flt("event.purchase", "triggeredOlderThan", 30, "days"),
            "where": [flt("data.sku", "startsWith", "book-")],
        },
        "F.event('purchase').triggered_older_than(30, 'days',"
        " where=[F.data('sku').starts_with('book-')])",
    ),
    (
        F.event("purchase").not_triggered(where=[F.data("coupon").exists()]),
        {**flt("event.purchase", "notTriggered"), "where": [flt("data.coupon", "exists")]},
        "F.event('purchase').not_triggered(where=[F.data('coupon').exists()])",
    ),
    (
        F.event("purchase").not_triggered_within(
            3, "months", where=[F.data("amount").between(10, 20)]
        ),
        {
            **flt("event.purchase", "notTriggeredWithin", 3, "months"),
            "where": [flt("data.amount", "between", [10, 20])],
        },
        "F.event('purchase').not_triggered_within(3, 'months',"
        " where=[F.data('amount').between(10, 20)])",
    ),
    (
        F.email_activity("clicked").triggered_within(
            7, "days", where=[F.data("url").contains("pricing")]
        ),
        {
            **flt("email.clicked", "triggeredWithin", 7, "days"),
            "where": [flt("data.url", "contains", "pricing")],
        },
        "F.email_activity('clicked').triggered_within(7, 'days',"
        " where=[F.data('url').contains('pricing')])",
    ),
    (
        F.event("purchase").triggered_within(30, "days", aggregate=F.sum("amount") >= 100),
        {
            **flt("event.purchase", "triggeredWithin", 30, "days"),
            "aggregate": {
                "function": "sum",
                "field": "data.amount",
                "operator": "greaterThanOrEqual",
                "value": 100,
            },
        },
        "F.event('purchase').triggered_within(30, 'days', aggregate=F.sum('amount') >= 100)",
    ),
    (
        F.event("rating").triggered(aggregate=F.avg("stars") < 2.5),
        {
            **flt("event.rating", "triggered"),
            "aggregate": {
                "function": "avg",
                "field": "data.stars",
                "operator": "lessThan",
                "value": 2.5,
            },
        },
        "F.event('rating').triggered(aggregate=F.avg('stars') < 2.5)",
    ),
    (
        F.event("purchase").triggered(aggregate=F.min("order", "total") != 0),
        {
            **flt("event.purchase", "triggered"),
            "aggregate": {
                "function": "min",
                "field": "data.order.total",
                "operator": "notEquals",
                "value": 0,
            },
        },
        "F.event('purchase').triggered(aggregate=F.min('order.total') != 0)",
    ),
    # All three at once: where narrows the occurrences that count and aggregate see.
    (
        F.event("purchase").triggered_within(
            1,
            "months",
            where=[F.data("currency") == "EUR"],
            count=F.count >= 2,
            aggregate=F.max("amount") > 500,
        ),
        {
            **flt("event.purchase", "triggeredWithin", 1, "months"),
            "count": {"operator": "greaterThanOrEqual", "value": 2},
            "where": [flt("data.currency", "equals", "EUR")],
            "aggregate": {
                "function": "max",
                "field": "data.amount",
                "operator": "greaterThan",
                "value": 500,
            },
        },
        "F.event('purchase').triggered_within(1, 'months', where=[F.data('currency') == 'EUR'],"
        " count=F.count >= 2, aggregate=F.max('amount') > 500)",
    ),
]


@pytest.mark.parametrize(("built", "expected", "text"), FILTERS, ids=[t for _, _, t in FILTERS])
def test_each_filter_builds_its_json(
    built: Expression, expected: dict[str, Any], text: str
) -> None:
    assert isinstance(built, FilterExpression)
    assert built.to_dict() == groups_of("AND", {"filters": [expected]})
    assert repr(built) == text
    # The repr is the builder code that makes the same filter again.
    assert eval(text, {"F": F}) == built
    # Expressions are values: hashable, lists included.
    assert hash(built) == hash(eval(text, {"F": F}))
    # The service's validator accepts what the builder builds.
    parse_condition(built.to_dict())


def test_the_table_covers_every_operator_unit_and_aggregate() -> None:
    operators = {expected["operator"] for _, expected, _ in FILTERS}
    defined = set(resources_pb2.Filter.Operator.keys()) - {"OPERATOR_UNSPECIFIED"}
    assert operators == defined
    units = {expected["unit"] for _, expected, _ in FILTERS if "unit" in expected}
    assert units == set(resources_pb2.Filter.Unit.keys()) - {"UNIT_UNSPECIFIED"}
    counted = {expected["count"]["operator"] for _, expected, _ in FILTERS if "count" in expected}
    assert counted == {
        "equals",
        "notEquals",
        "greaterThan",
        "greaterThanOrEqual",
        "lessThan",
        "lessThanOrEqual",
    }
    functions = {e["aggregate"]["function"] for _, e, _ in FILTERS if "aggregate" in e}
    assert functions == set(resources_pb2.Filter.Aggregate.Function.keys()) - {
        "FUNCTION_UNSPECIFIED"
    }


def test_counts_and_aggregates_are_values_that_read_back() -> None:
    assert repr(F.count) == "F.count"
    assert repr(F.sum("order", "total")) == "F.sum('order.total')"
    made: list[tuple[Count | Aggregate, str]] = [
        (F.count >= 3, "F.count >= 3"),
        (0 < F.count, "F.count > 0"),  # noqa: SIM300
        (F.sum("amount") >= 100, "F.sum('amount') >= 100"),
        (F.avg("a.b") == 1.5, "F.avg('a.b') == 1.5"),
        (F.min("amount") <= -1, "F.min('amount') <= -1"),
        (F.max("amount") != 0, "F.max('amount') != 0"),
    ]
    for value, text in made:
        assert repr(value) == text
        assert eval(text, {"F": F}) == value
    assert (F.count >= 3) == Count("greaterThanOrEqual", 3)
    assert (F.sum("amount") < 5) == Aggregate("sum", "data.amount", "lessThan", 5)
    assert (F.count >= 3).to_dict() == {"operator": "greaterThanOrEqual", "value": 3}


def test_where_takes_a_list_or_an_and() -> None:
    amount, currency = F.data("amount") > 50, F.data("currency") == "EUR"
    as_list = F.event("purchase").triggered(where=[amount, currency])
    assert F.event("purchase").triggered(where=amount & currency) == as_list
    assert F.event("purchase").triggered(where=(amount,)) == F.event("purchase").triggered(
        where=amount
    )
    # Nested ANDs flatten, as & does.
    nested = F.event("purchase").triggered(where=[all_of(amount, currency), F.data("x").exists()])
    assert [w.field for w in nested.where] == ["data.amount", "data.currency", "data.x"]


def test_filters_made_directly_show_as_made() -> None:
    # Parts F never puts on an operator: shown as the constructor call, not as F code.
    made = FilterExpression("event.x", "notTriggered", count=Count("greaterThan", 1))
    assert repr(made) == "FilterExpression('event.x', 'notTriggered', count=F.count > 1)"
    assert made.to_dict() == groups_of(
        "AND",
        {
            "filters": [
                {
                    "field": "event.x",
                    "operator": "notTriggered",
                    "count": {"operator": "greaterThan", "value": 1},
                }
            ]
        },
    )
    # A falsy value is still shown.
    assert (
        repr(FilterExpression("score", "equals", 0))
        == "FilterExpression('score', 'equals', value=0)"
    )


def test_values_keep_their_json_types() -> None:
    # bool is an int in Python, but true is not 1 in a filter (data equality is type-exact).
    cases: list[tuple[str | float, type]] = [(True, bool), (1, int), (1.5, float), ("1", str)]
    for value, json_type in cases:
        built = (F.data("k") == value).to_dict()
        assert type(built["groups"][0]["filters"][0]["value"]) is json_type


A = F.data("a") == 1
B = F.data("b") == 2
C = F.data("c") == 3
D = F.data("d") == 4
FA, FB, FC, FD = (flt(f"data.{k}", "equals", v) for k, v in zip("abcd", (1, 2, 3, 4), strict=True))

NESTING: list[tuple[Expression, dict[str, Any], str]] = [
    (A & B, groups_of("AND", {"filters": [FA, FB]}), "(F.data('a') == 1) & (F.data('b') == 2)"),
    (
        A | B,
        groups_of("OR", {"filters": [FA]}, {"filters": [FB]}),
        "(F.data('a') == 1) | (F.data('b') == 2)",
    ),
    # Same operator twice is one level, not a nesting per operator.
    (
        (A & B) & C,
        groups_of("AND", {"filters": [FA, FB, FC]}),
        "(F.data('a') == 1) & (F.data('b') == 2) & (F.data('c') == 3)",
    ),
    (
        A & (B & C),
        groups_of("AND", {"filters": [FA, FB, FC]}),
        "(F.data('a') == 1) & (F.data('b') == 2) & (F.data('c') == 3)",
    ),
    (
        A | (B | C),
        groups_of("OR", {"filters": [FA]}, {"filters": [FB]}, {"filters": [FC]}),
        "(F.data('a') == 1) | (F.data('b') == 2) | (F.data('c') == 3)",
    ),
    # An AND inside an OR is one group of it.
    (
        (A & B) | C,
        groups_of("OR", {"filters": [FA, FB]}, {"filters": [FC]}),
        "((F.data('a') == 1) & (F.data('b') == 2)) | (F.data('c') == 3)",
    ),
    # An OR inside an AND is the group's nested condition.
    (
        A & (B | C),
        groups_of(
            "AND",
            {"filters": [FA], "conditions": groups_of("OR", {"filters": [FB]}, {"filters": [FC]})},
        ),
        "(F.data('a') == 1) & ((F.data('b') == 2) | (F.data('c') == 3))",
    ),
    (
        (B | C) & A,
        groups_of(
            "AND",
            {"filters": [FA], "conditions": groups_of("OR", {"filters": [FB]}, {"filters": [FC]})},
        ),
        "((F.data('b') == 2) | (F.data('c') == 3)) & (F.data('a') == 1)",
    ),
    # Two ORs under one AND: a group nests one condition, so the second gets a group of its own.
    (
        (A | B) & (C | D),
        groups_of(
            "AND",
            {"conditions": groups_of("OR", {"filters": [FA]}, {"filters": [FB]})},
            {"conditions": groups_of("OR", {"filters": [FC]}, {"filters": [FD]})},
        ),
        "((F.data('a') == 1) | (F.data('b') == 2)) & ((F.data('c') == 3) | (F.data('d') == 4))",
    ),
    # ... and such an AND inside an OR is a group holding it as its condition.
    (
        ((A | B) & (C | D)) | A,
        groups_of(
            "OR",
            {
                "conditions": groups_of(
                    "AND",
                    {"conditions": groups_of("OR", {"filters": [FA]}, {"filters": [FB]})},
                    {"conditions": groups_of("OR", {"filters": [FC]}, {"filters": [FD]})},
                )
            },
            {"filters": [FA]},
        ),
        "(((F.data('a') == 1) | (F.data('b') == 2)) & ((F.data('c') == 3) | (F.data('d') == 4)))"
        " | (F.data('a') == 1)",
    ),
    # Three levels: AND of (OR of (AND with an OR inside)).
    (
        A & (B | (C & (D | A))),
        groups_of(
            "AND",
            {
                "filters": [FA],
                "conditions": groups_of(
                    "OR",
                    {"filters": [FB]},
                    {
                        "filters": [FC],
                        "conditions": groups_of("OR", {"filters": [FD]}, {"filters": [FA]}),
                    },
                ),
            },
        ),
        "(F.data('a') == 1) & ((F.data('b') == 2) | ((F.data('c') == 3) & ((F.data('d') == 4) | (F.data('a') == 1))))",
    ),
    (
        all_of(A, B, C),
        groups_of("AND", {"filters": [FA, FB, FC]}),
        "(F.data('a') == 1) & (F.data('b') == 2) & (F.data('c') == 3)",
    ),
    (
        any_of(A, all_of(B, C)),
        groups_of("OR", {"filters": [FA]}, {"filters": [FB, FC]}),
        "(F.data('a') == 1) | ((F.data('b') == 2) & (F.data('c') == 3))",
    ),
    (all_of(A), groups_of("AND", {"filters": [FA]}), "F.data('a') == 1"),
    (any_of(A), groups_of("AND", {"filters": [FA]}), "F.data('a') == 1"),
]


@pytest.mark.parametrize(("built", "expected", "text"), NESTING, ids=[t for _, _, t in NESTING])
def test_and_or_nest_into_groups(built: Expression, expected: dict[str, Any], text: str) -> None:
    assert built.to_dict() == expected
    assert repr(built) == text


def test_expressions_compare_by_structure() -> None:
    assert all_of(A, B) == (A & B)
    assert (A & B) != (B & A)
    assert {A, A & B} == {F.data("a") == 1, all_of(A, B)}


MISTAKES: list[tuple[Any, type[Exception], str]] = [
    (lambda: F.data("x").within(7, "fortnights"), ValueError, "unknown unit 'fortnights'"),  # type: ignore[arg-type]
    (lambda: F.created_at.older_than(1, "Days"), ValueError, "unknown unit"),  # type: ignore[arg-type]
    (lambda: F.event("e").triggered_within(7), ValueError, "unknown unit None"),
    (lambda: F.data("x").within(-1, "days"), ValueError, "must be a positive number"),
    (lambda: F.event("e").triggered_within(0, "days"), ValueError, "must be a positive number"),
    (lambda: F.event("e").triggered_within(float("nan"), "days"), ValueError, "positive"),
    (lambda: F.event("e").triggered_within(timedelta(0)), ValueError, "must be positive"),
    (lambda: F.event("e").triggered_within(timedelta(seconds=90)), ValueError, "whole number"),
    (lambda: F.event("e").triggered_within(timedelta(days=1), "days"), TypeError, "not both"),
    (lambda: F.event("e").triggered_within(True, "days"), TypeError, "number of units"),
    (lambda: F.event("e").triggered_within("7", "days"), TypeError, "number of units"),  # type: ignore[arg-type]
    # An event and a segment hold no value to compare.
    (lambda: F.event("login") == 3, TypeError, r"F.event\('login'\) does not support =="),
    (lambda: F.event("login") != 3, TypeError, r"\.triggered\(\)"),
    (lambda: F.event("login") >= 3, TypeError, "does not support >="),
    (lambda: F.email_activity("opened") > 1, TypeError, "does not support >"),
    (lambda: F.segment(SEGMENT_ID) == SEGMENT_ID, TypeError, r"\.member\(\)"),
    # Orderings where there is no order.
    (lambda: F.email < "m", TypeError, r"F.email does not support <; use ==, !="),
    (lambda: F.subscribed > False, TypeError, "does not support >"),
    # Values of the wrong type.
    (lambda: F.subscribed == 1, TypeError, "True or False only"),
    (lambda: F.subscribed == "true", TypeError, "True or False only"),
    (lambda: F.email == 5, TypeError, "takes a string"),
    (lambda: F.data("x").contains(5), TypeError, "takes a string"),  # type: ignore[arg-type]
    (lambda: F.data("x") > True, TypeError, "number or a timestamp"),
    (lambda: F.data("x") > None, TypeError, "exists"),  # type: ignore[operator]
    (lambda: F.data("x") == None, TypeError, "exists"),  # noqa: E711
    (lambda: F.data("x") == [1, 2], TypeError, "got list"),
    (lambda: F.data("x") == float("inf"), ValueError, "not a finite number"),
    (lambda: F.created_at > 1.5, TypeError, "epoch"),  # type: ignore[operator]
    (lambda: F.created_at > datetime(2024, 1, 1), ValueError, "has no time zone"),
    # Names.
    (lambda: F.data(""), ValueError, "empty key"),
    (lambda: F.data("a..b"), ValueError, "empty key"),
    (lambda: F.data(), ValueError, "empty key"),
    (lambda: F.data(1), TypeError, "F.data takes a string"),  # type: ignore[arg-type]
    (lambda: F.event(""), ValueError, "must not be empty"),
    (lambda: F.email_activity("read"), ValueError, "unknown email activity 'read'"),
    (lambda: F.segment(""), TypeError, "segment id or a Segment"),
    (lambda: F.segment(42), TypeError, "segment id or a Segment"),  # type: ignore[arg-type]
    # Python's precedence: & binds before ==, so an unparenthesised mix is refused.
    (lambda: F.data("plan") == "pro" & F.subscribed == True, TypeError, "parentheses|bind tighter"),  # noqa: E712
    (lambda: (F.data("a") == 1) & F.subscribed, TypeError, "bind tighter"),
    (lambda: (F.data("a") == 1) | "x", TypeError, "bind tighter"),  # type: ignore[operator]
    (lambda: "x" | (F.data("a") == 1), TypeError, "bind tighter"),
    # `and`, `or` and chained comparisons would drop a part silently.
    (lambda: (F.data("a") == 1) and (F.data("b") == 2), TypeError, "no truth value"),
    (lambda: 18 <= F.data("age") < 65, TypeError, "no truth value"),
    (lambda: bool(F.subscribed), TypeError, "truth testing"),
    (lambda: all_of(), ValueError, "at least one"),
    (lambda: any_of([A, B]), TypeError, "unpack a list with"),  # type: ignore[arg-type]
    (lambda: all_of(A, {"logic": "AND"}), TypeError, "takes conditions, got dict"),  # type: ignore[arg-type]
    # Windows: months are whole, and no window spans more than 36525 days (1200 months).
    (lambda: F.created_at.within(1.5, "months"), ValueError, "whole numbers"),
    (lambda: F.data("x").within_next(1201, "months"), ValueError, "at most 1200 months"),
    (lambda: F.data("x").within_next(36526, "days"), ValueError, "at most 36525 days"),
    (lambda: F.data("x").within_next(5219, "weeks"), ValueError, "at most 36525 days"),
    (lambda: F.created_at.older_than(timedelta(days=36526)), ValueError, "at most 36525 days"),
    (lambda: F.data("x").within_next(0, "days"), ValueError, "must be a positive number"),
    (lambda: F.data("x").within_next(7), ValueError, "unknown unit None"),
    # Value operators: the tests that do not apply are not there.
    (lambda: F.created_at.within_next(7, "days"), AttributeError, "within_next"),  # type: ignore[attr-defined]
    (lambda: F.email.between(1, 2), AttributeError, "between"),  # type: ignore[attr-defined]
    (lambda: F.subscribed.in_([True]), AttributeError, "in_"),  # type: ignore[attr-defined]
    # in_ / not_in: a list of 1 to 100 scalars.
    (lambda: F.data("x").in_([]), ValueError, "1 to 100 values, got 0"),
    (lambda: F.data("x").in_(range(101)), ValueError, "1 to 100 values, got 101"),
    (lambda: F.data("x").in_("pro"), TypeError, "take a list of values, got str"),
    (lambda: F.data("x").not_in({"a": 1}), TypeError, "take a list of values, got dict"),
    (lambda: F.data("x").in_(5), TypeError, "take a list of values, got int"),  # type: ignore[arg-type]
    (lambda: F.data("x").in_([None]), TypeError, "no None"),  # type: ignore[list-item]
    (lambda: F.data("x").in_([[1, 2]]), TypeError, "holds scalars, got a list"),  # type: ignore[list-item]
    (lambda: F.data("x").not_in([{"a": 1}]), TypeError, "holds scalars, got a dict"),  # type: ignore[list-item]
    (lambda: F.data("x").in_([float("nan")]), ValueError, "not a finite number"),
    (lambda: F.data("x").in_([datetime(2024, 1, 1)]), ValueError, "has no time zone"),
    (lambda: F.email.in_(["a@b.co", 1]), TypeError, "takes a string, got int"),  # type: ignore[list-item]
    (lambda: F.email.not_in([]), ValueError, "1 to 100 values"),
    (lambda: F.email.starts_with(None), TypeError, "takes a string"),  # type: ignore[arg-type]
    (lambda: F.data("x").ends_with(5), TypeError, "takes a string"),  # type: ignore[arg-type]
    # between: two numbers or two timestamps, low <= high.
    (lambda: F.data("x").between(5, 1), ValueError, "low 5 is above its high 1"),
    (
        lambda: F.data("x").between("2024-06-01T00:00:00Z", MOMENT),
        ValueError,
        "is above its high",
    ),
    (lambda: F.data("x").between(1, MOMENT), TypeError, "two numbers or two timestamps"),
    (lambda: F.data("x").between(True, 2), TypeError, "numbers or timestamps, got True"),
    (lambda: F.data("x").between(None, 2), TypeError, "numbers or timestamps, got None"),  # type: ignore[arg-type]
    (lambda: F.data("x").between("soon", "later"), ValueError, "not an RFC 3339 timestamp"),
    (lambda: F.data("x").between(0, float("inf")), ValueError, "not a finite number"),
    (lambda: F.data("x").between([1], 2), TypeError, "got list"),  # type: ignore[arg-type]
    # array_contains: one scalar.
    (lambda: F.data("x").array_contains(["vip"]), TypeError, "one scalar, got list"),  # type: ignore[arg-type]
    (lambda: F.data("x").array_contains(None), TypeError, "not None"),  # type: ignore[arg-type]
    (lambda: F.data("x").array_contains(MOMENT), TypeError, "got datetime"),  # type: ignore[arg-type]
    # Counts: a comparison of F.count with a whole number from 0 to 10^9; on triggered and
    # triggered_within only (the others have no such argument).
    (lambda: F.event("e").triggered(count=3), TypeError, r"count=F.count >= 3"),  # type: ignore[arg-type]
    (lambda: F.event("e").triggered(count=(">=", 3)), TypeError, r"comparison of F.count"),  # type: ignore[arg-type]
    (lambda: F.event("e").not_triggered(count=F.count >= 3), TypeError, "unexpected keyword"),  # type: ignore[call-arg]
    (
        lambda: F.event("e").triggered_older_than(1, "days", aggregate=F.sum("a") > 1),  # type: ignore[call-arg]
        TypeError,
        "unexpected keyword",
    ),
    (lambda: F.count >= -1, ValueError, "0 to 1,000,000,000, got -1"),
    (lambda: F.count >= 10**9 + 1, ValueError, "0 to 1,000,000,000"),
    (lambda: F.count >= 2.5, TypeError, "whole number, got 2.5"),
    (lambda: F.count >= True, TypeError, "whole number, got True"),
    (lambda: 1 <= F.count <= 5, TypeError, "no truth value"),
    (lambda: bool(F.count), TypeError, "no truth value"),
    # Aggregates: a comparison of F.sum/avg/min/max with a finite number.
    (lambda: F.event("e").triggered(aggregate=F.sum("a")), TypeError, "comparison of F.sum"),  # type: ignore[arg-type]
    (lambda: F.sum("amount") >= "100", TypeError, "compares with a number"),
    (lambda: F.avg("amount") > False, TypeError, "compares with a number"),
    (lambda: F.max("amount") < float("inf"), ValueError, "not a finite number"),
    (lambda: F.min(""), ValueError, "empty key"),
    (lambda: F.sum(), ValueError, "empty key"),
    (lambda: 0 < F.sum("a") < 5, TypeError, "no truth value"),
    # where: data filters with value tests, ANDed, at least one.
    (lambda: F.event("e").triggered(where=[]), ValueError, "at least one filter"),
    (lambda: F.event("e").triggered(where=[F.email == "a@b.co"]), TypeError, "occurrence's data"),
    (
        lambda: F.event("e").not_triggered(where=[F.event("x").triggered()]),
        TypeError,
        "occurrence's data",
    ),
    (
        lambda: F.event("e").triggered(where=[F.data("at").within(1, "days")]),
        TypeError,
        "a value test, not within",
    ),
    (
        lambda: F.event("e").triggered(where=[F.data("at").within_next(1, "days")]),
        TypeError,
        "a value test, not withinNext",
    ),
    (lambda: F.event("e").triggered(where=A | B), TypeError, "ANDed; .* is an OR"),
    (lambda: F.event("e").triggered(where=[A, A | B]), TypeError, "is an OR"),
    (lambda: F.event("e").triggered(where=F.data("a")), TypeError, "got DataField"),  # type: ignore[arg-type]
    (lambda: F.event("e").triggered(where="data.a"), TypeError, "got str"),  # type: ignore[arg-type]
    (lambda: F.event("e").triggered(where={"field": "data.a"}), TypeError, "got dict"),  # type: ignore[dict-item]
]


@pytest.mark.parametrize(("mistake", "error", "message"), MISTAKES)
def test_mistakes_are_refused_when_built(
    mistake: Any, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        mistake()


# (what the builder takes at a limit of the service, the same one step over it as JSON)
LIMITS: list[tuple[Expression, dict[str, Any]]] = [
    (F.created_at.within(36525, "days"), flt("createdAt", "within", 36526, "days")),
    (F.data("t").within_next(5217, "weeks"), flt("data.t", "withinNext", 5218, "weeks")),
    (F.data("t").older_than(1200, "months"), flt("data.t", "olderThan", 1201, "months")),
    (
        F.event("e").triggered_within(36525 * 24, "hours"),
        flt("event.e", "triggeredWithin", 36525 * 24 + 1, "hours"),
    ),
    (F.data("n").in_(range(100)), flt("data.n", "in", list(range(101)))),
    (
        F.event("e").triggered(count=F.count <= 10**9),
        {**flt("event.e", "triggered"), "count": {"operator": "lessThan", "value": 10**9 + 1}},
    ),
]


@pytest.mark.parametrize(("at_limit", "over"), LIMITS, ids=[repr(b)[:60] for b, _ in LIMITS])
def test_the_builder_keeps_the_service_limits(at_limit: Expression, over: dict[str, Any]) -> None:
    parse_condition(at_limit.to_dict())
    with pytest.raises(ValidationError):
        parse_condition(groups_of("AND", {"filters": [over]}))


def test_naive_and_aware_times_are_told_apart() -> None:
    # An aware datetime keeps its offset; the service compares instants.
    paris = timezone(timedelta(hours=1))
    built = (F.created_at >= datetime(2024, 1, 1, 1, 0, tzinfo=paris)).to_dict()
    assert built["groups"][0]["filters"][0]["value"] == "2024-01-01T01:00:00+01:00"


# --- through the client and a real server ----------------------------------------------------


def seed(client: SegmentsClient) -> dict[str, str]:
    """Six contacts with data and events; returns a segment id in `vip`."""
    client.batch_upsert_contacts(
        [
            {"email": "ann@acme.com", "data": {"plan": "pro", "age": 34, "tags": "a"}},
            {"email": "bob@acme.com", "subscribed": False, "data": {"plan": "pro", "age": 17}},
            {"email": "cat@example.com", "data": {"plan": "free", "age": 51, "vip": True}},
            {"email": "dan@example.com", "data": {"plan": "free", "age": "40"}},
            {"email": "eve@example.com", "data": {"address": {"city": "Berlin"}}},
            {"email": "fay@acme.com", "subscribed": False},
        ]
    )
    now = datetime.now(UTC)
    client.ingest_events(
        [
            {"email": "ann@acme.com", "event": "login", "occurredAt": now - timedelta(minutes=5)},
            {"email": "bob@acme.com", "event": "login", "occurredAt": now - timedelta(hours=3)},
            {
                "email": "cat@example.com",
                "event": "purchase",
                "occurredAt": now - timedelta(days=40),
            },
            {
                "email": "dan@example.com",
                "event": "purchase",
                "occurredAt": now - timedelta(days=1),
            },
            {
                "email": "eve@example.com",
                "event": "email.open",
                "occurredAt": now - timedelta(days=2),
            },
        ]
    )
    vip = client.create_segment("VIP", type="STATIC")
    client.add_segment_members(vip.id, ["ann@acme.com", "cat@example.com"])
    return {"vip": vip.id}


def test_built_conditions_count_as_the_same_json(client: SegmentsClient) -> None:
    vip = seed(client)["vip"]
    cases: list[tuple[Expression, dict[str, Any], int]] = [
        (
            F.data("plan") == "pro",
            groups_of("AND", {"filters": [flt("data.plan", "equals", "pro")]}),
            2,
        ),
        (
            F.email.contains("@ACME.com") & (F.subscribed == True),  # noqa: E712
            groups_of(
                "AND",
                {
                    "filters": [
                        flt("email", "contains", "@ACME.com"),
                        flt("subscribed", "equals", True),
                    ]
                },
            ),
            1,
        ),
        (
            # "40" is a string: ordering compares numbers only.
            (F.data("age") >= 18) | F.data("vip").exists(),
            groups_of(
                "OR",
                {"filters": [flt("data.age", "greaterThanOrEqual", 18)]},
                {"filters": [flt("data.vip", "exists")]},
            ),
            2,
        ),
        (
            F.event("login").triggered_within(30, "minutes"),
            groups_of("AND", {"filters": [flt("event.login", "triggeredWithin", 30, "minutes")]}),
            1,
        ),
        (
            F.event("purchase").not_triggered() & F.created_at.within(7, "days"),
            groups_of(
                "AND",
                {
                    "filters": [
                        flt("event.purchase", "notTriggered"),
                        flt("createdAt", "within", 7, "days"),
                    ]
                },
            ),
            4,
        ),
        (
            F.event("purchase").triggered_older_than(30, "days"),
            groups_of(
                "AND", {"filters": [flt("event.purchase", "triggeredOlderThan", 30, "days")]}
            ),
            1,
        ),
        (
            F.email_activity("opened").triggered_within(7, "days"),
            groups_of("AND", {"filters": [flt("email.opened", "triggeredWithin", 7, "days")]}),
            1,
        ),
        (
            F.segment(vip).member() & (F.data("plan") != "pro"),
            groups_of(
                "AND",
                {
                    "filters": [
                        flt(f"segment.{vip}", "memberOfSegment"),
                        flt("data.plan", "notEquals", "pro"),
                    ]
                },
            ),
            1,
        ),
        (
            F.segment(vip).not_member() & F.data("address", "city").contains("ber"),
            groups_of(
                "AND",
                {
                    "filters": [
                        flt(f"segment.{vip}", "notMemberOfSegment"),
                        flt("data.address.city", "contains", "ber"),
                    ]
                },
            ),
            1,
        ),
        (
            ((F.data("plan") == "pro") | (F.data("plan") == "free"))
            & ((F.subscribed == False) | F.event("purchase").triggered()),  # noqa: E712
            groups_of(
                "AND",
                {
                    "conditions": groups_of(
                        "OR",
                        {"filters": [flt("data.plan", "equals", "pro")]},
                        {"filters": [flt("data.plan", "equals", "free")]},
                    )
                },
                {
                    "conditions": groups_of(
                        "OR",
                        {"filters": [flt("subscribed", "equals", False)]},
                        {"filters": [flt("event.purchase", "triggered")]},
                    )
                },
            ),
            3,
        ),
    ]
    for built, as_json, expected in cases:
        assert built.to_dict() == as_json
        assert client.count_matching_contacts(built) == client.count_matching_contacts(as_json)
        assert client.count_matching_contacts(built) == expected, repr(built)


def test_segments_take_built_conditions(client: SegmentsClient) -> None:
    seed(client)
    built = (F.data("plan") == "pro") & F.event("login").triggered()
    segment = client.create_segment("Active pro", condition=built)
    assert segment.member_count == 2
    stored = segment_condition(segment)
    assert stored is not None
    assert json_format.MessageToDict(stored) == built.to_dict()

    narrower = built & F.event("login").triggered_within(1, "hours")
    assert client.update_segment(segment.id, condition=narrower).member_count == 1


# --- the extended filter language, through a real server --------------------------------


def seed_language(client: SegmentsClient) -> None:
    """Five contacts and their events for the tests of the extended language, relative to now."""
    now = datetime.now(UTC)
    client.batch_upsert_contacts(
        [
            {
                "email": "ann@acme.com",
                "data": {
                    "plan": "pro",
                    "age": 34,
                    "tags": ["vip", "beta"],
                    "trialEndsAt": (now + timedelta(days=3)).isoformat(),
                },
            },
            {
                "email": "bob@acme.com",
                "data": {
                    "plan": "team",
                    "age": 17,
                    "tags": ["beta"],
                    "trialEndsAt": (now + timedelta(days=10)).isoformat(),
                },
            },
            {
                "email": "cat@example.com",
                "data": {
                    "plan": "free",
                    "age": 18,
                    "tags": "vip",  # a string, not an array holding it
                    "trialEndsAt": (now - timedelta(days=1)).isoformat(),
                },
            },
            {"email": "dan@example.com", "data": {"plan": "enterprise", "age": "30"}},
            {"email": "eve@example.org"},
        ]
    )

    def event(email: str, name: str, ago: timedelta, **data: Any) -> dict[str, Any]:
        return {"email": email, "event": name, "occurredAt": now - ago, "data": data}

    client.ingest_events(
        [
            event("ann@acme.com", "login", timedelta(minutes=1)),
            event("ann@acme.com", "login", timedelta(minutes=2)),
            event("ann@acme.com", "login", timedelta(minutes=10)),
            event("bob@acme.com", "login", timedelta(minutes=5)),
            event("ann@acme.com", "purchase", timedelta(days=5), amount=60),
            event("ann@acme.com", "purchase", timedelta(days=40), amount=50),
            event("bob@acme.com", "purchase", timedelta(days=2), amount=30),
            event("bob@acme.com", "purchase", timedelta(days=3), amount=80),
            event("cat@example.com", "purchase", timedelta(days=100), amount=200),
            event("dan@example.com", "email.open", timedelta(days=3)),
            event("dan@example.com", "email.click", timedelta(days=3), url="https://x.io/Pricing"),
            event("eve@example.org", "email.open", timedelta(days=1)),
        ]
    )


def test_the_new_language_is_accepted_and_matches(client: SegmentsClient) -> None:
    seed_language(client)
    now = datetime.now(UTC)
    cases: list[tuple[Expression, int]] = [
        # Value tests on contact data and the email.
        (F.data("plan").in_(["pro", "team"]), 2),
        (F.data("plan").not_in(["pro"]), 3),  # eve has no plan: a negation never matches her
        (F.email.in_(["ANN@acme.com", "eve@example.org"]), 2),
        (F.email.not_in(["ann@acme.com"]), 4),
        (F.email.ends_with("@ACME.com"), 2),
        (F.email.starts_with("D"), 1),
        (F.data("plan").starts_with("PR"), 1),
        (F.data("plan").ends_with("e"), 2),
        (F.data("age").between(18, 34), 2),  # "30" is a string
        (F.data("tags").array_contains("vip"), 1),  # cat's tags are a string
        (F.data("trialEndsAt").between(now - timedelta(days=2), now + timedelta(days=5)), 2),
        # withinNext and the new units.
        (F.data("trialEndsAt").within_next(7, "days"), 1),
        (F.data("trialEndsAt").within_next(2, "weeks"), 2),
        (F.data("trialEndsAt").within_next(1, "months"), 2),
        (F.created_at.within(1, "weeks"), 5),
        # Counts: a count zero satisfies also matches the contacts without the event.
        (F.event("login").triggered_within(30, "minutes", count=F.count >= 3), 1),
        (F.event("login").triggered(count=F.count < 3), 4),
        (F.event("login").triggered(count=F.count == 1), 1),
        # where: only the matching occurrences are considered.
        (F.event("purchase").triggered(where=[F.data("amount") > 50]), 3),
        (F.event("purchase").not_triggered(where=[F.data("amount") >= 100]), 4),
        (F.event("purchase").triggered_older_than(30, "days", where=[F.data("amount") == 50]), 1),
        (F.email_activity("clicked").triggered(where=[F.data("url").contains("pricing")]), 1),
        # Aggregates, with where and count.
        (F.event("purchase").triggered_within(30, "days", aggregate=F.sum("amount") >= 100), 1),
        (F.event("purchase").triggered(count=F.count == 2, aggregate=F.min("amount") >= 50), 1),
        (
            F.event("purchase").triggered_within(
                30,
                "days",
                where=[F.data("amount") >= 50],
                count=F.count >= 1,
                aggregate=F.max("amount") > 70,
            ),
            1,
        ),
        # Calendar months.
        (F.event("purchase").not_triggered_within(3, "months"), 3),
        (F.event("purchase").triggered_older_than(3, "months"), 1),
        (
            F.email_activity("opened").triggered_within(2, "weeks")
            & F.email_activity("clicked").not_triggered_within(2, "weeks"),
            1,
        ),
    ]
    for built, expected in cases:
        # The client encodes every part the builder wrote ...
        assert json_format.MessageToDict(as_proto(built)) == built.to_dict(), repr(built)
        # ... and the service counts the built condition as it counts its JSON.
        assert client.count_matching_contacts(built) == expected, repr(built)
        assert client.count_matching_contacts(built.to_dict()) == expected, repr(built)

    # A segment stores such a condition and gives it back as built.
    built = F.event("purchase").triggered_within(
        30, "days", where=[F.data("amount") > 10], aggregate=F.sum("amount") >= 100
    ) | F.data("tags").array_contains("vip")
    segment = client.create_segment("Big spenders", condition=built)
    assert segment.member_count == 2
    stored = segment_condition(segment)
    assert stored is not None
    assert json_format.MessageToDict(stored) == built.to_dict()


# --- dicts the client cannot encode ----------------------------------------------------------

BAD_DICTS: list[tuple[Any, list[str]]] = [
    (
        groups_of("AND", {"filters": [{"field": "email", "operator": "resembles"}]}),
        ["condition.groups.0.filters.0.operator"],
    ),
    (
        groups_of("XOR", {"filters": [flt("email", "exists")]}),
        ["condition.logic"],
    ),
    (
        groups_of(
            "OR",
            {"filters": [flt("email", "exists")]},
            {
                "conditions": groups_of(
                    "AND", {"filters": [flt("data.t", "within", 1, "fortnights")]}
                )
            },
        ),
        ["condition.groups.1.conditions.groups.0.filters.0.unit"],
    ),
    (
        groups_of("AND", {"filters": [{"field": "email", "operator": "exists", "vlaue": 1}]}),
        ["condition.groups.0.filters.0.vlaue"],
    ),
    (
        {"logic": "AND", "groups": [{"filter": []}]},
        ["condition.groups.0.filter"],
    ),
    (
        {"logic": "AND", "groups": {"filters": []}},
        ["condition.groups"],
    ),
    (
        groups_of("AND", {"filters": [{"field": 7, "operator": "equals", "value": object()}]}),
        ["condition.groups.0.filters.0.field", "condition.groups.0.filters.0.value"],
    ),
    (
        groups_of("AND", {"filters": ["email equals x", {"field": "email", "operator": 3}]}),
        ["condition.groups.0.filters.0", "condition.groups.0.filters.1.operator"],
    ),
]


@pytest.mark.parametrize(("bad", "fields"), BAD_DICTS)
def test_bad_dicts_raise_the_typed_error_with_field_paths(
    client: SegmentsClient, bad: Any, fields: list[str]
) -> None:
    for send in (
        lambda: client.create_segment("Bad", condition=bad),
        lambda: client.count_matching_contacts(bad),
    ):
        with pytest.raises(InvalidRequestError) as caught:
            send()
        err = caught.value
        # One except clause catches it wherever the condition was found invalid.
        assert isinstance(err, InvalidArgumentError)
        assert isinstance(err, ValueError)
        assert err.status_code == grpc.StatusCode.INVALID_ARGUMENT
        assert err.reason == "VALIDATION_ERROR"
        assert [v.field for v in err.field_violations] == fields
        assert all(v.description and v.reason for v in err.field_violations)
        assert fields[0] in str(err)
        assert "Failed to parse" not in str(err)  # protobuf's own wording
    assert client.list_segments() == []


def test_the_unknown_operator_message_names_the_known_ones(client: SegmentsClient) -> None:
    bad = groups_of("AND", {"filters": [{"field": "email", "operator": "resembles"}]})
    with pytest.raises(InvalidRequestError) as caught:
        client.create_segment("Bad", condition=bad)
    (violation,) = caught.value.field_violations
    assert "unknown operator 'resembles'" in violation.description
    assert "triggeredWithin" in violation.description
    assert violation.reason == "invalid_enum"


def test_nulls_are_absent_keys(client: SegmentsClient) -> None:
    seed(client)
    # JSON null where a key may be left out, as REST bodies are read.
    spelled = {
        "logic": "AND",
        "groups": [
            {
                "filters": [
                    {"field": "data.vip", "operator": "exists", "value": None, "unit": None}
                ],
                "conditions": None,
            }
        ],
    }
    assert client.count_matching_contacts(spelled) == client.count_matching_contacts(
        F.data("vip").exists()
    )


def test_bad_batch_items_raise_the_typed_error(client: SegmentsClient) -> None:
    with pytest.raises(InvalidRequestError) as contacts:
        client.batch_upsert_contacts([{"email": "a@b.co"}, {"email": "c@d.co", "subscribd": True}])
    assert [v.field for v in contacts.value.field_violations] == ["contacts.1"]
    with pytest.raises(InvalidRequestError) as events:
        client.ingest_events(
            [{"email": "a@b.co", "event": "x", "occurredAt": datetime(2024, 1, 1)}]
        )
    assert [v.field for v in events.value.field_violations] == ["events.0"]
    assert "time zone" in str(events.value)


# --- the README's filter cookbook -----------------------------------------------------------

README = Path(__file__).resolve().parent.parent / "README.md"
_RECIPE = re.compile(
    r"\*\*(?P<question>[^*]+)\*\*.*?```json\n(?P<json>.*?)```\s*```python\n(?P<python>.*?)```",
    re.DOTALL,
)


def cookbook() -> list[tuple[str, str, str]]:
    """(question, JSON, Python) of each recipe of README.md's "Filter cookbook" section."""
    text = README.read_text(encoding="utf-8")
    section = text.split("\n## Filter cookbook\n", 1)[1].split("\n## ", 1)[0]
    return [(m["question"], m["json"], m["python"]) for m in _RECIPE.finditer(section)]


def test_the_cookbook_has_its_ten_recipes() -> None:
    recipes = COOKBOOK
    assert len(recipes) == 10, [q for q, _, _ in recipes]
    # Every block of the section belongs to a recipe: none is left unchecked.
    section = README.read_text(encoding="utf-8").split("\n## Filter cookbook\n", 1)[1]
    section = section.split("\n## ", 1)[0]
    assert section.count("```json") == section.count("```python") == len(recipes)


COOKBOOK = cookbook()


@pytest.mark.parametrize(("question", "shown", "code"), COOKBOOK, ids=[q for q, _, _ in COOKBOOK])
def test_each_recipe_builds_the_json_it_shows(question: str, shown: str, code: str) -> None:
    condition = json.loads(shown)
    built = eval(code, {"F": F, "all_of": all_of, "any_of": any_of})
    assert isinstance(built, Expression), question
    assert built.to_dict() == condition, question
    # The service's validator accepts it as written.
    parse_condition(condition)
