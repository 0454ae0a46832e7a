"""Membership of dynamic segments, kept current in SQL, with entry/exit events for tracked ones.

Every DYNAMIC segment's members live in `segment_members`, so counts and listings never
re-run a condition over all contacts. One statement re-evaluates a set of contacts against
all of a project's dynamic segments: it inserts the entries, deletes the exits, records
`segment.<slug>.entry` / `.exit` events for tracked segments and adjusts `member_count`.

Concurrency, without a coordinator of our own:
- Writers take the project's advisory lock in shared mode, then row-lock the contacts they
  re-evaluate (in id order); the evaluating statement starts after both, so its snapshot
  includes every earlier writer of those contacts. Two writers of one contact therefore
  evaluate one after the other, and each real entry or exit is recorded exactly once.
- Changing a definition (create, new condition, tracking on) takes the same lock in
  exclusive mode and rebuilds: no writer evaluates against a half-changed definition.
  In a large project the rebuild leaves the request (builds.py): the exclusive lock is
  held only to mark the segment `building`; from then on writers do not evaluate it but
  note the contacts they lock in `segment_build_dirty`, and the build catches them up.
- Deleting a contact takes the shared lock and the contact's row; deleting a segment takes
  the exclusive lock. So no membership is written for a contact or segment being deleted,
  and `segment_members` needs no foreign keys (migration 0008), whose per-row checks
  doubled the time of a large create.
- Everything happens in the caller's transaction: a crash leaves no partial state.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable, Collection, Hashable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import (
    Select,
    Text,
    Uuid,
    any_,
    bindparam,
    column,
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
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session

from segments_service import config, tables
from segments_service.filters import (
    CompileContext,
    Condition,
    Derive,
    Filter,
    SegmentDefinition,
    compile_members,
    load_references,
    parse_condition,
    relative_values,
)

log = logging.getLogger(__name__)

# Rounds of re-evaluation after entry/exit events, for segments that filter on them.
MAX_EVENT_ROUNDS = 5
CHUNK = 1000
# A rebuild that moves at least this many memberships refreshes the table's statistics.
ANALYZE_AFTER_ROWS = 10_000


def slugify(name: str) -> str:
    """The name as used in entry/exit event names (README.md, Membership): lower-cased; letters (any
    script), digits, _, - and whitespace kept; whitespace runs become one -; repeated -
    collapse; no leading or trailing -."""
    kept = "".join(ch for ch in name.lower() if ch.isalnum() or ch in "_-" or ch.isspace())
    slug = re.sub(r"\s+", "-", kept)
    return re.sub(r"-{2,}", "-", slug).strip("-")


def advisory_key(purpose: str, project_id: uuid.UUID) -> int:
    """A signed 64-bit advisory lock key for one purpose ("membership", "sweep") of a project."""
    digest = hashlib.blake2b(f"{purpose}:".encode() + project_id.bytes, digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def lock_shared(session: Session, project_id: uuid.UUID) -> None:
    session.execute(
        text("SELECT pg_advisory_xact_lock_shared(:k)"),
        {"k": advisory_key("membership", project_id)},
    )


def lock_exclusive(session: Session, project_id: uuid.UUID) -> None:
    session.execute(
        text("SELECT pg_advisory_xact_lock(:k)"), {"k": advisory_key("membership", project_id)}
    )


# The budget of every background statement (a slice of a build, a sweep's), and of the
# inline builds of small projects, in seconds: none runs unbounded (docs/limits.md).
BACKGROUND_TIMEOUT = config.background_timeout()


def allow_long_statements(session: Session, seconds: float | None = None) -> None:
    """Until the end of this transaction, statements may run for the background budget."""
    budget = BACKGROUND_TIMEOUT if seconds is None else seconds
    session.execute(text(f"SET LOCAL statement_timeout = {max(1, round(budget * 1000))}"))


def db_now(session: Session) -> datetime:
    """The database clock, so windows agree with timestamps the database wrote."""
    now: datetime = session.execute(select(func.clock_timestamp())).scalar_one()
    return now


def load_definitions(
    session: Session, project_id: uuid.UUID, ids: set[uuid.UUID]
) -> dict[uuid.UUID, SegmentDefinition]:
    s = tables.segments.c
    rows = session.execute(
        select(s.id, s.type, s.condition).where(s.project_id == project_id, s.id.in_(ids))
    )
    return {
        r.id: SegmentDefinition(
            r.id, r.type, parse_condition(r.condition) if r.condition is not None else None
        )
        for r in rows
    }


@dataclass(frozen=True)
class Dynamic:
    """A DYNAMIC segment ready to evaluate."""

    id: uuid.UUID
    name: str
    tracked: bool
    condition: Condition
    references: Mapping[uuid.UUID, SegmentDefinition]
    # segments.membership_state: writers evaluate `stored` segments only.
    state: str = "stored"

    def filters(self) -> Iterator[Filter]:
        """Every filter of its condition and of the conditions it references."""
        yield from self.condition.iter_filters()
        for d in self.references.values():
            if d.condition is not None:
                yield from d.condition.iter_filters()

    @property
    def time_dependent(self) -> bool:
        return any(f.window is not None for f in self.filters())

    @property
    def event_names(self) -> frozenset[str]:
        """Every event name its condition (with inlined references) looks at."""
        return frozenset(name for f in self.filters() for name in f.events)

    @property
    def reads_segment_events(self) -> bool:
        """Whether entry/exit events (of any segment) can change this one's membership."""
        return any(name.startswith("segment.") for name in self.event_names)

    def members(
        self,
        project_id: uuid.UUID,
        now: datetime,
        scope: Any = None,
        relative: dict[str, Derive] | None = None,
    ) -> Select[Any]:
        """The ids of its members at `now` (among `scope`, an `= ANY` array, if given);
        `relative`: see CompileContext."""
        ctx = CompileContext(now=now, segments=self.references, relative=relative)
        return compile_members(self.condition, ctx, project_id, scope)

    @property
    def signature(self) -> Hashable:
        """Everything its member statement is built from but the instant and the ids."""
        refs = tuple(sorted((str(i), repr(d)) for i, d in self.references.items()))
        return (self.id, self.name, self.tracked, repr(self.condition), refs)


