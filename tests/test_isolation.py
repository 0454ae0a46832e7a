"""Tenant isolation, endpoint by endpoint: another project's key on this project's ids, a
key of the other type, a revoked key and a rotated-away key get 401/404 and never data,
and change nothing. Over REST (through Envoy) and for the two gRPC streams."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from google.protobuf import json_format
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session, sessionmaker

from segments import F
from segments_api.v1 import resources_pb2, segments_pb2
from segments_service.auth import revoke_key, rotate_key
from tests.conftest import Project, Rest, Stubs, new_project
from tests.rest_helpers import check_error


@dataclass(frozen=True)
class World:
    """A project with data (the owner) and a second project (the intruder)."""

    owner: Project
    intruder: Project
    static: str  # STATIC segment with one member
    dynamic: str  # tracked DYNAMIC segment with one member
    contact: str  # the member of both


@dataclass(frozen=True)
class Endpoint:
    name: str
    method: str
    path: str  # may name {static}, {dynamic} or {contact}
    body: Any = None
    kind: str = "secret"  # the key type it takes

    def url(self, world: World) -> str:
        return self.path.format(static=world.static, dynamic=world.dynamic, contact=world.contact)

    @property
    def has_id(self) -> bool:
        return "{" in self.path


ENDPOINTS = [
    Endpoint("list segments", "GET", "/segments"),
    Endpoint("create segment", "POST", "/segments", {"name": "Intruder", "type": "STATIC"}),
    Endpoint("get segment", "GET", "/segments/{static}"),
    Endpoint("get dynamic segment", "GET", "/segments/{dynamic}"),
    Endpoint("update segment", "PATCH", "/segments/{dynamic}", {"name": "Hijacked"}),
    Endpoint("delete segment", "DELETE", "/segments/{static}"),
    Endpoint("list segment contacts", "GET", "/segments/{dynamic}/contacts"),
    Endpoint("list static contacts", "GET", "/segments/{static}/contacts?page=1&pageSize=100"),
    Endpoint(
        "add members", "POST", "/segments/{static}/members", {"emails": ["intruder@example.com"]}
    ),
    Endpoint(
        "remove members", "DELETE", "/segments/{static}/members", {"emails": ["ada@example.com"]}
    ),
    Endpoint(
        "upsert contact", "POST", "/contacts", {"email": "ada@example.com", "data": {"vip": False}}
    ),
    Endpoint(
        "batch upsert contacts",
        "POST",
        "/contacts/batch",
        {"contacts": [{"email": "ada@example.com", "subscribed": False}]},
    ),
    Endpoint("get contact", "GET", "/contacts/{contact}"),
    Endpoint("delete contact", "DELETE", "/contacts/{contact}"),
    Endpoint(
        "track",
        "POST",
        "/v1/track",
        {"event": "purchase", "email": "ada@example.com", "data": {"vip": False}},
        kind="public",
    ),
    Endpoint(
        "ingest events",
        "POST",
        "/events/batch",
        {"events": [{"email": "ada@example.com", "event": "email.opened"}]},
    ),
]
BY_NAME = {e.name: e for e in ENDPOINTS}


def success_status(endpoint: Endpoint) -> set[int]:
    if endpoint.method == "DELETE" and not endpoint.path.endswith("/members"):
        return {204}
    if endpoint.path == "/segments" and endpoint.method == "POST":
        return {201}
    if endpoint.path == "/contacts":
        return {200, 201}
    return {200}


def key_of(project: Project, kind: str) -> str:
    return project.secret_key if kind == "secret" else project.public_key


@pytest.fixture
def world(rest: Rest, sessions: sessionmaker[Session]) -> World:
    owner = new_project(sessions, "owner")
    intruder = new_project(sessions, "intruder")
    key = owner.secret_key
    contact = rest.post("/contacts", {"email": "ada@example.com", "data": {"vip": True}}, key=key)
    assert contact.status == 201, contact.raw
    static = rest.post("/segments", {"name": "List", "type": "STATIC"}, key=key)
    assert static.status == 201, static.raw
    added = rest.post(
        f"/segments/{static.json['id']}/members", {"emails": ["ada@example.com"]}, key=key
    )
    assert added.status == 200 and added.json["added"] == 1, added.raw
    condition = F.data("vip").equals(True).to_dict()
    dynamic = rest.post(
        "/segments",
        {"name": "VIP", "condition": condition, "trackMembership": True},
        key=key,
    )
    assert dynamic.status == 201 and dynamic.json["memberCount"] == 1, dynamic.raw
    return World(owner, intruder, static.json["id"], dynamic.json["id"], contact.json["id"])


def snapshot(engine: Engine, project_id: str) -> dict[str, list[tuple[Any, ...]]]:
    """Everything stored for a project."""
    queries = {
        "contacts": "SELECT id, email, subscribed, data::text, updated_at FROM contacts",
        "events": "SELECT id, contact_id, name, data::text FROM events",
        "segments": "SELECT id, name, description, condition::text, track_membership, "
        "updated_at, member_count FROM segments",
        "static_members": "SELECT segment_id, contact_id FROM static_members",
        "segment_members": "SELECT segment_id, contact_id FROM segment_members",
    }
    with engine.connect() as conn:
        return {
            name: sorted(
                tuple(row)
                for row in conn.execute(
                    text(f"{query} WHERE project_id = :p ORDER BY 1"), {"p": project_id}
                )
            )
            for name, query in queries.items()
        }


def owner_values(world: World) -> list[str]:
    """Strings that only the owner's data contains."""
    return [world.static, world.dynamic, world.contact, world.owner.id]


