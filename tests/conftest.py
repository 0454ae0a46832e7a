"""Fixtures: a fresh database on a real PostgreSQL, the gRPC server in-process on port 0,
Envoy in front of it for REST tests, and a new project (with keys) per test.

The server is the embedded PostgreSQL of `.data/` unless TEST_DATABASE_URL or DATABASE_URL
names another one; either way the suite works in its own database, dropped at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from segments import SegmentsClient
from segments_api.v1 import contacts_pb2_grpc, events_pb2_grpc, segments_pb2_grpc
from segments_service.auth import create_project
from segments_service.database import (
    STATEMENT_LOG,
    create_database,
    drop_database,
    make_engine,
    make_sessionmaker,
    migrate,
    sqlalchemy_url,
    start_embedded,
)
from segments_service.fairness import Limits
from segments_service.server import Options, ServerThread
from tests import statement_scope

warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
ROOT = Path(__file__).resolve().parent.parent


# Every distinct statement the service runs during the session, in-process or in the
# servers the tests start as subprocesses (they inherit the environment), is appended to
# one file; at the end of the session each is checked for its project scope
# (tests/statement_scope.py) and the session fails on any that is not.
_unscoped = pytest.StashKey[list[statement_scope.Violation]]()


def pytest_configure(config: pytest.Config) -> None:
    if STATEMENT_LOG not in os.environ:
        fd, path = tempfile.mkstemp(prefix="segments-statements-", suffix=".jsonl")
        os.close(fd)
        os.environ[STATEMENT_LOG] = path
        config.add_cleanup(lambda: Path(path).unlink(missing_ok=True))


@pytest.hookimpl(trylast=True)  # after the session's fixtures (and servers) are torn down
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    recorded = statement_scope.read_log(Path(os.environ[STATEMENT_LOG]))
    violations = statement_scope.check(recorded)
    session.config.stash[_unscoped] = violations
    if violations and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    violations = config.stash.get(_unscoped, [])
    if not violations:
        return
    terminalreporter.section("statements not scoped to a project", sep="=", red=True)
    for violation in violations:
        terminalreporter.line(f"{', '.join(violation.tables)}: {violation.statement}")
    terminalreporter.line(
        f"{len(violations)} statement(s) read or write tenant tables without comparing their "
        "project_id; scope them, or list them in tests/statement_scope.py ALLOWED with why"
    )


def _admin_url() -> tuple[str, Any]:
    url = os.environ.get("TEST_DATABASE_URL") or os.environ.get("DATABASE_URL")
    if url:
        return url, None
    server = start_embedded((ROOT / ".data").resolve())
    return server.get_uri(), server


def _with_database(url: str, name: str) -> str:
    """`url` pointing at database `name` (URL or socket-query form)."""
    from sqlalchemy.engine import make_url

    return make_url(sqlalchemy_url(url)).set(database=name).render_as_string(hide_password=False)


@contextlib.contextmanager
def _new_database() -> Iterator[str]:
    """URL of a new, empty database on the test server, dropped on exit."""
    admin, _handle = _admin_url()
    name = f"segments_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    create_database(sqlalchemy_url(admin), name)
    try:
        yield _with_database(admin, name)
    finally:
        drop_database(sqlalchemy_url(admin), name)


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    with _new_database() as url:
        migrate(url)
        yield url


@pytest.fixture
def empty_database_url() -> Iterator[str]:
    """A database of this test alone, without any schema: for testing the migrations."""
    with _new_database() as url:
        yield url


@pytest.fixture(scope="session")
def engine(database_url: str) -> Iterator[Engine]:
    engine = make_engine(database_url, pool_size=8)
    yield engine
    engine.dispose()


@pytest.fixture(scope="session")
def sessions(engine: Engine) -> sessionmaker[Session]:
    return make_sessionmaker(engine)


# The shared server lets one project run more requests at once than the default (several
# tests race a dozen writers of one project); tests/test_fair_share.py runs the defaults.
SHARED_SERVER = Options(limits=Limits(concurrency=64, streams=64))


@pytest.fixture(scope="session")
def grpc_port(sessions: sessionmaker[Session]) -> Iterator[int]:
    server = ServerThread("127.0.0.1:0", sessions, SHARED_SERVER)
    yield server.port
    server.stop(1)


@pytest.fixture(scope="session")
def channel(grpc_port: int) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as ch:
        yield ch


@dataclass(frozen=True)
class Project:
    id: str
    secret_key: str
    public_key: str

    @property
    def auth(self) -> tuple[tuple[str, str]]:
        """gRPC metadata with the secret key."""
        return (("authorization", f"Bearer {self.secret_key}"),)

    @property
    def public_auth(self) -> tuple[tuple[str, str]]:
        return (("authorization", f"Bearer {self.public_key}"),)


def new_project(sessions: sessionmaker[Session], name: str = "test") -> Project:
    with sessions.begin() as session:
        keys = create_project(session, name)
    return Project(keys["id"], keys["secretKey"], keys["publicKey"])


@pytest.fixture
def project(sessions: sessionmaker[Session]) -> Project:
    return new_project(sessions)


@pytest.fixture
def other_project(sessions: sessionmaker[Session]) -> Project:
    return new_project(sessions, "other")


@dataclass(frozen=True)
class Stubs:
    segments: segments_pb2_grpc.SegmentServiceStub
    contacts: contacts_pb2_grpc.ContactServiceStub
    events: events_pb2_grpc.EventServiceStub


@pytest.fixture
def target(grpc_port: int) -> str:
    """The in-process server's address, for the typed client."""
    return f"127.0.0.1:{grpc_port}"