STORED, BUILDING = "stored", "building"


def dynamic_segments(
    session: Session,
    project_id: uuid.UUID,
    ids: Iterable[uuid.UUID] | None = None,
    *,
    states: Collection[str] | None = None,
) -> list[Dynamic]:
    """The project's DYNAMIC segments (or those of `ids`), with references loaded.

    Without `ids`, those whose membership is stored (and kept current), unless `states`
    (of segments.membership_state) says otherwise."""
    s = tables.segments.c
    query = select(s.id, s.name, s.track_membership, s.condition, s.membership_state).where(
        s.project_id == project_id, s.type == "DYNAMIC"
    )
    if ids is not None:
        query = query.where(s.id.in_(list(ids)))
    if states is None and ids is None:
        states = (STORED,)
    if states is not None:
        query = query.where(s.membership_state.in_(list(states)))
    out = []
    cache: dict[uuid.UUID, SegmentDefinition] = {}

    def loader(wanted: set[uuid.UUID]) -> dict[uuid.UUID, SegmentDefinition]:
        missing = wanted - set(cache)
        if missing:
            cache.update(load_definitions(session, project_id, missing))
        return {i: cache[i] for i in wanted if i in cache}

    for row in session.execute(query.order_by(s.id)):
        condition = parse_condition(row.condition)
        refs = load_references(condition, loader)
        out.append(
            Dynamic(row.id, row.name, row.track_membership, condition, refs, row.membership_state)
        )
    return out


# Which contacts to evaluate, per segment id; None means all of the project's contacts.
Scope = Mapping[uuid.UUID, Sequence[uuid.UUID]] | None


