"""The validated form of a condition: a tree of groups whose leaves are filters, one type
per kind of filter. Instances come from parse.parse_condition; to_json gives back the
JSON they were parsed from (with the caller's spelling of fields), so a stored condition
round-trips.
"""

from __future__ import annotations

import calendar
import dataclasses
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from enum import StrEnum
from typing import Any

Scalar = str | float | int | bool


class Logic(StrEnum):
    AND = "AND"
    OR = "OR"


class Op(StrEnum):
    EQUALS = "equals"
    NOT_EQUALS = "notEquals"
    CONTAINS = "contains"
    NOT_CONTAINS = "notContains"
    GT = "greaterThan"
    LT = "lessThan"
    GTE = "greaterThanOrEqual"
    LTE = "lessThanOrEqual"
    EXISTS = "exists"
    NOT_EXISTS = "notExists"
    WITHIN = "within"
    OLDER_THAN = "olderThan"
    TRIGGERED = "triggered"
    TRIGGERED_WITHIN = "triggeredWithin"
    TRIGGERED_OLDER_THAN = "triggeredOlderThan"
    NOT_TRIGGERED = "notTriggered"
    NOT_TRIGGERED_WITHIN = "notTriggeredWithin"
    MEMBER_OF_SEGMENT = "memberOfSegment"
    NOT_MEMBER_OF_SEGMENT = "notMemberOfSegment"
    IN = "in"
    NOT_IN = "notIn"
    STARTS_WITH = "startsWith"
    ENDS_WITH = "endsWith"
    BETWEEN = "between"
    ARRAY_CONTAINS = "arrayContains"
    WITHIN_NEXT = "withinNext"


class Unit(StrEnum):
    MINUTES = "minutes"
    HOURS = "hours"
    DAYS = "days"
    WEEKS = "weeks"
    MONTHS = "months"


# The fixed-length units; a month is a calendar month (Window).
UNIT_SPAN = {
    Unit.MINUTES: timedelta(minutes=1),
    Unit.HOURS: timedelta(hours=1),
    Unit.DAYS: timedelta(days=1),
    Unit.WEEKS: timedelta(weeks=1),
}


@dataclass(frozen=True)
class Window:
    """A window's length: a span of time, or a whole number of calendar months (UTC),
    which have no fixed length. `before(now)` is where a window ending at `now` starts;
    `after(now)` where one starting at `now` ends."""

    span: timedelta | None = None
    months: int = 0

    def before(self, now: datetime) -> datetime:
        return now - self.span if self.span is not None else add_months(now, -self.months)

    def after(self, now: datetime) -> datetime:
        return now + self.span if self.span is not None else add_months(now, self.months)


def add_months(moment: datetime, months: int) -> datetime:
    """The same UTC day of the month and time of day `months` later (or earlier), on the
    month's last day when it has no such day: 2025-03-31 minus one month is 2025-02-28,
    as PostgreSQL's interval arithmetic has it."""
    utc = moment.astimezone(UTC)
    index = utc.year * 12 + utc.month - 1 + months
    year, month = divmod(index, 12)
    day = min(utc.day, calendar.monthrange(year, month + 1)[1])
    return utc.replace(year=year, month=month + 1, day=day)


class Kind(StrEnum):
    """What a filter's field addresses."""

    EMAIL = "email"
    SUBSCRIBED = "subscribed"
    CREATED_AT = "createdAt"
    UPDATED_AT = "updatedAt"
    DATA = "data"
    EVENT = "event"
    SEGMENT = "segment"


# `email.<activity>` names an email-activity event; aliases are the same activity.
EMAIL_ACTIVITY_EVENTS: dict[str, tuple[str, ...]] = {
    "sent": ("email.sent",),
    "delivered": ("email.delivered",),
    "opened": ("email.opened", "email.open"),
    "open": ("email.opened", "email.open"),
    "clicked": ("email.clicked", "email.click"),
    "click": ("email.clicked", "email.click"),
    "bounced": ("email.bounced", "email.bounce"),
    "bounce": ("email.bounced", "email.bounce"),
    "complained": ("email.complained", "email.complaint"),
    "complaint": ("email.complained", "email.complaint"),
}

