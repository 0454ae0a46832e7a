"""Segment builds that leave the request, in the manner of CREATE INDEX CONCURRENTLY.

A project of at most `inline_contacts` contacts builds a segment inside the request, under
the exclusive project lock, as membership.rebuild always did. A larger project's create or
update only marks the segment (and the segments that reference it) BUILDING, in a short
transaction under the exclusive lock (start_build), and queues a build that a Builder runs
in steps, each its own short transaction under the shared lock and the background budget:

1. compute: per slice of contacts (by id), the new members into `segment_build_shadow`;
2. apply: per slice, the difference between the shadow and the stored memberships, for
   the slice's contacts that are not dirty: entries, exits, `member_count`, entry/exit
   events of tracked segments;
3. catch up: the dirty contacts (noted by writers since the build started, see
   membership.refresh_contacts), re-evaluated through the writers' locked path;
4. final: under the exclusive lock for a moment, what is still dirty, then READY.

Writers never evaluate a segment whose membership is `building`, and no step evaluates a
contact a writer touched without catching it up afterwards under that writer's locks, so
each real entry or exit is recorded once. A step's work and its cursor commit together:
a server stopped mid-build leaves a build the next Builder resumes where it stood.

A compute step over its budget (or refused by the database) fails the build: after an
update, the previous condition comes back and keeps serving (its memberships were not
touched before the apply), the dirty contacts are caught up under it, and the segment is
FAILED with a reason; a failed create is FAILED and answered live. Steps after the
compute are retried (they apply a difference already known to fit), MAX_ATTEMPTS times
before the build fails without a condition to fall back to. A change of definition
while a build runs replaces it with a new generation (start_build), in the same
transaction as the change; a deleted segment takes its build along.

Builds are shared fairly: a Builder's round gives one step to each project with queued
builds (a project's builds run one at a time, oldest first), so one project's queue
never delays another's first build. Several Builders (servers) coordinate through a
transaction-level advisory try-lock per project.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg.errors
from sqlalchemy import (
    Row,
    delete,
    exists,
    func,
    insert,
    literal,
    select,
    text,
    union_all,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from segments_service import config, membership, tables
from segments_service.filters import parse_condition

log = logging.getLogger(__name__)

READY, BUILDING, FAILED = "READY", "BUILDING", "FAILED"
COMPUTE, APPLY, CATCHUP, FINAL = "compute", "apply", "catchup", "final"
# Failed steps after the compute are retried this many times before the build fails.
MAX_ATTEMPTS = 5


@dataclass(frozen=True)
class BuildSettings:
    """Where builds leave the request, and how the background runs them."""

    inline_contacts: int = config.DEFAULT_INLINE_BUILD_CONTACTS
    slice: int = config.DEFAULT_BUILD_SLICE
    budget: float = config.DEFAULT_BACKGROUND_TIMEOUT  # seconds, per statement

    @classmethod
    def from_env(cls) -> BuildSettings:
        s = config.Settings.from_env()
        return cls(s.inline_build_contacts, s.build_slice, s.background_timeout)


def builds_inline(session: Session, project_id: uuid.UUID, limit: int) -> bool:
    """Whether the project is small enough to build inside the request (counted cheaply)."""
    n = session.execute(
        text("SELECT count(*) FROM (SELECT 1 FROM contacts WHERE project_id = :p LIMIT :n) small"),
        {"p": project_id, "n": limit + 1},
    ).scalar_one()
    return int(n) <= limit


def cancel_build(session: Session, project_id: uuid.UUID, segment_id: uuid.UUID) -> None:
    """Forget a segment's build, its shadow and dirty contacts, and mark it READY and
    stored: the caller (an inline rebuild, under the exclusive lock) stores its membership."""
    for table in (
        tables.segment_builds,
        tables.segment_build_shadow,
        tables.segment_build_dirty,
    ):
        session.execute(
            delete(table).where(table.c.project_id == project_id, table.c.segment_id == segment_id)
        )
    s = tables.segments
    session.execute(
        update(s)
        .where(s.c.project_id == project_id, s.c.id == segment_id)
        .values(status=READY, status_reason=None, membership_state=membership.STORED)
    )


def start_build(
    session: Session,
    project_id: uuid.UUID,
    segment_id: uuid.UUID,
    *,
    previous_condition: Any,
    enter_all: bool,
) -> None:
    """Mark the segment BUILDING and queue its build (a new generation of it).

    The caller holds the project's membership lock exclusively, so every writer that
    commits later sees the segment `building` and notes its contacts as dirty.
    `previous_condition`: the condition its stored memberships follow, which comes back
    if the build fails (None: nothing to come back to). `enter_all`: tracking was turned
    on, every member gets an entry event (not only the difference)."""
    s = tables.segments
    b = tables.segment_builds
    row = session.execute(
        select(s.c.membership_state, s.c.build_generation).where(
            s.c.project_id == project_id, s.c.id == segment_id
        )
    ).one()
    existing = session.execute(
        select(b).where(b.c.project_id == project_id, b.c.segment_id == segment_id)
    ).first()
    entered_to = None
    if existing is not None and existing.enter_all:
        # Its apply entered every member up to its cursor; after it, all of them.
        if existing.phase == COMPUTE:
            enter_all, entered_to = True, existing.entered_to
        elif existing.phase == APPLY:
            done = [i for i in (existing.entered_to, existing.cursor) if i is not None]
            enter_all, entered_to = True, max(done, default=None)
    if existing is not None:
        # Before its apply, a build has not touched the stored memberships: they still
        # follow the condition its own predecessor kept.
        untouched = existing.phase == COMPUTE and existing.failure is None
        previous_condition = existing.previous_condition if untouched else None
    elif row.membership_state != membership.STORED:
        previous_condition = None
    if enter_all:
        previous_condition = None  # the entries of the kept members were never recorded
    generation = row.build_generation + 1
    values = {
        "generation": generation,
        "phase": COMPUTE,
        "cursor": None,
        "previous_condition": previous_condition,
        "enter_all": enter_all,
        "entered_to": entered_to,
        "failure": None,
        "attempts": 0,
        "moved": 0,
        "queued_at": func.clock_timestamp(),
    }
    upsert = pg_insert(b).values(project_id=project_id, segment_id=segment_id, **values)
    session.execute(
        upsert.on_conflict_do_update(
            index_elements=[b.c.project_id, b.c.segment_id],
            set_={k: upsert.excluded[k] for k in values if k != "queued_at"},
        )
    )
    sh = tables.segment_build_shadow
    session.execute(delete(sh).where(sh.c.project_id == project_id, sh.c.segment_id == segment_id))
    session.execute(
        update(s)
        .where(s.c.project_id == project_id, s.c.id == segment_id)
        .values(
            status=BUILDING,
            status_reason=None,
            membership_state=membership.BUILDING,
            build_generation=generation,
        )
    )


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
            return _step(session, project_id, settings, hook, current)
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
    if build.phase == COMPUTE:
        _compute(session, build, settings)
    elif build.phase == APPLY:
        _apply_slice(session, build, settings)
    elif build.phase == CATCHUP:
        _catch_up(session, build)
    elif build.phase == FINAL:
        _finish(session, build)
    else:  # pragma: no cover - the table's CHECK allows no other phase
        raise AssertionError(build.phase)
    hook(session, build.phase)
    return True


def _advance(session: Session, build: Row[Any], **values: Any) -> None:
    b = tables.segment_builds
    session.execute(
        update(b)
        .where(b.c.project_id == build.project_id, b.c.segment_id == build.segment_id)
        .values(**values)
    )


def _slice(session: Session, build: Row[Any], size: int) -> list[uuid.UUID]:
    """The next `size` contact ids after the build's cursor."""
    c = tables.contacts.c
    query = select(c.id).where(c.project_id == build.project_id).order_by(c.id).limit(size)
    if build.cursor is not None:
        query = query.where(c.id > build.cursor)
    return list(session.execute(query).scalars())


