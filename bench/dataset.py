"""The dataset being measured, reused while the flags that made it are unchanged, and the
bench's own connections to its database."""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url

from bench import load
from bench.context import log
from bench.stack import ROOT
from segments_service import auth, database

GENERATOR_VERSION = 4


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


def check_disk(data_dir: Path, specs: list[load.ProjectSpec]) -> None:
    """Refuse a load the embedded server's disk cannot hold, before it starts."""
    wal = data_dir / "postgres" / "pg_wal"
    held = sum(f.stat().st_size for f in wal.iterdir() if f.is_file()) if wal.is_dir() else 0
    max_wal = int(database.embedded_settings()["max_wal_size"].removesuffix("GB")) * 2**30
    needed = load.disk_needed(specs, max(0, max_wal - held))
    free = shutil.disk_usage(data_dir).free
    if free < needed:
        contacts = sum(spec.contacts for spec in specs)
        events = sum(spec.events + spec.email_events for spec in specs)
        raise SystemExit(
            f"bench: loading {contacts:,} contacts and {events:,} events needs about "
            f"{needed / 2**30:.0f} GB on {data_dir}, and {free / 2**30:.0f} GB are free: free "
            "some space, use fewer --other-projects or --scale points, or another server "
            "(--database-url)"
        )
    log(f"disk: the load needs about {needed / 2**30:.0f} GB, {free / 2**30:.0f} GB free")


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
    specs = load.plan_projects(
        args.contacts,
        args.events,
        args.email_events,
        args.other_projects,
        args.other_contacts,
        args.scale,
    )
    log(f"loading dataset into database {args.database_name} ...")
    database.drop_database(database.sqlalchemy_url(admin), args.database_name)
    if handle is not None:
        check_disk(data_dir, specs)
    database.create_database(database.sqlalchemy_url(admin), args.database_name)
    database.migrate(url)
    engine = database.make_engine(url, pool_size=1, application_name="segments-bench-load")
    sessions = database.make_sessionmaker(engine)

    def create_project(name: str) -> str:
        with sessions.begin() as session:
            return auth.create_project(session, name)["id"]

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
