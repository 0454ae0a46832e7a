"""CountMatchingContacts: a condition's member count without creating a segment."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import grpc
import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from segments import (
    AsyncSegmentsClient,
    Expression,
    F,
    InvalidArgumentError,
    SegmentsClient,
    UnauthenticatedError,
)
from segments_api.v1 import segments_pb2
from segments_service import segments
from tests.conditions import cond, flt
from tests.conftest import Project, Stubs

PREMIUM = F.data("plan") == "premium"
NO_PURCHASE = F.event("purchase").not_triggered()
NO_RECENT_LOGIN = F.event("login").not_triggered_within(7, "days")
BOUGHT = F.event("purchase").triggered()


@pytest.fixture
def other(target: str, other_project: Project) -> Iterator[SegmentsClient]:
    with SegmentsClient(target, other_project.secret_key) as client:
        yield client


def populate(client: SegmentsClient) -> None:
    """Five contacts: two premium, two buyers (one premium), a login for three."""
    for i, plan in enumerate(["premium", "premium", "free", "free", "free"]):
        client.upsert_contact(f"c{i}@x.com", data={"plan": plan})
    client.ingest_events(
        [
            {"email": "c0@x.com", "event": "purchase"},
            {"email": "c2@x.com", "event": "purchase"},
            {"email": "c0@x.com", "event": "login"},
            {"email": "c1@x.com", "event": "login"},
            {"email": "c3@x.com", "event": "login"},
        ]
    )


@pytest.mark.parametrize(
    ("condition", "expected"),
    [
        (PREMIUM, 2),
        (BOUGHT, 2),
        # Everyone but a set: counted by subtraction, and still only this project's.
        (NO_PURCHASE, 3),
        (NO_RECENT_LOGIN, 2),
        (PREMIUM & NO_PURCHASE, 1),
        (PREMIUM | BOUGHT, 3),
        (F.event("never").not_triggered(), 5),
        (F.event("never").triggered(), 0),
    ],
)
def test_counts_what_a_segment_of_the_condition_holds(
    client: SegmentsClient, other: SegmentsClient, condition: Expression, expected: int
) -> None:
    populate(client)
    # Another tenant's contacts and events change nothing here.
    populate(other)
    other.upsert_contact("extra@x.com")
    assert client.count_matching_contacts(condition) == expected
    assert client.create_segment("Same", condition=condition).member_count == expected
    assert (
        other.count_matching_contacts(condition)
        == other.create_segment("Same", condition=condition).member_count
    )


def test_segment_references_count_as_the_referenced_condition(client: SegmentsClient) -> None:
    populate(client)
    premium = client.create_segment("Premium", condition=PREMIUM)
    listed = client.create_segment("List", type="STATIC")
    client.add_segment_members(listed.id, ["c0@x.com", "c4@x.com"])
    member = F.segment(premium).member()
    not_listed = F.segment(listed).not_member()
    assert client.count_matching_contacts(member) == 2
    assert client.count_matching_contacts(not_listed) == 3
    assert client.count_matching_contacts(member & not_listed) == 1


def test_nothing_is_stored(client: SegmentsClient) -> None:
    populate(client)
    assert client.count_matching_contacts(PREMIUM) == 2
    assert client.list_segments() == []


def test_invalid_conditions_are_refused_as_create_refuses_them(
    client: SegmentsClient, other: SegmentsClient, stubs: Stubs, project: Project
) -> None:
    bad = cond(flt("data.plan", "within", "x"))
    with pytest.raises(InvalidArgumentError) as caught:
        client.count_matching_contacts(bad)
    assert caught.value.status_code == grpc.StatusCode.INVALID_ARGUMENT
    assert "condition.groups.0.filters.0.value" in [v.field for v in caught.value.field_violations]

    with pytest.raises(grpc.RpcError) as missing:
        stubs.segments.CountMatchingContacts(
            segments_pb2.CountMatchingContactsRequest(), metadata=project.auth
        )
    assert missing.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "condition" in str(missing.value.details())

    foreign = other.create_segment("Theirs", condition=PREMIUM)
    reference = F.segment(foreign).member()
    with pytest.raises(InvalidArgumentError) as cross:
        client.count_matching_contacts(reference)
    assert [v.field for v in cross.value.field_violations] == ["condition.groups.0.filters.0.field"]


def test_needs_a_secret_key(target: str, project: Project) -> None:
    with (
        SegmentsClient(target, project.public_key) as public,
        pytest.raises(UnauthenticatedError),
    ):
        public.count_matching_contacts(PREMIUM)


def test_asyncio_client(target: str, project: Project, client: SegmentsClient) -> None:
    populate(client)

    async def count() -> int:
        async with AsyncSegmentsClient(target, project.secret_key) as aclient:
            return await aclient.count_matching_contacts(NO_PURCHASE)

    assert asyncio.run(count()) == 3


def test_the_count_runs_with_its_own_work_mem(
    sessions: sessionmaker[Session], project: Project
) -> None:
    # Sorts and hashes of a count spill to disk at a million contacts with the server's
    # 4 MB; only the count's own transaction gets more.
    with sessions.begin() as session:
        default = session.execute(text("SHOW work_mem")).scalar_one()
    with sessions.begin() as session:
        count = segments.count_matching(session, uuid.UUID(project.id), NO_PURCHASE.to_dict())
        assert count == 0
        assert session.execute(text("SHOW work_mem")).scalar_one() == segments.COUNT_WORK_MEM
    with sessions.begin() as session:
        assert session.execute(text("SHOW work_mem")).scalar_one() == default
    assert default != segments.COUNT_WORK_MEM