@pytest.fixture
def client(target: str, project: Project) -> Iterator[SegmentsClient]:
    """The typed client with the project's secret key."""
    with SegmentsClient(target, project.secret_key) as client:
        yield client


@pytest.fixture(scope="session")
def stubs(channel: grpc.Channel) -> Stubs:
    return Stubs(
        segments_pb2_grpc.SegmentServiceStub(channel),
        contacts_pb2_grpc.ContactServiceStub(channel),
        events_pb2_grpc.EventServiceStub(channel),
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def envoy_in_front(grpc_port: int, workdir: Path) -> Iterator[str]:
    """Envoy, exactly as `make run` configures it, in front of the gRPC server on
    `grpc_port`: its base URL, until the block ends."""
    from segments_service import envoy_proxy

    http_port = free_port()
    config = envoy_proxy.render_config(
        http_port=http_port,
        upstreams=[("127.0.0.1", grpc_port)],
        descriptor_path=ROOT / "envoy" / "segments.pb",
    )
    proc = envoy_proxy.start_envoy(config, workdir=workdir, log_path=workdir / "envoy.log")
    try:
        envoy_proxy.wait_ready(http_port, timeout=30, process=proc)
        yield f"http://127.0.0.1:{http_port}"
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="session")
def rest_url(grpc_port: int, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Envoy in front of the in-process server."""
    with envoy_in_front(grpc_port, tmp_path_factory.mktemp("envoy")) as url:
        yield url


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    raw: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.raw)


class Rest:
    """A tiny HTTP client for the REST surface; keys are passed per call."""

    def __init__(self, base: str) -> None:
        self.base = base

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        key: str | None = None,
        raw: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Response:
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        req = urllib.request.Request(self.base + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if key is not None:
            req.add_header("Authorization", f"Bearer {key}")
        for name, value in (headers or {}).items():
            req.add_header(name, value)
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return Response(
                    resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read()
                )
        except urllib.error.HTTPError as err:
            return Response(err.code, {k.lower(): v for k, v in err.headers.items()}, err.read())

    def get(self, path: str, **kw: Any) -> Response:
        return self.request("GET", path, **kw)

    def post(self, path: str, body: Any = None, **kw: Any) -> Response:
        return self.request("POST", path, body, **kw)

    def patch(self, path: str, body: Any = None, **kw: Any) -> Response:
        return self.request("PATCH", path, body, **kw)

    def delete(self, path: str, body: Any = None, **kw: Any) -> Response:
        return self.request("DELETE", path, body, **kw)


@pytest.fixture(scope="session")
def rest(rest_url: str) -> Rest:
    return Rest(rest_url)


Replicas = Callable[[], "Replica"]


class Replica:
    """One `segments serve` process on the test database."""

    def __init__(
        self,
        database_url: str,
        sweep_seconds: float = 0.5,
        env: dict[str, str] | None = None,
    ) -> None:
        self.port = free_port()
        env = {
            **os.environ,
            "DATABASE_URL": database_url,
            "SEGMENTS_SWEEP_SECONDS": str(sweep_seconds),
            "SEGMENTS_DRAIN_SECONDS": "5",
            "LOG_LEVEL": "WARNING",
            **(env or {}),
        }
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "segments_service.cli", "serve", "--port", str(self.port)],
            env=env,
        )
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        deadline = time.monotonic() + 30
        health: object = health_pb2_grpc.HealthStub(self.channel)
        while True:
            try:
                health.Check(health_pb2.HealthCheckRequest(), timeout=1)  # type: ignore[attr-defined]
                break
            except grpc.RpcError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("replica did not start") from None
                time.sleep(0.1)
        self.segments = segments_pb2_grpc.SegmentServiceStub(self.channel)
        self.contacts = contacts_pb2_grpc.ContactServiceStub(self.channel)
        self.events = events_pb2_grpc.EventServiceStub(self.channel)

    def stop(self) -> None:
        self.channel.close()
        if self.proc.poll() is None:
            self.proc.terminate()
        self.proc.wait(15)


@pytest.fixture
def replicas(database_url: str) -> Iterator[Replicas]:
    started: list[Replica] = []

    def start() -> Replica:
        replica = Replica(database_url)
        started.append(replica)
        return replica

    yield start
    for replica in started:
        replica.stop()
