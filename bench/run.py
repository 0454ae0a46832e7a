"""`make bench`: load (or reuse) a seeded dataset on PostgreSQL, run the service as a separate
process behind Envoy, measure, print a table and write bench/results.json.

Phases, in order (one server process and one Envoy for all of them):
1. trivial RPCs (GetContact over gRPC and REST): the per-request cost of the stack;
2. scenarios: each condition becomes a segment (creation timed), the database settles
   (see settle()), then, side by side in interleaved runs: the compiled count, the
   hand-written SQL count (same answer asserted), GetSegment over gRPC and REST, the
   first page and page 100 of contacts;
3. the scale curve: the same segments in the smaller projects, the database settles, then
   the compiled and hand counts at 100k / 300k / 1M contacts side by side;
4. ListSegments with 50 segments in the project;
5. ExportSegmentContacts of a segment holding every contact;
6. the cost of one sweep of time-dependent segments (informational);
7. ingestion with every segment present (informational);
8. the main project's segments are deleted;
9. ingestion: five tracked segments, IngestEvents in batches of 1,000 from several
   clients (throughput), then a paced 1,000 events/s stream whose entry events are timed
   through WatchSegmentEvents (tracking latency);
10. noisy neighbour: a small project's REST latency while the main project holds many
   streams, then runs heavy counts; the main project's upserts during a build of every
   contact (bench/noisy.py).
`--phases` runs a subset (e.g. `--phases noisy`); its results go to a file of their own.
The server's RSS is sampled every 50 ms throughout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import threading
import time
import traceback
import uuid
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import psutil
from google.protobuf import json_format, struct_pb2
from sqlalchemy import Engine, create_engine, event, func, select, text
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from bench import load, noisy, scenarios
from bench.measure import median, percentile, summary, timed
from bench.stack import ROOT, Envoy, Rest, Sampler, Server
from segments.v1 import (
    contacts_pb2,
    events_pb2,
    events_pb2_grpc,
    resources_pb2,
    segments_pb2,
    segments_pb2_grpc,
)
from segments_service import auth, database, segments, sweeper
from segments_service.filters import parse_condition

GENERATOR_VERSION = 3
DEFAULT_CONTACTS = 1_000_000
PAGE_SIZE = 20
LIMITS = {
    "compiled_vs_hand_sql": 1.5,
    "rest_get_segment_factor": 1.2,
    "list_segments_vs_trivial": 20.0,
    "ingest_events_per_second": 20_000.0,
    "tracking_latency_p95_seconds": 2.0,
    "server_rss_mb": 300.0,
    "count_growth": 1.0,
}
PHASES = (
    "trivial",
    "scenarios",
    "scale",
    "list",
    "export",
    "sweep",
    "ingestion_all",
    "delete",
    "ingestion",
    "noisy",
)
# What a phase takes from an earlier one: run along with it.
PHASE_NEEDS = {"scenarios": ("trivial",), "list": ("trivial",), "scale": ("scenarios",)}
# The phases each target is measured in.
TARGET_PHASES = {
    "compiled_vs_hand_sql": "scenarios",
    "rest_get_segment_vs_query": "scenarios",
    "list_segments_vs_trivial": "list",
    "ingest_events_per_second": "ingestion",
    "tracking_latency_p95_seconds": "ingestion",
    "server_rss_mb": "export",
    "count_growth": "scale",
}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- arguments and database -----------------------------------------------------------


def size_label(n: int) -> str:
    if n % 1_000_000 == 0:
        return f"{n // 1_000_000}m"
    if n % 1_000 == 0:
        return f"{n // 1_000}k"
    return str(n)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    d = p.add_argument_group("dataset")
    d.add_argument("--contacts", type=int, default=DEFAULT_CONTACTS, help="main project size")
    d.add_argument("--events", type=int, help="custom events in the main project (10 x contacts)")
    d.add_argument("--email-events", type=int, help="email-activity events (3 x contacts)")
    d.add_argument("--other-projects", type=int, default=2, help="other tenants (2)")
    d.add_argument("--other-contacts", type=int, help="contacts per other tenant (contacts / 10)")
    d.add_argument(
        "--scale", help="comma-separated scale-curve sizes below --contacts (contacts/10, 3/10)"
    )
    d.add_argument("--seed", type=float, default=0.42, help="PostgreSQL setseed() value")
    d.add_argument(
        "--database-url",
        help="PostgreSQL server to use (any database on it; the bench creates its own). "
        "Default: the embedded PostgreSQL in .data/",
    )
    d.add_argument("--database-name", help="default: segments_bench_<size>")
    d.add_argument("--reload", action="store_true", help="drop and reload the dataset")
    d.add_argument("--load-only", action="store_true", help="load the dataset, measure nothing")
    m = p.add_argument_group("measurements")
    m.add_argument("--runs", type=int, default=5, help="timed runs per measurement (median)")
    m.add_argument(
        "--count-seconds",
        type=float,
        default=3.0,
        help="SQL counts: more runs than --runs (up to 25) until their rounds took this long",
    )
    m.add_argument(
        "--ingest-events",
        type=int,
        default=600_000,
        help="events in the throughput run (about 30 s at the target rate)",
    )
    m.add_argument("--ingest-workers", type=int, default=4, help="concurrent IngestEvents callers")
    m.add_argument("--tracking-seconds", type=float, default=30.0)
    m.add_argument("--tracking-rate", type=int, default=1000, help="events per second")
    m.add_argument("--tracking-batch", type=int, default=100, help="events per paced batch")
    m.add_argument("--list-segments", type=int, default=50)
    m.add_argument(
        "--sweep-seconds",
        type=float,
        default=60.0,
        help="the server's SEGMENTS_SWEEP_SECONDS (60, the product default)",
    )
    m.add_argument(
        "--phases",
        default=",".join(PHASES),
        help="comma-separated phases to run, with those they need (default: all): "
        + ", ".join(PHASES),
    )
    n_ = p.add_argument_group("noisy neighbour (bench/noisy.py)")
    n_.add_argument("--noisy-seconds", type=float, default=15.0, help="each measurement window")
    n_.add_argument("--noisy-streams", type=int, default=32, help="main project's open streams")
    n_.add_argument("--noisy-counts", type=int, default=16, help="main project's heavy counts")
    n_.add_argument(
        "--noisy-rate", type=float, default=20.0, help="small project's requests/s per endpoint"
    )
    n_.add_argument("--noisy-timeout", type=float, default=10.0, help="one probe request, s")
    n_.add_argument(
        "--noisy-build-timeout", type=float, default=900.0, help="the build of every contact, s"
    )
    m.add_argument(
        "--output", type=Path, help="default: bench/results.json (1M) else -<size>[-<phases>]"
    )
    args = p.parse_args(argv)
    requested = [x.strip() for x in args.phases.split(",") if x.strip()]
    unknown = sorted(set(requested) - set(PHASES))
    if unknown or not requested:
        p.error(f"--phases: unknown {', '.join(unknown) or '(none given)'}; known: {PHASES}")
    phases = set(requested)
    while extra := {need for name in phases for need in PHASE_NEEDS.get(name, ())} - phases:
        phases |= extra
    args.phases = [name for name in PHASES if name in phases]
    args.subset = "" if len(args.phases) == len(PHASES) else "-".join(requested)
    n = args.contacts
    args.events = args.events if args.events is not None else 10 * n
    args.email_events = args.email_events if args.email_events is not None else 3 * n
    args.other_contacts = args.other_contacts or max(n // 10, 1)
    args.scale = (
        sorted({int(x) for x in args.scale.split(",") if x.strip()})
        if args.scale
        else sorted({max(n // 10, 1), max(3 * n // 10, 1)})
    )
    args.scale = [s for s in args.scale if s < n]
    label = size_label(n)
    args.database_name = args.database_name or f"segments_bench_{label}"
    if args.output is None:
        # A subset never overwrites a whole run's results.
        stem = "results" if n == DEFAULT_CONTACTS else f"results-{label}"
        name = f"{stem}-{args.subset}.json" if args.subset else f"{stem}.json"
        args.output = ROOT / "bench" / name
    return args


def with_database(url: str, name: str) -> str:
    """A plain postgresql:// URL for database `name` on the server of `url`."""
    rendered = make_url(database.sqlalchemy_url(url)).set(database=name).render_as_string(False)
    return rendered.replace("postgresql+psycopg://", "postgresql://", 1)


def bench_engine(url: str) -> Engine:
    """The bench's own connections: UTC, no statement timeout, no server-side prepared
    statements (so every run plans afresh, as a one-off query would)."""
    engine = create_engine(
        database.sqlalchemy_url(url),
        pool_size=2,
        connect_args={
            "application_name": "segments-bench",
            "options": "-c timezone=UTC -c statement_timeout=0",
            "prepare_threshold": None,
        },
    )

    @event.listens_for(engine, "before_cursor_execute", retval=True)
    def _explain(
        conn: Any, _cursor: Any, statement: str, parameters: Any, _ctx: Any, _many: bool
    ) -> tuple[str, Any]:
        if conn.info.get("explain"):
            statement = "EXPLAIN (ANALYZE, BUFFERS) " + statement
        return statement, parameters

    return engine


@dataclass
class Env:
    args: argparse.Namespace
    url: str
    engine: Engine
    sessions: sessionmaker[Session]
    dataset: load.Dataset
    keys: dict[str, str] = field(default_factory=dict)


