"""Filter conditions: validation of the JSON tree (README.md, Filters) and compilation to one SQL statement.

`parse_condition` turns untrusted JSON into a validated `Condition` (errors name the
offending field by dot path); `compile_members` is a pure function from a validated
condition to one SQLAlchemy Core statement selecting the ids of its members.
"""

from __future__ import annotations

import math
import re
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta, timezone
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    Boolean,
    ColumnElement,
    Select,
    and_,
    bindparam,
    case,
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
from sqlalchemy.dialects.postgresql import JSONB, JSONPATH
from sqlalchemy.types import DateTime, Interval, Text

from segments_service import tables
from segments_service.errors import FieldViolation, ValidationError

MAX_DEPTH = 10
MAX_FILTERS = 200
MAX_STRING_VALUE = 1000
# A filter's `field`: every part of a data path costs the compiled statement a step.
MAX_FIELD_LENGTH = 255
MAX_FIELD_PARTS = 10
# Expanding segment references inlines their conditions (transitively); these bound the
# result: its filters in total, and how deep its conditions nest (a referenced condition
# sits one level below the condition holding the reference). SQLAlchemy compiles nested
# statements recursively: the costliest level (a notMemberOfSegment reference to an OR
# of sets) takes about 35 Python frames, so 16 levels stay within 600 of the 1,000
# Python allows (the server's own calls take under 100).
MAX_EXPANDED_FILTERS = 1000
MAX_EXPANDED_DEPTH = 16
# Window operators accept at most this span (about 100 years), so intervals never overflow.
MAX_WINDOW = timedelta(days=36525)

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

# The shape of a timestamp string, shared with the SQL function segments_timestamp():
# a date, optionally a time (minutes required), optionally a UTC offset up to 15:59.
_TIMESTAMP_RE = re.compile(
    r"^(\d{4})-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])"
    r"(?:[T ]([01]\d|2[0-3]):([0-5]\d)(?::([0-5]\d)(?:\.(\d{1,FRAC}))?)?"
    r"(Z|z|[+-](?:0\d|1[0-5])(?::?[0-5]\d)?)?)?$".replace("FRAC", "6"),
    re.ASCII,
)
# Filter values may carry nanoseconds (as protobuf prints them); storage keeps microseconds.
_VALUE_TIMESTAMP_RE = re.compile(_TIMESTAMP_RE.pattern.replace(r"\d{1,6}", r"\d{1,9}"), re.ASCII)


def _parse_iso(text: str, pattern: re.Pattern[str]) -> datetime | None:
    # fullmatch: `$` alone would also accept a trailing newline, which SQL's regex refuses.
    match = pattern.fullmatch(text)
    if match is None:
        return None
    year, month, day, hour, minute, second, frac, offset = match.groups()
    tz: timezone = UTC
    if offset and offset not in ("Z", "z"):
        sign = -1 if offset[0] == "-" else 1
        digits = offset[1:].replace(":", "")
        hours, minutes = int(digits[:2]), int(digits[2:] or 0)
        tz = timezone(sign * timedelta(hours=hours, minutes=minutes))
    micro = int((frac or "0")[:6].ljust(6, "0"))
    try:
        return datetime(
            int(year),
            int(month),
            int(day),
            int(hour or 0),
            int(minute or 0),
            int(second or 0),
            micro,
            tzinfo=tz,
        ).astimezone(UTC)
    except (ValueError, OverflowError):
        # Not a calendar date, or (OverflowError) the offset moves it outside years 1..9999.
        return None


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def parse_stored_timestamp(text: str) -> datetime | None:
    """A data string read as a timestamp exactly as SQL's segments_timestamp() reads it."""
    return _parse_iso(text, _TIMESTAMP_RE)


def is_date_only(text: str) -> bool:
    return len(text) == 10 and _parse_iso(text, _TIMESTAMP_RE) is not None


# --- validated form -------------------------------------------------------------------


@dataclass(frozen=True)
class Filter:
    """One validated filter; `field` keeps the caller's spelling for round trips."""

    field: str
    operator: Op
    kind: Kind
    value: Scalar | None = None
    unit: Unit | None = None
    # DATA: the key path; EVENT: the event names matched; SEGMENT: the segment id.
    path: tuple[str, ...] = ()
    events: tuple[str, ...] = ()
    segment_id: uuid.UUID | None = None
    # Parsed forms of `value` where the operator needs them.
    timestamp: datetime | None = None
    day: date | None = None
    window: timedelta | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"field": self.field, "operator": self.operator.value}
        if self.value is not None:
            out["value"] = self.value
        if self.unit is not None:
            out["unit"] = self.unit.value
        return out


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


# --- validation -----------------------------------------------------------------------


