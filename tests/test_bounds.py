"""Bounded conditions and data (docs/limits.md): each limit holds at its edge over gRPC and REST,
over-long input is a fast 400 naming the field, never a crash, and the compiled statement
grows linearly with the condition."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import create_engine

from segments import InvalidArgumentError, SegmentsClient
from segments_service.contacts import MAX_JSON_DEPTH, check_json
from segments_service.errors import ValidationError
from segments_service.filters import (
    MAX_EXPANDED_DEPTH,
    MAX_EXPANDED_FILTERS,
    MAX_FIELD_LENGTH,
    MAX_FIELD_PARTS,
    MAX_FILTERS,
    MAX_STRING_VALUE,
    CompileContext,
    SegmentDefinition,
    check_expansion,
    compile_count,
    compile_members,
    parse_condition,
)
from tests.conditions import cond, flt
from tests.conftest import Project, Rest
from tests.rest_helpers import Api, check_error

F0 = "condition.groups.0.filters.0"
# The service's dialect, to compile statements without a database.
DIALECT = create_engine("postgresql+psycopg://").dialect


def violations(raw: Any) -> list[tuple[str, str]]:
    with pytest.raises(ValidationError) as caught:
        parse_condition(raw)
    return [(v.field, v.code) for v in caught.value.violations]


def data_path(keys: int, key: str = "k") -> str:
    return "data." + ".".join([key] * keys)


# --- field paths -------------------------------------------------------------------------


def test_field_length_limit_at_its_edge() -> None:
    longest = "data." + "k" * (MAX_FIELD_LENGTH - len("data."))
    parse_condition(cond(flt(longest, "exists")))
    parse_condition(cond(flt("e" * MAX_FIELD_LENGTH, "triggered")))
    assert violations(cond(flt(longest + "k", "exists"))) == [(f"{F0}.field", "too_long")]
    assert violations(cond(flt("e" * (MAX_FIELD_LENGTH + 1), "triggered"))) == [
        (f"{F0}.field", "too_long")
    ]


def test_field_parts_limit_at_its_edge() -> None:
    parse_condition(cond(flt(data_path(MAX_FIELD_PARTS - 1), "exists")))
    parse_condition(cond(flt(".".join(["e"] * MAX_FIELD_PARTS), "triggered")))
    assert violations(cond(flt(data_path(MAX_FIELD_PARTS), "exists"))) == [
        (f"{F0}.field", "too_deep")
    ]
    assert violations(cond(flt("event." + ".".join(["e"] * MAX_FIELD_PARTS), "triggered"))) == [
        (f"{F0}.field", "too_deep")
    ]


def test_a_two_thousand_part_path_is_refused_before_it_is_read() -> None:
    started = time.monotonic()
    assert violations(cond(flt(data_path(2000), "equals", 1))) == [(f"{F0}.field", "too_long")]
    assert time.monotonic() - started < 1


# --- linear compilation ------------------------------------------------------------------


def parameters(
    raw: dict[str, Any], segments: dict[uuid.UUID, SegmentDefinition] | None = None
) -> int:
    """Bound parameters of the compiled member and count statements of `raw`."""
    condition = parse_condition(raw)
    total = 0
    for compile_ in (compile_members, compile_count):
        ctx = CompileContext(now=datetime.now(UTC), segments=segments or {})
        statement = compile_(condition, ctx, uuid.uuid4())
        total += len(statement.compile(dialect=DIALECT).params)
    return total


# One filter of each shape that reads a data path.
def path_filters(path: str) -> list[dict[str, Any]]:
    return [
        flt(path, "exists"),
        flt(path, "notExists"),
        flt(path, "equals", "x"),
        flt(path, "notEquals", "x"),
        flt(path, "contains", "x"),
        flt(path, "greaterThan", 3),
        flt(path, "lessThan", "2024-01-01T00:00:00Z"),
        flt(path, "within", 3, "days"),
        flt(path, "olderThan", 3, "days"),
    ]


def test_compiled_size_grows_linearly_with_path_parts() -> None:
    def size(keys: int) -> int:
        return parameters(cond(*path_filters(data_path(keys))))

    one, five, nine = size(1), size(5), size(9)
    assert nine - five == five - one > 0


def test_compiled_size_grows_linearly_with_filters() -> None:
    def size(n: int) -> int:
        shapes = [
            *path_filters(data_path(MAX_FIELD_PARTS - 1)),
            flt("event.e", "triggered"),
            flt("event.e", "notTriggeredWithin", 2, "days"),
            flt("createdAt", "within", 1, "days"),
        ]
        filters = [shapes[i % len(shapes)] for i in range(n)]
        half = n // 2
        return parameters(
            {
                "logic": "OR",
                "groups": [
                    {"filters": filters[:half]},
                    {"filters": filters[half:], "conditions": cond(*filters[:half])},
                ],
            }
        )

    small, double, quadruple = size(24), size(48), size(96)
    assert quadruple - double == 2 * (double - small) > 0


def definition(raw: dict[str, Any]) -> SegmentDefinition:
    sid = uuid.uuid4()
    return SegmentDefinition(sid, "DYNAMIC", parse_condition(raw))


def test_compiled_size_grows_linearly_with_references() -> None:
    def size(n: int) -> int:
        refs = [definition(cond(*path_filters(data_path(3)))) for _ in range(n)]
        top = cond(
            *[flt(f"segment.{d.id}", "memberOfSegment") for d in refs],
            flt("email", "contains", "@"),
        )
        return parameters(top, {d.id: d for d in refs})

    assert size(40) - size(20) == 2 * (size(20) - size(10)) > 0


# --- segment references, expanded -------------------------------------------------------


def layered(depth: int, bottom: list[dict[str, Any]]) -> dict[str, Any]:
    """A condition `depth` levels deep of the shape that costs the compiler most stack per
    level (sets, exclusions and predicates at every level, OR and AND alternating), with
    `bottom` in its deepest group."""
    inner: dict[str, Any] = {
        "logic": "OR",
        "groups": [
            {"filters": bottom},
            {
                "filters": [
                    flt("event.e", "triggered"),
                    flt("event.f", "notTriggered"),
                    flt("data.x", "exists"),
                ]
            },
        ],
    }
    for level in range(depth - 1):
        inner = {
            "logic": "AND" if level % 2 else "OR",
            "groups": [
                {
                    "filters": [flt("event.e", "triggered"), flt("data.x", "exists")],
                    "conditions": inner,
                },
                {"filters": [flt("event.e", "triggered"), flt("event.f", "notTriggered")]},
            ],
        }
    return inner


def deepest(depth: int) -> str:
    """The dot path of the first filter of `layered(depth, ...)`'s deepest group."""
    return "condition" + ".groups.0.conditions" * (depth - 1) + ".groups.0.filters.0"


