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
from dataclasses import dataclass, field
from typing import Any

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


def f(field_: str, operator: str, value: Any = None, unit: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"field": field_, "operator": operator}
    if value is not None:
        out["value"] = value
    if unit is not None:
        out["unit"] = unit
    return out


def all_of(*filters: dict[str, Any], nested: dict[str, Any] | None = None) -> dict[str, Any]:
    group: dict[str, Any] = {"filters": list(filters)}
    if nested is not None:
        group["conditions"] = nested
    return {"logic": "AND", "groups": [group]}


def any_of(*groups: list[dict[str, Any]]) -> dict[str, Any]:
    return {"logic": "OR", "groups": [{"filters": g} for g in groups]}


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

PRO_RECENT_BUYERS = all_of(
    f("event.purchase", "triggeredWithin", 90, "days"),
    nested=any_of(
        [f("data.plan", "equals", "pro")],
        [f("data.plan", "equals", "enterprise")],
    ),
)

TWENTY = all_of(
    f("subscribed", "equals", True),
    f("email", "notContains", "test"),
    f("data.plan", "notEquals", "free"),
    f("data.age", "greaterThanOrEqual", 21),
    f("data.age", "lessThan", 70),
    f("data.score", "greaterThan", 5),
    f("data.country", "notEquals", "JP"),
    f("createdAt", "olderThan", 7, "days"),
    f("data.lastPurchaseAt", "exists"),
    f("data.phone", "notExists"),
    f("data.company.industry", "notEquals", "government"),
    f("event.login", "triggered"),
    f("event.account_deleted", "notTriggered"),
    f("email.complained", "notTriggered"),
    f("email.bounced", "notTriggeredWithin", 90, "days"),
    f("event.refund", "notTriggeredWithin", 30, "days"),
    nested=any_of(
        [f("event.purchase", "triggeredWithin", 60, "days")],
        [f("event.add_to_cart", "triggeredWithin", 14, "days")],
        [
            f("email.clicked", "triggeredWithin", 30, "days"),
            f("email.opened", "triggeredWithin", 7, "days"),
        ],
    ),
)

