"""Filter conditions (README.md, Filters), scenario by scenario through REST: each operator family
selects exactly the expected contacts (memberCount and the listed emails agree), the four
documentation examples of the reference work verbatim, and validation errors name the
offending field by dot path.

Time travel is done in SQL before the segment is created (creating a segment recomputes
its members), so every expectation is about the state the API was asked about."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session, sessionmaker

from segments import Expression, F, all_of, any_of
from segments_service import sweeper
from tests.conditions import cond, flt
from tests.conftest import Project, Rest
from tests.rest_helpers import Api, check_error

# The request examples of the reference API's documentation for POST /segments, verbatim.
REFERENCE_EXAMPLES: dict[str, dict[str, Any]] = {
    "simple": {
        "name": "Premium Users",
        "condition": {
            "logic": "AND",
            "groups": [
                {"filters": [{"field": "data.plan", "operator": "equals", "value": "premium"}]}
            ],
        },
        "trackMembership": True,
    },
    "orLogic": {
        "name": "Premium or new",
        "description": "Targets for the onboarding push",
        "condition": {
            "logic": "OR",
            "groups": [
                {
                    "filters": [
                        {"field": "data.plan", "operator": "equals", "value": "premium"},
                        {"field": "subscribed", "operator": "equals", "value": True},
                    ]
                },
                {
                    "filters": [
                        {"field": "createdAt", "operator": "within", "value": 7, "unit": "days"}
                    ]
                },
            ],
        },
    },
    "eventBased": {
        "name": "Recent purchasers",
        "condition": {
            "logic": "AND",
            "groups": [
                {
                    "filters": [
                        {
                            "field": "purchase",
                            "operator": "triggeredWithin",
                            "value": 30,
                            "unit": "days",
                        }
                    ]
                }
            ],
        },
    },
    "static": {"name": "Beta testers", "type": "STATIC"},
}


@pytest.fixture
def api(rest: Rest, project: Project) -> Api:
    return Api(rest, project)


def iso(dt: datetime) -> str:
    return dt.astimezone(UTC).isoformat().replace("+00:00", "Z")


def ago(**delta: float) -> datetime:
    return datetime.now(UTC) - timedelta(**delta)


def set_column(engine: Engine, project: Project, email: str, column: str, value: Any) -> None:
    assert column in ("created_at", "updated_at", "data")
    cast = "jsonb" if column == "data" else "timestamptz"
    with engine.begin() as conn:
        done = conn.execute(
            text(
                f"UPDATE contacts SET {column} = CAST(:v AS {cast}) "
                "WHERE project_id = :p AND email = :e"
            ),
            {"v": json.dumps(value) if column == "data" else value, "p": project.id, "e": email},
        )
        assert done.rowcount == 1, email


def matches(api: Api, condition: Expression) -> set[str]:
    """Emails selected by the condition (a fresh segment)."""
    return selected(api, condition.to_dict())


def selected(api: Api, condition: dict[str, Any]) -> set[str]:
    """Emails selected by the condition's JSON (a fresh segment)."""
    return api.member_set(api.create_segment("probe", condition)["id"])


def refused(rest: Rest, project: Project, condition: Any, field: str | None) -> dict[str, Any]:
    resp = rest.post("/segments", {"name": "bad", "condition": condition}, key=project.secret_key)
    return check_error(resp, 400, "VALIDATION_ERROR", field)


F0 = "condition.groups.0.filters.0"


# --- email and subscribed -------------------------------------------------------------


def test_email_operators_are_case_insensitive(api: Api) -> None:
    for email in ("ada@example.com", "bob@EXAMPLE.org", "carl@test.io"):
        api.upsert(email)
    assert matches(api, F.email == "ADA@Example.com") == {"ada@example.com"}
    assert matches(api, F.email != "ada@example.COM") == {
        "bob@example.org",
        "carl@test.io",
    }
    assert matches(api, F.email.contains("EXAMPLE")) == {
        "ada@example.com",
        "bob@example.org",
    }
    assert matches(api, F.email.not_contains("Example")) == {"carl@test.io"}
    api.upsert("under_score@x.com")
    assert matches(api, F.email.contains("_")) == {"under_score@x.com"}
    assert matches(api, F.email.contains("%")) == set()


def test_subscribed_takes_booleans_only(rest: Rest, api: Api, project: Project) -> None:
    api.upsert("yes@x.com", subscribed=True)
    api.upsert("no@x.com", subscribed=False)
    api.upsert("default@x.com")
    assert matches(api, F.subscribed.equals(True)) == {"yes@x.com", "default@x.com"}
    assert matches(api, F.subscribed.equals(False)) == {"no@x.com"}
    assert matches(api, F.subscribed.not_equals(True)) == {"no@x.com"}
    for value in ("true", 1, "yes"):
        refused(rest, project, cond(flt("subscribed", "equals", value)), f"{F0}.value")
    refused(rest, project, cond(flt("subscribed", "contains", "t")), f"{F0}.operator")