def ref(segment_id: Any, operator: str = "memberOfSegment") -> dict[str, Any]:
    return flt(f"segment.{segment_id}", operator)


def many(n: int) -> list[dict[str, Any]]:
    return [flt("data.n", "notEquals", i) for i in range(n)]


def expansion_violations(
    raw: dict[str, Any], segments: list[SegmentDefinition]
) -> list[tuple[str, str]]:
    with pytest.raises(ValidationError) as caught:
        check_expansion(parse_condition(raw), {d.id: d for d in segments})
    return [(v.field, v.code) for v in caught.value.violations]


def test_expanded_filter_limit_at_its_edge() -> None:
    full = [definition(cond(*many(MAX_FILTERS))) for _ in range(5)]
    assert 5 * MAX_FILTERS == MAX_EXPANDED_FILTERS
    refs = [ref(d.id) for d in full]
    check_expansion(parse_condition(cond(*refs)), {d.id: d for d in full})
    # The reference that takes it over is named, wherever the plain filters are.
    assert expansion_violations(cond(flt("email", "contains", "@"), *refs), full) == [
        ("condition.groups.0.filters.5.field", "too_many")
    ]
    # Through a reference that references another five times (a diamond counts each time).
    five = definition(cond(*[ref(full[0].id)] * 5))
    segments = [full[0], five]
    check_expansion(parse_condition(cond(ref(five.id))), {d.id: d for d in segments})
    assert expansion_violations(cond(ref(five.id), flt("email", "contains", "@")), segments) == [
        (f"{F0}.field", "too_many")
    ]
    # A STATIC segment counts as one filter.
    static = SegmentDefinition(uuid.uuid4(), "STATIC", None)
    assert expansion_violations(cond(*refs, ref(static.id)), [*full, static]) == [
        ("condition.groups.0.filters.4.field", "too_many")
    ]


