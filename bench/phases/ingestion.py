"""Phases 8 and 10: IngestEvents throughput from several callers, with every segment present
and with five tracked ones, the tracking latency of a paced stream, the database's own
limits for the same rows, and the throughput with 5, 50 and 200 tracked segments."""

from __future__ import annotations

import random
import threading
import time
import traceback
import uuid
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import psycopg
from google.protobuf import json_format, struct_pb2
from psycopg.types.json import Jsonb
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from bench import load, scenarios
from bench.context import Env, Stack, create_segment, log, md
from bench.measure import percentile, summary
from segments_api.v1 import events_pb2, events_pb2_grpc, segments_pb2, segments_pb2_grpc
from segments_service.filters import parse_condition

# The tracked segment the paced streams' probes enter (each probe is a purchase), and the
# ladder's step at which such a stream's latency is measured.
RECENT_BUYERS = "Bench recent buyers"
LADDER_TRACKING_STEP = 50
# The paced streams' concurrent requests: the server's default SEGMENTS_PROJECT_CONCURRENCY.
SENDERS = 8


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


def event_names(rng: random.Random, n: int, names: Sequence[str] = load.EVENT_NAMES) -> list[str]:
    """`n` names of `names`, the first ones the most frequent (a power law)."""
    return [names[int(len(names) * rng.random() ** 2.2)] for _ in range(n)]


def names_read(conditions: Iterable[dict[str, Any]]) -> set[str]:
    """The event names the conditions' filters read, as the service parses them (email
    activity included, under its event names; referenced segments' not followed)."""
    return {
        name
        for condition in conditions
        for f in parse_condition(condition).iter_filters()
        for name in f.events
    }


def ingest_item(email: str, name: str, rng: random.Random) -> events_pb2.IngestedEvent:
    item = events_pb2.IngestedEvent(email=email, event=name)
    if name == "purchase":
        data = struct_pb2.Struct()
        data.update({"amount": round(5 + rng.random() * 200, 2), "currency": "USD"})
        item.data.CopyFrom(data)
    return item


def build_batches(
    emails: Sequence[str],
    total: int,
    batch: int,
    rng: random.Random,
    run_tag: str,
    names_from: Sequence[str] = load.EVENT_NAMES,
) -> list[events_pb2.IngestEventsRequest]:
    """Batches of random events (names drawn from `names_from`): 98% for existing contacts,
    2% for new ones."""
    requests = []
    names = event_names(rng, total, names_from)
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


# RESOURCE_EXHAUSTED: the project's share of the server is in use ("retry shortly").
RETRYABLE = (
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
)


def ingest_with_retries(
    stub: events_pb2_grpc.EventServiceStub,
    request: events_pb2.IngestEventsRequest,
    key: str,
    attempts: int = 5,
) -> tuple[Any, list[str]]:
    """IngestEvents as a well-behaved client does it: UNAVAILABLE ("retry the request"),
    ABORTED and RESOURCE_EXHAUSTED (a fair-share refusal) are retried after a short pause.
    Answers (reply or None, problems seen)."""
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
    # A client keeps within its project's share of the server: a batch waits here for a
    # sender (and its wait is part of its latency) rather than being refused there.
    pool = ThreadPoolExecutor(max_workers=SENDERS)
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


def feed_position(env: Env, tag: str = "main") -> int:
    """The last position of the project's membership feed: entry and exit events recorded
    so far."""
    with env.engine.connect() as conn:
        seq = conn.execute(
            text("SELECT last_seq FROM feed_positions WHERE project_id = :p"),
            {"p": env.dataset.project(tag).id},
        ).scalar()
    return int(seq or 0)


# The tables a batch writes, whose autovacuum and autoanalyze runs are counted.
WRITTEN_TABLES = ("events", "contacts", "segment_members", "segments", "feed_positions")


def db_activity(env: Env) -> dict[str, int] | None:
    """Checkpoints so far (pg_stat_checkpointer from PostgreSQL 17, pg_stat_bgwriter
    before) and autovacuum / autoanalyze runs of the tables a batch writes, or None where
    they cannot be read."""
    try:
        with env.engine.connect() as conn:
            version = int(conn.execute(text("SHOW server_version_num")).scalar_one())
            view, timed, requested = (
                ("pg_stat_checkpointer", "num_timed", "num_requested")
                if version >= 170000
                else ("pg_stat_bgwriter", "checkpoints_timed", "checkpoints_req")
            )
            checkpoints = conn.execute(text(f"SELECT {timed} + {requested} FROM {view}")).one()
            vacuums = conn.execute(
                text(
                    "SELECT coalesce(sum(autovacuum_count), 0), coalesce(sum(autoanalyze_count), 0)"
                    " FROM pg_stat_user_tables WHERE relname = ANY(:t)"
                ),
                {"t": list(WRITTEN_TABLES)},
            ).one()
    except DBAPIError:
        return None
    return {
        "checkpoints": int(checkpoints[0]),
        "autovacuums": int(vacuums[0]),
        "autoanalyzes": int(vacuums[1]),
    }


