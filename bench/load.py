"""The benchmark dataset: generated in SQL (generate_series + a seeded random()), straight into
the service's own tables, with a progress bar.

Layout (sizes are flags; the defaults are the issue's):
- `main`: N contacts, 10·N events over 180 days across 50 names, 3·N email-activity events;
- `tenant-1`, `tenant-2`: N/10 contacts each, same distributions (noise for the planner and
  the 100k point of the scale curve);
- `scale-<n>`: extra projects for scale-curve points no other project has (300k by default).

The projects share the tables as tenants do: their contacts go in interleaved, oldest
first, and their events as one stream in time order (see EVENTS_SELECT).

Contact ids are md5('<tag>:<n>')::uuid, so events can pick a contact by number without a
lookup table. Everything random comes from one seeded PostgreSQL session with parallel
query off, so the same flags give the same rows. Secondary indexes are dropped while rows
stream in and rebuilt afterwards (what a restore does); foreign-key triggers are skipped
for the load session only (`session_replication_role = replica`): every generated
reference is valid by construction. VACUUM ANALYZE at the end.
"""

from __future__ import annotations

import json
import math
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

import psycopg

# ~50 custom event names, most frequent first (the generator picks index floor(50·u^2.2),
# so page_view is ~17% of events and purchase ~2%).
EVENT_NAMES = (
    "page_view",
    "session_start",
    "product_viewed",
    "search",
    "login",
    "feature_used",
    "add_to_cart",
    "app_opened",
    "notification_clicked",
    "video_played",
    "checkout_started",
    "purchase",
    "logout",
    "file_downloaded",
    "wishlist_added",
    "remove_from_cart",
    "profile_updated",
    "share_clicked",
    "comment_posted",
    "file_uploaded",
    "push_opened",
    "video_completed",
    "form_submitted",
    "coupon_applied",
    "invite_sent",
    "subscription_renewed",
    "invoice_paid",
    "webinar_registered",
    "review_written",
    "support_ticket_opened",
    "support_ticket_closed",
    "survey_completed",
    "invite_accepted",
    "webinar_attended",
    "signup",
    "email_verified",
    "onboarding_completed",
    "trial_started",
    "trial_ended",
    "subscription_started",
    "plan_upgraded",
    "plan_downgraded",
    "password_reset",
    "download_whitepaper",
    "demo_requested",
    "app_installed",
    "invoice_failed",
    "refund",
    "subscription_cancelled",
    "account_deleted",
)
# Email activity, with cumulative shares; aliases (email.open, email.click) appear too.
EMAIL_ACTIVITY = (
    ("email.sent", 0.42),
    ("email.delivered", 0.80),
    ("email.opened", 0.905),
    ("email.open", 0.92),
    ("email.clicked", 0.965),
    ("email.click", 0.97),
    ("email.bounced", 0.993),
    ("email.complained", 1.0),
)
DOMAINS = (
    "gmail.com",
    "gmail.com",
    "gmail.com",
    "yahoo.com",
    "outlook.com",
    "hotmail.com",
    "icloud.com",
    "proton.me",
    "acme.io",
    "globex.com",
    "initech.net",
    "example.org",
)
COUNTRIES = ("US", "DE", "GB", "FR", "BR", "IN", "CA", "ES", "NL", "JP", "AU", "MX")
INDUSTRIES = ("software", "retail", "finance", "health", "education", "government", "media")
EVENT_DAYS = 180
CONTACT_DAYS = 730
CHUNK_ROWS = 500_000
# Contacts per slice of the interleaved load: each project's share of a slice is one run.
CONTACT_SLICE_ROWS = 25_000
# Disk a loaded row takes with its indexes (measured on generator 4's data: 700 B a
# contact, 350 B an event), and what the largest index build sorts (disk_needed).
BYTES_PER_CONTACT = 700
BYTES_PER_EVENT = 350
SORT_BYTES_PER_EVENT = 80
# Emails of contacts that ingestion creates: removed when the dataset is reused.
NEW_CONTACT_DOMAIN = "bench-new.example"
DATASET_TABLE = "bench_dataset"


@dataclass(frozen=True)
class ProjectSpec:
    tag: str
    contacts: int
    events: int
    email_events: int


@dataclass
class LoadedProject:
    tag: str
    id: str
    contacts: int
    events: int
    email_events: int