COMPARISONS = {Op.GT, Op.LT, Op.GTE, Op.LTE}
# Window operators on contact fields and data: their truth moves with the clock.
WINDOWS = {Op.WITHIN, Op.OLDER_THAN, Op.WITHIN_NEXT}
# Operators that take a JSON array of scalars: in / notIn (1 to MAX_IN_VALUES), between.
LIST_OPS = {Op.IN, Op.NOT_IN, Op.BETWEEN}
# String tests: the value is a string, compared case-insensitively.
STRING_OPS = {Op.CONTAINS, Op.NOT_CONTAINS, Op.STARTS_WITH, Op.ENDS_WITH}
# How a count or an aggregate compares.
COUNT_OPS = {Op.EQUALS, Op.NOT_EQUALS} | COMPARISONS
EVENT_OPS = {
    Op.TRIGGERED,
    Op.TRIGGERED_WITHIN,
    Op.TRIGGERED_OLDER_THAN,
    Op.NOT_TRIGGERED,
    Op.NOT_TRIGGERED_WITHIN,
}
WINDOWED_EVENT_OPS = {Op.TRIGGERED_WITHIN, Op.TRIGGERED_OLDER_THAN, Op.NOT_TRIGGERED_WITHIN}
SEGMENT_OPS = {Op.MEMBER_OF_SEGMENT, Op.NOT_MEMBER_OF_SEGMENT}
NO_VALUE_OPS = {Op.EXISTS, Op.NOT_EXISTS, Op.TRIGGERED, Op.NOT_TRIGGERED} | SEGMENT_OPS

# Operators on the value at a data path, of a contact or (in `where`) of an event.
VALUE_OPS = (
    {Op.EQUALS, Op.NOT_EQUALS, Op.EXISTS, Op.NOT_EXISTS, Op.IN, Op.NOT_IN}
    | {Op.BETWEEN, Op.ARRAY_CONTAINS}
    | STRING_OPS
    | COMPARISONS
)

APPLICABLE: dict[Kind, set[Op]] = {
    Kind.EMAIL: {Op.EQUALS, Op.NOT_EQUALS, Op.IN, Op.NOT_IN} | STRING_OPS,
    Kind.SUBSCRIBED: {Op.EQUALS, Op.NOT_EQUALS},
    Kind.CREATED_AT: {Op.EQUALS, Op.NOT_EQUALS, Op.WITHIN, Op.OLDER_THAN} | COMPARISONS,
    Kind.UPDATED_AT: {Op.EQUALS, Op.NOT_EQUALS, Op.WITHIN, Op.OLDER_THAN} | COMPARISONS,
    Kind.DATA: VALUE_OPS | WINDOWS,
    Kind.EVENT: EVENT_OPS,
    Kind.SEGMENT: SEGMENT_OPS,
}
# Event operators that take `count` and `aggregate`.
COUNTED_EVENT_OPS = {Op.TRIGGERED, Op.TRIGGERED_WITHIN}


class Aggregation(StrEnum):
    SUM = "sum"
    AVG = "avg"
    MIN = "min"
    MAX = "max"


@dataclass(frozen=True)
class Count:
    """`count` of an event filter: how many matching occurrences it needs."""

    operator: Op
    value: int

    def holds_for_none(self) -> bool:
        """Whether a contact without any matching occurrence satisfies it."""
        return {
            Op.EQUALS: self.value == 0,
            Op.NOT_EQUALS: self.value != 0,
            Op.GT: False,
            Op.GTE: self.value == 0,
            Op.LT: self.value > 0,
            Op.LTE: True,
        }[self.operator]

    def to_json(self) -> dict[str, Any]:
        return {"operator": self.operator.value, "value": self.value}


@dataclass(frozen=True)
class Aggregate:
    """`aggregate` of an event filter: a comparison of sum / avg / min / max of the
    numbers at a path of the matching occurrences' data."""

    function: Aggregation
    field: str
    path: tuple[str, ...]
    operator: Op
    value: int | float

    def to_json(self) -> dict[str, Any]:
        return {
            "function": self.function.value,
            "field": self.field,
            "operator": self.operator.value,
            "value": self.value,
        }


# --- filters --------------------------------------------------------------------------


class FilterFacts:
    """What every kind of filter answers, so code over all of a condition's filters (which
    events it reads, whether time alone changes its members, which segments it references)
    needs no case analysis. A kind holds as fields the facts that concern it; the others
    keep these neutral answers."""

    field: str  # the caller's spelling, kept for round trips
    operator: Op
    kind: Kind
    # A scalar; for in / notIn / between a tuple of scalars (a JSON array).
    value: Scalar | tuple[Scalar, ...] | None = None
    unit: Unit | None = None
    # The length of a window operator: the filter's truth moves with the clock.
    window: Window | None = None
    # The event names an event filter matches, and what it asks of their occurrences.
    events: tuple[str, ...] = ()
    where: tuple[DataFilter, ...] = ()
    count: Count | None = None
    aggregate: Aggregate | None = None
    # The segment a membership filter references.
    segment_id: uuid.UUID | None = None
    # A comparison's value read as an instant, or as a whole calendar day.
    timestamp: datetime | None = None
    day: date | None = None

    @property
    def size(self) -> int:
        """Filters it counts as toward the limits: itself and its `where` filters."""
        return 1 + len(self.where)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"field": self.field, "operator": self.operator.value}
        if isinstance(self.value, tuple):
            out["value"] = list(self.value)
        elif self.value is not None:
            out["value"] = self.value
        if self.unit is not None:
            out["unit"] = self.unit.value
        if self.count is not None:
            out["count"] = self.count.to_json()
        if self.where:
            out["where"] = [w.to_json() for w in self.where]
        if self.aggregate is not None:
            out["aggregate"] = self.aggregate.to_json()
        return out