def activity_between(
    before: dict[str, int] | None, after: dict[str, int] | None
) -> dict[str, int] | None:
    """What db_activity counted between two readings."""
    if before is None or after is None:
        return None
    return {k: after[k] - before[k] for k in before}


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
    before, activity = wal_totals(env), db_activity(env)
    tput = throughput(stack, key, batches, env.args.ingest_workers)
    tput["wal_per_1000_events"] = wal_per_1000(before, wal_totals(env), tput["events"])
    tput["database_activity"] = activity_between(activity, db_activity(env))
    log(
        f"    throughput: {tput['events_per_second']:,} events/s "
        f"(batch p50 {tput['batch_ms']['median']} ms)"
    )
    track = tracking(
        env,
        stack,
        key,
        tracked[RECENT_BUYERS],
        env.args.tracking_rate,
        env.args.tracking_batch,
        env.args.tracking_seconds,
    )
    log(
        f"    tracking latency at {track['achieved_rate']} events/s: "
        f"p50 {track['latency_s']['median']} s, p95 {track['latency_s']['p95']} s, "
        f"missing {track['missing']}"
    )
    out: dict[str, Any] = {"tracked_segments": tracked_create, "throughput": tput}
    out["tracking"] = track
    try:
        out["database_limits"] = database_limits(env, pool, rng)
    except Exception as err:  # the figures above stand without these
        log(traceback.format_exc())
        out["database_limits"] = {"error": " ".join(f"{type(err).__name__}: {err}".split())}
    try:
        out["ladder"] = ladder(env, stack, pool, rng, out["database_limits"], tracked)
    except Exception as err:
        log(traceback.format_exc())
        # One line: an RPC error's text spans several.
        out["ladder"] = {"error": " ".join(f"{type(err).__name__}: {err}".split())}
    return out


LIMIT_BATCH = 1000