def prepare_dataset(args: argparse.Namespace) -> tuple[str, load.Dataset, Any]:
    """Reuse the stored dataset when it was made with the same flags, else load it."""
    handle = None
    if args.database_url:
        admin = args.database_url
    else:
        data_dir = Path(os.environ.get("SEGMENTS_DATA_DIR", ROOT / ".data")).resolve()
        handle = database.start_embedded(data_dir)
        admin = handle.get_uri()
    url = with_database(admin, args.database_name)
    params = {
        "generator": GENERATOR_VERSION,
        "contacts": args.contacts,
        "events": args.events,
        "email_events": args.email_events,
        "other_projects": args.other_projects,
        "other_contacts": args.other_contacts,
        "scale": args.scale,
        "seed": args.seed,
    }
    existing = None
    if not args.reload:
        try:
            existing = load.read_dataset(url)
        except Exception:
            existing = None
    if existing is not None and existing.params == params:
        log(f"reusing dataset in database {args.database_name} (loaded {existing.anchor})")
        database.migrate(url)
        load.reset(url, existing, log)
        return url, existing, handle
    log(f"loading dataset into database {args.database_name} ...")
    database.drop_database(database.sqlalchemy_url(admin), args.database_name)
    database.create_database(database.sqlalchemy_url(admin), args.database_name)
    database.migrate(url)
    engine = database.make_engine(url, pool_size=1, application_name="segments-bench-load")
    sessions = database.make_sessionmaker(engine)

    def create_project(name: str) -> str:
        with sessions.begin() as session:
            return auth.create_project(session, name)["id"]

    specs = load.plan_projects(
        args.contacts,
        args.events,
        args.email_events,
        args.other_projects,
        args.other_contacts,
        args.scale,
    )
    try:
        dataset = load.load(
            url, specs, seed=args.seed, create_project=create_project, params=params, log=log
        )
    finally:
        engine.dispose()
    load.write_dataset(url, dataset)
    log(
        f"loaded {sum(p.contacts for p in dataset.projects):,} contacts and "
        f"{sum(p.events + p.email_events for p in dataset.projects):,} events in "
        f"{dataset.load_seconds:.0f} s ({dataset.rows_per_second:,.0f} rows/s)"
    )
    return url, dataset, handle


# --- small helpers ----------------------------------------------------------------------


def md(key: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {key}"),)


def condition_proto(condition: dict[str, Any]) -> resources_pb2.FilterCondition:
    return json_format.ParseDict(condition, resources_pb2.FilterCondition())


def db_now(engine: Engine) -> datetime:
    with engine.connect() as conn:
        now: datetime = conn.execute(text("SELECT clock_timestamp()")).scalar_one()
    return now


@contextmanager
def explaining(conn: Connection) -> Iterator[None]:
    conn.info["explain"] = True
    try:
        yield
    finally:
        conn.info["explain"] = False


def plan_text(rows: Sequence[Any]) -> str:
    return "\n".join(str(r[0]) for r in rows)


def plan_head(plan: str, lines: int = 14) -> list[str]:
    return plan.splitlines()[:lines]


# --- phases -------------------------------------------------------------------------------


@dataclass
class Stack:
    server: Server
    envoy: Envoy
    sampler: Sampler

    def rest(self, key: str) -> Rest:
        return Rest(self.envoy.http_port, key)


def issue_keys(env: Env) -> None:
    with env.sessions.begin() as session:
        for project in env.dataset.projects:
            env.keys[project.tag] = auth.issue_key(session, uuid.UUID(project.id), "secret")


def trivial(env: Env, stack: Stack, runs: int) -> dict[str, Any]:
    """GetContact: authenticate, read one row by primary key, answer."""
    main = env.dataset.project("main")
    with env.engine.connect() as conn:
        contact_id = str(
            conn.execute(
                text("SELECT id FROM contacts WHERE project_id = :p ORDER BY id LIMIT 1"),
                {"p": main.id},
            ).scalar_one()
        )
    key = env.keys["main"]
    rest = stack.rest(key)
    request = contacts_pb2.GetContactRequest(id=contact_id)
    grpc_ms: list[float] = []
    rest_ms: list[float] = []
    for i in range(runs + 20):
        g, _ = timed(lambda: stack.server.contacts.GetContact(request, metadata=md(key)))
        r, _ = timed(lambda: rest.get(f"/contacts/{contact_id}"))
        if i >= 20:
            grpc_ms.append(g)
            rest_ms.append(r)
    rest.close()
    return {
        "rpc": "GetContact / GET /contacts/{id}",
        "contact_id": contact_id,
        "grpc_ms": summary(grpc_ms),
        "rest_ms": summary(rest_ms),
    }


def create_segment(
    stack: Stack, key: str, name: str, condition: dict[str, Any], *, track: bool = False
) -> tuple[float, Any]:
    request = segments_pb2.CreateSegmentRequest(
        name=name, condition=condition_proto(condition), track_membership=track
    )
    return timed(
        lambda: stack.server.segments.CreateSegment(request, metadata=md(key), timeout=900)
    )


def sample_emails(env: Env, tag: str, limit: int, *, descending: bool = False) -> list[str]:
    project = env.dataset.project(tag)
    order = "DESC" if descending else "ASC"
    with env.engine.connect() as conn:
        return list(
            conn.execute(
                text(
                    f"SELECT email FROM contacts WHERE project_id = :p "
                    f"AND email NOT LIKE '%@{load.NEW_CONTACT_DOMAIN}' ORDER BY id {order} "
                    "LIMIT :n"
                ),
                {"p": project.id, "n": limit},
            ).scalars()
        )


def event_names(rng: random.Random, n: int) -> list[str]:
    names = load.EVENT_NAMES
    return [names[int(len(names) * rng.random() ** 2.2)] for _ in range(n)]


def ingest_item(email: str, name: str, rng: random.Random) -> events_pb2.IngestedEvent:
    item = events_pb2.IngestedEvent(email=email, event=name)
    if name == "purchase":
        data = struct_pb2.Struct()
        data.update({"amount": round(5 + rng.random() * 200, 2), "currency": "USD"})
        item.data.CopyFrom(data)
    return item


def build_batches(
    emails: Sequence[str], total: int, batch: int, rng: random.Random, run_tag: str
) -> list[events_pb2.IngestEventsRequest]:
    """Batches of random events: 98% for existing contacts, 2% for new ones."""
    requests = []
    names = event_names(rng, total)
    for start in range(0, total, batch):
        items = []
        for i in range(start, min(start + batch, total)):
            if rng.random() < 0.02:
                email = f"ingest-{run_tag}-{i}@{load.NEW_CONTACT_DOMAIN}"
            else:
                email = emails[rng.randrange(len(emails))]
            items.append(ingest_item(email, names[i], rng))
        requests.append(events_pb2.IngestEventsRequest(events=items))
    return requests


RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED)


def ingest_with_retries(
    stub: events_pb2_grpc.EventServiceStub,
    request: events_pb2.IngestEventsRequest,
    key: str,
    attempts: int = 5,
) -> tuple[Any, list[str]]:
    """IngestEvents as a well-behaved client does it: UNAVAILABLE ("retry the request") and
    ABORTED are retried after a short pause. Answers (reply or None, problems seen)."""
    problems: list[str] = []
    for attempt in range(attempts):
        try:
            return stub.IngestEvents(request, metadata=md(key), timeout=300), problems
        except grpc.RpcError as err:
            problems.append(f"{err.code()}: {err.details()}")
            if err.code() not in RETRYABLE or attempt == attempts - 1:
                break
            time.sleep(0.05 * (attempt + 1))
    return None, problems


