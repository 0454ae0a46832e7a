"""The project's DYNAMIC segments loaded ready to evaluate, and the counts of a re-evaluation."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Collection, Hashable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import cached_property, lru_cache, partial
from typing import Any, TypeVar

from sqlalchemy import Select, Text, cast, select
from sqlalchemy.orm import Session

from segments_service import tables
from segments_service.filters import (
    CompileContext,
    Condition,
    Count,
    Derive,
    Filter,
    Kind,
    Logic,
    Op,
    SegmentDefinition,
    compile_members,
    load_references,
    parse_condition,
)
from segments_service.kept import Kept

# Stored conditions by their JSON text. Every batch of events evaluates the project's
# segments, and parsing each condition again was a tenth of a batch's Python time with 200
# segments. Conditions are immutable, so one parse serves every reader of the same text.
PARSED_KEPT = 4096


@lru_cache(maxsize=PARSED_KEPT)
def parsed(source: str) -> Condition:
    """A stored condition (valid when stored) from its JSON text."""
    return parse_condition(json.loads(source))


@lru_cache(maxsize=PARSED_KEPT)
def referenced(source: str) -> frozenset[uuid.UUID]:
    """The segments a stored condition references directly."""
    return frozenset(parsed(source).referenced_segments())


def load_definitions(
    session: Session, project_id: uuid.UUID, ids: set[uuid.UUID]
) -> dict[uuid.UUID, SegmentDefinition]:
    s = tables.segments.c
    rows = session.execute(
        select(s.id, s.type, cast(s.condition, Text).label("source")).where(
            s.project_id == project_id, s.id.in_(ids)
        )
    )
    return {
        r.id: SegmentDefinition(
            r.id, r.type, parsed(r.source) if r.source is not None else None, r.source
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
    # The condition's stored JSON text, when loaded from the table: the signature uses it.
    source: str | None = field(default=None, compare=False)

    def filters(self) -> Iterator[Filter]:
        """Every filter of its condition and of the conditions it references."""
        yield from self.condition.iter_filters()
        for d in self.references.values():
            if d.condition is not None:
                yield from d.condition.iter_filters()

    @cached_property
    def time_dependent(self) -> bool:
        return any(f.window is not None for f in self.filters())

    @cached_property
    def event_names(self) -> frozenset[str]:
        """Every event name its condition (with inlined references) looks at."""
        return frozenset(name for f in self.filters() for name in f.events)

    @cached_property
    def exit_event_names(self) -> frozenset[str]:
        """The event names whose gain can take a contact out of it: those read by a filter
        that an occurrence can turn false (never, not within, triggered before a window, a
        count with an upper bound, an aggregate), or that an occurrence can turn true under
        notMemberOfSegment. Gaining any other event can only keep a contact out or bring
        it in (triggered, triggered within, at least a count), so a contact that gained
        only such events is not probed for an exit (refresh_contacts)."""
        return _exit_names(self.condition, self.references, negated=False, seen=frozenset())

    @cached_property
    def certain(self) -> Certain:
        """What an occurrence stored at the transaction's start settles on its own, for a
        transaction younger than FRESH: the event names that make the condition true
        whatever else holds, and those that make it false (see _certain). A contact that
        gained such an event need not be evaluated (refresh_contacts)."""
        return _certain(self.condition, self.references, frozenset())

    @cached_property
    def blank(self) -> bool | None:
        """Whether a contact created by a batch of events, with none of the events its
        condition reads, is a member: True or False where what every such contact shares
        decides (it has no occurrence, is on no list, has no data and is subscribed, as
        events.ingest creates it), None where its email or timestamps could (see
        _blank)."""
        return _blank(self.condition, self.references, frozenset())

    @cached_property
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
        """The ids of its members at `now` (among `scope`, if given: an `= ANY` array, or
        a function of a contact-id column, see compile_members); `relative`: see
        CompileContext."""
        ctx = CompileContext(now=now, segments=self.references, relative=relative)
        return compile_members(self.condition, ctx, project_id, scope)

    @cached_property
    def signature(self) -> Hashable:
        """Everything its member statement is built from but the instant and the ids."""
        refs = tuple(
            sorted(
                (str(i), d.type, _text(d.condition, d.source)) for i, d in self.references.items()
            )
        )
        return (self.id, self.name, self.tracked, _text(self.condition, self.source), refs)


def _text(condition: Condition | None, source: str | None) -> str:
    """A condition's stored text, or its repr where it was not loaded from the table."""
    return source if source is not None else repr(condition)


# Event tests an occurrence can only turn true (without an aggregate, and a count, if any,
# that is a lower bound), and tests it can only turn false.
_RISING = {Op.TRIGGERED, Op.TRIGGERED_WITHIN}
_RISING_COUNTS = {Op.GT, Op.GTE}
_FALLING = {Op.NOT_TRIGGERED, Op.NOT_TRIGGERED_WITHIN}