def database_limits(env: Env, pool: Sequence[str], rng: random.Random) -> dict[str, Any]:
    """What the database itself accepts of the rows IngestEvents stores: the same event rows
    (contact, name, data, instant) written by one connection in transactions of 1,000 rows,
    through psycopg's `executemany` and through binary COPY, into a scratch table with the
    events table's columns, defaults, indexes and checks (no foreign keys), dropped afterwards."""
    events = max(2 * LIMIT_BATCH, env.args.ingest_events // 6)
    project = env.dataset.project("main")
    with env.engine.connect() as db:
        ids: dict[str, uuid.UUID] = dict(
            db.execute(
                text("SELECT email, id FROM contacts WHERE project_id = :p AND email = ANY(:e)"),
                {"p": project.id, "e": list(pool)},
            ).all()
        )
    emails = [e for e in pool if e in ids]
    names = event_names(rng, events)
    rows: list[tuple[Any, ...]] = []
    for name in names:
        item = ingest_item(emails[rng.randrange(len(emails))], name, rng)
        data = json_format.MessageToDict(item.data) if item.HasField("data") else {}
        rows.append((uuid.UUID(project.id), ids[item.email], name, Jsonb(data)))
    raw = env.engine.raw_connection()
    try:
        driver = raw.driver_connection
        assert isinstance(driver, psycopg.Connection)
        conn: psycopg.Connection[Any] = driver
        conn.autocommit = False
        with conn.cursor() as cur:
            cur.execute("DROP TABLE IF EXISTS bench_ingest_scratch")
            cur.execute("CREATE TABLE bench_ingest_scratch (LIKE events INCLUDING ALL)")
        conn.commit()
        out: dict[str, Any] = {"events": len(rows), "batch_size": LIMIT_BATCH}
        try:
            for method in ("executemany", "copy"):
                started = time.perf_counter()
                for start in range(0, len(rows), LIMIT_BATCH):
                    chunk = rows[start : start + LIMIT_BATCH]
                    with conn.cursor() as cur:
                        if method == "executemany":
                            cur.executemany(
                                "INSERT INTO bench_ingest_scratch "
                                "(project_id, contact_id, name, data) VALUES (%s, %s, %s, %s)",
                                chunk,
                            )
                        else:
                            with cur.copy(
                                "COPY bench_ingest_scratch (project_id, contact_id, name, data) "
                                "FROM STDIN (FORMAT BINARY)"
                            ) as copy:
                                copy.set_types(["uuid", "uuid", "text", "jsonb"])
                                for row in chunk:
                                    copy.write_row(row)
                    conn.commit()
                seconds = time.perf_counter() - started
                out[method] = {
                    "seconds": round(seconds, 2),
                    "events_per_second": round(len(rows) / seconds),
                }
                log(
                    f"    the database's own limit, {method}: {round(len(rows) / seconds):,} events/s"
                )
        finally:
            conn.rollback()
            with conn.cursor() as cur:
                cur.execute("DROP TABLE IF EXISTS bench_ingest_scratch")
            conn.commit()
    finally:
        raw.close()
    return out


def ladder(
    env: Env,
    stack: Stack,
    pool: Sequence[str],
    rng: random.Random,
    limits: dict[str, Any],
    tracked: dict[str, str],
) -> dict[str, Any]:
    """Throughput with 5, 50 and 200 tracked segments (--ladder-steps): the phase's five,
    then the ladder's conditions (scenarios.ladder_segment) created up to each step, each
    step's run as long as the others (a warm-up, then a third of --ingest-events), and the
    entry/exit events each step's run recorded per 1,000 events.

    At 50 tracked segments, the tracking latency of a paced stream at
    --ladder-tracking-rate events/s in batches of --ladder-tracking-batch (`tracking`).
    After the last step, one more run with every segment still there, of events whose
    names none of them reads (`unread`): what an event costs that can change no segment.
    The ladder's segments are deleted at the end."""
    key = env.keys["main"]
    seg = stack.server.segments
    workers = env.args.ingest_workers
    events = max(2 * LIMIT_BATCH, env.args.ingest_events // 3)
    created: list[str] = []
    conditions = [condition for _name, condition in scenarios.TRACKED]
    kinds: dict[str, int] = {}
    create_ms: list[float] = []
    steps: dict[str, Any] = {}
    out: dict[str, Any] = {}

    def timed(phase: str, batches: Sequence[events_pb2.IngestEventsRequest]) -> dict[str, Any]:
        wal, activity, feed = wal_totals(env), db_activity(env), feed_position(env)
        # A phase of its own: the other processes' CPU and PostgreSQL's background work
        # (autovacuum) meanwhile are accounted to this run alone.
        with stack.sampler.phase(phase):
            run = throughput(stack, key, batches, workers)
        run["wal_per_1000_events"] = wal_per_1000(wal, wal_totals(env), run["events"])
        run["database_activity"] = activity_between(activity, db_activity(env))
        run["membership_events_per_1000_events"] = round(
            (feed_position(env) - feed) * 1000 / run["events"]
        )
        run["other_processes_cpu"] = stack.sampler.foreign_load().get(phase)
        run["postgres_background_cpu_seconds"] = stack.sampler.background_load().get(phase)
        for method in ("executemany", "copy"):
            limit = limits.get(method)
            if isinstance(limit, dict):
                run[f"fraction_of_{method}"] = round(
                    run["events_per_second"] / limit["events_per_second"], 3
                )
        return run

    try:
        for step in env.args.ladder_steps:
            while len(scenarios.TRACKED) + len(created) < step:
                name, kind, condition = scenarios.ladder_segment(len(created), created)
                ms, segment = create_segment(stack, key, name, condition, track=True)
                created.append(segment.id)
                conditions.append(condition)
                kinds[kind] = kinds.get(kind, 0) + 1
                create_ms.append(ms)
            throughput(stack, key, build_batches(pool, 5_000, 1000, rng, f"warm-{step}"), workers)
            batches = build_batches(pool, events, 1000, rng, f"ladder-{step}")
            run = timed(f"ingestion_{step}_segments", batches)
            run["tracked_segments"] = step
            steps[str(step)] = run
            log(
                f"    {step} tracked segments: {run['events_per_second']:,} events/s "
                f"(batch p50 {run['batch_ms']['median']} ms, p95 {run['batch_ms']['p95']} ms; "
                f"{run['membership_events_per_1000_events']:,} entries and exits per 1,000)"
            )
            if step == LADDER_TRACKING_STEP:
                with stack.sampler.phase(f"tracking_{step}_segments"):
                    track = tracking(
                        env,
                        stack,
                        key,
                        tracked[RECENT_BUYERS],
                        env.args.ladder_tracking_rate,
                        env.args.ladder_tracking_batch,
                        env.args.tracking_seconds,
                    )
                out["tracking"] = {**track, "tracked_segments": step}
                log(
                    f"    tracking latency with {step} tracked segments at "
                    f"{track['achieved_rate']} events/s: p50 {track['latency_s']['median']} s, "
                    f"p95 {track['latency_s']['p95']} s, missing {track['missing']}"
                )
        read = names_read(conditions)
        unread_names = [n for n in load.EVENT_NAMES if n not in read]
        if unread_names:
            last = len(scenarios.TRACKED) + len(created)
            batches = build_batches(pool, events, 1000, rng, "ladder-unread", unread_names)
            run = timed(f"ingestion_{last}_segments_unread", batches)
            run["tracked_segments"] = last
            run["names"] = unread_names
            out["unread"] = run
            log(
                f"    {last} tracked segments, events of {len(unread_names)} names none reads: "
                f"{run['events_per_second']:,} events/s (batch p50 {run['batch_ms']['median']} "
                f"ms)"
            )
    finally:
        for segment_id in reversed(created):
            seg.DeleteSegment(
                segments_pb2.DeleteSegmentRequest(id=segment_id), metadata=md(key), timeout=600
            )
    first = steps[str(env.args.ladder_steps[0])]["events_per_second"]
    ratios = {k: round(v["events_per_second"] / first, 3) for k, v in steps.items()}
    if "unread" in out:
        ratios["unread"] = round(out["unread"]["events_per_second"] / first, 3)
    return {
        "steps": steps,
        **out,
        "segment_kinds": kinds,
        "create_ms": summary(create_ms, 1),
        "ratio_to_five": ratios,
    }