# -- (a) another project's key on this project's ids -----------------------------------


@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=lambda e: e.name)
def test_other_projects_key_sees_and_changes_nothing(
    endpoint: Endpoint, world: World, rest: Rest, engine: Engine
) -> None:
    before = snapshot(engine, world.owner.id)
    resp = rest.request(
        endpoint.method,
        endpoint.url(world),
        endpoint.body,
        key=key_of(world.intruder, endpoint.kind),
    )
    if endpoint.has_id:
        check_error(resp, 404, "NOT_FOUND")
    else:
        # Allowed, and scoped to the intruder's own project.
        assert resp.status in success_status(endpoint), resp.raw[:300]
    # Nothing of the owner's but what the caller sent itself (a 404 names the id).
    for value in owner_values(world):
        if value not in endpoint.url(world):
            assert value not in resp.raw.decode(), (endpoint.name, resp.raw[:300])
    assert snapshot(engine, world.owner.id) == before


def test_other_projects_list_is_its_own(world: World, rest: Rest) -> None:
    assert rest.get("/segments", key=world.intruder.secret_key).json == []
    mine = rest.get("/segments", key=world.owner.secret_key).json
    assert {s["id"] for s in mine} == {world.static, world.dynamic}


# -- (b) a key of the other type ---------------------------------------------------------


@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=lambda e: e.name)
def test_key_of_the_other_type_is_refused(
    endpoint: Endpoint, world: World, rest: Rest, engine: Engine
) -> None:
    before = snapshot(engine, world.owner.id)
    wrong = "public" if endpoint.kind == "secret" else "secret"
    resp = rest.request(
        endpoint.method, endpoint.url(world), endpoint.body, key=key_of(world.owner, wrong)
    )
    error = check_error(resp, 401, "INVALID_API_KEY")
    assert ("public key" if wrong == "secret" else "secret key") in error["message"]
    assert snapshot(engine, world.owner.id) == before


# -- (c) revoked keys, (d) rotated keys --------------------------------------------------


def revoke(sessions: sessionmaker[Session], key: str) -> None:
    with sessions.begin() as session:
        revoke_key(session, key)


def rotate(sessions: sessionmaker[Session], key: str) -> str:
    with sessions.begin() as session:
        return rotate_key(session, key)


@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=lambda e: e.name)
def test_revoked_key_is_refused(
    endpoint: Endpoint,
    world: World,
    rest: Rest,
    engine: Engine,
    sessions: sessionmaker[Session],
) -> None:
    key = key_of(world.owner, endpoint.kind)
    revoke(sessions, key)
    before = snapshot(engine, world.owner.id)
    resp = rest.request(endpoint.method, endpoint.url(world), endpoint.body, key=key)
    check_error(resp, 401, "INVALID_API_KEY")
    assert snapshot(engine, world.owner.id) == before
    # The project's key of the other type is unaffected.
    other_kind = "public" if endpoint.kind == "secret" else "secret"
    probe = BY_NAME["track"] if other_kind == "public" else BY_NAME["get segment"]
    resp = rest.request(
        probe.method, probe.url(world), probe.body, key=key_of(world.owner, other_kind)
    )
    assert resp.status == 200, resp.raw[:300]


@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=lambda e: e.name)
def test_rotated_away_key_is_refused_and_its_successor_works(
    endpoint: Endpoint,
    world: World,
    rest: Rest,
    engine: Engine,
    sessions: sessionmaker[Session],
) -> None:
    old = key_of(world.owner, endpoint.kind)
    new = rotate(sessions, old)
    assert new != old and new[:3] == old[:3]
    before = snapshot(engine, world.owner.id)
    resp = rest.request(endpoint.method, endpoint.url(world), endpoint.body, key=old)
    check_error(resp, 401, "INVALID_API_KEY")
    assert snapshot(engine, world.owner.id) == before
    resp = rest.request(endpoint.method, endpoint.url(world), endpoint.body, key=new)
    assert resp.status in success_status(endpoint), (endpoint.name, resp.raw[:300])


def test_revoking_twice_or_an_unknown_key_is_not_found(
    world: World, sessions: sessionmaker[Session]
) -> None:
    from segments_service.errors import NotFound

    revoke(sessions, world.owner.secret_key)
    for key in (world.owner.secret_key, "sk_unknown", ""):
        with pytest.raises(NotFound):
            revoke(sessions, key)


