"""A condition builder: Python expressions that build filter conditions, the way SQLAlchemy's
`column == value` builds SQL rather than a boolean.

    from segments import F

    pro = (F.data("plan") == "pro") & F.event("login").triggered_within(30, "minutes")
    pro.to_dict()  # {"logic": "AND", "groups": [{"filters": [...]}]}

    F.data("plan").in_(["pro", "team"]) & F.data("trialEndsAt").within_next(7, "days")
    F.event("login").triggered_within(30, "minutes", count=F.count >= 3)
    F.event("purchase").triggered(where=[F.data("amount") > 50])
    F.event("purchase").triggered_within(30, "days", aggregate=F.sum("amount") >= 100)

Fields are typed by what they hold, so a test that does not apply to one (ordering an email,
comparing an event) is a TypeError when the expression is built, and an impossible value (an
unknown unit, a window that is not positive, an empty `in_` list) a ValueError; the service
still validates what it receives. `&` and `|` bind tighter than comparisons: parenthesise each comparison.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any, Generic, Literal, NoReturn, Protocol, TypeAlias, TypeVar, get_args

__all__ = [
    "AGGREGATE_FUNCTIONS",
    "EMAIL_ACTIVITIES",
    "MAX_IN_VALUES",
    "UNITS",
    "Aggregate",
    "AggregateFunction",
    "Comparison",
    "Count",
    "DataField",
    "EmailActivityField",
    "EmailField",
    "EventAggregate",
    "EventCount",
    "EventField",
    "Expression",
    "F",
    "FilterExpression",
    "LogicalExpression",
    "SegmentField",
    "SubscribedField",
    "TimestampField",
    "Unit",
    "all_of",
    "any_of",
]

#: Units of the window operators: weeks are 7 days, months calendar months in UTC.
Unit: TypeAlias = Literal["days", "hours", "minutes", "weeks", "months"]
UNITS: tuple[str, ...] = get_args(Unit)
# Months have no fixed length: the service steps the calendar, so only a whole number of them.
_UNIT_SECONDS: dict[Unit, int] = {"days": 86_400, "hours": 3_600, "minutes": 60, "weeks": 604_800}
# A timedelta is spelled in the largest of these that divides it, as it always was.
_TIMEDELTA_UNITS: tuple[Unit, ...] = ("days", "hours", "minutes")
# The service's bounds on a window (about 100 years), on an `in` list and on a count.
_MAX_WINDOW_SECONDS = 36_525 * 86_400
_MAX_MONTHS = 1_200
MAX_IN_VALUES = 100
_MAX_COUNT = 1_000_000_000

#: The comparisons a count or an aggregate is tested with.
Comparison: TypeAlias = Literal[
    "equals", "notEquals", "greaterThan", "greaterThanOrEqual", "lessThan", "lessThanOrEqual"
]
#: What an aggregate computes over an event property.
AggregateFunction: TypeAlias = Literal["sum", "avg", "min", "max"]
AGGREGATE_FUNCTIONS: tuple[str, ...] = get_args(AggregateFunction)

#: The email activities an `email.<activity>` field may name (aliases are the same activity).
EMAIL_ACTIVITIES = frozenset(
    {
        "sent",
        "delivered",
        "opened",
        "open",
        "clicked",
        "click",
        "bounced",
        "bounce",
        "complained",
        "complaint",
    }
)

#: A filter's `value` as it goes on the wire: a JSON scalar.
Scalar: TypeAlias = str | int | float | bool
#: A filter's `value` as an expression holds it: a scalar, or the list of `in_` / `not_in` /
#: `between` as a tuple (so that expressions stay hashable); `to_dict()` writes a list.
Value: TypeAlias = Scalar | tuple[Scalar, ...]

_PARENS_HINT = "`&` and `|` bind tighter than comparisons in Python: write (F.a == 1) & (F.b == 2)"


# --- expressions ----------------------------------------------------------------------------


class Expression:
    """A condition under construction: combine with `&` (AND) and `|` (OR); `to_dict()` gives
    its filter-condition JSON. It has no truth value, so `and`, `or` and chained comparisons
    (`18 <= F.data("age") < 65`), which would silently drop a part, are a TypeError."""

    __slots__ = ()

    def __and__(self, other: Expression) -> Expression:
        return all_of(self, _operand(other, "&"))

    def __or__(self, other: Expression) -> Expression:
        return any_of(self, _operand(other, "|"))

    def __rand__(self, other: object) -> NoReturn:
        raise TypeError(f"cannot combine {other!r} with a condition; {_PARENS_HINT}")

    __ror__ = __rand__

    def __bool__(self) -> NoReturn:
        raise TypeError(
            "a condition has no truth value: combine conditions with & and |, not `and`, `or`"
            " or chained comparisons"
        )

    def to_dict(self) -> dict[str, Any]:
        """The filter condition `{"logic", "groups": [{"filters", "conditions"?}]}`."""
        return _condition(self)


@dataclass(frozen=True, repr=False, slots=True)
class Count:
    """How many matching occurrences an event filter needs: made by `F.count >= 3`."""

    operator: Comparison
    value: int

    def to_dict(self) -> dict[str, Any]:
        """The filter's `count`: `{"operator", "value"}`."""
        return {"operator": self.operator, "value": self.value}

    def __bool__(self) -> NoReturn:
        raise TypeError(
            "a count has no truth value: give one comparison, e.g. count=F.count >= 3"
            " (`1 <= F.count <= 5` would keep only its last part)"
        )

    def __repr__(self) -> str:
        return f"F.count {_COMPARISONS[self.operator]} {self.value!r}"