@dataclass
class Dataset:
    """What was loaded, stored in the bench database so a rerun can reuse it."""

    params: dict[str, Any]
    anchor: str
    projects: list[LoadedProject]
    max_event_id: int
    load_seconds: float
    rows_per_second: float
    phases: dict[str, float] = field(default_factory=dict)

    def project(self, tag: str) -> LoadedProject:
        return next(p for p in self.projects if p.tag == tag)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Dataset:
        projects = [LoadedProject(**p) for p in raw["projects"]]
        return cls(**{**raw, "projects": projects})


def plan_projects(
    contacts: int,
    events: int,
    email_events: int,
    other_projects: int,
    other_contacts: int,
    scale_points: Sequence[int],
) -> list[ProjectSpec]:
    """The main project, the other tenants, and projects for missing scale points."""
    per_contact = events / contacts
    email_per_contact = email_events / contacts

    def spec(tag: str, n: int) -> ProjectSpec:
        return ProjectSpec(tag, n, round(n * per_contact), round(n * email_per_contact))

    specs = [ProjectSpec("main", contacts, events, email_events)]
    specs += [spec(f"tenant-{i + 1}", other_contacts) for i in range(other_projects)]
    sizes = {s.contacts for s in specs}
    for point in scale_points:
        if point not in sizes:
            specs.append(spec(f"scale-{point}", point))
            sizes.add(point)
    return specs


class Progress:
    """A one-line progress bar on stderr (units done, rate, ETA)."""

    def __init__(self, label: str, total: int, unit: str = "rows") -> None:
        self.label = label
        self.unit = unit
        self.total = max(total, 1)
        self.done = 0
        self.started = time.perf_counter()
        self.tty = sys.stderr.isatty()
        self._last_print = time.perf_counter()

    def advance(self, rows: int) -> None:
        self.done += rows
        self.draw()

    def draw(self, final: bool = False) -> None:
        now = time.perf_counter()
        if not (final or (self.tty and self.done) or now - self._last_print > 5):
            return
        if not (final or self.tty) and self.done >= self.total:
            return  # finish() prints the last line
        self._last_print = now
        elapsed = now - self.started
        fraction = min(self.done / self.total, 1.0)
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else math.inf
        width = 30
        bar = "#" * int(width * fraction) + "." * (width - int(width * fraction))
        line = (
            f"  {self.label:<28} [{bar}] {fraction * 100:5.1f}% "
            f"{self.done:>11,}/{self.total:,} {self.unit}  {rate:>9,.0f}/s"
            + (f"  ETA {eta:4.0f}s" if math.isfinite(eta) and not final else f"  {elapsed:5.1f}s")
        )
        end = "\n" if final or not self.tty else ""
        sys.stderr.write(("\r" if self.tty else "") + line + end)
        sys.stderr.flush()

    def finish(self) -> None:
        self.done = self.total
        self.draw(final=True)