def desired_members(
    project_id: uuid.UUID,
    segments: Sequence[Dynamic],
    scope: Scope,
    now: datetime,
    relative: dict[str, Derive] | None = None,
) -> Select[Any]:
    """(segment_id, contact_id) of every member, among the scope's contacts.

    The scope's lists are parameters given at execution (scope_parameters);
    `relative`: see CompileContext."""
    scopes: list[Any] = [None] * len(segments)
    if scope is not None:
        # One array parameter per distinct list of ids, however many places read it.
        which, lists = scope_lists(segments, scope)
        arrays = [
            any_(bindparam(_scope_parameter(n), type_=tables.UUID_ARRAY)) for n in range(len(lists))
        ]
        scopes = [arrays[n] for n in which]
    parts = []
    for seg, seg_scope in zip(segments, scopes, strict=True):
        members = seg.members(project_id, now, seg_scope, relative).subquery()
        parts.append(select(literal(seg.id, Uuid).label("segment_id"), members.c.contact_id))
    return union_all(*parts) if len(parts) > 1 else parts[0]  # type: ignore[return-value]


@dataclass(frozen=True)
class Changes:
    entered: int
    exited: int
    events: int


def scope_lists(
    segments: Sequence[Dynamic], scope: Mapping[uuid.UUID, Sequence[uuid.UUID]]
) -> tuple[tuple[int, ...], list[Sequence[uuid.UUID]]]:
    """Which list (by identity) each segment's scope is, and the distinct lists in that
    order: one array parameter each in desired_members."""
    index: dict[int, int] = {}
    lists: list[Sequence[uuid.UUID]] = []
    for seg in segments:
        if id(scope[seg.id]) not in index:
            index[id(scope[seg.id])] = len(lists)
            lists.append(scope[seg.id])
    return tuple(index[id(scope[seg.id])] for seg in segments), lists


def _scope_parameter(n: int) -> str:
    return f"scope_{n}"


# The parameters of the (segment, contact) pairs _apply's exits probe.
_PAIR_SEGMENTS, _PAIR_CONTACTS = "pair_segments", "pair_contacts"


def scope_parameters(
    segments: Sequence[Dynamic],
    scope: Mapping[uuid.UUID, Sequence[uuid.UUID]],
    lists: Sequence[Sequence[uuid.UUID]],
) -> dict[str, Any]:
    """The values of desired_members' parameters for this scope (`lists` from
    scope_lists), and of the (segment, contact) pairs _apply's exits probe."""
    params: dict[str, Any] = {_scope_parameter(n): list(ids) for n, ids in enumerate(lists)}
    params[_PAIR_SEGMENTS] = [seg.id for seg in segments for _ in scope[seg.id]]
    params[_PAIR_CONTACTS] = [i for seg in segments for i in scope[seg.id]]
    return params


# Statements that re-evaluate given contacts, by what they are built from (_apply): the
# same segments meet every batch of events, and building the statement anew (compiling
# each condition, then SQLAlchemy's cache key of the whole) cost a third of a batch's
# Python time. They hold no ids; each is a few dozen kB.
STATEMENT_CACHE_SIZE = 128
_statements: OrderedDict[Hashable, tuple[Any, dict[str, Derive]]] = OrderedDict()
_statements_lock = threading.Lock()


def _cached_statement(
    key: Hashable, build: Callable[[], tuple[Any, dict[str, Derive]]]
) -> tuple[Any, dict[str, Derive]]:
    with _statements_lock:
        hit = _statements.get(key)
        if hit is not None:
            _statements.move_to_end(key)
            return hit
    built = build()
    with _statements_lock:
        _statements[key] = built
        while len(_statements) > STATEMENT_CACHE_SIZE:
            _statements.popitem(last=False)
    return built


def _apply(
    session: Session,
    project_id: uuid.UUID,
    segments: Sequence[Dynamic],
    scope: Scope,
    now: datetime,
    *,
    emit: bool = True,
) -> Changes:
    """Make `segment_members` match the conditions for the scope's contacts, in one
    statement; see the module doc."""
    if scope is None:
        statement, relative = _apply_statement(project_id, segments, None, now, emit, None)
        params: dict[str, Any] = {}
    else:
        which, lists = scope_lists(segments, scope)
        key = (project_id, emit, which, tuple(seg.signature for seg in segments))
        statement, relative = _cached_statement(
            key, lambda: _apply_statement(project_id, segments, scope, now, emit, {})
        )
        params = scope_parameters(segments, scope, lists)
    params.update(relative_values(relative, now))
    row = session.execute(statement, params).one()._mapping
    # The events recorded are an output only when a tracked segment is there.
    return Changes(entered=row["entered"], exited=row["exited"], events=row.get("events", 0))