# --- createdAt / updatedAt ------------------------------------------------------------


def test_created_at_comparisons_and_date_only_equals(
    api: Api, engine: Engine, project: Project
) -> None:
    times = {
        "start@x.com": "2024-03-15T00:00:00Z",
        "end@x.com": "2024-03-15T23:59:59.999999Z",
        "next@x.com": "2024-03-16T00:00:00Z",
        "prev@x.com": "2024-03-14T23:59:59.999999Z",
    }
    for email, at in times.items():
        api.upsert(email)
        set_column(engine, project, email, "created_at", at)

    assert matches(api, F.created_at == "2024-03-15") == {"start@x.com", "end@x.com"}
    assert matches(api, F.created_at != "2024-03-15") == {
        "next@x.com",
        "prev@x.com",
    }
    assert matches(api, F.created_at > "2024-03-15T12:00:00Z") == {
        "end@x.com",
        "next@x.com",
    }
    assert matches(api, F.created_at >= "2024-03-15T00:00:00Z") == {
        "start@x.com",
        "end@x.com",
        "next@x.com",
    }
    assert matches(api, F.created_at < "2024-03-15T00:00:00Z") == {"prev@x.com"}
    assert matches(api, F.created_at <= "2024-03-15T00:00:00Z") == {
        "start@x.com",
        "prev@x.com",
    }
    # Offsets are honoured, and epoch milliseconds are accepted.
    assert matches(api, F.created_at == "2024-03-16T01:00:00+01:00") == {"next@x.com"}
    next_ms = int(datetime(2024, 3, 16, tzinfo=UTC).timestamp() * 1000)
    assert matches(api, F.created_at >= next_ms) == {"next@x.com"}
    assert matches(api, F.created_at > next_ms) == set()


def test_timestamps_round_trip_exactly(
    rest: Rest, api: Api, engine: Engine, project: Project
) -> None:
    for email in ("a@x.com", "b@x.com"):
        api.upsert(email)
    set_column(engine, project, "a@x.com", "created_at", "2024-05-05T05:05:05.123456Z")
    set_column(engine, project, "b@x.com", "created_at", "2024-05-05T05:05:05.123457Z")
    contact = api.upsert("a@x.com")  # read back through the API (updates updatedAt too)
    assert contact["createdAt"] == "2024-05-05T05:05:05.123456Z"
    assert matches(api, F.created_at == contact["createdAt"]) == {"a@x.com"}
    assert matches(api, F.updated_at == contact["updatedAt"]) == {"a@x.com"}
    assert matches(api, F.created_at > contact["createdAt"]) == {"b@x.com"}


def test_created_and_updated_within_and_older_than(
    api: Api, engine: Engine, project: Project
) -> None:
    ages = {"two@x.com": 2, "ten@x.com": 10, "now@x.com": 0}
    for email in ages:
        api.upsert(email)
    for email, days in ages.items():
        if days:
            set_column(engine, project, email, "created_at", iso(ago(days=days)))
    set_column(engine, project, "two@x.com", "updated_at", iso(ago(hours=3)))
    set_column(engine, project, "ten@x.com", "updated_at", iso(ago(days=5)))

    assert matches(api, F.created_at.within(7, "days")) == {"two@x.com", "now@x.com"}
    assert matches(api, F.created_at.older_than(7, "days")) == {"ten@x.com"}
    assert matches(api, F.created_at.within(36, "hours")) == {"now@x.com"}
    assert matches(api, F.created_at.within(30, "minutes")) == {"now@x.com"}
    assert matches(api, F.created_at.older_than(1.5, "days")) == {"two@x.com", "ten@x.com"}
    assert matches(api, F.updated_at.within(4, "hours")) == {"two@x.com", "now@x.com"}
    assert matches(api, F.updated_at.older_than(1, "days")) == {"ten@x.com"}


def test_time_validation(rest: Rest, project: Project) -> None:
    for bad in (
        flt("createdAt", "equals", "yesterday"),
        flt("createdAt", "greaterThan", True),
        flt("updatedAt", "within", "7", "days"),
        flt("createdAt", "within", 0, "days"),
        flt("createdAt", "within", -3, "days"),
    ):
        refused(rest, project, cond(bad), f"{F0}.value")
    refused(rest, project, cond(flt("createdAt", "within", 7)), f"{F0}.unit")
    refused(rest, project, cond(flt("createdAt", "within", 7, "fortnights")), f"{F0}.unit")
    refused(rest, project, cond(flt("createdAt", "exists")), f"{F0}.operator")


# --- data.* ---------------------------------------------------------------------------


