"""Smoke: the main flows over gRPC against real PostgreSQL."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import struct_pb2

from segments import F
from segments_api.v1 import contacts_pb2, events_pb2, segments_pb2
from tests.conditions import as_proto
from tests.conftest import Project, Stubs


def test_flow(stubs: Stubs, project: Project) -> None:
    for email, plan in [("A@x.com ", "premium"), ("b@x.com", "free"), ("c@x.com", "premium")]:
        data = struct_pb2.Struct()
        data.update({"plan": plan})
        stubs.contacts.UpsertContact(
            contacts_pb2.UpsertContactRequest(email=email, data=data), metadata=project.auth
        )
    seg = stubs.segments.CreateSegment(
        segments_pb2.CreateSegmentRequest(
            name="Premium",
            condition=as_proto(F.data("plan") == "premium"),
        ),
        metadata=project.auth,
    )
    assert seg.member_count == 2
    page = stubs.segments.ListSegmentContacts(
        segments_pb2.ListSegmentContactsRequest(id=seg.id), metadata=project.auth
    )
    assert sorted(c.email for c in page.data) == ["a@x.com", "c@x.com"]
    stubs.events.Track(
        events_pb2.TrackRequest(event="purchase", email="b@x.com"), metadata=project.public_auth
    )
    with pytest.raises(grpc.RpcError) as err:
        stubs.segments.GetSegment(segments_pb2.GetSegmentRequest(id="nope"), metadata=project.auth)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