def test_expanded_depth_limit_at_its_edge() -> None:
    six = definition(layered(MAX_EXPANDED_DEPTH - 10, [flt("event.g", "triggered")]))
    seven = definition(cond(ref(six.id, "notMemberOfSegment")))
    segments = {d.id: d for d in (six, seven)}
    at_limit = layered(10, [ref(six.id, "notMemberOfSegment")])
    check_expansion(parse_condition(at_limit), segments)
    over = layered(10, [ref(seven.id, "notMemberOfSegment")])
    assert expansion_violations(over, [six, seven]) == [(f"{deepest(10)}.field", "too_deep")]
    # A chain of references, each level of the costliest kind.
    chain = [definition(layered(1, [flt("event.g", "triggered")]))]
    while len(chain) < MAX_EXPANDED_DEPTH - 1:
        chain.append(definition(layered(1, [ref(chain[-1].id, "notMemberOfSegment")])))
    longest = layered(1, [ref(chain[-1].id, "notMemberOfSegment")])
    check_expansion(parse_condition(longest), {d.id: d for d in chain})
    chain.append(definition(longest))
    past = layered(1, [ref(chain[-1].id, "notMemberOfSegment")])
    assert expansion_violations(past, chain) == [(f"{deepest(1)}.field", "too_deep")]
    # Both compile with a wide margin of Python's stack unused.
    with_stack_used(300, lambda: parameters(at_limit, segments))
    with_stack_used(300, lambda: parameters(longest, {d.id: d for d in chain}))


def with_stack_used(frames: int, call: Any) -> Any:
    """`call()` run `frames` Python calls deep."""
    if frames:
        return with_stack_used(frames - 1, call)
    return call()


def test_the_compiler_refuses_stored_conditions_over_the_limits() -> None:
    """Conditions saved before the limits still fail as a 400, never as a crash."""
    ten = definition(layered(10, [flt("event.g", "triggered")]))
    segments = {ten.id: ten}
    for compile_ in (compile_members, compile_count):
        with pytest.raises(ValidationError) as caught:
            compile_(
                parse_condition(layered(10, [ref(ten.id)])),
                CompileContext(now=datetime.now(UTC), segments=segments),
                uuid.uuid4(),
            )
        assert [v.code for v in caught.value.violations] == ["too_deep"]
    full = [definition(cond(*many(MAX_FILTERS))) for _ in range(6)]
    with pytest.raises(ValidationError) as caught:
        compile_members(
            parse_condition(cond(*[ref(d.id) for d in full])),
            CompileContext(now=datetime.now(UTC), segments={d.id: d for d in full}),
            uuid.uuid4(),
        )
    assert [v.code for v in caught.value.violations] == ["too_many"]


def test_a_long_chain_of_references_is_measured_without_recursion() -> None:
    chain = [definition(cond(flt("data.x", "exists")))]
    for _ in range(5000):
        chain.append(definition(cond(ref(chain[-1].id))))
    assert expansion_violations(cond(ref(chain[-1].id)), chain) == [(f"{F0}.field", "too_deep")]


# --- JSON data ---------------------------------------------------------------------------


def nested_data(depth: int) -> dict[str, Any]:
    """Objects nested `depth` deep."""
    data: dict[str, Any] = {"leaf": True}
    for _ in range(depth - 1):
        data = {"k": data}
    return data


def test_json_depth_limit_at_its_edge() -> None:
    assert check_json(nested_data(MAX_JSON_DEPTH), "data") == []
    assert check_json({"list": [[[nested_data(MAX_JSON_DEPTH - 4)]]]}, "data") == []
    over = check_json(nested_data(MAX_JSON_DEPTH + 1), "data")
    assert [(v.field, v.code) for v in over] == [("data" + ".k" * MAX_JSON_DEPTH, "too_deep")]
    over = check_json({"list": [[[nested_data(MAX_JSON_DEPTH - 3)]]]}, "events.3.data")
    assert [(v.field, v.code) for v in over] == [
        ("events.3.data.list.0.0.0" + ".k" * (MAX_JSON_DEPTH - 4), "too_deep")
    ]


