"""Hostile gRPC messages to every RPC (each unary one, and the two streams).

Whatever arrives (random field values, unknown enum numbers, NaN and infinities, NULs and
odd code points, SQL-looking keys and field names, nested trees, 10 MB strings, 10,000
emails), the server answers with a deliberate status, never INTERNAL or UNKNOWN, stays
healthy, and a request it refuses stores nothing: the project's rows are counted before
and after every call.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session, sessionmaker

from segments_api.v1 import contacts_pb2, events_pb2, resources_pb2, segments_pb2
from tests.conftest import Project, Rest, Stubs, new_project

EXAMPLES = 25
CRASH_CODES = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
# Every table holding a project's data.
TABLES = (
    "contacts",
    "events",
    "segments",
    "segment_references",
    "static_members",
    "segment_members",
    "feed_positions",
)
TEN_MB = 10 * 1024 * 1024
SQL = [
    "x'; DROP TABLE contacts;--",
    "' OR '1'='1",
    '"; SELECT pg_sleep(10);--',
    "1; DELETE FROM events",
    "$1",
    "%s",
    ":p",
    "?",
    "data->>'plan'",
    "a') OR true --",
    "\\",
    "'",
    '"',
]
ODD_TEXT = [
    "",
    " ",
    "\x00",
    "a\x00b",
    "\t\n\r",
    "\u202e\u202d",  # bidi overrides
    "\ufeff",  # BOM
    "\ufffe\uffff",  # non-characters
    "\U0010ffff",
    "e\u0301\u0301\u0301",  # stacked combining marks
    "\U0001d54f" * 20,  # astral letters
    "İıß\u0130",
    "🙂👩‍👩‍👧",
    "null",
    "NaN",
    "Infinity",
    "a" * 1001,
    "x" * 20_000,
]
FIELDS = [
    "email",
    "subscribed",
    "createdAt",
    "updatedAt",
    "data.plan",
    "data.a.b.c",
    "event.purchase",
    "email.opened",
    "segment.00000000-0000-0000-0000-000000000000",
    "purchase",
]


# -- strategies --------------------------------------------------------------------------

hostile_text = st.one_of(
    st.text(max_size=30),  # any code point but surrogates, NUL included
    st.sampled_from(ODD_TEXT + SQL),
)
hostile_email = st.one_of(
    st.emails().map(str),
    hostile_text,
    st.sampled_from(SQL).map(lambda s: f"{s}@example.com"),
    hostile_text.map(lambda s: f"{s}@example.com"),
)
numbers = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -0.0, 1e308, 5e-324, 2.0**63]),
    st.integers(min_value=-(2**53), max_value=2**53).map(float),
)
scalars = st.one_of(st.none(), st.booleans(), numbers, hostile_text)
hostile_key = st.one_of(hostile_text, st.sampled_from(SQL))
# Nesting stays below grpcio's decoding depth limit (see test_deep_nesting_*).
json_values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(hostile_key, children, max_size=4)
    ),
    max_leaves=12,
)
json_objects = st.dictionaries(hostile_key, json_values, max_size=5)


def to_struct(data: dict[str, Any]) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(data)
    return struct


def to_value(value: Any) -> struct_pb2.Value:
    holder = to_struct({"v": value})
    return holder.fields["v"]


enum_numbers = st.one_of(st.integers(min_value=0, max_value=25), st.integers(-(2**31), 2**31 - 1))


@st.composite
def filters(draw: st.DrawFn) -> resources_pb2.Filter:
    field = draw(
        st.one_of(
            st.sampled_from(FIELDS),
            st.sampled_from(SQL).map(lambda s: f"data.{s}"),
            hostile_text.map(lambda s: f"data.{s}"),
            hostile_text,
        )
    )
    # Any int32, not only the declared operators and units.
    message = resources_pb2.Filter(
        field=field, operator=resources_pb2.Filter.Operator.ValueType(draw(enum_numbers))
    )
    if draw(st.booleans()):
        message.value.CopyFrom(to_value(draw(json_values)))
    if draw(st.booleans()):
        message.unit = resources_pb2.Filter.Unit.ValueType(draw(enum_numbers))
    return message


@st.composite
def conditions(draw: st.DrawFn, depth: int = 0) -> resources_pb2.FilterCondition:
    logic = draw(st.sampled_from([0, 1, 2, 3, -1]))
    condition = resources_pb2.FilterCondition(
        logic=resources_pb2.FilterCondition.Logic.ValueType(logic)
    )
    for _ in range(draw(st.integers(min_value=0, max_value=3))):
        group = condition.groups.add()
        group.filters.extend(draw(st.lists(filters(), max_size=3)))
        if depth < 12 and draw(st.integers(0, 3)) == 0:
            group.conditions.CopyFrom(draw(conditions(depth + 1)))
    return condition


def optional(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(st.none(), strategy)


def build(cls: type[Message], **fields: Any) -> Message:
    """A request with the fields that are not None."""
    message = cls()
    for name, value in fields.items():
        if value is None:
            continue
        target = getattr(message, name)
        if isinstance(value, Message):
            target.CopyFrom(value)
        elif isinstance(value, list):
            for item in value:
                if isinstance(item, Message):
                    target.add().CopyFrom(item)
                else:
                    target.append(item)
        else:
            setattr(message, name, value)
    return message


# -- fixtures ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """A project with a few resources for hostile requests to aim at."""

    project: Project
    static_segment: str
    dynamic_segment: str
    contact: str


@pytest.fixture(scope="module")
def target(sessions: sessionmaker[Session], stubs: Stubs) -> Target:
    project = new_project(sessions, "fuzz")
    contact = stubs.contacts.UpsertContact(
        contacts_pb2.UpsertContactRequest(email="known@example.com", data=to_struct({"a": 1})),
        metadata=project.auth,
    )
    static = stubs.segments.CreateSegment(
        segments_pb2.CreateSegmentRequest(name="Static", type=resources_pb2.Segment.STATIC),
        metadata=project.auth,
    )
    condition = resources_pb2.FilterCondition(
        logic=resources_pb2.FilterCondition.AND,
        groups=[
            resources_pb2.FilterGroup(
                filters=[resources_pb2.Filter(field="data.a", operator=resources_pb2.Filter.exists)]
            )
        ],
    )
    dynamic = stubs.segments.CreateSegment(
        segments_pb2.CreateSegmentRequest(
            name="Dynamic", condition=condition, track_membership=True
        ),
        metadata=project.auth,
    )
    return Target(project, static.id, dynamic.id, contact.id)


@st.composite
def ingested_events(draw: st.DrawFn) -> events_pb2.IngestedEvent:
    event = events_pb2.IngestedEvent(
        email=draw(hostile_email),
        event=draw(st.one_of(hostile_text, st.sampled_from(["purchase", "email.opened"]))),
    )
    seconds = draw(optional(st.integers(-(2**40), 2**40)))
    if seconds is not None:
        # Valid Timestamps only: the Python client refuses to send others.
        seconds = max(-62135596800, min(seconds, 253402300799))
        event.occurred_at.seconds = seconds
        event.occurred_at.nanos = draw(st.integers(0, 999_999_999))
    data = draw(optional(json_objects))
    if data is not None:
        event.data.CopyFrom(to_struct(data))
    return event


def ids(target: Target) -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from([target.static_segment, target.dynamic_segment, target.contact]),
        st.uuids().map(str),
        hostile_text,
        st.sampled_from(SQL),
    )


def emails_list() -> st.SearchStrategy[list[str]]:
    return st.lists(hostile_email, max_size=8)


@functools.cache
def rpcs(target: Target) -> dict[str, tuple[str, st.SearchStrategy[Message]]]:
    """Every unary RPC: (stub attribute path, strategy of hostile requests)."""
    some_id = ids(target)
    contact_writes = st.builds(
        lambda email, subscribed, data: build(
            contacts_pb2.UpsertContactRequest,
            email=email,
            subscribed=subscribed,
            data=None if data is None else to_struct(data),
        ),
        hostile_email,
        optional(st.booleans()),
        optional(json_objects),
    )
    return {
        "ListSegments": ("segments.ListSegments", st.just(segments_pb2.ListSegmentsRequest())),
        "CreateSegment": (
            "segments.CreateSegment",
            st.builds(
                lambda name, description, kind, condition, track: build(
                    segments_pb2.CreateSegmentRequest,
                    name=name,
                    description=description,
                    type=kind,
                    condition=condition,
                    track_membership=track,
                ),
                hostile_text,
                optional(hostile_text),
                optional(enum_numbers),
                optional(conditions()),
                optional(st.booleans()),
            ),
        ),
        "GetSegment": (
            "segments.GetSegment",
            some_id.map(lambda i: segments_pb2.GetSegmentRequest(id=i)),
        ),
        "CountMatchingContacts": (
            "segments.CountMatchingContacts",
            optional(conditions()).map(
                lambda condition: build(
                    segments_pb2.CountMatchingContactsRequest, condition=condition
                )
            ),
        ),
        "ExplainMembership": (
            "segments.ExplainMembership",
            st.builds(
                lambda i, c: segments_pb2.ExplainMembershipRequest(id=i, contact_id=c),
                some_id,
                some_id,
            ),
        ),
        "ListSegmentEvents": (
            "segments.ListSegmentEvents",
            st.builds(
                lambda i, after, limit: segments_pb2.ListSegmentEventsRequest(
                    id=i, after=after, limit=limit
                ),
                some_id,
                hostile_text,
                st.integers(-(2**31), 2**31 - 1),
            ),
        ),
        "GetSegmentHistory": (
            "segments.GetSegmentHistory",
            st.builds(
                lambda i, interval, start, end: build(
                    segments_pb2.GetSegmentHistoryRequest,
                    id=i,
                    interval=interval,
                    **{"from": start, "to": end},
                ),
                some_id,
                st.sampled_from(["", "hour", "day", "week"]) | hostile_text,
                hostile_text,
                hostile_text,
            ),
        ),
        "PreviewSegment": (
            "segments.PreviewSegment",
            optional(conditions()).map(
                lambda condition: build(segments_pb2.PreviewSegmentRequest, condition=condition)
            ),
        ),
        "UpdateSegment": (
            "segments.UpdateSegment",
            st.builds(
                lambda i, name, description, kind, condition, track: build(
                    segments_pb2.UpdateSegmentRequest,
                    id=i,
                    name=name,
                    description=description,
                    type=kind,
                    condition=condition,
                    track_membership=track,
                ),
                some_id,
                optional(hostile_text),
                optional(hostile_text),
                optional(enum_numbers),
                optional(conditions()),
                optional(st.booleans()),
            ),
        ),
        "DeleteSegment": (
            "segments.DeleteSegment",
            # Not the fixture's segments: the other RPCs keep aiming at them.
            st.one_of(st.uuids().map(str), hostile_text).map(
                lambda i: segments_pb2.DeleteSegmentRequest(id=i)
            ),
        ),
        "ListSegmentContacts": (
            "segments.ListSegmentContacts",
            st.builds(
                lambda i, page, size: segments_pb2.ListSegmentContactsRequest(
                    id=i, page=page, page_size=size
                ),
                some_id,
                st.integers(-(2**31), 2**31 - 1),
                st.integers(-(2**31), 2**31 - 1),
            ),
        ),
        "AddSegmentMembers": (
            "segments.AddSegmentMembers",
            st.builds(
                lambda i, emails, create, subscribed: build(
                    segments_pb2.AddSegmentMembersRequest,
                    id=i,
                    emails=emails,
                    create_missing=create,
                    subscribed=subscribed,
                ),
                some_id,
                emails_list(),
                optional(st.booleans()),
                optional(st.booleans()),
            ),
        ),
        "RemoveSegmentMembers": (
            "segments.RemoveSegmentMembers",
            st.builds(
                lambda i, emails: segments_pb2.RemoveSegmentMembersRequest(id=i, emails=emails),
                some_id,
                emails_list(),
            ),
        ),
        "UpsertContact": ("contacts.UpsertContact", contact_writes),
        "BatchUpsertContacts": (
            "contacts.BatchUpsertContacts",
            st.lists(contact_writes, max_size=5).map(
                lambda items: build(contacts_pb2.BatchUpsertContactsRequest, contacts=items)
            ),
        ),
        "GetContact": (
            "contacts.GetContact",
            some_id.map(lambda i: contacts_pb2.GetContactRequest(id=i)),
        ),
        "DeleteContact": (
            "contacts.DeleteContact",
            st.one_of(st.uuids().map(str), hostile_text).map(
                lambda i: contacts_pb2.DeleteContactRequest(id=i)
            ),
        ),
        "ListContacts": (
            "contacts.ListContacts",
            st.builds(
                lambda limit, cursor, search, subscribed: build(
                    contacts_pb2.ListContactsRequest,
                    limit=limit,
                    cursor=cursor,
                    search=search,
                    subscribed=subscribed,
                ),
                st.integers(-(2**31), 2**31 - 1),
                st.one_of(st.just(""), hostile_text),
                st.one_of(st.just(""), hostile_text, hostile_email),
                optional(st.booleans()),
            ),
        ),
        "UpdateContact": (
            "contacts.UpdateContact",
            st.builds(
                lambda i, email, subscribed, data: build(
                    contacts_pb2.UpdateContactRequest,
                    id=i,
                    email=email,
                    subscribed=subscribed,
                    data=None if data is None else to_struct(data),
                ),
                some_id,
                optional(hostile_email),
                optional(st.booleans()),
                optional(json_objects),
            ),
        ),
        "ListContactSegments": (
            "contacts.ListContactSegments",
            some_id.map(lambda i: contacts_pb2.ListContactSegmentsRequest(id=i)),
        ),
        "Track": (
            "events.Track",
            st.builds(
                lambda event, email, subscribed, data: build(
                    events_pb2.TrackRequest,
                    event=event,
                    email=email,
                    subscribed=subscribed,
                    data=None if data is None else to_struct(data),
                ),
                st.one_of(
                    hostile_text, st.sampled_from(["purchase", "segment.x.entry", "email.sent"])
                ),
                hostile_email,
                optional(st.booleans()),
                optional(json_objects),
            ),
        ),
        "IngestEvents": (
            "events.IngestEvents",
            st.lists(ingested_events(), max_size=4).map(
                lambda items: events_pb2.IngestEventsRequest(events=items)
            ),
        ),
    }


# -- helpers -----------------------------------------------------------------------------


def counts(engine: Engine, project_id: str) -> dict[str, int]:
    query = ", ".join(
        f"(SELECT count(*) FROM {table} WHERE project_id = :p) AS {table}" for table in TABLES
    )
    with engine.connect() as conn:
        row = conn.execute(text(f"SELECT {query}"), {"p": project_id}).one()
    return dict(row._mapping)


def stub_method(stubs: Stubs, path: str) -> Callable[..., Any]:
    service, method = path.split(".")
    return getattr(getattr(stubs, service), method)  # type: ignore[no-any-return]


@dataclass
class Outcome:
    code: grpc.StatusCode
    details: str


def send(
    engine: Engine,
    stubs: Stubs,
    project: Project,
    path: str,
    request: Message,
    metadata: Any = None,
) -> Outcome:
    """Calls the RPC; asserts no crash status and, when refused, that nothing was stored."""
    before = counts(engine, project.id)
    if metadata is None:
        metadata = project.public_auth if path == "events.Track" else project.auth
    try:
        stub_method(stubs, path)(request, metadata=metadata, timeout=60)
        outcome = Outcome(grpc.StatusCode.OK, "")
    except grpc.RpcError as err:
        outcome = Outcome(err.code(), err.details() or "")
    assert outcome.code not in CRASH_CODES, (path, outcome, str(request)[:500])
    if outcome.code != grpc.StatusCode.OK:
        assert counts(engine, project.id) == before, (path, outcome)
    return outcome


def assert_healthy(channel: grpc.Channel, stubs: Stubs, project: Project) -> None:
    health: Any = health_pb2_grpc.HealthStub(channel)  # its type stub lists no methods
    reply = health.Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    stubs.segments.ListSegments(
        segments_pb2.ListSegmentsRequest(), metadata=project.auth, timeout=10
    )


RPC_NAMES = [
    "ListSegments",
    "CreateSegment",
    "GetSegment",
    "UpdateSegment",
    "DeleteSegment",
    "ListSegmentContacts",
    "AddSegmentMembers",
    "RemoveSegmentMembers",
    "CountMatchingContacts",
    "PreviewSegment",
    "ExplainMembership",
    "ListSegmentEvents",
    "GetSegmentHistory",
    "UpsertContact",
    "BatchUpsertContacts",
    "GetContact",
    "DeleteContact",
    "ListContacts",
    "UpdateContact",
    "ListContactSegments",
    "Track",
    "IngestEvents",
]


def test_every_unary_rpc_is_fuzzed(stubs: Stubs) -> None:
    services = {
        "segments": stubs.segments,
        "contacts": stubs.contacts,
        "events": stubs.events,
    }
    declared = {
        method.name
        for module in (segments_pb2, contacts_pb2, events_pb2)
        for service in module.DESCRIPTOR.services_by_name.values()
        for method in service.methods
        if not method.server_streaming and not method.client_streaming
    }
    assert declared == set(RPC_NAMES)
    for name in RPC_NAMES:
        assert any(hasattr(stub, name) for stub in services.values()), name


# -- property tests ----------------------------------------------------------------------


@pytest.mark.parametrize("rpc", RPC_NAMES)
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data())
def test_hostile_requests(
    rpc: str,
    data: st.DataObject,
    target: Target,
    stubs: Stubs,
    engine: Engine,
    channel: grpc.Channel,
) -> None:
    path, strategy = rpcs(target)[rpc]
    request = data.draw(strategy, label="request")
    outcome = send(engine, stubs, target.project, path, request)
    # Far below the message limit; an error quoting a long value must still fit.
    assert outcome.code != grpc.StatusCode.RESOURCE_EXHAUSTED, (path, outcome)
    assert_healthy(channel, stubs, target.project)


# -- the hostile cases one by one ----------------------------------------------------------


def huge_requests(target: Target) -> list[tuple[str, Message]]:
    big = "x" * TEN_MB
    return [
        ("contacts.UpsertContact", contacts_pb2.UpsertContactRequest(email=big)),
        (
            "contacts.UpsertContact",
            contacts_pb2.UpsertContactRequest(email="big@example.com", data=to_struct({"k": big})),
        ),
        ("segments.CreateSegment", segments_pb2.CreateSegmentRequest(name=big)),
        ("segments.GetSegment", segments_pb2.GetSegmentRequest(id=big)),
        (
            "segments.AddSegmentMembers",
            segments_pb2.AddSegmentMembersRequest(id=target.static_segment, emails=[big]),
        ),
        ("events.Track", events_pb2.TrackRequest(event=big, email="big@example.com")),
        (
            "events.IngestEvents",
            events_pb2.IngestEventsRequest(
                events=[events_pb2.IngestedEvent(email="big@example.com", event=big)]
            ),
        ),
    ]


def test_ten_megabyte_strings_are_refused(
    target: Target, stubs: Stubs, engine: Engine, channel: grpc.Channel
) -> None:
    """Over the 8 MiB message limit: RESOURCE_EXHAUSTED before any code runs."""
    for path, request in huge_requests(target):
        outcome = send(engine, stubs, target.project, path, request)
        assert outcome.code == grpc.StatusCode.RESOURCE_EXHAUSTED, (path, outcome)
    assert_healthy(channel, stubs, target.project)


def test_long_values_quoted_in_errors_keep_the_status(
    target: Target, stubs: Stubs, engine: Engine, rest: Rest
) -> None:
    """Error messages quote request values; a 20,000-character one must not blow the error
    trailers past what gRPC clients (8 KiB) or Envoy accept: the caller still gets the
    real status, not RESOURCE_EXHAUSTED or a reset."""
    long = "x" * 20_000
    cases: list[tuple[str, Message, grpc.StatusCode]] = [
        ("segments.GetSegment", segments_pb2.GetSegmentRequest(id=long), grpc.StatusCode.NOT_FOUND),
        (
            "contacts.UpsertContact",
            contacts_pb2.UpsertContactRequest(email=long),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            "contacts.UpsertContact",
            contacts_pb2.UpsertContactRequest(
                email="long@example.com", data=to_struct({long + "\x00": 1})
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            "contacts.BatchUpsertContacts",
            contacts_pb2.BatchUpsertContactsRequest(
                contacts=[
                    contacts_pb2.UpsertContactRequest(email=f"{i}{long[:2000]}") for i in range(200)
                ]
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
    ]
    for path, request, expected in cases:
        outcome = send(engine, stubs, target.project, path, request)
        assert outcome.code == expected, (path, outcome.code, outcome.details[:200])
        assert len(outcome.details) < 1000
    key = target.project.secret_key
    resp = rest.post("/contacts", {"email": long}, key=key)
    assert resp.status == 400, resp.raw[:300]
    assert len(resp.raw) < 8000
    resp = rest.post(
        "/contacts/batch",
        {"contacts": [{"email": f"{i}{long[:500]}"} for i in range(900)]},
        key=key,
    )
    assert resp.status == 400, resp.raw[:300]
    assert 1 <= len(resp.json["error"]["errors"]) <= 50


def test_ten_thousand_emails_are_refused(target: Target, stubs: Stubs, engine: Engine) -> None:
    emails = [f"user{i}@example.com" for i in range(10_000)]
    requests: list[tuple[str, Message]] = [
        (
            "segments.AddSegmentMembers",
            segments_pb2.AddSegmentMembersRequest(id=target.static_segment, emails=emails),
        ),
        (
            "segments.RemoveSegmentMembers",
            segments_pb2.RemoveSegmentMembersRequest(id=target.static_segment, emails=emails),
        ),
        (
            "contacts.BatchUpsertContacts",
            contacts_pb2.BatchUpsertContactsRequest(
                contacts=[contacts_pb2.UpsertContactRequest(email=e) for e in emails]
            ),
        ),
        (
            "events.IngestEvents",
            events_pb2.IngestEventsRequest(
                events=[events_pb2.IngestedEvent(email=e, event="purchase") for e in emails]
            ),
        ),
    ]
    for path, request in requests:
        outcome = send(engine, stubs, target.project, path, request)
        assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT, (path, outcome)


@pytest.mark.parametrize("number", [math.nan, math.inf, -math.inf])
def test_non_finite_numbers_are_refused(
    number: float, target: Target, stubs: Stubs, engine: Engine
) -> None:
    nested = {"ok": 1, "deep": {"list": [1, number]}}
    flt = resources_pb2.Filter(field="data.score", operator=resources_pb2.Filter.greaterThan)
    flt.value.number_value = number
    condition = resources_pb2.FilterCondition(
        logic=resources_pb2.FilterCondition.AND, groups=[resources_pb2.FilterGroup(filters=[flt])]
    )
    window = resources_pb2.Filter(
        field="event.purchase",
        operator=resources_pb2.Filter.triggeredWithin,
        unit=resources_pb2.Filter.days,
    )
    window.value.number_value = number
    requests: list[tuple[str, Message]] = [
        (
            "contacts.UpsertContact",
            contacts_pb2.UpsertContactRequest(email="nan@example.com", data=to_struct(nested)),
        ),
        (
            "contacts.BatchUpsertContacts",
            contacts_pb2.BatchUpsertContactsRequest(
                contacts=[
                    contacts_pb2.UpsertContactRequest(email="ok@example.com"),
                    contacts_pb2.UpsertContactRequest(
                        email="nan@example.com", data=to_struct({"x": number})
                    ),
                ]
            ),
        ),
        (
            "events.Track",
            events_pb2.TrackRequest(
                event="purchase", email="nan@example.com", data=to_struct({"amount": number})
            ),
        ),
        (
            "events.IngestEvents",
            events_pb2.IngestEventsRequest(
                events=[
                    events_pb2.IngestedEvent(
                        email="nan@example.com", event="purchase", data=to_struct(nested)
                    )
                ]
            ),
        ),
        (
            "segments.CreateSegment",
            segments_pb2.CreateSegmentRequest(name="NaN", condition=condition),
        ),
        (
            "segments.CreateSegment",
            segments_pb2.CreateSegmentRequest(
                name="Window",
                condition=resources_pb2.FilterCondition(
                    logic=resources_pb2.FilterCondition.AND,
                    groups=[resources_pb2.FilterGroup(filters=[window])],
                ),
            ),
        ),
        (
            "segments.UpdateSegment",
            segments_pb2.UpdateSegmentRequest(id=target.dynamic_segment, condition=condition),
        ),
    ]
    for path, request in requests:
        outcome = send(engine, stubs, target.project, path, request)
        assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT, (path, outcome)


def nested_condition(depth: int) -> resources_pb2.FilterCondition:
    """`depth` conditions, each the only group's nested condition of the one above."""
    condition = resources_pb2.FilterCondition(
        logic=resources_pb2.FilterCondition.AND,
        groups=[
            resources_pb2.FilterGroup(
                filters=[
                    resources_pb2.Filter(
                        field="data.plan",
                        operator=resources_pb2.Filter.exists,
                    )
                ]
            )
        ],
    )
    for _ in range(depth - 1):
        condition = resources_pb2.FilterCondition(
            logic=resources_pb2.FilterCondition.OR,
            groups=[resources_pb2.FilterGroup(conditions=condition)],
        )
    return condition


