"""/metrics and the logs of a whole `segments run` stack (two replicas, Envoy, a database of
its own): the series move by what was done through REST and gRPC, Envoy's statistics are
there beside them, every log line is a JSON object carrying the request id Envoy answered
with, and an idle server writes nothing after it started."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bench.stack import free_ports
from segments import F
from segments_api.v1 import segments_pb2, segments_pb2_grpc
from segments_service.auth import create_project
from segments_service.database import make_engine, make_sessionmaker
from tests.conftest import Project, Rest, _new_database, free_port

SEGMENTS = Path(sys.executable).parent / "segments"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@dataclass
class Stack:
    """A running `segments run`, its ports, its log files and a project on its database."""

    proc: subprocess.Popen[bytes]
    rest: Rest
    grpc_port: int
    metrics_url: str
    stderr: Path
    stdout: Path
    project: Project

    def scrape(self) -> Samples:
        with urllib.request.urlopen(self.metrics_url, timeout=10) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/plain")
            text = resp.read().decode()
        samples: Samples = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
        return samples

    def log_lines(self) -> list[str]:
        return [line for line in self.stderr.read_text().splitlines() if line.strip()]


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def start_stack(database_url: str, run_dir: Path, **env: str) -> Stack:
    """`segments run --replicas 2` on `database_url`, every port a free one."""
    grpc_port = free_ports(2)  # two replicas: GRPC_PORT and GRPC_PORT+1
    http_port, metrics_port = free_port(), free_port()
    while {http_port, metrics_port} & {grpc_port, grpc_port + 1} or http_port == metrics_port:
        http_port, metrics_port = free_port(), free_port()
    environment = {k: v for k, v in os.environ.items() if not k.startswith("SEGMENTS_")}
    environment.update(
        DATABASE_URL=database_url,
        SEGMENTS_DATA_DIR=str(run_dir),
        HTTP_PORT=str(http_port),
        GRPC_PORT=str(grpc_port),
        SEGMENTS_METRICS_PORT=str(metrics_port),
        SEGMENTS_SWEEP_SECONDS="0.5",
        SEGMENTS_DRAIN_SECONDS="2",
        **env,
    )
    environment.pop("LOG_LEVEL", None)
    environment.update({k: v for k, v in env.items() if k == "LOG_LEVEL"})
    stdout, stderr = run_dir / "stdout.log", run_dir / "stderr.log"
    with stdout.open("wb") as out, stderr.open("wb") as err:
        proc = subprocess.Popen(
            [str(SEGMENTS), "run", "--replicas", "2"],
            env=environment,
            stdout=out,
            stderr=err,
            start_new_session=True,
        )
    deadline = time.monotonic() + 120
    while "segments ready" not in stdout.read_text():
        assert proc.poll() is None, stderr.read_text()
        assert time.monotonic() < deadline, stderr.read_text()
        time.sleep(0.2)
    engine = make_engine(database_url, pool_size=1)
    try:
        with make_sessionmaker(engine).begin() as session:
            keys = create_project(session, "metrics")
    finally:
        engine.dispose()
    return Stack(
        proc,
        Rest(f"http://127.0.0.1:{http_port}"),
        grpc_port,
        f"http://127.0.0.1:{metrics_port}/metrics",
        stderr,
        stdout,
        Project(keys["id"], keys["secretKey"], keys["publicKey"]),
    )


def stop_stack(stack: Stack) -> None:
    if stack.proc.poll() is None:
        stack.proc.send_signal(2)  # SIGINT, as Ctrl-C
        try:
            stack.proc.wait(60)
        except subprocess.TimeoutExpired:
            stack.proc.kill()
            stack.proc.wait()


@pytest.fixture
def stack_with(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Stack]]:
    """Starts stacks, each on a database of its own; stops them and drops the databases."""
    started: list[Stack] = []
    databases: list[Any] = []
    run_dirs: list[Path] = []

    def start(**env: str) -> Stack:
        database = _new_database()
        url = database.__enter__()
        databases.append(database)
        run_dir = Path(tempfile.mkdtemp(prefix="segments-metrics-", dir="/tmp"))
        run_dirs.append(run_dir)
        stack = start_stack(url, run_dir, **env)
        started.append(stack)
        return stack

    yield start
    for stack in started:
        stop_stack(stack)
    for database in databases:
        database.__exit__(None, None, None)
    for run_dir in run_dirs:
        shutil.rmtree(run_dir, ignore_errors=True)


def eventually(check: Callable[[], Any], timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def closed_port() -> int:
    """A loopback port nothing listens on (a webhook receiver that is down)."""
    return free_port()


def test_the_series_move_by_what_was_done(stack_with: Callable[..., Stack]) -> None:
    stack = stack_with(
        LOG_LEVEL="DEBUG",
        # Every build leaves its request: the background build is measured too.
        SEGMENTS_INLINE_BUILD_CONTACTS="0",
        SEGMENTS_WEBHOOK_ALLOW_PRIVATE="1",
        SEGMENTS_WEBHOOK_POLL_SECONDS="0.1",
        SEGMENTS_WEBHOOK_TIMEOUT="2",
    )
    rest, key = stack.rest, stack.project.secret_key
    before = stack.scrape()

    # A contact; a webhook whose receiver is down; a tracked segment (built in the
    # background: the project has more contacts than SEGMENTS_INLINE_BUILD_CONTACTS) that
    # the contact enters when an event comes in.
    contact = rest.post("/contacts", {"email": "ada@example.com"}, key=key)
    assert contact.status in (200, 201), contact.raw
    contact_id = contact.json["id"]
    assert (
        rest.post("/webhooks", {"url": f"http://127.0.0.1:{closed_port()}/"}, key=key).status == 201
    )
    created = rest.post(
        "/segments",
        {
            "name": "Buyers",
            "trackMembership": True,
            "condition": F.event("purchase").triggered().to_dict(),
        },
        key=key,
    )
    assert created.status == 201, created.raw
    segment_id = created.json["id"]
    assert eventually(
        lambda: rest.get(f"/segments/{segment_id}", key=key).json["status"] == "READY"
    )
    tracked = rest.post(
        "/v1/track", {"event": "purchase", "email": "ada@example.com"}, key=stack.project.public_key
    )
    assert tracked.status == 200, tracked.raw
    assert rest.get(f"/segments/{segment_id}", key=key).json["memberCount"] == 1

    # REST: one GetContact found, one not found (the error call).
    assert rest.get(f"/contacts/{contact_id}", key=key).status == 200
    missing = rest.get(f"/contacts/{uuid.uuid4()}", key=key)
    assert missing.status == 404
    request_id = missing.headers["x-request-id"]
    # gRPC, straight to the first replica, with the caller's own request id.
    own_id = f"metrics-test-{uuid.uuid4()}"
    with grpc.insecure_channel(f"127.0.0.1:{stack.grpc_port}") as channel:
        stub = segments_pb2_grpc.SegmentServiceStub(channel)
        listed = stub.ListSegments(
            segments_pb2.ListSegmentsRequest(),
            metadata=(("authorization", f"Bearer {key}"), ("x-request-id", own_id)),
        )
    assert [s.id for s in listed.segments] == [segment_id]

    def settled() -> Samples | None:
        now = stack.scrape()
        failing = value(now, "segments_webhook_delivery_failures_total") > value(
            before, "segments_webhook_delivery_failures_total"
        )
        swept = value(now, "segments_sweep_duration_seconds_count") > value(
            before, "segments_sweep_duration_seconds_count"
        )
        waiting = value(now, "segments_webhook_backlog") >= 1
        return now if failing and swept and waiting else None

    after = eventually(settled)
    assert after is not None, "no webhook failure, backlog or sweep showed"

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    get_contact = "segments.v1.ContactService/GetContact"
    assert moved("segments_rpc_requests_total", method=get_contact, code="OK") == 1
    assert moved("segments_rpc_requests_total", method=get_contact, code="NOT_FOUND") == 1
    assert moved("segments_rpc_duration_seconds_count", method=get_contact, code="NOT_FOUND") == 1
    assert moved("segments_rpc_duration_seconds_sum", method=get_contact, code="NOT_FOUND") > 0
    list_segments = "segments.v1.SegmentService/ListSegments"
    assert moved("segments_rpc_requests_total", method=list_segments, code="OK") == 1
    track = "segments.v1.EventService/Track"
    assert moved("segments_rpc_requests_total", method=track, code="OK") == 1
    # A histogram's buckets are cumulative: +Inf holds every observation.
    assert moved("segments_rpc_duration_seconds_bucket", method=track, code="OK", le="+Inf") == 1

    # Both replicas' pools, summed: the default 10 connections each.
    assert value(after, "segments_db_pool_size", pool="requests") == 20
    assert value(after, "segments_db_pool_checked_out", pool="requests") >= 0
    assert ("segments_db_pool_overflow", frozenset({("pool", "streams")})) in after

    # The entry the event caused, written by the Track request itself.
    assert moved("segments_tracker_lag_seconds_count", source="write") == 1
    lag = moved("segments_tracker_lag_seconds_sum", source="write")
    assert 0 < lag < 30
    assert moved("segments_build_duration_seconds_count", mode="background") == 1
    assert moved("segments_sweep_duration_seconds_count") >= 1
    assert moved("segments_webhook_delivery_failures_total") >= 1
    assert value(after, "segments_webhook_backlog") >= 1
    assert moved("segments_webhook_deliveries_total") == 0

    # Envoy's own statistics, beside ours: the REST requests it took.
    rest_requests = value(
        after, "envoy_http_downstream_rq_total", envoy_http_conn_manager_prefix="rest"
    )
    assert rest_requests >= 8

    # Every line of every process is one JSON object with the fields a reader relies on.
    lines = [json.loads(line) for line in stack.log_lines()]
    assert lines
    for line in lines:
        assert {"time", "level", "logger", "message", "pid"} <= line.keys(), line
        assert line["time"].endswith("Z") and "T" in line["time"]
    pids = {line["pid"] for line in lines}
    assert len(pids) >= 2  # both replicas wrote
    # The REST call's line carries the id Envoy answered with; the gRPC call's its own.
    answered = [line for line in lines if line.get("request_id") == request_id]
    assert answered and answered[0]["code"] == "NOT_FOUND", answered
    assert answered[0]["rpc"] == "/" + get_contact
    assert [line["code"] for line in lines if line.get("request_id") == own_id] == ["OK"]
    # The human line stays plain, on standard output.
    assert stack.stdout.read_text().startswith("segments ready: REST http://127.0.0.1:")


def test_an_idle_server_writes_nothing(stack_with: Callable[..., Stack]) -> None:
    """Sweeps keep running over a time-dependent, tracked segment; the log stays as it was
    once the stack was ready."""
    stack = stack_with()
    rest, key = stack.rest, stack.project.secret_key
    created = rest.post(
        "/segments",
        {
            "name": "New contacts",
            "trackMembership": True,
            # Contacts created lately are re-evaluated by every sweep (they may just have
            # come within the window): routine work, not news.
            "condition": F.created_at.within(30, "days").to_dict(),
        },
        key=key,
    )
    assert created.status == 201, created.raw
    for i in range(3):
        assert rest.post("/contacts", {"email": f"c{i}@example.com"}, key=key).status in (200, 201)
    before = stack.scrape()
    logged = stack.log_lines()

    def swept() -> bool:
        # Several passes, and one that re-evaluated contacts: the background build must be
        # done and a replica past its first (full) pass, which on a loaded machine can take
        # a while; the log is read only once that work is done.
        after = stack.scrape()
        passes = value(after, "segments_sweep_duration_seconds_count") - value(
            before, "segments_sweep_duration_seconds_count"
        )
        moved = value(after, "segments_sweep_contacts_total") - value(
            before, "segments_sweep_contacts_total"
        )
        return passes >= 2 and moved > 0

    assert eventually(swept, timeout=60.0)
    assert stack.log_lines() == logged


def test_a_run_removes_its_metric_files(stack_with: Callable[..., Stack]) -> None:
    """The replicas' multiprocess files live in a directory of the run, gone when it stops."""
    stack = stack_with()
    replicas = {p.pid for p in psutil.Process(stack.proc.pid).children() if "serve" in p.cmdline()}
    assert len(replicas) == 2
    run_dirs = [
        path.parent
        for path in Path(tempfile.gettempdir()).glob("segments-run-*/metrics")
        if {int(f.stem.rsplit("_", 1)[-1]) for f in path.glob("*.db")} & replicas
    ]
    assert len(run_dirs) == 1
    assert stack.scrape()
    stop_stack(stack)
    assert stack.proc.returncode == 0
    assert not run_dirs[0].exists()
