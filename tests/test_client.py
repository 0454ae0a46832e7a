"""The typed client (segments.client), blocking and asyncio, against the real in-process server."""

from __future__ import annotations

import asyncio
import socket
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

# grpcio ships no annotations; with types-grpcio installed the ignore is simply unused.
import grpc
import pytest
from google.protobuf import json_format

from segments import (
    AsyncSegmentsClient,
    Expression,
    F,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    SegmentInUseError,
    SegmentsClient,
    UnauthenticatedError,
    UnavailableError,
    segment_condition,
    segment_description,
)
from segments_api.v1 import resources_pb2, segments_pb2
from tests.conditions import as_proto, cond, flt

Segment = resources_pb2.Segment


class Keys(Protocol):
    """What the conftest `project` fixtures provide (not imported, to keep mypy out of it)."""

    @property
    def id(self) -> str: ...
    @property
    def secret_key(self) -> str: ...
    @property
    def public_key(self) -> str: ...


PREMIUM = F.data("plan") == "premium"
FREE = F.data("plan") == "free"


def condition_of(segment: Segment) -> dict[str, Any] | None:
    """segment_condition(segment) back in the JSON form it was created from."""
    back = segment_condition(segment)
    return None if back is None else json_format.MessageToDict(back)


def emails_of(client: SegmentsClient, segment_id: str) -> list[str]:
    return [c.email for c in client.list_segment_contacts(segment_id, page_size=100).data]


def test_dynamic_segment_lifecycle(client: SegmentsClient) -> None:
    client.upsert_contact("ann@example.com", data={"plan": "premium"})
    client.upsert_contact("bob@example.com", data={"plan": "free"})

    created = client.create_segment("Premium", condition=PREMIUM, description="paying")
    assert created.type == Segment.DYNAMIC
    assert (created.name, created.member_count, created.track_membership) == ("Premium", 1, False)
    assert segment_description(created) == "paying"
    assert condition_of(created) == PREMIUM.to_dict()

    fetched = client.get_segment(created.id)
    assert fetched.id == created.id
    assert fetched.member_count == 1
    assert emails_of(client, created.id) == ["ann@example.com"]

    # A given FilterCondition message is sent as is; "" clears the description.
    updated = client.update_segment(
        created.id,
        name="Free",
        description="",
        condition=as_proto(FREE),
    )
    assert (updated.name, updated.member_count) == ("Free", 1)
    assert segment_description(updated) is None
    assert emails_of(client, created.id) == ["bob@example.com"]
    kept = client.update_segment(created.id, track_membership=True)
    assert (kept.name, kept.track_membership) == ("Free", True)
    assert condition_of(kept) == FREE.to_dict()

    newer = client.create_segment("Everyone", condition=F.email.contains("@"))
    assert [s.id for s in client.list_segments()] == [newer.id, created.id]

    client.delete_segment(created.id)
    assert [s.id for s in client.list_segments()] == [newer.id]
    with pytest.raises(NotFoundError):
        client.get_segment(created.id)


def test_segment_condition_round_trip(client: SegmentsClient) -> None:
    # The JSON form, with a nested AND of one filter: a shape the builder never writes.
    nested = {
        "logic": "OR",
        "groups": [
            {
                "filters": [
                    {"field": "data.plan", "operator": "equals", "value": "premium"},
                    {"field": "subscribed", "operator": "equals", "value": True},
                ],
                "conditions": {
                    "logic": "AND",
                    "groups": [
                        {
                            "filters": [
                                {
                                    "field": "event.purchase",
                                    "operator": "triggeredWithin",
                                    "value": 7,
                                    "unit": "days",
                                }
                            ]
                        }
                    ],
                },
            },
            {"filters": [{"field": "data.vip", "operator": "exists"}]},
        ],
    }
    created = client.create_segment("Nested", condition=nested)
    for segment in [created, client.get_segment(created.id), *client.list_segments()]:
        assert condition_of(segment) == nested