@dataclass
class _Parser:
    violations: list[FieldViolation] = field(default_factory=list)
    filter_count: int = 0

    def fail(self, path: str, message: str, code: str = "invalid") -> None:
        self.violations.append(FieldViolation(path, message, code))

    def condition(self, raw: Any, path: str, depth: int) -> Condition | None:
        if not isinstance(raw, Mapping):
            self.fail(path, "must be an object with `logic` and `groups`", "invalid_type")
            return None
        if depth > MAX_DEPTH:
            self.fail(path, f"conditions may be nested at most {MAX_DEPTH} deep", "too_deep")
            return None
        logic_raw = raw.get("logic")
        logic = None
        if logic_raw is None:
            self.fail(f"{path}.logic", "is required: AND or OR", "required")
        elif logic_raw not in (Logic.AND.value, Logic.OR.value):
            self.fail(f"{path}.logic", f"must be AND or OR, got {logic_raw!r}", "invalid_enum")
        else:
            logic = Logic(logic_raw)
        groups_raw = raw.get("groups")
        if not isinstance(groups_raw, list) or not groups_raw:
            self.fail(f"{path}.groups", "must be a non-empty array of groups", "required")
            return None
        groups = []
        for i, group_raw in enumerate(groups_raw):
            group = self.group(group_raw, f"{path}.groups.{i}", depth)
            if group is not None:
                groups.append(group)
        if logic is None or len(groups) != len(groups_raw):
            return None
        return Condition(logic, tuple(groups))

    def group(self, raw: Any, path: str, depth: int) -> Group | None:
        if not isinstance(raw, Mapping):
            self.fail(path, "must be an object with `filters` and/or `conditions`", "invalid_type")
            return None
        filters_raw = raw.get("filters")
        if filters_raw is None:
            filters_raw = []
        if not isinstance(filters_raw, list):
            self.fail(f"{path}.filters", "must be an array of filters", "invalid_type")
            return None
        nested_raw = raw.get("conditions")
        if not filters_raw and nested_raw is None:
            self.fail(path, "a group needs at least one filter or a nested condition", "required")
            return None
        ok = True
        filters = []
        for i, filter_raw in enumerate(filters_raw):
            self.filter_count += 1
            if self.filter_count == MAX_FILTERS + 1:
                self.fail(
                    f"{path}.filters.{i}",
                    f"a condition may hold at most {MAX_FILTERS} filters in total",
                    "too_many",
                )
            if self.filter_count > MAX_FILTERS:
                ok = False
                continue
            parsed = self.filter(filter_raw, f"{path}.filters.{i}")
            if parsed is None:
                ok = False
            else:
                filters.append(parsed)
        nested = None
        if nested_raw is not None:
            nested = self.condition(nested_raw, f"{path}.conditions", depth + 1)
            ok = ok and nested is not None
        return Group(tuple(filters), nested) if ok else None

    def filter(self, raw: Any, path: str) -> Filter | None:
        if not isinstance(raw, Mapping):
            self.fail(path, "must be an object with `field` and `operator`", "invalid_type")
            return None
        before = len(self.violations)
        op_raw = raw.get("operator")
        op: Op | None = None
        if op_raw is None or op_raw == "":
            self.fail(f"{path}.operator", "is required", "required")
        else:
            try:
                op = Op(op_raw)
            except ValueError:
                self.fail(f"{path}.operator", f"unknown operator {op_raw!r}", "invalid_enum")
        field_raw = raw.get("field")
        if not isinstance(field_raw, str) or not field_raw:
            self.fail(f"{path}.field", "is required and must be a string", "required")
            return None
        # Bounded before anything reads the parts: compiling costs a step per part.
        if len(field_raw) > MAX_FIELD_LENGTH:
            self.fail(f"{path}.field", f"must be at most {MAX_FIELD_LENGTH} characters", "too_long")
            return None
        if field_raw.count(".") >= MAX_FIELD_PARTS:
            self.fail(
                f"{path}.field",
                f"may have at most {MAX_FIELD_PARTS} dotted parts (`data` is one)",
                "too_deep",
            )
            return None
        if "\x00" in field_raw:  # PostgreSQL text cannot hold NUL
            self.fail(f"{path}.field", "must not contain NUL characters", "invalid")
            return None
        unit_raw = raw.get("unit")
        unit: Unit | None = None
        if unit_raw is not None and unit_raw != "":
            try:
                unit = Unit(unit_raw)
            except ValueError:
                self.fail(
                    f"{path}.unit", f"must be days, hours or minutes, got {unit_raw!r}", "invalid"
                )
        if op is None or len(self.violations) > before:
            return None
        target = self.field(field_raw, op, f"{path}.field")
        if target is None:
            return None
        kind, extra = target
        if op not in APPLICABLE[kind]:
            allowed = ", ".join(sorted(o.value for o in APPLICABLE[kind]))
            self.fail(
                f"{path}.operator",
                f"{op.value} does not apply to {field_raw}; use one of: {allowed}",
                "invalid_operator",
            )
            return None
        return self.value(raw.get("value"), unit, op, kind, field_raw, extra, path)

    def field(self, name: str, op: Op, path: str) -> tuple[Kind, dict[str, Any]] | None:
        if name == "email":
            return Kind.EMAIL, {}
        if name == "subscribed":
            return Kind.SUBSCRIBED, {}
        if name == "createdAt":
            return Kind.CREATED_AT, {}
        if name == "updatedAt":
            return Kind.UPDATED_AT, {}
        if name.startswith("data."):
            parts = tuple(name[5:].split("."))
            if any(p == "" for p in parts):
                self.fail(path, "data paths are data.<key> or data.<a>.<b>, without empty keys")
                return None
            return Kind.DATA, {"path": parts}
        if name.startswith("event."):
            event = name[6:]
            if not event:
                self.fail(path, "event.<name> needs an event name")
                return None
            return Kind.EVENT, {"events": (event,)}
        if name.startswith("email."):
            activity = name[6:]
            if activity not in EMAIL_ACTIVITY_EVENTS:
                known = ", ".join(EMAIL_ACTIVITY_EVENTS)
                self.fail(path, f"unknown email activity {activity!r}; known: {known}")
                return None
            return Kind.EVENT, {"events": EMAIL_ACTIVITY_EVENTS[activity]}
        if name.startswith("segment."):
            try:
                segment_id = uuid.UUID(name[8:])
            except ValueError:
                self.fail(path, "segment.<id> needs a segment id (a UUID)")
                return None
            return Kind.SEGMENT, {"segment_id": segment_id}
        if op in EVENT_OPS and name not in ("data", "event", "segment"):
            # The reference's own example: a bare name with an event operator is an event.
            return Kind.EVENT, {"events": (name,)}
        self.fail(
            path,
            f"unknown field {name!r}; use email, subscribed, createdAt, updatedAt, data.<key>, "
            "event.<name>, email.<activity> or segment.<id>",
            "unknown_field",
        )
        return None

    def value(
        self,
        value: Any,
        unit: Unit | None,
        op: Op,
        kind: Kind,
        field_name: str,
        extra: dict[str, Any],
        path: str,
    ) -> Filter | None:
        vpath = f"{path}.value"
        if isinstance(value, (dict, list)):
            self.fail(vpath, "must be a JSON scalar (string, number or boolean)", "invalid_type")
            return None
        if isinstance(value, float) and not math.isfinite(value):
            self.fail(vpath, "must be a finite number", "invalid_number")
            return None
        if isinstance(value, str) and len(value) > MAX_STRING_VALUE:
            self.fail(vpath, f"must be at most {MAX_STRING_VALUE} characters", "too_long")
            return None
        if isinstance(value, str) and "\x00" in value:
            self.fail(vpath, "must not contain NUL characters", "invalid")
            return None
        is_window = op in WINDOWS or op in WINDOWED_EVENT_OPS
        if unit is not None and not is_window:
            self.fail(f"{path}.unit", f"{op.value} takes no unit", "unexpected")
            return None
        base = Filter(field=field_name, operator=op, kind=kind, **extra)
        if op in NO_VALUE_OPS:
            if value is not None:
                self.fail(vpath, f"{op.value} takes no value", "unexpected")
                return None
            return base
        if value is None:
            self.fail(vpath, f"{op.value} needs a value", "required")
            return None
        if is_window:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                self.fail(vpath, f"{op.value} needs a positive number of units", "invalid_type")
                return None
            if unit is None:
                self.fail(f"{path}.unit", f"{op.value} needs a unit: days, hours or minutes")
                return None
            # Compared before multiplying: a huge value would overflow timedelta.
            if value > MAX_WINDOW / UNIT_SPAN[unit]:
                self.fail(vpath, "the window may span at most 36525 days", "too_big")
                return None
            span = UNIT_SPAN[unit] * value
            return _replace(base, value=value, unit=unit, window=span)
        if kind is Kind.SUBSCRIBED:
            if not isinstance(value, bool):
                self.fail(vpath, "subscribed compares with true or false only", "invalid_type")
                return None
            return _replace(base, value=value)
        if kind is Kind.EMAIL or op in (Op.CONTAINS, Op.NOT_CONTAINS):
            if not isinstance(value, str):
                self.fail(vpath, f"{op.value} on {field_name} needs a string", "invalid_type")
                return None
            return _replace(base, value=value)
        if kind in (Kind.CREATED_AT, Kind.UPDATED_AT):
            return self.time_value(base, value, op, vpath)
        # DATA
        if op in COMPARISONS:
            if isinstance(value, bool):
                self.fail(vpath, f"{op.value} needs a number or a timestamp", "invalid_type")
                return None
            if isinstance(value, str):
                ts = _parse_iso(value, _VALUE_TIMESTAMP_RE)
                if ts is None:
                    self.fail(
                        vpath,
                        f"{op.value} needs a number or an RFC 3339 timestamp, got {value!r}",
                        "invalid_type",
                    )
                    return None
                return _replace(base, value=value, timestamp=ts)
            return _replace(base, value=value)
        return _replace(base, value=value)

    def time_value(self, base: Filter, value: Scalar, op: Op, vpath: str) -> Filter | None:
        if isinstance(value, bool):
            self.fail(vpath, "needs an RFC 3339 timestamp or epoch milliseconds", "invalid_type")
            return None
        if isinstance(value, (int, float)):
            try:
                # Not fromtimestamp(value / 1000): that float division loses microseconds
                # after about year 2242; timedelta keeps integer milliseconds exact.
                moment = _EPOCH + timedelta(milliseconds=value)
            except (OverflowError, ValueError):
                self.fail(vpath, "epoch milliseconds out of range", "invalid")
                return None
            return _replace(base, value=value, timestamp=moment)
        if is_date_only(value):
            day = date.fromisoformat(value)
            return _replace(base, value=value, day=day)
        ts = _parse_iso(value, _VALUE_TIMESTAMP_RE)
        if ts is None:
            self.fail(
                vpath,
                f"needs an RFC 3339 timestamp, a YYYY-MM-DD date or epoch milliseconds, "
                f"got {value!r}",
                "invalid_type",
            )
            return None
        return _replace(base, value=value, timestamp=ts)