def nested_data(depth: int) -> dict[str, Any]:
    data: dict[str, Any] = {"leaf": True}
    for _ in range(depth - 1):
        data = {"k": data}
    return data


@pytest.mark.parametrize(
    "depth",
    [11, 30, 40, 50],
)
def test_deep_conditions_are_invalid(
    depth: int, target: Target, stubs: Stubs, engine: Engine
) -> None:
    """The limit is depth 10; deeper is INVALID_ARGUMENT, never a crash."""
    for path, request in [
        (
            "segments.CreateSegment",
            segments_pb2.CreateSegmentRequest(name="Deep", condition=nested_condition(depth)),
        ),
        (
            "segments.UpdateSegment",
            segments_pb2.UpdateSegmentRequest(
                id=target.dynamic_segment, condition=nested_condition(depth)
            ),
        ),
    ]:
        outcome = send(engine, stubs, target.project, path, request)
        assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT, (path, depth, outcome)


def test_condition_at_the_depth_limit_is_accepted(target: Target, stubs: Stubs) -> None:
    created = stubs.segments.CreateSegment(
        segments_pb2.CreateSegmentRequest(name="Ten deep", condition=nested_condition(10)),
        metadata=target.project.auth,
    )
    assert created.condition.HasField("struct_value")


@pytest.mark.parametrize("depth", [10, 30])
def test_deep_data_is_stored_or_refused(
    depth: int, target: Target, stubs: Stubs, engine: Engine
) -> None:
    email = f"deep{depth}@example.com"
    request = contacts_pb2.UpsertContactRequest(email=email, data=to_struct(nested_data(depth)))
    outcome = send(engine, stubs, target.project, "contacts.UpsertContact", request)
    assert outcome.code in (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT), outcome