def _segment(session: Session, build: Row[Any]) -> membership.Dynamic:
    (seg,) = membership.dynamic_segments(session, build.project_id, [build.segment_id])
    return seg


def _compute(session: Session, build: Row[Any], settings: BuildSettings) -> None:
    """The new members among the next slice of contacts, into the shadow table."""
    ids = _slice(session, build, settings.slice)
    if ids:
        seg = _segment(session, build)
        desired = membership.desired_members(
            build.project_id, [seg], {seg.id: ids}, membership.db_now(session)
        ).subquery()
        sh = tables.segment_build_shadow
        session.execute(
            insert(sh).from_select(
                ["project_id", "segment_id", "contact_id"],
                select(literal(build.project_id), desired.c.segment_id, desired.c.contact_id),
            ),
            {"scope_0": ids},
        )
    if len(ids) < settings.slice:
        # Without statistics of the shadow just written the planner takes it for empty
        # and probes it row by row against whole slices: the apply ran out of budget.
        session.execute(text("ANALYZE segment_build_shadow"))
        _advance(session, build, phase=APPLY, cursor=None)
    else:
        _advance(session, build, cursor=ids[-1])


def _slice_end(session: Session, build: Row[Any], size: int) -> uuid.UUID | None:
    """The last contact id of the next slice of `size` after the build's cursor; None
    when the rest of the contacts fit in it (the slice is then open-ended)."""
    c = tables.contacts.c
    query = (
        select(c.id)
        .where(c.project_id == build.project_id)
        .order_by(c.id)
        .offset(size - 1)
        .limit(1)
    )
    if build.cursor is not None:
        query = query.where(c.id > build.cursor)
    end: uuid.UUID | None = session.execute(query).scalar_one_or_none()
    return end


