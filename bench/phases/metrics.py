"""Phase 13: the cost of a /metrics scrape of a whole `segments run` stack.

A stack of its own on the benchmark database (two replicas and Envoy, every port a free
one), a project of its own with 50 segments, some REST and gRPC traffic (an error call
included) so that every family of series has values, then `scrapes` timed GETs of
/metrics: the replicas' series summed from their files and Envoy's statistics after
them, as Prometheus would read them."""

from __future__ import annotations

import http.client
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import grpc

from bench import scenarios
from bench.context import Env, condition_proto, md
from bench.measure import summary, timed
from bench.stack import free_port, free_ports
from segments_api.v1 import contacts_pb2, contacts_pb2_grpc, segments_pb2, segments_pb2_grpc
from segments_service import auth
from segments_service.errors import NotFound

SEGMENTS = Path(sys.executable).parent / "segments"
PROJECT = "bench metrics"
SEGMENT_COUNT = 50
CONTACTS = 100
WARMUP = 5


def _project_key(env: Env) -> str:
    """A secret key of the phase's own project (made on the first run, kept after)."""
    with env.sessions.begin() as session:
        try:
            project_id = auth.find_project(session, PROJECT).id
        except NotFound:
            project_id = uuid.UUID(auth.create_project(session, PROJECT)["id"])
        return auth.issue_key(session, project_id, "secret")


def _start(env: Env, run_dir: Path) -> tuple[subprocess.Popen[bytes], int, int, int]:
    grpc_port = free_ports(2)  # two replicas
    http_port, metrics_port = free_port(), free_port()
    while {http_port, metrics_port} & {grpc_port, grpc_port + 1} or http_port == metrics_port:
        http_port, metrics_port = free_port(), free_port()
    environment = {
        **os.environ,
        "DATABASE_URL": env.url,
        "SEGMENTS_DATA_DIR": str(run_dir),
        "HTTP_PORT": str(http_port),
        "GRPC_PORT": str(grpc_port),
        "SEGMENTS_METRICS_PORT": str(metrics_port),
        "SEGMENTS_RATE_LIMIT_PER_MINUTE": "0",
        "LOG_LEVEL": "WARNING",
    }
    out = (run_dir / "run.log").open("wb")
    proc = subprocess.Popen(
        [str(SEGMENTS), "run", "--replicas", "2"],
        env=environment,
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    out.close()
    deadline = time.monotonic() + 120
    while "segments ready" not in (run_dir / "run.log").read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(
                "segments run did not start: "
                + (run_dir / "run.log").read_text(errors="replace")[-2000:]
            )
        time.sleep(0.2)
    return proc, http_port, grpc_port, metrics_port


def _traffic(key: str, http_port: int, grpc_port: int) -> int:
    """50 segments, CONTACTS contacts, and a round of reads over both surfaces."""
    calls = 0
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        segments = segments_pb2_grpc.SegmentServiceStub(channel)
        contacts = contacts_pb2_grpc.ContactServiceStub(channel)
        existing = segments.ListSegments(segments_pb2.ListSegmentsRequest(), metadata=md(key))
        for i in range(len(existing.segments), SEGMENT_COUNT):
            name, condition = scenarios.filler(i)
            segments.CreateSegment(
                segments_pb2.CreateSegmentRequest(name=name, condition=condition_proto(condition)),
                metadata=md(key),
                timeout=60,
            )
            calls += 1
        ids = []
        for i in range(CONTACTS):
            contact = contacts.UpsertContact(
                contacts_pb2.UpsertContactRequest(email=f"metrics-{i}@example.com"),
                metadata=md(key),
            )
            ids.append(contact.id)
            calls += 1
    conn = http.client.HTTPConnection("127.0.0.1", http_port, timeout=60)
    headers = {"Authorization": f"Bearer {key}"}
    try:
        for path in (
            "/segments",
            f"/contacts/{ids[0]}",
            f"/contacts/{ids[0]}/segments",
            f"/contacts/{uuid.uuid4()}",  # not found: an error code among the series
            "/contacts?limit=10",
        ):
            for _ in range(5):
                conn.request("GET", path, headers=headers)
                conn.getresponse().read()
                calls += 1
    finally:
        conn.close()
    return calls


def _scrape(metrics_port: int) -> bytes:
    conn = http.client.HTTPConnection("127.0.0.1", metrics_port, timeout=30)
    try:
        conn.request("GET", "/metrics")
        response = conn.getresponse()
        body = response.read()
        if response.status != 200:
            raise RuntimeError(f"/metrics answered {response.status}")
        return body
    finally:
        conn.close()


def metrics_scrape(env: Env, scrapes: int = 60) -> dict[str, Any]:
    key = _project_key(env)
    with tempfile.TemporaryDirectory(prefix="bench-metrics-") as tmp:
        run_dir = Path(tmp)
        run_dir.chmod(0o755)
        proc, http_port, grpc_port, metrics_port = _start(env, run_dir)
        try:
            calls = _traffic(key, http_port, grpc_port)
            for _ in range(WARMUP):
                _scrape(metrics_port)
            times: list[float] = []
            body = b""
            for _ in range(scrapes):
                ms, body = timed(lambda: _scrape(metrics_port))
                times.append(ms)
        finally:
            proc.send_signal(2)  # SIGINT, as Ctrl-C
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    lines = [line for line in body.decode().splitlines() if line and not line.startswith("#")]
    return {
        "replicas": 2,
        "segments": SEGMENT_COUNT,
        "traffic_calls": calls,
        "scrape_ms": summary(times),
        "scrape_bytes": len(body),
        "samples": len(lines),
        "segments_samples": sum(1 for line in lines if line.startswith("segments_")),
        "envoy_samples": sum(1 for line in lines if line.startswith("envoy_")),
    }
