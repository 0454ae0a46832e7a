"""A condition builder: Python expressions that build filter conditions, the way SQLAlchemy's
`column == value` builds SQL rather than a boolean.

    from segments import F

    pro = (F.data("plan") == "pro") & F.event("login").triggered_within(30, "minutes")
    pro.to_dict()  # {"logic": "AND", "groups": [{"filters": [...]}]}

Fields are typed by what they hold, so a test that does not apply to one (ordering an email,
comparing an event) is a TypeError when the expression is built, and an impossible value (an
unknown unit, a window that is not positive) a ValueError; the service still validates what
it receives. `&` and `|` bind tighter than comparisons: parenthesise each comparison.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any, Generic, Literal, NoReturn, Protocol, TypeAlias, TypeVar, get_args

__all__ = [
    "EMAIL_ACTIVITIES",
    "UNITS",
    "DataField",
    "EmailActivityField",
    "EmailField",
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

#: Units of the window operators.
Unit: TypeAlias = Literal["days", "hours", "minutes"]
UNITS: tuple[str, ...] = get_args(Unit)
_UNIT_SECONDS: dict[Unit, int] = {"days": 86_400, "hours": 3_600, "minutes": 60}

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
class FilterExpression(Expression):
    """One filter: `{"field", "operator", "value"?, "unit"?}`."""

    field: str
    operator: str
    value: Scalar | None = None
    unit: Unit | None = None

    def filter_dict(self) -> dict[str, Any]:
        """This filter alone, as it appears in a group's `filters`."""
        out: dict[str, Any] = {"field": self.field, "operator": self.operator}
        if self.value is not None:
            out["value"] = self.value
        if self.unit is not None:
            out["unit"] = self.unit
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
}
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


def _filter_repr(f: FilterExpression) -> str:
    field = _field_repr(f.field)
    if field is None or f.operator not in _COMPARISONS.keys() | _METHODS.keys():
        # Made directly rather than by F: shown as made.
        parts = [f"{f.field!r}", f"{f.operator!r}"]
        parts += [f"{name}={v!r}" for name, v in (("value", f.value), ("unit", f.unit)) if v]
        return f"FilterExpression({', '.join(parts)})"
    if f.operator in _COMPARISONS:
        return f"{field} {_COMPARISONS[f.operator]} {f.value!r}"
    args = [repr(a) for a in (f.value, f.unit) if a is not None]
    return f"{field}.{_METHODS[f.operator]}({', '.join(args)})"


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
        self, operator: str, value: Scalar | None = None, unit: Unit | None = None
    ) -> FilterExpression:
        return FilterExpression(self.path, operator, value, unit)

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
    """The contact's email: equality and substring tests, all case-insensitive."""

    __slots__ = ()
    _use_instead = "use ==, !=, .contains() or .not_contains()"

    def equals(self, value: str) -> FilterExpression:
        return self._filter("equals", _text(self, value))

    def not_equals(self, value: str) -> FilterExpression:
        return self._filter("notEquals", _text(self, value))

    def contains(self, value: str) -> FilterExpression:
        return self._filter("contains", _text(self, value))

    def not_contains(self, value: str) -> FilterExpression:
        return self._filter("notContains", _text(self, value))

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
    """A key (a dotted path for nested objects) of the contact's JSON data. Equality is
    type-exact ("5" is not 5); ordering compares numbers or timestamps; negations never
    match a contact without the key (`not_exists()` selects those)."""

    __slots__ = ()
    _use_instead = "compare it, or use .exists(), .not_exists(), .contains(), .within()..."

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


class EventField(_Valueless):
    """The contact's events of one name (or one email activity): occurrence tests only."""

    __slots__ = ()
    _use_instead = (
        "an event is tested by .triggered(), .triggered_within(n, unit),"
        " .triggered_older_than(n, unit), .not_triggered() or .not_triggered_within(n, unit)"
    )

    # Room for counts, `where` and aggregates as keyword arguments once the wire format
    # carries them.
    def triggered(self) -> FilterExpression:
        """At least one occurrence, ever."""
        return self._filter("triggered")

    def triggered_within(
        self, amount: float | timedelta, unit: Unit | None = None
    ) -> FilterExpression:
        """At least one occurrence at or after now - `amount` `unit`."""
        return self._filter("triggeredWithin", *_window(self, amount, unit))

    def triggered_older_than(
        self, amount: float | timedelta, unit: Unit | None = None
    ) -> FilterExpression:
        """Occurred, and the latest occurrence is before now - `amount` `unit`."""
        return self._filter("triggeredOlderThan", *_window(self, amount, unit))

    def not_triggered(self) -> FilterExpression:
        """Never occurred."""
        return self._filter("notTriggered")

    def not_triggered_within(
        self, amount: float | timedelta, unit: Unit | None = None
    ) -> FilterExpression:
        """No occurrence at or after now - `amount` `unit` (never counts too)."""
        return self._filter("notTriggeredWithin", *_window(self, amount, unit))


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

    def data(self, *path: str) -> DataField:
        """A key of the contact's data: data("plan"), or nested data("address", "city"),
        which is data("address.city")."""
        parts = [part for key in path for part in _text("F.data", key).split(".")]
        if not parts or not all(parts):
            raise ValueError(f"data path {'.'.join(path)!r} has an empty key")
        return DataField("data." + ".".join(parts))

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
        for name, size in _UNIT_SECONDS.items():
            if seconds % size == 0:
                return int(seconds // size), name
        raise ValueError(f"{field}: {amount} is not a whole number of minutes")
    if isinstance(amount, bool) or not isinstance(amount, int | float):
        raise TypeError(f"{field}: the window is a number of units, got {amount!r}")
    if not math.isfinite(amount) or amount <= 0:
        raise ValueError(f"{field}: the window must be a positive number, got {amount}")
    if unit not in UNITS:
        raise ValueError(f"{field}: unknown unit {unit!r}; use one of {', '.join(UNITS)}")
    return amount, unit  # type: ignore[return-value]  # narrowed by the `in` test above