def test_data_equals_is_type_exact(api: Api) -> None:
    api.upsert("num@x.com", {"n": 5})
    api.upsert("str@x.com", {"n": "5"})
    api.upsert("true@x.com", {"flag": True})
    api.upsert("strtrue@x.com", {"flag": "true"})
    api.upsert("none@x.com", {})
    api.upsert("nested@x.com", {"address": {"city": "Berlin", "zip": 10115}})
    assert matches(api, F.data("n") == 5) == {"num@x.com"}
    assert matches(api, F.data("n") == 5.0) == {"num@x.com"}
    assert matches(api, F.data("n") == "5") == {"str@x.com"}
    assert matches(api, F.data("flag").equals(True)) == {"true@x.com"}
    assert matches(api, F.data("flag") == "true") == {"strtrue@x.com"}
    assert matches(api, F.data("address.city") == "Berlin") == {"nested@x.com"}
    assert matches(api, F.data("address.zip") == 10115) == {"nested@x.com"}
    # Negations never select contacts lacking the key.
    assert matches(api, F.data("n") != 5) == {"str@x.com"}
    assert matches(api, F.data("flag").not_equals(True)) == {"strtrue@x.com"}
    assert matches(api, F.data("address.city") != "Paris") == {"nested@x.com"}


def test_data_contains(rest: Rest, api: Api, project: Project) -> None:
    api.upsert("a@x.com", {"city": "Berlin"})
    api.upsert("b@x.com", {"city": "WEST BERLINER"})
    api.upsert("c@x.com", {"city": "Paris"})
    api.upsert("d@x.com", {"city": 123})
    api.upsert("e@x.com", {"town": "Berlin"})
    api.upsert("f@x.com", {"city": "100%_real"})
    assert matches(api, F.data("city").contains("berlin")) == {"a@x.com", "b@x.com"}
    assert matches(api, F.data("city").not_contains("berlin")) == {"c@x.com", "f@x.com"}
    # Substrings, not patterns: % and _ are ordinary characters.
    assert matches(api, F.data("city").contains("%_")) == {"f@x.com"}
    assert matches(api, F.data("city").contains("_")) == {"f@x.com"}
    assert matches(api, F.data("city").contains("B%n")) == set()
    refused(rest, project, cond(flt("data.city", "contains", 5)), f"{F0}.value")


def test_negations_do_not_match_missing_keys(api: Api, engine: Engine, project: Project) -> None:
    api.upsert("premium@x.com", {"plan": "premium"})
    api.upsert("free@x.com", {"plan": "free"})
    api.upsert("nokey@x.com", {"other": 1})
    api.upsert("null@x.com")
    set_column(engine, project, "null@x.com", "data", {"plan": None})
    assert matches(api, F.data("plan") != "premium") == {"free@x.com"}
    assert matches(api, F.data("plan").not_contains("prem")) == {"free@x.com"}
    assert matches(api, F.data("plan").not_exists()) == {"nokey@x.com", "null@x.com"}


def test_data_numeric_comparisons(rest: Rest, api: Api, project: Project) -> None:
    scores = {"ten": 10, "five": 5, "seven": 7.5, "string": "10", "bool": True, "neg": -2}
    for name, score in scores.items():
        api.upsert(f"{name}@x.com", {"score": score})
    api.upsert("none@x.com", {})

    def emails(*names: str) -> set[str]:
        return {f"{n}@x.com" for n in names}

    assert matches(api, F.data("score") > 5) == emails("ten", "seven")
    assert matches(api, F.data("score") >= 5) == emails("ten", "seven", "five")
    assert matches(api, F.data("score") < 7.5) == emails("five", "neg")
    assert matches(api, F.data("score") <= 7.5) == emails("five", "seven", "neg")
    assert matches(api, F.data("score") > -2.5) == emails("ten", "five", "seven", "neg")
    for value in (True, "ten"):
        refused(rest, project, cond(flt("data.score", "greaterThan", value)), f"{F0}.value")


def test_data_timestamp_comparisons(api: Api) -> None:
    api.upsert("jan10@x.com", {"at": "2024-01-10T00:00:00Z"})
    api.upsert("jan20@x.com", {"at": "2024-01-20T12:00:00+02:00"})
    api.upsert("jan15@x.com", {"at": "2024-01-15"})
    api.upsert("text@x.com", {"at": "not a date"})
    api.upsert("number@x.com", {"at": 20240115})
    pivot = "2024-01-15T00:00:00Z"
    assert matches(api, F.data("at") > pivot) == {"jan20@x.com"}
    assert matches(api, F.data("at") >= pivot) == {
        "jan20@x.com",
        "jan15@x.com",
    }
    assert matches(api, F.data("at") < pivot) == {"jan10@x.com"}
    assert matches(api, F.data("at") <= "2024-01-20T10:00:00Z") == {
        "jan10@x.com",
        "jan15@x.com",
        "jan20@x.com",
    }


