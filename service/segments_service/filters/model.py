"""The validated form of a condition: a tree of groups whose leaves are filters, one type
per kind of filter. Instances come from parse.parse_condition; to_json gives back the
JSON they were parsed from (with the caller's spelling of fields), so a stored condition
round-trips.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, datetime, timedelta
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


class Unit(StrEnum):
    DAYS = "days"
    HOURS = "hours"
    MINUTES = "minutes"


UNIT_SPAN = {
    Unit.DAYS: timedelta(days=1),
    Unit.HOURS: timedelta(hours=1),
    Unit.MINUTES: timedelta(minutes=1),
}


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
WINDOWS = {Op.WITHIN, Op.OLDER_THAN}
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

APPLICABLE: dict[Kind, set[Op]] = {
    Kind.EMAIL: {Op.EQUALS, Op.NOT_EQUALS, Op.CONTAINS, Op.NOT_CONTAINS},
    Kind.SUBSCRIBED: {Op.EQUALS, Op.NOT_EQUALS},
    Kind.CREATED_AT: {Op.EQUALS, Op.NOT_EQUALS} | COMPARISONS | WINDOWS,
    Kind.UPDATED_AT: {Op.EQUALS, Op.NOT_EQUALS} | COMPARISONS | WINDOWS,
    Kind.DATA: {Op.EQUALS, Op.NOT_EQUALS, Op.CONTAINS, Op.NOT_CONTAINS, Op.EXISTS, Op.NOT_EXISTS}
    | COMPARISONS
    | WINDOWS,
    Kind.EVENT: EVENT_OPS,
    Kind.SEGMENT: SEGMENT_OPS,
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
    value: Scalar | None = None
    unit: Unit | None = None
    # The span of a window operator: the filter's truth moves with the clock.
    window: timedelta | None = None
    # The event names an event filter matches.
    events: tuple[str, ...] = ()
    # The segment a membership filter references.
    segment_id: uuid.UUID | None = None
    # A comparison's value read as an instant, or as a whole calendar day.
    timestamp: datetime | None = None
    day: date | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"field": self.field, "operator": self.operator.value}
        if self.value is not None:
            out["value"] = self.value
        if self.unit is not None:
            out["unit"] = self.unit.value
        return out


@dataclass(frozen=True, kw_only=True)
class EmailFilter(FilterFacts):
    """`email`: equality or substring, compared lower-cased."""

    field: str
    operator: Op
    value: str
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
    window: timedelta | None = None


@dataclass(frozen=True, kw_only=True)
class DataFilter(FilterFacts):
    """`data.<a>.<b>`: the value at a path of nested objects of the contact's data. Order
    comparisons take a number or an instant (`timestamp`); windows read a timestamp string."""

    field: str
    operator: Op
    path: tuple[str, ...]
    value: Scalar | None = None
    unit: Unit | None = None
    timestamp: datetime | None = None
    window: timedelta | None = None
    kind: Kind = dataclasses.field(default=Kind.DATA, init=False)


@dataclass(frozen=True, kw_only=True)
class EventFilter(FilterFacts):
    """`event.<name>`, `email.<activity>` or a bare name: whether the contact triggered one
    of `events`, ever or within / before a window."""

    field: str
    operator: Op
    events: tuple[str, ...]
    value: Scalar | None = None
    unit: Unit | None = None
    window: timedelta | None = None
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