def _in_slice(column: Any, build: Row[Any], end: uuid.UUID | None) -> list[Any]:
    """`column` within (cursor, end]: a range of the primary keys, where an array of
    50,000 ids would be compared element by element with every row."""
    bounds = []
    if build.cursor is not None:
        bounds.append(column > build.cursor)
    if end is not None:
        bounds.append(column <= end)
    return bounds


def _clean(build: Row[Any], contact_id: Any) -> Any:
    """The contact is not dirty: no writer touched it since the build started."""
    d = tables.segment_build_dirty.c
    return ~exists(
        select(literal(1)).where(
            d.project_id == build.project_id,
            d.segment_id == build.segment_id,
            d.contact_id == contact_id,
        )
    )


def _forget_members(session: Session, build: Row[Any], contact_ids: Sequence[uuid.UUID]) -> int:
    """Delete these contacts' stored memberships of the segment, without events (their
    entries are recorded again, or their contacts are gone); answers how many."""
    if not contact_ids:
        return 0
    m = tables.segment_members
    return _forget_where(session, build, m.c.contact_id == tables.any_uuid(contact_ids))


def _forget_where(session: Session, build: Row[Any], *where: Any) -> int:
    m = tables.segment_members
    gone = session.execute(
        delete(m)
        .where(m.c.project_id == build.project_id, m.c.segment_id == build.segment_id, *where)
        .returning(m.c.contact_id)
    ).all()
    membership.adjust_count(session, build.project_id, build.segment_id, -len(gone))
    return len(gone)


