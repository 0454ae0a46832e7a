"""Validation: untrusted JSON to a validated Condition (model), as a pure function.

Every problem is reported at once, each naming the offending field by its dot path
(`condition.groups.0.filters.1.operator`) with a message and a code.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import date, timedelta
from functools import partial
from typing import Any

from segments_service.errors import FieldViolation, ValidationError
from segments_service.filters.limits import (
    MAX_COUNT,
    MAX_DEPTH,
    MAX_FIELD_LENGTH,
    MAX_FIELD_PARTS,
    MAX_FILTERS,
    MAX_IN_VALUES,
    MAX_STRING_VALUE,
    MAX_WINDOW,
    MAX_WINDOW_MONTHS,
)
from segments_service.filters.model import (
    APPLICABLE,
    COMPARISONS,
    COUNT_OPS,
    COUNTED_EVENT_OPS,
    EMAIL_ACTIVITY_EVENTS,
    EVENT_OPS,
    LIST_OPS,
    NO_VALUE_OPS,
    STRING_OPS,
    UNIT_SPAN,
    VALUE_OPS,
    WINDOWED_EVENT_OPS,
    WINDOWS,
    Aggregate,
    Aggregation,
    Condition,
    Count,
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
    Window,
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
            if not self.counted(f"{path}.filters.{i}"):
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

    def counted(self, path: str) -> bool:
        """Count the filter at `path` (a `where` filter too) toward MAX_FILTERS; False
        once over it, which is reported once."""
        self.filter_count += 1
        if self.filter_count == MAX_FILTERS + 1:
            self.fail(
                path, f"a condition may hold at most {MAX_FILTERS} filters in total", "too_many"
            )
        return self.filter_count <= MAX_FILTERS

    def filter(self, raw: Any, path: str, where: bool = False) -> Filter | None:
        """A filter of a group, or with `where`, one of an event filter's `where` list:
        a value test on the occurrence's data."""
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
                    f"{path}.unit",
                    f"must be minutes, hours, days, weeks or months, got {unit_raw!r}",
                    "invalid",
                )
        if where:
            for key in ("count", "where", "aggregate"):
                if raw.get(key) is not None:
                    self.fail(f"{path}.{key}", f"a where filter takes no {key}", "unexpected")
        if op is None or len(self.violations) > before:
            return None
        found = self.field(field_raw, op, f"{path}.field", where)
        if found is None:
            return None
        kind, target = found
        applicable = VALUE_OPS if where else APPLICABLE[kind]
        if op not in applicable:
            allowed = ", ".join(sorted(o.value for o in applicable))
            self.fail(
                f"{path}.operator",
                f"{op.value} does not apply to {field_raw}"
                f"{' in a where filter' if where else ''}; use one of: {allowed}",
                "invalid_operator",
            )
            return None
        parsed = self.value(raw.get("value"), unit, op, kind, field_raw, target, path)
        if parsed is None:
            return None
        return self.event_parts(raw, parsed, path)

    def event_parts(self, raw: Mapping[str, Any], f: Filter, path: str) -> Filter | None:
        """`f` with the `where`, `count` and `aggregate` of its JSON, which only event
        filters take (count and aggregate: triggered and triggeredWithin only)."""
        parts = {key: raw.get(key) for key in ("where", "count", "aggregate")}
        if all(v is None for v in parts.values()):
            return f
        before = len(self.violations)
        for key, part in parts.items():
            if part is None:
                continue
            if not isinstance(f, EventFilter):
                self.fail(f"{path}.{key}", f"{key} applies to event filters only", "unexpected")
            elif key != "where" and f.operator not in COUNTED_EVENT_OPS:
                self.fail(
                    f"{path}.{key}",
                    f"{key} applies to triggered and triggeredWithin only",
                    "unexpected",
                )
        if len(self.violations) > before:
            return None
        where = self.where(parts["where"], f"{path}.where")
        count = self.count(parts["count"], f"{path}.count")
        aggregate = self.aggregate(parts["aggregate"], f"{path}.aggregate")
        if len(self.violations) > before:
            return None
        assert isinstance(f, EventFilter)
        return replace(f, where=where, count=count, aggregate=aggregate)

    def where(self, raw: Any, path: str) -> tuple[DataFilter, ...]:
        if raw is None:
            return ()
        if not isinstance(raw, list):
            self.fail(path, "must be an array of filters on the event's data", "invalid_type")
            return ()
        out = []
        for i, item in enumerate(raw):
            if not self.counted(f"{path}.{i}"):
                continue
            parsed = self.filter(item, f"{path}.{i}", where=True)
            if isinstance(parsed, DataFilter):
                out.append(parsed)
        return tuple(out)

    def comparison(self, raw: Any, path: str) -> Op | None:
        """The operator of a count or an aggregate."""
        allowed = ", ".join(sorted(o.value for o in COUNT_OPS))
        if raw is None or raw == "":
            self.fail(path, f"is required: one of {allowed}", "required")
            return None
        if raw not in {o.value for o in COUNT_OPS}:
            self.fail(path, f"must be one of {allowed}, got {raw!r}", "invalid_enum")
            return None
        return Op(raw)

    def count(self, raw: Any, path: str) -> Count | None:
        if raw is None:
            return None
        if not isinstance(raw, Mapping):
            self.fail(path, "must be an object with `operator` and `value`", "invalid_type")
            return None
        op = self.comparison(raw.get("operator"), f"{path}.operator")
        value = raw.get("value")
        vpath = f"{path}.value"
        if value is None:
            self.fail(vpath, "is required: a non-negative whole number", "required")
            return None
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
            or value != int(value)
            or value < 0
        ):
            self.fail(vpath, f"must be a non-negative whole number, got {value!r}", "invalid_type")
            return None
        if value > MAX_COUNT:
            self.fail(vpath, f"must be at most {MAX_COUNT}", "too_big")
            return None
        return None if op is None else Count(op, int(value))

    def aggregate(self, raw: Any, path: str) -> Aggregate | None:
        if raw is None:
            return None
        if not isinstance(raw, Mapping):
            self.fail(
                path,
                "must be an object with `function`, `field`, `operator` and `value`",
                "invalid_type",
            )
            return None
        before = len(self.violations)
        function_raw = raw.get("function")
        functions = ", ".join(a.value for a in Aggregation)
        if function_raw is None or function_raw == "":
            self.fail(f"{path}.function", f"is required: one of {functions}", "required")
        elif function_raw not in {a.value for a in Aggregation}:
            self.fail(
                f"{path}.function",
                f"must be one of {functions}, got {function_raw!r}",
                "invalid_enum",
            )
        field_raw = raw.get("field")
        parts = self.data_path(field_raw, f"{path}.field")
        op = self.comparison(raw.get("operator"), f"{path}.operator")
        value = raw.get("value")
        vpath = f"{path}.value"
        if value is None:
            self.fail(vpath, "is required: a number", "required")
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            self.fail(vpath, f"must be a number, got {value!r}", "invalid_type")
        elif not math.isfinite(value):
            self.fail(vpath, "must be a finite number", "invalid_number")
        if len(self.violations) > before or parts is None or op is None:
            return None
        assert isinstance(field_raw, str) and isinstance(value, (int, float))
        return Aggregate(Aggregation(str(function_raw)), field_raw, parts, op, value)

    def data_path(self, name: Any, path: str) -> tuple[str, ...] | None:
        """The keys of a `data.<a>.<b>` field named outside a filter's `field` (an
        aggregate's), with the same bounds."""
        if not isinstance(name, str) or not name.startswith("data."):
            self.fail(path, "must be data.<key> (a key of the event's data)", "required")
            return None
        if len(name) > MAX_FIELD_LENGTH:
            self.fail(path, f"must be at most {MAX_FIELD_LENGTH} characters", "too_long")
            return None
        if name.count(".") >= MAX_FIELD_PARTS:
            self.fail(
                path, f"may have at most {MAX_FIELD_PARTS} dotted parts (`data` is one)", "too_deep"
            )
            return None
        parts = tuple(name[5:].split("."))
        if any(p == "" for p in parts) or "\x00" in name:
            self.fail(path, "data paths are data.<key> or data.<a>.<b>, without empty keys")
            return None
        return parts

    def field(
        self, name: str, op: Op, path: str, where: bool = False
    ) -> tuple[Kind, dict[str, Any]] | None:
        if where and not name.startswith("data."):
            self.fail(
                path, "a where filter's field is data.<key> of the event's own data", "invalid"
            )
            return None
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
        if isinstance(value, dict) or (isinstance(value, list) and op not in LIST_OPS):
            self.fail(vpath, "must be a JSON scalar (string, number or boolean)", "invalid_type")
            return None
        if not isinstance(value, list) and not self.scalar(value, vpath):
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
            return self.window(make, value, unit, op, path)
        if op in LIST_OPS:
            return self.list_value(make, value, op, kind, vpath)
        if kind is Kind.SUBSCRIBED:
            if not isinstance(value, bool):
                self.fail(vpath, "subscribed compares with true or false only", "invalid_type")
                return None
            return make(value=value)
        if kind is Kind.EMAIL or op in STRING_OPS:
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

    def scalar(self, value: Any, vpath: str) -> bool:
        """Whether a scalar value (or absent one) is within bounds; reports it if not."""
        if isinstance(value, float) and not math.isfinite(value):
            self.fail(vpath, "must be a finite number", "invalid_number")
            return False
        if isinstance(value, str) and len(value) > MAX_STRING_VALUE:
            self.fail(vpath, f"must be at most {MAX_STRING_VALUE} characters", "too_long")
            return False
        if isinstance(value, str) and "\x00" in value:
            self.fail(vpath, "must not contain NUL characters", "invalid")
            return False
        return True

    def window(
        self, make: Callable[..., Filter], value: Any, unit: Unit | None, op: Op, path: str
    ) -> Filter | None:
        vpath = f"{path}.value"
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            self.fail(vpath, f"{op.value} needs a positive number of units", "invalid_type")
            return None
        if unit is None:
            self.fail(
                f"{path}.unit", f"{op.value} needs a unit: minutes, hours, days, weeks or months"
            )
            return None
        if unit is Unit.MONTHS:
            if value != int(value):
                self.fail(vpath, "a number of months must be whole", "invalid")
                return None
            if value > MAX_WINDOW_MONTHS:
                self.fail(
                    vpath, f"the window may span at most {MAX_WINDOW_MONTHS} months", "too_big"
                )
                return None
            return make(value=value, unit=unit, window=Window(months=int(value)))
        # Compared before multiplying: a huge value would overflow timedelta.
        if value > MAX_WINDOW / UNIT_SPAN[unit]:
            self.fail(vpath, "the window may span at most 36525 days", "too_big")
            return None
        return make(value=value, unit=unit, window=Window(span=UNIT_SPAN[unit] * value))

    def list_value(
        self, make: Callable[..., Filter], value: Any, op: Op, kind: Kind, vpath: str
    ) -> Filter | None:
        """in / notIn: 1 to MAX_IN_VALUES scalars; between: [low, high], two numbers or
        two timestamps, low first."""
        if not isinstance(value, list):
            shape = "[low, high]" if op is Op.BETWEEN else "an array of values"
            self.fail(vpath, f"{op.value} needs {shape}", "invalid_type")
            return None
        before = len(self.violations)
        for i, item in enumerate(value):
            if item is None or isinstance(item, (dict, list)):
                self.fail(f"{vpath}.{i}", "must be a string, number or boolean", "invalid_type")
            elif (
                self.scalar(item, f"{vpath}.{i}")
                and kind is Kind.EMAIL
                and not isinstance(item, str)
            ):
                self.fail(f"{vpath}.{i}", "an email is compared with strings", "invalid_type")
        if len(self.violations) > before:
            return None
        if op is not Op.BETWEEN:
            if not 1 <= len(value) <= MAX_IN_VALUES:
                self.fail(vpath, f"{op.value} needs 1 to {MAX_IN_VALUES} values", "too_many")
                return None
            return make(value=tuple(value))
        if len(value) != 2:
            self.fail(vpath, "between needs [low, high]", "invalid")
            return None
        low, high = value
        numbers = [isinstance(v, (int, float)) and not isinstance(v, bool) for v in value]
        if all(numbers):
            if low > high:
                self.fail(vpath, "between needs low <= high", "invalid")
                return None
            return make(value=(low, high))
        stamps = [parse_value_timestamp(v) if isinstance(v, str) else None for v in value]
        if stamps[0] is None or stamps[1] is None:
            self.fail(vpath, "between needs two numbers or two RFC 3339 timestamps", "invalid_type")
            return None
        if stamps[0] > stamps[1]:
            self.fail(vpath, "between needs low <= high", "invalid")
            return None
        return make(value=(low, high), bounds=(stamps[0], stamps[1]))

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