def test_json_checks_never_recurse() -> None:
    """Far past the limit (and Python's recursion limit): one violation, no RecursionError."""
    deep: Any = 1
    for _ in range(100_000):
        deep = [deep]
    assert [v.code for v in check_json(deep, "data")] == ["too_deep"]


# --- through the API ---------------------------------------------------------------------


@pytest.fixture
def api(rest: Rest, project: Project) -> Api:
    return Api(rest, project)


def grpc_refused(call: Any) -> list[tuple[str, str]]:
    """(field, reason) of the field violations of the INVALID_ARGUMENT `call()` raises."""
    with pytest.raises(InvalidArgumentError) as caught:
        call()
    return [(v.field, v.reason) for v in caught.value.field_violations]


def rest_refused(rest: Rest, project: Project, condition: Any) -> list[tuple[str, str]]:
    resp = rest.post("/segments", {"name": "bad", "condition": condition}, key=project.secret_key)
    error = check_error(resp, 400, "VALIDATION_ERROR")
    return [(e["field"], e["code"]) for e in error.get("errors", [])]


def test_field_limits_through_the_api(
    client: SegmentsClient, rest: Rest, api: Api, project: Project
) -> None:
    longest = "data." + "k" * (MAX_FIELD_LENGTH - len("data."))
    deepest_path = data_path(MAX_FIELD_PARTS - 1)
    client.upsert_contact("edge@x.com", data={"k" * (MAX_FIELD_LENGTH - 5): 1})
    deep: dict[str, Any] = {"k": 1}
    for _ in range(MAX_FIELD_PARTS - 2):
        deep = {"k": deep}
    client.upsert_contact("deep@x.com", data=deep)
    for path, member in ((longest, "edge@x.com"), (deepest_path, "deep@x.com")):
        at_limit = cond(flt(path, "exists"))
        assert client.create_segment("edge", condition=at_limit).member_count == 1
        assert client.count_matching_contacts(at_limit) == 1
        assert api.member_set(api.create_segment("edge", at_limit)["id"]) == {member}
    for path, code in (
        (longest + "k", "too_long"),
        (data_path(MAX_FIELD_PARTS), "too_deep"),
        (data_path(2000), "too_long"),
    ):
        over = cond(flt(path, "equals", 1))
        expected = [(f"{F0}.field", code)]
        started = time.monotonic()
        assert grpc_refused(lambda c=over: client.create_segment("over", condition=c)) == expected
        assert grpc_refused(lambda c=over: client.count_matching_contacts(c)) == expected
        assert rest_refused(rest, project, over) == expected
        assert time.monotonic() - started < 10


def test_string_value_limit_through_the_api(
    client: SegmentsClient, rest: Rest, api: Api, project: Project
) -> None:
    client.upsert_contact("long@x.com", data={"bio": "é" * MAX_STRING_VALUE})
    at_limit = cond(flt("data.bio", "equals", "é" * MAX_STRING_VALUE))
    assert client.create_segment("edge", condition=at_limit).member_count == 1
    assert client.count_matching_contacts(at_limit) == 1
    assert api.member_set(api.create_segment("edge", at_limit)["id"]) == {"long@x.com"}
    over = cond(flt("data.bio", "contains", "é" * (MAX_STRING_VALUE + 1)))
    expected = [(f"{F0}.value", "too_long")]
    assert grpc_refused(lambda: client.create_segment("over", condition=over)) == expected
    assert grpc_refused(lambda: client.count_matching_contacts(over)) == expected
    assert rest_refused(rest, project, over) == expected


