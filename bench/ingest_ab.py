"""What keeping `event_stats` costs ingestion: IngestEvents throughput with its insert
trigger on and off, with and without the former `events_by_name` index, in alternating
rounds on the benchmark database (`python -m bench.ingest_ab`, after `make bench` has
loaded the dataset).

The two layouts are the service's own (trigger on, no `events_by_name`) and the one before
migration 0006 (no trigger, `events_by_name` present); the other two separate the parts.
Rounds alternate so that whatever slows the machine meanwhile slows every layout alike;
medians are printed. With the trigger off, `event_stats` goes stale, so the database is
restored at the end: the trigger on, `events_by_name` gone and `event_stats` rebuilt from
`events` for the main project.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import sessionmaker

from bench import run, scenarios
from bench.measure import median
from bench.stack import Server

NAME_INDEX = "CREATE INDEX IF NOT EXISTS events_by_name ON events "
NAME_INDEX += "(project_id, name, occurred_at, contact_id)"
REBUILD = (
    "DELETE FROM event_stats WHERE project_id = :p",
    """INSERT INTO event_stats (project_id, name, contact_id, last_at)
       SELECT project_id, name, contact_id, max(occurred_at) FROM events WHERE project_id = :p
       GROUP BY project_id, name, contact_id ORDER BY project_id, name, contact_id""",
)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3, help="rounds per pair of layouts")
    p.add_argument("--events", type=int, default=60_000, help="events per round")
    p.add_argument("--workers", type=int, default=4, help="concurrent IngestEvents callers")
    own = p.parse_args(argv)
    args = run.parse_args([])
    url, dataset, _handle = run.prepare_dataset(args)
    engine = run.bench_engine(url)
    env = run.Env(args, url, engine, sessionmaker(engine, expire_on_commit=False), dataset)
    run.issue_keys(env)

    def sql(statement: str, **params: Any) -> None:
        with engine.connect() as conn:
            conn.execution_options(isolation_level="AUTOCOMMIT")
            conn.execute(text("SET statement_timeout = 0"))
            conn.execute(text(statement), params)

    def trigger(on: bool) -> None:
        sql(f"ALTER TABLE events {'ENABLE' if on else 'DISABLE'} TRIGGER event_stats_insert")

    results: dict[str, list[int]] = {}
    log_dir = Path(tempfile.mkdtemp(prefix="bench-ingest-ab-"))
    server = Server(url, 3600.0, log_dir / "server.log")
    stack: Any = type("AbStack", (), {"server": server})()
    key = env.keys["main"]
    rng = random.Random(7)
    try:
        for name, condition in scenarios.TRACKED:
            run.create_segment(stack, key, name, condition, track=True)
        pool = run.sample_emails(env, "main", min(300_000, dataset.project("main").contacts))
        run.throughput(stack, key, run.build_batches(pool, 5_000, 1000, rng, "abwarm"), 4)

        def rounds(layouts: list[tuple[str, bool]]) -> None:
            for r in range(own.rounds):
                for label, on in layouts:
                    trigger(on)
                    tag = f"ab{len(results.get(label, []))}{abs(hash(label)) % 997}r{r}"
                    batches = run.build_batches(pool, own.events, 1000, rng, tag)
                    got = run.throughput(stack, key, batches, own.workers)
                    results.setdefault(label, []).append(got["events_per_second"])
                    run.log(
                        f"  round {r + 1}: {label:<42} {got['events_per_second']:>7,} events/s "
                        f"(batch p50 {got['batch_ms']['median']} ms)"
                    )
                    sql("CHECKPOINT")

        sql("DROP INDEX IF EXISTS events_by_name")
        rounds([("event_stats kept, no events_by_name (now)", True), ("neither", False)])
        run.log("  creating events_by_name ...")
        sql(NAME_INDEX)
        sql("CHECKPOINT")
        rounds(
            [
                ("events_by_name, no event_stats (before)", False),
                ("event_stats kept and events_by_name", True),
            ]
        )
    finally:
        server.stop()
        run.log("  restoring: trigger on, events_by_name dropped, event_stats rebuilt ...")
        trigger(True)
        sql("DROP INDEX IF EXISTS events_by_name")
        main_id = dataset.project("main").id
        for statement in REBUILD:
            sql(statement, p=main_id)
        sql("VACUUM (ANALYZE) event_stats")
        engine.dispose()
    print()
    print("| layout | events/s, median | rounds |")
    print("|---|---|---|")
    for label, values in results.items():
        print(f"| {label} | {median(values):,.0f} | {', '.join(f'{v:,}' for v in values)} |")
    before = results.get("events_by_name, no event_stats (before)")
    now = results.get("event_stats kept, no events_by_name (now)")
    if before and now:
        print(f"\nnow / before: {median(now) / median(before):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