def _apply_slice(session: Session, build: Row[Any], settings: BuildSettings) -> None:
    """Make the stored memberships of the next slice's clean contacts those of the shadow."""
    end = _slice_end(session, build, settings.slice)
    seg = _segment(session, build)
    moved = 0
    if build.enter_all:
        # Every member gets an entry: the stored memberships are entered again, with
        # events, here (clean contacts) or by the catch-up (dirty ones, whatever their
        # stored membership was when they became dirty).
        m = tables.segment_members.c
        entered = [] if build.entered_to is None else [m.contact_id > build.entered_to]
        moved += _forget_where(session, build, *_in_slice(m.contact_id, build, end), *entered)
    row = session.execute(_diff_statement(build, seg, end)).one()._mapping
    moved += row["entered"] + row["exited"]
    values: dict[str, Any] = {"moved": build.moved + moved}
    if end is None:
        values.update(phase=CATCHUP, cursor=None)
        if build.moved + moved >= membership.refresh.ANALYZE_AFTER_ROWS:
            # The catch-up runs the writers' scoped statement: planned with statistics
            # from before the bulk change, it took 10 s a chunk instead of milliseconds
            # (see membership.rebuild).
            session.execute(text("ANALYZE segment_members"))
    else:
        values["cursor"] = end
    _advance(session, build, **values)


def _diff_statement(build: Row[Any], seg: membership.Dynamic, end: uuid.UUID | None) -> Any:
    """Entries (shadow, not stored) and exits (stored, not shadow) of the slice's clean
    contacts, with the count and, for a tracked segment, the entry/exit events, in one
    statement."""
    project_id, segment_id = build.project_id, build.segment_id
    m = tables.segment_members
    sh = tables.segment_build_shadow
    c = tables.contacts.c
    desired = (
        select(sh.c.contact_id)
        .where(
            sh.c.project_id == project_id,
            sh.c.segment_id == segment_id,
            *_in_slice(sh.c.contact_id, build, end),
            _clean(build, sh.c.contact_id),
        )
        .cte("desired")
    )
    stored = select(literal(1)).where(
        m.c.project_id == project_id,
        m.c.segment_id == segment_id,
        m.c.contact_id == desired.c.contact_id,
    )
    rows = (
        select(literal(project_id), literal(segment_id), desired.c.contact_id, c.created_at)
        .join_from(
            desired,
            tables.contacts,
            (c.project_id == project_id) & (c.id == desired.c.contact_id),
        )
        .where(~exists(stored))
        .order_by(desired.c.contact_id)
    )
    entered = (
        pg_insert(m)
        .from_select(["project_id", "segment_id", "contact_id", "contact_created_at"], rows)
        .on_conflict_do_nothing()
        .returning(m.c.segment_id, m.c.contact_id)
        .cte("entered")
    )
    wanted = select(literal(1)).where(
        sh.c.project_id == project_id,
        sh.c.segment_id == segment_id,
        sh.c.contact_id == m.c.contact_id,
    )
    exited = (
        delete(m)
        .where(
            m.c.project_id == project_id,
            m.c.segment_id == segment_id,
            *_in_slice(m.c.contact_id, build, end),
            _clean(build, m.c.contact_id),
            ~exists(wanted),
        )
        .returning(m.c.segment_id, m.c.contact_id)
        .cte("exited")
    )

    n_entered = select(func.count()).select_from(entered).scalar_subquery()
    n_exited = select(func.count()).select_from(exited).scalar_subquery()
    s = tables.segments
    counted = (
        update(s)
        .where(s.c.project_id == project_id, s.c.id == segment_id)
        .values(member_count=s.c.member_count + n_entered - n_exited)
        .returning(s.c.id)
        .cte("counted")
    )
    outputs = [
        n_exited.label("exited"),
        n_entered.label("entered"),
        select(func.count()).select_from(counted).scalar_subquery().label("counted"),
    ]
    if seg.tracked:
        changes = union_all(
            select(entered.c.segment_id, entered.c.contact_id, literal("entry").label("kind")),
            select(exited.c.segment_id, exited.c.contact_id, literal("exit").label("kind")),
        ).subquery("changes")
        recorded = membership.record_events(project_id, [seg], changes)
        outputs.append(select(func.count()).select_from(recorded).scalar_subquery().label("events"))
    return select(*outputs)


