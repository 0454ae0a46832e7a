"""Public event ids (docs/limits.md, Edges): a project's event ids and stream cursors say
nothing about other projects' volume."""

from __future__ import annotations

import itertools
import uuid

import pytest
from alembic import command
from google.protobuf import struct_pb2
from sqlalchemy import create_engine, pool, text
from sqlalchemy.orm import Session, sessionmaker

from segments import F
from segments_api.v1 import contacts_pb2, events_pb2, segments_pb2
from segments_service import event_ids
from segments_service.database import alembic_config
from tests.conditions import as_proto
from tests.conftest import Project, Stubs

SECRET = bytes(range(32))


def key(project: uuid.UUID) -> bytes:
    return event_ids.project_key(SECRET, project)


def test_tokens_are_deterministic_and_invertible() -> None:
    project = uuid.uuid4()
    for event_id in (0, 1, 2, 12345, 2**31, 2**63 - 1, 2**64 - 1):
        token = event_ids.public_event_id(key(project), event_id)
        assert len(token) == 16 and int(token, 16) >= 0
        assert token == event_ids.public_event_id(key(project), event_id)
        assert event_ids.event_id_of(key(project), token) == event_id
    for bad in ("", "123", "0" * 15, "g" * 16, "0" * 16 + "\n", "0" * 17, "ABCDEF0123456789"):
        assert event_ids.event_id_of(key(project), bad) is None
    with pytest.raises(ValueError):
        event_ids.public_event_id(key(project), -1)
    with pytest.raises(ValueError):
        event_ids.public_event_id(key(project), 2**64)


def test_distinct_ids_give_distinct_tokens() -> None:
    project = uuid.uuid4()
    ids = range(1_000_000, 1_020_000)
    tokens = {event_ids.public_event_id(key(project), i) for i in ids}
    assert len(tokens) == len(ids)


def bits(a: str, b: str) -> int:
    return bin(int(a, 16) ^ int(b, 16)).count("1")


def test_consecutive_ids_look_unrelated_within_and_across_projects() -> None:
    """Consecutive ids' tokens differ in about half their bits (the sequence's gaps are
    not visible), and two projects' tokens of one id too."""
    first, second = uuid.UUID(int=1), uuid.UUID(int=2)
    n = 2000
    mine = [event_ids.public_event_id(key(first), i) for i in range(5000, 5000 + n)]
    theirs = [event_ids.public_event_id(key(second), i) for i in range(5000, 5000 + n)]
    steps = [bits(a, b) for a, b in itertools.pairwise(mine)]
    across = [bits(a, b) for a, b in zip(mine, theirs, strict=True)]
    for distances in (steps, across):
        mean = sum(distances) / len(distances)
        assert 30 < mean < 34, mean
        assert min(distances) > 8
    # Not ordered: about half of the consecutive pairs go down.
    downs = sum(1 for a, b in itertools.pairwise(mine) if b < a)
    assert 0.4 * n < downs < 0.6 * n
    # Another secret gives another permutation for the same project.
    other = event_ids.project_key(bytes(32), first)
    assert (
        sum(
            event_ids.public_event_id(other, i) == t
            for i, t in zip(range(5000, 5000 + n), mine, strict=True)
        )
        == 0
    )


def test_the_secret_lives_in_the_database_and_survives_restarts(
    sessions: sessionmaker[Session], database_url: str
) -> None:
    with sessions() as session:
        secret = event_ids.server_secret(session)
        stored = session.execute(text("SELECT secret FROM server_secrets")).scalar_one()
    assert secret == bytes(stored) and len(secret) == 32 and secret != bytes(32)
    # A new engine (a restart, another replica) reads the same secret.
    engine = create_engine(database_url, poolclass=pool.NullPool)
    try:
        with sessionmaker(engine)() as session:
            assert event_ids.server_secret(session) == secret
    finally:
        engine.dispose()


def test_each_database_draws_its_own_secret(empty_database_url: str) -> None:
    cfg = alembic_config(empty_database_url)
    command.upgrade(cfg, "head")
    engine = create_engine(empty_database_url, poolclass=pool.NullPool)
    try:
        with engine.connect() as conn:
            first = conn.execute(text("SELECT secret FROM server_secrets")).scalar_one()
        command.downgrade(cfg, "0008")
        command.upgrade(cfg, "head")
        with engine.connect() as conn:
            second = conn.execute(text("SELECT secret FROM server_secrets")).scalar_one()
    finally:
        engine.dispose()
    assert len(first) == len(second) == 32 and first != second


def test_track_shows_the_projects_token_not_the_row_id(
    stubs: Stubs, project: Project, other_project: Project, sessions: sessionmaker[Session]
) -> None:
    def track(who: Project) -> str:
        response = stubs.events.Track(
            events_pb2.TrackRequest(event="purchase", email="a@x.com"), metadata=who.public_auth
        )
        return response.data.event

    shown = [track(project), track(other_project), track(other_project), track(project)]
    with sessions() as session:
        rows = session.execute(
            text(
                "SELECT id, project_id FROM events WHERE name = 'purchase' AND project_id IN (:a, :b) ORDER BY id"
            ),
            {"a": project.id, "b": other_project.id},
        ).all()
        secret = event_ids.server_secret(session)
    assert [str(r.project_id) for r in rows] == [
        project.id,
        other_project.id,
        other_project.id,
        project.id,
    ]
    for token, row in zip(shown, rows, strict=True):
        assert token == event_ids.public_event_id(
            event_ids.project_key(secret, row.project_id), row.id
        )
        assert token != str(row.id)
    assert len(set(shown)) == 4


def test_watch_shows_the_projects_token_not_the_row_id(
    stubs: Stubs, project: Project, sessions: sessionmaker[Session]
) -> None:
    segment = stubs.segments.CreateSegment(
        segments_pb2.CreateSegmentRequest(
            name="VIP",
            condition=as_proto(F.data("vip").equals(True)),
            track_membership=True,
        ),
        metadata=project.auth,
    )
    stream = stubs.segments.WatchSegmentEvents(
        segments_pb2.WatchSegmentEventsRequest(after="0"), metadata=project.auth, timeout=30
    )
    data = struct_pb2.Struct()
    data.update({"vip": True})
    stubs.contacts.UpsertContact(
        contacts_pb2.UpsertContactRequest(email="vip@x.com", data=data), metadata=project.auth
    )
    event = next(iter(stream))
    stream.cancel()
    assert event.segment_id == segment.id
    with sessions() as session:
        row_id = session.execute(
            text("SELECT id FROM events WHERE project_id = :p AND feed_seq IS NOT NULL"),
            {"p": project.id},
        ).scalar_one()
        project_key = event_ids.key_for(session, uuid.UUID(project.id))
    assert event.event_id == event_ids.public_event_id(project_key, row_id)
    assert event_ids.event_id_of(project_key, event.event_id) == row_id
