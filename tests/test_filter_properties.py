"""The SQL filter compiler agrees with the reference evaluator (tests/reference.py).

Each example writes a small random project (contacts with odd data, events with odd data
near window edges, two STATIC helper segments and a DYNAMIC one that conditions may
reference) inside one transaction, evaluates a few random conditions, and each of their
filters alone, both in PostgreSQL and in Python (tests/reference.py), and rolls everything
back. An example's "now" is one of two instants: mid-month, or at the end of a month longer
than the one before it, where calendar months clamp.

FILTER_PROPERTY_EXAMPLES sets the number of examples (default 300); run with -s to see
what was covered.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from decimal import Context, Decimal, Inexact, localcontext
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, assume, given, settings
from hypothesis import strategies as st
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from segments_service.filters import parse_condition
from segments_service.segments import member_count_statement, member_ids
from tests.reference import (
    MISSING,
    RefContact,
    RefEvent,
    RefSegment,
    evaluate,
    lookup,
    shift,
    stored_instant,
    ticks,
    value_instant,
)

EXAMPLES = int(os.environ.get("FILTER_PROPERTY_EXAMPLES", "300"))
# FILTER_PROPERTY_SHRINK=0 reports the first failing example as found (shrinking a world
# costs a query per attempt and may take minutes).
SHRINK = os.environ.get("FILTER_PROPERTY_SHRINK", "1") != "0"

NOW = datetime(2025, 6, 15, 12, 0, tzinfo=UTC)
# 2025-03-31 minus one month is 2025-02-28 (clamped); minus 13 months, 2024-02-29.
MONTH_END_NOW = datetime(2025, 3, 31, 21, 45, tzinfo=UTC)
NOWS = [NOW, MONTH_END_NOW]
US = timedelta(microseconds=1)
STATIC_ID = uuid.UUID("00000000-0000-4000-8000-00000000005a")
DYNAMIC_ID = uuid.UUID("00000000-0000-4000-8000-00000000d1a0")
OTHER_STATIC_ID = uuid.UUID("00000000-0000-4000-8000-0000000005b0")

# Calendar-month edges of each now, written out by hand (not computed, so that they check
# the month arithmetic of both sides): N months before and after, for N in MONTH_VALUES.
MONTH_EDGES = {
    NOW: [
        datetime(2025, 5, 15, 12, tzinfo=UTC),  # -1
        datetime(2025, 4, 15, 12, tzinfo=UTC),  # -2
        datetime(2025, 3, 15, 12, tzinfo=UTC),  # -3
        datetime(2024, 6, 15, 12, tzinfo=UTC),  # -12
        datetime(2024, 5, 15, 12, tzinfo=UTC),  # -13
        datetime(2025, 7, 15, 12, tzinfo=UTC),  # +1
        datetime(2025, 8, 15, 12, tzinfo=UTC),  # +2
        datetime(2025, 9, 15, 12, tzinfo=UTC),  # +3
    ],
    MONTH_END_NOW: [
        datetime(2025, 2, 28, 21, 45, tzinfo=UTC),  # -1, clamped
        datetime(2025, 1, 31, 21, 45, tzinfo=UTC),  # -2
        datetime(2024, 12, 31, 21, 45, tzinfo=UTC),  # -3
        datetime(2024, 3, 31, 21, 45, tzinfo=UTC),  # -12
        datetime(2024, 2, 29, 21, 45, tzinfo=UTC),  # -13, clamped to a leap day
        datetime(2025, 4, 30, 21, 45, tzinfo=UTC),  # +1, clamped
        datetime(2025, 5, 31, 21, 45, tzinfo=UTC),  # +2
        datetime(2025, 6, 30, 21, 45, tzinfo=UTC),  # +3, clamped
        datetime(2025, 3, 3, 21, 45, tzinfo=UTC),  # -28 days: what "-1 month" is not
        datetime(2025, 5, 1, 21, 45, tzinfo=UTC),  # +31 days: what "+1 month" is not
    ],
}


def instants(now: datetime) -> list[datetime]:
    """Instants on and next to the edges of the windows below (WINDOW_VALUES x UNITS), in the
    past and (for withinNext, and future-dated events) in the future."""
    midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
    month_edges = MONTH_EDGES[now]
    return [
        now,
        now - US,
        now + US,
        now + timedelta(minutes=1),
        now - timedelta(minutes=1),
        now - timedelta(minutes=30),
        now - timedelta(minutes=30) - US,
        now - timedelta(hours=1),
        now - timedelta(hours=1) - US,
        now - timedelta(hours=1) + US,
        now - timedelta(hours=12),
        now - timedelta(days=1),
        now - timedelta(days=1) - US,
        now - timedelta(days=1) + US,
        now - timedelta(hours=36),
        now - timedelta(days=3, hours=12),  # half a week
        now - timedelta(days=7),
        now - timedelta(days=7) - US,
        now - timedelta(days=7) + US,
        now - timedelta(days=30),
        now - timedelta(days=90, microseconds=1),
        now + timedelta(hours=12),
        now + timedelta(days=1),
        now + timedelta(days=1) + US,
        now + timedelta(days=3, hours=12),
        now + timedelta(days=7),
        now + timedelta(days=7) + US,
        now + timedelta(days=7) - US,
        now + timedelta(days=30),
        *month_edges,
        month_edges[0] - US,
        month_edges[0] + US,
        month_edges[5] - US,
        month_edges[5] + US,
        midnight,
        midnight - US,
        midnight + timedelta(days=1),
        now.replace(microsecond=123000),
        now.replace(microsecond=123456),
        datetime(2000, 1, 1, tzinfo=UTC),
        datetime(1969, 12, 31, 23, 59, 59, 999000, tzinfo=UTC),
        datetime(9999, 12, 31, 23, 59, 59, 999000, tzinfo=UTC),
        datetime(2300, 1, 1, 0, 0, 0, 1000, tzinfo=UTC),
        # The edges of the longest windows: a century, leap days included.
        now - timedelta(days=36525),
        now - timedelta(days=36525) - US,
        now + timedelta(days=36525),
        now + timedelta(days=36525) + US,
        now - timedelta(weeks=5217),
        now + timedelta(weeks=5217),
        now.replace(year=now.year - 100),  # 1200 months (neither now is on a Feb 29)
        now.replace(year=now.year + 100),
        now.replace(year=now.year + 100) + US,
    ]


INSTANTS = {now: instants(now) for now in NOWS}
ALL_INSTANTS = sorted({m for now in NOWS for m in INSTANTS[now]})
WINDOW_VALUES = [1, 7, 30, 90, 0.5, 1.5, 12, 24, 36, 60]
MONTH_VALUES = [1, 1, 2, 3, 12, 13, 2.0, 1200]  # whole numbers only (2.0 is one)
# The longest windows each unit allows (36525 days; 1200 months).
LONGEST = {"minutes": 52_596_000, "hours": 876_600, "days": 36525, "weeks": 5217}
UNITS = ["days", "hours", "minutes", "weeks", "months"]
OFFSETS = [
    timezone(timedelta(hours=5, minutes=30)),
    timezone(timedelta(hours=-8)),
    timezone(timedelta(hours=15, minutes=59)),
    timezone(timedelta(hours=-15)),
]

WEIRD_KEY = 'we{ird} "key", ü\\0'  # keys may hold any character (they are data, not SQL)
DATA_KEYS = ["plan", "age", "score", "tags", "address", "signup", "note", WEIRD_KEY]
DATA_FIELDS = [
    "data.plan",
    "data.age",
    "data.score",
    "data.tags",
    "data.address",
    "data.address.city",
    "data.signup",
    "data.note",
    "data.missing",
    "data.tags.0",
    "data.address.zip.code",
    f"data.{WEIRD_KEY}",
]
EVENT_FIELDS = [
    "event.purchase",
    "event.login",
    "purchase",
    "login",
    "event.Purchase",
    "event.email.opened",
    "email.opened",
    "email.open",
    "email.clicked",
    "email.click",
    "email.sent",
    "email.delivered",
    "email.bounced",
    "email.bounce",
    "email.complaint",
    "email.complained",
    "event.segment.vip.entry",
]
EVENT_NAMES = [
    "purchase",
    "login",
    "Purchase",
    "email.opened",
    "email.open",
    "email.clicked",
    "email.click",
    "email.sent",
    "email.delivered",
    "email.bounce",
    "email.complained",
    "segment.vip.entry",
]
UNICODE = [
    "Ä",
    "ä",
    "é",
    "É",
    "İ",
    "i",
    "i\u0307",
    "I",
    "ß",
    "ẞ",
    "SS",
    "ss",
    "Σ",
    "\u03c3",
    "ς",
    "straße",
    "STRASSE",
    "Straße",
    "ÉCOLE",
    "école",
    "Premium",
    "premium",
    "PREMIUM",
    "prem",
    "EMI",
    "İstanbul",
    "istanbul",
    "ΣΟΦΊΑ",
    "ΣΟΦΊΑ".lower(),
    "K",
    "k",
    "\u212a",
]
NUMBERS: list[int | float] = [
    0,
    1,
    5,
    10,
    100,
    -1,
    5.0,
    5.5,
    0.1,
    0.30000000000000004,
    1e16,
    10**16 + 1,
    -0.0,
    2.5e-7,
    99.99,
]
STRINGS = ["5", "5.0", "10", "true", "false", "", "null", "premium", "free", " vip", "vip"]
BAD_STAMPS = [
    "2024-02-30",
    "2023-02-29",
    "2025-13-01",
    "2025-00-10",
    "2025-06-31",
    "2025-06-15T24:00:00Z",
    "2025-06-15T12:60Z",
    "2025-06-15T12:00:00.1234567Z",
    "2025-06-15T12:00:00+16:00",
    "2025-06-15T12:00:00+05:60",
    "2025-06-15\n",
    "2025-06-15t12:00:00Z",
    "0000-01-01",
    "\uff12\uff10\uff12\uff15-06-15",
    "2025-6-15",
    "15/06/2025",
    "2025-06-15T12",
    "20250615T120000Z",
]
ODD_STAMPS = [  # valid, but unusual, stored timestamps
    "2024-02-29",
    "0001-01-01T00:00:00+15:00",
    "9999-12-31T23:59:59-15:00",
    "2025-06-15T12:00z",
    "2025-06-15 12:00:00+0530",
    "2025-06-15T17:30+05",
    "2025-06-08T12:00:00.000000+00:00",
    "2025-06-15T11:59:59.999999",
]


def _spellings(moment: datetime, stored: bool) -> list[str]:
    """A timestamp in the spellings a stored string (or a filter value) may use."""
    base = moment.strftime("%Y-%m-%dT%H:%M:%S")
    frac = f".{moment.microsecond:06d}"
    out = [
        base + frac + "Z",
        base + "Z",
        base + frac,  # no offset: UTC
        (base + frac).replace("T", " ") + "+00:00",
        base + frac + "+0000",
        base + frac + "z",
        moment.date().isoformat(),
    ]
    for tz in OFFSETS:
        with contextlib.suppress(OverflowError):  # past year 9999 in that zone
            out.append(moment.astimezone(tz).isoformat())
    if not stored:
        out += [base + frac + "999Z", base + frac + "5Z"]  # nanoseconds are cut off
    return out


STORED_STAMPS = sorted({s for m in ALL_INSTANTS for s in _spellings(m, stored=True)})
VALUE_STAMPS = sorted({s for m in ALL_INSTANTS for s in _spellings(m, stored=False)})
VALUE_STAMP_SET = frozenset(VALUE_STAMPS)


_PICKS: dict[int, tuple[list[Any], st.SearchStrategy[Any]]] = {}


def pick(values: list[Any]) -> st.SearchStrategy[Any]:
    """st.sampled_from(values) for a list that lives as long as the module, built once:
    building one labels it by hashing every element, which cost more than drawing."""
    hit = _PICKS.get(id(values))
    if hit is None or hit[0] is not values:
        hit = _PICKS[id(values)] = (values, st.sampled_from(values))
    return hit[1]


def epoch_millis(moment: datetime) -> int | float:
    micros = (moment - datetime(1970, 1, 1, tzinfo=UTC)) // US
    if micros % 1000 == 0:
        return micros // 1000
    return micros / 1000  # at most three decimals


TIME_VALUES = st.one_of(
    pick(VALUE_STAMPS),
    st.sampled_from([epoch_millis(m) for m in ALL_INSTANTS]),
    st.sampled_from(sorted({m.date().isoformat() for m in ALL_INSTANTS})),  # whole UTC days
)


# --- data ---------------------------------------------------------------------------------

# Values many contacts share, so that equals / contains have something to find.
COMMON: list[Any] = [
    "premium",
    "Premium",
    "free",
    "",
    "5",
    5,
    5.0,
    10,
    0,
    -0.0,
    True,
    False,
    "true",
    0.1,
    1e16,
    10**16 + 1,
    "2025-06-08T12:00:00Z",
]
WORDS = [
    "premium",
    "Premium",
    "PREMIUM",
    "free",
    "straße",
    "STRASSE",
    "Straße",
    "İstanbul",
    "istanbul",
    "ISTANBUL",
    "i\u0307stanbul",
    "ΣΟΦΊΑ",
    "ΣΟΦΊΑ".lower(),
    "Ärger",
    "ärger",
    "école",
    "ÉCOLE",
    "ǅemal",
    "\u212a-pop",
    "k-pop",
    "50%_OFF",  # LIKE's wildcards and escape, for startsWith / endsWith
    "a_b\\c%",
]
NEEDLES = [
    "prem",
    "EMI",
    "ss",
    "SS",
    "ß",
    "ẞ",
    "İ",
    "i",
    "I",
    "i\u0307",
    "\u03c3",
    "Σ",
    "ς",
    "ä",
    "Ä",
    "é",
    "É",
    "free",
    "",
    "stan",
    "İST",
    "k",
    "K",
    "\u212a",
    "ǆ",
    "ǅ",
    "Ǆ",
    "%",
    "_",
    "\\",
    "50%",
    "5_%",
    "_off",
    "\\c%",
    "a%",
]
TEXTS = ["aÄ", "İi", "\u03c3Σ5", "e é", "ÄÖÜ", "ﬁ", "ǅ", "a\u0307", "5 ", "-:T", "ss", "SSß"]
NESTED: list[Any] = [
    [],
    {},
    ["vip"],
    [5, "5"],
    [None],
    [{"code": 5}],
    ["premium", "İ"],
    [["premium"]],
    {"city": "Berlin"},
    {"zip": {"code": "5"}},
    {"0": "x"},
    {"city": None},
    {"code": 5.0},
]
scalars = st.one_of(
    pick(COMMON),
    pick(WORDS),
    pick(NUMBERS),
    st.sampled_from(STRINGS + TEXTS),
    pick(UNICODE),
    st.sampled_from([True, False, None]),
    st.sampled_from(BAD_STAMPS + ODD_STAMPS),
    pick(STORED_STAMPS),
)
json_values = st.one_of(scalars, st.sampled_from(NESTED))
addresses = st.one_of(
    json_values,
    st.fixed_dictionaries(
        {},
        optional={
            "city": scalars,
            "zip": st.one_of(scalars, st.fixed_dictionaries({}, optional={"code": scalars})),
        },
    ),
)
# Array elements, for arrayContains: type-exact (5 is 5.0, not "5"), case-sensitive.
ARRAY_ITEMS: list[Any] = [
    "vip",
    "VIP",
    "vip ",
    "5",
    5,
    5.0,
    0,
    -0.0,
    10**16 + 1,
    1e16,
    True,
    False,
    "true",
    None,
    "",
    "İ",
    ["vip"],
    {"vip": True},
]
array_items = st.sampled_from(ARRAY_ITEMS)
tag_lists = st.one_of(
    st.lists(array_items, min_size=1, max_size=4),
    st.lists(json_values, max_size=3),
    array_items,  # a scalar: never "contains" itself
    json_values,
)
# Stored timestamps near the windows of one now.
NEAR_STAMPS = {
    now: sorted({s for m in INSTANTS[now] for s in _spellings(m, stored=True)}) for now in NOWS
}
# Each key leans to the kind of value filters on it look for, and still takes anything.
KEY_VALUES = {
    now: {
        "plan": st.one_of(pick(WORDS), pick(COMMON), json_values),
        "note": st.one_of(pick(WORDS), st.sampled_from(WORDS + UNICODE + TEXTS), json_values),
        "age": st.one_of(pick(NUMBERS), pick(COMMON), json_values),
        "score": st.one_of(pick(NUMBERS), json_values),
        "signup": st.one_of(
            pick(NEAR_STAMPS[now]),
            st.sampled_from(ODD_STAMPS + BAD_STAMPS),
            json_values,
        ),
        WEIRD_KEY: st.one_of(pick(WORDS), pick(COMMON), json_values),
        "address": addresses,
        "tags": tag_lists,
    }
    for now in NOWS
}

# --- event data ---------------------------------------------------------------------------

# Purchase amounts: numbers (aggregated), and what aggregates must ignore.
AMOUNT_NUMBERS: list[int | float] = [
    0,
    1,
    2,
    5,
    5.0,
    10,
    20,
    40.5,
    50,
    60,
    99.99,
    100,
    -5,
    0.1,
    0.2,
    0.30000000000000004,
    2.5e-7,
    1e16,
    10**16 + 1,
]
NOT_NUMBERS: list[Any] = ["42", "50", "", True, False, None, {"value": 5}, [5], "5.0"]
CURRENCIES: list[Any] = ["EUR", "USD", "eur", "Eur", "GBP", "", 5, True, None, "50%_OFF"]
SKUS: list[Any] = ["AB-1", "ab-2", "XY_9", "straße", "İstanbul", 42, None]


def _event_data(rng: random.Random, now: datetime) -> dict[str, Any]:
    """One occurrence's data: each key present two times in three, of any JSON type."""

    def amount() -> Any:
        return rng.choice(AMOUNT_NUMBERS if rng.random() < 0.7 else NOT_NUMBERS)

    def tags() -> Any:
        if rng.random() < 0.7:
            return rng.sample(ARRAY_ITEMS, rng.randint(1, 4))
        return rng.choice(ARRAY_ITEMS + NESTED)

    def item() -> Any:
        if rng.random() < 0.3:
            return rng.choice(SKUS)
        made = {"sku": rng.choice(SKUS), "price": amount()}
        return {k: v for k, v in made.items() if rng.random() < 0.7}

    def at() -> Any:
        if rng.random() < 0.7:
            return rng.choice(NEAR_STAMPS[now])
        return rng.choice(ODD_STAMPS + BAD_STAMPS + COMMON)

    makers: dict[str, Callable[[], Any]] = {
        "amount": lambda: rng.choice(AMOUNT_NUMBERS if rng.random() < 0.8 else NOT_NUMBERS),
        "currency": lambda: rng.choice(CURRENCIES),
        "item": item,
        "tags": tags,
        "at": at,
        WEIRD_KEY: lambda: rng.choice(AMOUNT_NUMBERS + CURRENCIES),
    }
    if rng.random() < 0.2:
        return {}  # no data at all
    presence = {"amount": 0.85, WEIRD_KEY: 1 / 3}
    return {key: make() for key, make in makers.items() if rng.random() < presence.get(key, 2 / 3)}


