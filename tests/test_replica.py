"""A streaming standby serving the reads that may lag (replica.py): one real standby of the
embedded PostgreSQL for the session, copied and started from the same binaries as
`segments run --replica` does it (standby.py), whichever server the rest of the suite uses.

What is proved: the listings are read on the standby (with its replay paused they miss what
the primary already has) while a caller's own writes are read back from the primary at once;
a standby behind by more than the bound, or stopped, leaves every read answered by the
primary, and reads return to it once it has caught up.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest
from prometheus_client import REGISTRY
from sqlalchemy import Engine
from sqlalchemy.engine import make_url

from segments import F
from segments_api.v1 import (
    contacts_pb2,
    contacts_pb2_grpc,
    resources_pb2,
    segments_pb2,
    segments_pb2_grpc,
)
from segments_service import auth
from segments_service.config import DEFAULT_REPLICA_MAX_LAG, Settings
from segments_service.database import (
    create_database,
    drop_database,
    make_engine,
    make_sessionmaker,
    migrate,
    sqlalchemy_url,
    start_embedded,
)
from segments_service.fairness import Limits
from segments_service.interceptors import KEY_KINDS
from segments_service.replica import MAY_LAG, LagClock, Replica, parse_lsn
from segments_service.server import Options, ServerThread
from segments_service.standby import Standby, drop_slot, start_standby
from tests.conditions import as_proto
from tests.conftest import Project, Rest, envoy_in_front, new_project

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Pair:
    """A primary database, its standby, and a server reading from both."""

    primary_url: str
    standby: Standby
    standby_url: str
    replica: Replica
    segments: segments_pb2_grpc.SegmentServiceStub
    contacts: contacts_pb2_grpc.ContactServiceStub
    engine: Engine
    server: Any  # the embedded primary's handle
    slot: str
    grpc_port: int


def _libpq(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://")


@pytest.fixture(scope="session")
def pair() -> Iterator[Pair]:
    # A primary of its own: the standby is a copy of the whole server, and the shared one
    # may hold a benchmark's dataset (tens of GB at ten million contacts).
    primary_dir = (ROOT / ".data" / f"replica-primary-{os.getpid()}").resolve()
    name = f"segments_replica_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    slot = f"segments_test_{os.getpid()}"
    pgdata = (ROOT / ".data" / f"standby-test-{os.getpid()}").resolve()
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, primary_dir, True)
        server = start_embedded(primary_dir)
        stack.callback(server.cleanup)
        create_database(server.get_uri(), name)
        url = make_url(sqlalchemy_url(server.get_uri())).set(database=name)
        primary_url = url.render_as_string(hide_password=False)
        stack.callback(drop_database, sqlalchemy_url(server.get_uri()), name)
        migrate(primary_url)
        stack.callback(shutil.rmtree, pgdata, True)
        stack.callback(drop_slot, server, slot)
        standby = start_standby(server, pgdata, slot=slot)
        stack.callback(standby.stop)
        standby_url = standby.url(name)
        engines = [
            make_engine(primary_url, pool_size=4),
            make_engine(standby_url, pool_size=4, connect_timeout=2),
            make_engine(standby_url, pool_size=2, connect_timeout=2),
        ]
        for engine in engines:
            stack.callback(engine.dispose)
        primary, standby_engine, standby_streams = engines
        replica = Replica(
            primary_url,
            standby_url,
            make_sessionmaker(standby_engine),
            make_sessionmaker(standby_streams),
            max_lag=DEFAULT_REPLICA_MAX_LAG,
            interval=0.1,
        ).start()
        stack.callback(replica.stop)
        grpc_server = ServerThread(
            "127.0.0.1:0",
            make_sessionmaker(primary),
            Options(limits=Limits(concurrency=64, streams=64)),
            replica=replica,
        )
        stack.callback(grpc_server.stop, 1)
        channel = stack.enter_context(grpc.insecure_channel(f"127.0.0.1:{grpc_server.port}"))
        yield Pair(
            primary_url,
            standby,
            standby_url,
            replica,
            segments_pb2_grpc.SegmentServiceStub(channel),
            contacts_pb2_grpc.ContactServiceStub(channel),
            primary,
            server,
            slot,
            grpc_server.port,
        )


@pytest.fixture(scope="session")
def pair_rest(pair: Pair, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rest]:
    """Envoy, as `make run` configures it, in front of the pair's server."""
    with envoy_in_front(pair.grpc_port, tmp_path_factory.mktemp("envoy-replica")) as url:
        yield Rest(url)