@dataclass(frozen=True, repr=False, slots=True)
class Aggregate:
    """A comparison of sum, avg, min or max of a numeric event property over the matching
    occurrences: made by `F.sum("amount") >= 100`."""

    function: AggregateFunction
    field: str
    operator: Comparison
    value: int | float

    def to_dict(self) -> dict[str, Any]:
        """The filter's `aggregate`: `{"function", "field", "operator", "value"}`."""
        return {
            "function": self.function,
            "field": self.field,
            "operator": self.operator,
            "value": self.value,
        }

    def __bool__(self) -> NoReturn:
        raise TypeError(
            "an aggregate has no truth value: give one comparison, e.g."
            " aggregate=F.sum('amount') >= 100"
        )

    def __repr__(self) -> str:
        return f"{_aggregate_term_repr(self.function, self.field)} {_COMPARISONS[self.operator]} {self.value!r}"


@dataclass(frozen=True, repr=False, slots=True)
class FilterExpression(Expression):
    """One filter: `{"field", "operator", "value"?, "unit"?, "count"?, "where"?, "aggregate"?}`."""

    field: str
    operator: str
    value: Value | None = None
    unit: Unit | None = None
    #: Event filters: how many matching occurrences (triggered, triggered_within).
    count: Count | None = None
    #: Event filters: data filters every considered occurrence matches (ANDed).
    where: tuple[FilterExpression, ...] = ()
    #: Event filters: an aggregate of a property of the matching occurrences.
    aggregate: Aggregate | None = None

    def filter_dict(self) -> dict[str, Any]:
        """This filter alone, as it appears in a group's `filters`."""
        out: dict[str, Any] = {"field": self.field, "operator": self.operator}
        if self.value is not None:
            out["value"] = list(self.value) if isinstance(self.value, tuple) else self.value
        if self.unit is not None:
            out["unit"] = self.unit
        if self.count is not None:
            out["count"] = self.count.to_dict()
        if self.where:
            out["where"] = [w.filter_dict() for w in self.where]
        if self.aggregate is not None:
            out["aggregate"] = self.aggregate.to_dict()
        return out

    def __repr__(self) -> str:
        return _filter_repr(self)


@dataclass(frozen=True, repr=False, slots=True)
class LogicalExpression(Expression):
    """The AND or the OR of two or more expressions (built by `&`, `|`, all_of, any_of)."""

    logic: Literal["AND", "OR"]
    operands: tuple[Expression, ...]

    def __repr__(self) -> str:
        joiner = " & " if self.logic == "AND" else " | "
        return joiner.join(_operand_repr(o) for o in self.operands)


def all_of(*expressions: Expression) -> Expression:
    """The AND of the expressions (one expression is itself)."""
    return _combine("AND", expressions, "all_of")


def any_of(*expressions: Expression) -> Expression:
    """The OR of the expressions (one expression is itself)."""
    return _combine("OR", expressions, "any_of")


def _combine(logic: Literal["AND", "OR"], items: tuple[Expression, ...], name: str) -> Expression:
    if not items:
        raise ValueError(f"{name}() needs at least one condition")
    operands: list[Expression] = []
    for item in items:
        if not isinstance(item, Expression):
            raise TypeError(
                f"{name}() takes conditions, got {type(item).__name__}"
                + ("; unpack a list with *" if isinstance(item, list | tuple) else "")
            )
        # (a & b) & c is a & b & c: one group rather than a nesting level per operator.
        if isinstance(item, LogicalExpression) and item.logic == logic:
            operands.extend(item.operands)
        else:
            operands.append(item)
    return operands[0] if len(operands) == 1 else LogicalExpression(logic, tuple(operands))


def _operand(other: object, operator: str) -> Expression:
    if isinstance(other, Expression):
        return other
    raise TypeError(f"cannot combine a condition with {other!r} by {operator}; {_PARENS_HINT}")


# --- to JSON --------------------------------------------------------------------------------


def _condition(expression: Expression) -> dict[str, Any]:
    if isinstance(expression, LogicalExpression) and expression.logic == "OR":
        return {"logic": "OR", "groups": [_group(o) for o in expression.operands]}
    return {"logic": "AND", "groups": _and_groups(expression)}


def _and_groups(expression: Expression) -> list[dict[str, Any]]:
    """The groups of an AND condition: its filters in one group, which also holds the first
    nested condition; each further nested condition is a group of its own (a group nests at
    most one condition, and the groups of an AND condition are ANDed too)."""
    operands = (
        expression.operands
        if isinstance(expression, LogicalExpression) and expression.logic == "AND"
        else (expression,)
    )
    filters = [o.filter_dict() for o in operands if isinstance(o, FilterExpression)]
    nested = [_condition(o) for o in operands if not isinstance(o, FilterExpression)]
    first: dict[str, Any] = {}
    if filters:
        first["filters"] = filters
    if nested:
        first["conditions"] = nested.pop(0)
    return [first, *({"conditions": n} for n in nested)]