def _replace(base: Filter, **changes: Any) -> Filter:
    from dataclasses import replace

    return replace(base, **changes)


def parse_condition(raw: Any, path: str = "condition") -> Condition:
    """Validate a JSON condition; raise ValidationError listing every problem by path."""
    parser = _Parser()
    condition = parser.condition(raw, path, 1)
    if parser.violations:
        raise ValidationError(parser.violations)
    assert condition is not None
    return condition


# --- compilation ----------------------------------------------------------------------


@dataclass(frozen=True)
class SegmentDefinition:
    """What the compiler needs to know about a referenced segment."""

    id: uuid.UUID
    type: str
    condition: Condition | None


# A value of a statement derived from its evaluation instant (a window's start, say).
Derive = Callable[[datetime], Any]


@dataclass
class CompileContext:
    """Inputs of compilation: the evaluation instant and the referenced segments.

    With `relative` (a dict, shared by every condition of one statement), each value
    derived from `now` becomes a named parameter recorded there with how to derive it,
    instead of a literal: the statement then serves any instant, given
    relative_values(relative, instant) as parameters.
    """

    now: datetime
    segments: Mapping[uuid.UUID, SegmentDefinition] = field(default_factory=dict)
    relative: dict[str, Derive] | None = None
    # Filters compiled so far, references expanded, and the current nesting level.
    expanded: int = 0
    level: int = 0


