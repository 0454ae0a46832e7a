"""Segments: create, read, update, delete, with their validation, and counts of members."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import psycopg.errors
from sqlalchemy import (
    Row,
    Select,
    Uuid,
    and_,
    any_,
    case,
    delete,
    func,
    insert,
    literal,
    select,
    text,
    update,
)
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from segments_service import builds, membership, tables
from segments_service.contacts import NUL_MESSAGE
from segments_service.errors import (
    FieldViolation,
    NotFound,
    SegmentBuilding,
    SegmentInUse,
    ValidationError,
)
from segments_service.filters import (
    MAX_EXPANDED_DEPTH,
    MAX_EXPANDED_FILTERS,
    CompileContext,
    Condition,
    SegmentDefinition,
    check_expansion,
    compile_count,
    compile_members,
    compile_sampled_count,
    expansions,
    load_references,
    parse_condition,
)

DYNAMIC = "DYNAMIC"
STATIC = "STATIC"
MAX_NAME = 100
MAX_DESCRIPTION = 500


# How long a create or update waits for the live count of a segment it leaves BUILDING.
RESPONSE_COUNT_SECONDS = 1.0


@dataclass(frozen=True)
class SegmentView:
    """A segment row with its member count at the time of the request."""

    row: Row[Any]
    member_count: int


def get_row(session: Session, project_id: uuid.UUID, segment_id: uuid.UUID) -> Row[Any]:
    s = tables.segments
    row = session.execute(
        select(s).where(s.c.project_id == project_id, s.c.id == segment_id)
    ).first()
    if row is None:
        raise NotFound(f"segment {segment_id} not found")
    return row


def _context(
    session: Session, project_id: uuid.UUID, condition: Condition, now: datetime | None
) -> CompileContext:
    refs = load_references(
        condition, lambda ids: membership.load_definitions(session, project_id, ids)
    )
    return CompileContext(now=now or datetime.now(UTC), segments=refs)


def member_ids(
    session: Session,
    project_id: uuid.UUID,
    condition: Condition,
    now: datetime | None = None,
) -> Select[Any]:
    """The compiled statement of a DYNAMIC condition (its members' contact ids), with its
    segment references loaded."""
    return compile_members(condition, _context(session, project_id, condition, now), project_id)


def member_count_statement(
    session: Session,
    project_id: uuid.UUID,
    condition: Condition,
    now: datetime | None = None,
) -> Select[Any]:
    """The compiled statement counting a condition's members (filters.compile_count)."""
    return compile_count(condition, _context(session, project_id, condition, now), project_id)


# Memory for each sort and hash of a count statement. At a million contacts counting the
# distinct ids of a popular event sorts 200k of them, and grouping a login history hashes
# 290k: at the server's 4 MB both spill to disk, at 100k contacts neither does. Raised
# for counts only: for the anti-joins of creates and rebuilds a larger work_mem makes the
# planner hash all of a project's contacts (see database.embedded_settings).
COUNT_WORK_MEM = "32MB"
# Run in the count's transaction, before the statement (the benchmark's counts run it too).
COUNT_SETTINGS = text(f"SET LOCAL work_mem = '{COUNT_WORK_MEM}'")


def _unsaved_condition(session: Session, project_id: uuid.UUID, condition_json: Any) -> Condition:
    """A condition validated as CreateSegment validates a DYNAMIC segment's."""
    if condition_json is None:
        raise ValidationError.single("condition", "is required", "required")
    condition = parse_condition(condition_json)
    _check_references(session, project_id, condition, None)
    return condition


def count_matching(session: Session, project_id: uuid.UUID, condition_json: Any) -> int:
    """How many of the project's contacts a condition selects now, computed from the
    condition itself (nothing is stored): CountMatchingContacts."""
    condition = _unsaved_condition(session, project_id, condition_json)
    statement = member_count_statement(session, project_id, condition)
    session.execute(COUNT_SETTINGS)
    return int(session.execute(statement).scalar_one())


PREVIEW_SAMPLE = 10


@dataclass(frozen=True)
class Preview:
    """What a condition selects now: how many contacts, and a few of them."""

    member_count: int
    sample: list[Row[Any]]


# The sample is looked for in slices of the contact id space: ids are random UUIDs, so the
# contacts with ids up to a bound are about that share of the project's (a thousandth,
# then a fiftieth); past them, in all of them. The count's pass gathers every member id of
# each slice, so a wide slice costs a large segment's count the most: a twentieth added
# 7.5 ms to the 87 ms count of 250,000 members at a million contacts, a fiftieth 2.2 ms.
# A fiftieth holds ten members of a condition met by one contact in 2,000 or more.
PREVIEW_SLICES = (0.001, 0.02)
_UUID_SPACE = 2**128
# array_agg's partial states combine across parallel workers from this server version on.
_PARALLEL_ARRAY_AGG = (16,)


def _slice_bound(share: float) -> uuid.UUID:
    return uuid.UUID(int=int(share * _UUID_SPACE))


def preview(session: Session, project_id: uuid.UUID, condition_json: Any) -> Preview:
    """PreviewSegment: the count of count_matching and up to PREVIEW_SAMPLE of the members,
    in one transaction; nothing is stored.

    The count's own pass gathers the members found in each slice (compile_sampled_count),
    and the same statement reads the contacts of the smallest slice holding enough: one
    statement for the count and its sample. Where the count is taken by subtraction
    (everyone but a set), or on a server before PostgreSQL 16, the same statement reads
    the first slice beside the count, as a build reads one, from the indexes on contact
    ids. Either way, when the slices hold too
    few (a condition met by fewer than about one contact in 2,000), the rest come from
    the member statement under a LIMIT, planned to start fast. The members found are shown
    newest first. Measured at a million contacts: BENCHMARKS.md, "Preview"."""
    condition = _unsaved_condition(session, project_id, condition_json)
    ctx = _context(session, project_id, condition, None)
    session.execute(COUNT_SETTINGS)
    bounds = [_slice_bound(share) for share in PREVIEW_SLICES]
    sampled = None
    if (session.connection().dialect.server_version_info or ()) >= _PARALLEL_ARRAY_AGG:
        sampled = compile_sampled_count(condition, _fresh(ctx), project_id, bounds, PREVIEW_SAMPLE)
    if sampled is not None:
        # The count, and the members of each slice it met: the smallest holding enough.
        counted = sampled.subquery("counted")
        total, *slices = counted.c
        wanted = func.least(PREVIEW_SAMPLE, total)
        chosen: Any = slices[-1]
        if len(slices) > 1:
            chosen = case(
                *[(func.cardinality(ids) >= wanted, ids) for ids in slices[:-1]], else_=chosen
            )
        high = bounds[-1]  # when the sample is short, no slice held enough: the last was read
    else:
        # The count, and beside it the first slice's members under a LIMIT, read as a build
        # reads a slice, from the indexes on contact ids.
        high = bounds[0]
        first = (
            compile_members(condition, _fresh(ctx), project_id, _id_range(high))
            .limit(PREVIEW_SAMPLE)
            .subquery("first")
        )
        counted = select(
            compile_count(condition, _fresh(ctx), project_id).scalar_subquery().label("count"),
            select(func.array_agg(first.c.contact_id)).scalar_subquery().label("ids"),
        ).subquery("counted")
        total, chosen = counted.c
    # One statement: the count, and the chosen members' contacts.
    contact = tables.contacts.c
    rows = session.execute(
        select(total.label("member_count"), tables.contacts)
        .select_from(
            counted.outerjoin(
                tables.contacts,
                and_(contact.project_id == project_id, contact.id == any_(chosen)),
            )
        )
        .order_by(contact.created_at.desc(), contact.id.desc())
    ).all()
    count = int(rows[0].member_count)
    sample = [row for row in rows if row.id is not None]
    if len(sample) < min(PREVIEW_SAMPLE, count):
        rest = compile_members(condition, _fresh(ctx), project_id).subquery("rest")
        more = (
            select(rest.c.contact_id)
            .where(rest.c.contact_id > high)
            .limit(PREVIEW_SAMPLE - len(sample))
        )
        sample += _contacts(session, project_id, [row[0] for row in session.execute(more)])
        sample.sort(key=lambda row: (row.created_at, row.id), reverse=True)
    return Preview(count, sample)


def _contacts(session: Session, project_id: uuid.UUID, ids: list[uuid.UUID]) -> list[Row[Any]]:
    """The project's contacts of `ids`, newest first."""
    contact = tables.contacts.c
    return list(
        session.execute(
            select(tables.contacts)
            .where(contact.project_id == project_id, contact.id == tables.any_uuid(ids))
            .order_by(contact.created_at.desc(), contact.id.desc())
        ).all()
    )


def _fresh(ctx: CompileContext) -> CompileContext:
    """A context of its own per statement (compiling counts the filters it expands)."""
    return CompileContext(now=ctx.now, segments=ctx.segments)


def _id_range(high: uuid.UUID) -> Any:
    """The scope of the contact ids up to `high`."""

    def within(column: Any) -> Any:
        return column <= literal(high, Uuid)

    return within


def is_stored(row: Row[Any]) -> bool:
    """Whether the segment's members are stored and current; otherwise (being built, or a
    failed first build) they are answered live from its condition."""
    return bool(row.type == STATIC or row.membership_state == membership.STORED)


def _live(session: Session, statement: Any) -> Any:
    """Run a live membership statement under the request's budget; a cancelled one is
    SEGMENT_BUILDING (retry later), not an internal error."""
    try:
        return session.execute(statement)
    except DBAPIError as exc:
        if isinstance(exc.orig, psycopg.errors.QueryCanceled):
            raise SegmentBuilding(
                "the segment's membership is being built and could not be counted in time; "
                "retry the request shortly"
            ) from exc
        raise


def count_members(session: Session, row: Row[Any]) -> int:
    """The maintained count, exact as of this transaction (see membership/); live from
    the condition while the segment is not stored."""
    if is_stored(row):
        return int(row.member_count)
    condition = parse_condition(row.condition)
    statement = member_count_statement(session, row.project_id, condition)
    session.execute(COUNT_SETTINGS)
    return int(_live(session, statement).scalar_one())


def _quick_count(session: Session, project_id: uuid.UUID, condition: Condition) -> int | None:
    """The live count if it takes at most RESPONSE_COUNT_SECONDS, else None (the request
    carries on; the budget of its later statements is restored)."""
    before = int(
        session.execute(
            text("SELECT setting FROM pg_settings WHERE name = 'statement_timeout'")
        ).scalar_one()
    )
    wait = round(RESPONSE_COUNT_SECONDS * 1000)
    if before:
        wait = min(wait, before)  # never longer than the request may take
    statement = member_count_statement(session, project_id, condition)
    try:
        with session.begin_nested():
            session.execute(
                text("SELECT set_config('statement_timeout', :t, true)"), {"t": str(wait)}
            )
            session.execute(COUNT_SETTINGS)
            count = int(session.execute(statement).scalar_one())
    except DBAPIError as exc:
        if not isinstance(exc.orig, psycopg.errors.QueryCanceled):
            raise
        count = None
    session.execute(text("SELECT set_config('statement_timeout', :t, true)"), {"t": str(before)})
    return count


def list_segments(session: Session, project_id: uuid.UUID) -> list[SegmentView]:
    s = tables.segments
    rows = session.execute(
        select(s).where(s.c.project_id == project_id).order_by(s.c.created_at.desc(), s.c.id.desc())
    ).all()
    return [SegmentView(r, count_members(session, r)) for r in rows]


def get_segment(session: Session, project_id: uuid.UUID, segment_id: uuid.UUID) -> SegmentView:
    row = get_row(session, project_id, segment_id)
    return SegmentView(row, count_members(session, row))


def _check_text(name: str | None, description: str | None) -> None:
    violations = []
    if name is not None:
        if not name.strip():
            violations.append(FieldViolation("name", "is required", "required"))
        elif len(name) > MAX_NAME:
            violations.append(
                FieldViolation("name", f"must be at most {MAX_NAME} characters", "too_long")
            )
        elif "\x00" in name:
            violations.append(FieldViolation("name", NUL_MESSAGE, "invalid_character"))
    if description is not None and len(description) > MAX_DESCRIPTION:
        violations.append(
            FieldViolation(
                "description", f"must be at most {MAX_DESCRIPTION} characters", "too_long"
            )
        )
    elif description is not None and "\x00" in description:
        violations.append(FieldViolation("description", NUL_MESSAGE, "invalid_character"))
    if violations:
        raise ValidationError(violations)


def _check_references(
    session: Session,
    project_id: uuid.UUID,
    condition: Condition,
    segment_id: uuid.UUID | None,
) -> None:
    """References name segments of this project, saving creates no cycle, and neither
    this condition nor one that references this segment exceeds the limits of expanded
    references (filters.check_expansion)."""
    referenced = condition.referenced_segments()
    if not referenced:
        if segment_id is not None:
            _check_dependents(session, project_id, segment_id, condition)
        return
    known = membership.load_definitions(session, project_id, referenced)
    violations = [
        FieldViolation(f"{path}.field", f"segment {f.segment_id} does not exist in this project")
        for path, f in condition.iter_paths()
        if f.segment_id is not None and f.segment_id not in known
    ]
    if violations:
        raise ValidationError(violations)
    if segment_id is None:
        # A new segment cannot be referenced yet, so it closes no cycle.
        check_expansion(condition, _reachable(session, project_id, condition, known))
        return
    r = tables.segment_references.c
    edges: dict[uuid.UUID, set[uuid.UUID]] = {}
    for e in session.execute(
        select(r.segment_id, r.referenced_id).where(
            r.project_id == project_id, r.segment_id != segment_id
        )
    ):
        edges.setdefault(e.segment_id, set()).add(e.referenced_id)
    edges[segment_id] = referenced
    cycle = _find_cycle(edges, segment_id)
    if cycle:
        names = _names(session, project_id, cycle)
        chain = " -> ".join(f"{names.get(i, '?')} ({i})" for i in cycle)
        path = next(p for p, f in condition.iter_paths() if f.segment_id == cycle[1])
        raise ValidationError.single(
            f"{path}.field", f"segment references form a cycle: {chain}", "cycle"
        )
    check_expansion(condition, _reachable(session, project_id, condition, known))
    _check_dependents(session, project_id, segment_id, condition)


def _reachable(
    session: Session,
    project_id: uuid.UUID,
    condition: Condition,
    known: Mapping[uuid.UUID, SegmentDefinition],
) -> dict[uuid.UUID, SegmentDefinition]:
    """The segments `condition` reaches through references, `known` ones not loaded again."""

    def loader(ids: set[uuid.UUID]) -> Mapping[uuid.UUID, SegmentDefinition]:
        missing = ids - known.keys()
        found = dict(membership.load_definitions(session, project_id, missing)) if missing else {}
        found.update((i, known[i]) for i in ids & known.keys())
        return found

    return load_references(condition, loader)


def _check_dependents(
    session: Session, project_id: uuid.UUID, segment_id: uuid.UUID, condition: Condition
) -> None:
    """Segments that reference this one inline its new condition: each must stay within
    the limits of expanded references."""
    users = membership.dependents(session, project_id, segment_id)
    if not users:
        return
    changed = SegmentDefinition(segment_id, DYNAMIC, condition)
    loaded = dict(membership.load_definitions(session, project_id, users))
    loaded[segment_id] = changed

    def loader(ids: set[uuid.UUID]) -> Mapping[uuid.UUID, SegmentDefinition]:
        missing = ids - loaded.keys()
        if missing:
            loaded.update(membership.load_definitions(session, project_id, missing))
        return {i: loaded[i] for i in ids if i in loaded}

    everything = dict(loaded)
    for user in sorted(users):
        user_condition = loaded[user].condition
        if user_condition is not None:
            everything.update(load_references(user_condition, loader))
    measured = expansions(everything)
    for user in sorted(users):
        size = measured.get(user)
        if size is None:
            continue
        if size.filters > MAX_EXPANDED_FILTERS or size.depth > MAX_EXPANDED_DEPTH:
            names = _names(session, project_id, [user])
            raise ValidationError.single(
                "condition",
                f"segment {names.get(user, '?')} ({user}) references this one and would then "
                f"hold more than {MAX_EXPANDED_FILTERS} filters or nest more than "
                f"{MAX_EXPANDED_DEPTH} deep with references expanded",
                "too_many" if size.filters > MAX_EXPANDED_FILTERS else "too_deep",
            )


def _find_cycle(
    edges: Mapping[uuid.UUID, set[uuid.UUID]], start: uuid.UUID
) -> list[uuid.UUID] | None:
    """A path start -> ... -> start through `edges`, or None."""
    stack: list[tuple[uuid.UUID, list[uuid.UUID]]] = [(start, [start])]
    seen: set[uuid.UUID] = set()
    while stack:
        node, path = stack.pop()
        for nxt in sorted(edges.get(node, ())):
            if nxt == start:
                return [*path, start]
            if nxt not in seen:
                seen.add(nxt)
                stack.append((nxt, [*path, nxt]))
    return None


def _names(session: Session, project_id: uuid.UUID, ids: Sequence[uuid.UUID]) -> dict[Any, str]:
    s = tables.segments.c
    rows = session.execute(
        select(s.id, s.name).where(s.project_id == project_id, s.id.in_(set(ids)))
    )
    return {row.id: row.name for row in rows}


def _store_references(
    session: Session, project_id: uuid.UUID, segment_id: uuid.UUID, condition: Condition | None
) -> None:
    r = tables.segment_references
    session.execute(delete(r).where(r.c.project_id == project_id, r.c.segment_id == segment_id))
    referenced = condition.referenced_segments() if condition else set()
    if referenced:
        session.execute(
            insert(r),
            [
                {"project_id": project_id, "segment_id": segment_id, "referenced_id": ref}
                for ref in sorted(referenced)
            ],
        )


def create_segment(
    session: Session,
    project_id: uuid.UUID,
    *,
    name: str,
    description: str | None,
    segment_type: str,
    condition_json: Any,
    track_membership: bool,
    inline_contacts: int | None = None,
) -> SegmentView:
    """A new segment; a DYNAMIC one of a project above `inline_contacts` contacts (default
    SEGMENTS_INLINE_BUILD_CONTACTS) is answered BUILDING and built in the background."""
    _check_text(name, description)
    _check_tracking(segment_type, track_membership)
    condition: Condition | None = None
    background = False
    count: int | None = None
    if segment_type == DYNAMIC:
        if condition_json is None:
            raise ValidationError.single(
                "condition", "is required for DYNAMIC segments", "required"
            )
        condition = parse_condition(condition_json)
        _check_references(session, project_id, condition, None)
        background = not builds.builds_inline(session, project_id, _inline_limit(inline_contacts))
        if background:
            count = _quick_count(session, project_id, condition)
            membership.lock_exclusive(session, project_id)
    row = session.execute(
        insert(tables.segments)
        .values(
            project_id=project_id,
            name=name,
            description=description or None,
            type=segment_type,
            condition=condition.to_json() if condition else None,
            track_membership=track_membership,
            # One instant for both: a new segment's createdAt equals its updatedAt.
            created_at=func.statement_timestamp(),
            updated_at=func.statement_timestamp(),
        )
        .returning(*tables.segments.c)
    ).one()
    _store_references(session, project_id, row.id, condition)
    if condition is not None and background:
        builds.start_build(session, project_id, row.id, previous_condition=None, enter_all=False)
        return SegmentView(get_row(session, project_id, row.id), count or 0)
    if condition is not None:
        membership.rebuild(session, project_id, [row.id], emit=track_membership)
        row = get_row(session, project_id, row.id)
    return SegmentView(row, count_members(session, row))


def _check_tracking(segment_type: str, track_membership: bool | None) -> None:
    """Only DYNAMIC segments track membership: a STATIC one's members change by the
    members calls alone, which record no entry or exit events."""
    if track_membership and segment_type == STATIC:
        raise ValidationError.single(
            "trackMembership",
            "cannot be true for a STATIC segment (only DYNAMIC segments track membership)",
            "invalid_value",
        )


def _inline_limit(given: int | None) -> int:
    return builds.BuildSettings.from_env().inline_contacts if given is None else given


def update_segment(
    session: Session,
    project_id: uuid.UUID,
    segment_id: uuid.UUID,
    *,
    name: str | None,
    description: str | None,
    segment_type: str | None,
    condition_json: Any,
    track_membership: bool | None,
    inline_contacts: int | None = None,
) -> SegmentView:
    """Change a segment. A new condition, or tracking turned on, rebuilds its membership
    (and that of the segments reaching it): inline in a small project, else in the
    background, the segments BUILDING meanwhile (see builds.py)."""
    background = False
    count: int | None = None
    if condition_json is not None or track_membership:
        before = get_row(session, project_id, segment_id)
        if before.type == DYNAMIC and (condition_json is not None or not before.track_membership):
            background = not builds.builds_inline(
                session, project_id, _inline_limit(inline_contacts)
            )
        if background and condition_json is not None:
            # Counted before any lock is taken, so writers never wait on it.
            condition = parse_condition(condition_json)
            _check_references(session, project_id, condition, segment_id)
            count = _quick_count(session, project_id, condition)
        if background:
            # Before the segment's row: writers take the lock, then rows.
            membership.lock_exclusive(session, project_id)
    current = session.execute(
        select(tables.segments)
        .where(tables.segments.c.project_id == project_id, tables.segments.c.id == segment_id)
        .with_for_update()
    ).first()
    if current is None:
        raise NotFound(f"segment {segment_id} not found")
    if segment_type is not None and segment_type != current.type:
        raise ValidationError.single(
            "type", f"cannot change after creation (this segment is {current.type})", "immutable"
        )
    _check_text(name, description)
    _check_tracking(current.type, track_membership)
    changes: dict[str, Any] = {}
    if name is not None:
        changes["name"] = name
    if description is not None:
        changes["description"] = description or None
    if track_membership is not None:
        changes["track_membership"] = track_membership
    if condition_json is not None and current.type == DYNAMIC:
        condition = parse_condition(condition_json)
        _check_references(session, project_id, condition, segment_id)
        changes["condition"] = condition.to_json()
        _store_references(session, project_id, segment_id, condition)
    if changes:
        session.execute(
            update(tables.segments)
            .where(tables.segments.c.project_id == project_id, tables.segments.c.id == segment_id)
            .values(**changes, updated_at=func.clock_timestamp())
        )
    if current.type == DYNAMIC and background:
        if _start_builds(session, current, changes):
            row = get_row(session, project_id, segment_id)
            fallback = 0 if current.membership_state != membership.STORED else current.member_count
            return SegmentView(row, fallback if count is None else count)
    elif current.type == DYNAMIC:
        _refresh_definition(session, current, changes)
    return get_segment(session, project_id, segment_id)


def _start_builds(session: Session, current: Row[Any], changes: dict[str, Any]) -> bool:
    """Queue the background builds a changed definition needs (the caller holds the
    exclusive lock); answers whether there were any."""
    project_id, segment_id = current.project_id, current.id
    turning_on = changes.get("track_membership") is True and not current.track_membership
    if "condition" in changes:
        builds.start_build(
            session,
            project_id,
            segment_id,
            previous_condition=current.condition,
            enter_all=turning_on,
        )
        for dependent in sorted(membership.dependents(session, project_id, segment_id)):
            builds.start_build(
                session, project_id, dependent, previous_condition=None, enter_all=False
            )
        return True
    if turning_on:
        builds.start_build(session, project_id, segment_id, previous_condition=None, enter_all=True)
        return True
    return False


def _refresh_definition(session: Session, current: Row[Any], changes: dict[str, Any]) -> None:
    """Bring memberships in line with a changed DYNAMIC definition, inline.

    A new condition rebuilds this segment and every segment that reaches it through
    references (their inlined conditions changed too), recording entry/exit events for the
    difference. Turning tracking on records one entry per current member; turning it off
    records nothing. A build of these segments under way is replaced by this one."""
    project_id, segment_id = current.project_id, current.id
    turning_on = changes.get("track_membership") is True and not current.track_membership
    if "condition" in changes:
        affected = {segment_id} | membership.dependents(session, project_id, segment_id)
        membership.lock_exclusive(session, project_id)
        for rebuilt in sorted(affected):
            builds.cancel_build(session, project_id, rebuilt)
        membership.rebuild(session, project_id, affected - {segment_id}, emit=True)
        membership.rebuild(session, project_id, [segment_id], emit=not turning_on)
    elif turning_on:
        membership.lock_exclusive(session, project_id)
        builds.cancel_build(session, project_id, segment_id)
        membership.rebuild(session, project_id, [segment_id], emit=False)
    if turning_on:
        membership.record_entries_for_all(session, project_id, segment_id)


def delete_segment(session: Session, project_id: uuid.UUID, segment_id: uuid.UUID) -> None:
    """Delete a segment with its memberships.

    The project's membership lock is taken exclusively first: every writer of
    `segment_members` holds it (shared or exclusive) from loading the definitions it
    evaluates until it commits, so none is still writing for this segment, and none that
    starts later sees it (memberships have no foreign keys, migration 0008)."""
    membership.lock_exclusive(session, project_id)
    row = get_row(session, project_id, segment_id)
    r = tables.segment_references.c
    s = tables.segments.c
    users = session.execute(
        select(s.id, s.name)
        .join(tables.segment_references, (r.project_id == s.project_id) & (r.segment_id == s.id))
        .where(r.project_id == project_id, r.referenced_id == segment_id)
        .order_by(s.name)
    ).all()
    if users:
        listed = ", ".join(f"{u.name} ({u.id})" for u in users)
        raise SegmentInUse(
            f"segment is referenced by other segments and cannot be deleted: {listed}",
            [str(u.id) for u in users],
        )
    if row.type == DYNAMIC:
        # With its build, if one is under way: the next step of the project finds none.
        builds.cancel_build(session, project_id, segment_id)
        m = tables.segment_members.c
        session.execute(
            delete(tables.segment_members).where(
                m.project_id == project_id, m.segment_id == segment_id
            )
        )
    session.execute(delete(tables.segments).where(s.project_id == project_id, s.id == segment_id))
