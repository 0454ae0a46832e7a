"""The event insert of IngestEvents against binary COPY, into the real `events` table:
`python -m bench.insert_paths --contacts 100000`.

On the benchmark's database (loaded by `make bench` at that size), one connection writes
batches of 1,000 events like the bench's for existing contacts, each in a transaction
rolled back afterwards, alternating two ways:

- `statement`: what `events.ingest` runs, one INSERT ... SELECT over a JSON array of the
  rows (events.insert_events_counted);
- `copy`: binary COPY into `events` with psycopg's `write_row`, the instant of rows
  without one read once from the transaction, as a COPY path would have to.

Both fire the table's trigger (event_stats) and write its indexes. Prints the medians per
batch (BENCHMARKS.md, "Ingestion: where a batch's time goes")."""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
import uuid
from collections.abc import Sequence
from typing import Any

from psycopg.types.json import Jsonb
from sqlalchemy import Engine, text

from bench.cli import parse_args
from bench.dataset import prepare_dataset
from bench.phases.ingestion import event_names
from segments_service import database
from segments_service.events import NewEvent, insert_events_counted

_COPY = "COPY events (project_id, contact_id, name, data, occurred_at) FROM STDIN (FORMAT BINARY)"


def batch(contacts: Sequence[uuid.UUID], rng: random.Random) -> list[NewEvent]:
    return [
        NewEvent(contacts[rng.randrange(len(contacts))], name, {"amount": 12.5})
        if name == "purchase"
        else NewEvent(contacts[rng.randrange(len(contacts))], name, {})
        for name in event_names(rng, 1000)
    ]


def by_statement(engine: Engine, project_id: uuid.UUID, events: Sequence[NewEvent]) -> float:
    with database.make_sessionmaker(engine)() as session:
        started = time.perf_counter()
        insert_events_counted(session, project_id, events)
        took = time.perf_counter() - started
        session.rollback()
    return took


def by_copy(engine: Engine, project_id: uuid.UUID, events: Sequence[NewEvent]) -> float:
    raw = engine.raw_connection()
    try:
        conn: Any = raw.driver_connection
        started = time.perf_counter()
        with conn.cursor() as cur:
            now = cur.execute("SELECT now()").fetchone()[0]
            with cur.copy(_COPY) as copy:
                copy.set_types(["uuid", "uuid", "text", "jsonb", "timestamptz"])
                for e in events:
                    copy.write_row(
                        (project_id, e.contact_id, e.name, Jsonb(e.data), e.occurred_at or now)
                    )
        took = time.perf_counter() - started
        conn.rollback()
    finally:
        raw.close()
    return took


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.insert_paths", description=__doc__)
    p.add_argument("--contacts", type=int, default=100_000, help="the bench dataset's size")
    p.add_argument("--batches", type=int, default=30, help="timed batches per way")
    own = p.parse_args(argv)
    url, dataset, _handle = prepare_dataset(parse_args(["--contacts", str(own.contacts)]))
    engine = database.make_engine(url, pool_size=2)
    project_id = uuid.UUID(dataset.project("main").id)
    with engine.connect() as conn:
        contacts = list(
            conn.execute(
                text("SELECT id FROM contacts WHERE project_id = :p LIMIT 50000"),
                {"p": project_id},
            ).scalars()
        )
    rng = random.Random(1)
    ways = {"statement": by_statement, "copy": by_copy}
    ms: dict[str, list[float]] = {name: [] for name in ways}
    for i in range(own.batches + 3):
        for name, way in ways.items():
            took = way(engine, project_id, batch(contacts, rng))
            if i >= 3:  # a warm-up of three each
                ms[name].append(1000 * took)
    engine.dispose()
    out = {
        f"{name}_ms_per_1000": round(statistics.median(values), 2) for name, values in ms.items()
    }
    out["copy_vs_statement"] = round(out["copy_ms_per_1000"] / out["statement_ms_per_1000"], 3)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
