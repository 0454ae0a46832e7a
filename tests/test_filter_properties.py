"""The SQL filter compiler agrees with the reference evaluator (tests/reference.py).

Each example writes a small random project (contacts with odd data, events near window
edges, two STATIC helper segments and a DYNAMIC one that conditions may reference) inside
one transaction, evaluates a few random conditions, and each of their filters alone, both in
PostgreSQL and in Python (tests/reference.py), and rolls everything back.

FILTER_PROPERTY_EXAMPLES sets the number of examples (default 300); run with -s to see
what was covered.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from segments_service.filters import parse_condition
from segments_service.segments import member_count_statement, member_ids
from tests.reference import MISSING, RefContact, RefEvent, RefSegment, evaluate, lookup

EXAMPLES = int(os.environ.get("FILTER_PROPERTY_EXAMPLES", "300"))
# FILTER_PROPERTY_SHRINK=0 reports the first failing example as found (shrinking a world
# costs a query per attempt and may take minutes).
SHRINK = os.environ.get("FILTER_PROPERTY_SHRINK", "1") != "0"

NOW = datetime(2025, 6, 15, 12, 0, tzinfo=UTC)
US = timedelta(microseconds=1)
STATIC_ID = uuid.UUID("00000000-0000-4000-8000-00000000005a")
DYNAMIC_ID = uuid.UUID("00000000-0000-4000-8000-00000000d1a0")
OTHER_STATIC_ID = uuid.UUID("00000000-0000-4000-8000-0000000005b0")

# Instants on and next to the edges of the windows below (N in WINDOW_VALUES x units).
INSTANTS = [
    NOW,
    NOW - US,
    NOW + US,
    NOW + timedelta(minutes=1),
    NOW - timedelta(minutes=1),
    NOW - timedelta(minutes=30),
    NOW - timedelta(minutes=30) - US,
    NOW - timedelta(hours=1),
    NOW - timedelta(hours=1) - US,
    NOW - timedelta(hours=1) + US,
    NOW - timedelta(hours=12),
    NOW - timedelta(days=1),
    NOW - timedelta(days=1) - US,
    NOW - timedelta(days=1) + US,
    NOW - timedelta(hours=36),
    NOW - timedelta(days=7),
    NOW - timedelta(days=7) - US,
    NOW - timedelta(days=7) + US,
    NOW - timedelta(days=30),
    NOW - timedelta(days=90, microseconds=1),
    datetime(2025, 6, 15, tzinfo=UTC),
    datetime(2025, 6, 14, 23, 59, 59, 999999, tzinfo=UTC),
    datetime(2025, 6, 16, tzinfo=UTC),
    datetime(2025, 6, 15, 12, 0, 0, 123000, tzinfo=UTC),
    datetime(2025, 6, 15, 12, 0, 0, 123456, tzinfo=UTC),
    datetime(2000, 1, 1, tzinfo=UTC),
    datetime(1969, 12, 31, 23, 59, 59, 999000, tzinfo=UTC),
    datetime(9999, 12, 31, 23, 59, 59, 999000, tzinfo=UTC),
    datetime(2300, 1, 1, 0, 0, 0, 1000, tzinfo=UTC),
]
WINDOW_VALUES = [1, 7, 30, 90, 0.5, 1.5, 12, 24, 36, 60]
UNITS = ["days", "hours", "minutes"]
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


STORED_STAMPS = sorted({s for m in INSTANTS for s in _spellings(m, stored=True)})
VALUE_STAMPS = sorted({s for m in INSTANTS for s in _spellings(m, stored=False)})


def epoch_millis(moment: datetime) -> int | float:
    micros = (moment - datetime(1970, 1, 1, tzinfo=UTC)) // US
    if micros % 1000 == 0:
        return micros // 1000
    return micros / 1000  # at most three decimals


TIME_VALUES = st.one_of(
    st.sampled_from(VALUE_STAMPS),
    st.sampled_from([epoch_millis(m) for m in INSTANTS]),
    st.sampled_from(sorted({m.date().isoformat() for m in INSTANTS})),  # whole UTC days
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
    st.sampled_from(COMMON),
    st.sampled_from(WORDS),
    st.sampled_from(NUMBERS),
    st.sampled_from(STRINGS + TEXTS),
    st.sampled_from(UNICODE),
    st.sampled_from([True, False, None]),
    st.sampled_from(BAD_STAMPS + ODD_STAMPS),
    st.sampled_from(STORED_STAMPS),
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
tag_lists = st.one_of(json_values, st.lists(json_values, max_size=3))
# Each key leans to the kind of value filters on it look for, and still takes anything.
KEY_VALUES = {
    "plan": st.one_of(st.sampled_from(WORDS), st.sampled_from(COMMON), json_values),
    "note": st.one_of(
        st.sampled_from(WORDS), st.sampled_from(WORDS + UNICODE + TEXTS), json_values
    ),
    "age": st.one_of(st.sampled_from(NUMBERS), st.sampled_from(COMMON), json_values),
    "score": st.one_of(st.sampled_from(NUMBERS), json_values),
    "signup": st.one_of(
        st.sampled_from(STORED_STAMPS), st.sampled_from(ODD_STAMPS + BAD_STAMPS), json_values
    ),
    WEIRD_KEY: st.one_of(st.sampled_from(WORDS), st.sampled_from(COMMON), json_values),
    "address": addresses,
    "tags": tag_lists,
}


@dataclass
class World:
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


LOCALS = ["a", "b", "ann", "bob", "premium", "x.y", "ä", "i\u0307nfo", "straße", "\u03c3"]
DOMAINS = ["x.com", "example.org", "mail.de"]


@st.composite
def contacts(draw: st.DrawFn) -> list[RefContact]:
    out = []
    for i in range(draw(st.integers(10, 30))):
        data = {}
        for key in DATA_KEYS:
            if draw(st.integers(0, 3)):  # a quarter of the keys are missing
                data[key] = draw(KEY_VALUES[key])
        out.append(
            RefContact(
                id=uuid.UUID(int=i + 1),
                email=f"{draw(st.sampled_from(LOCALS))}{i}@{draw(st.sampled_from(DOMAINS))}".lower(),
                subscribed=draw(st.booleans()),
                data=data,
                created_at=draw(st.sampled_from(INSTANTS)),
                updated_at=draw(st.sampled_from(INSTANTS)),
            )
        )
    return out


@st.composite
def events_for(draw: st.DrawFn, people: list[RefContact]) -> list[RefEvent]:
    out = []
    for person in people:
        for _ in range(draw(st.integers(0, 4))):
            out.append(
                RefEvent(
                    person.id, draw(st.sampled_from(EVENT_NAMES)), draw(st.sampled_from(INSTANTS))
                )
            )
    return out


# --- conditions ---------------------------------------------------------------------------

ORDERING = ["greaterThan", "lessThan", "greaterThanOrEqual", "lessThanOrEqual"]


@st.composite
def windowed(draw: st.DrawFn, field_name: str, op: str) -> dict[str, Any]:
    return {
        "field": field_name,
        "operator": op,
        "value": draw(st.sampled_from(WINDOW_VALUES)),
        "unit": draw(st.sampled_from(UNITS)),
    }


@dataclass(frozen=True)
class Seen:
    """Values present in an example's contacts, so that equals / contains often hit."""

    emails: tuple[str, ...] = ()
    scalars: dict[str, tuple[Any, ...]] = field(default_factory=dict)  # by data field
    needles: dict[str, tuple[str, ...]] = field(default_factory=dict)  # by data field

    @staticmethod
    def of(people: list[RefContact]) -> Seen:
        scalars: dict[str, tuple[Any, ...]] = {}
        needles: dict[str, tuple[str, ...]] = {}
        for name in DATA_FIELDS:
            found: dict[str, Any] = {}
            for person in people:
                node = lookup(person.data, name[5:].split("."))
                if node is not MISSING and not isinstance(node, (dict, list, type(None))):
                    found.setdefault(json.dumps(node), node)
            scalars[name] = tuple(found[k] for k in sorted(found))
            needles[name] = tuple(
                sorted(
                    {
                        variant
                        for leaf in found.values()
                        if isinstance(leaf, str)
                        for variant in (
                            leaf,
                            leaf.upper(),
                            leaf[1:4],
                            leaf[:2].swapcase(),
                            leaf[:3].lower(),
                            leaf[-3:].upper(),
                        )
                    }
                )
            )
        emails = {v for p in people for v in (p.email, p.email.upper(), p.email.title())}
        return Seen(tuple(sorted(emails)), scalars, needles)