# Two events in three are one of these, so that counts, `where` and aggregates find several
# of a contact's occurrences.
DATA_EVENT_NAMES = ["purchase", "purchase", "purchase", "login"]


def _occurrence(rng: random.Random, now: datetime) -> tuple[str, dict[str, Any]]:
    names = DATA_EVENT_NAMES if rng.random() < 2 / 3 else EVENT_NAMES
    return rng.choice(names), _event_data(rng, now)


# Events take their name and data from a fixed pool: one choice per event keeps examples
# cheap to generate (a draw per key would double the time spent generating).
OCCURRENCES = {now: [_occurrence(random.Random(n), now) for n in range(400)] for now in NOWS}
DATA_EVENT_FIELDS = ["event.purchase", "purchase", "event.login"]
EVENT_DATA_FIELDS = [
    "data.amount",
    "data.amount",
    "data.currency",
    "data.item",
    "data.item.sku",
    "data.item.price",
    "data.tags",
    "data.at",
    "data.missing",
    f"data.{WEIRD_KEY}",
]
AGGREGATES = ["sum", "avg", "min", "max"]
AGGREGATE_FIELDS = ["data.amount"] * 4 + ["data.item.price", "data.at", f"data.{WEIRD_KEY}"]


@dataclass
class World:
    now: datetime
    contacts: list[RefContact]
    events: list[RefEvent]
    static_members: frozenset[uuid.UUID]
    other_members: frozenset[uuid.UUID]
    dynamic_condition: dict[str, Any]
    conditions: list[dict[str, Any]] = field(default_factory=list)

    @property
    def segments(self) -> dict[uuid.UUID, RefSegment]:
        return {
            STATIC_ID: RefSegment("STATIC", members=self.static_members),
            OTHER_STATIC_ID: RefSegment("STATIC", members=self.other_members),
            DYNAMIC_ID: RefSegment("DYNAMIC", condition=self.dynamic_condition),
        }