@dataclass(frozen=True, kw_only=True)
class EmailFilter(FilterFacts):
    """`email`: equality (with one of `value`'s strings, for in / notIn), substring,
    prefix or suffix, compared lower-cased."""

    field: str
    operator: Op
    value: str | tuple[Scalar, ...]
    kind: Kind = dataclasses.field(default=Kind.EMAIL, init=False)


@dataclass(frozen=True, kw_only=True)
class SubscribedFilter(FilterFacts):
    """`subscribed`: equals or notEquals true / false."""

    field: str
    operator: Op
    value: bool
    kind: Kind = dataclasses.field(default=Kind.SUBSCRIBED, init=False)


@dataclass(frozen=True, kw_only=True)
class TimeFilter(FilterFacts):
    """`createdAt` / `updatedAt`: a comparison with an instant (`timestamp`) or a calendar
    day (`day`, for a YYYY-MM-DD value), or a window (`within` / `olderThan`)."""

    field: str
    operator: Op
    kind: Kind  # CREATED_AT or UPDATED_AT
    value: Scalar
    unit: Unit | None = None
    timestamp: datetime | None = None
    day: date | None = None
    window: Window | None = None


@dataclass(frozen=True, kw_only=True)
class DataFilter(FilterFacts):
    """`data.<a>.<b>`: the value at a path of nested objects of the contact's data (or, in
    an event filter's `where`, of the occurrence's). Order comparisons take a number or an
    instant (`timestamp`), `between` two numbers or two instants (`bounds`); windows read
    a timestamp string."""

    field: str
    operator: Op
    path: tuple[str, ...]
    value: Scalar | tuple[Scalar, ...] | None = None
    unit: Unit | None = None
    timestamp: datetime | None = None
    bounds: tuple[datetime, datetime] | None = None
    window: Window | None = None
    kind: Kind = dataclasses.field(default=Kind.DATA, init=False)


@dataclass(frozen=True, kw_only=True)
class EventFilter(FilterFacts):
    """`event.<name>`, `email.<activity>` or a bare name: whether the contact triggered one
    of `events`, ever or within / before a window; considering only occurrences whose
    data match `where`; `count` times, and with an `aggregate` of their data, if given."""

    field: str
    operator: Op
    events: tuple[str, ...]
    value: Scalar | None = None
    unit: Unit | None = None
    window: Window | None = None
    where: tuple[DataFilter, ...] = ()
    count: Count | None = None
    aggregate: Aggregate | None = None
    kind: Kind = dataclasses.field(default=Kind.EVENT, init=False)


@dataclass(frozen=True, kw_only=True)
class SegmentFilter(FilterFacts):
    """`segment.<id>`: membership of another segment (its list, or its condition inlined)."""

    field: str
    operator: Op
    segment_id: uuid.UUID
    kind: Kind = dataclasses.field(default=Kind.SEGMENT, init=False)


Filter = EmailFilter | SubscribedFilter | TimeFilter | DataFilter | EventFilter | SegmentFilter

# --- the tree -------------------------------------------------------------------------


@dataclass(frozen=True)
class Group:
    filters: tuple[Filter, ...]
    conditions: Condition | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"filters": [f.to_json() for f in self.filters]}
        if self.conditions is not None:
            out["conditions"] = self.conditions.to_json()
        return out


@dataclass(frozen=True)
class Condition:
    logic: Logic
    groups: tuple[Group, ...]

    def to_json(self) -> dict[str, Any]:
        return {"logic": self.logic.value, "groups": [g.to_json() for g in self.groups]}

    def iter_filters(self) -> Iterator[Filter]:
        for group in self.groups:
            yield from group.filters
            if group.conditions is not None:
                yield from group.conditions.iter_filters()

    def iter_paths(self, base: str = "condition") -> Iterator[tuple[str, Filter]]:
        """Each filter with its dot path, as validation errors name it."""
        for i, group in enumerate(self.groups):
            for j, f in enumerate(group.filters):
                yield f"{base}.groups.{i}.filters.{j}", f
            if group.conditions is not None:
                yield from group.conditions.iter_paths(f"{base}.groups.{i}.conditions")

    def referenced_segments(self) -> set[uuid.UUID]:
        return {f.segment_id for f in self.iter_filters() if f.segment_id is not None}