def relative_values(relative: Mapping[str, Derive], now: datetime) -> dict[str, Any]:
    """The parameters of a statement compiled with CompileContext.relative, at `now`."""
    return {name: derive(now) for name, derive in relative.items()}


def _at(ctx: CompileContext, derive: Derive, type_: Any) -> ColumnElement[Any]:
    """`derive(ctx.now)` as a value of the statement; see CompileContext.relative."""
    if ctx.relative is None:
        return literal(derive(ctx.now), type_)
    name = f"at_{len(ctx.relative)}"
    ctx.relative[name] = derive
    return bindparam(name, derive(ctx.now), type_=type_)


def _now(ctx: CompileContext) -> ColumnElement[datetime]:
    return _at(ctx, lambda now: now, DateTime(timezone=True))


def _since(f: Filter, ctx: CompileContext) -> ColumnElement[datetime]:
    """The start of the filter's window."""
    return _at(ctx, _start_of(f), DateTime(timezone=True))


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
    return compiler.members(compiler.condition(condition))


def compile_count(condition: Condition, ctx: CompileContext, project_id: uuid.UUID) -> Select[Any]:
    """One statement counting the members of `condition` in the project.

    Everyone but a set (a lone notTriggered, notTriggeredWithin or notMemberOfSegment) is
    counted by subtraction: the project's contacts less the set. That is exact because the
    set's ids are distinct contacts of the project (every event and list row references
    one), and it reads two indexes without matching them up, where listing the members
    probes every contact against the set (twice as long at a million contacts).
    """
    compiler = _Compiler(ctx, project_id, None)
    node = compiler.condition(condition)
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
    if isinstance(node, _Set) and node.size is not None:
        return select(node.size.scalar_subquery().label("count"))
    return select(func.count().label("count")).select_from(compiler.members(node).subquery())


@dataclass(frozen=True)
class _Pred:
    """A predicate over `tables.contacts`; members are the contacts where it is TRUE."""

    expr: ColumnElement[bool]


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

    def __post_init__(self) -> None:
        object.__setattr__(self, "query", self.query.correlate(None))


@dataclass(frozen=True)
class _Without:
    """Everyone but a set: `absent(id)` is TRUE or FALSE (never NULL) for a contact id, so
    it can filter any column of contact ids, not only `contacts.id`."""

    excluded: Select[tuple[uuid.UUID]]
    absent: Callable[[ColumnElement[Any]], ColumnElement[bool]]
    # As _Set.size, for the excluded set.
    excluded_size: Select[Any] | None = None