CONTACTS_SQL = """
INSERT INTO contacts (project_id, id, email, subscribed, data, created_at, updated_at)
SELECT %(project)s,
       md5(%(tag)s || ':' || r.n)::uuid,
       'user' || r.n || '@' || (%(domains)s::text[])[1 + floor(r.r0 * %(ndomains)s)::int],
       r.r1 < 0.9,
       jsonb_strip_nulls(jsonb_build_object(
           'plan', CASE WHEN r.r2 < 0.55 THEN 'free' WHEN r.r2 < 0.80 THEN 'starter'
                        WHEN r.r2 < 0.95 THEN 'pro' WHEN r.r2 < 0.99 THEN 'enterprise' END,
           -- a number for most, a string ("42") for some, missing for the rest
           'age', CASE WHEN r.r3 < 0.85 THEN to_jsonb(18 + floor(r.r4 * 62)::int)
                       WHEN r.r3 < 0.90 THEN to_jsonb((18 + floor(r.r4 * 62)::int)::text) END,
           'score', round((r.r5 * 100)::numeric, 2),
           'vip', r.r6 < 0.05,
           'country', (%(countries)s::text[])[1 + floor(power(r.r7, 1.6) * %(ncountries)s)::int],
           'lastPurchaseAt', CASE WHEN r.r8 < 0.6 THEN to_char(
                %(anchor)s::timestamptz - r.r9 * interval '365 days',
                'YYYY-MM-DD"T"HH24:MI:SS"Z"') END,
           'company', CASE WHEN r.r10 < 0.4 THEN jsonb_build_object(
                'name', 'Company ' || floor(r.r11 * 50000)::int,
                'size', 1 + floor(power(r.r12, 3) * 5000)::int,
                'industry', (%(industries)s::text[])[1 + floor(r.r13 * %(nindustries)s)::int]) END,
           'phone', CASE WHEN r.r14 < 0.3
                         THEN '+1555' || lpad(floor(r.r15 * 1e7)::int::text, 7, '0') END,
           'ltv', CASE WHEN r.r2 >= 0.55 THEN round((power(r.r5, 2) * 5000)::numeric, 2) END,
           -- an array of tags for three quarters of the contacts (vip in one array in 25:
           -- 3 contacts in 100; many arrays empty), the bare string "vip" for 1 in 200
           -- (a string, never an array holding it)
           'tags', CASE WHEN r.h0 < 0.25 THEN NULL
                        WHEN r.h0 < 0.255 THEN to_jsonb('vip'::text)
                        ELSE to_jsonb(array_remove(ARRAY[
                            CASE WHEN r.h1 < 0.04 THEN 'vip' END,
                            CASE WHEN r.h2 < 0.35 THEN 'newsletter' END,
                            CASE WHEN r.h3 < 0.12 THEN 'beta' END,
                            CASE WHEN r.h4 < 0.08 THEN 'churn-risk' END,
                            CASE WHEN r.h5 < 0.05 THEN 'partner' END], NULL)) END,
           -- a fifth are on a trial ending between 30 days before the anchor and 60 after
           'trialEndsAt', CASE WHEN r.h6 < 0.2 THEN to_char(
                %(anchor)s::timestamptz + (r.h7 * 90 - 30) * interval '1 day',
                'YYYY-MM-DD"T"HH24:MI:SS"Z"') END
       )) || CASE WHEN r.r16 < 0.05 THEN '{"nickname": null}'::jsonb ELSE '{}'::jsonb END,
       r.created_at,
       r.created_at + r.r17 * (%(anchor)s::timestamptz - r.created_at)
FROM (
    SELECT n,
           ('x' || substr(m.m0, 1, 8))::bit(32)::bigint / 4294967296.0 AS h0,
           ('x' || substr(m.m0, 9, 8))::bit(32)::bigint / 4294967296.0 AS h1,
           ('x' || substr(m.m0, 17, 8))::bit(32)::bigint / 4294967296.0 AS h2,
           ('x' || substr(m.m0, 25, 8))::bit(32)::bigint / 4294967296.0 AS h3,
           ('x' || substr(m.m1, 1, 8))::bit(32)::bigint / 4294967296.0 AS h4,
           ('x' || substr(m.m1, 9, 8))::bit(32)::bigint / 4294967296.0 AS h5,
           ('x' || substr(m.m1, 17, 8))::bit(32)::bigint / 4294967296.0 AS h6,
           ('x' || substr(m.m1, 25, 8))::bit(32)::bigint / 4294967296.0 AS h7,
           random() AS r0, random() AS r1, random() AS r2, random() AS r3, random() AS r4,
           random() AS r5, random() AS r6, random() AS r7, random() AS r8, random() AS r9,
           random() AS r10, random() AS r11, random() AS r12, random() AS r13, random() AS r14,
           random() AS r15, random() AS r16, random() AS r17,
           -- higher numbers are newer contacts
           %(anchor)s::timestamptz - interval '1 day' * %(contact_days)s
               * (1 - (n - 0.5 * random()) / %(total)s) AS created_at
    FROM generate_series(%(first)s::bigint, %(last)s::bigint) AS n,
         -- keys added after generator 3 draw from a hash of the contact, not from random():
         -- the random() stream, and so every other value of every row, stays as it was
         LATERAL (SELECT md5(%(seed)s::text || ':' || %(tag)s || ':' || n) AS m0,
                         md5(%(seed)s::text || ':' || %(tag)s || ':' || n || ':1') AS m1) AS m
    OFFSET 0
) AS r
"""