def _exit_names(
    condition: Condition,
    references: Mapping[uuid.UUID, SegmentDefinition],
    *,
    negated: bool,
    seen: frozenset[uuid.UUID],
) -> frozenset[str]:
    """Dynamic.exit_event_names of `condition`, read under a notMemberOfSegment when
    `negated`. AND and OR keep a filter's direction; only notMemberOfSegment reverses it."""
    names: set[str] = set()
    for f in condition.iter_filters():
        if f.kind == Kind.SEGMENT:
            definition = references.get(f.segment_id) if f.segment_id is not None else None
            if definition is None or definition.condition is None:
                continue  # a STATIC list: events do not move its members
            if definition.id in seen:
                # Never stored (references are acyclic); every name, to be safe.
                names.update(n for g in definition.condition.iter_filters() for n in g.events)
                continue
            names |= _exit_names(
                definition.condition,
                references,
                negated=negated != (f.operator == Op.NOT_MEMBER_OF_SEGMENT),
                seen=seen | {definition.id},
            )
        elif f.events:
            simple = f.aggregate is None and (f.count is None or f.count.operator in _RISING_COUNTS)
            rising = simple and f.operator in _RISING
            falling = f.aggregate is None and f.count is None and f.operator in _FALLING
            if (rising and negated) or (falling and not negated) or not (rising or falling):
                names.update(f.events)
    return frozenset(names)


T = TypeVar("T")

# An occurrence stored at the start of a transaction younger than this lies in every window
# at least this long, whatever instant of the transaction evaluates it.
FRESH = timedelta(hours=1)


@dataclass(frozen=True)
class Certain:
    """Event names whose fresh occurrence settles a condition: `true` makes it hold,
    `false` makes it fail, whatever else the contact has or lacks."""

    true: frozenset[str] = frozenset()
    false: frozenset[str] = frozenset()

    def negated(self) -> Certain:
        return Certain(self.false, self.true)


UNKNOWN = Certain()


def _all_of(parts: list[Certain]) -> Certain:
    """A conjunction holds when every part does, fails when one does."""
    if not parts:
        return UNKNOWN
    return Certain(
        frozenset.intersection(*(p.true for p in parts)),
        frozenset.union(*(p.false for p in parts)),
    )


def _any_of(parts: list[Certain]) -> Certain:
    """A disjunction holds when one part does, fails when every part does: not all of the
    parts' negations."""
    return _all_of([p.negated() for p in parts]).negated()


def _fold(
    condition: Condition,
    leaf: Callable[[Filter], T],
    all_of: Callable[[list[T]], T],
    any_of: Callable[[list[T]], T],
) -> T:
    """`condition` read as compiled: a group is the conjunction of its parts (its filters,
    read by `leaf`, and its nested condition), the condition the conjunction (AND) or
    disjunction (OR) of its groups."""
    groups = []
    for group in condition.groups:
        parts = [leaf(f) for f in group.filters]
        if group.conditions is not None:
            parts.append(_fold(group.conditions, leaf, all_of, any_of))
        groups.append(parts)
    if condition.logic is Logic.AND:
        return all_of([part for parts in groups for part in parts])
    return any_of([all_of(parts) for parts in groups])


def _certain(
    condition: Condition,
    references: Mapping[uuid.UUID, SegmentDefinition],
    seen: frozenset[uuid.UUID],
) -> Certain:
    """Dynamic.certain of `condition`."""
    return _fold(condition, lambda f: _certain_filter(f, references, seen), _all_of, _any_of)


def _settled_by_one(count: Count | None) -> bool:
    """Whether one more occurrence satisfies the count whatever the others."""
    if count is None:
        return True
    return (count.operator is Op.GTE and count.value <= 1) or (
        count.operator is Op.GT and count.value <= 0
    )


def _certain_filter(
    f: Filter, references: Mapping[uuid.UUID, SegmentDefinition], seen: frozenset[uuid.UUID]
) -> Certain:
    if f.kind == Kind.SEGMENT:
        definition = references.get(f.segment_id) if f.segment_id is not None else None
        if definition is None or definition.condition is None or definition.id in seen:
            return UNKNOWN  # a STATIC list (events do not move it), or no definition
        member = _certain(definition.condition, references, seen | {definition.id})
        return member if f.operator == Op.MEMBER_OF_SEGMENT else member.negated()
    if not f.events or f.where or f.aggregate is not None:
        return UNKNOWN  # not an event test, or the occurrence's data decides
    window = f.window
    if window is not None and window.months == 0 and (window.span is None or window.span < FRESH):
        return UNKNOWN
    names = frozenset(f.events)
    if f.operator in _RISING and _settled_by_one(f.count):
        return Certain(true=names)
    if f.count is None and f.operator in (*_FALLING, Op.TRIGGERED_OLDER_THAN):
        # Not within (or ever), or last before the window: a fresh occurrence is in it.
        return Certain(false=names)
    return UNKNOWN


