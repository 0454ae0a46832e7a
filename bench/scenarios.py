"""The fixed benchmark scenarios: a filter condition each, and the best plain SQL we could
write by hand for the same question over the service's schema.

The hand-written SQL is what a developer who knows the schema and its indexes would write
for a one-off count: it may use any table and index, and shortcuts the compiler cannot
take in general (e.g. counting distinct event contacts without touching `contacts`, which
is correct because every event row references a contact of its project). Each must give
exactly the compiled condition's answer on the benchmark data; the bench asserts it.

Bind parameters: `:p` (project id) and `:now` (the evaluation instant, also passed to the
compiler so windows agree). Conditions may name other scenarios' segments as
`segment.{ref:<scenario>}`; the bench substitutes the created segment's id.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from bench import load
from segments import F, any_of

# segments_timestamp()'s shape test, inlined for hand-written SQL.
TS_SHAPE = (
    r"^\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])([T ]([01]\d|2[0-3]):[0-5]\d"
    r"(:[0-5]\d(\.\d{1,6})?)?(Z|z|[+-](0\d|1[0-5])(:?[0-5]\d)?)?)?$"
)


@dataclass(frozen=True)
class Scenario:
    name: str
    family: str
    description: str
    condition: dict[str, Any]
    hand_sql: str
    references: tuple[str, ...] = field(default=())
    # "reference": the reference's filter language; "extended": the language beyond it
    # (counts, event properties, aggregates, value operators, withinNext).
    language: str = "reference"

    def resolved(self, ids: dict[str, str]) -> dict[str, Any]:
        """The condition with `{ref:<scenario>}` replaced by segment ids."""

        def walk(node: Any) -> Any:
            if isinstance(node, dict):
                return {k: walk(v) for k, v in node.items()}
            if isinstance(node, list):
                return [walk(v) for v in node]
            if isinstance(node, str):
                return re.sub(r"\{ref:([a-z0-9_]+)\}", lambda m: ids[m.group(1)], node)
            return node

        resolved: dict[str, Any] = walk(self.condition)
        return resolved

    def filter_count(self) -> int:
        def count(cond: dict[str, Any]) -> int:
            total = 0
            for group in cond["groups"]:
                total += len(group.get("filters", []))
                if "conditions" in group:
                    total += count(group["conditions"])
            return total

        return count(self.condition)


NOW = "CAST(:now AS timestamptz)"


def _since(days: int) -> str:
    return f"({NOW} - interval '{days} days')"


def _utc_day(instant: str) -> str:
    """The UTC date of `instant` as `YYYY-MM-DD`, computed once per statement."""
    return f"(SELECT to_char({instant} AT TIME ZONE 'UTC', 'YYYY-MM-DD'))"


def _names(names: tuple[str, ...], alias: str = "") -> str:
    column = f"{alias}name"
    if len(names) == 1:
        return f"{column} = '{names[0]}'"
    return f"{column} IN (" + ", ".join(f"'{n}'" for n in names) + ")"


# Distinct contacts with at least one matching event (index-only scan of events_by_name).
def _event_contacts(names: tuple[str, ...], days: int | None = None) -> str:
    window = f" AND occurred_at >= {_since(days)}" if days is not None else ""
    return f"SELECT contact_id FROM events WHERE project_id = :p AND {_names(names)}{window}"


def _has_event(names: tuple[str, ...], days: int | None = None, alias: str = "c") -> str:
    window = f" AND e.occurred_at >= {_since(days)}" if days is not None else ""
    return (
        f"EXISTS (SELECT 1 FROM events e WHERE e.project_id = :p AND e.contact_id = {alias}.id"
        f" AND {_names(names, 'e.')}{window})"
    )


def _number(path: str) -> str:
    """A JSON number at `path` as numeric, NULL for any other type (never a cast error)."""
    return f"CASE WHEN jsonb_typeof(data {path}) = 'number' THEN (data {path})::numeric END"


OPENED = ("email.opened", "email.open")
CLICKED = ("email.clicked", "email.click")

PRO_OR_ENTERPRISE = (F.data("plan") == "pro") | (F.data("plan") == "enterprise")

PRO_RECENT_BUYERS = (F.event("purchase").triggered_within(90, "days") & PRO_OR_ENTERPRISE).to_dict()

TWENTY = (
    F.subscribed.equals(True)
    & F.email.not_contains("test")
    & (F.data("plan") != "free")
    & (F.data("age") >= 21)
    & (F.data("age") < 70)
    & (F.data("score") > 5)
    & (F.data("country") != "JP")
    & F.created_at.older_than(7, "days")
    & F.data("lastPurchaseAt").exists()
    & F.data("phone").not_exists()
    & (F.data("company", "industry") != "government")
    & F.event("login").triggered()
    & F.event("account_deleted").not_triggered()
    & F.email_activity("complained").not_triggered()
    & F.email_activity("bounced").not_triggered_within(90, "days")
    & F.event("refund").not_triggered_within(30, "days")
    & any_of(
        F.event("purchase").triggered_within(60, "days"),
        F.event("add_to_cart").triggered_within(14, "days"),
        F.email_activity("clicked").triggered_within(30, "days")
        & F.email_activity("opened").triggered_within(7, "days"),
    )
).to_dict()

REFERENCE_SCENARIOS: tuple[Scenario, ...] = (
    Scenario(
        "data_equals",
        "data equality",
        'data.plan equals "pro"',
        (F.data("plan") == "pro").to_dict(),
        # Scalar containment is type-exact, and the GIN index (jsonb_path_ops) serves it.
        """SELECT count(*) FROM contacts
           WHERE project_id = :p AND data @> '{"plan": "pro"}'""",
    ),
    Scenario(
        "data_range",
        "data range",
        "30 <= data.age < 40 (numbers only; string ages never match)",
        ((F.data("age") >= 30) & (F.data("age") < 40)).to_dict(),
        # A strict jsonpath comparison is false for strings, arrays and missing keys, as the
        # typing rules want, and beat CASE ... ::numeric by ~25% on this data.
        """SELECT count(*) FROM contacts
           WHERE project_id = :p AND data @@ 'strict $.age >= 30 && $.age < 40'""",
    ),
    Scenario(
        "data_nested_range",
        "data range (nested object)",
        "data.company.size > 500",
        (F.data("company", "size") > 500).to_dict(),
        f"""SELECT count(*) FROM contacts
            WHERE project_id = :p AND {_number("-> 'company' -> 'size'")} > 500""",
    ),
    Scenario(
        "data_timestamp_within",
        "data timestamp window",
        "data.lastPurchaseAt within 30 days",
        F.data("lastPurchaseAt").within(30, "days").to_dict(),
        # Same rule as segments_timestamp(): a string of timestamp shape that parses; the
        # range test reads it once (BETWEEN would evaluate the CASE twice). The text's
        # leading date, two days beyond the window either side (offsets reach 15:59),
        # rules out most strings before any parse.
        f"""SELECT count(*) FROM contacts
            WHERE project_id = :p
              AND data ->> 'lastPurchaseAt' COLLATE "C" >= {_utc_day(_since(32))}
              AND data ->> 'lastPurchaseAt' COLLATE "C" < {_utc_day(f"({NOW} + interval '2 days')")}
              AND CASE WHEN jsonb_typeof(data -> 'lastPurchaseAt') = 'string'
                        AND data ->> 'lastPurchaseAt' ~ '{TS_SHAPE}'
                        AND pg_input_is_valid(data ->> 'lastPurchaseAt', 'timestamptz')
                   THEN (data ->> 'lastPurchaseAt')::timestamptz END
                  <@ tstzrange({_since(30)}, {NOW}, '[]')""",
    ),
    Scenario(
        "email_contains",
        "email contains",
        'email contains "gmail"',
        F.email.contains("gmail").to_dict(),
        # Emails are stored lower-cased; strpos() beat LIKE '%gmail%' by ~25%.
        """SELECT count(*) FROM contacts WHERE project_id = :p AND strpos(email, 'gmail') > 0""",
    ),
    Scenario(
        "nested_or_and",
        "nested OR/AND",
        "(plan pro OR enterprise) AND (country US OR DE) AND subscribed",
        # JSON around built parts: the second group's empty `filters`, which the results
        # record as written, is a shape the builder never writes (it leaves the key out).
        {
            "logic": "AND",
            "groups": [
                {
                    "filters": [F.subscribed.equals(True).filter_dict()],
                    "conditions": PRO_OR_ENTERPRISE.to_dict(),
                },
                {
                    "filters": [],
                    "conditions": (
                        (F.data("country") == "US") | (F.data("country") == "DE")
                    ).to_dict(),
                },
            ],
        },
        """SELECT count(*) FROM contacts
           WHERE project_id = :p AND subscribed
             AND data -> 'plan' IN ('"pro"', '"enterprise"')
             AND data -> 'country' IN ('"US"', '"DE"')""",
    ),
    Scenario(
        "triggered_within",
        "triggeredWithin",
        "event.purchase triggeredWithin 30 days",
        F.event("purchase").triggered_within(30, "days").to_dict(),
        f"SELECT count(DISTINCT contact_id) FROM ({_event_contacts(('purchase',), 30)}) t",
    ),
    Scenario(
        "triggered_older_than",
        "triggeredOlderThan",
        "event.login triggeredOlderThan 90 days (latest login before the window)",
        F.event("login").triggered_older_than(90, "days").to_dict(),
        f"""SELECT count(*) FROM (
                SELECT contact_id FROM events WHERE project_id = :p AND name = 'login'
                GROUP BY contact_id HAVING max(occurred_at) < {_since(90)}) t""",
    ),
    Scenario(
        "not_triggered",
        "notTriggered",
        "event.purchase notTriggered",
        F.event("purchase").not_triggered().to_dict(),
        f"""SELECT (SELECT count(*) FROM contacts WHERE project_id = :p)
                 - (SELECT count(DISTINCT contact_id) FROM ({_event_contacts(("purchase",))}) t)""",
    ),
    Scenario(
        "not_triggered_within",
        "notTriggeredWithin",
        "event.login notTriggeredWithin 30 days",
        F.event("login").not_triggered_within(30, "days").to_dict(),
        f"""SELECT (SELECT count(*) FROM contacts WHERE project_id = :p)
                 - (SELECT count(DISTINCT contact_id)
                    FROM ({_event_contacts(("login",), 30)}) t)""",
    ),
    Scenario(
        "email_activity",
        "email activity",
        "email.opened triggeredWithin 14 days AND email.clicked notTriggered (aliases included)",
        (
            F.email_activity("opened").triggered_within(14, "days")
            & F.email_activity("clicked").not_triggered()
        ).to_dict(),
        f"""SELECT count(*)
            FROM (SELECT DISTINCT contact_id FROM ({_event_contacts(OPENED, 14)}) o) c
            WHERE NOT EXISTS (SELECT 1 FROM events e WHERE e.project_id = :p
                              AND e.contact_id = c.contact_id
                              AND e.name IN ('email.clicked', 'email.click'))""",
    ),
    Scenario(
        "pro_recent_buyers",
        "data + event",
        "(plan pro OR enterprise) AND event.purchase triggeredWithin 90 days",
        PRO_RECENT_BUYERS,
        f"""SELECT count(*) FROM contacts c
            WHERE c.project_id = :p AND c.data -> 'plan' IN ('"pro"', '"enterprise"')
              AND {_has_event(("purchase",), 90)}""",
    ),
    Scenario(
        "segment_reference",
        "segment reference",
        "memberOfSegment(pro_recent_buyers) AND subscribed AND data.country equals US",
        (
            F.segment("{ref:pro_recent_buyers}").member()
            & F.subscribed.equals(True)
            & (F.data("country") == "US")
        ).to_dict(),
        f"""SELECT count(*) FROM contacts c
            WHERE c.project_id = :p AND c.subscribed AND c.data @> '{{"country": "US"}}'
              AND c.data -> 'plan' IN ('"pro"', '"enterprise"')
              AND {_has_event(("purchase",), 90)}""",
        references=("pro_recent_buyers",),
    ),
    Scenario(
        "twenty_filters",
        "20-filter condition",
        "20 filters: contact fields, data, events, email activity, nested OR",
        TWENTY,
        f"""SELECT count(*) FROM contacts c
            WHERE c.project_id = :p
              AND c.subscribed
              AND strpos(c.email, 'test') = 0
              AND c.data -> 'plan' <> '"free"' AND jsonb_typeof(c.data -> 'plan') <> 'null'
              AND c.data @@ 'strict $.age >= 21 && $.age < 70 && $.score > 5'
              AND c.data -> 'country' <> '"JP"' AND jsonb_typeof(c.data -> 'country') <> 'null'
              AND c.created_at < {_since(7)}
              AND jsonb_typeof(c.data -> 'lastPurchaseAt') <> 'null'
              AND coalesce(jsonb_typeof(c.data -> 'phone'), 'null') = 'null'
              AND c.data -> 'company' -> 'industry' <> '"government"'
              AND jsonb_typeof(c.data -> 'company' -> 'industry') <> 'null'
              AND {_has_event(("login",))}
              AND NOT {_has_event(("account_deleted",))}
              AND NOT {_has_event(("email.complained", "email.complaint"))}
              AND NOT {_has_event(("email.bounced", "email.bounce"), 90)}
              AND NOT {_has_event(("refund",), 30)}
              AND ({_has_event(("purchase",), 60)}
                   OR {_has_event(("add_to_cart",), 14)}
                   OR ({_has_event(CLICKED, 30)} AND {_has_event(OPENED, 7)}))""",
    ),
)


def _timestamp(key: str) -> str:
    """data.<key> as segments_timestamp() reads it: a string of timestamp shape that
    parses, NULL otherwise (never a cast error)."""
    return f"""CASE WHEN jsonb_typeof(data -> '{key}') = 'string'
                   AND data ->> '{key}' ~ '{TS_SHAPE}'
                   AND pg_input_is_valid(data ->> '{key}', 'timestamptz')
              THEN (data ->> '{key}')::timestamptz END"""


# The filter language beyond the reference's, a scenario per capability. The
# JSON is written out: it is the contract's own spelling, which the results record.
EXTENDED_SCENARIOS: tuple[Scenario, ...] = (
    Scenario(
        "count_in_window",
        "count in a window",
        "event.page_view triggeredWithin 3 months (calendar, UTC), count >= 3",
        {
            "logic": "AND",
            "groups": [
                {
                    "filters": [
                        {
                            "field": "event.page_view",
                            "operator": "triggeredWithin",
                            "value": 3,
                            "unit": "months",
                            "count": {"operator": "greaterThanOrEqual", "value": 3},
                        }
                    ]
                }
            ],
        },
        # The window's page views (an index-only scan of events_by_name), grouped. The
        # bench's connections are in UTC, where PostgreSQL's month arithmetic is the
        # contract's: the same day of the month, or its last day.
        f"""SELECT count(*) FROM (
                SELECT contact_id FROM events
                WHERE project_id = :p AND name = 'page_view'
                  AND occurred_at >= ({NOW} - interval '3 months')
                GROUP BY contact_id HAVING count(*) >= 3) t""",
        language="extended",
    ),
    Scenario(
        "event_where",
        "event property (where)",
        "event.purchase triggeredWithin 30 days where data.amount > 50 (numbers only)",
        {
            "logic": "AND",
            "groups": [
                {
                    "filters": [
                        {
                            "field": "event.purchase",
                            "operator": "triggeredWithin",
                            "value": 30,
                            "unit": "days",
                            "where": [
                                {"field": "data.amount", "operator": "greaterThan", "value": 50}
                            ],
                        }
                    ]
                }
            ],
        },
        # The window's purchases by events_by_name, each row's data read from the heap; a
        # strict jsonpath comparison is TRUE for numbers only (as data_range).
        f"""SELECT count(DISTINCT contact_id) FROM events
            WHERE project_id = :p AND name = 'purchase' AND occurred_at >= {_since(30)}
              AND data @@ 'strict $.amount > 50'""",
        language="extended",
    ),
    Scenario(
        "event_aggregate",
        "event aggregate",
        "event.purchase triggeredWithin 30 days, sum of data.amount >= 100 (numbers only)",
        {
            "logic": "AND",
            "groups": [
                {
                    "filters": [
                        {
                            "field": "event.purchase",
                            "operator": "triggeredWithin",
                            "value": 30,
                            "unit": "days",
                            "aggregate": {
                                "function": "sum",
                                "field": "data.amount",
                                "operator": "greaterThanOrEqual",
                                "value": 100,
                            },
                        }
                    ]
                }
            ],
        },
        # Exact numeric sums (amounts have cents); a contact whose amounts in the window
        # are all strings sums to NULL and does not match. FILTER beat a CASE by ~5%.
        f"""SELECT count(*) FROM (
                SELECT contact_id FROM events
                WHERE project_id = :p AND name = 'purchase' AND occurred_at >= {_since(30)}
                GROUP BY contact_id
                HAVING sum((data -> 'amount')::numeric)
                           FILTER (WHERE jsonb_typeof(data -> 'amount') = 'number') >= 100) t""",
        language="extended",
    ),
    Scenario(
        "data_in",
        "in",
        'data.plan in ["pro", "enterprise"]',
        {
            "logic": "AND",
            "groups": [
                {
                    "filters": [
                        {"field": "data.plan", "operator": "in", "value": ["pro", "enterprise"]}
                    ]
                }
            ],
        },
        # A containment per value, OR-ed in a bitmap of the GIN index: 1.8x faster than
        # data -> 'plan' IN (...) over every contact, at a fifth of them.
        """SELECT count(*) FROM contacts
           WHERE project_id = :p
             AND (data @> '{"plan": "pro"}' OR data @> '{"plan": "enterprise"}')""",
        language="extended",
    ),
    Scenario(
        "data_between",
        "between",
        "data.age between 18 and 30 (numbers only; string ages never match)",
        {
            "logic": "AND",
            "groups": [
                {"filters": [{"field": "data.age", "operator": "between", "value": [18, 30]}]}
            ],
        },
        """SELECT count(*) FROM contacts
           WHERE project_id = :p AND data @@ 'strict $.age >= 18 && $.age <= 30'""",
        language="extended",
    ),
    Scenario(
        "array_contains",
        "arrayContains",
        'data.tags arrayContains "vip" (the bare string "vip" never matches)',
        {
            "logic": "AND",
            "groups": [
                {"filters": [{"field": "data.tags", "operator": "arrayContains", "value": "vip"}]}
            ],
        },
        # Containment of an array element is type-exact and array-only at this level, and
        # the GIN index (jsonb_path_ops) serves it.
        """SELECT count(*) FROM contacts
           WHERE project_id = :p AND data @> '{"tags": ["vip"]}'""",
        language="extended",
    ),
    Scenario(
        "data_within_next",
        "withinNext",
        "data.trialEndsAt withinNext 7 days",
        {
            "logic": "AND",
            "groups": [
                {
                    "filters": [
                        {
                            "field": "data.trialEndsAt",
                            "operator": "withinNext",
                            "value": 7,
                            "unit": "days",
                        }
                    ]
                }
            ],
        },
        # As data_timestamp_within, the window ahead: the text's leading date rules out most
        # strings before any parse.
        f"""SELECT count(*) FROM contacts
            WHERE project_id = :p
              AND data ->> 'trialEndsAt' COLLATE "C" >= {_utc_day(f"({NOW} - interval '2 days')")}
              AND data ->> 'trialEndsAt' COLLATE "C" < {_utc_day(f"({NOW} + interval '9 days')")}
              AND {_timestamp("trialEndsAt")}
                  <@ tstzrange({NOW}, {NOW} + interval '7 days', '[]')""",
        language="extended",
    ),
)

SCENARIOS: tuple[Scenario, ...] = REFERENCE_SCENARIOS + EXTENDED_SCENARIOS
LANGUAGES = ("reference", "extended")


def select_scenarios(wanted: Sequence[str]) -> tuple[Scenario, ...]:
    """The scenarios named (or of the languages named), with those they reference, in
    SCENARIOS order; everything when `wanted` is empty."""
    if not wanted:
        return SCENARIOS
    by_name = {sc.name: sc for sc in SCENARIOS}
    unknown = sorted(set(wanted) - set(by_name) - set(LANGUAGES))
    if unknown:
        raise ValueError(f"unknown scenarios: {', '.join(unknown)}")
    names = {sc.name for sc in SCENARIOS if sc.name in wanted or sc.language in wanted}
    while extra := {ref for name in names for ref in by_name[name].references} - names:
        names |= extra
    return tuple(sc for sc in SCENARIOS if sc.name in names)


# The five tracked segments of the ingestion run (README.md, Membership): their entries and exits are
# what WatchSegmentEvents streams. `recent_buyers` is the one whose entries are timed.
TRACKED: tuple[tuple[str, dict[str, Any]], ...] = (
    ("Bench recent buyers", F.event("purchase").triggered_within(1, "days").to_dict()),
    (
        "Bench pro engaged",
        (
            (F.data("plan") == "pro") & F.email_activity("opened").triggered_within(7, "days")
        ).to_dict(),
    ),
    (
        "Bench cart abandoners",
        (
            F.event("add_to_cart").triggered_within(3, "days")
            & F.event("purchase").not_triggered_within(3, "days")
        ).to_dict(),
    ),
    (
        "Bench lapsed vip",
        (F.data("vip").equals(True) & F.event("login").not_triggered_within(30, "days")).to_dict(),
    ),
    (
        "Bench webinar attendees",
        F.event("webinar_attended").triggered_within(7, "days").to_dict(),
    ),
)


def filler(i: int) -> tuple[str, dict[str, Any]]:
    """Cheap, varied segments that bring a project to 50 for the ListSegments target."""
    countries = ("US", "DE", "GB", "FR", "BR", "IN", "CA", "ES", "NL", "JP", "AU", "MX")
    plans = ("free", "starter", "pro", "enterprise")
    country, plan = countries[i % len(countries)], plans[(i // len(countries)) % len(plans)]
    return (
        f"Filler {i + 1:02d}: {plan} in {country}",
        ((F.data("country") == country) & (F.data("plan") == plan)).to_dict(),
    )


# Everyone: the 1M-member segment the export is measured on.
EVERYONE = ("Bench everyone", F.email.contains("@").to_dict())


# The tracked segments of the ingestion ladder beyond the five above (5, 50 and 200 tracked
# segments): conditions as a real project's mix them, each kind in turn.
LADDER_COUNTRIES = ("US", "DE", "GB", "FR", "BR", "IN", "CA", "ES", "NL", "JP", "AU", "MX")
LADDER_PLANS = ("free", "starter", "pro", "enterprise")
# Names the ingested events carry, the rarer half of them (the popular ones would put a
# third of the contacts in each segment, and a tracked create records an entry per member).
LADDER_EVENTS = load.EVENT_NAMES[8:]
LADDER_DAYS = (1, 3, 7, 14)
LADDER_EMAIL = ("opened", "clicked", "bounced", "delivered")
LADDER_KINDS = (
    "data",
    "event_window",
    "event_count",
    "email_window",
    "reference",
    "event_absent",
    "any_event",
    "data_event",
)


def ladder_segment(i: int, earlier: Sequence[str]) -> tuple[str, str, dict[str, Any]]:
    """The `i`-th segment (from 0) of the ladder beyond the five tracked ones: (name, kind,
    condition). The first seven are the extended language's scenarios; then, in turn: a
    data filter; an ingested name in a window; a count of one in a window; email activity
    in a window (a name the ingested events never carry) with a data filter; membership of
    an earlier ladder segment (`earlier`: their ids) with a data filter; a data filter and
    an ingested name absent from a window; either of two ingested names; a data filter and
    an ingested name in a window."""
    if i < len(EXTENDED_SCENARIOS):
        sc = EXTENDED_SCENARIOS[i]
        return f"Ladder {i + 1:03d}: {sc.name}", "extended", sc.resolved({})
    j = i - len(EXTENDED_SCENARIOS)
    kind = LADDER_KINDS[j % len(LADDER_KINDS)]
    n = j // len(LADDER_KINDS)
    country = LADDER_COUNTRIES[(n + j) % len(LADDER_COUNTRIES)]
    plan = LADDER_PLANS[(n // len(LADDER_COUNTRIES) + j) % len(LADDER_PLANS)]
    name = LADDER_EVENTS[(7 * n + j) % len(LADDER_EVENTS)]
    other = LADDER_EVENTS[(7 * n + j + 11) % len(LADDER_EVENTS)]
    days = LADDER_DAYS[(n + j) % len(LADDER_DAYS)]
    data = (F.data("country") == country) & (F.data("plan") == plan)
    if kind == "data":
        expr = data
    elif kind == "event_window":
        expr = F.event(name).triggered_within(days, "days")
    elif kind == "event_count":
        expr = F.event(name).triggered_within(30, "days", count=F.count >= 2 + n % 3)
    elif kind == "email_window":
        activity = LADDER_EMAIL[n % len(LADDER_EMAIL)]
        expr = F.email_activity(activity).triggered_within(days, "days") & (F.data("plan") == plan)
    elif kind == "reference" and earlier:
        expr = F.segment(earlier[(7 * n) % len(earlier)]).member() & (F.data("country") != country)
    elif kind == "event_absent":
        expr = F.data("vip").equals(True) & F.event(name).not_triggered_within(days, "days")
    elif kind == "any_event":
        expr = any_of(
            F.event(name).triggered_within(days, "days"),
            F.event(other).triggered_within(days, "days"),
        )
    else:
        kind = "data_event"
        expr = (F.data("plan") == plan) & F.event(name).triggered_within(30, "days")
    return f"Ladder {i + 1:03d}: {kind} {n + 1}", kind, expr.to_dict()