SCENARIOS: tuple[Scenario, ...] = (
    Scenario(
        "data_equals",
        "data equality",
        'data.plan equals "pro"',
        all_of(f("data.plan", "equals", "pro")),
        # Scalar containment is type-exact, and the GIN index (jsonb_path_ops) serves it.
        """SELECT count(*) FROM contacts
           WHERE project_id = :p AND data @> '{"plan": "pro"}'""",
    ),
    Scenario(
        "data_range",
        "data range",
        "30 <= data.age < 40 (numbers only; string ages never match)",
        all_of(f("data.age", "greaterThanOrEqual", 30), f("data.age", "lessThan", 40)),
        # A strict jsonpath comparison is false for strings, arrays and missing keys, as the
        # typing rules want, and beat CASE ... ::numeric by ~25% on this data.
        """SELECT count(*) FROM contacts
           WHERE project_id = :p AND data @@ 'strict $.age >= 30 && $.age < 40'""",
    ),
    Scenario(
        "data_nested_range",
        "data range (nested object)",
        "data.company.size > 500",
        all_of(f("data.company.size", "greaterThan", 500)),
        f"""SELECT count(*) FROM contacts
            WHERE project_id = :p AND {_number("-> 'company' -> 'size'")} > 500""",
    ),
    Scenario(
        "data_timestamp_within",
        "data timestamp window",
        "data.lastPurchaseAt within 30 days",
        all_of(f("data.lastPurchaseAt", "within", 30, "days")),
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
        all_of(f("email", "contains", "gmail")),
        # Emails are stored lower-cased; strpos() beat LIKE '%gmail%' by ~25%.
        """SELECT count(*) FROM contacts WHERE project_id = :p AND strpos(email, 'gmail') > 0""",
    ),
    Scenario(
        "nested_or_and",
        "nested OR/AND",
        "(plan pro OR enterprise) AND (country US OR DE) AND subscribed",
        {
            "logic": "AND",
            "groups": [
                {
                    "filters": [f("subscribed", "equals", True)],
                    "conditions": any_of(
                        [f("data.plan", "equals", "pro")], [f("data.plan", "equals", "enterprise")]
                    ),
                },
                {
                    "filters": [],
                    "conditions": any_of(
                        [f("data.country", "equals", "US")], [f("data.country", "equals", "DE")]
                    ),
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
        all_of(f("event.purchase", "triggeredWithin", 30, "days")),
        f"SELECT count(DISTINCT contact_id) FROM ({_event_contacts(('purchase',), 30)}) t",
    ),
    Scenario(
        "triggered_older_than",
        "triggeredOlderThan",
        "event.login triggeredOlderThan 90 days (latest login before the window)",
        all_of(f("event.login", "triggeredOlderThan", 90, "days")),
        f"""SELECT count(*) FROM (
                SELECT contact_id FROM events WHERE project_id = :p AND name = 'login'
                GROUP BY contact_id HAVING max(occurred_at) < {_since(90)}) t""",
    ),
    Scenario(
        "not_triggered",
        "notTriggered",
        "event.purchase notTriggered",
        all_of(f("event.purchase", "notTriggered")),
        f"""SELECT (SELECT count(*) FROM contacts WHERE project_id = :p)
                 - (SELECT count(DISTINCT contact_id) FROM ({_event_contacts(("purchase",))}) t)""",
    ),
    Scenario(
        "not_triggered_within",
        "notTriggeredWithin",
        "event.login notTriggeredWithin 30 days",
        all_of(f("event.login", "notTriggeredWithin", 30, "days")),
        f"""SELECT (SELECT count(*) FROM contacts WHERE project_id = :p)
                 - (SELECT count(DISTINCT contact_id)
                    FROM ({_event_contacts(("login",), 30)}) t)""",
    ),
    Scenario(
        "email_activity",
        "email activity",
        "email.opened triggeredWithin 14 days AND email.clicked notTriggered (aliases included)",
        all_of(
            f("email.opened", "triggeredWithin", 14, "days"),
            f("email.clicked", "notTriggered"),
        ),
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
        all_of(
            f("segment.{ref:pro_recent_buyers}", "memberOfSegment"),
            f("subscribed", "equals", True),
            f("data.country", "equals", "US"),
        ),
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

# The five tracked segments of the ingestion run (README.md, Membership): their entries and exits are
# what WatchSegmentEvents streams. `recent_buyers` is the one whose entries are timed.
TRACKED: tuple[tuple[str, dict[str, Any]], ...] = (
    ("Bench recent buyers", all_of(f("event.purchase", "triggeredWithin", 1, "days"))),
    (
        "Bench pro engaged",
        all_of(f("data.plan", "equals", "pro"), f("email.opened", "triggeredWithin", 7, "days")),
    ),
    (
        "Bench cart abandoners",
        all_of(
            f("event.add_to_cart", "triggeredWithin", 3, "days"),
            f("event.purchase", "notTriggeredWithin", 3, "days"),
        ),
    ),
    (
        "Bench lapsed vip",
        all_of(f("data.vip", "equals", True), f("event.login", "notTriggeredWithin", 30, "days")),
    ),
    ("Bench webinar attendees", all_of(f("event.webinar_attended", "triggeredWithin", 7, "days"))),
)


def filler(i: int) -> tuple[str, dict[str, Any]]:
    """Cheap, varied segments that bring a project to 50 for the ListSegments target."""
    countries = ("US", "DE", "GB", "FR", "BR", "IN", "CA", "ES", "NL", "JP", "AU", "MX")
    plans = ("free", "starter", "pro", "enterprise")
    country, plan = countries[i % len(countries)], plans[(i // len(countries)) % len(plans)]
    return (
        f"Filler {i + 1:02d}: {plan} in {country}",
        all_of(f("data.country", "equals", country), f("data.plan", "equals", plan)),
    )


# Everyone: the 1M-member segment the export is measured on.
EVERYONE = ("Bench everyone", all_of(f("email", "contains", "@")))