_Node = _Pred | _Set | _Without


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

    def condition(self, condition: Condition) -> _Node:
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
            if condition.logic is Logic.AND:
                # AND of groups, each an AND of its parts: one conjunction of every part.
                return self.conjunction(
                    [part for group in condition.groups for part in self.group_parts(group)]
                )
            return self.disjunction(
                [self.conjunction(self.group_parts(g)) for g in condition.groups]
            )
        finally:
            self.ctx.level -= 1

    def group_parts(self, group: Group) -> list[_Node]:
        parts = [self.filter(f) for f in group.filters]
        if group.conditions is not None:
            parts.append(self.condition(group.conditions))
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

    def filter(self, f: Filter) -> _Node:
        if not _expands(f, self.ctx.segments):
            self.ctx.expanded += 1
            if self.ctx.expanded > MAX_EXPANDED_FILTERS:
                raise ValidationError.single(
                    "condition",
                    f"with segment references expanded, more than {MAX_EXPANDED_FILTERS} filters",
                    "too_many",
                )
        if f.kind is Kind.EVENT:
            return self.event(f)
        if f.kind is Kind.SEGMENT:
            return self.segment(f)
        return _Pred(_compile_filter(f, self.ctx))

    def event(self, f: Filter) -> _Node:
        op = f.operator
        e = tables.events.c
        if op in (Op.NOT_TRIGGERED, Op.NOT_TRIGGERED_WITHIN):
            # An anti-join of the contacts in question against their matching events.
            since = _since(f, self.ctx) if op is Op.NOT_TRIGGERED_WITHIN else None
            match = _event_match(f, self.project_id, since)
            return _Without(
                self.scoped(select(e.contact_id).where(*match).distinct(), e.contact_id),
                lambda ids: not_(exists(select(literal(1)).where(*match, e.contact_id == ids))),
                self._distinct_contacts(match),
            )
        if op is Op.TRIGGERED_OLDER_THAN:
            # It happened, and the latest occurrence is before the window.
            query = (
                select(e.contact_id)
                .where(*_event_match(f, self.project_id))
                .group_by(e.contact_id)
                .having(func.max(e.occurred_at) < _since(f, self.ctx))
            )
            return _Set(self.scoped(query, e.contact_id))
        since = _since(f, self.ctx) if op is Op.TRIGGERED_WITHIN else None
        match = _event_match(f, self.project_id, since)
        return _Set(
            self.scoped(select(e.contact_id).where(*match).distinct(), e.contact_id),
            self._distinct_contacts(match),
        )

    def _distinct_contacts(self, match: list[ColumnElement[bool]]) -> Select[Any] | None:
        """count(DISTINCT contact_id) of the matching events, for counts (unscoped) only."""
        if self.scope is not None:
            return None
        e = tables.events.c
        return select(func.count(distinct(e.contact_id))).where(*match)

    def segment(self, f: Filter) -> _Node:
        assert f.segment_id is not None
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
            member = self.condition(definition.condition)
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


def _event_match(
    f: Filter, project_id: Any, since: ColumnElement[datetime] | None = None
) -> list[ColumnElement[bool]]:
    e = tables.events.c
    clauses = [
        e.project_id == project_id,
        e.name == f.events[0] if len(f.events) == 1 else e.name.in_(f.events),
    ]
    if since is not None:
        clauses.append(e.occurred_at >= since)
    return clauses


def _jsonb(value: Any) -> ColumnElement[Any]:
    return literal(value, JSONB)


def _ts(value: datetime) -> ColumnElement[datetime]:
    return literal(value, DateTime(timezone=True))


def _compile_filter(f: Filter, ctx: CompileContext) -> ColumnElement[bool]:
    c = tables.contacts.c
    op = f.operator
    if f.kind is Kind.EMAIL:
        assert isinstance(f.value, str)
        needle = f.value.lower()
        if op is Op.EQUALS:
            return c.email == needle
        if op is Op.NOT_EQUALS:
            return c.email != needle
        found = func.strpos(c.email, literal(needle, Text)) > 0
        return found if op is Op.CONTAINS else not_(found)
    if f.kind is Kind.SUBSCRIBED:
        return c.subscribed.is_(f.value) if op is Op.EQUALS else c.subscribed.is_not(f.value)
    if f.kind in (Kind.CREATED_AT, Kind.UPDATED_AT):
        column = c.created_at if f.kind is Kind.CREATED_AT else c.updated_at
        return _compile_time(column, f, ctx)
    assert f.kind is Kind.DATA, f.kind  # events and segments: see _Compiler
    return _compile_data(f, ctx)


