"""Filters on contact fields and data as predicates over `contacts`: a pure function from a
filter of those kinds to one boolean SQL expression (NULL where the filter is unknown)."""

from __future__ import annotations

import operator
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from typing import Any

from sqlalchemy import Boolean, ColumnElement, and_, case, func, literal, not_, or_, select
from sqlalchemy.dialects.postgresql import JSONB, JSONPATH
from sqlalchemy.sql import visitors
from sqlalchemy.sql.functions import FunctionElement
from sqlalchemy.types import DateTime, Interval, Text

from segments_service import tables
from segments_service.filters.context import (
    CompileContext,
    Derive,
    at,
    end_of,
    now_of,
    start_of,
    window_end,
    window_start,
)
from segments_service.filters.model import (
    STRING_OPS,
    WINDOWS,
    DataFilter,
    EmailFilter,
    Filter,
    Kind,
    Op,
    SubscribedFilter,
    TimeFilter,
)


def _jsonb(value: Any) -> ColumnElement[Any]:
    return literal(value, JSONB)


def _ts(value: datetime) -> ColumnElement[datetime]:
    return literal(value, DateTime(timezone=True))


ContactFilter = EmailFilter | SubscribedFilter | TimeFilter | DataFilter


def contact_predicate(f: ContactFilter, ctx: CompileContext) -> ColumnElement[bool]:
    """The filter as a predicate over `contacts` (events and segments: see compile)."""
    if isinstance(f, EmailFilter):
        return _compile_email(f)
    if isinstance(f, SubscribedFilter):
        c = tables.contacts.c
        return (
            c.subscribed.is_(f.value) if f.operator is Op.EQUALS else c.subscribed.is_not(f.value)
        )
    if isinstance(f, TimeFilter):
        return _compile_time(f, ctx)
    return _compile_data(f, ctx)


def _compile_email(f: EmailFilter) -> ColumnElement[bool]:
    """Emails are stored lower-cased: the value is lower-cased to compare."""
    c = tables.contacts.c
    op = f.operator
    if isinstance(f.value, tuple):  # in / notIn: strings, by validation
        emails = [str(v).lower() for v in f.value]
        return c.email.in_(emails) if op is Op.IN else c.email.not_in(emails)
    needle = f.value.lower()
    if op is Op.EQUALS:
        return c.email == needle
    if op is Op.NOT_EQUALS:
        return c.email != needle
    if op is Op.STARTS_WITH:
        return func.starts_with(c.email, literal(needle, Text), type_=Boolean)
    if op is Op.ENDS_WITH:
        return func.right(c.email, len(needle)) == literal(needle, Text)
    found = func.strpos(c.email, literal(needle, Text)) > 0
    return found if op is Op.CONTAINS else not_(found)


def _compile_time(f: TimeFilter, ctx: CompileContext) -> ColumnElement[bool]:
    c = tables.contacts.c
    column = c.created_at if f.kind is Kind.CREATED_AT else c.updated_at
    op = f.operator
    if op is Op.WITHIN:
        return and_(column >= window_start(f, ctx), column <= now_of(ctx))
    if op is Op.OLDER_THAN:
        return column < window_start(f, ctx)
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


_COMPARISONS: dict[Op, Callable[[Any, Any], Any]] = {
    Op.EQUALS: operator.eq,
    Op.NOT_EQUALS: operator.ne,
    Op.GT: operator.gt,
    Op.GTE: operator.ge,
    Op.LT: operator.lt,
    Op.LTE: operator.le,
}


def compare(left: Any, op: Op, right: Any) -> ColumnElement[bool]:
    """`left <op> right` for equals, notEquals and the four orderings (the comparisons of
    values, of counts and of aggregates)."""
    result: ColumnElement[bool] = _COMPARISONS[op](left, right)
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
    if isinstance(f, TimeFilter):
        return c.created_at if f.kind is Kind.CREATED_AT else c.updated_at
    assert isinstance(f, DataFilter), f.kind
    return _stored_timestamp(data_node(tables.contacts.c.data, f.path))


_PARSE_TIMESTAMP = "segments_timestamp"