def test_data_within_and_older_than(api: Api) -> None:
    api.upsert("recent@x.com", {"seen": iso(ago(days=2))})
    api.upsert("old@x.com", {"seen": iso(ago(days=30))})
    api.upsert("garbage@x.com", {"seen": "last tuesday"})
    api.upsert("number@x.com", {"seen": 5})
    api.upsert("none@x.com", {})
    api.upsert("future@x.com", {"seen": iso(ago(days=-2))})
    assert matches(api, F.data("seen").within(7, "days")) == {"recent@x.com"}
    assert matches(api, F.data("seen").older_than(7, "days")) == {"old@x.com"}
    assert matches(api, F.data("seen").within(1, "hours")) == set()


def test_exists_and_not_exists(rest: Rest, api: Api, engine: Engine, project: Project) -> None:
    api.upsert("one@x.com", {"k": 1, "p": {"q": 0}})
    api.upsert("empty@x.com", {"k": ""})
    api.upsert("false@x.com", {"k": False})
    api.upsert("nothing@x.com", {})
    api.upsert("other@x.com", {"other": 1, "p": {"r": 1}})
    api.upsert("null@x.com")
    set_column(engine, project, "null@x.com", "data", {"k": None, "p": {"q": None}})
    assert matches(api, F.data("k").exists()) == {"one@x.com", "empty@x.com", "false@x.com"}
    assert matches(api, F.data("k").not_exists()) == {
        "nothing@x.com",
        "other@x.com",
        "null@x.com",
    }
    assert matches(api, F.data("p.q").exists()) == {"one@x.com"}
    refused(rest, project, cond(flt("data.k", "exists", True)), f"{F0}.value")


def test_custom_data_keys_may_contain_any_character(api: Api) -> None:
    keys = ["first name", "it's", 'say "hi"', "x); DROP TABLE contacts; --", "ключ", "$%^&*"]
    api.upsert("odd@x.com", {k: "yes" for k in keys})
    api.upsert("plain@x.com", {"first name": "no"})
    for key in keys:
        assert matches(api, F.data(key) == "yes") == {"odd@x.com"}, key
        assert matches(api, F.data(key).exists()) >= {"odd@x.com"}, key


def test_data_string_value_limit(rest: Rest, api: Api, project: Project) -> None:
    api.upsert("long@x.com", {"bio": "b" * 1000})
    assert matches(api, F.data("bio") == "b" * 1000) == {"long@x.com"}
    refused(rest, project, cond(flt("data.bio", "equals", "b" * 1001)), f"{F0}.value")


# --- events ---------------------------------------------------------------------------


@pytest.fixture
def purchases(api: Api) -> Api:
    """recent: 2 days ago; old: 10 days ago; both: 10 days and 1 day ago; viewer: another
    event only; quiet: no events at all."""
    api.upsert("quiet@x.com")
    api.events(
        [
            {"email": "recent@x.com", "event": "purchase", "occurredAt": iso(ago(days=2))},
            {"email": "old@x.com", "event": "purchase", "occurredAt": iso(ago(days=10))},
            {"email": "both@x.com", "event": "purchase", "occurredAt": iso(ago(days=10))},
            {"email": "both@x.com", "event": "purchase", "occurredAt": iso(ago(days=1))},
            {"email": "viewer@x.com", "event": "view", "occurredAt": iso(ago(hours=1))},
            {"email": "viewer@x.com", "event": "purchases", "occurredAt": iso(ago(hours=1))},
            {"email": "viewer@x.com", "event": "order.completed", "occurredAt": iso(ago(days=3))},
        ]
    )
    return api


def test_event_operators(purchases: Api) -> None:
    api = purchases
    buyers = {"recent@x.com", "old@x.com", "both@x.com"}
    assert matches(api, F.event("purchase").triggered()) == buyers
    # The reference's bare name, a spelling the builder does not write.
    assert selected(api, cond(flt("purchase", "triggered"))) == buyers
    assert matches(api, F.event("purchase").triggered_within(7, "days")) == {
        "recent@x.com",
        "both@x.com",
    }
    assert selected(api, cond(flt("purchase", "triggeredWithin", 36, "hours"))) == {"both@x.com"}
    # Latest occurrence before the window: "both" bought again recently.
    assert matches(api, F.event("purchase").triggered_older_than(7, "days")) == {"old@x.com"}
    assert matches(api, F.event("purchase").not_triggered()) == {"viewer@x.com", "quiet@x.com"}
    assert matches(api, F.event("purchase").not_triggered_within(7, "days")) == {
        "old@x.com",
        "viewer@x.com",
        "quiet@x.com",
    }
    assert matches(api, F.event("view").triggered_within(2, "hours")) == {"viewer@x.com"}
    assert matches(api, F.event("view").triggered_within(30, "minutes")) == set()
    # Event names may contain dots: everything after `event.` is the name.
    assert matches(api, F.event("order.completed").triggered()) == {"viewer@x.com"}
    assert matches(api, F.event("order").triggered()) == set()


