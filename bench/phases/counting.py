"""A condition counted three ways side by side (compiled, hand-written, over the member ids)
with their plans: what the scenarios and scale phases measure."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from typing import Any

from sqlalchemy import func, select, text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError

from bench import scenarios
from bench.context import Env, Stack, create_segment, log
from bench.measure import median, timed
from segments_service import segments
from segments_service.filters import parse_condition


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
    for sc in env.args.scenarios:
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


@contextmanager
def explaining(conn: Connection) -> Iterator[None]:
    conn.info["explain"] = True
    try:
        yield
    finally:
        conn.info["explain"] = False


def plan_text(rows: Sequence[Any]) -> str:
    return "\n".join(str(r[0]) for r in rows)


def explain_compiled(conn: Connection, m: Measured) -> str:
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
        compiled = explain_compiled(conn, m)
        _prepare(conn, "hand")
        hand = plan_text(
            conn.execute(
                text("EXPLAIN (ANALYZE, BUFFERS) " + m.scenario.hand_sql),
                {"p": project_id, "now": now},
            ).all()
        )
        conn.rollback()
    return compiled, hand, ids


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
