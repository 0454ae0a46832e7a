"""Validation: untrusted JSON to a validated Condition (model), as a pure function.

Every problem is reported at once, each naming the offending field by its dot path
(`condition.groups.0.filters.1.operator`) with a message and a code.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import date, timedelta
from functools import partial
from typing import Any

from segments_service.errors import FieldViolation, ValidationError
from segments_service.filters.limits import (
    MAX_DEPTH,
    MAX_FIELD_LENGTH,
    MAX_FIELD_PARTS,
    MAX_FILTERS,
    MAX_STRING_VALUE,
    MAX_WINDOW,
)
from segments_service.filters.model import (
    APPLICABLE,
    COMPARISONS,
    EMAIL_ACTIVITY_EVENTS,
    EVENT_OPS,
    NO_VALUE_OPS,
    UNIT_SPAN,
    WINDOWED_EVENT_OPS,
    WINDOWS,
    Condition,
    DataFilter,
    EmailFilter,
    EventFilter,
    Filter,
    Group,
    Kind,
    Logic,
    Op,
    Scalar,
    SegmentFilter,
    SubscribedFilter,
    TimeFilter,
    Unit,
)
from segments_service.filters.timestamps import EPOCH, is_date_only, parse_value_timestamp


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
        found = self.field(field_raw, op, f"{path}.field")
        if found is None:
            return None
        kind, target = found
        if op not in APPLICABLE[kind]:
            allowed = ", ".join(sorted(o.value for o in APPLICABLE[kind]))
            self.fail(
                f"{path}.operator",
                f"{op.value} does not apply to {field_raw}; use one of: {allowed}",
                "invalid_operator",
            )
            return None
        return self.value(raw.get("value"), unit, op, kind, field_raw, target, path)

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
        target: dict[str, Any],
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
        make = partial(_build, kind, field_name, op, target)
        if op in NO_VALUE_OPS:
            if value is not None:
                self.fail(vpath, f"{op.value} takes no value", "unexpected")
                return None
            return make()
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
            return make(value=value, unit=unit, window=span)
        if kind is Kind.SUBSCRIBED:
            if not isinstance(value, bool):
                self.fail(vpath, "subscribed compares with true or false only", "invalid_type")
                return None
            return make(value=value)
        if kind is Kind.EMAIL or op in (Op.CONTAINS, Op.NOT_CONTAINS):
            if not isinstance(value, str):
                self.fail(vpath, f"{op.value} on {field_name} needs a string", "invalid_type")
                return None
            return make(value=value)
        if kind in (Kind.CREATED_AT, Kind.UPDATED_AT):
            return self.time_value(make, value, op, vpath)
        # DATA
        if op in COMPARISONS:
            if isinstance(value, bool):
                self.fail(vpath, f"{op.value} needs a number or a timestamp", "invalid_type")
                return None
            if isinstance(value, str):
                ts = parse_value_timestamp(value)
                if ts is None:
                    self.fail(
                        vpath,
                        f"{op.value} needs a number or an RFC 3339 timestamp, got {value!r}",
                        "invalid_type",
                    )
                    return None
                return make(value=value, timestamp=ts)
            return make(value=value)
        return make(value=value)

    def time_value(
        self, make: Callable[..., Filter], value: Scalar, op: Op, vpath: str
    ) -> Filter | None:
        if isinstance(value, bool):
            self.fail(vpath, "needs an RFC 3339 timestamp or epoch milliseconds", "invalid_type")
            return None
        if isinstance(value, (int, float)):
            try:
                # Not fromtimestamp(value / 1000): that float division loses microseconds
                # after about year 2242; timedelta keeps integer milliseconds exact.
                moment = EPOCH + timedelta(milliseconds=value)
            except (OverflowError, ValueError):
                self.fail(vpath, "epoch milliseconds out of range", "invalid")
                return None
            return make(value=value, timestamp=moment)
        if is_date_only(value):
            day = date.fromisoformat(value)
            return make(value=value, day=day)
        ts = parse_value_timestamp(value)
        if ts is None:
            self.fail(
                vpath,
                f"needs an RFC 3339 timestamp, a YYYY-MM-DD date or epoch milliseconds, "
                f"got {value!r}",
                "invalid_type",
            )
            return None
        return make(value=value, timestamp=ts)


_TYPES: dict[Kind, Callable[..., Filter]] = {
    Kind.EMAIL: EmailFilter,
    Kind.SUBSCRIBED: SubscribedFilter,
    Kind.CREATED_AT: partial(TimeFilter, kind=Kind.CREATED_AT),
    Kind.UPDATED_AT: partial(TimeFilter, kind=Kind.UPDATED_AT),
    Kind.DATA: DataFilter,
    Kind.EVENT: EventFilter,
    Kind.SEGMENT: SegmentFilter,
}


def _build(kind: Kind, name: str, op: Op, target: dict[str, Any], **parsed: Any) -> Filter:
    """The filter of `kind` from its validated parts: what its field names (`target`: a
    data path, event names or a segment id) and what its value says (`parsed`)."""
    return _TYPES[kind](field=name, operator=op, **target, **parsed)


def parse_condition(raw: Any, path: str = "condition") -> Condition:
    """Validate a JSON condition; raise ValidationError listing every problem by path."""
    parser = _Parser()
    condition = parser.condition(raw, path, 1)
    if parser.violations:
        raise ValidationError(parser.violations)
    assert condition is not None
    return condition