def _catch_up(session: Session, build: Row[Any]) -> None:
    """Re-evaluate a chunk of the dirty contacts; when fewer than a chunk were left, the
    next step is the final one."""
    d = tables.segment_build_dirty.c
    ids = list(
        session.execute(
            select(d.contact_id)
            .where(d.project_id == build.project_id, d.segment_id == build.segment_id)
            .order_by(d.contact_id)
            .limit(membership.CHUNK)
        ).scalars()
    )
    moved = _reevaluate(session, build, ids)
    values: dict[str, Any] = {"moved": build.moved + moved}
    if len(ids) < membership.CHUNK:
        values["phase"] = FINAL
    _advance(session, build, **values)


def _reevaluate(session: Session, build: Row[Any], ids: Sequence[uuid.UUID]) -> int:
    """The writers' path for dirty contacts: locked in id order, evaluated against the
    segment, then no longer dirty; contacts deleted meanwhile lose their membership."""
    if not ids:
        return 0
    present = membership.lock_contacts(session, build.project_id, ids)
    seg = _segment(session, build)
    moved = _forget_members(session, build, sorted(set(ids) - set(present)))
    if present:
        changes = membership.apply_scoped(session, build.project_id, seg, present)
        moved += changes.entered + changes.exited
    d = tables.segment_build_dirty
    session.execute(
        delete(d).where(
            d.c.project_id == build.project_id,
            d.c.segment_id == build.segment_id,
            d.c.contact_id == tables.any_uuid(ids),
        )
    )
    return moved


def _finish(session: Session, build: Row[Any]) -> None:
    """Under the exclusive lock: the last dirty contacts, then the switch to stored
    membership (READY, or FAILED with the previous condition back)."""
    d = tables.segment_build_dirty.c
    ids = list(
        session.execute(
            select(d.contact_id)
            .where(d.project_id == build.project_id, d.segment_id == build.segment_id)
            .order_by(d.contact_id)
        ).scalars()
    )
    _reevaluate(session, build, ids)
    seg = _segment(session, build)
    s = tables.segments
    session.execute(
        update(s)
        .where(s.c.project_id == build.project_id, s.c.id == build.segment_id)
        .values(
            status=FAILED if build.failure else READY,
            status_reason=build.failure,
            membership_state=membership.STORED,
            time_dependent=seg.time_dependent,
        )
    )
    _drop_build(session, build.project_id, build.segment_id)


def _drop_build(session: Session, project_id: uuid.UUID, segment_id: uuid.UUID) -> None:
    for table in (tables.segment_build_shadow, tables.segment_builds):
        session.execute(
            delete(table).where(table.c.project_id == project_id, table.c.segment_id == segment_id)
        )


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
        .values(status=FAILED, status_reason=reason, membership_state="none")
    )
    _drop_build(session, project_id, build.segment_id)
    d = tables.segment_build_dirty
    session.execute(
        delete(d).where(d.c.project_id == project_id, d.c.segment_id == build.segment_id)
    )


def queued_projects(session: Session) -> list[uuid.UUID]:
    b = tables.segment_builds.c
    return list(session.execute(select(b.project_id).distinct().order_by(b.project_id)).scalars())


class Builder(threading.Thread):
    """Runs queued builds, one step per project per round (round-robin), until stopped."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        settings: BuildSettings | None = None,
        *,
        period: float = 0.5,
        hook: StepHook = _no_hook,
    ) -> None:
        super().__init__(name="builder", daemon=True)
        self.sessions = sessions
        self.settings = settings or BuildSettings.from_env()
        self.period = period
        self.hook = hook
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

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                busy = self.run_round()
            except Exception:
                log.exception("listing the queued builds failed")
                busy = 0
            if not busy:
                self.stopping.wait(self.period)

    def stop(self) -> None:
        self.stopping.set()
