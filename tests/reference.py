"""A reference evaluator of filter conditions (README.md, Filters), written for obviousness, not speed.

It works on the JSON form of a condition and on plain Python contacts and events, and
shares no code with the service (the SQL compiler is what it checks). Conditions given to
it are expected to be valid: it does not repeat the validator's error reporting.

Time is handled as integer microseconds since 0001-01-01T00:00:00Z ("ticks"), so a stored
timestamp whose offset moves it outside Python's datetime range is still an instant.
Numbers are compared as the decimals they are written as, aggregates included (exactly:
an average is compared through its sum, never divided).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import ROUND_HALF_EVEN, Context, Decimal, Inexact, Rounded, localcontext
from typing import Any

SECOND = 1_000_000
MINUTE = 60 * SECOND
HOUR = 60 * MINUTE
DAY = 24 * HOUR
WEEK = 7 * DAY
UNIT = {"weeks": WEEK, "days": DAY, "hours": HOUR, "minutes": MINUTE}  # months: see shift()

# `email.<activity>`: every spelling of one activity matches the events of all its spellings.
ACTIVITIES: dict[str, set[str]] = {
    "sent": {"email.sent"},
    "delivered": {"email.delivered"},
    "opened": {"email.opened", "email.open"},
    "open": {"email.opened", "email.open"},
    "clicked": {"email.clicked", "email.click"},
    "click": {"email.clicked", "email.click"},
    "bounced": {"email.bounced", "email.bounce"},
    "bounce": {"email.bounced", "email.bounce"},
    "complained": {"email.complained", "email.complaint"},
    "complaint": {"email.complained", "email.complaint"},
}
EVENT_OPERATORS = {
    "triggered",
    "triggeredWithin",
    "triggeredOlderThan",
    "notTriggered",
    "notTriggeredWithin",
}

# Operators of `where` filters and of `count` / `aggregate` comparisons.
WHERE_OPERATORS = {
    "equals",
    "notEquals",
    "contains",
    "notContains",
    "greaterThan",
    "greaterThanOrEqual",
    "lessThan",
    "lessThanOrEqual",
    "exists",
    "notExists",
    "in",
    "notIn",
    "startsWith",
    "endsWith",
    "between",
    "arrayContains",
}
COMPARISON_OPERATORS = {
    "equals",
    "notEquals",
    "greaterThan",
    "greaterThanOrEqual",
    "lessThan",
    "lessThanOrEqual",
}

MISSING = object()

# Decimal arithmetic that never rounds (an inexact result raises instead): sums of numbers
# such as 1e16 + 2.5e-7 need more than the default 28 digits.
EXACT = Context(prec=100_000, Emax=10**9, Emin=-(10**9), traps=[Inexact, Rounded])


@dataclass(frozen=True)
class RefContact:
    id: uuid.UUID
    email: str  # stored form: already lower-case
    subscribed: bool
    data: dict[str, Any]
    created_at: datetime  # aware
    updated_at: datetime  # aware


@dataclass(frozen=True)
class RefEvent:
    contact_id: uuid.UUID
    name: str
    occurred_at: datetime  # aware
    data: dict[str, Any] = field(default_factory=dict)  # the occurrence's properties


@dataclass(frozen=True)
class RefSegment:
    type: str  # "STATIC" or "DYNAMIC"
    condition: dict[str, Any] | None = None  # DYNAMIC
    members: frozenset[uuid.UUID] = field(default_factory=frozenset)  # STATIC


# --- time ---------------------------------------------------------------------------------


def ticks(moment: datetime) -> int:
    """An aware datetime as microseconds since 0001-01-01T00:00:00Z."""
    delta = moment - datetime(1, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * SECOND + delta.microseconds


EPOCH = ticks(datetime(1970, 1, 1, tzinfo=UTC))


def _stamp_pattern(max_fraction_digits: int) -> re.Pattern[str]:
    # Only the shape; ranges are checked with numbers below.
    return re.compile(
        r"(?P<y>[0-9]{4})-(?P<mo>[0-9]{2})-(?P<d>[0-9]{2})"
        r"(?:[T ](?P<h>[0-9]{2}):(?P<mi>[0-9]{2})"
        r"(?::(?P<s>[0-9]{2})(?:\.(?P<frac>[0-9]{1,FRAC}))?)?"
        r"(?P<off>Z|z|(?P<sign>[+-])(?P<oh>[0-9]{2})(?::?(?P<om>[0-9]{2}))?)?)?".replace(
            "FRAC", str(max_fraction_digits)
        )
    )


STORED_STAMP = _stamp_pattern(6)  # what a data string must look like to be a timestamp
VALUE_STAMP = _stamp_pattern(9)  # filter values may carry nanoseconds


def parse_stamp(text: str, pattern: re.Pattern[str]) -> tuple[int, bool] | None:
    """(ticks, date_only) of a timestamp string, or None when it is not one.

    No offset means UTC; a date alone is midnight UTC; fractions beyond microseconds are
    cut off. The date must exist in the calendar (years 1..9999).
    """
    m = pattern.fullmatch(text)
    if m is None:
        return None
    try:
        day = date(int(m["y"]), int(m["mo"]), int(m["d"]))
    except ValueError:
        return None
    if m["h"] is None:
        return (day.toordinal() - 1) * DAY, True
    hour, minute, second = int(m["h"]), int(m["mi"]), int(m["s"] or 0)
    if hour > 23 or minute > 59 or second > 59:
        return None
    micro = int((m["frac"] or "")[:6].ljust(6, "0"))
    offset = 0
    if m["sign"] is not None:
        off_h, off_m = int(m["oh"]), int(m["om"] or 0)
        if off_h > 15 or off_m > 59:
            return None
        offset = (off_h * HOUR + off_m * MINUTE) * (-1 if m["sign"] == "-" else 1)
    local = (day.toordinal() - 1) * DAY + hour * HOUR + minute * MINUTE + second * SECOND + micro
    return local - offset, False


def _decimal(number: int | float) -> Decimal:
    """A JSON number as the decimal it is written as."""
    return Decimal(number) if isinstance(number, int) else Decimal(repr(number))


def _micros(amount: Decimal) -> int:
    return int(amount.quantize(Decimal(1), rounding=ROUND_HALF_EVEN))


def window(value: int | float, unit: str) -> int:
    """A fixed-length window (every unit but months) in microseconds."""
    return _micros(_decimal(value) * UNIT[unit])


def days_in_month(year: int, month: int) -> int:
    following = date(year + 1, 1, 1) if month == 12 else date(year, month + 1, 1)
    return (following - date(year, month, 1)).days


def add_months(moment: int, months: int) -> int:
    """`moment` moved by whole calendar months in UTC: the same day of the month and time of
    day, clamped to the last day of a shorter month (Mar 31 - 1 month = Feb 28 or 29)."""
    day_number, time_of_day = divmod(moment, DAY)
    day = date.fromordinal(day_number + 1)
    index = day.year * 12 + (day.month - 1) + months
    year, month = index // 12, index % 12 + 1
    moved = date(year, month, min(day.day, days_in_month(year, month)))
    return (moved.toordinal() - 1) * DAY + time_of_day


def shift(now: int, value: int | float, unit: str, direction: int) -> int:
    """now + N unit (direction 1) or now - N unit (direction -1)."""
    if unit == "months":
        months = _decimal(value)
        assert months == months.to_integral_value(), "months take a whole number"
        return add_months(now, direction * int(months))
    return now + direction * window(value, unit)


def value_instant(value: Any) -> tuple[int, bool]:
    """A createdAt/updatedAt or data comparison value: (ticks, date_only)."""
    if isinstance(value, str):
        parsed = parse_stamp(value, VALUE_STAMP)
        if parsed is None:
            raise ValueError(f"not a timestamp value: {value!r}")
        return parsed
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"not a timestamp value: {value!r}")
    return EPOCH + _micros(_decimal(value) * 1000), False  # epoch milliseconds


def stored_instant(node: Any) -> int | None:
    if not isinstance(node, str):
        return None
    parsed = parse_stamp(node, STORED_STAMP)
    return None if parsed is None else parsed[0]


# --- values -------------------------------------------------------------------------------


def fold(text: str) -> str:
    """PostgreSQL lower() under a libc UTF-8 ctype: one simple lowercase mapping per character.

    Python's str.lower() applies full (multi-character) mappings; the one such character
    that towlower() maps simply is U+0130, to 'i'. Others keep their case.
    """
    out = []
    for ch in text:
        low = ch.lower()
        out.append(low if len(low) == 1 else {"\u0130": "i"}.get(ch, ch))
    return "".join(out)


def is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def json_equal(stored: Any, value: Any) -> bool:
    """Type-exact equality of a stored JSON value with a scalar filter value."""
    if isinstance(value, bool) or isinstance(stored, bool):
        return isinstance(value, bool) and isinstance(stored, bool) and value == stored
    if is_number(value):
        return is_number(stored) and _decimal(stored) == _decimal(value)
    if isinstance(value, str):
        return isinstance(stored, str) and stored == value
    raise ValueError(f"not a scalar filter value: {value!r}")


def lookup(data: Mapping[str, Any], path: list[str]) -> Any:
    """The value at a key path, walking objects only; MISSING when there is none."""
    node: Any = data
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return MISSING
        node = node[key]
    return node


def compare(left: Any, op: str, right: Any) -> bool:
    if op == "equals":
        return bool(left == right)
    if op == "notEquals":
        return bool(left != right)
    if op == "greaterThan":
        return bool(left > right)
    if op == "greaterThanOrEqual":
        return bool(left >= right)
    if op == "lessThan":
        return bool(left < right)
    if op == "lessThanOrEqual":
        return bool(left <= right)
    raise ValueError(op)


# --- evaluation ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Env:
    contact: RefContact
    events: list[RefEvent]
    now: int
    segments: Mapping[uuid.UUID, RefSegment]


def evaluate(
    condition: Mapping[str, Any],
    contact: RefContact,
    events: list[RefEvent],
    now: datetime,
    segments: Mapping[uuid.UUID, RefSegment],
) -> bool:
    """Whether `contact` (with its `events`) matches `condition` at `now`."""
    own = [e for e in events if e.contact_id == contact.id]
    return _condition(condition, _Env(contact, own, ticks(now), segments))


def _condition(condition: Mapping[str, Any], env: _Env) -> bool:
    results = [_group(g, env) for g in condition["groups"]]
    if condition["logic"] == "AND":
        return all(results)
    if condition["logic"] == "OR":
        return any(results)
    raise ValueError(condition["logic"])


def _group(group: Mapping[str, Any], env: _Env) -> bool:
    ok = all(_filter(f, env) for f in group.get("filters") or [])
    if group.get("conditions") is not None:
        ok = ok and _condition(group["conditions"], env)
    return ok


def _filter(f: Mapping[str, Any], env: _Env) -> bool:
    name, op = f["field"], f["operator"]
    value: Any = f.get("value")
    unit: str | None = f.get("unit")
    contact = env.contact
    if name == "email":
        return _email(contact.email, op, value)
    if name == "subscribed":
        if op == "equals":
            return contact.subscribed is value
        if op == "notEquals":
            return contact.subscribed is not value
        raise ValueError(op)
    if name in ("createdAt", "updatedAt"):
        moment = ticks(contact.created_at if name == "createdAt" else contact.updated_at)
        return _time(moment, op, value, unit, env.now)
    if name.startswith("data."):
        return _data(lookup(contact.data, name[5:].split(".")), op, value, unit, env.now)
    if name.startswith("event."):
        return _events({name[6:]}, f, env)
    if name.startswith("email."):
        return _events(ACTIVITIES[name[6:]], f, env)
    if name.startswith("segment."):
        segment = env.segments[uuid.UUID(name[8:])]
        if segment.type == "STATIC":
            member = contact.id in segment.members
        else:
            assert segment.condition is not None
            member = _condition(segment.condition, env)
        if op == "memberOfSegment":
            return member
        if op == "notMemberOfSegment":
            return not member
        raise ValueError(op)
    if op in EVENT_OPERATORS:
        return _events({name}, f, env)
    raise ValueError(f"unknown field {name!r}")


def _email(email: str, op: str, value: Any) -> bool:
    """The stored email is lower-case; a value is lower-cased as Python does (as for equals
    and contains since §4), so every operator on email compares the same two strings."""
    if op in ("in", "notIn"):
        listed = any(isinstance(v, str) and email == v.lower() for v in value)
        return listed if op == "in" else not listed
    needle: str = value.lower()
    if op == "equals":
        return email == needle
    if op == "notEquals":
        return email != needle
    if op == "contains":
        return needle in email
    if op == "notContains":
        return needle not in email
    if op == "startsWith":
        return email.startswith(needle)
    if op == "endsWith":
        return email.endswith(needle)
    raise ValueError(op)


def _time(moment: int, op: str, value: Any, unit: str | None, now: int) -> bool:
    if op in ("within", "olderThan"):
        assert unit is not None
        start = shift(now, value, unit, -1)
        return start <= moment <= now if op == "within" else moment < start
    instant, date_only = value_instant(value)
    if date_only:
        lo, hi = instant, instant + DAY  # the whole UTC day [lo, hi)
        in_day = lo <= moment < hi
        return {
            "equals": in_day,
            "notEquals": not in_day,
            "greaterThan": moment >= hi,
            "greaterThanOrEqual": moment >= lo,
            "lessThan": moment < lo,
            "lessThanOrEqual": moment < hi,
        }[op]
    if op == "equals":
        return moment == instant
    if op == "notEquals":
        return moment != instant
    return compare(moment, op, instant)


def _data(node: Any, op: str, value: Any, unit: str | None, now: int) -> bool:
    """A filter on the JSON value `node` (MISSING when the key is absent), of a contact's data
    or of an event's data (a `where` filter)."""
    present = node is not MISSING and node is not None
    if op == "exists":
        return present
    if op == "notExists":
        return not present
    if op in ("equals", "notEquals", "in", "notIn"):
        if not present:  # negations too: a missing key or null never matches
            return False
        equal = any(json_equal(node, v) for v in (value if op in ("in", "notIn") else [value]))
        return equal if op in ("equals", "in") else not equal
    if op in ("contains", "notContains", "startsWith", "endsWith"):
        if not isinstance(node, str):
            return False
        text, needle = fold(node), fold(value)
        if op == "startsWith":
            return text.startswith(needle)
        if op == "endsWith":
            return text.endswith(needle)
        found = needle in text
        return found if op == "contains" else not found
    if op == "arrayContains":
        return isinstance(node, list) and any(json_equal(item, value) for item in node)
    if op in ("within", "olderThan", "withinNext"):
        assert unit is not None
        moment = stored_instant(node)
        if moment is None:
            return False
        if op == "withinNext":
            return now <= moment <= shift(now, value, unit, 1)
        start = shift(now, value, unit, -1)
        return start <= moment <= now if op == "within" else moment < start
    if op == "between":
        low, high = value
        return _ordered(node, "greaterThanOrEqual", low) and _ordered(node, "lessThanOrEqual", high)
    return _ordered(node, op, value)