LOCALS = ["a", "b", "ann", "bob", "premium", "x.y", "ä", "i\u0307nfo", "straße", "\u03c3", "a_b%"]
DOMAINS = ["x.com", "example.org", "mail.de"]


@st.composite
def contacts(draw: st.DrawFn, now: datetime) -> list[RefContact]:
    out = []
    for i in range(draw(st.integers(10, 30))):
        data = {}
        for key in DATA_KEYS:
            if draw(st.integers(0, 3)):  # a quarter of the keys are missing
                data[key] = draw(KEY_VALUES[now][key])
        out.append(
            RefContact(
                id=uuid.UUID(int=i + 1),
                email=f"{draw(pick(LOCALS))}{i}@{draw(pick(DOMAINS))}".lower(),
                subscribed=draw(st.booleans()),
                data=data,
                created_at=draw(pick(INSTANTS[now])),
                updated_at=draw(pick(INSTANTS[now])),
            )
        )
    return out


@st.composite
def events_for(draw: st.DrawFn, people: list[RefContact], now: datetime) -> list[RefEvent]:
    out = []
    for person in people:
        for _ in range(draw(st.integers(0, 5))):
            name, data = draw(pick(OCCURRENCES[now]))
            out.append(RefEvent(person.id, name, draw(pick(INSTANTS[now])), data))
    return out