def _and3(values: list[bool | None]) -> bool | None:
    if not values:
        return None
    if False in values:
        return False
    return True if all(values) else None


def _or3(values: list[bool | None]) -> bool | None:
    if not values:
        return None
    if True in values:
        return True
    return False if all(v is False for v in values) else None


def _blank(
    condition: Condition,
    references: Mapping[uuid.UUID, SegmentDefinition],
    seen: frozenset[uuid.UUID],
) -> bool | None:
    """Dynamic.blank of `condition`, in three-valued logic (None: not decided here),
    following the compiler's reading of each test for a contact a batch of events created
    (no occurrences, no data, subscribed)."""
    return _fold(condition, lambda f: _blank_filter(f, references, seen), _and3, _or3)


def _blank_filter(
    f: Filter, references: Mapping[uuid.UUID, SegmentDefinition], seen: frozenset[uuid.UUID]
) -> bool | None:
    if f.kind == Kind.SEGMENT:
        definition = references.get(f.segment_id) if f.segment_id is not None else None
        member: bool | None
        if definition is None or definition.condition is None:
            member = False  # no such segment, or a list nobody put it on
        elif definition.id in seen:
            return None
        else:
            member = _blank(definition.condition, references, seen | {definition.id})
        if member is None:
            return None
        return member if f.operator == Op.MEMBER_OF_SEGMENT else not member
    if f.kind == Kind.DATA:
        # No data: every test of a key fails for a missing key but notExists, negations
        # too (README.md: negations "never match a contact that lacks the key").
        return f.operator == Op.NOT_EXISTS
    if f.kind == Kind.SUBSCRIBED and isinstance(f.value, bool):
        if f.operator in (Op.EQUALS, Op.NOT_EQUALS):
            return f.value == (f.operator == Op.EQUALS)
        return None
    if not f.events:
        return None  # its email or timestamps
    if f.operator in _FALLING:
        return True  # never (within a window): there is nothing to match
    if f.operator in _RISING and f.aggregate is None and f.count is not None:
        return f.count.holds_for_none()
    return False  # an occurrence, a count of at least one, an aggregate over none


# segments.membership_state (migration 0009): stored and kept current by writers; being
# built (writers note the contacts they touch); nothing stored (a failed first build).
STORED, BUILDING, NOT_STORED = "stored", "building", "none"


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
    query = select(
        s.id,
        s.name,
        s.track_membership,
        cast(s.condition, Text).label("source"),
        s.membership_state,
    ).where(s.project_id == project_id, s.type == "DYNAMIC")
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

    rows = [(row, parsed(row.source)) for row in session.execute(query.order_by(s.id))]
    # The segments read here are definitions other segments reference too, and the rest of
    # the first level of references is one statement: a statement per referencing segment
    # was 23 round trips of a batch with 200 tracked segments.
    cache.update({row.id: SegmentDefinition(row.id, "DYNAMIC", c, row.source) for row, c in rows})
    loader({i for row, _c in rows for i in referenced(row.source)})
    for row, condition in rows:
        if not referenced(row.source):
            # Its row is all it is made of: the same object from batch to batch, without
            # building it and its signature again (a batch meets every segment).
            key = (project_id, row.id, row.name, row.track_membership, row.membership_state)
            out.append(_plain.get((*key, row.source), partial(_plain_dynamic, project_id, row)))
            continue
        out.append(_kept(project_id, _dynamic(row, condition, load_references(condition, loader))))
    return out


def _plain_dynamic(project_id: uuid.UUID, row: Any) -> Dynamic:
    return _kept(project_id, _dynamic(row, parsed(row.source), {}))


def _dynamic(
    row: Any, condition: Condition, refs: Mapping[uuid.UUID, SegmentDefinition]
) -> Dynamic:
    return Dynamic(
        row.id, row.name, row.track_membership, condition, refs, row.membership_state, row.source
    )


# Segments as loaded, by everything they are made of: the same segments meet every batch of
# events, and what a batch asks of each (the event names it reads, its signature) is
# worked out once per definition, not once per batch.
LOADED_KEPT = 4096
_loaded: Kept[Hashable, Dynamic] = Kept(LOADED_KEPT)
# Segments that reference none, by their row.
_plain: Kept[Hashable, Dynamic] = Kept(LOADED_KEPT)


def _kept(project_id: uuid.UUID, segment: Dynamic) -> Dynamic:
    """The segment loaded earlier with the same definition, or this one, kept for next time."""
    return _loaded.get((project_id, segment.state, segment.signature), lambda: segment)


@dataclass(frozen=True)
class Changes:
    entered: int
    exited: int
    events: int