def _apply_statement(
    project_id: uuid.UUID,
    segments: Sequence[Dynamic],
    scope: Scope,
    now: datetime,
    emit: bool,
    relative: dict[str, Derive] | None,
) -> tuple[Any, dict[str, Derive]]:
    """_apply's statement. Scoped, the contacts are parameters (scope_parameters) and with
    `relative`, so is the instant: it serves other batches."""
    m = tables.segment_members
    desired = desired_members(project_id, segments, scope, now, relative).cte("desired")
    seg_ids = [seg.id for seg in segments]
    c = tables.contacts.c
    # Contacts are joined for the insert only, not in `desired`: many member sets never
    # read contacts, and the exits need none of their columns.
    rows = select(
        literal(project_id, Uuid),
        desired.c.segment_id,
        desired.c.contact_id,
        c.created_at,
    ).join_from(
        desired,
        tables.contacts,
        (c.project_id == project_id) & (c.id == desired.c.contact_id),
    )
    columns = ["project_id", "segment_id", "contact_id", "contact_created_at"]
    if scope is None:
        # A rebuild holds the project lock exclusively: nobody else inserts memberships
        # meanwhile, so the new ones are the desired less the stored, inserted plainly and
        # in contact order (two of the table's three indexes lead with the contact after
        # the segment). A million members: 11 s, against 17-19 s with ON CONFLICT in
        # random order.
        stored = (
            select(literal(1))
            .where(
                m.c.project_id == project_id,
                # The ids as values too: the planner cannot see through `desired` which
                # segments it holds, and would probe every membership of each contact.
                m.c.segment_id.in_(seg_ids),
                m.c.segment_id == desired.c.segment_id,
                m.c.contact_id == desired.c.contact_id,
            )
            .correlate(desired)
        )
        insert_new = insert(m).from_select(
            columns, rows.where(~exists(stored)).order_by(desired.c.contact_id)
        )
    else:
        # Batches insert the desired memberships of their contacts; stored ones are skipped.
        insert_new = pg_insert(m).from_select(columns, rows).on_conflict_do_nothing()
    entered = insert_new.returning(m.c.segment_id, m.c.contact_id).cte("entered")
    gone = delete(m).where(
        m.c.project_id == project_id,
        m.c.segment_id.in_(seg_ids),
        ~exists(
            select(literal(1)).where(
                desired.c.segment_id == m.c.segment_id, desired.c.contact_id == m.c.contact_id
            )
        ),
    )
    if scope is not None:
        # The (segment, contact) pairs in question, each probed by the primary key: an
        # index condition of `segment_id = ANY(..) AND contact_id = ANY(..)` lets the
        # planner pick the listing index and read whole segments instead (11 ms of an
        # 18 ms batch at a million contacts).
        pairs = (
            func.unnest(
                bindparam(_PAIR_SEGMENTS, type_=tables.UUID_ARRAY),
                bindparam(_PAIR_CONTACTS, type_=tables.UUID_ARRAY),
            )
            .table_valued(column("segment_id", Uuid), column("contact_id", Uuid))
            .render_derived(name="pairs", with_types=False)
        )
        gone = gone.where(
            m.c.segment_id == pairs.c.segment_id, m.c.contact_id == pairs.c.contact_id
        )
    exited = gone.returning(m.c.segment_id, m.c.contact_id).cte("exited")

    deltas = union_all(
        select(entered.c.segment_id, literal(1).label("delta")),
        select(exited.c.segment_id, literal(-1).label("delta")),
    ).subquery("deltas")
    totals = (
        select(deltas.c.segment_id, func.sum(deltas.c.delta).label("delta"))
        .group_by(deltas.c.segment_id)
        .subquery("totals")
    )
    s = tables.segments
    counted = (
        update(s)
        .where(s.c.project_id == project_id, s.c.id == totals.c.segment_id)
        .values(member_count=s.c.member_count + totals.c.delta)
        .returning(s.c.id)
        .cte("counted")
    )
    tracked = [seg for seg in segments if seg.tracked] if emit else []
    # The exits are counted, hence run, first: run after the inserts, their scan of a
    # segment's stored memberships would step over every entry just inserted.
    outputs = [
        select(func.count()).select_from(exited).scalar_subquery().label("exited"),
        select(func.count()).select_from(entered).scalar_subquery().label("entered"),
        select(func.count()).select_from(counted).scalar_subquery().label("counted"),
    ]
    if tracked:
        changes = union_all(
            select(entered.c.segment_id, entered.c.contact_id, literal("entry").label("kind")),
            select(exited.c.segment_id, exited.c.contact_id, literal("exit").label("kind")),
        ).subquery("changes")
        recorded = record_events(project_id, tracked, changes)
        outputs.append(select(func.count()).select_from(recorded).scalar_subquery().label("events"))
    return select(*outputs), relative or {}


