"""Compilation: a validated condition (model) to one SQLAlchemy Core statement, as a pure
function of the condition and its CompileContext.

Each part of the condition (filter, nested or referenced condition) compiles to a node: a
predicate over `contacts` (_Pred), a statement selecting the ids of its members (_Set), or
everyone but such a set (_Without); the parts combine by the condition's logic. Every
node can say whether it holds for a contact (`truth`), and CompileContext.parts collects
the node of each part under its dot path: the truth of every part of a condition can be
selected beside its members (explaining a match) without compiling anything twice.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Numeric,
    Select,
    Uuid,
    and_,
    case,
    cast,
    distinct,
    exists,
    false,
    func,
    literal,
    not_,
    or_,
    select,
    union,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.sql import operators
from sqlalchemy.sql.elements import BooleanClauseList

from segments_service import tables
from segments_service.errors import ValidationError
from segments_service.filters.context import CompileContext, window_start
from segments_service.filters.limits import MAX_EXPANDED_DEPTH, MAX_EXPANDED_FILTERS
from segments_service.filters.model import (
    Aggregate,
    Aggregation,
    Condition,
    EventFilter,
    Filter,
    Group,
    Logic,
    Op,
    SegmentFilter,
)
from segments_service.filters.predicates import (
    compare,
    contact_predicate,
    data_node,
    data_predicate,
    data_text,
    parses_timestamps,
)
from segments_service.filters.references import expands


def compile_members(
    condition: Condition,
    ctx: CompileContext,
    project_id: uuid.UUID,
    scope: Any = None,
) -> Select[tuple[uuid.UUID]]:
    """One statement selecting the distinct `contact_id` of every member in the project.

    `scope`, an `= ANY(:ids)` right-hand side (tables.any_uuid), restricts it to those
    contacts; or a function from a column of contact ids to the condition they must meet
    (a range of ids, say). The statement reads `contacts` only where a contact field is filtered:
    positive event and list filters become sets of contact ids straight from `events` and
    `static_members` (every such row references a contact of its project), combined by
    the condition's logic; see _Compiler.
    """
    compiler = _Compiler(ctx, project_id, scope)
    return compiler.members(compiler.condition(condition, "condition"))


def compile_count(condition: Condition, ctx: CompileContext, project_id: uuid.UUID) -> Select[Any]:
    """One statement counting the members of `condition` in the project.

    Everyone but a set (a lone notTriggered, notTriggeredWithin or notMemberOfSegment) is
    counted by subtraction: the project's contacts less the set. That is exact because the
    set's ids are distinct contacts of the project (every event and list row references
    one), and it reads two indexes without matching them up, where listing the members
    probes every contact against the set (twice as long at a million contacts).
    """
    compiler = _Compiler(ctx, project_id, None)
    node = compiler.condition(condition, "condition")
    if not _counts_members(node):
        return _count_otherwise(node, project_id)
    return _sampled(compiler, node, project_id, (), 0)


def compile_sampled_count(
    condition: Condition,
    ctx: CompileContext,
    project_id: uuid.UUID,
    bounds: Sequence[uuid.UUID],
    size: int,
) -> Select[Any] | None:
    """compile_count's statement with, for each of `bounds` (ascending), up to `size` member
    ids not above it, gathered in the same pass: the count and a sample for the price of the
    count. Where the ids come sorted, only the last bound's are gathered: the statement then
    has one sample column, whose ids are the smallest members.
    None where compile_count counts by subtraction (everyone but a set), whose pass never
    meets the members: a sample is then a statement of its own.

    The ids are gathered with array_agg, whose partial states combine across parallel
    workers only from PostgreSQL 16 on: before, the statement would run in one process."""
    compiler = _Compiler(ctx, project_id, None)
    node = compiler.condition(condition, "condition")
    if isinstance(node, _Set) and node.size is not None:
        if node.counted is None:
            return None
        # count(DISTINCT) reads the set's rows in one process anyway; the ids repeat there.
        # A DISTINCT aggregate takes its input sorted, so the first `size` ids of the widest
        # slice are the narrowest slice's whenever it holds enough: one FILTER tested per
        # row instead of one per slice (0.4 ms of an 8 ms count at a million contacts).
        ids = node.counted
        return node.size.add_columns(_gathered(distinct(ids), ids, bounds[-1], size))
    if isinstance(node, _Without):
        return None
    return _sampled(compiler, node, project_id, bounds, size)


def _sampled(
    compiler: _Compiler,
    node: _Node,
    project_id: uuid.UUID,
    bounds: Sequence[uuid.UUID],
    size: int,
) -> Select[Any]:
    """The count over the members' rows, with the samples of `bounds`. A predicate over
    contacts that parses data timestamps is tested in the aggregates' FILTER
    (_split_parsing); anything else is counted over the member statement."""
    if isinstance(node, _Pred):
        scanned, parsed = _split_parsing(node.expr)
        if parsed:
            c = tables.contacts.c
            kept = and_(*parsed)
            return select(
                func.count().filter(kept).label("count"),
                *[_gathered(c.id, c.id, b, size, kept) for b in bounds],
            ).where(c.project_id == project_id, *scanned)
    members = compiler.members(node).subquery("members")
    member = members.c.contact_id
    return select(
        func.count().label("count"), *[_gathered(member, member, b, size) for b in bounds]
    ).select_from(members)


def _gathered(
    what: ColumnElement[Any],
    ids: ColumnElement[Any],
    bound: uuid.UUID,
    size: int,
    kept: ColumnElement[bool] | None = None,
) -> ColumnElement[Any]:
    """Up to `size` of the ids not above `bound` (of the rows `kept` holds for), as an
    array (NULL when there are none). The bound is tested first: PostgreSQL stops an AND
    at its first false operand, so `kept` runs again only for the rows of the slice."""
    within = ids <= literal(bound, Uuid)
    tests = within if kept is None else and_(within, kept)
    return func.array_agg(what, type_=ARRAY(Uuid)).filter(tests)[1:size]


def _counts_members(node: _Node) -> bool:
    """Whether compile_count counts the rows of the members statement."""
    return not isinstance(node, _Without) and not (isinstance(node, _Set) and node.size is not None)


def _count_otherwise(node: _Node, project_id: uuid.UUID) -> Select[Any]:
    """The count of a node that is not counted by its members' rows: everyone but a set by
    subtraction, a set of known size by that size."""
    if isinstance(node, _Without):
        c = tables.contacts.c
        everyone = (
            select(func.count())
            .select_from(tables.contacts)
            .where(c.project_id == project_id)
            .scalar_subquery()
        )
        excluded = node.excluded_size
        if excluded is None:
            excluded = select(func.count()).select_from(node.excluded.subquery())
        return select((everyone - excluded.scalar_subquery()).label("count"))
    assert isinstance(node, _Set) and node.size is not None
    return select(node.size.scalar_subquery().label("count"))


def _split_parsing(
    expr: ColumnElement[bool],
) -> tuple[list[ColumnElement[bool]], list[ColumnElement[bool]]]:
    """The conjuncts of a predicate over contacts: those the scan tests, and those that read
    a data value as a timestamp, which a count tests in its aggregate's FILTER instead.

    The rows are the same (count(*) FILTER (WHERE p) counts the rows where p is TRUE) and
    the executor does the same work: the scan's cheap tests (the project, a timestamp's
    leading date) still run first and leave the parse about one row in ten, for a 30-day
    window over a year of dates. The plan is what changes. PostgreSQL charges every qual of a scan for every row it reads, as if none
    ran before it: in the WHERE clause the parse was charged for every contact of every
    project in a sequential scan, and an index scan over the project's prefix of the
    smallest index (`contacts_by_updated`) looked cheaper, for it skips the other
    projects' rows. That scan reads the project's contacts in `updated_at` order, a buffer
    access for each: about twice as slow as the sequential scan at 100k contacts. In the FILTER the parse is charged
    only for the rows the scan returns, to either plan alike, and the scan is chosen by
    what it reads."""
    conjuncts: list[ColumnElement[bool]] = []

    def flatten(e: ColumnElement[bool]) -> None:
        if isinstance(e, BooleanClauseList) and e.operator is operators.and_:
            for clause in e.clauses:
                flatten(clause)
        else:
            conjuncts.append(e)

    flatten(expr)
    parsed = [e for e in conjuncts if parses_timestamps(e)]
    return [e for e in conjuncts if not parses_timestamps(e)], parsed


@dataclass(frozen=True)
class _Pred:
    """A predicate over `tables.contacts`; members are the contacts where it is TRUE."""

    expr: ColumnElement[bool]

    def truth(self) -> ColumnElement[bool]:
        return func.coalesce(self.expr, false())


@dataclass(frozen=True)
class _Set:
    """A statement selecting distinct `contact_id`s: the members. It stands alone: nested
    in another (`IN`, `EXISTS`), it must not correlate to that one's `contacts`, as
    SQLAlchemy would by default for a table both name."""

    query: Select[tuple[uuid.UUID]]
    # How many ids it holds, where one statement counts that more cheaply than counting
    # `query`'s rows: count(DISTINCT) over a single table sorts the ids where DISTINCT
    # builds a hash table of them (11 vs 16 ms for 33k purchasers).
    size: Select[Any] | None = None
    # The column whose distinct ids `size` counts, so that a sample of them can be gathered
    # in the same statement (compile_sampled_count).
    counted: ColumnElement[Any] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "query", self.query.correlate(None))

    def truth(self) -> ColumnElement[bool]:
        return tables.contacts.c.id.in_(self.query)


@dataclass(frozen=True)
class _Without:
    """Everyone but a set: `absent(id)` is TRUE or FALSE (never NULL) for a contact id, so
    it can filter any column of contact ids, not only `contacts.id`."""

    excluded: Select[tuple[uuid.UUID]]
    absent: Callable[[ColumnElement[Any]], ColumnElement[bool]]
    # As _Set.size, for the excluded set.
    excluded_size: Select[Any] | None = None

    def truth(self) -> ColumnElement[bool]:
        return self.absent(tables.contacts.c.id)


_Node = _Pred | _Set | _Without


@dataclass(frozen=True)
class _AllOf:
    """A group, as explaining a match sees it: TRUE when each of its parts holds."""

    parts: tuple[_Node, ...]

    def truth(self) -> ColumnElement[bool]:
        return and_(*(p.truth() for p in self.parts))


@dataclass
class _Compiler:
    """Compiles a condition to a set of contacts, by the TRUE-sets of its parts.

    A contact is a member when the condition is TRUE for it (a data filter may be NULL,
    unknown, for a contact lacking the key), and AND / OR are TRUE exactly when all / any
    of their parts are: an AND is the intersection of its parts' members, an OR their
    union. Negation only ever applies to a single filter or segment reference, which
    compiles to a two-valued anti-join (NOT EXISTS ...). So parts that filter contact
    fields stay one predicate over `contacts`; positive event filters (triggered,
    triggeredWithin, triggeredOlderThan) and list membership are sets of ids; negative
    ones exclude a set from whatever ids they meet; an AND with a set is driven by it (the
    planner may reorder the joins) and joins `contacts` only for contact fields; an OR
    with a set is a UNION.
    """

    ctx: CompileContext
    project_id: uuid.UUID
    scope: Any

    def scoped(self, query: Select[Any], column: ColumnElement[Any]) -> Select[Any]:
        if self.scope is None:
            return query
        if callable(self.scope):
            return query.where(self.scope(column))
        return query.where(column == self.scope)

    def members(self, node: _Node) -> Select[tuple[uuid.UUID]]:
        """The distinct `contact_id`s a compiled condition selects."""
        if isinstance(node, _Set):
            return node.query
        c = tables.contacts.c
        where = node.expr if isinstance(node, _Pred) else node.absent(c.id)
        return self.scoped(
            select(c.id.label("contact_id")).where(c.project_id == self.project_id, where), c.id
        )

    def record(self, path: str, node: _Node) -> _Node:
        """The node of the part at `path`, recorded where the context asks (explain)."""
        if self.ctx.parts is not None:
            self.ctx.parts[path] = node
        return node

    def condition(self, condition: Condition, path: str) -> _Node:
        # Nested and referenced conditions alike sit one level below their parent.
        self.ctx.level += 1
        if self.ctx.level > MAX_EXPANDED_DEPTH:
            # Validation (check_expansion) refuses these before they are stored; this
            # keeps a condition stored before the limit from exhausting the stack.
            raise ValidationError.single(
                "condition",
                f"with segment references expanded, conditions nest more than "
                f"{MAX_EXPANDED_DEPTH} deep",
                "too_deep",
            )
        try:
            groups = [
                self.group_parts(g, f"{path}.groups.{i}") for i, g in enumerate(condition.groups)
            ]
            if condition.logic is Logic.AND:
                # AND of groups, each an AND of its parts: one conjunction of every part.
                node = self.conjunction([part for parts in groups for part in parts])
            else:
                node = self.disjunction([self.conjunction(parts) for parts in groups])
            return self.record(path, node)
        finally:
            self.ctx.level -= 1

    def group_parts(self, group: Group, path: str) -> list[_Node]:
        parts = [self.filter(f, f"{path}.filters.{i}") for i, f in enumerate(group.filters)]
        if group.conditions is not None:
            parts.append(self.condition(group.conditions, f"{path}.conditions"))
        if self.ctx.parts is not None:
            # A group holds when all its parts do (whatever node the logic makes of them).
            self.ctx.parts[path] = _AllOf(tuple(parts))
        return parts

    def conjunction(self, parts: list[_Node]) -> _Node:
        if len(parts) == 1:
            return parts[0]
        preds = [p.expr for p in parts if isinstance(p, _Pred)]
        sets = [p.query for p in parts if isinstance(p, _Set)]
        withouts = [p for p in parts if isinstance(p, _Without)]
        if not sets:
            if not preds and len(withouts) == 1:
                return withouts[0]
            return _Pred(and_(*preds, *(w.absent(tables.contacts.c.id) for w in withouts)))
        driver = sets[0].subquery()
        query = select(driver.c.contact_id)
        for other in sets[1:]:
            query = query.where(driver.c.contact_id.in_(other))
        # Exclusions apply to the driving ids; `contacts` joins only for contact fields.
        for w in withouts:
            query = query.where(w.absent(driver.c.contact_id))
        if preds:
            contacts = tables.contacts
            query = query.join(
                contacts,
                and_(
                    contacts.c.project_id == self.project_id,
                    contacts.c.id == driver.c.contact_id,
                ),
            ).where(*preds)
        return _Set(query)

    def disjunction(self, parts: list[_Node]) -> _Node:
        if len(parts) == 1:
            return parts[0]
        c = tables.contacts.c
        preds = [
            p.expr if isinstance(p, _Pred) else p.absent(c.id)
            for p in parts
            if not isinstance(p, _Set)
        ]
        sets: list[Select[Any]] = [p.query for p in parts if isinstance(p, _Set)]
        if not sets:
            return _Pred(or_(*preds))
        if preds:
            sets.append(
                self.scoped(
                    select(c.id.label("contact_id")).where(
                        c.project_id == self.project_id, or_(*preds)
                    ),
                    c.id,
                )
            )
        if len(sets) == 1:
            return _Set(sets[0])
        return _Set(select(union(*sets).subquery().c.contact_id))

    def filter(self, f: Filter, path: str) -> _Node:
        if not expands(f, self.ctx.segments):
            self.ctx.expanded += f.size
            if self.ctx.expanded > MAX_EXPANDED_FILTERS:
                raise ValidationError.single(
                    "condition",
                    f"with segment references expanded, more than {MAX_EXPANDED_FILTERS} filters",
                    "too_many",
                )
        node: _Node
        if isinstance(f, EventFilter):
            node = self.event(f)
        elif isinstance(f, SegmentFilter):
            node = self.segment(f, path)
        else:
            node = _Pred(contact_predicate(f, self.ctx))
        return self.record(path, node)

    def event(self, f: EventFilter) -> _Node:
        op = f.operator
        e = tables.events.c
        if op in (Op.NOT_TRIGGERED, Op.NOT_TRIGGERED_WITHIN):
            # An anti-join of the contacts in question against their matching events.
            since = window_start(f, self.ctx) if op is Op.NOT_TRIGGERED_WITHIN else None
            match = self._event_match(f, since)
            return _Without(
                self.scoped(select(e.contact_id).where(*match).distinct(), e.contact_id),
                lambda ids: not_(exists(select(literal(1)).where(*match, e.contact_id == ids))),
                self._distinct_contacts(match),
            )
        if op is Op.TRIGGERED_OLDER_THAN:
            # It happened, and the latest occurrence is before the window.
            query = (
                select(e.contact_id)
                .where(*self._event_match(f))
                .group_by(e.contact_id)
                .having(func.max(e.occurred_at) < window_start(f, self.ctx))
            )
            return _Set(self.scoped(query, e.contact_id))
        since = window_start(f, self.ctx) if op is Op.TRIGGERED_WITHIN else None
        match = self._event_match(f, since)
        if f.count is None and f.aggregate is None:
            return _Set(
                self.scoped(select(e.contact_id).where(*match).distinct(), e.contact_id),
                self._distinct_contacts(match),
                e.contact_id,
            )
        # Counted or aggregated: the matching occurrences grouped by contact.
        grouped = select(e.contact_id).where(*match).group_by(e.contact_id)
        tests = []
        if f.count is not None:
            tests.append(compare(func.count(), f.count.operator, literal(f.count.value)))
        if f.aggregate is not None:
            tests.append(_aggregate_test(f.aggregate))
        count = f.count
        if count is not None and f.aggregate is None and count.holds_for_none():
            # Zero occurrences satisfy the count: everyone but the contacts whose number
            # of occurrences (at least one) does not.
            return _Without(
                self.scoped(grouped.having(not_(tests[0])), e.contact_id),
                lambda ids: compare(
                    select(func.count())
                    .where(*match, e.contact_id == ids)
                    .correlate_except(tables.events)
                    .scalar_subquery(),
                    count.operator,
                    literal(count.value),
                ),
            )
        return _Set(self.scoped(grouped.having(and_(*tests)), e.contact_id))

    def _event_match(
        self, f: EventFilter, since: ColumnElement[datetime] | None = None
    ) -> list[ColumnElement[bool]]:
        """The occurrences an event filter considers: its names, in its window (from
        `since`), whose data match its `where` filters."""
        e = tables.events.c
        clauses = [
            e.project_id == self.project_id,
            e.name == f.events[0] if len(f.events) == 1 else e.name.in_(f.events),
        ]
        if since is not None:
            clauses.append(e.occurred_at >= since)
        clauses += [data_predicate(w, self.ctx, e.data) for w in f.where]
        return clauses

    def _distinct_contacts(self, match: list[ColumnElement[bool]]) -> Select[Any] | None:
        """count(DISTINCT contact_id) of the matching events, for counts (unscoped) only."""
        if self.scope is not None:
            return None
        e = tables.events.c
        return select(func.count(distinct(e.contact_id))).where(*match)

    def segment(self, f: SegmentFilter, path: str) -> _Node:
        definition = self.ctx.segments.get(f.segment_id)
        member: _Node
        if definition is None:
            # Deleting a referenced segment is refused, so this only happens for a
            # reference that was never valid; it matches nobody rather than failing.
            member = _Pred(false())
        elif definition.condition is None:
            s = tables.static_members.c
            listed = [s.project_id == self.project_id, s.segment_id == literal(definition.id)]
            if f.operator is Op.NOT_MEMBER_OF_SEGMENT:
                return _Without(
                    self.scoped(select(s.contact_id).where(*listed), s.contact_id),
                    lambda ids: not_(
                        exists(select(literal(1)).where(*listed, s.contact_id == ids))
                    ),
                )
            member = _Set(self.scoped(select(s.contact_id).where(*listed), s.contact_id))
        else:
            member = self.condition(definition.condition, f"{path}.condition")
        if f.operator is Op.MEMBER_OF_SEGMENT:
            return member
        if isinstance(member, _Pred):
            # The member predicate may be NULL (unknown); a non-member is anyone not matched.
            return _Pred(not_(func.coalesce(member.expr, false())))
        if isinstance(member, _Without):
            return _Set(member.excluded)
        members = member.query.subquery()
        return _Without(
            member.query,
            lambda ids: not_(exists(select(literal(1)).where(members.c.contact_id == ids))),
        )


_AGGREGATES: dict[Aggregation, Callable[[Any], ColumnElement[Any]]] = {
    Aggregation.SUM: func.sum,
    Aggregation.MIN: func.min,
    Aggregation.MAX: func.max,
}


def _aggregate_test(a: Aggregate) -> ColumnElement[bool]:
    """The aggregate's comparison over a contact's matching occurrences, in numeric: the
    JSON numbers at its path (other types are NULL, which aggregates skip; with none at
    all the aggregate is NULL and the test unknown, so the contact does not match). An
    average is compared exactly, through its sum: avg(x) > v is sum(x) > v * count(x)
    (PostgreSQL's avg would round 4/3 to a number some values fall on either side of)."""
    e = tables.events.c
    node = data_node(e.data, a.path)
    number = case((func.jsonb_typeof(node) == "number", cast(data_text(e.data, a.path), Numeric)))
    # The float's shortest repr is the decimal the caller wrote.
    value = literal(Decimal(repr(a.value)) if isinstance(a.value, float) else a.value, Numeric)
    if a.function is Aggregation.AVG:
        return compare(func.sum(number), a.operator, value * func.count(number))
    return compare(_AGGREGATES[a.function](number), a.operator, value)
