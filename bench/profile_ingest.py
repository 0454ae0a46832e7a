"""One IngestEvents batch taken apart: `python -m bench.profile_ingest --contacts 100000`.

On the benchmark's database (loaded by `make bench` at that size), in this process and one
transaction a batch, as the server runs them (`events.ingest`, its engine settings): the
main project's segments are replaced by N tracked ones (the ingestion phase's five, then
scenarios.ladder_segment), batches of 1,000 events like the bench's are ingested one after
the other, and each SQL statement is timed by the service function that issued it. With
`--explain`, every statement of one more batch is first run under EXPLAIN (ANALYZE,
BUFFERS, WAL) in a savepoint rolled back: the server's planning and execution time, pages
touched and WAL of each. WAL per batch from pg_current_wal_insert_lsn() around the timed
batches. Prints one JSON document (BENCHMARKS.md, "Ingestion: where a batch's time goes").
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, event, text
from sqlalchemy.orm import Session, sessionmaker

from bench import load, scenarios
from bench.cli import parse_args
from bench.dataset import prepare_dataset
from bench.phases.ingestion import event_names, names_read
from segments_service import database, events, segments

_SERVICE = str(Path(segments.__file__).resolve().parent)


def caller() -> str:
    """The innermost service function on the stack: what issued the statement."""
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_filename.startswith(_SERVICE):
            return frame.f_code.co_name
        frame = frame.f_back  # type: ignore[assignment]
    return "?"


def heaviest(plan: dict[str, Any], top: int = 6) -> list[dict[str, Any]]:
    """The plan nodes that touched the most shared buffers themselves (their children's
    subtracted), with their time and loops."""
    nodes: list[dict[str, Any]] = []

    def walk(node: dict[str, Any]) -> None:
        children = node.get("Plans", [])
        own = node.get("Shared Hit Blocks", 0) + node.get("Shared Read Blocks", 0)
        own -= sum(c.get("Shared Hit Blocks", 0) + c.get("Shared Read Blocks", 0) for c in children)
        nodes.append(
            {
                "node": " ".join(
                    str(node[k])
                    for k in ("Node Type", "Relation Name", "Index Name", "Subplan Name")
                    if k in node
                ),
                "own_buffers": own,
                "loops": node.get("Actual Loops"),
                "rows": node.get("Actual Rows"),
                "total_ms": node.get("Actual Total Time"),
                "filter": str(node.get("Filter", node.get("Index Cond", "")))[:160],
            }
        )
        for child in children:
            walk(child)

    walk(plan)
    return sorted(nodes, key=lambda n: -n["own_buffers"])[:top]


class Timings:
    """before/after_cursor_execute listeners: seconds per issuing function, and with
    `explain` set, EXPLAIN ANALYZE of each statement before it runs."""

    def __init__(self, engine: Engine) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.explain = False
        self.plans: list[dict[str, Any]] = []
        self._started: list[tuple[str, float]] = []
        event.listen(engine, "before_cursor_execute", self.before)
        event.listen(engine, "after_cursor_execute", self.after)

    def before(
        self, conn: Any, cursor: Any, statement: str, params: Any, _ctx: Any, _many: bool
    ) -> None:
        who = caller()
        if self.explain and statement.lstrip().upper().startswith(("SELECT", "INSERT", "WITH")):
            raw = cursor.connection
            raw.execute("SAVEPOINT explained")
            doc = raw.execute(
                "EXPLAIN (ANALYZE, BUFFERS, WAL, FORMAT JSON) " + statement, params
            ).fetchone()[0][0]
            raw.execute("ROLLBACK TO SAVEPOINT explained")
            plan = doc["Plan"]
            self.plans.append(
                {
                    "caller": who,
                    "planning_ms": round(doc["Planning Time"], 2),
                    "execution_ms": round(doc["Execution Time"], 2),
                    "shared_hit": plan.get("Shared Hit Blocks", 0),
                    "shared_read": plan.get("Shared Read Blocks", 0),
                    "shared_dirtied": plan.get("Shared Dirtied Blocks", 0),
                    "wal_records": plan.get("WAL Records", 0),
                    "wal_fpi": plan.get("WAL FPI", 0),
                    "wal_bytes": plan.get("WAL Bytes", 0),
                    "statement_chars": len(statement),
                    "heaviest_nodes": heaviest(plan),
                }
            )
        self._started.append((who, time.perf_counter()))

    def after(self, *_args: Any) -> None:
        who, started = self._started.pop()
        self.seconds[who] += time.perf_counter() - started
        self.calls[who] += 1

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()


def batches(
    emails: Sequence[str],
    count: int,
    rng: random.Random,
    tag: str,
    names: Sequence[str] = load.EVENT_NAMES,
) -> list[list[events.IngestItem]]:
    """Like the bench's batches: 1,000 events (names drawn from `names`), 2% of them for
    new contacts."""
    out = []
    for b in range(count):
        items = []
        for i, name in enumerate(event_names(rng, 1000, names)):
            if rng.random() < 0.02:
                email = f"profile-{tag}-{b}-{i}@{load.NEW_CONTACT_DOMAIN}"
            else:
                email = emails[rng.randrange(len(emails))]
            data = {"amount": round(5 + rng.random() * 200, 2)} if name == "purchase" else {}
            items.append(events.IngestItem(email, name, None, data))
        out.append(items)
    return out


def replace_segments(
    sessions: sessionmaker[Session], project_id: uuid.UUID, n: int
) -> list[dict[str, Any]]:
    """Replace the project's segments by `n` tracked ones; answers their conditions."""
    with sessions.begin() as session:
        ids = session.execute(
            text("SELECT id FROM segments WHERE project_id = :p ORDER BY created_at DESC"),
            {"p": project_id},
        ).scalars()
        for segment_id in list(ids):
            segments.delete_segment(session, project_id, segment_id)
    made: list[str] = []
    conditions = []
    for i in range(n):
        if i < len(scenarios.TRACKED):
            name, condition = scenarios.TRACKED[i]
        else:
            name, _kind, condition = scenarios.ladder_segment(i - len(scenarios.TRACKED), made)
        with sessions.begin() as session:
            view = segments.create_segment(
                session,
                project_id,
                name=name,
                description=None,
                segment_type="DYNAMIC",
                condition_json=condition,
                track_membership=True,
                inline_contacts=10**9,
            )
        conditions.append(condition)
        if i >= len(scenarios.TRACKED):
            made.append(str(view.row.id))
    return conditions