def test_event_validation(rest: Rest, project: Project) -> None:
    refused(rest, project, cond(flt("event.purchase", "triggeredWithin", 7)), f"{F0}.unit")
    refused(
        rest, project, cond(flt("event.purchase", "triggeredWithin", -1, "days")), f"{F0}.value"
    )
    refused(
        rest, project, cond(flt("event.purchase", "triggeredWithin", "7", "days")), f"{F0}.value"
    )
    refused(rest, project, cond(flt("event.purchase", "triggered", 1)), f"{F0}.value")
    refused(rest, project, cond(flt("event.purchase", "equals", "x")), f"{F0}.operator")
    # A bare name is an event only for the event operators.
    refused(rest, project, cond(flt("purchase", "equals", "x")), f"{F0}.field")


def test_email_activity_aliases(rest: Rest, api: Api, project: Project) -> None:
    api.upsert("nothing@x.com")
    api.events(
        [
            {"email": "open@x.com", "event": "email.open"},
            {"email": "opened@x.com", "event": "email.opened"},
            {"email": "clicked@x.com", "event": "email.clicked"},
            {"email": "click@x.com", "event": "email.click", "occurredAt": iso(ago(days=10))},
            {"email": "bounce@x.com", "event": "email.bounce"},
            {"email": "complaint@x.com", "event": "email.complaint"},
            {"email": "sent@x.com", "event": "email.sent"},
            {"email": "sent@x.com", "event": "email.delivered"},
        ]
    )
    openers = {"open@x.com", "opened@x.com"}
    assert matches(api, F.email_activity("opened").triggered()) == openers
    assert matches(api, F.email_activity("open").triggered()) == openers
    assert matches(api, F.email_activity("clicked").triggered_within(7, "days")) == {
        "clicked@x.com"
    }
    assert matches(api, F.email_activity("click").triggered()) == {"clicked@x.com", "click@x.com"}
    assert matches(api, F.email_activity("click").triggered_older_than(7, "days")) == {
        "click@x.com"
    }
    assert matches(api, F.email_activity("bounced").triggered()) == {"bounce@x.com"}
    assert matches(api, F.email_activity("complained").triggered()) == {"complaint@x.com"}
    assert matches(api, F.email_activity("complaint").triggered()) == {"complaint@x.com"}
    assert matches(api, F.email_activity("sent").triggered()) == {"sent@x.com"}
    assert matches(api, F.email_activity("delivered").triggered()) == {"sent@x.com"}
    assert matches(api, F.email_activity("open").not_triggered()) == {
        "nothing@x.com",
        "clicked@x.com",
        "click@x.com",
        "bounce@x.com",
        "complaint@x.com",
        "sent@x.com",
    }
    refused(rest, project, cond(flt("email.forwarded", "triggered")), f"{F0}.field")
    refused(rest, project, cond(flt("email.opened", "equals", "x")), f"{F0}.operator")


# --- segment.<id> ---------------------------------------------------------------------


def test_segment_membership(rest: Rest, api: Api, project: Project) -> None:
    api.upsert("a@x.com", {"plan": "premium"})
    api.upsert("b@x.com", {"plan": "premium"})
    api.upsert("c@x.com", {"plan": "free"})
    premium = api.create_segment("Premium", (F.data("plan") == "premium").to_dict())
    listed = api.static_segment("Listed")
    api.add(listed["id"], ["b@x.com", "c@x.com"])
    unlisted = api.create_segment(
        "Premium, not listed",
        (F.segment(premium["id"]).member() & F.segment(listed["id"]).not_member()).to_dict(),
    )
    either = api.create_segment(
        "Premium or listed",
        (F.segment(premium["id"]).member() | F.segment(listed["id"]).member()).to_dict(),
    )
    assert api.member_set(unlisted["id"]) == {"a@x.com"}
    assert api.member_set(either["id"]) == {"a@x.com", "b@x.com", "c@x.com"}

    # Membership of a referenced segment changes with the writes that change it.
    api.add(listed["id"], ["a@x.com"])
    assert api.member_set(unlisted["id"]) == set()
    rest.delete(
        f"/segments/{listed['id']}/members", {"emails": ["b@x.com"]}, key=project.secret_key
    )
    assert api.member_set(unlisted["id"]) == {"b@x.com"}
    api.upsert("d@x.com", {"plan": "premium"})
    assert api.member_set(unlisted["id"]) == {"b@x.com", "d@x.com"}
    # Re-pointing the referenced segment's condition moves the dependents too.
    api.patch_segment(premium["id"], {"condition": (F.data("plan") == "free").to_dict()})
    assert api.member_set(unlisted["id"]) == set()
    assert api.member_set(either["id"]) == {"a@x.com", "c@x.com"}