def _stored_timestamp(node: ColumnElement[Any]) -> ColumnElement[datetime]:
    """A JSON value read as a timestamp by the SQL function segments_timestamp() (NULL for
    anything that is not a string of timestamp shape that parses)."""
    result: ColumnElement[datetime] = getattr(func, _PARSE_TIMESTAMP)(
        node, type_=DateTime(timezone=True)
    )
    return result


def parses_timestamps(expr: ColumnElement[Any]) -> bool:
    """Whether the predicate reads a data value as a timestamp (segments_timestamp(), a
    PL/pgSQL call costing many built-in operators, run only on the strings whose leading
    date passed the cheap test before it: see _date_prefix_in)."""
    return any(
        isinstance(element, FunctionElement) and element.name == _PARSE_TIMESTAMP
        for element in visitors.iterate(expr)
    )


def data_node(doc: ColumnElement[Any], path: tuple[str, ...]) -> ColumnElement[Any]:
    """The JSON value at `path` of a JSON document (a contact's or an event's data), or NULL.

    One `->` step per key: with a text key it reads an object's member and is NULL on
    anything else, so a data path names keys of nested objects only (data.tags.0 is not
    the first tag, as `#>` would read it). The statement grows by one step per key."""
    node = doc
    for key in path:
        node = _member(node, key)
    return node


def data_text(doc: ColumnElement[Any], path: tuple[str, ...]) -> ColumnElement[str]:
    """The text of the value at `path` (`->>` at the last step), or NULL."""
    node = doc
    for key in path[:-1]:
        node = _member(node, key)
    return node.op("->>", return_type=Text)(literal(path[-1], Text))


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
    return at(ctx, lambda now: _utc_day(of(now), shift) or unbounded, Text)


def _utc_day(value: datetime, shift: timedelta) -> str | None:
    """The UTC date of `value + shift` as `YYYY-MM-DD`; None beyond the calendar's ends,
    where that side needs no date test (every date lies on the near side of it)."""
    try:
        day = (value + shift).astimezone(UTC)
    except OverflowError:
        return None
    # Four-digit years, as the strings have them (strftime drops leading zeros).
    return f"{day.year:04d}-{day.month:02d}-{day.day:02d}"


def _compile_data(f: DataFilter, ctx: CompileContext) -> ColumnElement[bool]:
    return data_predicate(f, ctx, tables.contacts.c.data)