# --- conditions ---------------------------------------------------------------------------

ORDERING = ["greaterThan", "lessThan", "greaterThanOrEqual", "lessThanOrEqual"]
COMPARISONS = ["equals", "notEquals", *ORDERING]


WINDOWS: list[tuple[int | float, str]] = [
    (value, unit)
    for unit in UNITS
    for value in (MONTH_VALUES if unit == "months" else [*WINDOW_VALUES, LONGEST[unit]])
]


@st.composite
def windowed(
    draw: st.DrawFn, field_name: str, op: str, edges: tuple[tuple[int | float, str], ...] = ()
) -> dict[str, Any]:
    """A window filter; half the time one whose edge is an instant `edges` says is stored."""
    value, unit = draw(_either(edges, pick(WINDOWS)))
    return {"field": field_name, "operator": op, "value": value, "unit": unit}


def _edge_table(now: datetime) -> dict[int, list[int]]:
    """For each instant that is now - N unit or now + N unit, the indexes in WINDOWS of
    those windows."""
    table: dict[int, list[int]] = {}
    for index, (value, unit) in enumerate(WINDOWS):
        for direction in (-1, 1):
            table.setdefault(shift(ticks(now), value, unit, direction), []).append(index)
    return table


EDGE_TABLES = {now: _edge_table(now) for now in NOWS}


def _edges(instants: Iterable[int], now: datetime) -> tuple[tuple[int | float, str], ...]:
    """The windows of WINDOWS whose edge, now - N unit or now + N unit, is one of `instants`."""
    table = EDGE_TABLES[now]
    found = {index for t in set(instants) for index in table.get(t, ())}
    return tuple(WINDOWS[index] for index in sorted(found))


def _number(amount: Decimal) -> int | float:
    """A decimal as a JSON number (a float may be the nearest one, not the decimal itself)."""
    if amount == amount.to_integral_value() and abs(amount) < 2**53:
        return int(amount)
    return float(amount)


def _exact_average(numbers: list[Decimal]) -> int | float | None:
    """The average of `numbers` when it is a short decimal that a float holds exactly, else None.

    PostgreSQL's numeric avg rounds an average such as 4/3 (to at least 16 significant
    digits) where the reference compares it exactly, so a comparison value between an
    average and its rounding would make the two disagree about nothing but rounding.
    Aggregate comparison values are therefore such exact averages (at most 15 significant
    digits, which PostgreSQL keeps), sums, minima and maxima of AMOUNT_NUMBERS, and the
    short decimals of AGGREGATE_VALUES. To fall between a repeating average and its
    rounding, a value would have to match the average's first 16 significant digits and
    then lie on the far side of the rounding; with these values that is possible in
    principle near 1e16 (a sum of 10**16 + 1 becomes the float 1e16) but has not been
    seen, and a disagreement it caused would show an `avg` filter and such a value.
    """
    try:
        with localcontext(Context(prec=100, traps=[Inexact])):
            total = sum(numbers, Decimal(0))
        with localcontext(Context(prec=15, traps=[Inexact])):
            average = total / len(numbers)
    except Inexact:
        return None
    as_float = _number(average)
    return as_float if Decimal(repr(as_float)) == average or isinstance(as_float, int) else None


def _short(texts: Iterable[str]) -> tuple[str, ...]:
    """Pieces of `texts` in other cases: needles for contains / startsWith / endsWith."""
    return tuple(
        sorted(
            {
                variant
                for leaf in texts
                for variant in (
                    leaf,
                    leaf.upper(),
                    leaf[1:4],
                    leaf[:2].swapcase(),
                    leaf[:3].lower(),
                    leaf[-3:].upper(),
                    leaf[:4].upper(),
                    leaf[-2:],
                )
            }
        )
    )


def _leaves(records: Iterable[dict[str, Any]], fields: list[str]) -> dict[str, list[Any]]:
    """The values at each data field of `records` (missing keys left out)."""
    out: dict[str, list[Any]] = {}
    for name in fields:
        out[name] = []
        for record in records:
            node = lookup(record, name[5:].split("."))
            if node is not MISSING:
                out[name].append(node)
    return out


def _scalars_of(values: list[Any]) -> tuple[Any, ...]:
    found = {json.dumps(v): v for v in values if not isinstance(v, (dict, list, type(None)))}
    return tuple(found[k] for k in sorted(found))


def _elements_of(values: list[Any]) -> tuple[Any, ...]:
    return _scalars_of([item for v in values if isinstance(v, list) for item in v])


