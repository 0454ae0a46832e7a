"""Soak: several replicas behind one Envoy, mixed load, one replica killed and restarted.

Starts its own stack (a fresh database on the embedded PostgreSQL, or on the server of
DATABASE_URL; N `segments serve` replicas; one Envoy in front), then runs C concurrent
HTTP connections of mixed reads and writes for S seconds. Halfway through, one replica is
killed with SIGKILL and restarted a few seconds later. Clients retry 503s (and dropped
connections) as a well-behaved REST client would.

Then it checks, and exits non-zero if any check fails:
  - zero lost writes: every contact upsert, event batch and member addition that was
    acknowledged with a 2xx is in the database;
  - the only errors are 503s (or dropped connections) inside the kill window, each retried
    until it succeeded;
  - every segment's memberCount equals the count computed in SQL, and the tracked segment
    recorded exactly one entry event per member despite the crash;
  - memory is flat: each replica's RSS at the end is within a bound of its RSS after the
    warm-up (the restarted replica is measured from its restart).

    python scripts/soak.py                      # 60 s, 64 connections, 3 replicas
    python scripts/soak.py --seconds 30 --connections 32
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy import Engine, text
from sqlalchemy.engine import make_url

from segments_service import envoy_proxy
from segments_service.auth import create_project
from segments_service.database import (
    create_database,
    drop_database,
    make_engine,
    make_sessionmaker,
    migrate,
    sqlalchemy_url,
    start_embedded,
)

ROOT = Path(__file__).resolve().parent.parent
DESCRIPTOR = ROOT / "envoy" / "segments.pb"
PLANS = ["free", "premium", "team"]
EVENT_BATCH = 5
MEMBER_BATCH = 3
MAX_ATTEMPTS = 40
# After the restarted replica is healthy, Envoy's health check (1 s) and outlier ejection
# (5 s) may still route a few requests into the old state; errors up to this long after
# the restart still count as inside the kill window.
WINDOW_GRACE = 10.0


def log(message: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {message}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- the stack ---------------------------------------------------------------------------


class Stack:
    """A fresh database, N replicas and one Envoy, all on 127.0.0.1."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.admin_url = ""
        self.database = f"soak_{os.getpid()}_{uuid.uuid4().hex[:6]}"
        self.url = ""
        self._embedded: Any = None
        self.ports = [free_port() for _ in range(args.replicas)]
        self.replicas: dict[int, subprocess.Popen[bytes]] = {}
        self.envoy: subprocess.Popen[bytes] | None = None
        self.http_port = free_port()

    def start(self) -> None:
        admin = self.args.database_url or os.environ.get("DATABASE_URL")
        if not admin:
            self._embedded = start_embedded((ROOT / ".data").resolve())
            admin = self._embedded.get_uri()
        self.admin_url = sqlalchemy_url(admin)
        create_database(self.admin_url, self.database)
        self.url = (
            make_url(self.admin_url)
            .set(database=self.database)
            .render_as_string(hide_password=False)
        )
        migrate(self.url)
        log(f"database {self.database} ready")
        for port in self.ports:
            self.start_replica(port)
        for port in self.ports:
            self.wait_healthy(port)
        config = envoy_proxy.render_config(
            http_port=self.http_port,
            upstreams=[("127.0.0.1", p) for p in self.ports],
            descriptor_path=DESCRIPTOR,
        )
        envoy_dir = self.workdir / "envoy"
        self.envoy = envoy_proxy.start_envoy(
            config, workdir=envoy_dir, log_path=envoy_dir / "envoy.log"
        )
        envoy_proxy.wait_ready(self.http_port, timeout=30, process=self.envoy)
        log(
            f"{len(self.ports)} replicas on gRPC ports {', '.join(map(str, self.ports))}, "
            f"Envoy on http://127.0.0.1:{self.http_port}"
        )

    def start_replica(self, port: int) -> subprocess.Popen[bytes]:
        env = {
            **os.environ,
            "DATABASE_URL": self.url,
            "SEGMENTS_SWEEP_SECONDS": str(self.args.sweep_seconds),
            "SEGMENTS_DRAIN_SECONDS": "5",
            # One project makes the whole load here: its in-flight ceiling and its REST
            # rate (fair share between projects, tested in tests/test_fair_share.py and
            # tests/test_rate_limit.py) would refuse most of it.
            "SEGMENTS_PROJECT_CONCURRENCY": "0",
            "SEGMENTS_RATE_LIMIT_PER_MINUTE": "0",
            "LOG_LEVEL": "WARNING",
        }
        log_file = (self.workdir / f"replica-{port}.log").open("ab")
        proc = subprocess.Popen(
            [sys.executable, "-m", "segments_service.cli", "serve", "--port", str(port)],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
        log_file.close()
        self.replicas[port] = proc
        return proc

    def wait_healthy(self, port: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        proc = self.replicas[port]
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub: Any = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    raise RuntimeError(f"replica on port {port} exited ({proc.returncode})")
                with contextlib.suppress(grpc.RpcError):
                    reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                time.sleep(0.1)
        raise RuntimeError(f"replica on port {port} not healthy within {timeout} s")

    def kill(self, port: int) -> None:
        proc = self.replicas[port]
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    def rss(self) -> dict[int, int]:
        out = {}
        for port, proc in self.replicas.items():
            with contextlib.suppress(psutil.Error):
                out[port] = psutil.Process(proc.pid).memory_info().rss
        return out

    def envoy_rss(self) -> int:
        if self.envoy is None:
            return 0
        with contextlib.suppress(psutil.Error):
            return int(psutil.Process(self.envoy.pid).memory_info().rss)
        return 0

    def stop(self) -> None:
        if self.envoy is not None and self.envoy.poll() is None:
            self.envoy.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.envoy.wait(10)
        for proc in self.replicas.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.replicas.values():
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self.admin_url and not self.args.keep_database:
            try:
                drop_database(self.admin_url, self.database)
            except Exception as err:  # the report matters more than the cleanup
                log(f"could not drop database {self.database}: {err}")


# -- the load ----------------------------------------------------------------------------


@dataclass
class ErrorSeen:
    at: float  # seconds since the load started
    op: str
    status: int  # 0: connection dropped
    detail: str
    retried_ok: bool = False


@dataclass
class Results:
    """What the clients saw; each worker appends under the lock."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    contacts: dict[str, str] = field(default_factory=dict)  # acked email -> contact id
    batches: dict[str, int] = field(default_factory=dict)  # acked batch id -> events
    batch_attempts: dict[str, int] = field(default_factory=dict)
    members: set[str] = field(default_factory=set)  # acked emails added to the static list
    errors: list[ErrorSeen] = field(default_factory=list)
    unexpected: list[ErrorSeen] = field(default_factory=list)
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    counts: Counter[str] = field(default_factory=Counter)
    failed_ops: int = 0


@dataclass(frozen=True)
class Setup:
    key: str
    project_id: str
    premium: str  # DYNAMIC: data.plan equals premium
    active: str  # DYNAMIC, tracked, time window: triggered event "soak" within 1 day
    static: str  # STATIC list


class Client:
    """One keep-alive HTTP connection through Envoy; retries 503 and dropped connections."""

    def __init__(self, port: int, key: str, results: Results, started: float) -> None:
        self.port = port
        self.key = key
        self.results = results
        self.started = started
        self.conn: http.client.HTTPConnection | None = None

    def _connection(self) -> http.client.HTTPConnection:
        if self.conn is None:
            self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        return self.conn

    def _once(self, method: str, path: str, body: Any) -> tuple[int, bytes]:
        conn = self._connection()
        headers = {"Authorization": f"Bearer {self.key}"}
        payload = None
        if body is not None:
            payload = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        conn.request(method, path, payload, headers)
        resp = conn.getresponse()
        data = resp.read()
        if resp.getheader("connection", "").lower() == "close":
            self.close()
        return resp.status, data

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def call(self, op: str, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """The final (status, JSON body); 503s and dropped connections are retried."""
        seen: list[ErrorSeen] = []
        for attempt in range(MAX_ATTEMPTS):
            begun = time.monotonic()
            try:
                status, raw = self._once(method, path, body)
            except (OSError, http.client.HTTPException) as err:
                self.close()
                status, raw = 0, str(err).encode()
            elapsed = time.monotonic() - begun
            if status in (0, 503):
                # When the error arrived: a request begun before the kill fails at it.
                at = begun + elapsed - self.started
                seen.append(ErrorSeen(at, op, status, raw[:200].decode(errors="replace")))
                time.sleep(min(0.05 * 2**attempt, 1.0) * random.uniform(0.5, 1.0))
                continue
            with self.results.lock:
                self.results.latencies[op].append(elapsed)
                self.results.counts[op] += 1
                for error in seen:
                    error.retried_ok = status < 400
                self.results.errors.extend(seen)
                if status >= 400:
                    self.results.unexpected.append(
                        ErrorSeen(
                            begun - self.started, op, status, raw[:300].decode(errors="replace")
                        )
                    )
            try:
                return status, json.loads(raw) if raw else None
            except ValueError:
                return status, None
        with self.results.lock:
            self.results.errors.extend(seen)
            self.results.failed_ops += 1
        return 0, None


def worker(
    index: int, setup: Setup, port: int, results: Results, started: float, deadline: float
) -> None:
    rng = random.Random(index)
    client = Client(port, setup.key, results, started)
    mine: list[tuple[str, str]] = []  # (email, id) of contacts this worker created
    n = 0
    try:
        while time.monotonic() < deadline:
            n += 1
            roll = rng.random()
            if roll < 0.35 or not mine:
                email = f"w{index}-{n}@soak.example.com"
                plan = rng.choice(PLANS)
                status, body = client.call(
                    "upsert", "POST", "/contacts", {"email": email, "data": {"plan": plan, "n": n}}
                )
                if status in (200, 201):
                    mine.append((email, body["id"]))
                    with results.lock:
                        results.contacts[email] = body["id"]
            elif roll < 0.55:
                batch = f"{index}-{n}"
                events = [
                    {
                        "email": rng.choice(mine)[0]
                        if i % 2
                        else f"w{index}-e{n}-{i}@soak.example.com",
                        "event": "soak",
                        "data": {"batch": batch, "i": i},
                    }
                    for i in range(EVENT_BATCH)
                ]
                status, body = client.call("events", "POST", "/events/batch", {"events": events})
                if status == 200:
                    with results.lock:
                        results.batches[batch] = body["accepted"]
            elif roll < 0.60:
                emails = [rng.choice(mine)[0] for _ in range(MEMBER_BATCH)]
                status, _ = client.call(
                    "members", "POST", f"/segments/{setup.static}/members", {"emails": emails}
                )
                if status == 200:
                    with results.lock:
                        results.members.update(emails)
            elif roll < 0.70:
                client.call("list", "GET", "/segments")
            elif roll < 0.82:
                segment = rng.choice([setup.premium, setup.active, setup.static])
                client.call("get segment", "GET", f"/segments/{segment}")
            elif roll < 0.92:
                segment = rng.choice([setup.premium, setup.active, setup.static])
                page = rng.randint(1, 5)
                client.call("page", "GET", f"/segments/{segment}/contacts?page={page}&pageSize=20")
            else:
                email, contact_id = rng.choice(mine)
                status, body = client.call("get contact", "GET", f"/contacts/{contact_id}")
                if status == 200 and body["email"] != email:
                    with results.lock:
                        results.unexpected.append(
                            ErrorSeen(
                                time.monotonic() - started, "get contact", status, "wrong contact"
                            )
                        )
    finally:
        client.close()


# -- the run -----------------------------------------------------------------------------


def prepare(engine: Engine, port: int) -> Setup:
    with make_sessionmaker(engine).begin() as session:
        keys = create_project(session, "soak")
    results = Results()
    client = Client(port, keys["secretKey"], results, time.monotonic())

    def segment(body: dict[str, Any]) -> str:
        status, created = client.call("setup", "POST", "/segments", body)
        if status != 201:
            raise RuntimeError(f"creating a segment answered {status}: {created}")
        return str(created["id"])

    def cond(flt: dict[str, Any]) -> dict[str, Any]:
        return {"logic": "AND", "groups": [{"filters": [flt]}]}

    premium = segment(
        {
            "name": "Premium",
            "condition": cond({"field": "data.plan", "operator": "equals", "value": "premium"}),
        }
    )
    active = segment(
        {
            "name": "Active",
            "trackMembership": True,
            "condition": cond(
                {"field": "event.soak", "operator": "triggeredWithin", "value": 1, "unit": "days"}
            ),
        }
    )
    static = segment({"name": "List", "type": "STATIC"})
    client.close()
    return Setup(keys["secretKey"], keys["id"], premium, active, static)


@dataclass
class Timeline:
    kill_at: float = 0.0
    killed: float = 0.0
    restarted: float = 0.0
    healthy: float = 0.0
    killed_port: int = 0
    warm_rss: dict[int, int] = field(default_factory=dict)
    restart_rss: int = 0
    samples: list[tuple[float, dict[int, int], int]] = field(default_factory=list)


@dataclass(frozen=True)
class Step:
    """Something done to the stack during the load, once `due(seconds since the start)`;
    `act` is given a clock of seconds since the start."""

    due: Callable[[float], bool]
    act: Callable[[Callable[[], float]], None]


def drive(
    args: argparse.Namespace,
    stack: Stack,
    setup: Setup,
    results: Results,
    timeline: Timeline,
    steps: list[Step],
) -> None:
    """`args.connections` clients for `args.seconds`, the steps taken in order as they
    come due, every replica's RSS sampled every 5 s."""
    started = time.monotonic()
    deadline = started + args.seconds

    def clock() -> float:
        return time.monotonic() - started

    threads = [
        threading.Thread(
            target=worker,
            args=(i, setup, stack.http_port, results, started, deadline),
            name=f"client-{i}",
            daemon=True,
        )
        for i in range(args.connections)
    ]
    for thread in threads:
        thread.start()
    pending = list(steps)
    next_sample = 0.0
    while time.monotonic() < deadline:
        now = clock()
        if now >= next_sample:
            timeline.samples.append((now, stack.rss(), stack.envoy_rss()))
            next_sample += 5.0
        if pending and pending[0].due(now):
            pending.pop(0).act(clock)
        time.sleep(0.05)
    for thread in threads:
        thread.join(120)
    timeline.samples.append((clock(), stack.rss(), stack.envoy_rss()))


def run_load(args: argparse.Namespace, stack: Stack, setup: Setup) -> tuple[Results, Timeline]:
    results = Results()
    timeline = Timeline(kill_at=args.seconds * args.kill_at)
    warm_at = min(args.warmup, timeline.kill_at * 0.8)
    victim = stack.ports[len(stack.ports) // 2]
    timeline.killed_port = victim

    def warm(clock: Callable[[], float]) -> None:
        timeline.warm_rss = stack.rss()
        log(f"warmed up at {clock():.1f} s: {len(results.contacts)} contacts so far")

    def kill(clock: Callable[[], float]) -> None:
        stack.kill(victim)
        timeline.killed = clock()
        log(f"killed the replica on port {victim} (SIGKILL) at {timeline.killed:.1f} s")

    def restart(clock: Callable[[], float]) -> None:
        stack.start_replica(victim)
        timeline.restarted = clock()
        stack.wait_healthy(victim)
        timeline.healthy = clock()
        log(f"restarted it at {timeline.restarted:.1f} s, serving at {timeline.healthy:.1f} s")

    steps = [
        Step(lambda now: now >= warm_at, warm),
        Step(lambda now: now >= timeline.kill_at, kill),
        Step(lambda now: now >= timeline.killed + args.down_seconds, restart),
    ]
    drive(args, stack, setup, results, timeline, steps)
    return results, timeline


# -- the checks --------------------------------------------------------------------------


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


@dataclass(frozen=True)
class Stored:
    """What the database holds of the writes the clients make."""

    contacts: dict[str, str]  # email -> contact id
    batches: dict[str, int]  # batch id -> events stored
    members: set[str]  # emails in the static list


def stored_writes(engine: Engine, setup: Setup) -> Stored:
    p = {"p": setup.project_id}
    with engine.connect() as conn:
        contacts: dict[str, str] = dict(
            conn.execute(
                text("SELECT email, id::text FROM contacts WHERE project_id = :p"), p
            ).all()
        )
        batches: dict[str, int] = dict(
            conn.execute(
                text(
                    "SELECT data->>'batch', count(*) FROM events WHERE project_id = :p "
                    "AND name = 'soak' GROUP BY 1"
                ),
                p,
            ).all()
        )
        members = {
            row[0]
            for row in conn.execute(
                text(
                    "SELECT c.email FROM static_members m JOIN contacts c "
                    "ON c.project_id = m.project_id AND c.id = m.contact_id "
                    "WHERE m.project_id = :p AND m.segment_id = :s"
                ),
                {**p, "s": setup.static},
            )
        }
    return Stored(contacts, batches, members)


def verify(
    args: argparse.Namespace,
    stack: Stack,
    engine: Engine,
    setup: Setup,
    results: Results,
    timeline: Timeline,
) -> list[Check]:
    checks: list[Check] = []
    p = {"p": setup.project_id}
    written = stored_writes(engine, setup)
    stored, batch_counts, static_members = written.contacts, written.batches, written.members
    with engine.connect() as conn:
        premium_sql = conn.execute(
            text(
                "SELECT count(*) FROM contacts WHERE project_id = :p AND data->'plan' = '\"premium\"'"
            ),
            p,
        ).scalar_one()
        active_sql = conn.execute(
            text(
                "SELECT count(DISTINCT contact_id) FROM events WHERE project_id = :p "
                "AND name = 'soak' AND occurred_at >= now() - interval '1 day'"
            ),
            p,
        ).scalar_one()
        entries = conn.execute(
            text(
                "SELECT contact_id, count(*) FROM events WHERE project_id = :p "
                "AND name = 'segment.active.entry' GROUP BY 1"
            ),
            p,
        ).all()
        exits = conn.execute(
            text(
                "SELECT count(*) FROM events WHERE project_id = :p AND name = 'segment.active.exit'"
            ),
            p,
        ).scalar_one()
        materialized: dict[str, int] = dict(
            conn.execute(
                text(
                    "SELECT segment_id::text, count(*) FROM segment_members WHERE project_id = :p "
                    "GROUP BY 1"
                ),
                p,
            ).all()
        )

    # Zero lost writes.
    lost_contacts = [e for e, i in results.contacts.items() if stored.get(e) != i]
    lost_batches = [b for b, n in results.batches.items() if batch_counts.get(b, 0) < n]
    duplicated = len([b for b, n in results.batches.items() if batch_counts.get(b, 0) > n])
    lost_members = sorted(results.members - static_members)
    checks.append(
        Check(
            "zero lost writes",
            not (lost_contacts or lost_batches or lost_members),
            f"{len(results.contacts)} upserts, {len(results.batches)} event batches "
            f"({sum(results.batches.values())} events), {len(results.members)} list members "
            f"acknowledged; missing: {len(lost_contacts)} contacts, {len(lost_batches)} "
            f"batches, {len(lost_members)} members"
            + (
                f"; {duplicated} batches stored twice (a retried 503 had committed)"
                if duplicated
                else ""
            ),
        )
    )

    # Errors: only 503s/dropped connections inside the kill window, each retried to success.
    window = (timeline.killed - 0.5, timeline.healthy + WINDOW_GRACE)
    outside = [e for e in results.errors if not window[0] <= e.at <= window[1]]
    not_retried = [e for e in results.errors if not e.retried_ok]
    by_status = Counter(e.status for e in results.errors)
    kinds = ", ".join(
        f"{n}x {status or 'dropped connection'}" for status, n in sorted(by_status.items())
    )
    shown = "".join(
        f"\n      {e.at:.1f} s {e.op} {e.status}: {e.detail[:160]}"
        for e in (outside + results.unexpected)[:8]
    )
    checks.append(
        Check(
            "only retried 503s in the kill window",
            not (outside or not_retried or results.unexpected or results.failed_ops),
            f"{len(results.errors)} retried errors ({kinds or 'none'}) "
            f"in [{window[0]:.1f} s, {window[1]:.1f} s]; outside it: {len(outside)}; "
            f"not recovered: {len(not_retried)}; other errors: {len(results.unexpected)}; "
            f"gave up: {results.failed_ops}{shown}",
        )
    )

    # Member counts: the API's memberCount against SQL.
    client = Client(stack.http_port, setup.key, Results(), time.monotonic())
    api_counts = {}
    for name, segment in (
        ("Premium", setup.premium),
        ("Active", setup.active),
        ("List", setup.static),
    ):
        status, body = client.call("verify", "GET", f"/segments/{segment}")
        api_counts[name] = body["memberCount"] if status == 200 else None
    client.close()
    expected = {
        "Premium": premium_sql,
        "Active": active_sql,
        "List": len(static_members),
    }
    entry_counts = Counter(n for _, n in entries)
    exactly_once = set(entry_counts) <= {1} and len(entries) == active_sql and exits == 0
    checks.append(
        Check(
            "member counts equal SQL counts",
            api_counts == expected
            and materialized.get(setup.premium, 0) == premium_sql
            and materialized.get(setup.active, 0) == active_sql
            and exactly_once,
            f"memberCount {api_counts}, SQL {expected}; tracked segment: {len(entries)} "
            f"contacts with entry events ({dict(entry_counts)} by number of entries), "
            f"{exits} exits",
        )
    )

    # Memory: end RSS against warm-up RSS (the restarted replica: against its own start).
    end_rss = timeline.samples[-1][1]
    lines = []
    flat = True
    for port in stack.ports:
        if port == timeline.killed_port:
            restart_samples = [
                s[1][port] for s in timeline.samples if s[0] > timeline.healthy + 5 and port in s[1]
            ]
            base = restart_samples[0] if restart_samples else end_rss.get(port, 0)
            label = "restarted"
        else:
            base = timeline.warm_rss.get(port, 0)
            label = "survivor"
        end = end_rss.get(port, 0)
        limit = base + max(args.rss_growth_mb << 20, int(base * args.rss_growth_ratio))
        ok = end <= limit
        flat = flat and ok
        lines.append(
            f"replica {port} ({label}): {base / 2**20:.0f} MiB -> {end / 2**20:.0f} MiB "
            f"(limit {limit / 2**20:.0f} MiB){'' if ok else '  <-- grew'}"
        )
    lines.append(
        f"envoy: {timeline.samples[0][2] / 2**20:.0f} MiB -> {timeline.samples[-1][2] / 2**20:.0f} MiB"
    )
    checks.append(Check("memory flat", flat, "\n      ".join(lines)))
    return checks


def summary(args: argparse.Namespace, results: Results, timeline: Timeline, elapsed: float) -> None:
    total = sum(results.counts.values())
    log(
        f"{total} requests in {elapsed:.1f} s ({total / elapsed:.0f}/s) over "
        f"{args.connections} connections"
    )
    for op in sorted(results.latencies):
        values = sorted(results.latencies[op])
        p50 = statistics.median(values) * 1000
        p99 = values[min(len(values) - 1, int(len(values) * 0.99))] * 1000
        print(f"    {op:<12} {len(values):>7}  p50 {p50:7.1f} ms  p99 {p99:7.1f} ms")
    print("    RSS (MiB) over time:")
    for at, rss, envoy in timeline.samples:
        cells = "  ".join(f"{port}:{value / 2**20:5.0f}" for port, value in sorted(rss.items()))
        print(f"      {at:5.1f} s  {cells}  envoy:{envoy / 2**20:4.0f}")


def add_load_arguments(parser: argparse.ArgumentParser, *, connections: int) -> None:
    """The options of a stack under load, shared with the failover drill."""
    parser.add_argument("--seconds", type=float, default=60.0, help="load duration (60)")
    parser.add_argument(
        "--connections",
        type=int,
        default=connections,
        help=f"concurrent clients ({connections})",
    )
    parser.add_argument("--replicas", type=int, default=3, help="gRPC server processes (3)")
    parser.add_argument(
        "--rss-growth-mb", type=int, default=64, help="allowed RSS growth per replica (MiB)"
    )
    parser.add_argument(
        "--rss-growth-ratio", type=float, default=0.5, help="or this fraction of the baseline"
    )
    parser.add_argument(
        "--sweep-seconds", type=float, default=5.0, help="replicas' sweeper period (5)"
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_load_arguments(parser, connections=64)
    parser.add_argument(
        "--kill-at", type=float, default=0.5, help="when to kill, as a fraction of --seconds"
    )
    parser.add_argument(
        "--down-seconds", type=float, default=3.0, help="how long the killed replica stays down"
    )
    parser.add_argument("--warmup", type=float, default=10.0, help="RSS baseline time (s)")
    parser.add_argument(
        "--database-url", default=None, help="PostgreSQL server (default: DATABASE_URL or embedded)"
    )
    parser.add_argument("--keep-database", action="store_true", help="do not drop it afterwards")
    args = parser.parse_args(argv)
    if args.replicas < 2:
        parser.error("--replicas must be at least 2 (one is killed)")
    if not 0 < args.kill_at < 1:
        parser.error("--kill-at must be between 0 and 1")
    return args


@contextlib.contextmanager
def running_stack(args: argparse.Namespace) -> Iterator[Stack]:
    with tempfile.TemporaryDirectory(prefix="segments-soak-") as tmp:
        stack = Stack(args, Path(tmp))
        try:
            stack.start()
            yield stack
        finally:
            stack.stop()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    log(
        f"{args.seconds:.0f} s, {args.connections} connections, {args.replicas} replicas; "
        f"one replica killed at {args.seconds * args.kill_at:.0f} s for {args.down_seconds:.0f} s"
    )
    with running_stack(args) as stack:
        engine = make_engine(stack.url, pool_size=2)
        try:
            setup = prepare(engine, stack.http_port)
            started = time.monotonic()
            results, timeline = run_load(args, stack, setup)
            elapsed = time.monotonic() - started
            summary(args, results, timeline, elapsed)
            checks = verify(args, stack, engine, setup, results, timeline)
        finally:
            engine.dispose()
    for check in checks:
        print(f"  {'PASS' if check.ok else 'FAIL'}  {check.name}: {check.detail}")
    failed = [c.name for c in checks if not c.ok]
    log("soak passed" if not failed else f"soak FAILED: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
