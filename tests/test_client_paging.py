"""Page iterators of the typed client, blocking and asyncio, and the one shape both clients
share, against the real in-process server."""

from __future__ import annotations

import asyncio
import inspect
import uuid
from typing import Protocol

import pytest

from segments import AsyncSegmentsClient, F, NotFoundError, SegmentsClient


class Keys(Protocol):
    """What the conftest `project` fixture provides."""

    @property
    def secret_key(self) -> str: ...


def static_segment(client: SegmentsClient, members: int) -> str:
    segment = client.create_segment("Walked", type="STATIC")
    emails = [f"m{i:04d}@example.com" for i in range(members)]
    for start in range(0, members, 500):
        client.add_segment_members(segment.id, emails[start : start + 500])
    return segment.id


def listed(client: SegmentsClient, id: str, page_size: int) -> list[str]:
    """The members page by page through list_segment_contacts, for comparison."""
    out: list[str] = []
    page = 1
    while True:
        response = client.list_segment_contacts(id, page=page, page_size=page_size)
        out += [c.email for c in response.data]
        if page >= response.total_pages:
            return out
        page += 1


@pytest.mark.parametrize(("members", "page_size", "pages"), [(250, 100, 3), (21, 7, 3), (23, 7, 4)])
def test_every_member_once_across_pages(
    client: SegmentsClient, members: int, page_size: int, pages: int
) -> None:
    id = static_segment(client, members)
    walked = [c.email for c in client.iter_segment_contacts(id, page_size=page_size)]
    assert len(walked) == members
    assert len(set(walked)) == members
    assert walked == listed(client, id, page_size)

    pager = client.iter_segment_contacts(id, page_size=page_size)
    assert pager.total is None
    responses = list(pager.pages)
    # No page past the last one is asked for, even when the last one is full.
    assert [r.page for r in responses] == list(range(1, pages + 1))
    assert pager.total == members


def test_the_default_page_size_is_the_largest(client: SegmentsClient) -> None:
    id = static_segment(client, 101)
    pager = client.iter_segment_contacts(id)
    assert [len(page.data) for page in pager.pages] == [100, 1]


def test_a_dynamic_segment_and_an_empty_one(client: SegmentsClient) -> None:
    client.batch_upsert_contacts(
        [{"email": f"d{i}@example.com", "data": {"n": i}} for i in range(30)]
    )
    dynamic = client.create_segment("Even", condition=F.data("n") >= 10)
    walked = [c.email for c in client.iter_segment_contacts(dynamic.id, page_size=6)]
    assert sorted(walked) == sorted(f"d{i}@example.com" for i in range(10, 30))
    assert walked == listed(client, dynamic.id, 6)

    empty = client.create_segment("Nobody", condition=F.data("n") > 100)
    pager = client.iter_segment_contacts(empty.id)
    assert list(pager) == []
    assert pager.total == 0


def test_a_member_joining_mid_walk_does_not_repeat_another(client: SegmentsClient) -> None:
    id = static_segment(client, 12)
    before = listed(client, id, 5)
    pages = client.iter_segment_contacts(id, page_size=5).pages
    first = next(pages)
    # The newest member is listed first, so every later one moves back one place and the
    # last of page 1 is now the first of page 2.
    client.add_segment_members(id, ["newcomer@example.com"])
    rest = [c.email for page in pages for c in page.data]
    walked = [c.email for c in first.data] + rest
    assert walked == before


def test_page_size_is_checked_before_sending(client: SegmentsClient) -> None:
    for bad in (0, -1, 101):
        with pytest.raises(ValueError, match="page_size must be 1 to 100"):
            client.iter_segment_contacts("any", page_size=bad)
    with pytest.raises(TypeError):
        client.iter_segment_contacts("any", page_size=True)


def test_an_unknown_segment_is_not_found_when_the_walk_starts(client: SegmentsClient) -> None:
    pager = client.iter_segment_contacts(str(uuid.uuid4()))
    with pytest.raises(NotFoundError):
        next(iter(pager))


def test_a_pager_walks_once(client: SegmentsClient) -> None:
    id = static_segment(client, 3)
    pager = client.iter_segment_contacts(id)
    assert len(list(pager)) == 3
    with pytest.raises(RuntimeError, match="iterated already"):
        list(pager)


def test_async_pager(client: SegmentsClient, target: str, project: Keys) -> None:
    id = static_segment(client, 23)
    expected = listed(client, id, 7)

    async def scenario() -> None:
        async with AsyncSegmentsClient(target, project.secret_key) as aclient:
            walked = [c.email async for c in aclient.iter_segment_contacts(id, page_size=7)]
            assert walked == expected
            pager = aclient.iter_segment_contacts(id, page_size=10)
            assert [p.page async for p in pager.pages] == [1, 2, 3]
            assert pager.total == 23

            pages = aclient.iter_segment_contacts(id, page_size=5).pages
            first = await anext(pages)
            await aclient.add_segment_members(id, ["newcomer@example.com"])
            rest = [c.email async for page in pages for c in page.data]
            assert [c.email for c in first.data] + rest == expected

            with pytest.raises(ValueError, match="page_size"):
                aclient.iter_segment_contacts(id, page_size=0)

    asyncio.run(scenario())


def _public_methods(cls: type) -> dict[str, inspect.Signature]:
    return {
        name: inspect.signature(member)
        for name, member in inspect.getmembers(cls, inspect.isfunction)
        if not name.startswith("_") and name not in ("close",)
    }


def test_both_clients_have_one_shape() -> None:
    blocking = _public_methods(SegmentsClient)
    asynchronous = _public_methods(AsyncSegmentsClient)
    assert blocking.keys() == asynchronous.keys()
    for name, signature in blocking.items():
        other = asynchronous[name]
        assert [(p.name, p.kind, p.default) for p in signature.parameters.values()] == [
            (p.name, p.kind, p.default) for p in other.parameters.values()
        ], name
        method = getattr(AsyncSegmentsClient, name)
        returns = str(signature.return_annotation)
        if returns.startswith(("Iterator", "ContactPager", "ContactListPager")):
            # Iterating methods stay plain methods returning async iterators.
            assert not inspect.iscoroutinefunction(method), name
            assert str(other.return_annotation).startswith(
                ("AsyncIterator", "AsyncContactPager", "AsyncContactListPager", "AsyncEventStream")
            )
        else:
            assert inspect.iscoroutinefunction(method), name
            assert str(other.return_annotation) == returns, name
    assert {
        "iter_segment_contacts",
        "list_segment_contacts",
        "count_matching_contacts",
        "iter_contacts",
        "list_contacts",
    } <= blocking.keys()