@dataclass(frozen=True)
class Seen:
    """Values present in an example's contacts and events, so that filters often hit."""

    emails: tuple[str, ...] = ()
    scalars: dict[str, tuple[Any, ...]] = field(default_factory=dict)  # by data field
    needles: dict[str, tuple[str, ...]] = field(default_factory=dict)  # by data field
    elements: dict[str, tuple[Any, ...]] = field(default_factory=dict)  # of arrays, by field
    # The same for the data of events, by field of a `where` filter.
    event_scalars: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    event_needles: dict[str, tuple[str, ...]] = field(default_factory=dict)
    event_elements: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    # sum / min / max / exact avg of the numbers at a field in one contact's events of a name.
    # Keyed by (field, function); an average's candidates include sums (which an average
    # computed as a sum would equal).
    aggregates: dict[tuple[str, str], tuple[int | float, ...]] = field(default_factory=dict)
    # Windows whose edge is an instant stored at a field (createdAt, updatedAt, data.*), or
    # when an event occurred ("event").
    edges: dict[str, tuple[tuple[int | float, str], ...]] = field(default_factory=dict)
    # The example's records themselves, to aim an aggregate at what one filter aggregates.
    people: tuple[RefContact, ...] = ()
    events: tuple[RefEvent, ...] = ()
    now: datetime = NOW

    @staticmethod
    def of(people: list[RefContact], events: list[RefEvent], now: datetime) -> Seen:
        data = _leaves([p.data for p in people], DATA_FIELDS)
        event_data = _leaves([e.data for e in events], EVENT_DATA_FIELDS)
        aggregates: dict[tuple[str, str], set[int | float]] = {}
        for name in AGGREGATE_FIELDS:
            found = {f: aggregates.setdefault((name, f), set()) for f in AGGREGATES}
            by_contact_and_name: dict[tuple[uuid.UUID, str], list[Decimal]] = {}
            for e in events:
                node = lookup(e.data, name[5:].split("."))
                if isinstance(node, (int, float)) and not isinstance(node, bool):
                    key = (e.contact_id, e.name)
                    by_contact_and_name.setdefault(key, []).append(_json_decimal(node))
            for numbers in by_contact_and_name.values():
                with localcontext(Context(prec=100)):
                    total = _number(sum(numbers, Decimal(0)))
                found["sum"].add(total)
                found["min"].add(_number(min(numbers)))
                found["max"].add(_number(max(numbers)))
                average = _exact_average(numbers)
                found["avg"] |= {total} if average is None else {total, average}
        # Upper case as people write it: "İ" for the stored "i̇" (whose Python lower() is
        # the stored form again, and PostgreSQL's lower() is not).
        emails = {
            v
            for p in people
            for v in (
                p.email,
                p.email.upper(),
                p.email.title(),
                p.email.upper().replace("I\u0307", "İ"),
            )
        }
        return Seen(
            emails=tuple(sorted(emails)),
            scalars={k: _scalars_of(v) for k, v in data.items()},
            needles={k: _short(x for x in v if isinstance(x, str)) for k, v in data.items()},
            elements={k: _elements_of(v) for k, v in data.items()},
            event_scalars={k: _scalars_of(v) for k, v in event_data.items()},
            event_needles={
                k: _short(x for x in v if isinstance(x, str)) for k, v in event_data.items()
            },
            event_elements={k: _elements_of(v) for k, v in event_data.items()},
            aggregates={k: tuple(sorted(v, key=repr)) for k, v in aggregates.items()},
            people=tuple(people),
            events=tuple(events),
            now=now,
            edges={
                "createdAt": _edges((ticks(p.created_at) for p in people), now),
                "updatedAt": _edges((ticks(p.updated_at) for p in people), now),
                "event": _edges((ticks(e.occurred_at) for e in events), now),
                **{
                    k: _edges((t for x in v if (t := stored_instant(x)) is not None), now)
                    for k, v in data.items()
                },
            },
        )


def _either(
    seen: tuple[Any, ...] | list[Any], *others: st.SearchStrategy[Any], lean: int = 1
) -> st.SearchStrategy[Any]:
    """A value seen in the example's records (lean / (lean + 1) of the time), else one of
    `others`."""
    if not seen:
        return st.one_of(*others)
    return st.one_of(*[st.sampled_from(seen)] * lean, st.one_of(*others))


def _lists(element: st.SearchStrategy[Any]) -> st.SearchStrategy[list[Any]]:
    """An `in` / `notIn` list: 1..100 values, mostly short, sometimes repeating one."""
    return st.one_of(
        st.lists(element, min_size=1, max_size=4),
        st.lists(element, min_size=1, max_size=100),
    )


EMAIL_VALUES = [
    "a0@x.com",
    "A0@X.COM",
    "b1@example.org",
    "I\u0307NFO2@MAIL.DE",
    "İNFO2@MAIL.DE",
    "nobody@x.com",
    "premium3@x.com",
    "Bob4@Example.Org",
    "",
]
EMAIL_NEEDLES = [
    "@x.com",
    "X.COM",
    "a",
    "B",
    "İ",
    "i\u0307",
    "ä",
    "Ä",
    "STRASSE",
    "straße",
    "\u03c3",
    "Σ",
    "",
    "1@",
    "example",
    "A_B%",
    "a_",
    "_",
    "%",
    ".ORG",
    "x.com",
    "de",
]


@st.composite
def email_filters(draw: st.DrawFn, seen: Seen) -> dict[str, Any]:
    op = draw(
        st.sampled_from(
            [
                "equals",
                "notEquals",
                "contains",
                "notContains",
                "in",
                "notIn",
                "startsWith",
                "endsWith",
            ]
        )
    )
    exact = _either(seen.emails, pick(EMAIL_VALUES))
    if op in ("equals", "notEquals"):
        value: Any = draw(exact)
    elif op in ("in", "notIn"):
        value = draw(_lists(exact))
    else:
        pieces = tuple(
            p for e in seen.emails for p in (e[:3], e[-6:], e.split("@")[0], "@" + e.split("@")[1])
        )
        value = draw(_either(pieces, pick(EMAIL_NEEDLES)))
    return {"field": "email", "operator": op, "value": value}


@st.composite
def time_filters(draw: st.DrawFn, seen: Seen) -> dict[str, Any]:
    field_name = draw(st.sampled_from(["createdAt", "updatedAt"]))
    op = draw(st.sampled_from(["equals", "notEquals", *ORDERING, "within", "olderThan"]))
    if op in ("within", "olderThan"):
        return draw(windowed(field_name, op, seen.edges.get(field_name, ())))
    return {"field": field_name, "operator": op, "value": draw(TIME_VALUES)}


def _instant(value: str) -> int:
    return value_instant(value)[0]


VALUE_OPERATORS = [
    "equals",
    "notEquals",
    "contains",
    "notContains",
    "exists",
    "notExists",
    *ORDERING,
    "contains",  # case folding: twice
    "notContains",
    "in",
    "notIn",
    "startsWith",
    "endsWith",
    "between",
    "arrayContains",
]


