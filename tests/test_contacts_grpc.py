"""Around the segments over gRPC and through the typed client: ListContacts,
UpdateContact, ListContactSegments and PreviewSegment, with their status codes and
details, project isolation, and the cursor pagers, blocking and asyncio."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import grpc
import pytest
from google.protobuf import json_format, struct_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from sqlalchemy import Engine, text

from segments import (
    AlreadyExistsError,
    AsyncSegmentsClient,
    F,
    InvalidArgumentError,
    NotFoundError,
    SegmentsClient,
    UnauthenticatedError,
    contacts_cursor,
)
from segments_api.v1 import contacts_pb2, resources_pb2, segments_pb2
from tests.conditions import as_proto, cond, flt
from tests.conftest import Project, Stubs

PREMIUM = F.data("plan") == "premium"
Type = resources_pb2.Segment.Type


def struct(data: dict[str, Any]) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    out.update(data)
    return out


def violations(err: grpc.Call) -> list[str]:
    status = rpc_status.from_call(err)
    assert status is not None
    fields: list[str] = []
    for detail in status.details:
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            fields += [v.field for v in bad.field_violations]
    return fields


def code_of(call: Any) -> tuple[grpc.StatusCode, list[str]]:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    err = caught.value
    assert isinstance(err, grpc.Call)
    return err.code(), violations(err)


# -- the raw stubs -------------------------------------------------------------------------


def test_list_contacts_pages_with_a_cursor(stubs: Stubs, project: Project) -> None:
    for i in range(7):
        stubs.contacts.UpsertContact(
            contacts_pb2.UpsertContactRequest(email=f"g{i}@example.com", subscribed=i % 2 == 0),
            metadata=project.auth,
        )
    first = stubs.contacts.ListContacts(
        contacts_pb2.ListContactsRequest(limit=3), metadata=project.auth
    )
    assert [c.email for c in first.data] == ["g6@example.com", "g5@example.com", "g4@example.com"]
    assert (first.has_more, first.total) == (True, 7)
    assert first.cursor.WhichOneof("kind") == "string_value"
    emails = [c.email for c in first.data]
    page = first
    while page.has_more:
        page = stubs.contacts.ListContacts(
            contacts_pb2.ListContactsRequest(limit=3, cursor=page.cursor.string_value),
            metadata=project.auth,
        )
        assert page.total == 0
        emails += [c.email for c in page.data]
    assert emails == [f"g{i}@example.com" for i in range(6, -1, -1)]
    assert page.cursor.WhichOneof("kind") == "null_value"
    odd = stubs.contacts.ListContacts(
        contacts_pb2.ListContactsRequest(subscribed=False, search="G"), metadata=project.auth
    )
    assert [c.email for c in odd.data] == ["g5@example.com", "g3@example.com", "g1@example.com"]
    assert odd.total == 3


def test_list_contacts_refusals(stubs: Stubs, project: Project, other_project: Project) -> None:
    code, fields = code_of(
        lambda: stubs.contacts.ListContacts(
            contacts_pb2.ListContactsRequest(limit=-5, search="x" * 300, cursor="?"),
            metadata=project.auth,
        )
    )
    assert (code, fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["limit", "search", "cursor"])
    stubs.contacts.UpsertContact(
        contacts_pb2.UpsertContactRequest(email="a@example.com"), metadata=project.auth
    )
    stubs.contacts.UpsertContact(
        contacts_pb2.UpsertContactRequest(email="b@example.com"), metadata=project.auth
    )
    page = stubs.contacts.ListContacts(
        contacts_pb2.ListContactsRequest(limit=1), metadata=project.auth
    )
    code, fields = code_of(
        lambda: stubs.contacts.ListContacts(
            contacts_pb2.ListContactsRequest(cursor=page.cursor.string_value),
            metadata=other_project.auth,
        )
    )
    assert (code, fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["cursor"])
    code, _ = code_of(
        lambda: stubs.contacts.ListContacts(
            contacts_pb2.ListContactsRequest(), metadata=project.public_auth
        )
    )
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert (
        list(
            stubs.contacts.ListContacts(
                contacts_pb2.ListContactsRequest(), metadata=other_project.auth
            ).data
        )
        == []
    )


def test_update_contact(stubs: Stubs, project: Project, other_project: Project) -> None:
    ada = stubs.contacts.UpsertContact(
        contacts_pb2.UpsertContactRequest(email="ada@example.com", data=struct({"a": 1, "b": 2})),
        metadata=project.auth,
    )
    stubs.contacts.UpsertContact(
        contacts_pb2.UpsertContactRequest(email="grace@example.com"), metadata=project.auth
    )
    changed = stubs.contacts.UpdateContact(
        contacts_pb2.UpdateContactRequest(
            id=ada.id, subscribed=False, data=struct({"b": None, "c": "x"})
        ),
        metadata=project.auth,
    )
    assert json_format.MessageToDict(changed.data) == {"a": 1, "c": "x"}
    assert (changed.email, changed.subscribed) == ("ada@example.com", False)
    code, _ = code_of(
        lambda: stubs.contacts.UpdateContact(
            contacts_pb2.UpdateContactRequest(id=ada.id, email="Grace@example.com"),
            metadata=project.auth,
        )
    )
    assert code == grpc.StatusCode.ALREADY_EXISTS
    code, fields = code_of(
        lambda: stubs.contacts.UpdateContact(
            contacts_pb2.UpdateContactRequest(id=ada.id, email="nope"), metadata=project.auth
        )
    )
    assert (code, fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["email"])
    for contact_id in (str(uuid.uuid4()), "x", ada.id):
        code, _ = code_of(
            lambda contact_id=contact_id: stubs.contacts.UpdateContact(
                contacts_pb2.UpdateContactRequest(id=contact_id, subscribed=True),
                metadata=other_project.auth,
            )
        )
        assert code == grpc.StatusCode.NOT_FOUND
    again = stubs.contacts.GetContact(
        contacts_pb2.GetContactRequest(id=ada.id), metadata=project.auth
    )
    assert again == changed


def test_list_contact_segments(stubs: Stubs, project: Project, other_project: Project) -> None:
    premium = stubs.segments.CreateSegment(
        segments_pb2.CreateSegmentRequest(name="Premium", condition=as_proto(PREMIUM)),
        metadata=project.auth,
    )
    listed = stubs.segments.CreateSegment(
        segments_pb2.CreateSegmentRequest(name="Listed", type=Type.STATIC), metadata=project.auth
    )
    ada = stubs.contacts.UpsertContact(
        contacts_pb2.UpsertContactRequest(
            email="ada@example.com", data=struct({"plan": "premium"})
        ),
        metadata=project.auth,
    )
    stubs.segments.AddSegmentMembers(
        segments_pb2.AddSegmentMembersRequest(id=listed.id, emails=["ada@example.com"]),
        metadata=project.auth,
    )
    got = stubs.contacts.ListContactSegments(
        contacts_pb2.ListContactSegmentsRequest(id=ada.id), metadata=project.auth
    )
    assert [(s.id, s.name, s.type) for s in got.segments] == [
        (listed.id, "Listed", Type.STATIC),
        (premium.id, "Premium", Type.DYNAMIC),
    ]
    code, _ = code_of(
        lambda: stubs.contacts.ListContactSegments(
            contacts_pb2.ListContactSegmentsRequest(id=ada.id), metadata=other_project.auth
        )
    )
    assert code == grpc.StatusCode.NOT_FOUND


def test_preview_segment(stubs: Stubs, project: Project, other_project: Project) -> None:
    for i in range(12):
        stubs.contacts.UpsertContact(
            contacts_pb2.UpsertContactRequest(
                email=f"p{i}@example.com", data=struct({"plan": "premium" if i < 11 else "free"})
            ),
            metadata=project.auth,
        )
    got = stubs.segments.PreviewSegment(
        segments_pb2.PreviewSegmentRequest(condition=as_proto(PREMIUM)), metadata=project.auth
    )
    assert got.member_count == 11
    emails = [c.email for c in got.sample]
    assert len(set(emails)) == 10
    assert set(emails) <= {f"p{i}@example.com" for i in range(11)}
    # Shown newest first: p10 was written last, p0 first.
    assert emails == sorted(emails, key=lambda e: -int(e[1 : e.index("@")]))
    assert (
        stubs.segments.CountMatchingContacts(
            segments_pb2.CountMatchingContactsRequest(condition=as_proto(PREMIUM)),
            metadata=project.auth,
        ).count
        == 11
    )
    assert not stubs.segments.ListSegments(
        segments_pb2.ListSegmentsRequest(), metadata=project.auth
    ).segments
    mine = stubs.segments.PreviewSegment(
        segments_pb2.PreviewSegmentRequest(condition=as_proto(PREMIUM)),
        metadata=other_project.auth,
    )
    assert (mine.member_count, list(mine.sample)) == (0, [])
    bad = json_format.ParseDict(
        cond(flt("data.plan", "equals", "x"), flt("createdAt", "within", -1, "days")),
        resources_pb2.FilterCondition(),
    )
    code, fields = code_of(
        lambda: stubs.segments.PreviewSegment(
            segments_pb2.PreviewSegmentRequest(condition=bad), metadata=project.auth
        )
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert fields == ["condition.groups.0.filters.1.value"]
    code, fields = code_of(
        lambda: stubs.segments.PreviewSegment(
            segments_pb2.PreviewSegmentRequest(), metadata=project.auth
        )
    )
    assert (code, fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["condition"])


# -- the typed client ----------------------------------------------------------------------


def test_the_client_lists_and_walks_contacts(client: SegmentsClient) -> None:
    client.batch_upsert_contacts(
        [{"email": f"w{i:02d}@acme.com", "subscribed": i % 3 != 0} for i in range(23)]
        + [{"email": "someone@else.org"}]
    )
    page = client.list_contacts(limit=5, search="@ACME")
    assert (len(page.data), page.total, page.has_more) == (5, 23, True)
    following = client.list_contacts(limit=5, search="@acme", cursor=contacts_cursor(page))
    assert following.total == 0
    assert not {c.id for c in page.data} & {c.id for c in following.data}

    pager = client.iter_contacts(search="@acme.com", page_size=7)
    assert pager.total is None
    walked = [c.email for c in pager]
    assert sorted(walked) == sorted(f"w{i:02d}@acme.com" for i in range(23))
    assert pager.total == 23
    pages = list(client.iter_contacts(search="@acme.com", page_size=7).pages)
    assert [len(p.data) for p in pages] == [7, 7, 7, 2]
    assert contacts_cursor(pages[-1]) is None
    unsubscribed = [c.email for c in client.iter_contacts(subscribed=False)]
    assert sorted(unsubscribed) == sorted(f"w{i:02d}@acme.com" for i in range(0, 23, 3))
    assert len(list(client.iter_contacts())) == 24
    with pytest.raises(ValueError, match="page_size"):
        client.iter_contacts(page_size=101)
    with pytest.raises(InvalidArgumentError) as caught:
        client.list_contacts(cursor="nonsense")
    assert [v.field for v in caught.value.field_violations] == ["cursor"]


def test_a_full_last_page_asks_for_no_more(client: SegmentsClient) -> None:
    client.batch_upsert_contacts([{"email": f"f{i}@example.com"} for i in range(6)])
    pager = client.iter_contacts(page_size=3)
    assert [len(p.data) for p in pager.pages] == [3, 3]
    with pytest.raises(RuntimeError, match="iterated already"):
        list(pager)


def test_the_client_updates_contacts(client: SegmentsClient) -> None:
    ada = client.upsert_contact("ada@example.com", data={"plan": "free", "seats": 3})
    client.upsert_contact("grace@example.com")
    vip = client.create_segment("VIP", condition=PREMIUM)
    changed = client.update_contact(ada.id, data={"plan": "premium", "seats": None})
    assert json_format.MessageToDict(changed.data) == {"plan": "premium"}
    assert [s.name for s in client.list_contact_segments(ada.id)] == ["VIP"]
    assert client.get_segment(vip.id).member_count == 1
    with pytest.raises(AlreadyExistsError):
        client.update_contact(ada.id, email="grace@example.com")
    with pytest.raises(NotFoundError):
        client.update_contact(str(uuid.uuid4()), subscribed=False)
    with pytest.raises(NotFoundError):
        client.list_contact_segments(str(uuid.uuid4()))
    moved = client.update_contact(ada.id, email="Ada@Acme.com", subscribed=False)
    assert (moved.email, moved.subscribed) == ("ada@acme.com", False)


def test_the_client_previews_a_condition(client: SegmentsClient) -> None:
    client.batch_upsert_contacts(
        [{"email": f"v{i}@example.com", "data": {"n": i}} for i in range(15)]
    )
    got = client.preview_segment(F.data("n") >= 3)
    assert got.member_count == 12 and len(got.sample) == 10
    assert {c.email for c in got.sample} <= {f"v{i}@example.com" for i in range(3, 15)}
    with pytest.raises(InvalidArgumentError) as caught:
        client.preview_segment(cond(flt("data.n", "between", "x")))
    assert caught.value.field_violations[0].field.startswith("condition.groups.0.filters.0")


def test_the_client_needs_a_key_that_works(target: str, project: Project) -> None:
    with SegmentsClient(target, project.public_key) as client:
        with pytest.raises(UnauthenticatedError):
            client.list_contacts()
        with pytest.raises(UnauthenticatedError):
            client.preview_segment(PREMIUM)


def test_the_async_client(client: SegmentsClient, target: str, project: Project) -> None:
    client.batch_upsert_contacts([{"email": f"a{i}@example.com"} for i in range(9)])
    ada = client.upsert_contact("ada@example.com", data={"plan": "premium"})
    expected = [c.email for c in client.iter_contacts()]

    async def scenario() -> None:
        async with AsyncSegmentsClient(target, project.secret_key) as aclient:
            walked = [c.email async for c in aclient.iter_contacts(page_size=4)]
            assert walked == expected
            pager = aclient.iter_contacts(page_size=4)
            assert [len(p.data) async for p in pager.pages] == [4, 4, 2]
            assert pager.total == 10
            first = await aclient.list_contacts(limit=2, search="ada")
            assert [c.email for c in first.data] == ["ada@example.com"]
            changed = await aclient.update_contact(ada.id, subscribed=False)
            assert changed.subscribed is False
            segment = await aclient.create_segment("P", condition=PREMIUM)
            assert [s.id for s in await aclient.list_contact_segments(ada.id)] == [segment.id]
            preview = await aclient.preview_segment(PREMIUM)
            assert (preview.member_count, [c.id for c in preview.sample]) == (1, [ada.id])

    asyncio.run(scenario())


def test_the_preview_sample_is_members_newest_first(client: SegmentsClient) -> None:
    """Up to ten of the members, whichever the statement finds first, shown newest first."""
    for start in (0, 10, 20):
        client.batch_upsert_contacts(
            [{"email": f"n{i:02d}@example.com", "data": {"n": i}} for i in range(start, start + 10)]
        )
    listed = list(client.iter_contacts())
    order = {c.id: i for i, c in enumerate(listed)}  # newest first
    for condition in (F.data("n") >= 0, F.data("n") < 5, F.data("n") >= 24, F.data("n") > 99):
        expected = {
            c.id for c in listed if condition_holds(condition, json_format.MessageToDict(c.data))
        }
        got = client.preview_segment(condition)
        assert got.member_count == len(expected)
        ids = [c.id for c in got.sample]
        assert len(ids) == min(10, len(expected)) == len(set(ids))
        assert set(ids) <= expected
        assert ids == sorted(ids, key=order.__getitem__)


def condition_holds(condition: Any, data: dict[str, Any]) -> bool:
    (item,) = condition.to_dict()["groups"][0]["filters"]
    n, value = float(data["n"]), float(item["value"])
    return {
        "greaterThanOrEqual": n >= value,
        "lessThan": n < value,
        "greaterThan": n > value,
    }[item["operator"]]


def test_the_preview_samples_its_first_slice_of_contacts_then_the_rest(
    client: SegmentsClient, project: Project, engine: Engine
) -> None:
    """Members whose ids lie in the first thousandth of the id space are sampled from that
    slice alone; when it holds fewer than ten, the rest come from the other contacts."""
    low = [uuid.UUID(int=i + 1) for i in range(12)]  # ids at the very start of the space
    _insert_at(engine, project, low, "low")
    for i in range(5):
        client.upsert_contact(f"high{i}@x.com", data={"plan": "pro"})
    # Twelve members in the slice: the sample is ten of them.
    got = client.preview_segment(F.data("plan") == "pro")
    assert got.member_count == 17
    assert len(got.sample) == 10
    assert {uuid.UUID(c.id) for c in got.sample} <= set(low)
    # Three in the slice: those three and seven of the others.
    with engine.begin() as conn:
        conn.execute(
            text("UPDATE contacts SET data = '{}' WHERE project_id = :p AND id = ANY(:ids)"),
            {"p": project.id, "ids": low[3:]},
        )
    got = client.preview_segment(F.data("plan") == "pro")
    assert got.member_count == 8
    ids = {uuid.UUID(c.id) for c in got.sample}
    assert len(ids) == 8 and set(low[:3]) <= ids


def _insert_at(engine: Engine, project: Project, ids: list[uuid.UUID], prefix: str) -> None:
    """Contacts with chosen ids (where in the id space they lie), each with plan "pro"."""
    with engine.begin() as conn:
        for i, contact_id in enumerate(ids):
            conn.execute(
                text(
                    "INSERT INTO contacts (project_id, id, email, subscribed, data, created_at, "
                    "updated_at) VALUES (:p, :id, :e, true, CAST(:d AS jsonb), now(), now())"
                ),
                {
                    "p": project.id,
                    "id": contact_id,
                    "e": f"{prefix}{i}@x.com",
                    "d": '{"plan": "pro"}',
                },
            )


def test_the_preview_samples_the_second_slice_in_the_counts_own_pass(
    client: SegmentsClient, project: Project, engine: Engine
) -> None:
    """From PostgreSQL 16 on, the count's pass gathers the members of two slices (a
    thousandth and a fiftieth of the id space): with too few in the first, the sample
    comes from the second; before 16, from the first slice and then any other members."""
    space = 2**128
    first = [uuid.UUID(int=i + 1) for i in range(2)]
    second = [uuid.UUID(int=int(0.01 * space) + i) for i in range(11)]
    beyond = [uuid.UUID(int=int(0.5 * space) + i) for i in range(11)]
    _insert_at(engine, project, first + second + beyond, "c")
    got = client.preview_segment(F.data("plan") == "pro")
    assert got.member_count == 24
    ids = {uuid.UUID(c.id) for c in got.sample}
    assert len(ids) == 10
    with engine.connect() as conn:
        version = int(conn.execute(text("SHOW server_version_num")).scalar_one())
    if version >= 160000:
        assert ids <= set(first + second)
    else:
        assert set(first) <= ids
    # Everyone but a set is counted by subtraction, and sampled by a statement of its own.
    without = client.preview_segment(F.event("never").not_triggered())
    assert without.member_count == 24 and len(without.sample) == 10
    assert set(first) <= {uuid.UUID(c.id) for c in without.sample}


def test_an_event_sets_sample_is_its_smallest_members_of_the_second_slice(
    client: SegmentsClient, project: Project, engine: Engine
) -> None:
    """A condition counted by count(DISTINCT) over its events gathers one slice, the
    fiftieth of the id space, in sorted order: the sample is its ten smallest members, so
    the thousandth's when that holds enough. Contacts with two events appear once."""
    space = 2**128
    first = [uuid.UUID(int=i + 1) for i in range(2)]
    second = [uuid.UUID(int=int(0.01 * space) + i) for i in range(11)]
    beyond = [uuid.UUID(int=int(0.5 * space) + i) for i in range(11)]
    _insert_at(engine, project, first + second + beyond, "e")
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO events (project_id, contact_id, name, data, occurred_at) "
                "SELECT :p, id, 'purchase', '{}', now() - interval '1 day' * n "
                "FROM unnest(CAST(:ids AS uuid[])) AS id, generate_series(1, 2) AS n"
            ),
            {"p": project.id, "ids": first + second + beyond},
        )
    got = client.preview_segment(F.event("purchase").triggered_within(30, "days"))
    assert got.member_count == 24
    ids = [uuid.UUID(c.id) for c in got.sample]
    assert len(ids) == len(set(ids)) == 10
    with engine.connect() as conn:
        version = int(conn.execute(text("SHOW server_version_num")).scalar_one())
    if version >= 160000:
        assert set(ids) == set(sorted(first + second)[:10])
    else:
        assert set(first) <= set(ids)