def _group(expression: Expression) -> dict[str, Any]:
    """One operand of an OR as a group: an AND that fits one group is that group."""
    if isinstance(expression, FilterExpression):
        return {"filters": [expression.filter_dict()]}
    if isinstance(expression, LogicalExpression) and expression.logic == "AND":
        groups = _and_groups(expression)
        if len(groups) == 1:
            return groups[0]
    return {"conditions": _condition(expression)}


# --- repr: the builder code that makes the expression ---------------------------------------

_COMPARISONS = {
    "equals": "==",
    "notEquals": "!=",
    "greaterThan": ">",
    "lessThan": "<",
    "greaterThanOrEqual": ">=",
    "lessThanOrEqual": "<=",
}
_METHODS = {
    "contains": "contains",
    "notContains": "not_contains",
    "exists": "exists",
    "notExists": "not_exists",
    "within": "within",
    "olderThan": "older_than",
    "triggered": "triggered",
    "triggeredWithin": "triggered_within",
    "triggeredOlderThan": "triggered_older_than",
    "notTriggered": "not_triggered",
    "notTriggeredWithin": "not_triggered_within",
    "memberOfSegment": "member",
    "notMemberOfSegment": "not_member",
    "in": "in_",
    "notIn": "not_in",
    "startsWith": "starts_with",
    "endsWith": "ends_with",
    "between": "between",
    "arrayContains": "array_contains",
    "withinNext": "within_next",
}
# What the builder writes `count=` and `aggregate=` on, and `where=` on (every event test).
_COUNTED = frozenset({"triggered", "triggeredWithin"})
_EVENT_OPERATORS = _COUNTED | {"triggeredOlderThan", "notTriggered", "notTriggeredWithin"}
_NAMED_FIELDS = {
    "email": "F.email",
    "subscribed": "F.subscribed",
    "createdAt": "F.created_at",
    "updatedAt": "F.updated_at",
}
_PREFIXED_FIELDS = {
    "data.": "F.data",
    "event.": "F.event",
    "email.": "F.email_activity",
    "segment.": "F.segment",
}


def _field_repr(path: str) -> str | None:
    if path in _NAMED_FIELDS:
        return _NAMED_FIELDS[path]
    for prefix, factory in _PREFIXED_FIELDS.items():
        if path.startswith(prefix) and len(path) > len(prefix):
            return f"{factory}({path[len(prefix) :]!r})"
    return None


def _made_by_the_builder(f: FilterExpression) -> bool:
    """Whether F can make `f`, so that its repr may be the builder code that makes it."""
    if _field_repr(f.field) is None or f.operator not in _COMPARISONS.keys() | _METHODS.keys():
        return False
    if (f.count is not None or f.aggregate is not None) and f.operator not in _COUNTED:
        return False
    return not f.where or f.operator in _EVENT_OPERATORS


def _filter_repr(f: FilterExpression) -> str:
    if not _made_by_the_builder(f):
        # Made directly rather than by F: shown as made.
        parts = [f"{f.field!r}", f"{f.operator!r}"]
        parts += [
            f"{name}={v!r}"
            for name, v in (
                ("value", f.value),
                ("unit", f.unit),
                ("count", f.count),
                ("where", f.where or None),
                ("aggregate", f.aggregate),
            )
            if v is not None
        ]
        return f"FilterExpression({', '.join(parts)})"
    field = _field_repr(f.field)
    if f.operator in _COMPARISONS:
        return f"{field} {_COMPARISONS[f.operator]} {f.value!r}"
    if f.operator == "between" and isinstance(f.value, tuple):
        args = [repr(v) for v in f.value]
    elif isinstance(f.value, tuple):
        args = [repr(list(f.value))]
    else:
        args = [repr(a) for a in (f.value, f.unit) if a is not None]
    if f.where:
        args.append(f"where=[{', '.join(repr(w) for w in f.where)}]")
    if f.count is not None:
        args.append(f"count={f.count!r}")
    if f.aggregate is not None:
        args.append(f"aggregate={f.aggregate!r}")
    return f"{field}.{_METHODS[f.operator]}({', '.join(args)})"


def _aggregate_term_repr(function: str, field: str) -> str:
    if field.startswith("data.") and len(field) > len("data."):
        return f"F.{function}({field[len('data.') :]!r})"
    return f"EventAggregate({function!r}, {field!r})"


def _operand_repr(operand: Expression) -> str:
    text = repr(operand)
    if isinstance(operand, LogicalExpression) or (
        isinstance(operand, FilterExpression) and operand.operator in _COMPARISONS
    ):
        return f"({text})"
    return text


# --- fields ---------------------------------------------------------------------------------


class _Field:
    """A field of a contact that filters test; its methods and operators make filters."""

    __slots__ = ("path",)
    #: What the refusals tell the caller to use instead.
    _use_instead = ""

    def __init__(self, path: str) -> None:
        self.path = path

    def __repr__(self) -> str:
        return _field_repr(self.path) or f"<field {self.path!r}>"

    def _filter(
        self,
        operator: str,
        value: Value | None = None,
        unit: Unit | None = None,
        *,
        count: Count | None = None,
        where: tuple[FilterExpression, ...] = (),
        aggregate: Aggregate | None = None,
    ) -> FilterExpression:
        return FilterExpression(self.path, operator, value, unit, count, where, aggregate)

    def _refuse(self, operation: str) -> NoReturn:
        raise TypeError(f"{self!r} does not support {operation}; {self._use_instead}")

    def __bool__(self) -> NoReturn:
        self._refuse("truth testing")

    def __and__(self, other: object) -> NoReturn:
        raise TypeError(f"{self!r} is a field, not a condition; {_PARENS_HINT}")

    __rand__ = __or__ = __ror__ = __and__