@pytest.fixture
def owner(pair: Pair) -> Project:
    return new_project(make_sessionmaker(pair.engine))


def wait_for(condition: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "not reached in time"
        time.sleep(0.05)


def caught_up(pair: Pair) -> None:
    """Until the standby has replayed all the primary wrote so far, and serves."""
    with psycopg.connect(_libpq(pair.primary_url)) as conn:
        (wanted,) = conn.execute("SELECT pg_current_wal_lsn()").fetchone() or ("0/0",)
    with psycopg.connect(_libpq(pair.standby_url), autocommit=True) as conn:

        def replayed() -> bool:
            (at,) = conn.execute("SELECT pg_last_wal_replay_lsn()").fetchone() or ("0/0",)
            return parse_lsn(str(at)) >= parse_lsn(str(wanted))

        wait_for(replayed)
    wait_for(lambda: pair.replica.verdict().standby)


@contextlib.contextmanager
def replay_paused(pair: Pair) -> Iterator[None]:
    """The standby keeps receiving the primary's WAL but applies none of it."""
    with psycopg.connect(_libpq(pair.standby_url), autocommit=True) as conn:
        conn.execute("SELECT pg_wal_replay_pause()")
        try:
            yield
        finally:
            conn.execute("SELECT pg_wal_replay_resume()")


def reads(served_by: str, reason: str) -> float:
    value = REGISTRY.get_sample_value(
        "segments_replica_reads_total", {"served_by": served_by, "reason": reason}
    )
    return value or 0.0


def emails(pair: Pair, project: Project) -> list[str]:
    page = pair.contacts.ListContacts(
        contacts_pb2.ListContactsRequest(limit=100), metadata=project.auth
    )
    return sorted(c.email for c in page.data)


def upsert(pair: Pair, project: Project, email: str) -> str:
    contact = pair.contacts.UpsertContact(
        contacts_pb2.UpsertContactRequest(email=email), metadata=project.auth
    )
    return str(contact.id)


def static_list(pair: Pair, project: Project, name: str, email: str) -> resources_pb2.Segment:
    """A STATIC segment holding the contact `email`."""
    segment = pair.segments.CreateSegment(
        segments_pb2.CreateSegmentRequest(name=name, type=resources_pb2.Segment.STATIC),
        metadata=project.auth,
    )
    pair.segments.AddSegmentMembers(
        segments_pb2.AddSegmentMembersRequest(id=segment.id, emails=[email]),
        metadata=project.auth,
    )
    return segment


def exported(pair: Pair, project: Project, segment_id: str) -> list[str]:
    stream = pair.segments.ExportSegmentContacts(
        segments_pb2.ExportSegmentContactsRequest(id=segment_id), metadata=project.auth
    )
    return sorted(c.email for batch in stream for c in batch.contacts)


def test_lag_is_the_age_of_the_newest_primary_position_replayed() -> None:
    clock = LagClock(horizon=10.0)
    # An idle primary: its position stays, and a standby at it is not behind, however long
    # ago the last transaction was.
    clock.primary_at(0.0, 100)
    clock.primary_at(100.0, 100)
    assert clock.lag(100, 100.5) == (0.5, True)
    # Writes: the standby shows what the primary had at t=101, no later.
    clock.primary_at(101.0, 200)
    clock.primary_at(102.0, 300)
    assert clock.lag(250, 103.0) == (2.0, True)
    # Positions older than the horizon are dropped but one: the lag stays exact...
    clock.primary_at(200.0, 400)
    assert clock.lag(350, 200.5) == (98.5, True)
    # ...unless the standby is behind every position kept: at least the oldest's age.
    assert clock.lag(250, 200.5) == (98.5, False)
    assert parse_lsn("16/B374D848") == (0x16 << 32) | 0xB374D848


def test_the_settings_name_the_standby_and_its_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DATABASE_REPLICA_URL", raising=False)
    monkeypatch.delenv("SEGMENTS_REPLICA_MAX_LAG", raising=False)
    assert Settings.from_env().replica_url is None
    assert Settings.from_env().replica_max_lag == 5.0
    monkeypatch.setenv("DATABASE_REPLICA_URL", "postgresql://standby.internal/segments")
    monkeypatch.setenv("SEGMENTS_REPLICA_MAX_LAG", "1.5")
    settings = Settings.from_env()
    assert settings.replica_url == "postgresql://standby.internal/segments"
    assert settings.replica_max_lag == 1.5


def test_listings_come_from_the_standby_and_own_writes_from_the_primary(
    pair: Pair, owner: Project
) -> None:
    upsert(pair, owner, "old@x.com")
    before = static_list(pair, owner, "Before", "old@x.com")
    caught_up(pair)
    served = reads("replica", "fresh")
    with replay_paused(pair):
        # Writes and the reads of what was just written: the primary's.
        new_id = upsert(pair, owner, "new@x.com")
        got = pair.contacts.GetContact(
            contacts_pb2.GetContactRequest(id=new_id), metadata=owner.auth
        )
        assert got.email == "new@x.com"
        after = pair.segments.CreateSegment(
            segments_pb2.CreateSegmentRequest(name="After", type=resources_pb2.Segment.STATIC),
            metadata=owner.auth,
        )
        assert (
            pair.segments.GetSegment(
                segments_pb2.GetSegmentRequest(id=after.id), metadata=owner.auth
            ).name
            == "After"
        )
        pair.segments.AddSegmentMembers(
            segments_pb2.AddSegmentMembersRequest(id=before.id, emails=["new@x.com"]),
            metadata=owner.auth,
        )
        # The listings and the export: the standby's, which has replayed none of that.
        assert emails(pair, owner) == ["old@x.com"]
        listed = pair.segments.ListSegments(segments_pb2.ListSegmentsRequest(), metadata=owner.auth)
        assert [s.name for s in listed.segments] == ["Before"]
        assert exported(pair, owner, before.id) == ["old@x.com"]
        assert reads("replica", "fresh") == served + 3
    caught_up(pair)
    assert emails(pair, owner) == ["new@x.com", "old@x.com"]
    assert exported(pair, owner, before.id) == ["new@x.com", "old@x.com"]
    assert REGISTRY.get_sample_value("segments_replica_up") == 1.0
    lag = REGISTRY.get_sample_value("segments_replica_lag_seconds")
    assert lag is not None and lag < DEFAULT_REPLICA_MAX_LAG
    assert REGISTRY.get_sample_value("segments_replica_lag_bytes") is not None


def test_a_standby_behind_the_bound_leaves_reads_to_the_primary(pair: Pair, owner: Project) -> None:
    caught_up(pair)
    with replay_paused(pair):
        upsert(pair, owner, "late@x.com")
        wait_for(lambda: pair.replica.verdict().reason == "lagging")
        lagging = reads("primary", "lagging")
        assert emails(pair, owner) == ["late@x.com"]
        assert reads("primary", "lagging") == lagging + 1
        lag = REGISTRY.get_sample_value("segments_replica_lag_seconds")
        assert lag is not None and lag > DEFAULT_REPLICA_MAX_LAG - 1
    caught_up(pair)
    served = reads("replica", "fresh")
    assert emails(pair, owner) == ["late@x.com"]
    assert reads("replica", "fresh") == served + 1


def test_a_stopped_standby_fails_no_read_and_serves_again_once_back(
    pair: Pair, owner: Project
) -> None:
    upsert(pair, owner, "a@x.com")
    segment = static_list(pair, owner, "All", "a@x.com")
    caught_up(pair)
    on_primary = reads("primary", "down") + reads("primary", "failed")
    pair.standby.stop()
    try:
        # At once (the lag thread may not have noticed yet: the read itself falls back) and
        # once the standby is known down.
        assert emails(pair, owner) == ["a@x.com"]
        assert exported(pair, owner, segment.id) == ["a@x.com"]
        wait_for(lambda: pair.replica.verdict().reason == "down")
        assert emails(pair, owner) == ["a@x.com"]
        assert reads("primary", "down") + reads("primary", "failed") == on_primary + 3
        assert REGISTRY.get_sample_value("segments_replica_up") == 0.0
    finally:
        pair.standby.start()
    caught_up(pair)
    served = reads("replica", "fresh")
    assert emails(pair, owner) == ["a@x.com"]
    assert exported(pair, owner, segment.id) == ["a@x.com"]
    assert reads("replica", "fresh") == served + 2


def test_a_standby_restarts_from_its_directory_and_is_copied_again_without_its_slot(
    pair: Pair, owner: Project
) -> None:
    pgdata = pair.standby.pgdata
    marker = pgdata / "kept"
    marker.write_text("")
    pair.standby.stop()
    upsert(pair, owner, "while-away@x.com")  # kept for it by its slot
    pair.standby = start_standby(pair.server, pgdata, slot=pair.slot)
    assert marker.exists()  # started again, not copied
    caught_up(pair)
    assert emails(pair, owner) == ["while-away@x.com"]

    pair.standby.stop()
    drop_slot(pair.server, pair.slot)
    upsert(pair, owner, "after-the-slot@x.com")
    pair.standby = start_standby(pair.server, pgdata, slot=pair.slot)
    assert not marker.exists()  # copied afresh, with a new slot
    caught_up(pair)
    served = reads("replica", "fresh")
    assert emails(pair, owner) == ["after-the-slot@x.com", "while-away@x.com"]
    assert reads("replica", "fresh") == served + 1


def test_the_reads_that_may_lag_are_named_once_and_are_reads() -> None:
    assert set(KEY_KINDS) >= MAY_LAG  # each a method of ours: a misspelt one would never route
    service = "/segments.v1.SegmentService/"
    # Reads of what a caller just wrote, and every write: never the standby's.
    for kept in (
        "GetSegment",
        "CreateSegment",
        "UpdateSegment",
        "DeleteSegment",
        "AddSegmentMembers",
        "RemoveSegmentMembers",
        "WatchSegmentEvents",
        "ExplainMembership",
    ):
        assert service + kept not in MAY_LAG
    for kept in ("GetContact", "UpsertContact", "UpdateContact", "ListContactSegments"):
        assert "/segments.v1.ContactService/" + kept not in MAY_LAG
    assert not {m for m in MAY_LAG if "EventService" in m or "WebhookService" in m}


def pro_contact(email: str) -> contacts_pb2.UpsertContactRequest:
    request = contacts_pb2.UpsertContactRequest(email=email)
    request.data.update({"plan": "pro"})
    return request


def test_each_read_that_may_lag_is_the_standbys(pair: Pair, owner: Project) -> None:
    pro = as_proto(F.data("plan") == "pro")
    pair.contacts.UpsertContact(pro_contact("first@x.com"), metadata=owner.auth)
    tracked = pair.segments.CreateSegment(
        segments_pb2.CreateSegmentRequest(name="Pro", condition=pro, track_membership=True),
        metadata=owner.auth,
    )
    caught_up(pair)
    served = reads("replica", "fresh")
    with replay_paused(pair):
        # The primary has a second member, and its entry; the standby has not replayed them.
        pair.contacts.UpsertContact(pro_contact("second@x.com"), metadata=owner.auth)
        auth_ = owner.auth
        assert (
            pair.segments.CountMatchingContacts(
                segments_pb2.CountMatchingContactsRequest(condition=pro), metadata=auth_
            ).count
            == 1
        )
        preview = pair.segments.PreviewSegment(
            segments_pb2.PreviewSegmentRequest(condition=pro), metadata=auth_
        )
        assert [c.email for c in preview.sample] == ["first@x.com"]
        page = pair.segments.ListSegmentContacts(
            segments_pb2.ListSegmentContactsRequest(id=tracked.id), metadata=auth_
        )
        assert [c.email for c in page.data] == ["first@x.com"]
        csv = b"".join(
            chunk.data
            for chunk in pair.segments.ExportSegmentCsv(
                segments_pb2.ExportSegmentCsvRequest(id=tracked.id), metadata=auth_
            )
        )
        assert csv.count(b"\r\n") == 2 and b"first@x.com" in csv  # the header and one row
        feed = pair.segments.ListSegmentEvents(
            segments_pb2.ListSegmentEventsRequest(id=tracked.id), metadata=auth_
        )
        assert [e.email for e in feed.data] == ["first@x.com"]
        history = pair.segments.GetSegmentHistory(
            segments_pb2.GetSegmentHistoryRequest(id=tracked.id, interval="day"),
            metadata=auth_,
        )
        assert sum(b.entries for b in history.data) == 1
        assert reads("replica", "fresh") == served + 6
        # GetSegment is the primary's: it counts both.
        got = pair.segments.GetSegment(
            segments_pb2.GetSegmentRequest(id=tracked.id), metadata=auth_
        )
        assert got.member_count == 2


def test_keys_are_looked_up_on_the_primary(pair: Pair, owner: Project) -> None:
    caught_up(pair)
    sessions = make_sessionmaker(pair.engine)
    with replay_paused(pair):
        # A key the standby has not seen yet works at once...
        with sessions.begin() as session:
            new_key = auth.issue_key(session, uuid.UUID(owner.id), "secret")
        listed = pair.contacts.ListContacts(
            contacts_pb2.ListContactsRequest(),
            metadata=(("authorization", f"Bearer {new_key}"),),
        )
        assert list(listed.data) == []
        # ...and one revoked a moment ago, which the standby still holds live, is refused.
        with sessions.begin() as session:
            auth.revoke_key(session, owner.secret_key)
        with pytest.raises(grpc.RpcError) as refused:
            pair.contacts.ListContacts(contacts_pb2.ListContactsRequest(), metadata=owner.auth)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as refused:
            list(
                pair.segments.ExportSegmentContacts(
                    segments_pb2.ExportSegmentContactsRequest(id=str(uuid.uuid4())),
                    metadata=owner.auth,
                )
            )
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_the_rest_export_and_listing_come_from_the_standby(
    pair: Pair, pair_rest: Rest, owner: Project
) -> None:
    pair.contacts.UpsertContact(pro_contact("first@x.com"), metadata=owner.auth)
    segment = pair_rest.post(
        "/segments",
        {
            "name": "Pro",
            "condition": {
                "logic": "AND",
                "groups": [
                    {"filters": [{"field": "data.plan", "operator": "equals", "value": "pro"}]}
                ],
            },
        },
        key=owner.secret_key,
    )
    assert segment.status == 201, segment.raw
    caught_up(pair)
    served = reads("replica", "fresh")
    with replay_paused(pair):
        pair.contacts.UpsertContact(pro_contact("second@x.com"), metadata=owner.auth)
        export = pair_rest.get(f"/segments/{segment.json['id']}/export", key=owner.secret_key)
        assert export.status == 200
        assert export.headers["content-type"].startswith("text/csv")
        rows = export.raw.decode().splitlines()
        assert [row.split(",")[1] for row in rows[1:]] == ["first@x.com"]
        listed = pair_rest.get("/contacts", key=owner.secret_key)
        assert [c["email"] for c in listed.json["data"]] == ["first@x.com"]
        # The segment itself, read back by its creator: the primary's count.
        got = pair_rest.get(f"/segments/{segment.json['id']}", key=owner.secret_key)
        assert got.json["memberCount"] == 2
        assert reads("replica", "fresh") == served + 2
