"""ExportSegmentContacts: every member once, in contact id order, many to a message, within
the message bounds; the typed clients hand out contacts one by one."""

from __future__ import annotations

import asyncio

import pytest

from segments import F
from segments.client import AsyncSegmentsClient, SegmentsClient
from segments_api.v1 import events_pb2, resources_pb2, segments_pb2
from segments_service import streams
from tests.conditions import as_proto
from tests.conftest import Project, Stubs

MEMBERS = 2100


def signed_up(stubs: Stubs, project: Project, count: int) -> str:
    """A segment of `count` contacts (those with a signup event) and one outsider."""
    segment = stubs.segments.CreateSegment(
        segments_pb2.CreateSegmentRequest(
            name="Signed up", condition=as_proto(F.event("signup").triggered())
        ),
        metadata=project.auth,
    )
    emails = [f"e{i:04d}@x.com" for i in range(count)] + ["outsider@x.com"]
    for start in range(0, len(emails), 1000):
        stubs.events.IngestEvents(
            events_pb2.IngestEventsRequest(
                events=[
                    events_pb2.IngestedEvent(
                        email=email, event="visit" if email.startswith("outsider") else "signup"
                    )
                    for email in emails[start : start + 1000]
                ]
            ),
            metadata=project.auth,
        )
    return str(segment.id)


def messages(stubs: Stubs, project: Project, segment_id: str) -> list[list[resources_pb2.Contact]]:
    stream = stubs.segments.ExportSegmentContacts(
        segments_pb2.ExportSegmentContactsRequest(id=segment_id), metadata=project.auth, timeout=30
    )
    return [list(batch.contacts) for batch in stream]


def test_members_arrive_once_in_id_order_a_thousand_to_a_message(
    stubs: Stubs, project: Project
) -> None:
    segment_id = signed_up(stubs, project, MEMBERS)
    got = messages(stubs, project, segment_id)
    assert [len(batch) for batch in got] == [1000, 1000, 100]
    contacts = [c for batch in got for c in batch]
    assert sorted(c.email for c in contacts) == [f"e{i:04d}@x.com" for i in range(MEMBERS)]
    ids = [c.id for c in contacts]
    assert ids == sorted(ids)
    assert len(set(ids)) == MEMBERS


def test_messages_keep_to_the_byte_bound(
    stubs: Stubs, project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    segment_id = signed_up(stubs, project, 7)
    (whole,) = messages(stubs, project, segment_id)
    size = whole[0].ByteSize()
    assert {c.ByteSize() for c in whole} == {size}
    # Two and a half contacts' worth: two to a message, the last one alone.
    monkeypatch.setattr(streams, "EXPORT_BATCH_BYTES", size * 5 // 2)
    assert [len(batch) for batch in messages(stubs, project, segment_id)] == [2, 2, 2, 1]
    # Smaller than one contact: each still goes, alone.
    monkeypatch.setattr(streams, "EXPORT_BATCH_BYTES", 1)
    assert [len(batch) for batch in messages(stubs, project, segment_id)] == [1] * 7


def test_an_empty_segment_sends_no_message(stubs: Stubs, project: Project) -> None:
    segment_id = signed_up(stubs, project, 0)
    assert messages(stubs, project, segment_id) == []


def test_the_clients_hand_out_contacts_one_by_one(
    grpc_port: int, stubs: Stubs, project: Project
) -> None:
    segment_id = signed_up(stubs, project, 1001)
    expected = [c.email for batch in messages(stubs, project, segment_id) for c in batch]
    assert len(expected) == 1001
    target = f"127.0.0.1:{grpc_port}"
    with SegmentsClient(target, project.secret_key) as client:
        assert [c.email for c in client.export_segment_contacts(segment_id)] == expected

    async def exported() -> list[str]:
        async with AsyncSegmentsClient(target, project.secret_key) as client:
            return [c.email async for c in client.export_segment_contacts(segment_id)]

    assert asyncio.run(exported()) == expected