# Events of one time slice of every project, inserted in time order: slices follow each
# other in time and within a slice the custom and email-activity events of all projects go
# in as one stream ordered by time, so the table's physical order follows time, with the
# projects interleaved, as it does where every tenant's events are appended as they
# arrive. (Rows of a slice in random order would make an index-only scan of one name in
# time order jump between visibility-map pages; a project's rows in one block would give
# it a locality no project of a shared table has.) `{p}` is each part's parameter suffix.
EVENTS_SELECT = """
SELECT %(project{p})s AS project_id,
       md5(%(tag{p})s || ':' || (1 + floor(%(contacts{p})s * power(r.a, 1.3)))::bigint)::uuid,
       r.name,
       CASE r.name
           WHEN 'purchase' THEN jsonb_build_object(
               -- a number, but a string for 1 in 50 (a legacy integration): other types
               -- are ignored by comparisons and aggregates
               'amount', CASE WHEN floor(r.c * 1e6)::int %% 50 = 0
                              THEN to_jsonb(round((5 + power(r.c, 2) * 495)::numeric, 2)::text)
                              ELSE to_jsonb(round((5 + power(r.c, 2) * 495)::numeric, 2)) END,
               'currency', CASE WHEN r.c < 0.7 THEN 'USD' ELSE 'EUR' END,
               'items', 1 + floor(r.c * 5)::int)
           WHEN 'page_view' THEN jsonb_build_object('path', '/p/' || floor(r.c * 200)::int)
           WHEN 'search' THEN jsonb_build_object('query', 'q' || floor(r.c * 1000)::int)
           ELSE '{{}}'::jsonb
       END,
       r.ts
FROM (
    SELECT random() AS a,
           (%(names)s::text[])[1 + floor(%(nnames)s * power(random(), 2.2))::int] AS name,
           random() AS c,
           %(start)s::timestamptz + random() * %(span)s::interval AS ts
    FROM generate_series(1, %(rows{p})s::bigint)
    OFFSET 0
) AS r
"""

EMAIL_EVENTS_SELECT = """
SELECT %(project{p})s AS project_id,
       md5(%(tag{p})s || ':' || (1 + floor(%(contacts{p})s * power(r.a, 1.15)))::bigint)::uuid,
       r.name,
       jsonb_build_object('campaignId', 'cmp_' || floor(r.c * 400)::int),
       r.ts
FROM (
    SELECT random() AS a,
           CASE {activity} END AS name,
           random() AS c,
           %(start)s::timestamptz + random() * %(span)s::interval AS ts
    FROM (SELECT random() AS u FROM generate_series(1, %(rows{p})s::bigint)) AS g
    OFFSET 0
) AS r
"""

EVENTS_INSERT = """
INSERT INTO events (project_id, contact_id, name, data, occurred_at, created_at)
SELECT project_id, contact_id, name, data, ts, ts
FROM ({parts}) AS slice (project_id, contact_id, name, data, ts)
ORDER BY ts
"""


def _email_case() -> str:
    return " ".join(f"WHEN g.u < {share} THEN '{name}'" for name, share in EMAIL_ACTIVITY)


SECONDARY_INDEXES_SQL = """
SELECT i.relname AS name, pg_get_indexdef(i.oid) AS definition
FROM pg_index x
JOIN pg_class i ON i.oid = x.indexrelid
JOIN pg_class t ON t.oid = x.indrelid
WHERE t.relname IN ('contacts', 'events')
  AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = x.indexrelid)
ORDER BY i.relname
"""


def _chunks(first: int, last: int, size: int) -> list[tuple[int, int]]:
    return [(a, min(a + size - 1, last)) for a in range(first, last + 1, size)]