def _compile_time(
    column: ColumnElement[datetime], f: Filter, ctx: CompileContext
) -> ColumnElement[bool]:
    op = f.operator
    if op is Op.WITHIN:
        return and_(column >= _since(f, ctx), column <= _now(ctx))
    if op is Op.OLDER_THAN:
        return column < _since(f, ctx)
    if f.day is not None:
        start = datetime(f.day.year, f.day.month, f.day.day, tzinfo=UTC)
        lo = _ts(start)
        hi: ColumnElement[datetime]
        if f.day < date.max:
            hi = _ts(start + timedelta(days=1))
        else:
            # The day after 9999-12-31 exists in PostgreSQL but not in Python: add 24 hours
            # (not "1 day", which depends on the session's time zone) in SQL.
            hi = lo + func.make_interval(0, 0, 0, 0, 24, type_=Interval)
        day_bounds = {
            Op.EQUALS: and_(column >= lo, column < hi),
            Op.NOT_EQUALS: or_(column < lo, column >= hi),
            Op.GT: column >= hi,
            Op.GTE: column >= lo,
            Op.LT: column < lo,
            Op.LTE: column < hi,
        }
        return day_bounds[op]
    assert f.timestamp is not None
    value = _ts(f.timestamp)
    comparisons: dict[Op, ColumnElement[bool]] = {
        Op.EQUALS: column == value,
        Op.NOT_EQUALS: column != value,
        Op.GT: column > value,
        Op.GTE: column >= value,
        Op.LT: column < value,
        Op.LTE: column <= value,
    }
    return comparisons[op]


def _compare(left: Any, op: Op, right: Any) -> ColumnElement[bool]:
    result: ColumnElement[bool]
    if op is Op.GT:
        result = left > right
    elif op is Op.GTE:
        result = left >= right
    elif op is Op.LT:
        result = left < right
    else:
        result = left <= right
    return result


def _nested(path: tuple[str, ...], value: Any) -> dict[str, Any]:
    out: Any = value
    for key in reversed(path):
        out = {key: out}
    assert isinstance(out, dict)
    return out


def window_value(f: Filter) -> ColumnElement[datetime]:
    """The contact's timestamp a within / olderThan filter on a contact field compares."""
    c = tables.contacts.c
    assert f.operator in WINDOWS, f.operator
    if f.kind is Kind.CREATED_AT:
        return c.created_at
    if f.kind is Kind.UPDATED_AT:
        return c.updated_at
    return func.segments_timestamp(_data_node(f), type_=DateTime(timezone=True))


def _data_node(f: Filter) -> ColumnElement[Any]:
    """The JSON value at the filter's data path, or NULL.

    One `->` step per key: with a text key it reads an object's member and is NULL on
    anything else, so a data path names keys of nested objects only (data.tags.0 is not
    the first tag, as `#>` would read it). The statement grows by one step per key."""
    node: ColumnElement[Any] = tables.contacts.c.data
    for key in f.path:
        node = _member(node, key)
    return node


def _data_text(f: Filter) -> ColumnElement[str]:
    """The text of the value at the filter's data path (`->>` at the last step), or NULL."""
    node: ColumnElement[Any] = tables.contacts.c.data
    for key in f.path[:-1]:
        node = _member(node, key)
    return node.op("->>", return_type=Text)(literal(f.path[-1], Text))


def _member(node: ColumnElement[Any], key: str) -> ColumnElement[Any]:
    return node.op("->", return_type=JSONB)(literal(key, Text))


# The UTC instant of a timestamp string lies within 16 hours before its date and 40 hours
# after (offsets go up to 15:59), so two days either side of an instant bound its date.
_DATE_MARGIN = timedelta(days=2)


def _date_prefix_in(
    text: ColumnElement[str],
    earliest: ColumnElement[str] | None,
    latest: ColumnElement[str] | None,
    exact: ColumnElement[bool],
) -> ColumnElement[bool]:
    """`exact` (a comparison of the parsed string), behind a test of its leading date.

    A string segments_timestamp() reads begins with its `YYYY-MM-DD` date, and such dates
    sort as bytes in calendar order. Comparing the raw text with the dates two days beyond
    the bounds lets through every string whose instant can lie between them, and spares
    the parse (a few microseconds a row) for the rest: for a 30-day window over a year of
    dates, about nine contacts in ten. Strings that are not timestamps may pass; the
    exact test still refuses them. The bounds are those dates (_fixed_day, _relative_day).
    """
    raw = text.collate("C")
    bounds: list[ColumnElement[bool]] = []
    if earliest is not None:
        bounds.append(raw >= earliest)
    if latest is not None:
        bounds.append(raw < latest)
    return and_(*bounds, exact)


def _start_of(f: Filter) -> Derive:
    """The start of the filter's window as a function of the instant."""
    window = f.window
    assert window is not None
    return lambda now: now - window


def _fixed_day(value: datetime, shift: timedelta) -> ColumnElement[str] | None:
    day = _utc_day(value, shift)
    return None if day is None else literal(day, Text)


# Day bounds that bound nothing, for a relative bound beyond the calendar's ends: every
# string segments_timestamp() reads starts with a digit, and sorts after "" and before ":".
_NO_EARLIEST, _NO_LATEST = "", ":"


def _relative_day(
    ctx: CompileContext, of: Derive, shift: timedelta, unbounded: str
) -> ColumnElement[str] | None:
    """The date bound of the instant `of(now)`: see _date_prefix_in."""
    if ctx.relative is None:
        return _fixed_day(of(ctx.now), shift)
    return _at(ctx, lambda now: _utc_day(of(now), shift) or unbounded, Text)