def test_expanded_filter_limit_through_the_api(
    client: SegmentsClient, rest: Rest, project: Project
) -> None:
    client.upsert_contact("n@x.com", data={"n": -1})
    full = [
        client.create_segment(f"full {i}", condition=cond(*many(MAX_FILTERS))) for i in range(5)
    ]
    refs = [ref(s.id) for s in full]
    at_limit = cond(*refs)
    created = client.create_segment("edge", condition=at_limit)
    assert created.member_count == 1
    assert client.count_matching_contacts(at_limit) == 1
    over = cond(flt("email", "contains", "@"), *refs)
    expected = [("condition.groups.0.filters.5.field", "too_many")]
    assert grpc_refused(lambda: client.create_segment("over", condition=over)) == expected
    assert grpc_refused(lambda: client.count_matching_contacts(over)) == expected
    assert grpc_refused(lambda: client.update_segment(created.id, condition=over)) == expected
    assert rest_refused(rest, project, over) == expected
    resp = rest.patch(f"/segments/{created.id}", {"condition": over}, key=project.secret_key)
    check_error(resp, 400, "VALIDATION_ERROR", "condition.groups.0.filters.5.field")

    # A segment referenced by others cannot grow them past the limit either.
    small = client.create_segment("small", condition=cond(*many(150)))
    user = client.create_segment(
        "user", condition=cond(*refs[:4], ref(small.id), *many(MAX_EXPANDED_FILTERS - 950))
    )
    assert user.member_count == 1
    client.update_segment(small.id, condition=cond(*many(150)))
    assert grpc_refused(lambda: client.update_segment(small.id, condition=cond(*many(151)))) == [
        ("condition", "too_many")
    ]
    resp = rest.patch(
        f"/segments/{small.id}", {"condition": cond(*many(151))}, key=project.secret_key
    )
    assert "user" in check_error(resp, 400, "VALIDATION_ERROR", "condition")["message"]
    stored = rest.get(f"/segments/{small.id}", key=project.secret_key).json["condition"]
    assert len(stored["groups"][0]["filters"]) == 150


def test_expanded_depth_limit_through_the_api(
    client: SegmentsClient, rest: Rest, project: Project
) -> None:
    """At the limit, the costliest shapes are created, maintained and counted by the real
    server; one level more is refused naming the reference."""
    client.upsert_contact("a@x.com", data={"x": 1})
    six = client.create_segment(
        "six", condition=layered(MAX_EXPANDED_DEPTH - 10, [flt("event.g", "triggered")])
    )
    at_limit = layered(10, [ref(six.id, "notMemberOfSegment")])
    top = client.create_segment("top", condition=at_limit, track_membership=True)
    seven = client.create_segment("seven", condition=cond(ref(six.id, "notMemberOfSegment")))
    over = layered(10, [ref(seven.id, "notMemberOfSegment")])
    expected = [(f"{deepest(10)}.field", "too_deep")]
    assert grpc_refused(lambda: client.create_segment("over", condition=over)) == expected
    assert grpc_refused(lambda: client.count_matching_contacts(over)) == expected
    assert grpc_refused(lambda: client.update_segment(top.id, condition=over)) == expected
    assert rest_refused(rest, project, over) == expected

    chain = [client.create_segment("chain 1", condition=layered(1, [flt("event.g", "triggered")]))]
    while len(chain) < MAX_EXPANDED_DEPTH:
        condition = layered(1, [ref(chain[-1].id, "notMemberOfSegment")])
        chain.append(
            client.create_segment(
                f"chain {len(chain) + 1}", condition=condition, track_membership=True
            )
        )
    past = layered(1, [ref(chain[-1].id, "notMemberOfSegment")])
    assert grpc_refused(lambda: client.create_segment("past", condition=past)) == [
        (f"{deepest(1)}.field", "too_deep")
    ]
    # Growing a segment deeper is refused where it would take one referencing it over.
    assert grpc_refused(
        lambda: client.update_segment(
            chain[0].id, condition=layered(2, [flt("event.g", "triggered")])
        )
    ) == [("condition", "too_deep")]
    # Writes re-evaluate every segment above; counts agree with the maintained ones.
    client.upsert_contact("b@x.com")
    client.ingest_events([{"email": "a@x.com", "event": "g"}, {"email": "c@x.com", "event": "e"}])
    last = layered(1, [ref(chain[-2].id, "notMemberOfSegment")])
    for segment, condition in ((top, at_limit), (chain[-1], last)):
        counted = client.count_matching_contacts(condition)
        assert client.get_segment(segment.id).member_count == counted