class _Unordered(_Field):
    """A field without an order: < <= > >= are refused with a pointer to what applies."""

    __slots__ = ()

    def __lt__(self, other: object) -> NoReturn:
        self._refuse("<")

    def __le__(self, other: object) -> NoReturn:
        self._refuse("<=")

    def __gt__(self, other: object) -> NoReturn:
        self._refuse(">")

    def __ge__(self, other: object) -> NoReturn:
        self._refuse(">=")


class _Valueless(_Unordered):
    """A field that holds no value (an event, a segment): == and != are refused too."""

    __slots__ = ()

    def __eq__(self, other: object) -> NoReturn:
        self._refuse("==")

    def __ne__(self, other: object) -> NoReturn:
        self._refuse("!=")


class EmailField(_Unordered):
    """The contact's email: equality, list, prefix, suffix and substring tests, all
    case-insensitive."""

    __slots__ = ()
    _use_instead = "use ==, !=, .in_(), .contains(), .starts_with(), .ends_with()..."

    def equals(self, value: str) -> FilterExpression:
        return self._filter("equals", _text(self, value))

    def not_equals(self, value: str) -> FilterExpression:
        return self._filter("notEquals", _text(self, value))

    def contains(self, value: str) -> FilterExpression:
        return self._filter("contains", _text(self, value))

    def not_contains(self, value: str) -> FilterExpression:
        return self._filter("notContains", _text(self, value))

    def in_(self, values: Iterable[str]) -> FilterExpression:
        """Equal to one of 1 to 100 addresses, case-insensitive."""
        return self._filter("in", _values(self, values, _text))

    def not_in(self, values: Iterable[str]) -> FilterExpression:
        """Equal to none of 1 to 100 addresses, case-insensitive."""
        return self._filter("notIn", _values(self, values, _text))

    def starts_with(self, value: str) -> FilterExpression:
        """Starts with `value`, case-insensitive."""
        return self._filter("startsWith", _text(self, value))

    def ends_with(self, value: str) -> FilterExpression:
        """Ends with `value`, case-insensitive: ends_with("@acme.com")."""
        return self._filter("endsWith", _text(self, value))

    def __eq__(self, value: str) -> FilterExpression:  # type: ignore[override]
        return self.equals(value)

    def __ne__(self, value: str) -> FilterExpression:  # type: ignore[override]
        return self.not_equals(value)


class SubscribedField(_Unordered):
    """The contact's subscribed flag: compared with True or False only."""

    __slots__ = ()
    _use_instead = "compare it with True or False"

    def equals(self, value: bool) -> FilterExpression:
        return self._filter("equals", _flag(self, value))

    def not_equals(self, value: bool) -> FilterExpression:
        return self._filter("notEquals", _flag(self, value))

    def __eq__(self, value: bool) -> FilterExpression:  # type: ignore[override]
        return self.equals(value)

    def __ne__(self, value: bool) -> FilterExpression:  # type: ignore[override]
        return self.not_equals(value)


#: What a timestamp comparison takes: an aware datetime, a date (equals: that whole UTC day),
#: an RFC 3339 string or epoch milliseconds.
TimestampValue: TypeAlias = datetime | date | str | int
#: What a data key is compared with: a JSON scalar or a timestamp.
DataValue: TypeAlias = str | int | float | bool | datetime | date
#: An event filter's `where`: data filters, as a list or ANDed with &.
Where: TypeAlias = Expression | Iterable[Expression]
_V = TypeVar("_V")


class _Windowed(_Field):
    """within / older_than for a field holding timestamps."""

    __slots__ = ()

    def within(self, amount: float | timedelta, unit: Unit | None = None) -> FilterExpression:
        """Between now - `amount` `unit` and now: within(7, "days") or within(timedelta(days=7))."""
        return self._filter("within", *_window(self, amount, unit))

    def older_than(self, amount: float | timedelta, unit: Unit | None = None) -> FilterExpression:
        """Earlier than now - `amount` `unit`."""
        return self._filter("olderThan", *_window(self, amount, unit))