def _either(seen: tuple[Any, ...], *others: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Half the time a value seen in the example's contacts, else one of `others`."""
    return st.one_of(st.sampled_from(seen), st.one_of(*others)) if seen else st.one_of(*others)


@st.composite
def email_filters(draw: st.DrawFn, seen: Seen) -> dict[str, Any]:
    op = draw(st.sampled_from(["equals", "notEquals", "contains", "notContains"]))
    if op in ("equals", "notEquals"):
        value = draw(
            _either(
                seen.emails,
                st.sampled_from(
                    [
                        "a0@x.com",
                        "A0@X.COM",
                        "b1@example.org",
                        "I\u0307NFO2@MAIL.DE",
                        "nobody@x.com",
                        "premium3@x.com",
                        "Bob4@Example.Org",
                        "",
                    ]
                ),
            )
        )
    else:
        value = draw(
            st.sampled_from(
                [
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
                ]
            )
        )
    return {"field": "email", "operator": op, "value": value}


@st.composite
def time_filters(draw: st.DrawFn) -> dict[str, Any]:
    field_name = draw(st.sampled_from(["createdAt", "updatedAt"]))
    op = draw(st.sampled_from(["equals", "notEquals", *ORDERING, "within", "olderThan"]))
    if op in ("within", "olderThan"):
        return draw(windowed(field_name, op))
    return {"field": field_name, "operator": op, "value": draw(TIME_VALUES)}


@st.composite
def data_filters(draw: st.DrawFn, seen: Seen) -> dict[str, Any]:
    op = draw(
        st.sampled_from(
            [
                "equals",
                "notEquals",
                "contains",
                "notContains",
                "exists",
                "notExists",
                *ORDERING,
                "within",
                "olderThan",
                "contains",
                "notContains",
            ]
        )
    )  # case folding: twice
    # Half the time, windows and comparisons look at the key that mostly holds timestamps,
    # and contains at the key that mostly holds words.
    field_name = draw(st.sampled_from(DATA_FIELDS))
    if op in ("within", "olderThan", *ORDERING) and draw(st.booleans()):
        field_name = "data.signup"
    elif op in ("contains", "notContains") and draw(st.booleans()):
        field_name = "data.note"
    if op in ("exists", "notExists"):
        return {"field": field_name, "operator": op}
    if op in ("within", "olderThan"):
        return draw(windowed(field_name, op))
    if op in ("contains", "notContains"):
        value: Any = draw(
            _either(
                seen.needles.get(field_name, ()),
                st.sampled_from(NEEDLES),
                st.sampled_from(WORDS),
                st.sampled_from(UNICODE + STRINGS + TEXTS),
            )
        )
    elif op in ORDERING:
        value = draw(st.one_of(st.sampled_from(NUMBERS), st.sampled_from(VALUE_STAMPS)))
    else:
        value = draw(
            _either(
                seen.scalars.get(field_name, ()),
                st.sampled_from(COMMON),
                st.sampled_from(WORDS),
                st.sampled_from(NUMBERS),
                st.sampled_from(STRINGS),
                st.sampled_from(UNICODE),
                st.booleans(),
                st.sampled_from(ODD_STAMPS),
                st.sampled_from(STORED_STAMPS),
            )
        )
    return {"field": field_name, "operator": op, "value": value}


@st.composite
def event_filters(draw: st.DrawFn) -> dict[str, Any]:
    field_name = draw(st.sampled_from(EVENT_FIELDS))
    op = draw(
        st.sampled_from(
            [
                "triggered",
                "notTriggered",
                "triggeredWithin",
                "triggeredOlderThan",
                "notTriggeredWithin",
            ]
        )
    )
    if op in ("triggered", "notTriggered"):
        return {"field": field_name, "operator": op}
    return draw(windowed(field_name, op))


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
        return draw(time_filters())
    if kind == "data":
        return draw(data_filters(seen))
    if kind == "event":
        return draw(event_filters())
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


@st.composite
def worlds(draw: st.DrawFn) -> World:
    people = draw(contacts())
    seen = Seen.of(people)
    world = World(
        contacts=people,
        events=draw(events_for(people)),
        static_members=frozenset(c.id for c in people if draw(st.booleans())),
        other_members=frozenset(c.id for c in people if draw(st.booleans())),
        # The DYNAMIC helper may itself use the STATIC one (a chain of references).
        dynamic_condition=draw(conditions((STATIC_ID,), seen, max_depth=2)),
    )
    world.conditions = draw(
        st.lists(conditions((STATIC_ID, DYNAMIC_ID, OTHER_STATIC_ID), seen), min_size=1, max_size=3)
    )
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
    # (field kind, operator) -> filters of that kind that matched some but not all contacts
    discriminating: dict[tuple[str, str], int] = field(default_factory=dict)


STATS = Stats()


def _kind(field_name: str) -> str:
    if field_name in ("email", "subscribed"):
        return field_name
    if field_name in ("createdAt", "updatedAt"):
        return "time"
    prefix = field_name.split(".", 1)[0]
    return prefix if prefix in ("data", "segment") else "event"


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
                "INSERT INTO events (project_id, contact_id, name, occurred_at) "
                "VALUES (:p, :contact, :name, :at)"
            ),
            [
                {"p": project_id, "contact": e.contact_id, "name": e.name, "at": e.occurred_at}
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
        f"condition: {json.dumps(condition, ensure_ascii=False)}",
        f"dynamic helper: {json.dumps(world.dynamic_condition, ensure_ascii=False)}",
    ]
    for c in world.contacts:
        if (c.id in sql) != (c.id in ref):
            evs = [
                (e.name, e.occurred_at.isoformat()) for e in world.events if e.contact_id == c.id
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
        members = member_ids(session, project_id, condition, now=NOW)
        sql = set(session.execute(members).scalars())
        ref = {
            person.id
            for person in world.contacts
            if evaluate(raw, person, world.events, NOW, world.segments)
        }
        assert sql == ref, _explain(world, raw, sql, ref)
        # The count statement (by subtraction where it can) answers the same.
        counted = session.execute(member_count_statement(session, project_id, condition, NOW))
        assert counted.scalar_one() == len(ref), raw
        return ref

    for raw in [world.dynamic_condition, *world.conditions]:
        # Each filter alone first, so a disagreement names its filter, and none is masked
        # by the logic around it; then the whole tree.
        for f in _filters_of(raw):
            ref = compare({"logic": "AND", "groups": [{"filters": [f]}]})
            STATS.filters += 1
            if 0 < len(ref) < len(world.contacts):
                key = (_kind(f["field"]), f["operator"])
                STATS.discriminating[key] = STATS.discriminating.get(key, 0) + 1
        ref = compare(raw)
        STATS.conditions += 1
        STATS.non_trivial += 0 < len(ref) < len(world.contacts)
    STATS.examples += 1
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
            print(f"    {kind:10} {op:22} {count}")
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