def _message(field: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field, encoded by hand."""
    length, out = len(payload), bytearray([field << 3 | 2])
    while True:
        byte, length = length & 0x7F, length >> 7
        out.append(byte | (0x80 if length else 0))
        if not length:
            return bytes(out) + payload


def _deep_struct(depth: int) -> bytes:
    """Struct {"k": {"k": ... {"leaf": true}}} nested `depth` deep, as wire bytes."""
    struct = _message(1, _message(1, b"leaf") + _message(2, b"\x20\x01"))  # bool_value true
    for _ in range(depth - 1):
        value = _message(5, struct)  # Value.struct_value
        struct = _message(1, _message(1, b"k") + _message(2, value))
    return struct


@pytest.mark.parametrize("depth", [60, 200])
def test_data_nested_past_the_decoder_limit_is_invalid(
    depth: int, target: Target, engine: Engine, channel: grpc.Channel
) -> None:
    """Python's protobuf refuses to build such a message, so it is sent as raw bytes: the
    server's decoder gives up past ~100 levels, and that must be a 400, not INTERNAL."""
    raw = _message(1, b"deep@example.com") + _message(3, _deep_struct(depth))
    before = counts(engine, target.project.id)
    call = channel.unary_unary(
        "/segments.v1.ContactService/UpsertContact",
        request_serializer=lambda b: b,
        response_deserializer=lambda b: b,
    )
    with pytest.raises(grpc.RpcError) as err:
        call(raw, metadata=target.project.auth, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "could not be decoded" in (err.value.details() or "")
    assert counts(engine, target.project.id) == before


def test_sql_looking_keys_and_fields_are_data(target: Target, stubs: Stubs, engine: Engine) -> None:
    key = "x'; DROP TABLE contacts;--"
    data = {key: "gotcha", "a') OR true --": {"$1": "%s"}}
    contact = stubs.contacts.UpsertContact(
        contacts_pb2.UpsertContactRequest(email="bobby@example.com", data=to_struct(data)),
        metadata=target.project.auth,
    )
    assert dict(contact.data) == {key: "gotcha", "a') OR true --": {"$1": "%s"}}
    flt = resources_pb2.Filter(field=f"data.{key}", operator=resources_pb2.Filter.equals)
    flt.value.string_value = "gotcha"
    segment = stubs.segments.CreateSegment(
        segments_pb2.CreateSegmentRequest(
            name="'; DROP TABLE segments;--",
            description='"; DELETE FROM events; --',
            condition=resources_pb2.FilterCondition(
                logic=resources_pb2.FilterCondition.AND,
                groups=[resources_pb2.FilterGroup(filters=[flt])],
            ),
        ),
        metadata=target.project.auth,
    )
    assert segment.name == "'; DROP TABLE segments;--"
    assert segment.member_count == 1
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM contacts")).scalar_one() > 0
        assert conn.execute(text("SELECT count(*) FROM segments")).scalar_one() > 0


ODD_NAMES = [
    "\u202eevil\u202c",
    "\ufeffbom",
    "\U0010ffff\ufffe",
    "e\u0301\u0301",
    "🙂👩‍👩‍👧",
    "İıß",
    "\t tabs \n",
]


@pytest.mark.parametrize("odd", ODD_NAMES)
def test_odd_unicode_round_trips(odd: str, target: Target, stubs: Stubs) -> None:
    contact = stubs.contacts.UpsertContact(
        contacts_pb2.UpsertContactRequest(
            email="unicode@example.com", data=to_struct({odd: odd, "nested": {odd: [odd]}})
        ),
        metadata=target.project.auth,
    )
    assert contact.data[odd] == odd
    segment = stubs.segments.CreateSegment(
        segments_pb2.CreateSegmentRequest(
            name=odd, description=odd, type=resources_pb2.Segment.STATIC
        ),
        metadata=target.project.auth,
    )
    assert segment.name == odd
    assert segment.description.string_value == odd


@pytest.mark.parametrize(
    "path, request_factory",
    [
        (
            "contacts.UpsertContact",
            lambda: contacts_pb2.UpsertContactRequest(
                email="nul@example.com", data=to_struct({"k": "a\x00b"})
            ),
        ),
        (
            "contacts.UpsertContact",
            lambda: contacts_pb2.UpsertContactRequest(
                email="nul@example.com", data=to_struct({"a\x00": 1})
            ),
        ),
        ("segments.CreateSegment", lambda: segments_pb2.CreateSegmentRequest(name="a\x00b")),
        (
            "events.Track",
            lambda: events_pb2.TrackRequest(event="a\x00b", email="nul@example.com"),
        ),
    ],
)
def test_nul_characters_are_refused(
    path: str, request_factory: Callable[[], Message], target: Target, stubs: Stubs, engine: Engine
) -> None:
    outcome = send(engine, stubs, target.project, path, request_factory())
    assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT, outcome


@pytest.mark.parametrize("depth", [30, 45])
def test_deep_data_over_rest_is_not_a_server_error(
    depth: int, target: Target, rest: Rest, engine: Engine
) -> None:
    """Envoy's JSON parser takes deeper data than grpcio then decodes: a 500 today."""
    before = counts(engine, target.project.id)
    body = {"email": f"restdeep{depth}@example.com", "data": nested_data(depth)}
    resp = rest.post("/contacts", body, key=target.project.secret_key)
    assert resp.status in (200, 201, 400), resp.raw[:300]
    if resp.status == 400:
        assert counts(engine, target.project.id) == before


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    after=st.one_of(st.just(""), st.integers(-(2**70), 2**70).map(str), hostile_text),
    segment_ids=st.lists(st.one_of(st.uuids().map(str), hostile_text), max_size=3),
    export_id=st.one_of(st.uuids().map(str), hostile_text, st.sampled_from(SQL)),
)
def test_hostile_stream_requests(
    after: str, segment_ids: list[str], export_id: str, target: Target, stubs: Stubs
) -> None:
    """The two streams: a bad cursor or id is an error status, anything else streams."""
    allowed = {
        grpc.StatusCode.OK,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.DEADLINE_EXCEEDED,  # a valid watch streams until the deadline
    }
    watch = stubs.segments.WatchSegmentEvents(
        segments_pb2.WatchSegmentEventsRequest(after=after, segment_ids=segment_ids),
        metadata=target.project.auth,
        timeout=0.3,
    )
    code = grpc.StatusCode.OK
    try:
        for _ in watch:
            pass
    except grpc.RpcError as err:
        code = err.code()
    assert code in allowed, (after, segment_ids, code)
    export = stubs.segments.ExportSegmentContacts(
        segments_pb2.ExportSegmentContactsRequest(id=export_id),
        metadata=target.project.auth,
        timeout=10,
    )
    code = grpc.StatusCode.OK
    try:
        for _ in export:
            pass
    except grpc.RpcError as err:
        code = err.code()
    assert code in allowed - {grpc.StatusCode.DEADLINE_EXCEEDED}, (export_id, code)
