"""Fair share against the real server: one project's hostile-but-valid load (requests stuck
on the database, idle streams, callers that give up) takes neither the workers nor the time
another project needs, and a request out of budget commits nothing."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest
from google.protobuf import json_format, struct_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session, sessionmaker

from segments import NO_RETRY, RateLimitedError, Retry, SegmentsClient, UnavailableError
from segments_api.v1 import (
    contacts_pb2,
    contacts_pb2_grpc,
    resources_pb2,
    segments_pb2,
    segments_pb2_grpc,
)
from segments_service import auth, membership, streams
from segments_service.fairness import Limits
from segments_service.server import Options, ServerThread
from tests.conftest import Project, new_project

CONCURRENCY = 8
STREAMS = 16
EVALUATIONS = 2
EXPORTED = 12_000


@pytest.fixture(scope="module")
def server(sessions: sessionmaker[Session]) -> Iterator[ServerThread]:
    """A server with the default shares (16 workers; a project's 8 requests and 16 streams),
    and 2 condition evaluations a project, so that the test sees a share of more than one."""
    running = ServerThread(
        "127.0.0.1:0",
        sessions,
        Options(
            workers=16,
            limits=Limits(concurrency=CONCURRENCY, streams=STREAMS, evaluations=EVALUATIONS),
        ),
    )
    yield running
    running.stop(1)


@pytest.fixture
def channel(server: ServerThread) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        yield ch


class _MembershipLock:
    """A connection holding the project's membership lock exclusively: every write of the
    project that re-evaluates membership waits on it in the database (a valid request
    that is slow for reasons outside the caller's control)."""

    def __init__(self, engine: Engine, project: Project) -> None:
        self.key = membership.advisory_key("membership", _uuid(project.id))
        self.conn = engine.connect()
        self.conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": self.key})
        self.conn.commit()
        self.guard = threading.Lock()

    def close(self) -> None:
        with self.guard:
            if self.conn.closed:
                return
            self.conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": self.key})
            self.conn.commit()
            self.conn.close()


def _uuid(value: str) -> uuid.UUID:
    return uuid.UUID(value)


def _waiting_on_locks(engine: Engine) -> int:
    """Backends of the test database whose statement waits on a lock."""
    with engine.connect() as conn:
        return int(
            conn.execute(
                text(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND state = 'active' AND pid <> pg_backend_pid() AND wait_event_type = 'Lock'"
                )
            ).scalar_one()
        )


def _wait_until(check: Callable[[], bool], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def _upsert(channel: grpc.Channel, project: Project, email: str, timeout: float = 30) -> Any:
    return contacts_pb2_grpc.ContactServiceStub(channel).UpsertContact(
        contacts_pb2.UpsertContactRequest(email=email), metadata=project.auth, timeout=timeout
    )


def test_one_projects_stuck_requests_leave_workers_for_another(
    channel: grpc.Channel, sessions: sessionmaker[Session], engine: Engine
) -> None:
    a, b = new_project(sessions, "a"), new_project(sessions, "b")
    lock = _MembershipLock(engine, a)
    pool = ThreadPoolExecutor(max_workers=24)
    try:
        # 24 of A's writes at once, each stuck behind the lock: 8 may wait, the rest are
        # refused at once with a retry delay.
        stuck = [
            pool.submit(_upsert, channel, a, f"a{i}@x.com", 20) for i in range(3 * CONCURRENCY)
        ]
        _wait_until(
            lambda: sum(f.done() for f in stuck) >= 2 * CONCURRENCY, 10, "nothing was refused"
        )
        time.sleep(0.5)  # none of the admitted ones may end on its own
        refused = [f.exception() for f in stuck if f.done()]
        assert all(isinstance(err, grpc.RpcError) for err in refused)
        assert len(refused) == 2 * CONCURRENCY
        assert {err.code() for err in refused} == {grpc.StatusCode.RESOURCE_EXHAUSTED}  # type: ignore[union-attr]
        status = rpc_status.from_call(refused[0])  # type: ignore[arg-type]
        assert status is not None
        infos = [d for d in status.details if d.Is(error_details_pb2.RetryInfo.DESCRIPTOR)]
        assert len(infos) == 1
        info = error_details_pb2.RetryInfo()
        infos[0].Unpack(info)
        assert info.retry_delay.seconds >= 1
        # B is served at once, for reads and writes, while A's 8 wait.
        segments = segments_pb2_grpc.SegmentServiceStub(channel)
        started = time.monotonic()
        for i in range(20):
            segments.ListSegments(segments_pb2.ListSegmentsRequest(), metadata=b.auth, timeout=5)
            _upsert(channel, b, f"b{i}@x.com", timeout=5)
        assert time.monotonic() - started < 10
        assert _waiting_on_locks(engine) == CONCURRENCY
    finally:
        lock.close()
        pool.shutdown(wait=True, cancel_futures=True)
    # Released, A's admitted writes complete.
    done = [f for f in stuck if f.done() and f.exception() is None]
    assert len(done) == CONCURRENCY


def test_a_request_out_of_time_is_cancelled_in_the_database_and_commits_nothing(
    channel: grpc.Channel, sessions: sessionmaker[Session], engine: Engine
) -> None:
    a = new_project(sessions, "a")
    lock = _MembershipLock(engine, a)
    try:
        with pytest.raises(grpc.RpcError) as caught:
            _upsert(channel, a, "late@x.com", timeout=1.0)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # Its statement does not wait on in the database after the caller got the answer.
        _wait_until(lambda: _waiting_on_locks(engine) == 0, 3, "statement still runs")
    finally:
        lock.close()
    time.sleep(0.2)  # had the statement survived, its commit would land now
    with engine.connect() as conn:
        found = conn.execute(
            text("SELECT count(*) FROM contacts WHERE project_id = :p"), {"p": a.id}
        ).scalar_one()
    assert found == 0


def test_a_caller_that_goes_away_has_its_statement_cancelled(
    channel: grpc.Channel, sessions: sessionmaker[Session], engine: Engine
) -> None:
    a = new_project(sessions, "a")
    lock = _MembershipLock(engine, a)
    try:
        stub = contacts_pb2_grpc.ContactServiceStub(channel)
        call = stub.UpsertContact.future(
            contacts_pb2.UpsertContactRequest(email="gone@x.com"), metadata=a.auth, timeout=60
        )
        _wait_until(lambda: _waiting_on_locks(engine) == 1, 5, "never reached the lock")
        call.cancel()
        _wait_until(lambda: _waiting_on_locks(engine) == 0, 5, "statement still runs")
    finally:
        lock.close()
    with engine.connect() as conn:
        assert (
            conn.execute(
                text("SELECT count(*) FROM contacts WHERE project_id = :p"), {"p": a.id}
            ).scalar_one()
            == 0
        )


def test_idle_streams_take_no_worker_and_are_capped_per_project(
    channel: grpc.Channel, sessions: sessionmaker[Session]
) -> None:
    a, b = new_project(sessions, "a"), new_project(sessions, "b")
    segments = segments_pb2_grpc.SegmentServiceStub(channel)
    calls = [
        segments.WatchSegmentEvents(segments_pb2.WatchSegmentEventsRequest(), metadata=a.auth)
        for _ in range(STREAMS + 1)
    ]
    try:
        # One stream too many ends at once; the others stay open.
        _wait_until(
            lambda: any(c.done() for c in calls),  # type: ignore[attr-defined]
            10,
            "no stream was refused",
        )
        refused = [c for c in calls if c.done()]  # type: ignore[attr-defined]
        assert len(refused) == 1
        assert refused[0].code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # More streams than the server has workers are open, and B is served at once.
        started = time.monotonic()
        for i in range(20):
            segments.ListSegments(segments_pb2.ListSegmentsRequest(), metadata=b.auth, timeout=5)
            _upsert(channel, b, f"b{i}@x.com", timeout=5)
        assert time.monotonic() - started < 10
        own = segments.WatchSegmentEvents(segments_pb2.WatchSegmentEventsRequest(), metadata=b.auth)
        own.initial_metadata()  # open: past the cap's check
        assert not own.done()  # type: ignore[attr-defined]
        own.cancel()
    finally:
        for c in calls:
            c.cancel()
    # Closed streams give their places back.
    again = segments.WatchSegmentEvents(segments_pb2.WatchSegmentEventsRequest(), metadata=a.auth)
    again.initial_metadata()  # open: past the cap's check
    assert not again.done()  # type: ignore[attr-defined]
    again.cancel()


def test_a_revoked_key_ends_its_open_stream(
    channel: grpc.Channel, sessions: sessionmaker[Session]
) -> None:
    a = new_project(sessions, "a")
    segments = segments_pb2_grpc.SegmentServiceStub(channel)
    call = segments.WatchSegmentEvents(segments_pb2.WatchSegmentEventsRequest(), metadata=a.auth)
    call.initial_metadata()  # open and authenticated
    assert not call.done()  # type: ignore[attr-defined]
    with sessions.begin() as session:
        auth.revoke_key(session, a.secret_key)
    revoked_at = time.monotonic()
    with pytest.raises(grpc.RpcError) as caught:
        for _event in call:
            pass
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert time.monotonic() - revoked_at < 5


def test_an_export_whose_reader_stalls_is_closed_and_its_snapshot_released(
    server: ServerThread,
    channel: grpc.Channel,
    sessions: sessionmaker[Session],
    engine: Engine,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(streams, "EXPORT_IDLE_SECONDS", 1.0)
    a = new_project(sessions, "a")
    contacts = contacts_pb2_grpc.ContactServiceStub(channel)
    padding = "x" * 2000  # 24 MB in all: far more than any flow-control window buffers
    for start in range(0, EXPORTED, 1000):
        contacts.BatchUpsertContacts(
            contacts_pb2.BatchUpsertContactsRequest(
                contacts=[
                    contacts_pb2.UpsertContactRequest(
                        email=f"c{i}@x.com",
                        data=json_format.ParseDict({"pad": padding}, struct_pb2.Struct()),
                    )
                    for i in range(start, start + 1000)
                ]
            ),
            metadata=a.auth,
        )
    segments = segments_pb2_grpc.SegmentServiceStub(channel)
    condition = json_format.ParseDict(
        {
            "logic": "AND",
            "groups": [{"filters": [{"field": "email", "operator": "contains", "value": "@"}]}],
        },
        resources_pb2.FilterCondition(),
    )
    segment = segments.CreateSegment(
        segments_pb2.CreateSegmentRequest(name="all", condition=condition), metadata=a.auth
    )
    assert segment.member_count == EXPORTED

    def exporting() -> int:
        with engine.connect() as conn:
            return int(
                conn.execute(
                    text(
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                        "AND state LIKE 'idle in transaction%' AND pid <> pg_backend_pid()"
                    )
                ).scalar_one()
            )

    # A reader with a small, fixed flow-control window: the server's writes block once it
    # stops reading.
    reader = grpc.insecure_channel(
        f"127.0.0.1:{server.port}", options=[("grpc.http2.bdp_probe", 0)]
    )
    call = segments_pb2_grpc.SegmentServiceStub(reader).ExportSegmentContacts(
        segments_pb2.ExportSegmentContactsRequest(id=segment.id), metadata=a.auth
    )
    first = next(iter(call))  # the export is open; then the reader takes nothing
    assert len(first.contacts) > 0
    _wait_until(lambda: exporting() == 1, 5, "the export never held its snapshot")
    _wait_until(lambda: exporting() == 0, 15, "the stalled export kept its snapshot")
    with pytest.raises(grpc.RpcError) as caught:
        for _message in call:
            pass
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    reader.close()


def test_the_client_reports_a_refusal_with_its_delay_and_retries_it(
    server: ServerThread, sessions: sessionmaker[Session], engine: Engine
) -> None:
    a = new_project(sessions, "a")
    target = f"127.0.0.1:{server.port}"
    lock = _MembershipLock(engine, a)
    pool = ThreadPoolExecutor(max_workers=CONCURRENCY)
    try:
        with grpc.insecure_channel(target) as channel:
            stuck = [
                pool.submit(_upsert, channel, a, f"s{i}@x.com", 20) for i in range(CONCURRENCY)
            ]
            _wait_until(lambda: _waiting_on_locks(engine) == CONCURRENCY, 5, "not all waiting")
            with SegmentsClient(target, a.secret_key, retry=NO_RETRY) as plain:
                with pytest.raises(RateLimitedError) as caught:
                    plain.upsert_contact("refused@x.com")
                assert caught.value.retry_after is not None and caught.value.retry_after >= 1
                assert caught.value.reason == "RATE_LIMITED"
            # A retrying client waits out the refusal: the share frees up meanwhile.
            threading.Timer(0.5, lock.close).start()
            with SegmentsClient(target, a.secret_key, timeout=15) as retrying:
                assert retrying.upsert_contact("patient@x.com").email == "patient@x.com"
            for future in stuck:
                future.result(timeout=10)
    finally:
        lock.close()
        pool.shutdown(wait=True, cancel_futures=True)


def test_only_calls_safe_to_repeat_are_retried_after_unavailable() -> None:
    from segments import client as typed

    policy = Retry(attempts=3)
    unavailable = UnavailableError(grpc.StatusCode.UNAVAILABLE, "down")
    refused = RateLimitedError(grpc.StatusCode.RESOURCE_EXHAUSTED, "busy", retry_after=2.0)
    assert policy.applies(typed._GET_SEGMENT, unavailable, 1)
    assert not policy.applies(typed._TRACK, unavailable, 1)
    assert not policy.applies(typed._CREATE_SEGMENT, unavailable, 1)
    assert policy.applies(typed._TRACK, refused, 1)
    assert not policy.applies(typed._GET_SEGMENT, unavailable, 3)
    assert 2.0 <= policy.delay(refused, 1) <= 2.5
    assert 0 <= policy.delay(unavailable, 2) <= 0.2


def test_a_project_evaluates_few_conditions_at_once_and_queues_the_rest(
    channel: grpc.Channel, sessions: sessionmaker[Session], engine: Engine
) -> None:
    a = new_project(sessions, "a")
    condition = json_format.ParseDict(
        {
            "logic": "AND",
            "groups": [{"filters": [{"field": "email", "operator": "contains", "value": "@"}]}],
        },
        resources_pb2.FilterCondition(),
    )
    stub = segments_pb2_grpc.SegmentServiceStub(channel)
    # Every read of contacts waits behind this lock: the counts stay in flight.
    blocker = engine.connect()
    blocker.execute(text("LOCK TABLE contacts IN ACCESS EXCLUSIVE MODE"))
    pool = ThreadPoolExecutor(max_workers=5)
    try:
        counts = [
            pool.submit(
                stub.CountMatchingContacts,
                segments_pb2.CountMatchingContactsRequest(condition=condition),
                metadata=a.auth,
                timeout=20,
            )
            for _ in range(5)
        ]
        _wait_until(lambda: _waiting_on_locks(engine) == EVALUATIONS, 5, "counts never ran")
        time.sleep(0.5)  # the others wait their turn outside the database
        assert _waiting_on_locks(engine) == EVALUATIONS
        assert not any(c.done() for c in counts)
    finally:
        blocker.rollback()
        blocker.close()
    assert [c.result(timeout=20).count for c in counts] == [0] * 5
    pool.shutdown()