def record_events(project_id: uuid.UUID, tracked: Sequence[Dynamic], changes: Any) -> Any:
    """A CTE recording `segment.<slug>.<kind>` events for `changes` (segment_id, contact_id,
    kind) of tracked segments, at consecutive positions of the project's feed.

    The positions come from the project's feed_positions row, whose lock is held until
    commit; see migration 0003 for why that makes the feed safe to read by position."""
    # Arrays rather than VALUES: a VALUES list has no cache key, so the whole statement
    # would be compiled again for every batch (a quarter of a batch's Python time).
    info = (
        func.unnest(
            literal([seg.id for seg in tracked], tables.UUID_ARRAY),
            literal([slugify(seg.name) for seg in tracked], ARRAY(Text)),
            literal([seg.name for seg in tracked], ARRAY(Text)),
        )
        .table_valued(
            column("segment_id", Uuid), column("slug", Text), column("segment_name", Text)
        )
        .render_derived(name="tracked", with_types=False)
    )
    named = (
        select(
            changes.c.contact_id,
            func.concat("segment.", info.c.slug, ".", changes.c.kind).label("name"),
            func.jsonb_build_object(
                "segmentId",
                func.cast(info.c.segment_id, Text),
                "segmentName",
                info.c.segment_name,
                type_=JSONB,
            ).label("data"),
            # Deterministic order of the events one transaction records.
            func.row_number()
            .over(order_by=(changes.c.segment_id, changes.c.kind, changes.c.contact_id))
            .label("n"),
        )
        .join_from(changes, info, info.c.segment_id == changes.c.segment_id)
        .cte("named")
    )
    f = tables.feed_positions
    allocated = (
        pg_insert(f)
        .from_select(
            ["project_id", "last_seq"],
            # No row (and no lock) when nothing is recorded.
            select(literal(project_id, Uuid), func.count())
            .select_from(named)
            .having(func.count() > 0),
        )
        .on_conflict_do_update(
            index_elements=[f.c.project_id],
            set_={"last_seq": f.c.last_seq + pg_insert(f).excluded.last_seq},
        )
        .returning(f.c.last_seq)
        .cte("allocated")
    )
    total = select(func.count()).select_from(named).scalar_subquery()
    e = tables.events
    return (
        insert(e)
        .from_select(
            ["project_id", "contact_id", "name", "data", "occurred_at", "feed_seq"],
            select(
                literal(project_id, Uuid),
                named.c.contact_id,
                named.c.name,
                named.c.data,
                func.now(),
                allocated.c.last_seq - total + named.c.n,
            )
            .select_from(named)
            .join(allocated, literal(True))
            .order_by(named.c.n),
        )
        .returning(e.c.id)
        .cte("recorded")
    )


def apply_scoped(
    session: Session, project_id: uuid.UUID, segment: Dynamic, contact_ids: Sequence[uuid.UUID]
) -> Changes:
    """Re-evaluate these contacts (locked by the caller, lock_contacts) against one
    segment, recording entry/exit events if it is tracked."""
    ids = list(contact_ids)
    return _apply(session, project_id, [segment], {segment.id: ids}, db_now(session))