def load(
    url: str,
    specs: Sequence[ProjectSpec],
    *,
    seed: float,
    create_project: Callable[[str], str],
    params: dict[str, Any],
    log: Callable[[str], None],
) -> Dataset:
    """Generate every project's rows into a freshly migrated database."""
    started = time.perf_counter()
    phases: dict[str, float] = {}
    with psycopg.connect(url, autocommit=True) as conn:
        anchor: datetime = conn.execute("SELECT date_trunc('second', now())").fetchone()[0]  # type: ignore[index]
        for setting in (
            "SET max_parallel_workers_per_gather = 0",  # one random() stream: reproducible
            "SET synchronous_commit = off",
            "SET maintenance_work_mem = '1GB'",
            "SET timezone = 'UTC'",
        ):
            conn.execute(setting)
        try:
            # Skip FK triggers for this session (ids are valid by construction); needs a
            # superuser, so on a managed server the checks simply run.
            conn.execute("SET session_replication_role = replica")
        except psycopg.errors.InsufficientPrivilege:
            log("  (not a superuser: foreign keys are checked during the load, which is slower)")
        conn.execute("SELECT setseed(%s)", (seed,))
        indexes = conn.execute(SECONDARY_INDEXES_SQL).fetchall()
        for name, _definition in indexes:
            conn.execute(f'DROP INDEX "{name}"')
        loaded: list[LoadedProject] = []
        rows_total = 0
        try:
            for spec in specs:
                project_id = create_project(f"bench-{spec.tag}")
                loaded.append(
                    LoadedProject(
                        spec.tag, project_id, spec.contacts, spec.events, spec.email_events
                    )
                )
            pairs = list(zip(specs, [project.id for project in loaded], strict=True))
            t0 = time.perf_counter()
            _load_contacts(conn, pairs, anchor, seed)
            rows_total += sum(spec.contacts for spec in specs)
            phases["contacts"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            _load_events(conn, pairs, anchor)
            rows_total += sum(spec.events + spec.email_events for spec in specs)
            phases["events"] = time.perf_counter() - t0
        finally:
            t0 = time.perf_counter()
            progress = Progress("secondary indexes", len(indexes), "indexes")
            for _name, definition in indexes:
                conn.execute(definition)
                progress.advance(1)
            progress.finish()
            phases["indexes"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        log("  VACUUM ANALYZE contacts, events")
        conn.execute("VACUUM (ANALYZE) contacts")
        conn.execute("VACUUM (ANALYZE) events")
        phases["vacuum_analyze"] = time.perf_counter() - t0
        max_event_id = conn.execute("SELECT coalesce(max(id), 0) FROM events").fetchone()[0]  # type: ignore[index]
    seconds = time.perf_counter() - started
    return Dataset(
        params=params,
        anchor=anchor.isoformat(),
        projects=loaded,
        max_event_id=int(max_event_id),
        load_seconds=round(seconds, 1),
        rows_per_second=round(rows_total / seconds),
        phases={k: round(v, 1) for k, v in phases.items()},
    )


def disk_needed(specs: Sequence[ProjectSpec], wal_room: int) -> int:
    """Bytes a load of `specs` takes on the database server's disk at its peak: the rows
    and their indexes, the sort files of the largest index (the events' by name, about
    SORT_BYTES_PER_EVENT an event, all written before the index is), and `wal_room`: the
    WAL the server may add to what it holds. A server recycles WAL files rather than
    deleting them, up to its max_wal_size, so a long load can leave that much in pg_wal
    however often it checkpoints (seen: 16 GB of a 16 GB max_wal_size)."""
    contacts = sum(spec.contacts for spec in specs)
    events = sum(spec.events + spec.email_events for spec in specs)
    rows = contacts * BYTES_PER_CONTACT + events * BYTES_PER_EVENT
    return rows + events * SORT_BYTES_PER_EVENT + wal_room


def _shares(total: int, slices: int, i: int) -> tuple[int, int]:
    """The 1-based range [first, last] of slice i of `total` rows cut into `slices`
    (empty when last < first)."""
    return total * i // slices + 1, total * (i + 1) // slices


def _load_contacts(
    conn: psycopg.Connection[Any],
    projects: Sequence[tuple[ProjectSpec, str]],
    anchor: datetime,
    seed: float,
) -> None:
    """Every project's contacts, oldest first, the projects taking turns slice by slice:
    a shared table fills with all tenants' sign-ups interleaved."""
    total = sum(spec.contacts for spec, _id in projects)
    progress = Progress("contacts", total)
    slices = max(1, math.ceil(total / CONTACT_SLICE_ROWS))
    for i in range(slices):
        for spec, project_id in projects:
            first, last = _shares(spec.contacts, slices, i)
            if last < first:
                continue
            conn.execute(
                CONTACTS_SQL,
                {
                    "project": uuid.UUID(project_id),
                    "tag": spec.tag,
                    "domains": list(DOMAINS),
                    "ndomains": len(DOMAINS),
                    "countries": list(COUNTRIES),
                    "ncountries": len(COUNTRIES),
                    "industries": list(INDUSTRIES),
                    "nindustries": len(INDUSTRIES),
                    "anchor": anchor,
                    "seed": seed,
                    "contact_days": CONTACT_DAYS,
                    "total": spec.contacts,
                    "first": first,
                    "last": last,
                },
            )
            progress.advance(last - first + 1)
    progress.finish()


def _load_events(
    conn: psycopg.Connection[Any],
    projects: Sequence[tuple[ProjectSpec, str]],
    anchor: datetime,
) -> None:
    """Every project's events over EVENT_DAYS, one time slice at a time (EVENTS_SELECT)."""
    kinds: list[tuple[str, Callable[[ProjectSpec], int]]] = [
        (EVENTS_SELECT, lambda spec: spec.events),
        (EMAIL_EVENTS_SELECT.replace("{activity}", _email_case()), lambda spec: spec.email_events),
    ]
    total_rows = sum(spec.events + spec.email_events for spec, _id in projects)
    if not total_rows:
        return
    progress = Progress("events", total_rows)
    slices = max(1, math.ceil(total_rows / CHUNK_ROWS))
    span_seconds = EVENT_DAYS * 86400 / slices
    for i in range(slices):
        start = anchor.timestamp() - EVENT_DAYS * 86400 + i * span_seconds
        params: dict[str, Any] = {
            "names": list(EVENT_NAMES),
            "nnames": len(EVENT_NAMES),
            "start": datetime.fromtimestamp(start, anchor.tzinfo),
            "span": f"{span_seconds} seconds",
        }
        parts, rows = [], 0
        for n, (spec, project_id) in enumerate(projects):
            for k, (select, count) in enumerate(kinds):
                first, last = _shares(count(spec), slices, i)
                if last < first:
                    continue
                suffix = f"_{n}_{k}"
                parts.append(select.format(p=suffix))
                params |= {
                    f"project{suffix}": uuid.UUID(project_id),
                    f"tag{suffix}": spec.tag,
                    f"contacts{suffix}": spec.contacts,
                    f"rows{suffix}": last - first + 1,
                }
                rows += last - first + 1
        if parts:
            conn.execute(EVENTS_INSERT.format(parts=" UNION ALL ".join(parts)), params)
        progress.advance(rows)
    progress.finish()


# --- the stored dataset record --------------------------------------------------------


def read_dataset(url: str) -> Dataset | None:
    with psycopg.connect(url, autocommit=True) as conn:
        exists = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (DATASET_TABLE,)).fetchone()
        if not exists or not exists[0]:
            return None
        row = conn.execute(f"SELECT body FROM {DATASET_TABLE} WHERE id = 1").fetchone()
        return Dataset.from_json(row[0]) if row else None


def write_dataset(url: str, dataset: Dataset) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE IF NOT EXISTS {DATASET_TABLE} (id int PRIMARY KEY, body jsonb)")
        conn.execute(
            f"INSERT INTO {DATASET_TABLE} VALUES (1, %s) "
            "ON CONFLICT (id) DO UPDATE SET body = excluded.body",
            (json.dumps(dataset.to_json()),),
        )


def reset(url: str, dataset: Dataset, log: Callable[[str], None]) -> None:
    """Undo what a previous benchmark run wrote: segments, ingested events and contacts,
    API keys; the generated rows stay."""
    ids = [uuid.UUID(p.id) for p in dataset.projects]
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SET statement_timeout = 0")
        with conn.transaction():
            conn.execute("DELETE FROM segment_references WHERE project_id = ANY(%s)", (ids,))
            # Memberships keep their segment by the service's locks, not a foreign key
            # (migration 0008): deleting segments here must take them along.
            conn.execute("DELETE FROM segment_members WHERE project_id = ANY(%s)", (ids,))
            segments = conn.execute(
                "DELETE FROM segments WHERE project_id = ANY(%s)", (ids,)
            ).rowcount
            events = conn.execute(
                "DELETE FROM events WHERE id > %s", (dataset.max_event_id,)
            ).rowcount
            contacts = conn.execute(
                "DELETE FROM contacts WHERE project_id = ANY(%s) AND email LIKE %s",
                (ids, f"%@{NEW_CONTACT_DOMAIN}"),
            ).rowcount
            conn.execute("DELETE FROM api_keys WHERE project_id = ANY(%s)", (ids,))
        log(
            f"  reset: removed {segments} segments, {events:,} events and {contacts:,} contacts "
            "left by earlier runs"
        )
        if segments or events or contacts:
            conn.execute("VACUUM (ANALYZE) segment_members")
            conn.execute("VACUUM (ANALYZE) events")
            conn.execute("VACUUM (ANALYZE) contacts")