def test_static_segment_members(client: SegmentsClient) -> None:
    segment = client.create_segment("VIP", type="STATIC")
    assert segment.type == Segment.STATIC
    assert segment_condition(segment) is None
    assert segment_description(segment) is None
    assert segment.member_count == 0

    known = client.upsert_contact("known@example.com")
    added = client.add_segment_members(
        segment.id, [" Known@Example.com", "new@example.com", "not-an-email"], subscribed=False
    )
    assert (added.added, added.created, list(added.not_found)) == (2, 1, ["not-an-email"])
    unknown = client.add_segment_members(segment.id, ["ghost@example.com"], create_missing=False)
    assert (unknown.added, unknown.created, list(unknown.not_found)) == (
        0,
        0,
        ["ghost@example.com"],
    )

    assert client.get_segment(segment.id).member_count == 2
    first = client.list_segment_contacts(segment.id, page=1, page_size=1)
    second = client.list_segment_contacts(segment.id, page=2, page_size=1)
    assert (first.total, first.page, first.page_size, first.total_pages) == (2, 1, 1, 2)
    members = {c.email: c for c in [*first.data, *second.data]}
    assert set(members) == {"known@example.com", "new@example.com"}
    assert members["known@example.com"].subscribed  # an existing contact keeps its state
    assert not members["new@example.com"].subscribed

    removed = client.remove_segment_members(segment.id, ["new@example.com", "ghost@example.com"])
    assert removed.removed == 1
    assert emails_of(client, segment.id) == ["known@example.com"]
    assert client.get_contact(known.id).email == "known@example.com"  # members, not contacts
    client.delete_segment(segment.id)


def test_upsert_contact_merges_data(client: SegmentsClient) -> None:
    first = client.upsert_contact(
        " Carol@Example.com ", data={"plan": "free", "age": 30, "address": {"city": "Oslo"}}
    )
    assert (first.email, first.subscribed) == ("carol@example.com", True)

    second = client.upsert_contact(
        "carol@example.com", subscribed=False, data={"plan": None, "vip": True}
    )
    assert second.id == first.id
    assert not second.subscribed
    assert json_format.MessageToDict(second.data) == {
        "age": 30,
        "address": {"city": "Oslo"},
        "vip": True,
    }

    third = client.upsert_contact("carol@example.com")
    assert not third.subscribed  # an omitted `subscribed` keeps the stored value
    fetched = client.get_contact(first.id)
    assert (fetched.email, fetched.data) == ("carol@example.com", third.data)

    batch = client.batch_upsert_contacts(
        [
            {"email": "carol@example.com", "data": {"age": None}},
            {"email": "dan@example.com", "subscribed": False},
        ]
    )
    assert (batch.created, batch.updated) == (1, 1)
    assert "age" not in client.get_contact(first.id).data

    client.delete_contact(first.id)
    with pytest.raises(NotFoundError):
        client.get_contact(first.id)


def test_track_with_public_key(client: SegmentsClient, target: str, project: Keys) -> None:
    with SegmentsClient(target, project.public_key) as public:
        tracked = public.track("signup", " Eve@Example.com", data={"plan": "trial"})
    assert tracked.success
    contact = client.get_contact(tracked.data.contact)
    assert (contact.email, json_format.MessageToDict(contact.data)) == (
        "eve@example.com",
        {"plan": "trial"},
    )
    signed_up = client.create_segment("Signed up", condition=F.event("signup").triggered())
    assert emails_of(client, signed_up.id) == ["eve@example.com"]


def test_ingest_events(client: SegmentsClient) -> None:
    now = datetime.now(UTC)
    result = client.ingest_events(
        [
            {
                "email": "fay@example.com",
                "event": "purchase",
                "occurredAt": now - timedelta(hours=1),
                "data": {"total": 10},
            },
            # RFC 3339 strings are accepted as well as aware datetimes.
            {
                "email": "gus@example.com",
                "event": "purchase",
                "occurredAt": (now - timedelta(days=10)).isoformat(),
            },
            {"email": "gus@example.com", "event": "email.opened"},
        ]
    )
    assert result.accepted == 3

    def members(condition: Expression) -> list[str]:
        return emails_of(client, client.create_segment("Buyers", condition=condition).id)

    assert members(F.event("purchase").triggered_within(2, "days")) == ["fay@example.com"]
    assert members(F.event("purchase").triggered_older_than(5, "days")) == ["gus@example.com"]
    assert members(F.email_activity("open").triggered()) == ["gus@example.com"]

    # A naive datetime is refused before sending rather than silently taken as UTC.
    with pytest.raises(ValueError, match="time zone"):
        client.ingest_events(
            [{"email": "fay@example.com", "event": "x", "occurredAt": datetime.now()}]
        )