class _Ordered(_Field, Generic[_V]):
    """== != < <= > >= with values of type _V, checked by `_value` when built too."""

    __slots__ = ()

    def _value(self, value: object, operator: str) -> Scalar:
        raise NotImplementedError

    def equals(self, value: _V) -> FilterExpression:
        return self._filter("equals", self._value(value, "equals"))

    def not_equals(self, value: _V) -> FilterExpression:
        return self._filter("notEquals", self._value(value, "notEquals"))

    def greater_than(self, value: _V) -> FilterExpression:
        return self._filter("greaterThan", self._value(value, "greaterThan"))

    def less_than(self, value: _V) -> FilterExpression:
        return self._filter("lessThan", self._value(value, "lessThan"))

    def greater_than_or_equal(self, value: _V) -> FilterExpression:
        return self._filter("greaterThanOrEqual", self._value(value, "greaterThanOrEqual"))

    def less_than_or_equal(self, value: _V) -> FilterExpression:
        return self._filter("lessThanOrEqual", self._value(value, "lessThanOrEqual"))

    def __eq__(self, value: _V) -> FilterExpression:  # type: ignore[override]
        return self.equals(value)

    def __ne__(self, value: _V) -> FilterExpression:  # type: ignore[override]
        return self.not_equals(value)

    def __gt__(self, value: _V) -> FilterExpression:
        return self.greater_than(value)

    def __lt__(self, value: _V) -> FilterExpression:
        return self.less_than(value)

    def __ge__(self, value: _V) -> FilterExpression:
        return self.greater_than_or_equal(value)

    def __le__(self, value: _V) -> FilterExpression:
        return self.less_than_or_equal(value)


class TimestampField(_Ordered[TimestampValue], _Windowed):
    """createdAt / updatedAt: compared with timestamps, or tested against a window."""

    __slots__ = ()
    _use_instead = "compare it with a timestamp, or use .within() / .older_than()"

    def _value(self, value: object, operator: str) -> Scalar:
        return _timestamp(self, value)


class DataField(_Ordered[DataValue], _Windowed):
    """A key (a dotted path for nested objects) of the contact's JSON data, or, in an event
    filter's `where`, of the occurrence's data. Equality is type-exact ("5" is not 5);
    ordering compares numbers or timestamps; negations never match a contact without the key
    (`not_exists()` selects those)."""

    __slots__ = ()
    _use_instead = "compare it, or use .in_(), .between(), .exists(), .contains(), .within()..."

    def _value(self, value: object, operator: str) -> Scalar:
        if value is None:
            raise TypeError(f"{self!r}: compare with .exists() / .not_exists(), not None")
        if isinstance(value, datetime | date):
            return _timestamp(self, value)
        if operator in ("equals", "notEquals"):
            return _scalar(self, value)
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise TypeError(
                f"{self!r}: ordering needs a number or a timestamp, got {type(value).__name__}"
            )
        return _scalar(self, value)

    def contains(self, value: str) -> FilterExpression:
        """The stored string contains `value`, case-insensitive."""
        return self._filter("contains", _text(self, value))

    def not_contains(self, value: str) -> FilterExpression:
        """The stored value is a string that does not contain `value`."""
        return self._filter("notContains", _text(self, value))

    def exists(self) -> FilterExpression:
        """The key is present with a non-null value."""
        return self._filter("exists")

    def not_exists(self) -> FilterExpression:
        """The key is absent or null."""
        return self._filter("notExists")

    def in_(self, values: Iterable[DataValue]) -> FilterExpression:
        """Equal to one of 1 to 100 values, each compared as == compares (type-exact):
        in_(["pro", "team"])."""
        return self._filter("in", _values(self, values, self._element))

    def not_in(self, values: Iterable[DataValue]) -> FilterExpression:
        """Present, not null, and equal to none of 1 to 100 values (type-exact)."""
        return self._filter("notIn", _values(self, values, self._element))

    def starts_with(self, value: str) -> FilterExpression:
        """The stored value is a string starting with `value`, case-insensitive."""
        return self._filter("startsWith", _text(self, value))

    def ends_with(self, value: str) -> FilterExpression:
        """The stored value is a string ending with `value`, case-insensitive."""
        return self._filter("endsWith", _text(self, value))

    def between(self, low: DataValue, high: DataValue) -> FilterExpression:
        """low <= stored value <= high: two numbers, or two timestamps (datetimes, dates or
        RFC 3339 strings), low not above high."""
        return self._filter("between", _range(self, low, high))

    def array_contains(self, value: Scalar) -> FilterExpression:
        """The stored value is a JSON array with an element equal to `value` (type-exact)."""
        if isinstance(value, list | tuple | dict | set | frozenset):
            raise TypeError(f"{self!r}.array_contains takes one scalar, got {type(value).__name__}")
        if value is None:
            raise TypeError(f"{self!r}.array_contains takes a string, number or boolean, not None")
        if not isinstance(value, str | int | float | bool):
            raise TypeError(
                f"{self!r}.array_contains takes a string, number or boolean,"
                f" got {type(value).__name__}"
            )
        return self._filter("arrayContains", _scalar(self, value))

    def within_next(self, amount: float | timedelta, unit: Unit | None = None) -> FilterExpression:
        """A timestamp between now and now + `amount` `unit`: within_next(7, "days")."""
        return self._filter("withinNext", *_window(self, amount, unit))

    def _element(self, field: object, value: object) -> Scalar:
        """One value of an in_ / not_in list: what == takes."""
        if isinstance(value, list | tuple | dict | set | frozenset):
            raise TypeError(f"{field}: an in_ list holds scalars, got a {type(value).__name__}")
        if value is None:
            raise TypeError(
                f"{field}: an in_ list holds no None; use .not_exists() for absent keys"
            )
        return self._value(value, "equals")