def test_segment_reference_validation(
    rest: Rest, api: Api, project: Project, other_project: Project
) -> None:
    theirs = Api(rest, other_project).static_segment("Theirs")
    for segment_id in (theirs["id"], "00000000-0000-0000-0000-000000000000"):
        refused(rest, project, F.segment(segment_id).member().to_dict(), f"{F0}.field")
    refused(rest, project, cond(flt("segment.not-a-uuid", "memberOfSegment")), f"{F0}.field")
    mine = api.static_segment("Mine")
    refused(
        rest, project, cond(flt(f"segment.{mine['id']}", "memberOfSegment", True)), f"{F0}.value"
    )
    refused(rest, project, cond(flt(f"segment.{mine['id']}", "equals", "x")), f"{F0}.operator")


def test_segment_cycles_are_refused(rest: Rest, api: Api, project: Project) -> None:
    key = project.secret_key
    a = api.create_segment("A", (F.data("plan") == "premium").to_dict())
    b = api.create_segment("B", F.segment(a["id"]).member().to_dict())
    c = api.create_segment("C", F.segment(b["id"]).not_member().to_dict())

    def points_at(target: dict[str, Any]) -> dict[str, Any]:
        return (F.email.contains("@") | F.segment(target["id"]).member()).to_dict()

    for source, target in ((a, a), (a, b), (a, c), (b, c)):
        resp = rest.patch(f"/segments/{source['id']}", {"condition": points_at(target)}, key=key)
        check_error(resp, 400, "VALIDATION_ERROR", "condition.groups.1.filters.0.field")
        assert api.segment(source["id"])["condition"] == source["condition"]
    # A reference that closes no cycle is fine.
    assert api.patch_segment(c["id"], {"condition": points_at(a)})["condition"] == points_at(a)


# --- nesting --------------------------------------------------------------------------


def test_nested_conditions(api: Api) -> None:
    contacts: dict[str, tuple[dict[str, Any], bool]] = {
        "premium-sub@x.com": ({"plan": "premium"}, True),
        "premium-unsub@x.com": ({"plan": "premium"}, False),
        "de-40@x.com": ({"country": "DE", "age": 40}, True),
        "de-20@x.com": ({"country": "DE", "age": 20}, True),
        "de-20-vip@x.com": ({"country": "DE", "age": 20, "vip": True}, True),
        "fr-40@x.com": ({"country": "FR", "age": 40}, True),
    }
    for email, (data, subscribed) in contacts.items():
        api.upsert(email, data, subscribed=subscribed)
    condition = any_of(
        (F.data("plan") == "premium") & F.subscribed.equals(True),
        (F.data("country") == "DE") & ((F.data("age") > 30) | F.data("vip").exists()),
    ).to_dict()
    seg = api.create_segment("Nested", condition)
    assert seg["condition"] == condition
    assert api.member_set(seg["id"]) == {"premium-sub@x.com", "de-40@x.com", "de-20-vip@x.com"}

    # A group may consist of a nested condition only; AND across groups. (The builder would
    # write the nested one-filter AND as a filter of the group: spelled as JSON.)
    only_nested = {
        "logic": "AND",
        "groups": [
            {"conditions": {"logic": "AND", "groups": [{"filters": [flt("data.age", "exists")]}]}},
            {"filters": [flt("data.age", "lessThan", 30)]},
        ],
    }
    assert selected(api, only_nested) == {"de-20@x.com", "de-20-vip@x.com"}


def nested(depth: int) -> dict[str, Any]:
    """A condition nested `depth` levels deep (1 = no nesting)."""
    node: dict[str, Any] = cond(flt("data.level", "equals", depth))
    for _ in range(depth - 1):
        node = {
            "logic": "AND",
            "groups": [{"filters": [flt("data.level", "exists")], "conditions": node}],
        }
    return node


def test_depth_and_filter_count_limits(rest: Rest, api: Api, project: Project) -> None:
    api.upsert("deep@x.com", {"level": 10})
    assert selected(api, nested(10)) == {"deep@x.com"}
    resp = rest.post(
        "/segments", {"name": "too deep", "condition": nested(11)}, key=project.secret_key
    )
    check_error(resp, 400, "VALIDATION_ERROR", "condition" + ".groups.0.conditions" * 10)
    # Far deeper is still a 400, never a crash.
    resp = rest.post(
        "/segments", {"name": "too deep", "condition": nested(300)}, key=project.secret_key
    )
    check_error(resp, 400, "VALIDATION_ERROR")

    api.upsert("n@x.com", {"n": -1})
    assert matches(api, all_of(*(F.data("n") != i for i in range(200)))) == {"n@x.com"}
    many = [flt("data.n", "notEquals", i) for i in range(200)]
    too_many = {
        "logic": "OR",
        "groups": [
            {"filters": many[:100]},
            {"filters": [*many[100:], flt("email", "contains", "@")]},
        ],
    }
    resp = rest.post(
        "/segments", {"name": "too many", "condition": too_many}, key=project.secret_key
    )
    check_error(resp, 400, "VALIDATION_ERROR", "condition.groups.1.filters.100")
    names = [s["name"] for s in rest.get("/segments", key=project.secret_key).json]
    assert "too deep" not in names and "too many" not in names