def test_invalid_argument_has_field_violations(client: SegmentsClient) -> None:
    bad = cond(flt("nonsense", "equals", "x"))
    with pytest.raises(InvalidArgumentError) as caught:
        client.create_segment("Bad", condition=bad)
    err = caught.value
    assert err.status_code == grpc.StatusCode.INVALID_ARGUMENT
    assert (err.reason, err.http_status) == ("VALIDATION_ERROR", 400)
    assert err.request_id
    assert "condition.groups.0.filters.0.field" in [v.field for v in err.field_violations]
    assert all(v.description and v.reason for v in err.field_violations)
    assert "condition.groups.0.filters.0.field" in str(err)
    assert client.list_segments() == []  # nothing written


def test_client_side_errors_are_raised_before_sending(client: SegmentsClient) -> None:
    with pytest.raises(json_format.ParseError):
        client.create_segment("Bad", condition=cond(flt("email", "resembles")))
    with pytest.raises(ValueError):
        client.create_segment("Bad", type="SMART")


def test_unauthenticated(target: str, project: Keys) -> None:
    with (
        SegmentsClient(target, "sk_not_a_real_key") as stranger,
        pytest.raises(UnauthenticatedError) as bad_key,
    ):
        stranger.list_segments()
    assert bad_key.value.status_code == grpc.StatusCode.UNAUTHENTICATED
    assert (bad_key.value.reason, bad_key.value.http_status) == ("INVALID_API_KEY", 401)

    with (
        SegmentsClient(target, project.public_key) as public,
        pytest.raises(UnauthenticatedError) as wrong_kind,
    ):
        public.list_segments()
    assert wrong_kind.value.reason == "INVALID_API_KEY"

    with (
        SegmentsClient(target, project.secret_key) as secret,
        pytest.raises(UnauthenticatedError) as secret_on_track,
    ):
        secret.track("signup", "eve@example.com")
    assert secret_on_track.value.reason == "INVALID_API_KEY"

    with SegmentsClient(target, "") as anonymous, pytest.raises(UnauthenticatedError) as missing:
        anonymous.list_segments()
    assert missing.value.reason == "MISSING_AUTH"


def test_other_projects_segment_is_not_found(
    client: SegmentsClient, target: str, other_project: Keys
) -> None:
    with SegmentsClient(target, other_project.secret_key) as other:
        theirs = other.create_segment("Theirs", type="STATIC")
        with pytest.raises(NotFoundError) as caught:
            client.get_segment(theirs.id)
        err = caught.value
        assert err.status_code == grpc.StatusCode.NOT_FOUND
        assert (err.reason, err.http_status) == ("NOT_FOUND", 404)
        assert err.request_id
        with pytest.raises(NotFoundError):
            client.add_segment_members(theirs.id, ["a@example.com"])
        with pytest.raises(NotFoundError):
            client.delete_segment(theirs.id)
        assert other.get_segment(theirs.id).member_count == 0  # untouched
    with pytest.raises(NotFoundError):
        client.get_segment("not-a-uuid")


def test_members_on_dynamic_segment_is_failed_precondition(client: SegmentsClient) -> None:
    dynamic = client.create_segment("Premium", condition=PREMIUM)
    with pytest.raises(FailedPreconditionError) as caught:
        client.add_segment_members(dynamic.id, ["a@example.com"])
    err = caught.value
    assert not isinstance(err, SegmentInUseError)
    assert err.status_code == grpc.StatusCode.FAILED_PRECONDITION
    assert (err.reason, err.http_status) == ("FAILED_PRECONDITION", 400)
    with pytest.raises(FailedPreconditionError):
        client.remove_segment_members(dynamic.id, ["a@example.com"])