def throughput(
    stack: Stack, key: str, requests: Sequence[events_pb2.IngestEventsRequest], workers: int
) -> dict[str, Any]:
    """IngestEvents from `workers` concurrent callers until every batch is in."""
    queue = list(requests)
    lock = threading.Lock()
    done: list[tuple[float, float, int]] = []
    errors: list[str] = []
    retried: list[str] = []

    def worker() -> None:
        channel = stack.server.new_channel()
        stub = events_pb2_grpc.EventServiceStub(channel)
        try:
            while True:
                with lock:
                    if not queue or errors:
                        return
                    request = queue.pop(0)
                start = time.perf_counter()
                reply, problems = ingest_with_retries(stub, request, key)
                with lock:
                    retried.extend(problems)
                    if reply is None:
                        errors.append(problems[-1])
                        return
                    done.append((start, time.perf_counter(), reply.accepted))
        finally:
            channel.close()

    started = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    if errors:
        raise RuntimeError(f"IngestEvents failed: {errors[0]}")
    accepted = sum(n for _s, _e, n in done)
    # Throughput in 5-second windows, to show whether it is sustained.
    windows: dict[int, int] = {}
    for _s, end, n in done:
        windows[int((end - started) // 5)] = windows.get(int((end - started) // 5), 0) + n
    full = [v / 5 for k, v in sorted(windows.items()) if (k + 1) * 5 <= elapsed]
    return {
        "events": accepted,
        "batches": len(done),
        "retried_batches": len(retried),
        "retry_reasons": sorted(set(retried))[:5],
        "batch_size": len(requests[0].events) if requests else 0,
        "workers": workers,
        "seconds": round(elapsed, 2),
        "events_per_second": round(accepted / elapsed),
        "events_per_second_5s_windows": [round(v) for v in full],
        "batch_ms": summary([(e - s) * 1000 for s, e, _n in done], 1),
    }


def tracking(
    env: Env,
    stack: Stack,
    key: str,
    segment_id: str,
    rate: int,
    batch: int,
    seconds: float,
) -> dict[str, Any]:
    """A paced stream of `rate` events/s; every tenth event is a purchase of a contact that is
    not in `segment_id` (recent buyers) yet. Latency: submit of the batch carrying it ->
    its entry event read from WatchSegmentEvents."""
    rng = random.Random(7)
    batches = max(1, int(seconds * rate / batch))
    probes_per_batch = max(1, batch // 10)
    main = env.dataset.project("main")
    with env.engine.connect() as conn:
        probes = list(
            conn.execute(
                text(
                    "SELECT c.email FROM contacts c WHERE c.project_id = :p AND NOT EXISTS ("
                    " SELECT 1 FROM segment_members m WHERE m.project_id = :p"
                    " AND m.segment_id = :s AND m.contact_id = c.id)"
                    f" AND c.email NOT LIKE '%@{load.NEW_CONTACT_DOMAIN}'"
                    " ORDER BY c.id DESC LIMIT :n"
                ),
                {"p": main.id, "s": segment_id, "n": batches * probes_per_batch + 10},
            ).scalars()
        )
    sentinels, probes = probes[:10], probes[10:]
    background = sample_emails(env, "main", 200_000)
    names = [n for n in event_names(rng, batches * batch) if n != "purchase"]
    requests: list[tuple[events_pb2.IngestEventsRequest, list[str]]] = []
    p = 0
    for b in range(batches):
        items, probe_emails = [], []
        for i in range(batch):
            if i % (batch // probes_per_batch) == 0 and p < len(probes):
                email = probes[p]
                p += 1
                probe_emails.append(email)
                items.append(ingest_item(email, "purchase", rng))
            else:
                name = names[(b * batch + i) % len(names)]
                items.append(ingest_item(background[rng.randrange(len(background))], name, rng))
        requests.append((events_pb2.IngestEventsRequest(events=items), probe_emails))

    sent: dict[str, float] = {}
    seen: dict[str, float] = {}
    lock = threading.Lock()
    channel = stack.server.new_channel()
    stub = segments_pb2_grpc.SegmentServiceStub(channel)
    # "From now on": the stream starts after whatever was recorded when it began.
    call = stub.WatchSegmentEvents(
        segments_pb2.WatchSegmentEventsRequest(segment_ids=[segment_id]), metadata=md(key)
    )
    stream_errors: list[str] = []

    def watch() -> None:
        try:
            for ev in call:
                if ev.kind == segments_pb2.SegmentEvent.ENTRY:
                    with lock:
                        seen.setdefault(ev.email, time.perf_counter())
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.CANCELLED:
                stream_errors.append(f"{err.code()}: {err.details()}")

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    errors: list[str] = []
    batch_ms: list[float] = []
    send_channel = stack.server.new_channel()
    sender = events_pb2_grpc.EventServiceStub(send_channel)

    # Handshake: a sentinel entry proves the stream is live before anything is timed.
    for sentinel in sentinels:
        sender.IngestEvents(
            events_pb2.IngestEventsRequest(events=[ingest_item(sentinel, "purchase", rng)]),
            metadata=md(key),
            timeout=60,
        )
        deadline = time.perf_counter() + 5
        while time.perf_counter() < deadline and sentinel not in seen and not stream_errors:
            time.sleep(0.05)
        if sentinel in seen or stream_errors:
            break
    if stream_errors or not any(s in seen for s in sentinels):
        call.cancel()
        raise RuntimeError(
            "WatchSegmentEvents delivered no entry event for the sentinel contacts: "
            + (stream_errors[0] if stream_errors else "nothing within 5 s, ten times")
        )
    with lock:
        seen.clear()

    retried: list[str] = []

    def send(request: events_pb2.IngestEventsRequest) -> None:
        start = time.perf_counter()
        reply, problems = ingest_with_retries(sender, request, key)
        retried.extend(problems)
        if reply is None:
            errors.append(problems[-1])
        batch_ms.append((time.perf_counter() - start) * 1000)

    interval = batch / rate
    pool = ThreadPoolExecutor(max_workers=16)
    start = time.perf_counter() + 0.5
    late = 0
    for b, (request, probe_emails) in enumerate(requests):
        target = start + b * interval
        delay = target - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        else:
            late += 1
        now = time.perf_counter()
        with lock:
            for email in probe_emails:
                sent[email] = now
        pool.submit(send, request)
    pool.shutdown(wait=True)
    send_seconds = time.perf_counter() - start
    deadline = time.perf_counter() + 15
    while time.perf_counter() < deadline:
        with lock:
            if all(e in seen for e in sent):
                break
        time.sleep(0.1)
    call.cancel()
    watcher.join(5)
    channel.close()
    send_channel.close()
    if errors:
        raise RuntimeError(f"IngestEvents failed during the tracking run: {errors[0]}")
    if stream_errors:
        raise RuntimeError(f"WatchSegmentEvents failed: {stream_errors[0]}")
    latencies = [seen[e] - t for e, t in sent.items() if e in seen]
    missing = [e for e in sent if e not in seen]
    return {
        "target_rate": rate,
        "achieved_rate": round(batches * batch / send_seconds),
        "batch_size": batch,
        "seconds": round(send_seconds, 1),
        "probes": len(sent),
        "observed": len(latencies),
        "missing": len(missing),
        "late_batches": late,
        "retried_batches": len(retried),
        "retry_reasons": sorted(set(retried))[:5],
        "latency_s": {
            "median": round(percentile(latencies, 50), 3),
            "p95": round(percentile(latencies, 95), 3),
            "p99": round(percentile(latencies, 99), 3),
            "max": round(max(latencies, default=float("nan")), 3),
        },
        "batch_ms": summary(batch_ms, 1),
    }


@dataclass
class Measured:
    """A scenario's segment in one project, with its compiled statement."""

    scenario: scenarios.Scenario
    segment_id: str
    create_ms: float
    members: int
    statement: Any
    compile_ms: float
    # SELECT count(*) over the member ids, the statement a create or rebuild runs.
    ids_statement: Any = None


def compile_count(env: Env, project_id: str, condition: dict[str, Any], now: datetime) -> Any:
    """The statement CountMatchingContacts runs for the condition."""
    with env.sessions() as session:
        return segments.member_count_statement(
            session, uuid.UUID(project_id), parse_condition(condition), now
        )


def compile_ids_count(env: Env, project_id: str, condition: dict[str, Any], now: datetime) -> Any:
    """SELECT count(*) over the member ids a create or rebuild computes for the condition."""
    with env.sessions() as session:
        members = segments.member_ids(
            session, uuid.UUID(project_id), parse_condition(condition), now
        )
    return select(func.count()).select_from(members.subquery())


def create_scenarios(env: Env, stack: Stack, tag: str, now: datetime) -> list[Measured]:
    project = env.dataset.project(tag)
    key = env.keys[tag]
    ids: dict[str, str] = {}
    out = []
    for sc in scenarios.SCENARIOS:
        condition = sc.resolved(ids)
        ms, segment = create_segment(stack, key, f"Scenario {sc.name}", condition)
        ids[sc.name] = segment.id
        compile_ms, statement = timed(partial(compile_count, env, project.id, condition, now))
        counted_ids = compile_ids_count(env, project.id, condition, now)
        out.append(
            Measured(sc, segment.id, ms, segment.member_count, statement, compile_ms, counted_ids)
        )
        log(f"    {tag}: created {sc.name:<24} {segment.member_count:>9,} members in {ms:8.0f} ms")
    return out


def _statements(
    m: Measured, project_id: str, now: datetime
) -> dict[str, Callable[[Connection], Any]]:
    """The three counts of a scenario in a project: compiled, hand-written, over the ids."""
    params = {"p": project_id, "now": now}
    hand = text(m.scenario.hand_sql)
    return {
        "compiled": lambda conn: conn.execute(m.statement).scalar_one(),
        "hand": lambda conn: conn.execute(hand, params).scalar_one(),
        "ids": lambda conn: conn.execute(m.ids_statement).scalar_one(),
    }


def _prepare(conn: Connection, which: str) -> None:
    """Settings for one statement, in the transaction it runs in (untimed):
    CountMatchingContacts' for the compiled count and the hand-written count it is compared
    with; the ids statement keeps the server's (what rebuilds use)."""
    if which in ("compiled", "hand"):
        conn.execute(segments.COUNT_SETTINGS)


# Short statements get more runs than --runs: rounds go on until this many, or until the
# rounds after the warm-up took --count-seconds. The host's pace changes within seconds
# (runs of one statement 2x apart), which five runs of a 20 ms count do not outvote.
MAX_COUNT_RUNS = 25


def count_side_by_side(
    env: Env, cases: Sequence[tuple[str, Measured]], now: datetime, runs: int, warmup: int = 1
) -> list[dict[str, Any]]:
    """The compiled count, the hand-written count and the count over the member ids of each
    (project id, scenario) case, on one connection, every run visiting every case and
    statement in rotating order: what slows the machine meanwhile slows them all. At least
    `runs` runs, more for short statements (MAX_COUNT_RUNS). The three answers of a case
    must agree."""
    work = [
        (n, which, call)
        for n, (project_id, m) in enumerate(cases)
        for which, call in _statements(m, project_id, now).items()
    ]
    timings: dict[tuple[int, str], list[float]] = {(n, w): [] for n, w, _ in work}
    answers: list[set[int]] = [set() for _ in cases]
    budget = env.args.count_seconds
    with env.engine.connect() as conn:
        i = 0
        started = time.perf_counter()
        while i < warmup + runs or (
            i < warmup + MAX_COUNT_RUNS and time.perf_counter() - started < budget
        ):
            if i == warmup:
                started = time.perf_counter()
            shift = i % len(work)
            for n, which, call in work[shift:] + work[:shift]:
                _prepare(conn, which)
                ms, value = timed(partial(call, conn))
                if i >= warmup:
                    timings[(n, which)].append(ms)
                answers[n].add(int(value))
                conn.rollback()
            i += 1
    out = []
    for n, (_project_id, m) in enumerate(cases):
        if len(answers[n]) != 1:
            raise AssertionError(
                f"{m.scenario.name}: compiled, hand-written and ids counts differ: "
                f"{sorted(answers[n])}"
            )
        out.append(
            {
                "count": next(iter(answers[n])),
                **{f"{w}_ms": median(timings[(n, w)]) for w in ("compiled", "hand", "ids")},
                **{
                    f"{w}_runs_ms": [round(x, 2) for x in timings[(n, w)]]
                    for w in ("compiled", "hand", "ids")
                },
            }
        )
    return out


def count_both(env: Env, project_id: str, m: Measured, now: datetime, runs: int) -> dict[str, Any]:
    """count_side_by_side of one scenario in one project."""
    return count_side_by_side(env, [(project_id, m)], now, runs)[0]


def _explain_compiled(conn: Connection, m: Measured) -> str:
    """EXPLAIN ANALYZE of the compiled count, with its settings, in a transaction of its own."""
    _prepare(conn, "compiled")
    with explaining(conn):
        plan = plan_text(conn.execute(m.statement).all())
    conn.rollback()
    return plan


def explain_both(env: Env, project_id: str, m: Measured, now: datetime) -> tuple[str, str, str]:
    """EXPLAIN ANALYZE of the compiled count, the hand-written SQL and the ids count."""
    with env.engine.connect() as conn:
        with explaining(conn):
            ids = plan_text(conn.execute(m.ids_statement).all())
        conn.rollback()
        compiled = _explain_compiled(conn, m)
        _prepare(conn, "hand")
        hand = plan_text(
            conn.execute(
                text("EXPLAIN (ANALYZE, BUFFERS) " + m.scenario.hand_sql),
                {"p": project_id, "now": now},
            ).all()
        )
        conn.rollback()
    return compiled, hand, ids


def api_latencies(
    stack: Stack, key: str, m: Measured, runs: int, contact_id: str, ids: dict[str, str]
) -> dict[str, Any]:
    """GetSegment and the contacts listing (page 1 and page 100), gRPC and REST, interleaved
    with the trivial RPC (GetContact) so that the REST target compares like with like; then
    CountMatchingContacts with the scenario's condition (gRPC only)."""
    rest = stack.rest(key)
    seg = stack.server.segments
    results: dict[str, list[float]] = {
        k: []
        for k in (
            "grpc_get",
            "rest_get",
            "grpc_page1",
            "rest_page1",
            "grpc_page100",
            "rest_page100",
            "grpc_trivial",
            "rest_trivial",
        )
    }
    get = segments_pb2.GetSegmentRequest(id=m.segment_id)
    contact = contacts_pb2.GetContactRequest(id=contact_id)

    def page(n: int) -> segments_pb2.ListSegmentContactsRequest:
        return segments_pb2.ListSegmentContactsRequest(id=m.segment_id, page=n, page_size=PAGE_SIZE)

    calls: dict[str, Callable[[], Any]] = {
        "grpc_get": lambda: seg.GetSegment(get, metadata=md(key)),
        "rest_get": lambda: rest.get(f"/segments/{m.segment_id}"),
        "grpc_page1": lambda: seg.ListSegmentContacts(page(1), metadata=md(key), timeout=300),
        "rest_page1": lambda: rest.get(f"/segments/{m.segment_id}/contacts?page=1&pageSize=20"),
        "grpc_page100": lambda: seg.ListSegmentContacts(page(100), metadata=md(key), timeout=300),
        "rest_page100": lambda: rest.get(f"/segments/{m.segment_id}/contacts?page=100&pageSize=20"),
        "grpc_trivial": lambda: stack.server.contacts.GetContact(contact, metadata=md(key)),
        "rest_trivial": lambda: rest.get(f"/contacts/{contact_id}"),
    }
    member_count = None
    for i in range(max(runs, 10) + 1):
        for name, call in calls.items():
            ms, reply = timed(call)
            if i > 0:
                results[name].append(ms)
            if name == "rest_get":
                member_count = int(reply.get("memberCount", 0))
    rest.close()
    out: dict[str, Any] = {f"{k}_ms": median(v) for k, v in results.items()}
    out["rest_member_count"] = member_count
    count = segments_pb2.CountMatchingContactsRequest(
        condition=condition_proto(m.scenario.resolved(ids))
    )
    count_ms = []
    for i in range(runs + 1):
        ms, reply = timed(partial(seg.CountMatchingContacts, count, metadata=md(key), timeout=300))
        if i > 0:
            count_ms.append(ms)
    out["grpc_count_matching_ms"] = median(count_ms)
    out["count_matching"] = int(reply.count)
    return out


def list_segments(
    env: Env, stack: Stack, runs: int, wanted: int, contact_id: str
) -> dict[str, Any]:
    key = env.keys["main"]
    seg = stack.server.segments
    seg_contacts = stack.server.contacts
    existing = len(seg.ListSegments(segments_pb2.ListSegmentsRequest(), metadata=md(key)).segments)
    create_ms = []
    for i in range(max(0, wanted - existing)):
        name, condition = scenarios.filler(i)
        ms, _ = create_segment(stack, key, name, condition)
        create_ms.append(ms)
    rest = stack.rest(key)
    grpc_ms: list[float] = []
    rest_ms: list[float] = []
    trivial_grpc: list[float] = []
    trivial_rest: list[float] = []
    contact = contacts_pb2.GetContactRequest(id=contact_id)
    count = 0
    for i in range(runs + 5):
        tg, _ = timed(lambda: seg_contacts.GetContact(contact, metadata=md(key)))
        tr, _ = timed(lambda: rest.get(f"/contacts/{contact_id}"))
        g, _reply = timed(
            lambda: seg.ListSegments(segments_pb2.ListSegmentsRequest(), metadata=md(key))
        )
        r, body = timed(lambda: rest.get("/segments"))
        count = len(body)
        if i >= 5:
            grpc_ms.append(g)
            rest_ms.append(r)
            trivial_grpc.append(tg)
            trivial_rest.append(tr)
    rest.close()
    return {
        "segments": count,
        "filler_create_ms": summary(create_ms, 1),
        "grpc_ms": summary(grpc_ms),
        "rest_ms": summary(rest_ms),
        "trivial_grpc_ms": summary(trivial_grpc),
        "trivial_rest_ms": summary(trivial_rest),
        "response_bytes": len(json.dumps(body)),
    }


def export(env: Env, stack: Stack) -> dict[str, Any]:
    key = env.keys["main"]
    name, condition = scenarios.EVERYONE
    create_ms, segment = create_segment(stack, key, name, condition)
    log(f"    created {name}: {segment.member_count:,} members in {create_ms / 1000:.1f} s")
    channel = stack.server.new_channel()
    stub = segments_pb2_grpc.SegmentServiceStub(channel)
    rows = 0
    messages = 0
    first = None
    start = time.perf_counter()
    with stack.sampler.phase("export_stream"):
        for batch in stub.ExportSegmentContacts(
            segments_pb2.ExportSegmentContactsRequest(id=segment.id), metadata=md(key), timeout=3600
        ):
            if first is None:
                first = time.perf_counter() - start
            # What a sender reads of each contact, so the client pays for decoding them.
            rows += sum(1 for contact in batch.contacts if contact.email)
            messages += 1
    seconds = time.perf_counter() - start
    channel.close()
    if rows != segment.member_count:
        raise AssertionError(f"export streamed {rows} contacts, segment has {segment.member_count}")
    return {
        "segment_members": segment.member_count,
        "create_seconds": round(create_ms / 1000, 2),
        "rows": rows,
        "messages": messages,
        "seconds": round(seconds, 2),
        "rows_per_second": round(rows / seconds),
        "first_row_ms": round((first or 0) * 1000, 1),
        "server_rss_peak_mb": stack.sampler.peak_mb("server", "export_stream"),
    }


def sweep_cost(env: Env) -> dict[str, Any]:
    """One sweeper pass over the main project (the read-only statement every replica runs
    every SEGMENTS_SWEEP_SECONDS): how long, and how many contacts it found stale."""
    main = env.dataset.project("main")
    with env.sessions() as session:
        ms, stale = timed(lambda: sweeper.stale_contacts(session, uuid.UUID(main.id)))
        session.rollback()
    return {"project": "main", "seconds": round(ms / 1000, 2), "stale_contacts": len(stale)}


# --- machine and reporting -----------------------------------------------------------------


def machine(env: Env) -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    with env.engine.connect() as conn:
        version = conn.execute(text("SHOW server_version")).scalar()
        settings = {
            name: conn.execute(text(f"SHOW {name}")).scalar()
            for name in (
                "shared_buffers",
                "work_mem",
                "effective_cache_size",
                "max_parallel_workers_per_gather",
                "jit",
                "random_page_cost",
            )
        }
    try:
        from segments_service.envoy_proxy import find_envoy

        envoy = (
            subprocess.run([find_envoy(), "--version"], capture_output=True, text=True, timeout=30)
            .stdout.strip()
            .split("version:")[-1]
            .strip()
        )
    except Exception:
        envoy = "unknown"
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "postgres": version,
        "postgres_embedded": not env.args.database_url,
        "postgres_settings": settings,
        "envoy": envoy[:80],
        "load_average_start": [round(x, 2) for x in os.getloadavg()],
    }


def source_state() -> dict[str, Any]:
    """Which code was measured: the commit, whether the service tree differed from it, and a
    digest of the files that make up the service (so two results can be told apart)."""
    import hashlib

    def git(*argv: str) -> str:
        try:
            return subprocess.run(
                ["git", *argv], cwd=ROOT, capture_output=True, text=True, timeout=30
            ).stdout.strip()
        except OSError:
            return ""

    digest = hashlib.sha256()
    for folder in ("service", "protos", "envoy"):
        for path in sorted((ROOT / folder).rglob("*")):
            if path.is_file() and path.suffix in {".py", ".proto", ".lua", ".pb", ".mako"}:
                digest.update(str(path.relative_to(ROOT)).encode())
                digest.update(path.read_bytes())
    changed = git("status", "--porcelain", "--", "service", "protos", "envoy")
    return {
        "commit": git("rev-parse", "HEAD"),
        "uncommitted_service_changes": len(changed.splitlines()),
        "service_digest": digest.hexdigest()[:16],
    }


def table_sizes(env: Env) -> dict[str, str]:
    with env.engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT relname, pg_size_pretty(pg_total_relation_size(oid)) FROM pg_class "
                "WHERE relname IN ('contacts', 'events', 'segment_members') ORDER BY 1"
            )
        ).all()
    return {r[0]: r[1] for r in rows}


def fmt(value: Any, digits: int = 1) -> str:
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def render_table(results: dict[str, Any]) -> str:
    head = (
        "| scenario | members | create s | compiled ms | hand SQL ms | ratio | ids ms (ratio) | "
        "CountMatching gRPC ms | gRPC count ms | REST count ms | gRPC p1 / p100 ms | "
        "REST p1 / p100 ms |"
    )
    lines = [head, "|" + "---|" * 12]
    rows = results.get("scenarios")
    if not isinstance(rows, list):
        return ""
    for s in rows:
        if "error" in s:
            lines.append(f"| {s['name']} | failed: {s['error'][:80]} |" + " |" * 10)
            continue
        lines.append(
            f"| {s['name']} | {fmt(s['members'])} | {s['create_ms'] / 1000:.2f} | "
            f"{fmt(s['compiled_ms'])} | {fmt(s['hand_ms'])} | {s['ratio']:.2f} | "
            f"{fmt(s['ids_ms'])} ({s['ids_ratio']:.2f}) | {fmt(s['grpc_count_matching_ms'])} | "
            f"{fmt(s['grpc_get_ms'], 2)} | {fmt(s['rest_get_ms'], 2)} | "
            f"{fmt(s['grpc_page1_ms'])} / {fmt(s['grpc_page100_ms'])} | "
            f"{fmt(s['rest_page1_ms'])} / {fmt(s['rest_page100_ms'])} |"
        )
    return "\n".join(lines)


def render_scale(results: dict[str, Any]) -> str:
    scale = results.get("scale")
    if not scale or "error" in scale:
        return ""
    sizes = scale["sizes"]
    head = (
        "| scenario (compiled count) | "
        + " | ".join(f"{size_label(s)} ms" for s in sizes)
        + " | growth vs linear | hand-written SQL's growth |"
    )
    lines = [head, "|" + "---|" * (len(sizes) + 3)]
    hand_growth = scale.get("hand_growth", {})
    for name, row in scale["compiled_ms"].items():
        cells = " | ".join(fmt(row[str(s)]) for s in sizes)
        hand = f"{hand_growth[name]:.2f}" if name in hand_growth else "-"
        lines.append(f"| {name} | {cells} | {scale['growth'][name]:.2f} | {hand} |")
    total = " | ".join(
        fmt(sum(row[str(s)] for row in scale["compiled_ms"].values())) for s in sizes
    )
    lines.append(f"| all scenarios together | {total} | {scale['growth_total']:.2f} | - |")
    for label, key in (("gRPC GetSegment", "grpc"), ("REST GET /segments/{id}", "rest")):
        cells = " | ".join(fmt(scale["member_count_ms"][key][str(s)], 2) for s in sizes)
        growth = scale["member_count_growth"][key]
        lines.append(f"| memberCount via {label} | {cells} | {growth:.2f} | - |")
    return "\n".join(lines)


def render_targets(targets: dict[str, Any]) -> str:
    lines = ["| target | measured | limit | met |", "|---|---|---|---|"]
    for name, t in targets.items():
        op = t.get("comparison", "<=")
        unit = t.get("unit", "")
        lines.append(
            f"| {name} | {fmt(t['measured'], 2)} {unit} | {op} {fmt(t['limit'], 2)} {unit} | "
            f"{'yes' if t['met'] else '**NO**'} |"
        )
    return "\n".join(lines)


def _scenario_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    rows = results.get("scenarios")
    if not isinstance(rows, list):
        raise ValueError("the scenarios phase failed")
    return [r for r in rows if "error" not in r]


def target_compiled_vs_hand(
    results: dict[str, Any], plans: dict[str, tuple[str, str, str]]
) -> dict[str, Any]:
    sc = _scenario_rows(results)
    failed = [r["name"] for r in results["scenarios"] if "error" in r]
    limit = LIMITS["compiled_vs_hand_sql"]
    worst = max(sc, key=lambda s: s["ratio"])
    over = [s for s in sc if s["ratio"] > limit]
    entry: dict[str, Any] = {
        "measured": worst["ratio"],
        "limit": limit,
        "met": not over and not failed,
        "unit": "x",
        "rule": "median compiled count (the statement CountMatchingContacts runs, "
        "filters.compile_count) / median hand-written count, same connection, interleaved "
        "runs, same answer asserted; every scenario; the worst is shown. The count over the "
        "member ids (what a create or rebuild computes) is in ids_ratio, not in this target",
        "worst_scenario": worst["name"],
        "per_scenario": {s["name"]: s["ratio"] for s in sc},
    }
    if failed:
        entry["failed_scenarios"] = failed
    if over:
        entry["note"] = {
            s["name"]: {
                "by": f"{s['ratio']:.2f}x, {s['ratio'] / limit:.2f} times the limit "
                f"({s['compiled_ms']:.1f} ms compiled vs {s['hand_ms']:.1f} ms hand-written)",
                "compiled_plan": plan_head(plans[s["name"]][0]),
                "hand_plan": plan_head(plans[s["name"]][1]),
            }
            for s in over
        }
    return entry


def target_rest_get(results: dict[str, Any]) -> dict[str, Any]:
    factor = LIMITS["rest_get_segment_factor"]
    rows = []
    for s in _scenario_rows(results):
        allowed = factor * s["compiled_ms"] + s["rest_trivial_ms"]
        rows.append((s["rest_get_ms"] / allowed, s, allowed))
    _ratio, s, allowed = max(rows, key=lambda r: r[0])
    return {
        "measured": s["rest_get_ms"],
        "limit": round(allowed, 3),
        "met": all(r[0] <= 1 for r in rows),
        "unit": "ms",
        "rule": "GET /segments/{id} <= 1.2 x compiled count query + trivial REST RPC "
        "(GET /contacts/{id}, measured interleaved), every scenario; the tightest is shown",
        "scenario": s["name"],
        "per_scenario": {
            r[1]["name"]: {"rest_get_ms": r[1]["rest_get_ms"], "limit_ms": round(r[2], 3)}
            for r in rows
        },
    }


def target_list(results: dict[str, Any]) -> dict[str, Any]:
    ls = results["list_segments"]
    trivial_rest = ls["trivial_rest_ms"]["median"]
    trivial_grpc = ls["trivial_grpc_ms"]["median"]
    measured = ls["rest_ms"]["median"] / trivial_rest
    limit = LIMITS["list_segments_vs_trivial"]
    entry = {
        "measured": round(measured, 2),
        "limit": limit,
        "met": measured <= limit,
        "unit": "x",
        "rule": f"GET /segments with {ls['segments']} segments vs GET /contacts/{{id}}, "
        f"interleaved ({ls['rest_ms']['median']:.2f} ms vs {trivial_rest:.2f} ms; gRPC "
        f"{ls['grpc_ms']['median']:.2f} ms vs {trivial_grpc:.2f} ms)",
    }
    if measured > limit:
        entry["note"] = f"{measured / limit:.2f} times the limit"
    return entry


def target_ingest(results: dict[str, Any]) -> dict[str, Any]:
    tput = results["ingestion"]["throughput"]
    eps = tput["events_per_second"]
    limit = LIMITS["ingest_events_per_second"]
    entry: dict[str, Any] = {
        "measured": eps,
        "limit": limit,
        "comparison": ">=",
        "met": eps >= limit,
        "unit": "events/s",
        "rule": f"IngestEvents, batches of 1,000, five tracked segments, {tput['workers']} "
        "concurrent callers retrying UNAVAILABLE/ABORTED, one server process",
        "retried_batches": tput.get("retried_batches", 0),
    }
    if tput.get("retried_batches"):
        entry["retry_reasons"] = tput["retry_reasons"]
    if eps < limit:
        entry["note"] = (
            f"{limit / eps:.2f}x short ({eps:,} of {limit:,.0f} events/s); "
            f"batch latency p50 {tput['batch_ms']['median']} ms, p95 {tput['batch_ms']['p95']} ms"
        )
    return entry


def target_tracking(results: dict[str, Any]) -> dict[str, Any]:
    track = results["ingestion"]["tracking"]
    p95 = track["latency_s"]["p95"]
    limit = LIMITS["tracking_latency_p95_seconds"]
    entry = {
        "measured": p95,
        "limit": limit,
        "met": p95 <= limit and track["missing"] == 0,
        "unit": "s",
        "rule": f"IngestEvents submit -> entry event read from WatchSegmentEvents, at "
        f"{track['achieved_rate']} events/s in batches of {track['batch_size']}",
    }
    if track["missing"]:
        entry["note"] = f"{track['missing']} of {track['probes']} entries never arrived"
    elif p95 > limit:
        entry["note"] = f"{p95 / limit:.2f} times the limit"
    return entry


def target_rss(results: dict[str, Any]) -> dict[str, Any]:
    memory = results["memory"]
    peak = memory["server_rss_peak_mb"]
    limit = LIMITS["server_rss_mb"]
    entry: dict[str, Any] = {
        "measured": peak,
        "limit": limit,
        "met": peak <= limit,
        "unit": "MB",
        "rule": "peak RSS of the gRPC server process, sampled every 50 ms over every phase "
        "(export of the all-contacts segment included)",
        "by_phase": memory["server_rss_by_phase_mb"],
    }
    if peak > limit:
        phase = max(memory["server_rss_by_phase_mb"], key=memory["server_rss_by_phase_mb"].get)
        entry["note"] = f"{peak - limit:.0f} MB over the limit, reached during {phase!r}"
    return entry


def target_growth(results: dict[str, Any]) -> dict[str, Any]:
    """Count latency as callers meet it: a segment's memberCount, read through gRPC
    (`GetSegment`) and REST (`GET /segments/{id}`) for every scenario at every size.

    Beside it, not part of the target: the growth of the compiled statement that counts a
    condition from scratch (CountMatchingContacts, creates, rebuilds), per scenario."""
    scale = results["scale"]
    sizes = scale["sizes"]
    limit = LIMITS["count_growth"]
    served = scale["member_count_growth"]
    stack = max(served, key=lambda k: served[k])
    growth = scale["growth"]
    worst = max(growth, key=lambda k: growth[k])
    hand_growth = scale.get("hand_growth", {})
    adhoc: dict[str, Any] = {
        "worst_scenario": worst,
        "worst_growth": growth[worst],
        "worst_hand_written_growth": hand_growth.get(worst),
        "all_scenarios_together": scale["growth_total"],
        "scenarios_over_linear": {
            k: f"{v:.2f}x linear: {scale['compiled_ms'][k][str(sizes[0])]:.1f} ms -> "
            f"{scale['compiled_ms'][k][str(sizes[-1])]:.1f} ms"
            + (f" (hand-written SQL: {hand_growth[k]:.2f}x)" if k in hand_growth else "")
            for k, v in growth.items()
            if v > limit
        },
        "note": "informational, not the target: counting a condition from scratch; plans "
        "at both sizes are in the .plans.txt file beside these results",
    }
    return {
        "measured": served[stack],
        "limit": limit,
        "met": served[stack] <= limit,
        "unit": "x linear",
        "rule": f"median memberCount latency over the {len(growth)} scenario segments at "
        f"{size_label(sizes[-1])} / at {size_label(sizes[0])}, divided by the size ratio "
        f"{sizes[-1] / sizes[0]:.0f} (<= 1 is linear or better), through gRPC and REST; "
        "the faster-growing of the two is shown",
        "stack": stack,
        "member_count_ms": scale["member_count_ms"],
        "member_count_growth": served,
        "count_from_scratch": adhoc,
    }


def compute_targets(
    results: dict[str, Any], plans: dict[str, tuple[str, str, str]], phases: Sequence[str]
) -> dict[str, Any]:
    """The targets of the phases that ran."""
    makers: dict[str, Callable[[], dict[str, Any]]] = {
        "compiled_vs_hand_sql": lambda: target_compiled_vs_hand(results, plans),
        "rest_get_segment_vs_query": lambda: target_rest_get(results),
        "list_segments_vs_trivial": lambda: target_list(results),
        "ingest_events_per_second": lambda: target_ingest(results),
        "tracking_latency_p95_seconds": lambda: target_tracking(results),
        "server_rss_mb": lambda: target_rss(results),
        "count_growth": lambda: target_growth(results),
    }
    limits = {
        "rest_get_segment_vs_query": None,
        "compiled_vs_hand_sql": LIMITS["compiled_vs_hand_sql"],
        "list_segments_vs_trivial": LIMITS["list_segments_vs_trivial"],
        "ingest_events_per_second": LIMITS["ingest_events_per_second"],
        "tracking_latency_p95_seconds": LIMITS["tracking_latency_p95_seconds"],
        "server_rss_mb": LIMITS["server_rss_mb"],
        "count_growth": LIMITS["count_growth"],
    }
    targets: dict[str, Any] = {}
    for name, make in makers.items():
        if TARGET_PHASES[name] not in phases:
            continue
        try:
            targets[name] = make()
        except Exception as err:
            targets[name] = {
                "measured": None,
                "limit": limits[name],
                "met": False,
                "note": f"not measured: {type(err).__name__}: {err} (see the phase's error)",
            }
    if "noisy" in phases:
        targets.update(noisy.targets(results.get("noisy") or {}))
    return targets


# --- main --------------------------------------------------------------------------------


def guarded(results: dict[str, Any], key: str, fn: Callable[[], Any]) -> Any:
    """Run one phase; a failure is recorded in the results and the next phase still runs."""
    try:
        value = fn()
    except Exception as err:
        log(traceback.format_exc())
        log(f"    phase {key!r} failed: {type(err).__name__}: {err}")
        results[key] = {"error": f"{type(err).__name__}: {err}"}
        return None
    results[key] = value
    return value


def wal_totals(env: Env) -> tuple[int, int, int] | None:
    """The server's WAL records, full-page images and bytes so far (pg_stat_wal, PostgreSQL
    14 and later), or None where they cannot be read."""
    try:
        with env.engine.connect() as conn:
            row = conn.execute(
                text("SELECT wal_records, wal_fpi, wal_bytes FROM pg_stat_wal")
            ).one()
    except DBAPIError:
        return None
    return int(row[0]), int(row[1]), int(row[2])


def wal_per_1000(
    before: tuple[int, int, int] | None, after: tuple[int, int, int] | None, events: int
) -> dict[str, Any] | None:
    """The WAL written between two wal_totals, per 1,000 events. The first change of a page
    after a checkpoint writes the whole page (a full-page image): a run that starts a
    checkpoint cycle's writes to the event indexes writes several times the WAL of one
    that follows them, and ingests more slowly (BENCHMARKS.md, "Ingestion")."""
    if before is None or after is None or not events:
        return None
    per = 1000 / events
    return {
        "records": round((after[0] - before[0]) * per),
        "full_page_images": round((after[1] - before[1]) * per),
        "mb": round((after[2] - before[2]) * per / 1e6, 2),
    }


def phase_ingestion(env: Env, stack: Stack) -> dict[str, Any]:
    key = env.keys["main"]
    tracked: dict[str, str] = {}
    tracked_create: dict[str, Any] = {}
    for name, condition in scenarios.TRACKED:
        ms, seg = create_segment(stack, key, name, condition, track=True)
        tracked[name] = seg.id
        tracked_create[name] = {"members": seg.member_count, "create_ms": round(ms, 1)}
        log(f"    created tracked {name!r}: {seg.member_count:,} members in {ms:.0f} ms")
    rng = random.Random(11)
    pool = sample_emails(env, "main", min(300_000, env.dataset.project("main").contacts))
    throughput(stack, key, build_batches(pool, 5_000, 1000, rng, "warm"), env.args.ingest_workers)
    batches = build_batches(pool, env.args.ingest_events, 1000, rng, "tput")
    before = wal_totals(env)
    tput = throughput(stack, key, batches, env.args.ingest_workers)
    tput["wal_per_1000_events"] = wal_per_1000(before, wal_totals(env), tput["events"])
    log(
        f"    throughput: {tput['events_per_second']:,} events/s "
        f"(batch p50 {tput['batch_ms']['median']} ms)"
    )
    track = tracking(
        env,
        stack,
        key,
        tracked["Bench recent buyers"],
        env.args.tracking_rate,
        env.args.tracking_batch,
        env.args.tracking_seconds,
    )
    log(
        f"    tracking latency at {track['achieved_rate']} events/s: "
        f"p50 {track['latency_s']['median']} s, p95 {track['latency_s']['p95']} s, "
        f"missing {track['missing']}"
    )
    return {"tracked_segments": tracked_create, "throughput": tput, "tracking": track}


def phase_scenarios(
    env: Env,
    stack: Stack,
    now: datetime,
    contact_id: str,
    measured: list[Measured],
    plans: dict[str, tuple[str, str, str]],
    settled: dict[str, Any],
) -> list[dict[str, Any]]:
    main = env.dataset.project("main")
    key = env.keys["main"]
    measured.extend(create_scenarios(env, stack, "main", now))
    settled["scenarios"] = settle(env)
    ids = {x.scenario.name: x.segment_id for x in measured}
    rows = []
    for m in measured:
        row: dict[str, Any] = {
            "name": m.scenario.name,
            "family": m.scenario.family,
            "description": m.scenario.description,
            "filters": m.scenario.filter_count(),
            "condition": m.scenario.resolved(ids),
            "hand_sql": " ".join(m.scenario.hand_sql.split()),
            "members": m.members,
            "create_ms": round(m.create_ms, 1),
            "compile_ms": round(m.compile_ms, 2),
        }
        try:
            counts = count_both(env, main.id, m, now, env.args.runs)
            plans[m.scenario.name] = explain_both(env, main.id, m, now)
            api = api_latencies(stack, key, m, env.args.runs, contact_id, ids)
        except Exception as err:
            log(traceback.format_exc())
            row["error"] = f"{type(err).__name__}: {err}"
            rows.append(row)
            continue
        ratio = counts["compiled_ms"] / counts["hand_ms"]
        row.update(counts)
        row["ratio"] = round(ratio, 3)
        row["ids_ratio"] = round(counts["ids_ms"] / counts["hand_ms"], 3)
        row.update(api)
        if counts["count"] != m.members:
            row["count_note"] = (
                "maintained member count differs from the compiled count at the "
                "measurement instant (contacts crossed a window edge since creation)"
            )
        rows.append(row)
        log(
            f"    {m.scenario.name:<24} compiled {counts['compiled_ms']:9.1f} ms  "
            f"hand {counts['hand_ms']:9.1f} ms  ratio {ratio:5.2f}  "
            f"REST count {api['rest_get_ms']:6.2f} ms  "
            f"page100 {api['rest_page100_ms']:7.1f} ms"
        )
    return rows


SETTLE_WAIT_SECONDS = 180.0


def settle(env: Env) -> dict[str, Any]:
    """Before the counts are timed, untimed: VACUUM (ANALYZE) the tables the segment
    creates wrote, which autovacuum would otherwise start within a minute, in the middle of
    the timings and on one of the machine's cores; wait (up to SETTLE_WAIT_SECONDS) for
    autovacuum workers already at work on the database; then CHECKPOINT, so the writes
    are not flushed during the timings either."""
    out: dict[str, Any] = {}
    with env.engine.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT")
        ms, _ = timed(lambda: conn.execute(text("VACUUM (ANALYZE) segment_members, segments")))
        out["vacuum_ms"] = round(ms, 1)
        running = text(
            "SELECT query FROM pg_stat_activity "
            "WHERE backend_type = 'autovacuum worker' AND datname = current_database()"
        )
        started = time.perf_counter()
        seen: set[str] = set()
        while time.perf_counter() - started < SETTLE_WAIT_SECONDS:
            work = set(conn.execute(running).scalars())
            if not work:
                break
            seen |= work
            time.sleep(0.5)
        else:
            out["autovacuum_still_running"] = True
        out["autovacuum_waited_s"] = round(time.perf_counter() - started, 1)
        out["autovacuum_seen"] = sorted(seen)
        try:
            ms, _ = timed(lambda: conn.execute(text("CHECKPOINT")))
            out["checkpoint_ms"] = round(ms, 1)
        except DBAPIError as err:  # CHECKPOINT needs pg_checkpoint on a server of one's own
            out["checkpoint"] = f"skipped: {err.orig}"
    log(
        f"    settled: VACUUM {out['vacuum_ms']:,.0f} ms, autovacuum waited "
        f"{out['autovacuum_waited_s']} s"
    )
    return out


def delete_segments(env: Env, stack: Stack) -> dict[str, Any]:
    """DeleteSegment for every segment of the main project (referencing ones first), then
    VACUUM so the ingestion run that follows starts from a clean table."""
    key = env.keys["main"]
    seg = stack.server.segments
    listed = seg.ListSegments(segments_pb2.ListSegmentsRequest(), metadata=md(key)).segments
    # Newest first: a segment is always deleted before the segments it references.
    times = []
    for s in listed:
        request = segments_pb2.DeleteSegmentRequest(id=s.id)
        ms, _ = timed(partial(seg.DeleteSegment, request, metadata=md(key), timeout=600))
        times.append(ms)
    with env.engine.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT")
        vacuum_ms, _ = timed(lambda: conn.execute(text("VACUUM (ANALYZE) segment_members")))
    return {
        "segments": len(listed),
        "delete_ms": summary(times, 1),
        "vacuum_segment_members_ms": round(vacuum_ms, 1),
    }


def phase_ingestion_all(env: Env, stack: Stack) -> dict[str, Any]:
    key = env.keys["main"]
    rng = random.Random(13)
    pool = sample_emails(env, "main", min(300_000, env.dataset.project("main").contacts))
    events = max(20_000, env.args.ingest_events // 4)
    result = throughput(
        stack, key, build_batches(pool, events, 1000, rng, "all"), env.args.ingest_workers
    )
    reply = stack.server.segments.ListSegments(segments_pb2.ListSegmentsRequest(), metadata=md(key))
    result["segments"] = len(reply.segments)
    log(f"    {result['events_per_second']:,} events/s with {result['segments']} segments")
    return result


def run(args: argparse.Namespace) -> int:
    url, dataset, _handle = prepare_dataset(args)
    if args.load_only:
        return 0
    engine = bench_engine(url)
    env = Env(args, url, engine, sessionmaker(engine, expire_on_commit=False), dataset)
    issue_keys(env)
    results: dict[str, Any] = {
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": "make bench"
        + (f' BENCH_ARGS="{" ".join(sys.argv[1:])}"' if sys.argv[1:] else ""),
        "machine": machine(env),
        "source": source_state(),
        "dataset": {**dataset.to_json(), "table_sizes": table_sizes(env)},
        "runs": args.runs,
        "phases": args.phases,
    }
    plans: dict[str, tuple[str, str, str]] = {}
    small_plans: dict[str, str] = {}
    measured: list[Measured] = []
    settled: dict[str, Any] = {}
    results["settle"] = settled
    data_dir = Path(os.environ.get("SEGMENTS_DATA_DIR", ROOT / ".data")).resolve()
    server_log = data_dir / "bench" / f"server-{args.database_name}.log"
    server = Server(url, args.sweep_seconds, server_log)
    envoy = None
    sampler = None
    try:
        envoy = Envoy(server.port)
        sampler = Sampler({"server": server.proc.pid, "envoy": envoy.proc.pid}, args.database_name)
        sampler.start()
        stack = Stack(server, envoy, sampler)

        wanted = set(args.phases)
        total = len(PHASES)
        contact_id = ""
        if "trivial" in wanted:
            log(f"[1/{total}] trivial RPC")
            with sampler.phase("trivial"):
                base = trivial(env, stack, max(100, args.runs * 20))
                results["trivial"] = base
            log(
                f"    GetContact: gRPC {base['grpc_ms']['median']:.2f} ms, "
                f"REST {base['rest_ms']['median']:.2f} ms"
            )
            contact_id = base["contact_id"]

        now = db_now(engine)
        if "scenarios" in wanted:
            log(f"[2/{total}] scenarios")
            with sampler.phase("scenarios"):
                guarded(
                    results,
                    "scenarios",
                    lambda: phase_scenarios(env, stack, now, contact_id, measured, plans, settled),
                )

        if "scale" in wanted:
            log(f"[3/{total}] scale curve")
            with sampler.phase("scale"):
                guarded(
                    results,
                    "scale",
                    lambda: scale_curve(env, stack, measured, now, small_plans, settled),
                )

        if "list" in wanted:
            log(f"[4/{total}] ListSegments with 50 segments")
            with sampler.phase("list"):
                ls = guarded(
                    results,
                    "list_segments",
                    lambda: list_segments(
                        env, stack, max(50, args.runs * 10), args.list_segments, contact_id
                    ),
                )
            if ls:
                log(
                    f"    GET /segments ({ls['segments']} segments): "
                    f"{ls['rest_ms']['median']:.2f} ms"
                )

        if "export" in wanted:
            log(f"[5/{total}] ExportSegmentContacts of every contact")
            with sampler.phase("export"):
                ex = guarded(results, "export", lambda: export(env, stack))
            if ex:
                log(
                    f"    exported {ex['rows']:,} contacts in {ex['seconds']} s, "
                    f"server RSS peak {ex['server_rss_peak_mb']} MB"
                )

        if "sweep" in wanted:
            log(f"[6/{total}] one sweep with every segment present (informational)")
            with sampler.phase("sweep"):
                sw = guarded(results, "sweep", lambda: sweep_cost(env))
            if sw:
                log(f"    one sweep of the main project: {sw['seconds']} s")

        if "ingestion_all" in wanted:
            log(f"[7/{total}] ingestion with every segment present (informational)")
            with sampler.phase("ingestion_all_segments"):
                guarded(results, "ingestion_all_segments", lambda: phase_ingestion_all(env, stack))

        if "delete" in wanted:
            log(f"[8/{total}] deleting the main project's segments")
            with sampler.phase("delete_segments"):
                guarded(results, "delete_segments", lambda: delete_segments(env, stack))

        if "ingestion" in wanted:
            log(f"[9/{total}] ingestion with five tracked segments")
            with sampler.phase("ingestion"):
                guarded(results, "ingestion", lambda: phase_ingestion(env, stack))

        if "noisy" in wanted:
            log(f"[10/{total}] noisy neighbour")
            config = noisy.Config(
                seconds=args.noisy_seconds,
                streams=args.noisy_streams,
                counts=args.noisy_counts,
                rate=args.noisy_rate,
                timeout=args.noisy_timeout,
                build_timeout=args.noisy_build_timeout,
            )
            with sampler.phase("noisy"):
                guarded(results, "noisy", lambda: noisy.run(env, stack, config, log))

        results["memory"] = {
            "server_rss_peak_mb": sampler.peak_mb("server"),
            "server_rss_by_phase_mb": sampler.by_phase("server"),
            "envoy_rss_peak_mb": sampler.peak_mb("envoy"),
        }
        foreign = sampler.foreign_load()
        results["machine"]["other_processes_cpu"] = foreign
        results["machine"]["postgres_background_cpu_seconds"] = sampler.background_load()
        busy = {
            name: v["share_of_machine"]
            for name, v in foreign.items()
            if v["share_of_machine"] is not None and v["share_of_machine"] > 0.1
        }
        if busy:
            results["machine"]["warning"] = (
                "other processes used more than 10% of the machine during: "
                + ", ".join(f"{k} ({v:.0%})" for k, v in busy.items())
                + "; timings of those phases are inflated"
            )
        results["machine"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
        results["targets"] = compute_targets(results, plans, args.phases)
    finally:
        if sampler is not None:
            sampler.stop()
        if envoy is not None:
            envoy.stop()
        server.stop()
        engine.dispose()

    write_outputs(args, results, plans, small_plans)
    return 0


def scale_curve(
    env: Env,
    stack: Stack,
    main_measured: list[Measured],
    now: datetime,
    small_plans: dict[str, str],
    settled: dict[str, Any],
) -> dict[str, Any]:
    """The counts at every size side by side; for each scenario growing faster than
    linearly, `small_plans` gets its compiled count's plan at the smallest size (the plan
    at the largest is in the scenarios' plans)."""
    sizes = [*env.args.scale, env.args.contacts]
    by_size: dict[int, str] = {}
    for project in env.dataset.projects:
        by_size.setdefault(project.contacts, project.tag)
    compiled: dict[str, dict[str, float]] = {sc.name: {} for sc in scenarios.SCENARIOS}
    hand: dict[str, dict[str, float]] = {sc.name: {} for sc in scenarios.SCENARIOS}
    ids: dict[str, dict[str, float]] = {sc.name: {} for sc in scenarios.SCENARIOS}
    runs: dict[str, dict[str, list[float]]] = {sc.name: {} for sc in scenarios.SCENARIOS}
    create: dict[str, dict[str, float]] = {sc.name: {} for sc in scenarios.SCENARIOS}
    measured: dict[int, list[Measured]] = {}
    for size in sizes:
        tag = by_size[size]
        measured[size] = main_measured if tag == "main" else create_scenarios(env, stack, tag, now)
    settled["scale"] = settle(env)
    # Per scenario, every size side by side: the growth is a ratio of these.
    for n, sc in enumerate(scenarios.SCENARIOS):
        cases = [(env.dataset.project(by_size[size]).id, measured[size][n]) for size in sizes]
        for size, counts in zip(
            sizes, count_side_by_side(env, cases, now, env.args.runs), strict=True
        ):
            compiled[sc.name][str(size)] = counts["compiled_ms"]
            hand[sc.name][str(size)] = counts["hand_ms"]
            ids[sc.name][str(size)] = counts["ids_ms"]
            runs[sc.name][str(size)] = counts["compiled_runs_ms"]
            create[sc.name][str(size)] = round(measured[size][n].create_ms, 1)
    # The count a caller reads for a segment, through each stack: every run visits every
    # scenario at every size, so whatever slows the machine meanwhile slows all alike.
    served = served_counts(stack, env, measured, by_size, sizes)
    for size in sizes:
        log(
            f"    {size_label(size)}: total compiled "
            f"{sum(compiled[n][str(size)] for n in compiled):,.0f} ms over "
            f"{len(measured[size])} scenarios; memberCount gRPC "
            f"{served['grpc'][str(size)]:.2f} ms, REST {served['rest'][str(size)]:.2f} ms"
        )
    lo, hi = str(sizes[0]), str(sizes[-1])
    factor = sizes[-1] / sizes[0]
    growth = {n: round(compiled[n][hi] / compiled[n][lo] / factor, 3) for n in compiled}
    # The hand-written SQL's growth beside it: where both grow alike, the cost is the
    # workload's on this machine (e.g. a hash table outgrowing the CPU cache), not the
    # compiler's.
    hand_growth = {n: round(hand[n][hi] / hand[n][lo] / factor, 3) for n in hand}
    with env.engine.connect() as conn:
        for n, sc in enumerate(scenarios.SCENARIOS):
            if growth[sc.name] > LIMITS["count_growth"]:
                small_plans[sc.name] = _explain_compiled(conn, measured[sizes[0]][n])
    total_lo = sum(compiled[n][lo] for n in compiled)
    total_hi = sum(compiled[n][hi] for n in compiled)
    return {
        "sizes": sizes,
        "projects": {str(s): by_size[s] for s in sizes},
        "compiled_ms": compiled,
        "hand_ms": hand,
        "ids_ms": ids,
        "compiled_runs_ms": runs,
        "create_ms": create,
        "growth": growth,
        "hand_growth": hand_growth,
        "growth_total": round(total_hi / total_lo / factor, 3),
        "member_count_ms": served,
        "member_count_growth": {
            api: round(ms[hi] / ms[lo] / factor, 3) for api, ms in served.items()
        },
    }


def served_counts(
    stack: Stack,
    env: Env,
    measured: dict[int, list[Measured]],
    by_size: dict[int, str],
    sizes: list[int],
) -> dict[str, dict[str, float]]:
    """Median latency of reading a scenario segment's memberCount, per size: `GetSegment`
    over gRPC and `GET /segments/{id}` through Envoy, over every scenario and run."""
    rests = {size: stack.rest(env.keys[by_size[size]]) for size in sizes}
    grpc_ms: dict[int, list[float]] = {size: [] for size in sizes}
    rest_ms: dict[int, list[float]] = {size: [] for size in sizes}
    try:
        for _ in range(env.args.runs):
            for n in range(len(scenarios.SCENARIOS)):
                for size in sizes:
                    segment_id = measured[size][n].segment_id
                    request = segments_pb2.GetSegmentRequest(id=segment_id)
                    key = env.keys[by_size[size]]
                    g, _reply = timed(
                        partial(stack.server.segments.GetSegment, request, metadata=md(key))
                    )
                    r, _body = timed(partial(rests[size].get, f"/segments/{segment_id}"))
                    grpc_ms[size].append(g)
                    rest_ms[size].append(r)
    finally:
        for rest in rests.values():
            rest.close()
    return {
        "grpc": {str(size): median(grpc_ms[size]) for size in sizes},
        "rest": {str(size): median(rest_ms[size]) for size in sizes},
    }


def dig(results: dict[str, Any], *path: str) -> Any:
    """results[a][b]..., or None where a phase failed or was skipped."""
    node: Any = results
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def render_figures(results: dict[str, Any]) -> str:
    """Everything else, one line each."""

    def line(label: str, *path: str, fmt_: Callable[[Any], str]) -> str:
        value = dig(results, *path)
        if value is None:
            return f"| {label} | not measured |"
        if isinstance(value, dict) and "error" in value:
            return f"| {label} | failed: {value['error'][:100]} |"
        return f"| {label} | {fmt_(value)} |"

    ds = results["dataset"]
    rows = sum(p["contacts"] + p["events"] + p["email_events"] for p in ds["projects"])
    lines = [
        "| measurement | result |",
        "|---|---|",
        f"| dataset load | {rows:,} rows in {ds['load_seconds']:.0f} s "
        f"({ds['rows_per_second']:,} rows/s; phases {ds['phases']}) |",
        line(
            "trivial RPC (GetContact), gRPC / REST",
            "trivial",
            fmt_=lambda t: f"{t['grpc_ms']['median']:.2f} / {t['rest_ms']['median']:.2f} ms",
        ),
        line(
            "ListSegments, gRPC / REST",
            "list_segments",
            fmt_=lambda t: (
                f"{t['segments']} segments: {t['grpc_ms']['median']:.2f} / "
                f"{t['rest_ms']['median']:.2f} ms ({t['response_bytes']:,} bytes of JSON)"
            ),
        ),
        line(
            "IngestEvents throughput, 5 tracked segments",
            "ingestion",
            "throughput",
            fmt_=lambda t: (
                f"{t['events_per_second']:,} events/s ({t['events']:,} events, "
                f"{t['workers']} callers, batch p50 {t['batch_ms']['median']} ms, "
                f"p95 {t['batch_ms']['p95']} ms; 5 s windows "
                f"{', '.join(f'{n:,}' for n in t['events_per_second_5s_windows'])}"
                + (
                    f"; per 1,000 events {w['full_page_images']} full-page images, "
                    f"{w['mb']} MB of WAL)"
                    if (w := t.get("wal_per_1000_events"))
                    else ")"
                )
            ),
        ),
        line(
            "IngestEvents throughput, every segment present",
            "ingestion_all_segments",
            fmt_=lambda t: (
                f"{t['events_per_second']:,} events/s with {t['segments']} segments "
                f"(batch p50 {t['batch_ms']['median']} ms)"
            ),
        ),
        line(
            "tracking latency (event -> entry event)",
            "ingestion",
            "tracking",
            fmt_=lambda t: (
                f"p50 {t['latency_s']['median']} s, p95 {t['latency_s']['p95']} s, "
                f"p99 {t['latency_s']['p99']} s, max {t['latency_s']['max']} s at "
                f"{t['achieved_rate']} events/s ({t['observed']}/{t['probes']} entries seen)"
            ),
        ),
        line(
            "ExportSegmentContacts",
            "export",
            fmt_=lambda t: (
                f"{t['rows']:,} contacts in {t['seconds']} s "
                f"({t['rows_per_second']:,}/s, first row {t['first_row_ms']} ms); "
                f"creating the segment took {t['create_seconds']} s"
            ),
        ),
        line(
            "server RSS peak (all phases / during export)",
            "memory",
            fmt_=lambda t: (
                f"{t['server_rss_peak_mb']} MB / "
                f"{t['server_rss_by_phase_mb'].get('export_stream', 'n/a')} MB "
                f"(Envoy {t['envoy_rss_peak_mb']} MB)"
            ),
        ),
        line(
            "one sweep of the main project (informational)",
            "sweep",
            fmt_=lambda t: f"{t['seconds']} s, {t['stale_contacts']} stale contacts",
        ),
    ]
    return "\n".join(lines)


def write_outputs(
    args: argparse.Namespace,
    results: dict[str, Any],
    plans: dict[str, tuple[str, str, str]],
    small_plans: dict[str, str],
) -> None:
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2, default=str) + "\n")
    plan_file = args.output.with_suffix(".plans.txt")
    with plan_file.open("w") as out:
        for name, (compiled, hand, ids) in plans.items():
            out.write(f"==== {name}: compiled count (CountMatchingContacts) ====\n{compiled}\n\n")
            out.write(f"==== {name}: hand-written SQL ====\n{hand}\n\n")
            out.write(f"==== {name}: count of the member ids (create, rebuild) ====\n{ids}\n\n")
        smallest = size_label(results["scale"]["sizes"][0]) if small_plans else ""
        for name, plan in small_plans.items():
            out.write(
                f"==== {name}: compiled count at {smallest} (scale curve: grows faster "
                f"than linearly) ====\n{plan}\n\n"
            )
    parts = [
        render_table(results),
        render_scale(results),
        render_figures(results),
        noisy.render(results.get("noisy")),
        render_targets(results.get("targets", {})),
    ]
    markdown = "\n\n".join(p for p in parts if p)
    args.output.with_suffix(".md").write_text(markdown + "\n")
    print()
    print(markdown)
    if dig(results, "machine", "warning"):
        print(f"\nWARNING: {results['machine']['warning']}")
    print(f"\nwrote {args.output}, {plan_file.name}, {args.output.with_suffix('.md').name}")


def main(argv: Sequence[str] | None = None) -> int:
    import signal

    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
    # SIGTERM unwinds like Ctrl-C, so the server and Envoy are stopped on the way out.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    args = parse_args(argv)
    return run(args)