class EventField(_Valueless):
    """The contact's events of one name (or one email activity): occurrence tests only."""

    __slots__ = ()
    _use_instead = (
        "an event is tested by .triggered(), .triggered_within(n, unit),"
        " .triggered_older_than(n, unit), .not_triggered() or .not_triggered_within(n, unit)"
    )

    # Every test takes `where`: data filters over the occurrence's own data, ANDed; only the
    # occurrences matching all of them count, for existence, counts, the latest and "never"
    # alike. Only triggered and triggered_within take `count` and `aggregate`.

    def triggered(
        self,
        *,
        where: Where | None = None,
        count: Count | None = None,
        aggregate: Aggregate | None = None,
    ) -> FilterExpression:
        """At least one occurrence ever (or `count` of them, all time); with `aggregate`, the
        aggregate over them holds too: triggered(where=[F.data("amount") > 50])."""
        return self._filter(
            "triggered",
            where=_where(self, where),
            count=_count(self, count),
            aggregate=_aggregate(self, aggregate),
        )

    def triggered_within(
        self,
        amount: float | timedelta,
        unit: Unit | None = None,
        *,
        where: Where | None = None,
        count: Count | None = None,
        aggregate: Aggregate | None = None,
    ) -> FilterExpression:
        """At least one occurrence at or after now - `amount` `unit` (or `count` of them in
        that window): triggered_within(30, "minutes", count=F.count >= 3)."""
        return self._filter(
            "triggeredWithin",
            *_window(self, amount, unit),
            where=_where(self, where),
            count=_count(self, count),
            aggregate=_aggregate(self, aggregate),
        )

    def triggered_older_than(
        self, amount: float | timedelta, unit: Unit | None = None, *, where: Where | None = None
    ) -> FilterExpression:
        """Occurred, and the latest occurrence is before now - `amount` `unit`."""
        return self._filter(
            "triggeredOlderThan", *_window(self, amount, unit), where=_where(self, where)
        )

    def not_triggered(self, *, where: Where | None = None) -> FilterExpression:
        """Never occurred."""
        return self._filter("notTriggered", where=_where(self, where))

    def not_triggered_within(
        self, amount: float | timedelta, unit: Unit | None = None, *, where: Where | None = None
    ) -> FilterExpression:
        """No occurrence at or after now - `amount` `unit` (never counts too)."""
        return self._filter(
            "notTriggeredWithin", *_window(self, amount, unit), where=_where(self, where)
        )


class EmailActivityField(EventField):
    """An email activity (sent, delivered, opened, clicked, bounced, complained)."""

    __slots__ = ()


class SegmentField(_Valueless):
    """Membership of another segment of the same project."""

    __slots__ = ()
    _use_instead = "a segment is tested by .member() or .not_member()"

    def member(self) -> FilterExpression:
        """The contact is a current member of the segment."""
        return self._filter("memberOfSegment")

    def not_member(self) -> FilterExpression:
        """The contact is not a current member of the segment."""
        return self._filter("notMemberOfSegment")


class _Comparable(Generic[_V]):
    """Something compared with == != < <= > >= into a _V (a Count, an Aggregate)."""

    __slots__ = ()

    def _compare(self, operator: Comparison, value: object) -> _V:
        raise NotImplementedError

    def __eq__(self, value: object) -> _V:  # type: ignore[override]
        return self._compare("equals", value)

    def __ne__(self, value: object) -> _V:  # type: ignore[override]
        return self._compare("notEquals", value)

    def __gt__(self, value: object) -> _V:
        return self._compare("greaterThan", value)

    def __ge__(self, value: object) -> _V:
        return self._compare("greaterThanOrEqual", value)

    def __lt__(self, value: object) -> _V:
        return self._compare("lessThan", value)

    def __le__(self, value: object) -> _V:
        return self._compare("lessThanOrEqual", value)

    def __bool__(self) -> NoReturn:
        raise TypeError(f"{self!r} has no truth value; compare it: {self!r} >= 3")

    __hash__ = None  # type: ignore[assignment]


class EventCount(_Comparable[Count]):
    """`F.count`: the number of an event filter's matching occurrences. Compared with a whole
    number it makes the filter's `count`: `F.count >= 3`, `F.count == 0`."""

    __slots__ = ()

    def _compare(self, operator: Comparison, value: object) -> Count:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"F.count compares with a whole number, got {value!r}")
        if not 0 <= value <= _MAX_COUNT:
            raise ValueError(f"F.count compares with 0 to {_MAX_COUNT:,}, got {value}")
        return Count(operator, value)

    def __repr__(self) -> str:
        return "F.count"


class EventAggregate(_Comparable[Aggregate]):
    """sum, avg, min or max of a numeric property of an event filter's matching occurrences
    (`F.sum("amount")`). Compared with a number it makes the filter's `aggregate`:
    `F.sum("amount") >= 100`."""

    __slots__ = ("field", "function")

    def __init__(self, function: AggregateFunction, field: str) -> None:
        if function not in AGGREGATE_FUNCTIONS:
            raise ValueError(
                f"unknown aggregate function {function!r}; use one of"
                f" {', '.join(AGGREGATE_FUNCTIONS)}"
            )
        self.function = function
        self.field = field

    def _compare(self, operator: Comparison, value: object) -> Aggregate:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(f"{self!r} compares with a number, got {value!r}")
        if not math.isfinite(value):
            raise ValueError(f"{self!r}: {value} is not a finite number")
        return Aggregate(self.function, self.field, operator, value)

    def __repr__(self) -> str:
        return _aggregate_term_repr(self.function, self.field)