def data_predicate(
    f: DataFilter, ctx: CompileContext, doc: ColumnElement[Any]
) -> ColumnElement[bool]:
    """A data filter as a predicate over a JSON document: a contact's data, or an event's
    (the filters of an event filter's `where`)."""
    node = data_node(doc, f.path)
    node_type = func.jsonb_typeof(node)
    present = and_(node.is_not(None), node_type != "null")
    op = f.operator
    if op is Op.EXISTS:
        return present
    if op is Op.NOT_EXISTS:
        return or_(node.is_(None), node_type == "null")
    if op is Op.EQUALS:
        # Containment of a scalar at an object path is jsonb equality there, type-exact
        # ("5" is not 5, true is not "true", an array holding the value is not it), and
        # the GIN index serves it. Adding `node = value` would say nothing more but make
        # the planner multiply two selectivities and expect far too few members.
        return _contains(doc, f.path, f.value)
    if op is Op.IN:
        # One containment per value: each served by the GIN index, OR-ed in a bitmap.
        assert isinstance(f.value, tuple)
        return or_(*(_contains(doc, f.path, v) for v in f.value))
    if op is Op.ARRAY_CONTAINS:
        # An array at the path holding the scalar, compared type-exactly; only an array
        # contains an array, so a stored scalar equal to the value does not match.
        return _contains(doc, f.path, [f.value])
    if op is Op.NOT_EQUALS:
        return and_(present, node != _jsonb(f.value))
    if op is Op.NOT_IN:
        assert isinstance(f.value, tuple)
        return and_(present, node.not_in([_jsonb(v) for v in f.value]))
    raw_text = data_text(doc, f.path)
    if op in STRING_OPS:
        assert isinstance(f.value, str)
        text = _fold(case((node_type == "string", raw_text)))
        needle = _fold(literal(f.value, Text))
        if op is Op.STARTS_WITH:
            return func.starts_with(text, needle, type_=Boolean)
        if op is Op.ENDS_WITH:
            return func.right(text, func.char_length(needle)) == needle
        found = func.strpos(text, needle)
        return found > 0 if op is Op.CONTAINS else found == 0
    stored_ts = _stored_timestamp(node)
    # window_value() gives the sweeper this same expression.
    if op is Op.WITHIN:
        return _date_prefix_in(
            raw_text,
            _relative_day(ctx, start_of(f), -_DATE_MARGIN, _NO_EARLIEST),
            _relative_day(ctx, lambda now: now, _DATE_MARGIN, _NO_LATEST),
            _in_range(stored_ts, window_start(f, ctx), now_of(ctx)),
        )
    if op is Op.WITHIN_NEXT:
        return _date_prefix_in(
            raw_text,
            _relative_day(ctx, lambda now: now, -_DATE_MARGIN, _NO_EARLIEST),
            _relative_day(ctx, end_of(f), _DATE_MARGIN, _NO_LATEST),
            _in_range(stored_ts, now_of(ctx), window_end(f, ctx)),
        )
    if op is Op.OLDER_THAN:
        return _date_prefix_in(
            raw_text,
            None,
            _relative_day(ctx, start_of(f), _DATE_MARGIN, _NO_LATEST),
            stored_ts < window_start(f, ctx),
        )
    if op is Op.BETWEEN and f.bounds is not None:
        low, high = f.bounds
        return _date_prefix_in(
            raw_text,
            _fixed_day(low, -_DATE_MARGIN),
            _fixed_day(high, _DATE_MARGIN),
            _in_range(stored_ts, _ts(low), _ts(high)),
        )
    if op is Op.BETWEEN:
        assert isinstance(f.value, tuple)
        low_value, high_value = f.value
        at_path = _jsonpath(f.path)
        return _json_number(
            doc,
            f"{at_path} >= $low && {at_path} <= $high",
            {"low": low_value, "high": high_value},
        )
    if f.timestamp is not None:
        exact = compare(stored_ts, op, _ts(f.timestamp))
        if op in (Op.GT, Op.GTE):
            return _date_prefix_in(raw_text, _fixed_day(f.timestamp, -_DATE_MARGIN), None, exact)
        return _date_prefix_in(raw_text, None, _fixed_day(f.timestamp, _DATE_MARGIN), exact)
    assert isinstance(f.value, (int, float))
    return _json_number(
        doc, f"{_jsonpath(f.path)} {_JSONPATH_COMPARISON[op]} $value", {"value": f.value}
    )


def _in_range(
    stored: ColumnElement[datetime], low: ColumnElement[datetime], high: ColumnElement[datetime]
) -> ColumnElement[bool]:
    """`low <= stored <= high` as one containment test, so the stored string is parsed once
    where `>= AND <=` would parse it twice: a third less time for a window over a million
    contacts. The range is a scalar subquery (an InitPlan, computed once per statement):
    PostgreSQL 18 would otherwise rewrite containment in a constant range back into the
    two comparisons. (Columns keep two comparisons, which their btree indexes serve.)"""
    span = select(func.tstzrange(low, high, literal("[]", Text))).scalar_subquery()
    return stored.op("<@", return_type=Boolean)(span)


def _contains(doc: ColumnElement[Any], path: tuple[str, ...], value: Any) -> ColumnElement[bool]:
    """`doc @> {"a": {"b": value}}`: the GIN index on contacts' data serves it."""
    return doc.op("@>", return_type=Boolean)(_jsonb(_nested(path, value)))


def _json_number(
    doc: ColumnElement[Any], predicate: str, values: dict[str, Any]
) -> ColumnElement[bool]:
    """A strict SQL/JSON path predicate on numbers at paths of `doc`: TRUE only for JSON
    numbers at those paths of nested objects. A missing key, an array or other non-object
    step, a string, a boolean or an array value make it unknown, and null makes it false;
    never TRUE, as the typing rules want. It costs about a quarter less than reading the
    node, testing its type and casting it to numeric; comparison is in numeric either way."""
    return func.jsonb_path_match(
        doc,
        literal(f"strict {predicate}", JSONPATH),
        # JSON carries the float's shortest repr, read by PostgreSQL as that numeric.
        _jsonb(values),
        True,  # silent: errors are unknown, as for the @@ operator
        type_=Boolean,
    )


def _jsonpath(path: tuple[str, ...]) -> str:
    return "$" + "".join("." + _jsonpath_key(key) for key in path)


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
