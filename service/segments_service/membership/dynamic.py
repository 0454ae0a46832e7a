"""The project's DYNAMIC segments loaded ready to evaluate, and the counts of a re-evaluation."""

from __future__ import annotations

import json
import uuid
from collections.abc import Collection, Hashable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property, lru_cache
from typing import Any

from sqlalchemy import Select, Text, cast, select
from sqlalchemy.orm import Session

from segments_service import tables
from segments_service.filters import (
    CompileContext,
    Condition,
    Derive,
    Filter,
    Kind,
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
    loader({i for _row, c in rows for i in c.referenced_segments()})
    for row, condition in rows:
        refs = load_references(condition, loader)
        loaded = Dynamic(
            row.id,
            row.name,
            row.track_membership,
            condition,
            refs,
            row.membership_state,
            row.source,
        )
        out.append(_kept(project_id, loaded))
    return out


# Segments as loaded, by everything they are made of: the same segments meet every batch of
# events, and what a batch asks of each (the event names it reads, its signature) is
# worked out once per definition, not once per batch.
LOADED_KEPT = 4096
_loaded: Kept[Hashable, Dynamic] = Kept(LOADED_KEPT)


def _kept(project_id: uuid.UUID, segment: Dynamic) -> Dynamic:
    """The segment loaded earlier with the same definition, or this one, kept for next time."""
    return _loaded.get((project_id, segment.state, segment.signature), lambda: segment)


@dataclass(frozen=True)
class Changes:
    entered: int
    exited: int
    events: int