# --- validation paths -----------------------------------------------------------------


def test_unknown_operator_names_its_dot_path(rest: Rest, project: Project) -> None:
    condition = {
        "logic": "AND",
        "groups": [
            {"filters": [flt("email", "contains", "@")]},
            {"filters": [flt("data.plan", "isExactly", "premium")]},
        ],
    }
    refused(rest, project, condition, "condition.groups.1.filters.0.operator")


@pytest.mark.parametrize(
    ("condition", "field"),
    [
        (cond(flt("phone", "equals", "1")), f"{F0}.field"),
        (cond(flt("data.", "equals", "1")), f"{F0}.field"),
        (cond(flt("email", "equals")), f"{F0}.value"),
        (cond(flt("email", "equals", 5)), f"{F0}.value"),
        (cond({"field": "data.x", "operator": "equals", "value": {"a": 1}}), f"{F0}.value"),
        (cond({"field": "data.x", "operator": "equals", "value": [1]}), f"{F0}.value"),
        (cond(flt("email", "within", 1, "days")), f"{F0}.operator"),
        (cond(flt("email", "equals", "a", "days")), f"{F0}.unit"),
        (
            {"logic": "XOR", "groups": [{"filters": [flt("email", "contains", "@")]}]},
            "condition.logic",
        ),
        ({"groups": [{"filters": [flt("email", "contains", "@")]}]}, "condition.logic"),
        ({"logic": "AND", "groups": []}, "condition.groups"),
        ({"logic": "AND"}, "condition.groups"),
        ({"logic": "AND", "groups": [{}]}, "condition.groups.0"),
        ({"logic": "AND", "groups": [{"filters": []}]}, "condition.groups.0"),
        (
            {
                "logic": "AND",
                "groups": [
                    {
                        "filters": [flt("email", "contains", "@")],
                        "conditions": {
                            "logic": "OR",
                            "groups": [
                                {
                                    "filters": [
                                        flt("email", "contains", "a"),
                                        flt("email", "olderThan", 1, "days"),
                                    ]
                                }
                            ],
                        },
                    }
                ],
            },
            "condition.groups.0.conditions.groups.0.filters.1.operator",
        ),
    ],
)
def test_validation_errors_name_the_field(
    rest: Rest, project: Project, condition: dict[str, Any], field: str
) -> None:
    refused(rest, project, condition, field)
    assert rest.get("/segments", key=project.secret_key).json == []


def test_validation_through_patch(rest: Rest, api: Api, project: Project) -> None:
    seg = api.create_segment("Keep", F.email.contains("@").to_dict())
    bad = {
        "logic": "AND",
        "groups": [
            {"filters": [flt("email", "contains", "@")]},
            {"filters": [flt("subscribed", "equals", "no")]},
        ],
    }
    resp = rest.patch(f"/segments/{seg['id']}", {"condition": bad}, key=project.secret_key)
    check_error(resp, 400, "VALIDATION_ERROR", "condition.groups.1.filters.0.value")
    assert api.segment(seg["id"]) == seg


@pytest.mark.parametrize("number", [b"NaN", b"Infinity", b"-Infinity", b"1e999"])
def test_non_finite_filter_values(rest: Rest, project: Project, number: bytes) -> None:
    raw = (
        b'{"name": "x", "condition": {"logic": "AND", "groups": [{"filters": '
        b'[{"field": "data.n", "operator": "greaterThan", "value": ' + number + b"}]}]}}"
    )
    check_error(rest.post("/segments", raw=raw, key=project.secret_key), 400, "VALIDATION_ERROR")
    assert rest.get("/segments", key=project.secret_key).json == []


# --- freshness of time-dependent and referencing segments ----------------------------


def test_new_writes_enter_time_and_reference_segments_at_once(api: Api) -> None:
    listed = api.static_segment("Listed")
    recent = api.create_segment("Recent", F.created_at.within(1, "days").to_dict())
    old = api.create_segment("Old", F.created_at.older_than(1, "days").to_dict())
    unlisted = api.create_segment("Unlisted", F.segment(listed["id"]).not_member().to_dict())
    unsubscribed = api.create_segment("Unsubscribed", F.subscribed.equals(False).to_dict())
    api.upsert("a@x.com")
    assert api.members(recent["id"]) == ["a@x.com"]
    assert api.members(old["id"]) == []
    assert api.members(unlisted["id"]) == ["a@x.com"]
    # Contacts created by a members call are evaluated too.
    api.add(listed["id"], ["a@x.com", "new@x.com"], subscribed=False)
    assert api.members(unlisted["id"]) == []
    assert api.members(unsubscribed["id"]) == ["new@x.com"]
    assert api.member_set(recent["id"]) == {"a@x.com", "new@x.com"}