def wal_lsn(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(text("SELECT pg_current_wal_insert_lsn() - '0/0'::pg_lsn")).scalar_one()
        )


def profile(
    engine: Engine,
    timings: Timings,
    project_id: uuid.UUID,
    emails: Sequence[str],
    n: int,
    count: int,
    explain: bool,
    unread: bool = False,
) -> dict[str, Any]:
    sessions = database.make_sessionmaker(engine)
    started = time.perf_counter()
    conditions = replace_segments(sessions, project_id, n)
    create_s = time.perf_counter() - started
    rng = random.Random(n)
    names: Sequence[str] = load.EVENT_NAMES
    if unread:
        read = names_read(conditions)
        names = [name for name in load.EVENT_NAMES if name not in read]
    for items in batches(emails, 5, rng, f"warm{n}", names):
        with sessions.begin() as session:
            events.ingest(session, project_id, items)
    timed = batches(emails, count, rng, f"run{n}", names)
    timings.reset()
    wal = wal_lsn(engine)
    walls = []
    for items in timed:
        t0 = time.perf_counter()
        with sessions.begin() as session:
            events.ingest(session, project_id, items)
        walls.append(time.perf_counter() - t0)
    wal_bytes = wal_lsn(engine) - wal
    wall = sum(walls)
    sql = dict(timings.seconds)
    out: dict[str, Any] = {
        "tracked_segments": n,
        "names": "every name" if not unread else names,
        "create_seconds": round(create_s, 1),
        "batches": count,
        "batch_ms": round(1000 * wall / count, 2),
        "sql_ms_per_batch": {
            k: {"ms": round(1000 * v / count, 2), "calls": timings.calls[k] / count}
            for k, v in sorted(sql.items(), key=lambda kv: -kv[1])
        },
        "python_ms_per_batch": round(1000 * (wall - sum(sql.values())) / count, 2),
        "wal_kb_per_batch": round(wal_bytes / count / 1024, 1),
    }
    if explain:
        timings.plans.clear()
        timings.explain = True
        try:
            with sessions.begin() as session:
                explained = batches(emails, 1, rng, f"explain{n}", names)[0]
                events.ingest(session, project_id, explained)
        finally:
            timings.explain = False
        out["explained"] = list(timings.plans)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.profile_ingest", description=__doc__)
    p.add_argument("--contacts", type=int, default=100_000, help="the bench dataset's size")
    p.add_argument("--segments", default="5,50", help="tracked segment counts, comma-separated")
    p.add_argument("--batches", type=int, default=20, help="timed batches per count")
    p.add_argument("--explain", action="store_true", help="EXPLAIN ANALYZE one more batch")
    p.add_argument(
        "--unread",
        action="store_true",
        help="events only of the names none of the segments reads",
    )
    own = p.parse_args(argv)
    args = parse_args(["--contacts", str(own.contacts)])
    url, dataset, _handle = prepare_dataset(args)
    engine = database.make_engine(url, pool_size=2)
    timings = Timings(engine)
    project_id = uuid.UUID(dataset.project("main").id)
    with engine.connect() as conn:
        emails = list(
            conn.execute(
                text(
                    "SELECT email FROM contacts WHERE project_id = :p "
                    f"AND email NOT LIKE '%@{load.NEW_CONTACT_DOMAIN}' LIMIT 300000"
                ),
                {"p": project_id},
            ).scalars()
        )
    results = [
        profile(engine, timings, project_id, emails, int(n), own.batches, own.explain, own.unread)
        for n in own.segments.split(",")
    ]
    replace_segments(database.make_sessionmaker(engine), project_id, 0)
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