def _utc_day(value: datetime, shift: timedelta) -> str | None:
    """The UTC date of `value + shift` as `YYYY-MM-DD`; None beyond the calendar's ends,
    where that side needs no date test (every date lies on the near side of it)."""
    try:
        day = (value + shift).astimezone(UTC)
    except OverflowError:
        return None
    # Four-digit years, as the strings have them (strftime drops leading zeros).
    return f"{day.year:04d}-{day.month:02d}-{day.day:02d}"


def _compile_data(f: Filter, ctx: CompileContext) -> ColumnElement[bool]:
    c = tables.contacts.c
    node = _data_node(f)
    node_type = func.jsonb_typeof(node)
    present = and_(node.is_not(None), node_type != "null")
    op = f.operator
    if op is Op.EXISTS:
        return present
    if op is Op.NOT_EXISTS:
        return or_(node.is_(None), node_type == "null")
    if op in (Op.EQUALS, Op.NOT_EQUALS):
        if op is Op.EQUALS:
            # Containment of a scalar at an object path is jsonb equality there, type-exact
            # ("5" is not 5, true is not "true", an array holding the value is not it), and
            # the GIN index serves it. Adding `node = value` would say nothing more but make
            # the planner multiply two selectivities and expect far too few members.
            return c.data.op("@>", return_type=Boolean)(_jsonb(_nested(f.path, f.value)))
        return and_(present, node != _jsonb(f.value))
    raw_text = _data_text(f)
    if op in (Op.CONTAINS, Op.NOT_CONTAINS):
        assert isinstance(f.value, str)
        text = case((node_type == "string", raw_text))
        found = func.strpos(_fold(text), _fold(literal(f.value, Text)))
        return found > 0 if op is Op.CONTAINS else found == 0
    stored_ts = func.segments_timestamp(node, type_=DateTime(timezone=True))
    # window_value() gives the sweeper this same expression.
    if op is Op.WITHIN:
        # One containment test parses the string once, where `>= start AND <= now` would
        # parse it twice: a third less time for a window over a million contacts. (Columns
        # keep two comparisons, which their btree indexes serve.)
        window = func.tstzrange(_since(f, ctx), _now(ctx), literal("[]", Text))
        return _date_prefix_in(
            raw_text,
            _relative_day(ctx, _start_of(f), -_DATE_MARGIN, _NO_EARLIEST),
            _relative_day(ctx, lambda now: now, _DATE_MARGIN, _NO_LATEST),
            stored_ts.op("<@", return_type=Boolean)(window),
        )
    if op is Op.OLDER_THAN:
        return _date_prefix_in(
            raw_text,
            None,
            _relative_day(ctx, _start_of(f), _DATE_MARGIN, _NO_LATEST),
            stored_ts < _since(f, ctx),
        )
    if f.timestamp is not None:
        exact = _compare(stored_ts, op, _ts(f.timestamp))
        if op in (Op.GT, Op.GTE):
            return _date_prefix_in(raw_text, _fixed_day(f.timestamp, -_DATE_MARGIN), None, exact)
        return _date_prefix_in(raw_text, None, _fixed_day(f.timestamp, _DATE_MARGIN), exact)
    assert isinstance(f.value, (int, float))
    # A strict SQL/JSON path comparison is TRUE only for a JSON number at that path of
    # nested objects: a missing key, an array or other non-object step, a string, a
    # boolean or an array value make it unknown, and null makes it false; never TRUE, as
    # the typing rules want. It costs about a quarter less than reading the node, testing
    # its type and casting it to numeric; comparison is in numeric either way.
    keys = "".join("." + _jsonpath_key(key) for key in f.path)
    return func.jsonb_path_match(
        c.data,
        literal(f"strict ${keys} {_JSONPATH_COMPARISON[op]} $value", JSONPATH),
        # JSON carries the float's shortest repr, read by PostgreSQL as that numeric.
        _jsonb({"value": f.value}),
        True,  # silent: errors are unknown, as for the @@ operator
        type_=Boolean,
    )


_JSONPATH_COMPARISON = {Op.GT: ">", Op.GTE: ">=", Op.LT: "<", Op.LTE: "<="}


def _jsonpath_key(key: str) -> str:
    """A key as a double-quoted SQL/JSON path string: backslash, quote and control
    characters escaped, everything else as it is."""
    out = []
    for ch in key:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch < " " or ch == "\x7f":
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _fold(text: Any) -> ColumnElement[str]:
    """Case folding for contains: the database's lower(), per character under a UTF-8 ctype."""
    return func.lower(text)


SegmentLoader = Callable[[set[uuid.UUID]], Mapping[uuid.UUID, SegmentDefinition]]


def load_references(
    condition: Condition, loader: SegmentLoader
) -> dict[uuid.UUID, SegmentDefinition]:
    """Every segment reachable through references, loaded level by level."""
    found: dict[uuid.UUID, SegmentDefinition] = {}
    pending = condition.referenced_segments()
    while pending:
        loaded = loader(pending)
        found.update(loaded)
        nxt: set[uuid.UUID] = set()
        for definition in loaded.values():
            if definition.condition is not None:
                nxt |= definition.condition.referenced_segments()
        pending = nxt - set(found)
    return found