@st.composite
def value_filters(
    draw: st.DrawFn,
    fields: list[str],
    scalars: dict[str, tuple[Any, ...]],
    needles: dict[str, tuple[str, ...]],
    elements: dict[str, tuple[Any, ...]],
    operators: list[str],
    time_field: str,
    number_field: str,
    text_field: str,
    array_field: str,
    local: list[Any] | None = None,
    local_needles: list[str] | None = None,
    lean: int = 1,
    edges: dict[str, tuple[tuple[int | float, str], ...]] | None = None,
) -> dict[str, Any]:
    """A filter on a data field, of a contact or (in `where`) of an event: `scalars`,
    `needles` and `elements` are what the example holds at each field, and values are
    taken from them lean / (lean + 1) of the time; `local` and `local_needles` are values
    and needles the records' own kind of data leans to."""
    op = draw(pick(operators))
    # Half the time, windows and comparisons look at the key that mostly holds timestamps,
    # contains at the key that mostly holds words, arrayContains at the one holding arrays.
    field_name = draw(pick(fields))
    fitting = draw(st.integers(0, lean)) > 0
    if op in ("within", "olderThan", "withinNext") and fitting:
        field_name = time_field
    elif op in (*ORDERING, "between") and fitting:
        field_name = draw(st.sampled_from([time_field, number_field]))
    elif op in ("contains", "notContains", "startsWith", "endsWith") and fitting:
        field_name = text_field
    elif op == "arrayContains" and draw(st.integers(0, 3)):
        field_name = array_field
    seen = scalars.get(field_name, ())
    edges = edges or {}
    if op in ("exists", "notExists"):
        return {"field": field_name, "operator": op}
    if op in ("within", "olderThan", "withinNext"):
        return draw(windowed(field_name, op, edges.get(field_name, ())))
    if op in ("contains", "notContains", "startsWith", "endsWith"):
        value: Any = draw(
            _either(
                needles.get(field_name, ()),
                *([pick(local_needles)] * 3 if local_needles else []),
                pick(NEEDLES),
                pick(WORDS),
                pick(OTHER_TEXTS),
                lean=lean,
            )
        )
        return {"field": field_name, "operator": op, "value": value}
    numbers = [v for v in seen if isinstance(v, (int, float)) and not isinstance(v, bool)]
    stamps = [v for v in seen if isinstance(v, str) and v in VALUE_STAMP_SET]
    if op in ORDERING:
        value = draw(
            _either(
                numbers + stamps,
                pick(NUMBERS),
                pick(VALUE_STAMPS),
                lean=lean,
            )
        )
    elif op == "between":
        if draw(st.booleans()):
            pair = draw(
                st.lists(
                    _either(numbers, pick(BOUNDS), lean=lean),
                    min_size=2,
                    max_size=2,
                )
            )
            value = sorted(pair, key=_json_decimal)
        else:
            pair = draw(
                st.lists(
                    _either(stamps, pick(VALUE_STAMPS), TIME_DAYS, lean=lean),
                    min_size=2,
                    max_size=2,
                )
            )
            value = sorted(pair, key=_instant)
    elif op == "arrayContains":
        value = draw(
            _either(
                elements.get(field_name, ()),
                pick(SCALAR_ITEMS),
                pick(COMMON),
                lean=lean,
            ).filter(lambda v: v is not None)
        )
    else:
        exact = _either(
            seen,
            *([pick(local)] * 3 if local else []),
            pick(COMMON),
            pick(WORDS),
            pick(NUMBERS),
            pick(STRINGS),
            pick(UNICODE),
            st.booleans(),
            pick(ODD_STAMPS),
            pick(STORED_STAMPS),
            lean=lean,
        )
        value = draw(_lists(exact)) if op in ("in", "notIn") else draw(exact)
    return {"field": field_name, "operator": op, "value": value}


def _json_decimal(number: int | float) -> Decimal:
    return Decimal(number) if isinstance(number, int) else Decimal(repr(number))


TIME_DAYS = st.sampled_from(sorted({m.date().isoformat() for m in ALL_INSTANTS}))


DATA_OPERATORS = [*VALUE_OPERATORS, "within", "olderThan", "withinNext", "withinNext"]


def data_filters(seen: Seen) -> st.SearchStrategy[dict[str, Any]]:
    return value_filters(
        DATA_FIELDS,
        seen.scalars,
        seen.needles,
        seen.elements,
        DATA_OPERATORS,
        time_field="data.signup",
        number_field="data.score",
        text_field="data.note",
        array_field="data.tags",
        edges=seen.edges,
    )


OTHER_TEXTS = UNICODE + STRINGS + TEXTS
BOUNDS = NUMBERS + AMOUNT_NUMBERS
SCALAR_ITEMS = [v for v in ARRAY_ITEMS if not isinstance(v, (list, dict))]
WHERE_VALUES = [v for v in AMOUNT_NUMBERS + CURRENCIES + SKUS if v is not None]
WHERE_NEEDLES = ["eu", "EU", "R", "Us", "ab-", "AB", "-1", "_9", "xy", "%", "STR", "bul"]


def where_filters(seen: Seen) -> st.SearchStrategy[dict[str, Any]]:
    return value_filters(
        EVENT_DATA_FIELDS,
        seen.event_scalars,
        seen.event_needles,
        seen.event_elements,
        VALUE_OPERATORS,
        time_field="data.at",
        number_field="data.amount",
        text_field="data.currency",
        array_field="data.tags",
        local=WHERE_VALUES,
        local_needles=WHERE_NEEDLES,
        lean=3,
    )


AGGREGATE_VALUES: list[int | float] = [0, 1, 10, 40.5, 50, 60, 100, 150, -5, 0.3, 1e16]
COUNT_VALUES: list[int | float] = [0, 1, 1, 2, 2, 3, 4, 2.0]


@st.composite
def event_filters(draw: st.DrawFn, seen: Seen) -> dict[str, Any]:
    # Mostly the events that most contacts have, several of, with data.
    field_name = draw(
        st.one_of(
            pick(DATA_EVENT_FIELDS),
            pick(DATA_EVENT_FIELDS),
            pick(EVENT_FIELDS),
        )
    )
    op = draw(
        st.sampled_from(
            [
                "triggered",
                "notTriggered",
                "triggeredWithin",
                "triggeredOlderThan",
                "notTriggeredWithin",
                "triggered",  # the operators that take count and aggregate: twice
                "triggeredWithin",
            ]
        )
    )
    if op in ("triggered", "notTriggered"):
        out: dict[str, Any] = {"field": field_name, "operator": op}
    else:
        out = draw(windowed(field_name, op, seen.edges.get("event", ())))
    if draw(st.integers(0, 2)) == 0:
        out["where"] = [draw(where_filters(seen))]
        if draw(st.integers(0, 3)) == 0:
            out["where"].append(draw(where_filters(seen)))
    if op in ("triggered", "triggeredWithin"):
        if draw(st.integers(0, 2)) == 0:
            out["count"] = {
                "operator": draw(pick(COMPARISONS)),
                "value": draw(pick(COUNT_VALUES)),
            }
        if draw(st.booleans()):
            name = draw(pick(AGGREGATE_FIELDS))
            function = draw(pick(AGGREGATES))
            out["aggregate"] = {
                "function": function,
                "field": name,
                "operator": draw(pick(COMPARISONS)),
                "value": draw(
                    _either(
                        _aimed(seen, out, name, function),
                        _either(
                            seen.aggregates.get((name, function), ()),
                            pick(AGGREGATE_VALUES),
                        ),
                        lean=2,
                    )
                ),
            }
    return out


def _aimed(seen: Seen, f: dict[str, Any], name: str, function: str) -> list[int | float]:
    """What `function` of `name` gives for each contact over the occurrences event filter
    `f` (its names, window and `where`) considers: comparison values on the edge.

    The reference tells which occurrences count (each alone against `f` without its count);
    this only picks values, it decides no expected result. Averages as in _exact_average."""
    alone = {k: v for k, v in f.items() if k != "count"}
    path = name[5:].split(".")
    out: set[int | float] = set()
    for person in seen.people:
        numbers = [
            _json_decimal(node)
            for e in seen.events
            if e.contact_id == person.id
            and isinstance(node := lookup(e.data, path), (int, float))
            and not isinstance(node, bool)
            and evaluate(
                {"logic": "AND", "groups": [{"filters": [alone]}]}, person, [e], seen.now, {}
            )
        ]
        if not numbers:
            continue
        with localcontext(Context(prec=100)):
            total = sum(numbers, Decimal(0))
        if function == "sum":
            out.add(_number(total))
        elif function == "min":
            out.add(_number(min(numbers)))
        elif function == "max":
            out.add(_number(max(numbers)))
        elif (average := _exact_average(numbers)) is not None:
            out.add(average)
    return sorted(out, key=repr)