class _Identified(Protocol):
    """A Segment message, or anything else with the id of a segment."""

    @property
    def id(self) -> str: ...


class _Fields:
    """The fields a condition can test: `F.email`, `F.data("plan")`, `F.event("login")`..."""

    __slots__ = ()

    #: The contact's email (case-insensitive tests).
    email = EmailField("email")
    #: The contact's subscribed flag.
    subscribed = SubscribedField("subscribed")
    #: When the contact was created.
    created_at = TimestampField("createdAt")
    #: When the contact was last changed.
    updated_at = TimestampField("updatedAt")

    #: The number of an event filter's matching occurrences: count=F.count >= 3.
    count = EventCount()

    def data(self, *path: str) -> DataField:
        """A key of the contact's data: data("plan"), or nested data("address", "city"),
        which is data("address.city"). In an event filter's `where`, a key of the
        occurrence's data."""
        return DataField(_data_path("F.data", path))

    def sum(self, *path: str) -> EventAggregate:
        """The total of an event property over the matching occurrences (numbers only):
        aggregate=F.sum("amount") >= 100."""
        return EventAggregate("sum", _data_path("F.sum", path))

    def avg(self, *path: str) -> EventAggregate:
        """The mean of an event property over the matching occurrences (numbers only)."""
        return EventAggregate("avg", _data_path("F.avg", path))

    def min(self, *path: str) -> EventAggregate:
        """The least value of an event property over the matching occurrences."""
        return EventAggregate("min", _data_path("F.min", path))

    def max(self, *path: str) -> EventAggregate:
        """The greatest value of an event property over the matching occurrences."""
        return EventAggregate("max", _data_path("F.max", path))

    def event(self, name: str) -> EventField:
        """The contact's events named `name` (tracked, ingested, or segment.<slug>.entry)."""
        if not _text("F.event", name):
            raise ValueError("an event name must not be empty")
        return EventField(f"event.{name}")

    def email_activity(self, activity: str) -> EmailActivityField:
        """Email activity: sent, delivered, opened/open, clicked/click, bounced/bounce,
        complained/complaint."""
        if _text("F.email_activity", activity) not in EMAIL_ACTIVITIES:
            known = ", ".join(sorted(EMAIL_ACTIVITIES))
            raise ValueError(f"unknown email activity {activity!r}; known: {known}")
        return EmailActivityField(f"email.{activity}")

    def segment(self, segment: str | _Identified) -> SegmentField:
        """Membership of a segment, given by id or as a Segment (anything with a str `id`)."""
        id = segment if isinstance(segment, str) else getattr(segment, "id", None)
        if not isinstance(id, str) or not id:
            raise TypeError(f"F.segment takes a segment id or a Segment, got {segment!r}")
        return SegmentField(f"segment.{id}")

    def __repr__(self) -> str:
        return "F"


#: The root of every condition: `(F.data("plan") == "pro") & F.subscribed.equals(True)`.
F = _Fields()


# --- values ---------------------------------------------------------------------------------


def _data_path(name: str, path: tuple[str, ...]) -> str:
    """`data.<a>.<b>` of a path given as keys, dotted or not."""
    parts = [part for key in path for part in _text(name, key).split(".")]
    if not parts or not all(parts):
        raise ValueError(f"data path {'.'.join(path)!r} has an empty key")
    return "data." + ".".join(parts)