def lock_contacts(
    session: Session, project_id: uuid.UUID, contact_ids: Iterable[uuid.UUID]
) -> list[uuid.UUID]:
    """Lock these contacts' rows until commit, in id order; answers the ids that exist.

    The caller holds the project's shared membership lock (lock_shared). Every writer that
    re-evaluates membership for contacts takes these locks first (after that lock, before
    any statement that takes the count or feed locks): concurrent writers of one contact evaluate one after the other, each
    statement seeing the events of those before it, and two writers never wait on each
    other in opposite orders. Writers of events hold at least a KEY SHARE lock of their
    contacts (contacts.ensure_contacts) so none can be deleted meanwhile: events and
    memberships have no foreign key to contacts (migrations 0004 and 0008).
    """
    wanted = sorted(set(contact_ids))
    if not wanted:
        return []
    c = tables.contacts.c
    return [
        r.id
        for r in session.execute(
            select(c.id)
            .where(c.project_id == project_id, c.id == tables.any_uuid(wanted))
            .order_by(c.id)
            # FOR NO KEY UPDATE: static list inserts (a foreign key) still pass.
            .with_for_update(key_share=True)
        )
    ]


def refresh_contacts(
    session: Session,
    project_id: uuid.UUID,
    contact_ids: Iterable[uuid.UUID],
    *,
    event_contacts: Mapping[str, Collection[uuid.UUID]] | None = None,
    static_segment: uuid.UUID | None = None,
    new_contacts: Iterable[uuid.UUID] = (),
) -> Changes:
    """Re-evaluate contacts against the project's dynamic segments.

    Called at the end of every write that can change membership. Without a hint every
    dynamic segment re-evaluates every contact given. With `static_segment` (only that
    list changed), `contact_ids` meet just the segments whose conditions reach the list.
    With `event_contacts` (only events were added: each event name with the contacts that
    got one), a segment re-evaluates just the contacts that got an event it reads: an
    event no condition reads costs no evaluation and no lock. `new_contacts` meet every
    segment.

    The contacts to re-evaluate are locked first (lock_contacts).
    """
    new = set(new_contacts)
    given = set(contact_ids) | new
    if not given:
        return Changes(0, 0, 0)
    lock_shared(session, project_id)
    every = dynamic_segments(session, project_id, states=(STORED, BUILDING))
    if not every:
        return Changes(0, 0, 0)

    def wanted_by(seg: Dynamic) -> set[uuid.UUID]:
        if event_contacts is not None:
            got = set(new)
            for name in seg.event_names & event_contacts.keys():
                got.update(event_contacts[name])
            return got
        if static_segment is not None and static_segment not in seg.references:
            return new
        return given

    wanted = {seg.id: wanted_by(seg) for seg in every}
    locked = lock_contacts(session, project_id, set().union(*wanted.values()))
    present = set(locked)
    # Segments being built are not evaluated: their contacts are noted, after the locks,
    # for the build to catch up (builds.py).
    mark_dirty(
        session,
        project_id,
        {seg.id: wanted[seg.id] & present for seg in every if seg.state == BUILDING},
    )
    every = [seg for seg in every if seg.state == STORED]
    # Segments wanting the same contacts share one list, hence one array parameter.
    lists: dict[frozenset[uuid.UUID], list[uuid.UUID]] = {}
    scope: dict[uuid.UUID, Sequence[uuid.UUID]] = {}
    for seg in every:
        ids = frozenset(wanted[seg.id] & present)
        scope[seg.id] = lists.setdefault(ids, sorted(ids))
    segments = [seg for seg in every if scope[seg.id]]
    # Entry/exit events recorded in one round can move segments that filter on them.
    followers = [seg for seg in every if seg.reads_segment_events]
    total = Changes(0, 0, 0)
    for _round in range(MAX_EVENT_ROUNDS):
        if not segments:
            break
        changes = _apply(session, project_id, segments, scope, db_now(session))
        total = Changes(
            total.entered + changes.entered,
            total.exited + changes.exited,
            total.events + changes.events,
        )
        if not changes.events:
            break
        segments = followers
        scope = {seg.id: locked for seg in followers}
    return total