@st.composite
def segment_filters(draw: st.DrawFn, ids: tuple[uuid.UUID, ...]) -> dict[str, Any]:
    return {
        "field": f"segment.{draw(st.sampled_from(ids))}",
        "operator": draw(st.sampled_from(["memberOfSegment", "notMemberOfSegment"])),
    }


@st.composite
def filters(draw: st.DrawFn, segment_ids: tuple[uuid.UUID, ...], seen: Seen) -> dict[str, Any]:
    kinds = [
        "email",
        "subscribed",
        "time",
        "time",
        "data",
        "data",
        "data",
        "data",
        "event",
        "event",
        "event",
    ] + ["segment"] * bool(segment_ids)
    kind = draw(st.sampled_from(kinds))
    if kind == "email":
        return draw(email_filters(seen))
    if kind == "subscribed":
        return {
            "field": "subscribed",
            "operator": draw(st.sampled_from(["equals", "notEquals"])),
            "value": draw(st.booleans()),
        }
    if kind == "time":
        return draw(time_filters(seen))
    if kind == "data":
        return draw(data_filters(seen))
    if kind == "event":
        return draw(event_filters(seen))
    return draw(segment_filters(segment_ids))


@st.composite
def conditions(
    draw: st.DrawFn,
    segment_ids: tuple[uuid.UUID, ...] = (),
    seen: Seen = Seen(),
    depth: int = 1,
    max_depth: int = 4,
) -> dict[str, Any]:
    groups = []
    for _ in range(draw(st.integers(1, 3 if depth == 1 else 2))):
        group: dict[str, Any] = {}
        nested = depth < max_depth and draw(st.integers(0, 2)) == 0
        found: list[dict[str, Any]] = draw(
            st.lists(filters(segment_ids, seen), min_size=0 if nested else 1, max_size=3)
        )
        keep_empty = draw(st.booleans())  # an empty list, or no "filters" key at all
        if found or keep_empty:
            group["filters"] = found
        if nested:
            group["conditions"] = draw(conditions(segment_ids, seen, depth + 1, max_depth))
        groups.append(group)
    return {"logic": draw(st.sampled_from(["AND", "OR"])), "groups": groups}


def _size(condition: dict[str, Any]) -> int:
    """Filters toward the limit of 200: each `where` filter counts too."""
    return sum(1 + len(f.get("where") or []) for f in _filters_of(condition))


@st.composite
def worlds(draw: st.DrawFn) -> World:
    now = draw(st.sampled_from(NOWS))
    people = draw(contacts(now))
    events = draw(events_for(people, now))
    seen = Seen.of(people, events, now)
    world = World(
        now=now,
        contacts=people,
        events=events,
        static_members=frozenset(c.id for c in people if draw(st.booleans())),
        other_members=frozenset(c.id for c in people if draw(st.booleans())),
        # The DYNAMIC helper may itself use the STATIC one (a chain of references).
        dynamic_condition=draw(conditions((STATIC_ID,), seen, max_depth=2)),
    )
    world.conditions = draw(
        st.lists(conditions((STATIC_ID, DYNAMIC_ID, OTHER_STATIC_ID), seen), min_size=1, max_size=3)
    )
    assume(all(_size(c) <= 200 for c in [world.dynamic_condition, *world.conditions]))
    return world


# --- the property -------------------------------------------------------------------------


@dataclass
class Stats:
    examples: int = 0
    conditions: int = 0
    non_trivial: int = 0  # selected some but not all contacts
    contacts: int = 0
    events: int = 0
    seconds_in_check: float = 0.0
    filters: int = 0
    # (field kind, operator) -> filters of that kind that matched some but not all contacts;
    # an event filter's operator is followed by the clauses it carries (+where, +count, ...).
    discriminating: dict[tuple[str, str], int] = field(default_factory=dict)
    nows: dict[str, int] = field(default_factory=dict)  # examples by their now


STATS = Stats()


def _kind(field_name: str) -> str:
    if field_name in ("email", "subscribed"):
        return field_name
    if field_name in ("createdAt", "updatedAt"):
        return "time"
    prefix = field_name.split(".", 1)[0]
    return prefix if prefix in ("data", "segment") else "event"


def _label(f: dict[str, Any]) -> str:
    """The operator of a filter, with the clauses of an event filter."""
    clauses = [f"+{k}" for k in ("where", "count", "aggregate") if k in f]
    if "aggregate" in f:
        clauses[-1] += f"({f['aggregate']['function']})"
    return str(f["operator"]) + "".join(clauses)


