"""The condition builder (segments.F): the JSON it builds, how & and | nest, the mistakes it
refuses, and that the service counts a built condition as it counts the same JSON."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta, timezone
from typing import Any

import grpc
import pytest
from google.protobuf import json_format

from segments import (
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
from tests.conditions import flt, groups_of

SEGMENT_ID = "0b7c3f4e-1d2a-4c5b-9e8f-7a6b5c4d3e2f"
MOMENT = datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC)


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
]


@pytest.mark.parametrize(("built", "expected", "text"), FILTERS, ids=[t for _, _, t in FILTERS])
def test_each_filter_builds_its_json(
    built: Expression, expected: dict[str, Any], text: str
) -> None:
    assert isinstance(built, FilterExpression)
    assert built.to_dict() == groups_of("AND", {"filters": [expected]})
    assert repr(built) == text


def test_the_table_covers_every_operator() -> None:
    operators = {expected["operator"] for _, expected, _ in FILTERS}
    defined = set(resources_pb2.Filter.Operator.keys()) - {"OPERATOR_UNSPECIFIED"}
    assert operators == defined


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
    (lambda: F.data("x").within(7, "weeks"), ValueError, "unknown unit 'weeks'"),  # type: ignore[arg-type]
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
]


@pytest.mark.parametrize(("mistake", "error", "message"), MISTAKES)
def test_mistakes_are_refused_when_built(
    mistake: Any, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        mistake()


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
