"""One background build taken apart: `python -m bench.build_steps --scenario count_in_window
--contacts 10000000 ...` (the dataset's flags as for `make bench`).

On the benchmark's database (loaded by `make bench` with the same flags), in this process:
a segment of the scenario's condition is created in the main project as the server would
(answered BUILDING, its build queued), then the build is stepped to the end by the
service's own step function (builds.step: one transaction a step, the background budget),
each step timed. Then the member query of one compute slice, as that step runs it, under
EXPLAIN (ANALYZE, BUFFERS): which index reads a slice, and how much of it. The segment is
deleted at the end. The scenario's hand-written count is taken before and after: each
slice is evaluated at its own instant, so where time alone moves the answer (a window)
the build's count lies between the two. Prints one JSON document (BENCHMARKS.md, "Builds
at ten million").
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import uuid
from collections.abc import Sequence
from typing import Any

from sqlalchemy import and_, select, text
from sqlalchemy.orm import Session, sessionmaker

from bench import scenarios
from bench.cli import parse_args
from bench.dataset import prepare_dataset
from segments_service import builds, database, membership, segments, tables


def _create(
    sessions: sessionmaker[Session], project_id: uuid.UUID, sc: scenarios.Scenario
) -> uuid.UUID:
    with sessions.begin() as session:
        view = segments.create_segment(
            session,
            project_id,
            name=f"Build steps {sc.name} {time.time():.0f}",
            description=None,
            segment_type="DYNAMIC",
            condition_json=sc.resolved({}),
            track_membership=False,
            inline_contacts=0,
        )
        segment_id: uuid.UUID = view.row.id
        return segment_id


def _phase(sessions: sessionmaker[Session], segment_id: uuid.UUID) -> str | None:
    b = tables.segment_builds.c
    with sessions() as session:
        phase: str | None = session.execute(
            select(b.phase).where(b.segment_id == segment_id)
        ).scalar_one_or_none()
        return phase


def _slice_plan(
    sessions: sessionmaker[Session], project_id: uuid.UUID, segment_id: uuid.UUID, size: int
) -> list[str]:
    """EXPLAIN (ANALYZE, BUFFERS) of the member query of the contacts' second slice."""
    c = tables.contacts.c
    with sessions() as session:
        bounds = [
            session.execute(
                select(c.id)
                .where(c.project_id == project_id)
                .order_by(c.id)
                .offset(offset)
                .limit(1)
            ).scalar_one()
            for offset in (size - 1, 2 * size - 1)
        ]
        (seg,) = membership.dynamic_segments(session, project_id, [segment_id])
        query = seg.members(
            project_id,
            membership.db_now(session),
            lambda column: and_(column > bounds[0], column <= bounds[1]),
        )
        sql = str(query.compile(session.get_bind(), compile_kwargs={"literal_binds": True}))
        return [row[0] for row in session.execute(text("EXPLAIN (ANALYZE, BUFFERS) " + sql))]


def _hand_count(
    sessions: sessionmaker[Session], project_id: uuid.UUID, sc: scenarios.Scenario
) -> int:
    """The scenario's hand-written count, now."""
    with sessions() as session:
        count: int = session.execute(
            text(sc.hand_sql), {"p": project_id, "now": membership.db_now(session)}
        ).scalar_one()
        return count


def _summary(seconds: list[float]) -> dict[str, Any]:
    ordered = sorted(seconds)
    return {
        "steps": len(ordered),
        "total_s": round(sum(ordered), 2),
        "median_s": round(statistics.median(ordered), 3),
        "p95_s": round(ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], 3),
        "max_s": round(ordered[-1], 3),
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.build_steps", description=__doc__)
    p.add_argument("--scenario", default="count_in_window", help="a scenario of bench/scenarios")
    p.add_argument("--slice", type=int, default=None, help="contacts a step (SEGMENTS_BUILD_SLICE)")
    own, rest = p.parse_known_args(argv)
    by_name = {sc.name: sc for sc in scenarios.SCENARIOS if not sc.references}
    if own.scenario not in by_name:
        p.error(f"--scenario must be one of {', '.join(sorted(by_name))}")
    args = parse_args(rest)
    url, dataset, _handle = prepare_dataset(args)
    engine = database.make_engine(url, pool_size=2)
    sessions = database.make_sessionmaker(engine)
    project_id = uuid.UUID(dataset.project("main").id)
    settings = builds.BuildSettings.from_env()
    if own.slice is not None:
        settings = builds.BuildSettings(settings.inline_contacts, own.slice, settings.budget)
    scenario = by_name[own.scenario]
    hand_before = _hand_count(sessions, project_id, scenario)
    started = time.perf_counter()
    segment_id = _create(sessions, project_id, scenario)
    steps: dict[str, list[float]] = {}
    try:
        while (phase := _phase(sessions, segment_id)) is not None:
            t = time.perf_counter()
            builds.step(sessions, project_id, settings)
            steps.setdefault(phase, []).append(time.perf_counter() - t)
        whole = time.perf_counter() - started
        with sessions() as session:
            row = segments.get_row(session, project_id, segment_id)
        hand_after = _hand_count(sessions, project_id, scenario)
        plan = _slice_plan(sessions, project_id, segment_id, settings.slice)
    finally:
        with sessions.begin() as session:
            segments.delete_segment(session, project_id, segment_id)
    print(
        json.dumps(
            {
                "scenario": own.scenario,
                "contacts": args.contacts,
                "slice": settings.slice,
                "status": row.status,
                "members": row.member_count,
                "hand_sql_count": {"before": hand_before, "after": hand_after},
                "whole_s": round(whole, 1),
                "phases": {phase: _summary(seconds) for phase, seconds in steps.items()},
                "second_slice_plan": plan,
            },
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
