"""A streaming standby for the reads that may lag: the throughput of a listing and export mix
served by the primary alone and with the standby, and the standby's lag under ingestion.

    python -m bench.replica                          # 100k contacts, 20 s a mix, 8 readers
    python -m bench.replica --contacts 20000 --seconds 10

The embedded PostgreSQL of .data/ (SEGMENTS_DATA_DIR), a database of its own kept between
runs (`segments_bench_replica_<size>`), one project of `--contacts` contacts (loaded through
BatchUpsertContacts) and a segment of a quarter of them. Its standby is copied into
.data/standby-<database> as `segments run --replica` copies it (standby.py), and removed at
the end with its slot.

The mix, `--readers` concurrent gRPC callers for `--seconds` each way after a warm-up, each
repeating: a ListContacts page of 50 (its first page counts the project), a
ListSegmentContacts page at a random offset, ListSegments, and every 10th round an
ExportSegmentContacts of the whole segment. Once on a server with the primary alone, once on
a server with DATABASE_REPLICA_URL; both on this machine, sharing its cores: the standby adds
no CPU here, so what it shows is where the reads' database work goes (the CPU seconds of each
server's postgres processes), not more capacity.

Lag under ingestion: IngestEvents batches of 1,000 events on the project's contacts from
`--writers` callers for `--ingest-seconds`, while the lag is measured every 100 ms as the
servers measure it (replica.Replica): the seconds and bytes of WAL the standby is behind.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil
from prometheus_client import REGISTRY
from sqlalchemy import text
from sqlalchemy.engine import make_url

from bench.context import log, md, size_label, until_ready
from bench.measure import summary
from bench.stack import ROOT, Server
from segments_api.v1 import contacts_pb2, events_pb2, resources_pb2, segments_pb2
from segments_service import auth
from segments_service.config import DEFAULT_REPLICA_MAX_LAG
from segments_service.database import (
    create_database,
    make_engine,
    make_sessionmaker,
    migrate,
    sqlalchemy_url,
    start_embedded,
)
from segments_service.errors import NotFound
from segments_service.replica import Replica
from segments_service.standby import drop_slot, start_standby

PROJECT = "bench replica"
PLANS = ("free", "starter", "pro", "team")
PORT = 5434
BATCH = 1000


def _project_key(sessions: Any) -> tuple[str, str]:
    with sessions.begin() as session:
        try:
            project_id = auth.find_project(session, PROJECT).id
        except NotFound:
            project_id = uuid.UUID(auth.create_project(session, PROJECT)["id"])
        return str(project_id), auth.issue_key(session, project_id, "secret")


def _contacts(engine: Any, project_id: str) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(
                text("SELECT count(*) FROM contacts WHERE project_id = :p"), {"p": project_id}
            ).scalar_one()
        )


def _load(server: Server, key: str, have: int, wanted: int) -> float:
    """Contacts `have`..`wanted` through BatchUpsertContacts; contacts a second."""
    started = time.perf_counter()

    def batch(first: int) -> None:
        request = contacts_pb2.BatchUpsertContactsRequest()
        for i in range(first, min(first + BATCH, wanted)):
            item = request.contacts.add(email=f"c{i}@bench.example")
            item.data.update({"plan": PLANS[i % len(PLANS)], "n": i})
        server.contacts.BatchUpsertContacts(request, metadata=md(key), timeout=120)

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(batch, range(have, wanted, BATCH)))
    return (wanted - have) / (time.perf_counter() - started)


def _segment(server: Server, key: str) -> Any:
    """The `plan = pro` segment, READY (built in the background at this size)."""
    listed = server.segments.ListSegments(segments_pb2.ListSegmentsRequest(), metadata=md(key))
    for segment in listed.segments:
        if segment.name == "Pro" and segment.status == resources_pb2.Segment.READY:
            return segment
    condition = resources_pb2.FilterCondition(logic=resources_pb2.FilterCondition.AND)
    group = condition.groups.add()
    group.filters.add(field="data.plan", operator="equals").value.string_value = "pro"
    return until_ready(
        server, key, segments_pb2.CreateSegmentRequest(name="Pro", condition=condition)
    )


def _cpu_seconds(postmaster_pid: int) -> float:
    """User + system CPU of a PostgreSQL server's processes (its postmaster's children)."""
    total = 0.0
    try:
        parent = psutil.Process(postmaster_pid)
        for proc in [parent, *parent.children()]:
            try:
                times = proc.cpu_times()
                total += times.user + times.system
            except psutil.Error:
                pass
    except psutil.Error:
        pass
    return total


def _postmaster(pgdata: Path) -> int:
    return int((pgdata / "postmaster.pid").read_text().split()[0])


@contextmanager
def _server(url: str, standby_url: str | None, log_path: Path) -> Iterator[Server]:
    saved = os.environ.get("DATABASE_REPLICA_URL")
    if standby_url is None:
        os.environ.pop("DATABASE_REPLICA_URL", None)
    else:
        os.environ["DATABASE_REPLICA_URL"] = standby_url
    try:
        server = Server(url, 60.0, log_path)
    finally:
        if saved is None:
            os.environ.pop("DATABASE_REPLICA_URL", None)
        else:
            os.environ["DATABASE_REPLICA_URL"] = saved
    try:
        yield server
    finally:
        server.stop()


def _mix(
    server: Server, key: str, segment: Any, readers: int, seconds: float, warmup: float
) -> dict[str, Any]:
    """`readers` callers repeating the mix; operations a second and latencies by kind."""
    pages = max(1, segment.member_count // 50)
    latencies: dict[str, list[float]] = {
        "list_contacts": [],
        "list_members": [],
        "list_segments": [],
        "export": [],
    }
    rows = [0]
    lock = threading.Lock()
    start = time.monotonic()
    measuring = start + warmup
    end = measuring + seconds

    def export() -> None:
        stream = server.segments.ExportSegmentContacts(
            segments_pb2.ExportSegmentContactsRequest(id=segment.id), metadata=md(key), timeout=300
        )
        got = sum(len(batch.contacts) for batch in stream)
        if got != segment.member_count:
            raise AssertionError(f"exported {got} of {segment.member_count}")
        with lock:
            rows[0] += got if time.monotonic() >= measuring else 0

    ops: list[tuple[str, Callable[[], Any]]] = [
        (
            "list_contacts",
            lambda: server.contacts.ListContacts(
                contacts_pb2.ListContactsRequest(limit=50), metadata=md(key), timeout=60
            ),
        ),
        (
            "list_members",
            lambda: server.segments.ListSegmentContacts(
                segments_pb2.ListSegmentContactsRequest(
                    id=segment.id, page=random.randint(1, pages), page_size=50
                ),
                metadata=md(key),
                timeout=60,
            ),
        ),
        (
            "list_segments",
            lambda: server.segments.ListSegments(
                segments_pb2.ListSegmentsRequest(), metadata=md(key), timeout=60
            ),
        ),
    ]

    def reader(index: int) -> None:
        round_ = index
        while time.monotonic() < end:
            chosen = list(ops)
            if round_ % 10 == 0:
                chosen.append(("export", export))
            for name, call in chosen:
                began = time.monotonic()
                call()
                done = time.monotonic()
                if measuring <= began and done <= end:
                    with lock:
                        latencies[name].append((done - began) * 1000)
            round_ += 1

    with ThreadPoolExecutor(readers) as pool:
        list(pool.map(reader, range(readers)))
    total = sum(len(v) for v in latencies.values())
    return {
        "operations_per_second": round(total / seconds, 1),
        "by_kind": {
            name: {"per_second": round(len(v) / seconds, 2), "ms": summary(v, 1)}
            for name, v in latencies.items()
        },
        "exported_rows_per_second": round(rows[0] / seconds),
    }


def _lag_under_ingestion(
    server: Server,
    key: str,
    contacts: int,
    writers: int,
    seconds: float,
    replica: Replica,
) -> dict[str, Any]:
    stop = threading.Event()
    sent = [0]
    lock = threading.Lock()

    def writer(index: int) -> None:
        rng = random.Random(index)
        while not stop.is_set():
            request = events_pb2.IngestEventsRequest()
            for _ in range(BATCH):
                item = request.events.add(
                    email=f"c{rng.randrange(contacts)}@bench.example", event="page_view"
                )
                item.data.update({"page": rng.randrange(100)})
            server.events.IngestEvents(request, metadata=md(key), timeout=120)
            with lock:
                sent[0] += BATCH

    lag_s: list[float] = []
    lag_bytes: list[float] = []
    with ThreadPoolExecutor(writers) as pool:
        started = time.monotonic()
        futures = [pool.submit(writer, i) for i in range(writers)]
        while time.monotonic() - started < seconds:
            replica.measure()
            lag_s.append(REGISTRY.get_sample_value("segments_replica_lag_seconds") or 0.0)
            lag_bytes.append(REGISTRY.get_sample_value("segments_replica_lag_bytes") or 0.0)
            time.sleep(0.1)
        stop.set()
        for future in futures:
            future.result()
        elapsed = time.monotonic() - started
    over = sum(1 for v in lag_s if v > DEFAULT_REPLICA_MAX_LAG)
    return {
        "events_per_second": round(sent[0] / elapsed),
        "samples": len(lag_s),
        "lag_seconds": summary(lag_s, 3),
        "lag_kib": summary([b / 1024 for b in lag_bytes], 1),
        "share_over_default_bound": round(over / max(1, len(lag_s)), 3),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    data_dir = Path(os.environ.get("SEGMENTS_DATA_DIR", ROOT / ".data")).resolve()
    primary = start_embedded(data_dir)
    name = args.database_name or f"segments_bench_replica_{size_label(args.contacts)}"
    create_database(primary.get_uri(), name)
    url = make_url(sqlalchemy_url(primary.get_uri())).set(database=name)
    url_text = url.render_as_string(hide_password=False)
    migrate(url_text)
    engine = make_engine(url_text, pool_size=2)
    project_id, key = _project_key(make_sessionmaker(engine))
    logs = data_dir / "bench"
    results: dict[str, Any] = {
        "command": "python -m bench.replica "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None),
        "contacts": args.contacts,
        "load_average_start": [round(x, 2) for x in os.getloadavg()],
        "cpus": os.cpu_count(),
    }
    with _server(url_text, None, logs / "replica-primary.log") as server:
        have = _contacts(engine, project_id)
        if have < args.contacts:
            log(f"loading {args.contacts - have:,} contacts")
            results["load_contacts_per_second"] = round(_load(server, key, have, args.contacts))
        segment = _segment(server, key)
    log(f"segment of {segment.member_count:,} members")
    results["segment_members"] = segment.member_count
    # The standby's directory and slot are the database's: two runs never share them.
    pgdata = data_dir / f"standby-{name}"
    standby = start_standby(primary, pgdata, slot=name, port=PORT)
    standby_url = standby.url(name)
    try:
        primary_pid = _postmaster(data_dir / "postgres")
        standby_pid = _postmaster(pgdata)
        for mode, via in (("primary_only", None), ("with_standby", standby_url)):
            with _server(url_text, via, logs / f"replica-{mode}.log") as server:
                time.sleep(2)  # the server's first lag measurements
                before = (_cpu_seconds(primary_pid), _cpu_seconds(standby_pid))
                log(f"{mode}: {args.readers} readers for {args.seconds:.0f} s")
                mix = _mix(server, key, segment, args.readers, args.seconds, args.warmup)
                after = (_cpu_seconds(primary_pid), _cpu_seconds(standby_pid))
                mix["primary_postgres_cpu_seconds"] = round(after[0] - before[0], 1)
                mix["standby_postgres_cpu_seconds"] = round(after[1] - before[1], 1)
                results[mode] = mix
                log(f"    {mix['operations_per_second']} operations/s")
                if via is not None:
                    replica_engine = make_engine(standby_url, pool_size=1)
                    replica = Replica(
                        url_text,
                        standby_url,
                        make_sessionmaker(replica_engine),
                        make_sessionmaker(replica_engine),
                        DEFAULT_REPLICA_MAX_LAG,
                    )
                    log(f"ingestion: {args.writers} writers for {args.ingest_seconds:.0f} s")
                    try:
                        lag = _lag_under_ingestion(
                            server, key, args.contacts, args.writers, args.ingest_seconds, replica
                        )
                    finally:
                        replica.stop()
                        replica_engine.dispose()
                    results["lag_under_ingestion"] = lag
                    log(
                        f"    {lag['events_per_second']:,} events/s: lag median "
                        f"{lag['lag_seconds']['median']} s, max {lag['lag_seconds']['max']} s"
                    )
    finally:
        standby.stop()
        drop_slot(primary, name)
        shutil.rmtree(pgdata, ignore_errors=True)
        engine.dispose()
    results["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--contacts", type=int, default=100_000)
    parser.add_argument("--readers", type=int, default=8, help="concurrent readers of the mix")
    parser.add_argument("--seconds", type=float, default=20.0, help="each mix, measured")
    parser.add_argument("--warmup", type=float, default=3.0, help="each mix, not measured")
    parser.add_argument("--writers", type=int, default=4, help="concurrent IngestEvents callers")
    parser.add_argument("--ingest-seconds", type=float, default=20.0)
    parser.add_argument("--database-name", help="default: segments_bench_replica_<size>")
    parser.add_argument("--output", type=Path, help="default: bench/results-replica-<size>.json")
    args = parser.parse_args()
    output = args.output or ROOT / "bench" / f"results-replica-{size_label(args.contacts)}.json"
    del args.output
    results = run(args)
    output.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