def _filters_of(condition: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for group in condition["groups"]:
        out += group.get("filters") or []
        if group.get("conditions") is not None:
            out += _filters_of(group["conditions"])
    return out


def _store(session: Session, world: World) -> uuid.UUID:
    project_id = session.execute(
        text("INSERT INTO projects (name) VALUES ('filter-properties') RETURNING id")
    ).scalar_one()
    session.execute(
        text(
            "INSERT INTO contacts (project_id, id, email, subscribed, data, created_at, "
            "updated_at) VALUES (:p, :id, :email, :subscribed, CAST(:data AS jsonb), "
            ":created_at, :updated_at)"
        ),
        [
            {
                "p": project_id,
                "id": c.id,
                "email": c.email,
                "subscribed": c.subscribed,
                "data": json.dumps(c.data),
                "created_at": c.created_at,
                "updated_at": c.updated_at,
            }
            for c in world.contacts
        ],
    )
    if world.events:
        session.execute(
            text(
                "INSERT INTO events (project_id, contact_id, name, occurred_at, data) "
                "VALUES (:p, :contact, :name, :at, CAST(:data AS jsonb))"
            ),
            [
                {
                    "p": project_id,
                    "contact": e.contact_id,
                    "name": e.name,
                    "at": e.occurred_at,
                    "data": json.dumps(e.data),
                }
                for e in world.events
            ],
        )
    session.execute(
        text(
            "INSERT INTO segments (project_id, id, name, type, condition) VALUES "
            "(:p, :static, 'static helper', 'STATIC', NULL), "
            "(:p, :other, 'other static helper', 'STATIC', NULL), "
            "(:p, :dynamic, 'dynamic helper', 'DYNAMIC', CAST(:condition AS jsonb))"
        ),
        {
            "p": project_id,
            "static": STATIC_ID,
            "other": OTHER_STATIC_ID,
            "dynamic": DYNAMIC_ID,
            "condition": json.dumps(world.dynamic_condition),
        },
    )
    members = [(STATIC_ID, m) for m in sorted(world.static_members)]
    members += [(OTHER_STATIC_ID, m) for m in sorted(world.other_members)]
    if members:
        session.execute(
            text(
                "INSERT INTO static_members (project_id, segment_id, contact_id) "
                "VALUES (:p, :s, :c)"
            ),
            [{"p": project_id, "s": s, "c": m} for s, m in members],
        )
    return uuid.UUID(str(project_id))


def _explain(
    world: World, condition: dict[str, Any], sql: set[uuid.UUID], ref: set[uuid.UUID]
) -> str:
    lines = [
        f"now: {world.now.isoformat()}",
        f"condition: {json.dumps(condition, ensure_ascii=False)}",
        f"dynamic helper: {json.dumps(world.dynamic_condition, ensure_ascii=False)}",
    ]
    for c in world.contacts:
        if (c.id in sql) != (c.id in ref):
            evs = [
                (e.name, e.occurred_at.isoformat(), json.dumps(e.data, ensure_ascii=False))
                for e in world.events
                if e.contact_id == c.id
            ]
            lines.append(
                f"  {c.id.int}: sql={c.id in sql} reference={c.id in ref} email={c.email} "
                f"subscribed={c.subscribed} created={c.created_at.isoformat()} "
                f"updated={c.updated_at.isoformat()} "
                f"static={c.id in world.static_members}/{c.id in world.other_members} "
                f"data={json.dumps(c.data, ensure_ascii=False)} events={evs}"
            )
    return "\n".join(lines)


def check_world(session: Session, world: World) -> None:
    started = time.monotonic()
    project_id = _store(session, world)

    def compare(raw: dict[str, Any]) -> set[uuid.UUID]:
        condition = parse_condition(raw)
        assert parse_condition(condition.to_json()) == condition
        members = member_ids(session, project_id, condition, now=world.now)
        sql = set(session.execute(members).scalars())
        ref = {
            person.id
            for person in world.contacts
            if evaluate(raw, person, world.events, world.now, world.segments)
        }
        assert sql == ref, _explain(world, raw, sql, ref)
        # The count statement (by subtraction where it can) answers the same.
        counted = session.execute(member_count_statement(session, project_id, condition, world.now))
        assert counted.scalar_one() == len(ref), raw
        return ref

    for raw in [world.dynamic_condition, *world.conditions]:
        # Each filter alone first, so a disagreement names its filter, and none is masked
        # by the logic around it; then the whole tree.
        for f in _filters_of(raw):
            ref = compare({"logic": "AND", "groups": [{"filters": [f]}]})
            STATS.filters += 1
            if 0 < len(ref) < len(world.contacts):
                key = (_kind(f["field"]), _label(f))
                STATS.discriminating[key] = STATS.discriminating.get(key, 0) + 1
        ref = compare(raw)
        STATS.conditions += 1
        STATS.non_trivial += 0 < len(ref) < len(world.contacts)
    STATS.examples += 1
    STATS.nows[world.now.isoformat()] = STATS.nows.get(world.now.isoformat(), 0) + 1
    STATS.contacts += len(world.contacts)
    STATS.events += len(world.events)
    STATS.seconds_in_check += time.monotonic() - started


def test_sql_agrees_with_reference(
    sessions: sessionmaker[Session], capsys: pytest.CaptureFixture[str]
) -> None:
    started = time.monotonic()

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        print_blob=True,
        phases=list(Phase) if SHRINK else [p for p in Phase if p is not Phase.shrink],
        suppress_health_check=[
            HealthCheck.function_scoped_fixture,
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
        ],
    )
    @given(world=worlds())
    def run(world: World) -> None:
        with sessions() as session:
            try:
                check_world(session, world)
            finally:
                session.rollback()

    run()
    elapsed = time.monotonic() - started
    with capsys.disabled():
        print(
            f"\n[filter properties] {STATS.examples} examples, {STATS.conditions} conditions "
            f"({STATS.non_trivial} selecting some but not all contacts), {STATS.contacts} "
            f"contacts, {STATS.events} events in {elapsed:.1f}s "
            f"({STATS.seconds_in_check:.1f}s storing and checking); {STATS.filters} filters "
            "checked alone; filters that matched some but not all contacts, by field kind and "
            "operator:"
        )
        for (kind, op), count in sorted(STATS.discriminating.items()):
            print(f"    {kind:10} {op:44} {count}")
        print(f"    examples by now: {STATS.nows}")
    assert STATS.examples > 0
    if STATS.conditions >= 100:
        assert STATS.non_trivial > STATS.conditions // 10, "conditions rarely discriminate"


def test_reference_sanity() -> None:
    """The evaluator itself, on hand-checked cases (so a bug there is not mirrored)."""
    person = RefContact(
        uuid.UUID(int=1),
        "ann@x.com",
        True,
        {
            "plan": "Straße",
            "age": 5,
            "flag": True,
            "when": "2025-06-08T12:00:00Z",
            "day": "2025-06-15",
            "tags": ["vip"],
            "address": {"city": "İzmir"},
            "gone": None,
        },
        NOW - timedelta(days=7),
        NOW,
    )
    events = [RefEvent(person.id, "email.open", NOW - timedelta(days=3))]

    def ok(f: dict[str, Any]) -> bool:
        return evaluate({"logic": "AND", "groups": [{"filters": [f]}]}, person, events, NOW, {})

    assert ok({"field": "data.plan", "operator": "contains", "value": "STRASSE"}) is False
    assert ok({"field": "data.plan", "operator": "contains", "value": "STRAßE"}) is True
    assert ok({"field": "data.address.city", "operator": "contains", "value": "izm"}) is True
    assert ok({"field": "data.age", "operator": "equals", "value": 5.0}) is True
    assert ok({"field": "data.age", "operator": "equals", "value": "5"}) is False
    assert ok({"field": "data.flag", "operator": "equals", "value": 1}) is False
    assert ok({"field": "data.tags.0", "operator": "exists"}) is False
    assert ok({"field": "data.gone", "operator": "notExists"}) is True
    assert ok({"field": "data.gone", "operator": "notEquals", "value": 1}) is False
    assert ok({"field": "data.when", "operator": "within", "value": 7, "unit": "days"}) is True
    assert ok({"field": "data.when", "operator": "olderThan", "value": 7, "unit": "days"}) is False
    assert ok({"field": "data.day", "operator": "greaterThan", "value": "2025-06-14T23:59Z"})
    assert ok({"field": "createdAt", "operator": "within", "value": 7, "unit": "days"}) is True
    assert ok({"field": "createdAt", "operator": "equals", "value": "2025-06-08"}) is True
    assert ok({"field": "createdAt", "operator": "greaterThan", "value": "2025-06-08"}) is False
    assert ok({"field": "createdAt", "operator": "lessThanOrEqual", "value": "2025-06-08"})
    ms = (NOW - timedelta(days=7) - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(milliseconds=1)
    assert ok({"field": "createdAt", "operator": "equals", "value": ms}) is True
    assert (
        ok({"field": "email.opened", "operator": "triggeredWithin", "value": 3, "unit": "days"})
        is True
    )
    assert (
        ok({"field": "email.opened", "operator": "triggeredOlderThan", "value": 2, "unit": "days"})
        is True
    )
    assert (
        ok({"field": "email.opened", "operator": "triggeredOlderThan", "value": 3, "unit": "days"})
        is False
    )
    assert ok({"field": "email", "operator": "equals", "value": "ANN@X.COM"}) is True