def test_deleting_a_referenced_segment(client: SegmentsClient) -> None:
    base = client.create_segment("Base", type="STATIC")
    ref = client.create_segment("Ref", condition=F.segment(base).member())
    with pytest.raises(SegmentInUseError) as caught:
        client.delete_segment(base.id)
    err = caught.value
    assert isinstance(err, FailedPreconditionError)
    assert err.status_code == grpc.StatusCode.FAILED_PRECONDITION
    assert (err.reason, err.http_status, err.referenced_by) == ("SEGMENT_IN_USE", 409, [ref.id])
    client.delete_segment(ref.id)
    client.delete_segment(base.id)


def test_unreachable_server_is_unavailable() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nobody listens once it is closed
    with (
        SegmentsClient(f"127.0.0.1:{port}", "sk_x", timeout=5) as client,
        pytest.raises(UnavailableError) as caught,
    ):
        client.list_segments()
    assert caught.value.reason == ""
    assert caught.value.request_id is None


def test_given_channel_is_left_open(target: str, project: Keys) -> None:
    with grpc.insecure_channel(target) as channel:
        with SegmentsClient("unused", project.secret_key, channel=channel) as client:
            client.list_segments()
        with SegmentsClient("unused", project.secret_key, channel=channel) as client:
            assert client.list_segments() == []


def test_async_client_flow(target: str, project: Keys) -> None:
    async def scenario() -> None:
        async with AsyncSegmentsClient(target, project.secret_key) as client:
            await asyncio.gather(
                client.upsert_contact("ann@example.com", data={"plan": "premium"}),
                client.upsert_contact("bob@example.com", data={"plan": "free"}),
            )
            dynamic = await client.create_segment(
                "Premium", condition=PREMIUM, track_membership=True
            )
            assert (dynamic.member_count, dynamic.track_membership) == (1, True)
            assert condition_of(dynamic) == PREMIUM.to_dict()
            assert (await client.get_segment(dynamic.id)).name == "Premium"
            updated = await client.update_segment(
                dynamic.id, condition=FREE, description="free tier"
            )
            assert segment_description(updated) == "free tier"
            page = await client.list_segment_contacts(dynamic.id)
            assert [c.email for c in page.data] == ["bob@example.com"]

            static = await client.create_segment("VIP", type="STATIC")
            added = await client.add_segment_members(
                static.id, ["ann@example.com", "cat@example.com"]
            )
            assert (added.added, added.created) == (2, 1)
            assert (
                await client.remove_segment_members(static.id, ["cat@example.com"])
            ).removed == 1
            assert [s.id for s in await client.list_segments()] == [static.id, dynamic.id]

            batch = await client.batch_upsert_contacts([{"email": "dan@example.com"}])
            assert batch.created == 1
            ingested = await client.ingest_events(
                [{"email": "dan@example.com", "event": "purchase", "occurredAt": datetime.now(UTC)}]
            )
            assert ingested.accepted == 1
            async with AsyncSegmentsClient(target, project.public_key) as public:
                tracked = await public.track("signup", "eve@example.com")
            contact = await client.get_contact(tracked.data.contact)
            assert contact.email == "eve@example.com"
            await client.delete_contact(contact.id)
            await client.delete_segment(static.id)
            await client.delete_segment(dynamic.id)
            assert await client.list_segments() == []

    asyncio.run(scenario())


def test_async_client_errors(target: str, project: Keys, other_project: Keys) -> None:
    async def scenario() -> None:
        async with (
            AsyncSegmentsClient(target, project.secret_key) as client,
            AsyncSegmentsClient(target, other_project.secret_key) as other,
        ):
            theirs = await other.create_segment("Theirs", type="STATIC")
            with pytest.raises(NotFoundError) as not_found:
                await client.get_segment(theirs.id)
            assert (not_found.value.reason, not_found.value.http_status) == ("NOT_FOUND", 404)
            assert not_found.value.request_id

            bad = cond(flt("nonsense", "equals", "x"))
            with pytest.raises(InvalidArgumentError) as invalid:
                await client.create_segment("Bad", condition=bad)
            assert "condition.groups.0.filters.0.field" in [
                v.field for v in invalid.value.field_violations
            ]

            base = await client.create_segment("Base", type="STATIC")
            ref = await client.create_segment(
                "Ref",
                condition=F.segment(base).member(),
            )
            with pytest.raises(SegmentInUseError) as in_use:
                await client.delete_segment(base.id)
            assert in_use.value.referenced_by == [ref.id]
            with pytest.raises(FailedPreconditionError):
                await client.add_segment_members(ref.id, ["a@example.com"])

        async with AsyncSegmentsClient(target, "sk_not_a_real_key") as stranger:
            with pytest.raises(UnauthenticatedError) as unauthenticated:
                await stranger.list_segments()
            assert unauthenticated.value.reason == "INVALID_API_KEY"

    asyncio.run(scenario())