def _text(field: object, value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{field} takes a string, got {type(value).__name__}")
    return value


def _flag(field: object, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{field} compares with True or False only, got {value!r}")
    return value


def _scalar(field: object, value: object) -> Scalar:
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{field}: {value} is not a finite number")
    if not isinstance(value, str | int | float | bool):
        raise TypeError(
            f"{field} compares with a string, number, boolean or timestamp,"
            f" got {type(value).__name__}"
        )
    return value


def _timestamp(field: object, value: object) -> str | int:
    if isinstance(value, datetime):
        # A naive datetime would be read as UTC on the server; local time is the likelier intent.
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"{field}: datetime {value.isoformat()} has no time zone")
        return value.isoformat()
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    raise TypeError(
        f"{field} compares with a datetime, a date, an RFC 3339 string or epoch"
        f" milliseconds, got {type(value).__name__}"
    )


def _window(field: object, amount: object, unit: object) -> tuple[float, Unit]:
    """(value, unit) of a window operator."""
    if isinstance(amount, timedelta):
        if unit is not None:
            raise TypeError(f"{field}: give a timedelta or an amount and a unit, not both")
        seconds = amount.total_seconds()
        if seconds <= 0:
            raise ValueError(f"{field}: the window must be positive, got {amount}")
        for name in _TIMEDELTA_UNITS:
            if seconds % _UNIT_SECONDS[name] == 0:
                return _window(field, int(seconds // _UNIT_SECONDS[name]), name)
        raise ValueError(f"{field}: {amount} is not a whole number of minutes")
    if isinstance(amount, bool) or not isinstance(amount, int | float):
        raise TypeError(f"{field}: the window is a number of units, got {amount!r}")
    if not math.isfinite(amount) or amount <= 0:
        raise ValueError(f"{field}: the window must be a positive number, got {amount}")
    if unit == "months":
        # A calendar month has no fixed length, so the service takes whole ones only.
        if not float(amount).is_integer():
            raise ValueError(f"{field}: months are counted in whole numbers, got {amount}")
        if amount > _MAX_MONTHS:
            raise ValueError(f"{field}: the window may span at most {_MAX_MONTHS} months")
        return amount, unit
    if unit not in _UNIT_SECONDS:
        raise ValueError(f"{field}: unknown unit {unit!r}; use one of {', '.join(UNITS)}")
    if amount > _MAX_WINDOW_SECONDS / _UNIT_SECONDS[unit]:
        raise ValueError(f"{field}: the window may span at most 36525 days, got {amount} {unit}")
    return amount, unit


def _values(
    field: object, values: object, element: Callable[[object, object], Scalar]
) -> tuple[Scalar, ...]:
    """The list of in_ / not_in: 1 to 100 scalars, each checked by `element`."""
    if isinstance(values, str | bytes | Mapping) or not isinstance(values, Iterable):
        raise TypeError(
            f"{field}: in_ and not_in take a list of values, got {type(values).__name__}"
        )
    out = tuple(element(field, v) for v in values)
    if not 1 <= len(out) <= MAX_IN_VALUES:
        raise ValueError(f"{field}: an in_ list holds 1 to {MAX_IN_VALUES} values, got {len(out)}")
    return out


def _range(field: object, low: object, high: object) -> tuple[Scalar, Scalar]:
    """[low, high] of between: two numbers, or two timestamps, low <= high."""
    (low_kind, low_value, low_key), (high_kind, high_value, high_key) = (
        _bound(field, low),
        _bound(field, high),
    )
    if low_kind != high_kind:
        raise TypeError(
            f"{field}: between takes two numbers or two timestamps, got {low!r} and {high!r}"
        )
    if low_key > high_key:  # type: ignore[operator]  # both numbers or both datetimes
        raise ValueError(f"{field}: between's low {low!r} is above its high {high!r}")
    return low_value, high_value


def _bound(field: object, value: object) -> tuple[str, Scalar, float | datetime]:
    """(kind, wire value, comparable value) of one end of between."""
    if isinstance(value, bool) or value is None:
        raise TypeError(f"{field}: between takes numbers or timestamps, got {value!r}")
    if isinstance(value, int | float):
        if not math.isfinite(value):
            raise ValueError(f"{field}: {value} is not a finite number")
        return "number", value, value
    if isinstance(value, datetime | date):
        wire = _timestamp(field, value)
        return "timestamp", wire, _instant(field, str(wire))
    if isinstance(value, str):
        return "timestamp", value, _instant(field, value)
    raise TypeError(f"{field}: between takes numbers or timestamps, got {type(value).__name__}")


def _instant(field: object, text: str) -> datetime:
    """An RFC 3339 string as an aware datetime (a string without offset read as UTC, as the
    service reads it)."""
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{field}: {text!r} is not an RFC 3339 timestamp") from None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


# The operators of a `where` filter: the value tests of data, not the windows.
_WHERE_OPERATORS = frozenset(_COMPARISONS) | {
    "contains",
    "notContains",
    "exists",
    "notExists",
    "in",
    "notIn",
    "startsWith",
    "endsWith",
    "between",
    "arrayContains",
}


def _where(field: object, where: object) -> tuple[FilterExpression, ...]:
    """The filters of `where`: data filters with value operators, given as a list or ANDed."""
    if where is None:
        return ()
    items = [where] if isinstance(where, Expression) else where
    if isinstance(items, str | bytes | Mapping) or not isinstance(items, Iterable):
        raise TypeError(
            f"{field}: where takes data filters, e.g. where=[F.data('amount') > 50],"
            f" got {type(where).__name__}"
        )
    out: list[FilterExpression] = []
    pending = list(items)
    while pending:
        item = pending.pop(0)
        if isinstance(item, LogicalExpression) and item.logic == "AND":
            pending[:0] = item.operands
            continue
        if isinstance(item, LogicalExpression):
            raise TypeError(f"{field}: where filters are ANDed; {item!r} is an OR")
        if not isinstance(item, FilterExpression):
            raise TypeError(f"{field}: where takes data filters, got {type(item).__name__}")
        if not item.field.startswith("data."):
            raise TypeError(
                f"{field}: a where filter tests the occurrence's data (F.data(...)), got {item!r}"
            )
        if item.operator not in _WHERE_OPERATORS:
            raise TypeError(
                f"{field}: a where filter takes a value test, not {item.operator}: {item!r}"
            )
        out.append(item)
    if not out:
        raise ValueError(f"{field}: where needs at least one filter (or leave it out)")
    return tuple(out)


def _count(field: object, count: object) -> Count | None:
    if count is None or isinstance(count, Count):
        return count
    raise TypeError(f"{field}: count takes a comparison of F.count, e.g. count=F.count >= 3")


def _aggregate(field: object, aggregate: object) -> Aggregate | None:
    if aggregate is None or isinstance(aggregate, Aggregate):
        return aggregate
    raise TypeError(
        f"{field}: aggregate takes a comparison of F.sum/avg/min/max,"
        " e.g. aggregate=F.sum('amount') >= 100"
    )