def _ordered(node: Any, op: str, value: Any) -> bool:
    """An ordering comparison: numbers with numbers, timestamps with timestamps."""
    if is_number(value):
        return is_number(node) and compare(_decimal(node), op, _decimal(value))
    instant, _date_only = value_instant(value)  # a date alone is midnight UTC here
    moment = stored_instant(node)
    return moment is not None and compare(moment, op, instant)


def _events(names: set[str], f: Mapping[str, Any], env: _Env) -> bool:
    """An event filter: only the occurrences of `names` whose data match every `where` filter
    count, for existence, counts, aggregates, the latest occurrence and "never" alike."""
    op: str = f["operator"]
    value: Any = f.get("value")
    unit: str | None = f.get("unit")
    where = f.get("where") or []
    for w in where:
        assert w["field"].startswith("data.") and w["operator"] in WHERE_OPERATORS, w
    matching = [
        e
        for e in env.events
        if e.name in names
        and all(
            _data(
                lookup(e.data, w["field"][5:].split(".")),
                w["operator"],
                w.get("value"),
                None,
                env.now,
            )
            for w in where
        )
    ]
    times = [ticks(e.occurred_at) for e in matching]
    if op == "notTriggered":
        return not times
    if op in ("triggered", "triggeredWithin"):
        considered = matching
        if op == "triggeredWithin":
            assert unit is not None
            since = shift(env.now, value, unit, -1)
            considered = [e for e in matching if ticks(e.occurred_at) >= since]
        count = f.get("count")
        if count is None:
            ok = len(considered) >= 1
        else:
            ok = compare(Decimal(len(considered)), count["operator"], _decimal(count["value"]))
        aggregate = f.get("aggregate")
        if aggregate is not None:
            ok = ok and _aggregate(aggregate, considered)
        return ok
    assert unit is not None
    since = shift(env.now, value, unit, -1)
    recent = any(t >= since for t in times)
    if op == "notTriggeredWithin":
        return not recent
    if op == "triggeredOlderThan":
        return bool(times) and max(times) < since
    raise ValueError(op)


def _aggregate(aggregate: Mapping[str, Any], occurrences: list[RefEvent]) -> bool:
    """sum / avg / min / max of the JSON numbers at `field` in `occurrences`, compared with a
    number; other types and missing keys are ignored, and no number at all never matches.
    Exact: avg op v is decided as sum op v * n, so no division rounds."""
    path = aggregate["field"][5:].split(".")
    numbers = [_decimal(node) for e in occurrences if is_number(node := lookup(e.data, path))]
    if not numbers:
        return False
    function, op = aggregate["function"], aggregate["operator"]
    assert op in COMPARISON_OPERATORS, op
    target = _decimal(aggregate["value"])
    with localcontext(EXACT):
        if function == "sum":
            return compare(sum(numbers, Decimal(0)), op, target)
        if function == "avg":
            return compare(sum(numbers, Decimal(0)), op, target * len(numbers))
    if function == "min":
        return compare(min(numbers), op, target)
    if function == "max":
        return compare(max(numbers), op, target)
    raise ValueError(function)