def test_watch_and_export_stream_through_the_client(grpc_port: int, project: Keys) -> None:
    with SegmentsClient(f"127.0.0.1:{grpc_port}", project.secret_key) as client:
        vip = client.create_segment(
            "VIP",
            condition=PREMIUM,
            track_membership=True,
        )
        events = client.watch_segment_events(timeout=20)
        for i in range(3):
            client.upsert_contact(f"v{i}@x.com", data={"plan": "premium"})
        first = next(events)
        assert (first.email, first.kind, first.segment_id) == (
            "v0@x.com",
            segments_pb2.SegmentEvent.ENTRY,
            vip.id,
        )
        resumed = client.watch_segment_events(after=first.cursor, timeout=20)
        assert [next(resumed).email for _ in range(2)] == ["v1@x.com", "v2@x.com"]
        exported = sorted(c.email for c in client.export_segment_contacts(vip.id))
        assert exported == ["v0@x.com", "v1@x.com", "v2@x.com"]
        with pytest.raises(NotFoundError):
            list(client.export_segment_contacts("00000000-0000-0000-0000-000000000000"))


# --- a Watch bounded by the caller's own deadline ------------------------------------------


def _watched_segment(client: SegmentsClient) -> Segment:
    return client.create_segment("Watched", condition=PREMIUM, track_membership=True)


@pytest.mark.parametrize("through", ["server", "envoy"])
def test_a_watch_ends_cleanly_when_its_deadline_passes(
    through: str, grpc_port: int, rest_url: str, project: Keys
) -> None:
    """The timeout the caller bounded a Watch with ends the iteration, no exception, after
    the events that came before it; directly and through Envoy (which enforces the deadline
    too)."""
    target = f"127.0.0.1:{grpc_port}" if through == "server" else rest_url.removeprefix("http://")
    with SegmentsClient(target, project.secret_key) as client:
        _watched_segment(client)
        events = client.watch_segment_events(timeout=3)
        client.upsert_contact("w0@x.com", data={"plan": "premium"})
        client.upsert_contact("w1@x.com", data={"plan": "premium"})
        assert [e.email for e in events] == ["w0@x.com", "w1@x.com"]
        assert list(events) == []  # ended, and stays ended


def test_an_async_watch_ends_cleanly_when_its_deadline_passes(
    grpc_port: int, project: Keys
) -> None:
    async def scenario() -> list[str]:
        async with AsyncSegmentsClient(f"127.0.0.1:{grpc_port}", project.secret_key) as client:
            await client.create_segment("Watched", condition=PREMIUM, track_membership=True)
            events = client.watch_segment_events(timeout=3)
            await events.opened()  # its start is fixed: the write below is seen
            await client.upsert_contact("a0@x.com", data={"plan": "premium"})
            return [e.email async for e in events]

    assert asyncio.run(scenario()) == ["a0@x.com"]


def test_other_watch_errors_still_raise(grpc_port: int, project: Keys) -> None:
    target = f"127.0.0.1:{grpc_port}"
    with (
        SegmentsClient(target, "sk_not_a_real_key") as stranger,
        pytest.raises(UnauthenticatedError),
    ):
        list(stranger.watch_segment_events(timeout=3))
    with SegmentsClient(target, project.secret_key) as client, pytest.raises(InvalidArgumentError):
        list(client.watch_segment_events(after="not a cursor", timeout=3))

    async def scenario() -> None:
        async with AsyncSegmentsClient(f"127.0.0.1:{grpc_port}", "sk_not_a_real_key") as client:
            with pytest.raises(UnauthenticatedError):
                async for _ in client.watch_segment_events(timeout=3):
                    pass

    asyncio.run(scenario())
