"""Running builds: one step of a project's oldest build, its failure handling, and the
Builder thread that gives each project with queued builds a step per round."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import psycopg.errors
from sqlalchemy import delete, insert, select, text, update
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from segments_service import membership, metrics, tables
from segments_service.builds.queue import (
    APPLY,
    CATCHUP,
    COMPUTE,
    FAILED,
    FINAL,
    MAX_ATTEMPTS,
    BuildSettings,
    queued_projects,
    start_build,
)
from segments_service.builds.steps import (
    _advance,
    _apply_slice,
    _catch_up,
    _compute,
    _drop_build,
    _finish,
)
from segments_service.filters import parse_condition

log = logging.getLogger(__name__)


# Called with the step's transaction and phase at the end of each step, before it
# commits (tests pause there, or make the step fail).
StepHook = Callable[[Session, str], None]


def _no_hook(_session: Session, _phase: str) -> None:
    pass


@dataclass
class _Current:
    """The build a step worked on, for the failure handling after its rollback."""

    segment_id: uuid.UUID | None = None
    generation: int = 0
    phase: str = ""
    # When the build the step finished was queued (Unix seconds); None: it goes on.
    finished_queued_at: float | None = None


def step(
    sessions: sessionmaker[Session],
    project_id: uuid.UUID,
    settings: BuildSettings,
    hook: StepHook = _no_hook,
) -> bool:
    """One step of the project's oldest build; False when there was nothing to do (no
    build queued, or another Builder is stepping this project)."""
    current = _Current()
    try:
        with sessions.begin() as session:
            stepped = _step(session, project_id, settings, hook, current)
        if current.finished_queued_at is not None:
            metrics.BUILD_DURATION.labels("background").observe(
                max(0.0, time.time() - current.finished_queued_at)
            )
        return stepped
    except DBAPIError as exc:
        over_budget = isinstance(exc.orig, psycopg.errors.QueryCanceled)
        if current.segment_id is None or (
            isinstance(exc, (OperationalError, InterfaceError)) and not over_budget
        ):
            raise  # the database is away, or a deadlock: the step is retried as it stood
        log.warning("build of segment %s failed in %s: %s", current.segment_id, current.phase, exc)
        with sessions.begin() as session:
            _record_failure(session, project_id, current, exc, settings)
        return True


def _step(
    session: Session,
    project_id: uuid.UUID,
    settings: BuildSettings,
    hook: StepHook,
    current: _Current,
) -> bool:
    got = session.execute(
        text("SELECT pg_try_advisory_xact_lock(:k)"),
        {"k": membership.advisory_key("build", project_id)},
    ).scalar_one()
    if not got:
        return False
    b = tables.segment_builds
    oldest = (
        select(b)
        .where(b.c.project_id == project_id)
        .order_by(b.c.queued_at, b.c.segment_id)
        .limit(1)
    )
    peek = session.execute(oldest).first()
    if peek is None:
        return False
    # The final step switches over under the exclusive lock; the others let writers run.
    if peek.phase == FINAL:
        membership.lock_exclusive(session, project_id)
    else:
        membership.lock_shared(session, project_id)
    build = session.execute(oldest.with_for_update()).first()
    if build is None:
        return False
    if build.phase == FINAL and peek.phase != FINAL:
        return True  # another build came first meanwhile: its switch needs the exclusive lock
    current.segment_id, current.generation, current.phase = (
        build.segment_id,
        build.generation,
        build.phase,
    )
    membership.allow_long_statements(session, settings.budget)
    queued_at = build.queued_at.timestamp()
    # Entries and exits a build writes are measured from its queueing (metrics.TRACKER_LAG).
    with metrics.tracking("build", queued_at):
        if build.phase == COMPUTE:
            _compute(session, build, settings)
        elif build.phase == APPLY:
            _apply_slice(session, build, settings)
        elif build.phase == CATCHUP:
            _catch_up(session, build)
        elif build.phase == FINAL:
            _finish(session, build)
            current.finished_queued_at = queued_at
        else:  # pragma: no cover - the table's CHECK allows no other phase
            raise AssertionError(build.phase)
    hook(session, build.phase)
    return True


def _reason(exc: DBAPIError, settings: BuildSettings) -> str:
    if isinstance(exc.orig, psycopg.errors.QueryCanceled):
        return (
            f"the condition could not be evaluated within the {settings.budget:g} s budget "
            f"for a slice of {settings.slice} contacts; simplify it (fewer or narrower "
            "event filters) and save it again"
        )
    return f"the database could not evaluate the condition: {exc.orig}"


def _record_failure(
    session: Session,
    project_id: uuid.UUID,
    current: _Current,
    exc: DBAPIError,
    settings: BuildSettings,
) -> None:
    """A step failed and was rolled back. Steps after the compute are tried again (up to
    MAX_ATTEMPTS); a failed compute fails the build, unless a newer change replaced it."""
    membership.lock_exclusive(session, project_id)
    b = tables.segment_builds
    build = session.execute(
        select(b)
        .where(
            b.c.project_id == project_id,
            b.c.segment_id == current.segment_id,
            b.c.generation == current.generation,
        )
        .with_for_update()
    ).first()
    if build is None:
        return
    if build.phase != COMPUTE and build.attempts + 1 < MAX_ATTEMPTS:
        _advance(session, build, attempts=build.attempts + 1)
        return
    reason = _reason(exc, settings)
    s = tables.segments
    if build.phase == COMPUTE and build.previous_condition is not None:
        # Its stored memberships still follow the previous condition: it comes back, the
        # dirty contacts are caught up under it, and the segment ends FAILED with it.
        restored = parse_condition(build.previous_condition)
        session.execute(
            update(s)
            .where(s.c.project_id == project_id, s.c.id == build.segment_id)
            .values(condition=restored.to_json(), status=FAILED, status_reason=reason)
        )
        r = tables.segment_references
        session.execute(
            delete(r).where(r.c.project_id == project_id, r.c.segment_id == build.segment_id)
        )
        refs = sorted(restored.referenced_segments())
        if refs:
            session.execute(
                insert(r),
                [
                    {"project_id": project_id, "segment_id": build.segment_id, "referenced_id": i}
                    for i in refs
                ],
            )
        sh = tables.segment_build_shadow
        session.execute(
            delete(sh).where(sh.c.project_id == project_id, sh.c.segment_id == build.segment_id)
        )
        _advance(session, build, phase=CATCHUP, cursor=None, failure=reason)
        # Segments reaching it were built (or are being built) with the failed condition.
        for dependent in sorted(membership.dependents(session, project_id, build.segment_id)):
            start_build(session, project_id, dependent, previous_condition=None, enter_all=False)
        return
    # Nothing to fall back to: nothing stored is served, reads evaluate the condition.
    session.execute(
        update(s)
        .where(s.c.project_id == project_id, s.c.id == build.segment_id)
        .values(status=FAILED, status_reason=reason, membership_state=membership.NOT_STORED)
    )
    _drop_build(session, project_id, build.segment_id)
    d = tables.segment_build_dirty
    session.execute(
        delete(d).where(d.c.project_id == project_id, d.c.segment_id == build.segment_id)
    )


# How long the Builder rests after a busy round while requests are being served, as a
# share of the round's own time.
REST_AFTER_ROUND = 1.0

# Requests started so far and requests in flight (fairness.FairShare.activity).
Activity = Callable[[], tuple[int, int]]


def _always_busy() -> tuple[int, int]:
    return 0, 1


class Builder(threading.Thread):
    """Runs queued builds, one step per project per round (round-robin), until stopped."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        settings: BuildSettings | None = None,
        *,
        period: float = 0.5,
        hook: StepHook = _no_hook,
        foreground: Activity = _always_busy,
    ) -> None:
        super().__init__(name="builder", daemon=True)
        self.sessions = sessions
        self.settings = settings or BuildSettings.from_env()
        self.period = period
        self.hook = hook
        self.foreground = foreground
        self.stopping = threading.Event()
        self._last: uuid.UUID | None = None

    def run_round(self) -> int:
        """One step for each project with queued builds, starting after the project the
        previous round started with; answers the steps taken."""
        with self.sessions.begin() as session:
            projects = queued_projects(session)
        if self._last is not None:
            later = [p for p in projects if p > self._last]
            projects = later + [p for p in projects if p <= self._last]
        if projects:
            self._last = projects[0]
        done = 0
        for project_id in projects:
            if self.stopping.is_set():
                break
            try:
                if step(self.sessions, project_id, self.settings, self.hook):
                    done += 1
            except Exception:
                # The database may be restarting, or a deadlock: the step is tried again
                # next round, and the other projects still get theirs.
                log.exception("build step of project %s failed", project_id)
        return done

    def run_until_idle(self, timeout: float = 60.0) -> None:
        """Rounds until no build is queued (tests and tools)."""
        deadline = time.monotonic() + timeout
        while self.run_round():
            if time.monotonic() > deadline:
                raise TimeoutError("builds still queued")

    def rest_after(self, round_seconds: float, before: tuple[int, int]) -> float:
        """How long to rest after a busy round that took `round_seconds`, given the
        foreground activity read before it. Builds are background work: while requests are
        served, rest as long again, so a build keeps at most half a core and the requests
        of every project (the building one's writes included) keep the rest; with no
        request started or in flight since, the machine is idle and the next round starts
        at once."""
        started, in_flight = self.foreground()
        if started == before[0] and in_flight == 0 and before[1] == 0:
            return 0.0
        return round_seconds * REST_AFTER_ROUND

    def run(self) -> None:
        while not self.stopping.is_set():
            started = time.monotonic()
            before = self.foreground()
            try:
                busy = self.run_round()
            except Exception:
                log.exception("listing the queued builds failed")
                busy = 0
            if not busy:
                self.stopping.wait(self.period)
            else:
                rest = self.rest_after(time.monotonic() - started, before)
                if rest:
                    self.stopping.wait(rest)

    def stop(self) -> None:
        self.stopping.set()