def test_time_passing_is_applied_by_the_sweep(
    api: Api, engine: Engine, sessions: sessionmaker[Session], project: Project
) -> None:
    api.upsert("a@x.com")
    api.events([{"email": "a@x.com", "event": "login"}])
    fresh = api.create_segment("Fresh", F.created_at.within(7, "days").to_dict())
    active = api.create_segment("Active", F.event("login").triggered_within(7, "days").to_dict())
    lapsed = api.create_segment(
        "Lapsed", F.event("login").triggered_older_than(7, "days").to_dict()
    )
    # Segments that only reference a time-dependent one move with it.
    fresh_ref = api.create_segment("Fresh ref", F.segment(fresh["id"]).member().to_dict())
    not_fresh = api.create_segment("Not fresh", F.segment(fresh["id"]).not_member().to_dict())
    assert api.members(fresh_ref["id"]) == ["a@x.com"]
    assert api.members(not_fresh["id"]) == []
    assert api.members(fresh["id"]) == ["a@x.com"]
    assert api.members(active["id"]) == ["a@x.com"]
    # Time passes (behind the service's back), then the sweep catches up.
    set_column(engine, project, "a@x.com", "created_at", iso(ago(days=8)))
    with engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE events SET occurred_at = occurred_at - interval '8 days' "
                "WHERE project_id = :p"
            ),
            {"p": project.id},
        )
    sweeper.sweep_once(engine, sessions)
    assert api.members(fresh["id"]) == []
    assert api.members(active["id"]) == []
    assert api.members(lapsed["id"]) == ["a@x.com"]
    assert api.members(fresh_ref["id"]) == []
    assert api.members(not_fresh["id"]) == ["a@x.com"]


# --- the reference's documentation examples -------------------------------------------


def reference_example(name: str) -> dict[str, Any]:
    return copy.deepcopy(REFERENCE_EXAMPLES[name])


def post_example(rest: Rest, project: Project, name: str) -> dict[str, Any]:
    body = reference_example(name)
    resp = rest.post("/segments", body, key=project.secret_key)
    assert resp.status == 201, resp.raw[:500]
    seg = resp.json
    assert seg["name"] == body["name"]
    assert seg["description"] == body.get("description")
    assert seg["trackMembership"] is body.get("trackMembership", False)
    assert seg["type"] == body.get("type", "DYNAMIC")
    assert seg["condition"] == (None if seg["type"] == "STATIC" else body["condition"])
    assert isinstance(seg, dict)
    return seg


def test_example_simple(rest: Rest, api: Api, project: Project) -> None:
    api.upsert("premium@x.com", {"plan": "premium"})
    api.upsert("free@x.com", {"plan": "free"})
    seg = post_example(rest, project, "simple")
    assert seg["trackMembership"] is True
    assert seg["memberCount"] == 1
    assert api.members(seg["id"]) == ["premium@x.com"]


def test_example_or_logic(rest: Rest, api: Api, engine: Engine, project: Project) -> None:
    api.upsert("premium-old@x.com", {"plan": "premium"})
    api.upsert("premium-unsub-old@x.com", {"plan": "premium"}, subscribed=False)
    api.upsert("free-new@x.com", {"plan": "free"})
    api.upsert("free-old@x.com", {"plan": "free"})
    for email in ("premium-old@x.com", "premium-unsub-old@x.com", "free-old@x.com"):
        set_column(engine, project, email, "created_at", iso(ago(days=30)))
    seg = post_example(rest, project, "orLogic")
    assert seg["description"] == "Targets for the onboarding push"
    assert api.member_set(seg["id"]) == {"premium-old@x.com", "free-new@x.com"}


def test_example_event_based(rest: Rest, api: Api, project: Project) -> None:
    api.upsert("never@x.com")
    api.events(
        [
            {"email": "recent@x.com", "event": "purchase", "occurredAt": iso(ago(days=5))},
            {"email": "lapsed@x.com", "event": "purchase", "occurredAt": iso(ago(days=40))},
        ]
    )
    seg = post_example(rest, project, "eventBased")
    assert api.members(seg["id"]) == ["recent@x.com"]
    # Live: a purchase tracked now enters immediately.
    resp = rest.post(
        "/v1/track", {"event": "purchase", "email": "lapsed@x.com"}, key=project.public_key
    )
    assert resp.status == 200
    assert api.member_set(seg["id"]) == {"recent@x.com", "lapsed@x.com"}


def test_example_static(rest: Rest, api: Api, project: Project) -> None:
    seg = post_example(rest, project, "static")
    assert seg["type"] == "STATIC" and seg["condition"] is None and seg["memberCount"] == 0
    result = api.add(seg["id"], ["tester1@x.com", "tester2@x.com"])
    assert result == {"added": 2, "created": 2, "notFound": []}
    assert api.member_set(seg["id"]) == {"tester1@x.com", "tester2@x.com"}