def rebuild(
    session: Session,
    project_id: uuid.UUID,
    segment_ids: Iterable[uuid.UUID],
    *,
    emit: bool,
) -> Changes:
    """Recompute these segments over all contacts, under the exclusive project lock.

    `emit` records entry/exit events for the difference (tracked segments only)."""
    allow_long_statements(session)
    lock_exclusive(session, project_id)
    segments = dynamic_segments(session, project_id, segment_ids)
    if not segments:
        return Changes(0, 0, 0)
    s = tables.segments.c
    for seg in segments:
        session.execute(
            update(tables.segments)
            .where(s.project_id == project_id, s.id == seg.id)
            .values(time_dependent=seg.time_dependent)
        )
    changes = _apply(session, project_id, segments, None, db_now(session), emit=emit)
    if changes.entered + changes.exited >= ANALYZE_AFTER_ROWS:
        # Statistics from before a bulk change make the planner misjudge the per-batch
        # statements that follow (it hashed a whole 65k-row segment for 123 exits: 75 ms
        # instead of 1 ms) until autovacuum analyzes the table, up to minutes later.
        session.execute(text("ANALYZE segment_members"))
    return changes


def dependents(session: Session, project_id: uuid.UUID, segment_id: uuid.UUID) -> set[uuid.UUID]:
    """Segments whose conditions reach `segment_id` through references (transitively)."""
    r = tables.segment_references.c
    found: set[uuid.UUID] = set()
    frontier = {segment_id}
    while frontier:
        rows = session.execute(
            select(r.segment_id).where(r.project_id == project_id, r.referenced_id.in_(frontier))
        )
        frontier = {row.segment_id for row in rows} - found - {segment_id}
        found |= frontier
    return found


def record_entries_for_all(session: Session, project_id: uuid.UUID, segment_id: uuid.UUID) -> int:
    """Tracking was just turned on: one entry event per current member."""
    (segment,) = dynamic_segments(session, project_id, [segment_id])
    m = tables.segment_members.c
    changes = (
        select(m.segment_id, m.contact_id, literal("entry").label("kind"))
        .where(m.project_id == project_id, m.segment_id == segment_id)
        .subquery("changes")
    )
    recorded = record_events(project_id, [segment], changes)
    return int(session.execute(select(func.count()).select_from(recorded)).scalar_one())


def forget_contact(session: Session, project_id: uuid.UUID, contact_id: uuid.UUID) -> None:
    """Before a contact is deleted: its memberships leave the maintained counts (no exit
    events; the contact and its history are gone)."""
    lock_shared(session, project_id)
    s = tables.segments
    building = session.execute(
        select(s.c.id).where(s.c.project_id == project_id, s.c.membership_state == BUILDING)
    ).scalars()
    mark_dirty(session, project_id, {segment_id: [contact_id] for segment_id in building})
    for table in (tables.segment_members, tables.static_members):
        gone = (
            delete(table)
            .where(table.c.project_id == project_id, table.c.contact_id == contact_id)
            .returning(table.c.segment_id)
            .cte("gone")
        )
        session.execute(
            update(s)
            .where(s.c.project_id == project_id, s.c.id.in_(select(gone.c.segment_id)))
            .values(member_count=s.c.member_count - 1)
        )


def adjust_count(
    session: Session, project_id: uuid.UUID, segment_id: uuid.UUID, delta: int
) -> None:
    if delta:
        s = tables.segments
        session.execute(
            update(s)
            .where(s.c.project_id == project_id, s.c.id == segment_id)
            .values(member_count=s.c.member_count + delta)
        )


def mark_dirty(
    session: Session,
    project_id: uuid.UUID,
    contacts: Mapping[uuid.UUID, Collection[uuid.UUID]],
) -> None:
    """Note contacts a writer touched, per segment being built, for its build's catch-up."""
    segment_ids = [seg for seg, ids in contacts.items() for _ in ids]
    if not segment_ids:
        return
    d = tables.segment_build_dirty
    pairs = (
        func.unnest(
            literal(segment_ids, tables.UUID_ARRAY),
            literal([i for ids in contacts.values() for i in ids], tables.UUID_ARRAY),
        )
        .table_valued(column("segment_id", Uuid), column("contact_id", Uuid))
        .render_derived(name="pairs", with_types=False)
    )
    session.execute(
        pg_insert(d)
        .from_select(
            ["project_id", "segment_id", "contact_id"],
            select(literal(project_id, Uuid), pairs.c.segment_id, pairs.c.contact_id),
        )
        .on_conflict_do_nothing()
    )