def _expands(f: Filter, segments: Mapping[uuid.UUID, SegmentDefinition]) -> bool:
    """Whether compiling `f` inlines another condition: a reference to a DYNAMIC segment."""
    if f.segment_id is None:
        return False
    definition = segments.get(f.segment_id)
    return definition is not None and definition.condition is not None


@dataclass(frozen=True)
class Expansion:
    """A condition with its segment references expanded: how many filters it holds and
    how deep its conditions nest (a condition without nested ones is 1 deep)."""

    filters: int
    depth: int


# What a segment on a reference cycle (refused when saved) counts as: over every limit.
_OVER = Expansion(MAX_EXPANDED_FILTERS + 1, MAX_EXPANDED_DEPTH + 1)


def _walk(condition: Condition, base: str, level: int = 1) -> Iterator[tuple[str, int, Filter]]:
    """Each filter with its dot path and the level of the condition holding it, in
    document order. Recursion is bounded by the validated depth (MAX_DEPTH)."""
    for i, group in enumerate(condition.groups):
        for j, f in enumerate(group.filters):
            yield f"{base}.groups.{i}.filters.{j}", level, f
        if group.conditions is not None:
            yield from _walk(group.conditions, f"{base}.groups.{i}.conditions", level + 1)


def _expansion_of(
    condition: Condition,
    segments: Mapping[uuid.UUID, SegmentDefinition],
    measured: Mapping[uuid.UUID, Expansion],
) -> Expansion:
    filters, depth = 0, 0
    for _path, level, f in _walk(condition, ""):
        if _expands(f, segments):
            assert f.segment_id is not None
            inner = measured[f.segment_id]
            filters += inner.filters
            depth = max(depth, level + inner.depth)
        else:
            filters += 1
            depth = max(depth, level)
    # Capped: diamonds of references would otherwise grow the numbers exponentially.
    return Expansion(min(filters, _OVER.filters), min(depth, _OVER.depth))


def expansions(segments: Mapping[uuid.UUID, SegmentDefinition]) -> dict[uuid.UUID, Expansion]:
    """The expansion of each DYNAMIC segment of `segments`, which holds every segment they
    reach (load_references). Each is measured once, after those it references, with an
    explicit stack: a chain of references costs no Python recursion."""
    measured: dict[uuid.UUID, Expansion] = {}
    for root, definition in segments.items():
        if definition.condition is None or root in measured:
            continue
        stack = [root]
        entered: set[uuid.UUID] = set()
        while stack:
            sid = stack[-1]
            if sid in measured:
                stack.pop()
                continue
            condition = segments[sid].condition
            assert condition is not None
            waiting = [
                f.segment_id
                for f in condition.iter_filters()
                if f.segment_id is not None
                and _expands(f, segments)
                and f.segment_id not in measured
            ]
            if not waiting:
                measured[sid] = _expansion_of(condition, segments, measured)
                stack.pop()
            elif sid in entered:
                # Its references were measured first, unless one leads back here: a cycle.
                measured[sid] = _OVER
                stack.pop()
            else:
                entered.add(sid)
                for ref in waiting:
                    if ref in entered:
                        measured[ref] = _OVER
                    else:
                        stack.append(ref)
    return measured


def expansion(condition: Condition, segments: Mapping[uuid.UUID, SegmentDefinition]) -> Expansion:
    """`condition` with the references it reaches (all in `segments`) expanded."""
    return _expansion_of(condition, segments, expansions(segments))


def check_expansion(
    condition: Condition,
    segments: Mapping[uuid.UUID, SegmentDefinition],
    base: str = "condition",
) -> None:
    """Refuse a condition that, with its references (all in `segments`) expanded, holds
    more than MAX_EXPANDED_FILTERS filters or nests more than MAX_EXPANDED_DEPTH deep,
    naming the reference that takes it over the limit."""
    measured = expansions(segments)
    total = sum(1 for f in condition.iter_filters() if not _expands(f, segments))
    for path, level, f in _walk(condition, base):
        if not _expands(f, segments):
            continue
        assert f.segment_id is not None
        inner = measured[f.segment_id]
        if level + inner.depth > MAX_EXPANDED_DEPTH:
            raise ValidationError.single(
                f"{path}.field",
                f"segment {f.segment_id} nests conditions {inner.depth} deep: referenced here, "
                f"conditions would nest more than {MAX_EXPANDED_DEPTH} deep with references "
                "expanded",
                "too_deep",
            )
        total += inner.filters
        if total > MAX_EXPANDED_FILTERS:
            raise ValidationError.single(
                f"{path}.field",
                f"segment {f.segment_id} expands to {inner.filters} filters: with it, the "
                f"condition holds more than {MAX_EXPANDED_FILTERS} filters with references "
                "expanded",
                "too_many",
            )