@pytest.mark.parametrize(
    "authorization",
    [None, "", "Bearer", "Bearer ", "Basic abc", "bearer  ", "Bearer a b", "sk_x"],
)
@pytest.mark.parametrize("endpoint", ENDPOINTS[:3] + ENDPOINTS[-2:], ids=lambda e: e.name)
def test_missing_or_malformed_authorization(
    endpoint: Endpoint, authorization: str | None, world: World, rest: Rest
) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    resp = rest.request(endpoint.method, endpoint.url(world), endpoint.body, headers=headers)
    check_error(resp, 401, "MISSING_AUTH")


# -- gRPC streams ------------------------------------------------------------------------


def meta(key: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {key}"),)


def export(stubs: Stubs, key: str, segment_id: str) -> list[str]:
    stream = stubs.segments.ExportSegmentContacts(
        segments_pb2.ExportSegmentContactsRequest(id=segment_id), metadata=meta(key), timeout=10
    )
    return [contact.email for batch in stream for contact in batch.contacts]


def watch(stubs: Stubs, key: str, segment_id: str, wait: float = 1.5) -> Iterator[Any]:
    """Replays the feed from its start (cursor 0) for one segment; ends after `wait`."""
    stream = stubs.segments.WatchSegmentEvents(
        segments_pb2.WatchSegmentEventsRequest(after="0", segment_ids=[segment_id]),
        metadata=meta(key),
        timeout=wait,
    )
    try:
        yield from stream
    except grpc.RpcError as err:
        if err.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
            raise


def status_of(call: Callable[[], object]) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as err:
        return err.code()
    return grpc.StatusCode.OK


def test_export_stream_isolation(
    world: World, stubs: Stubs, sessions: sessionmaker[Session]
) -> None:
    owner, intruder = world.owner, world.intruder
    assert export(stubs, owner.secret_key, world.static) == ["ada@example.com"]
    assert export(stubs, owner.secret_key, world.dynamic) == ["ada@example.com"]
    assert (
        status_of(lambda: export(stubs, intruder.secret_key, world.static))
        == grpc.StatusCode.NOT_FOUND
    )
    assert (
        status_of(lambda: export(stubs, intruder.secret_key, world.dynamic))
        == grpc.StatusCode.NOT_FOUND
    )
    assert (
        status_of(lambda: export(stubs, owner.public_key, world.static))
        == grpc.StatusCode.UNAUTHENTICATED
    )
    new = rotate(sessions, owner.secret_key)
    assert (
        status_of(lambda: export(stubs, owner.secret_key, world.static))
        == grpc.StatusCode.UNAUTHENTICATED
    )
    assert export(stubs, new, world.static) == ["ada@example.com"]
    revoke(sessions, new)
    assert status_of(lambda: export(stubs, new, world.static)) == grpc.StatusCode.UNAUTHENTICATED


def test_watch_stream_isolation(
    world: World, stubs: Stubs, sessions: sessionmaker[Session]
) -> None:
    owner, intruder = world.owner, world.intruder
    # The owner replays its entry event; the intruder, asking for the same segment from the
    # same position, sees nothing of it.
    mine = list(watch(stubs, owner.secret_key, world.dynamic))
    assert [(e.email, e.segment_id) for e in mine] == [("ada@example.com", world.dynamic)]
    assert list(watch(stubs, intruder.secret_key, world.dynamic)) == []
    assert (
        status_of(lambda: list(watch(stubs, owner.public_key, world.dynamic)))
        == grpc.StatusCode.UNAUTHENTICATED
    )
    new = rotate(sessions, owner.secret_key)
    assert (
        status_of(lambda: list(watch(stubs, owner.secret_key, world.dynamic)))
        == grpc.StatusCode.UNAUTHENTICATED
    )
    assert len(list(watch(stubs, new, world.dynamic))) == 1
    revoke(sessions, new)
    assert (
        status_of(lambda: list(watch(stubs, new, world.dynamic))) == grpc.StatusCode.UNAUTHENTICATED
    )


def test_unary_rpcs_refuse_the_wrong_key_over_grpc(world: World, stubs: Stubs) -> None:
    """The same rules without Envoy: a public key on a segment RPC, a secret key on Track,
    and another project's key on this project's segment."""
    owner, intruder = world.owner, world.intruder
    get = segments_pb2.GetSegmentRequest(id=world.static)
    assert (
        status_of(lambda: stubs.segments.GetSegment(get, metadata=meta(owner.public_key)))
        == grpc.StatusCode.UNAUTHENTICATED
    )
    assert (
        status_of(lambda: stubs.segments.GetSegment(get, metadata=meta(intruder.secret_key)))
        == grpc.StatusCode.NOT_FOUND
    )
    condition = json_format.ParseDict(
        {"logic": "AND", "groups": [{"filters": [{"field": "email", "operator": "contains"}]}]},
        resources_pb2.FilterCondition(),
    )
    update = segments_pb2.UpdateSegmentRequest(id=world.dynamic, condition=condition)
    assert (
        status_of(lambda: stubs.segments.UpdateSegment(update, metadata=meta(intruder.secret_key)))
        == grpc.StatusCode.NOT_FOUND
    )
