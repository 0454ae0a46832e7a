"""The check of tests/statement_scope.py, which the session runs over every statement the
service issued (conftest.py), and the recording that feeds it."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from sqlalchemy import select, text

from segments_service import auth, tables
from segments_service.database import STATEMENT_LOG, make_engine, make_sessionmaker
from tests import statement_scope
from tests.statement_scope import ALLOWED, check, normalize, unscoped_tables


@pytest.mark.parametrize(
    ("statement", "unscoped"),
    [
        (
            "SELECT contacts.id FROM contacts WHERE contacts.project_id = %(p)s::UUID"
            " AND contacts.id = %(id)s::UUID",
            [],
        ),
        ("SELECT contacts.id FROM contacts WHERE contacts.email = %(email)s", ["contacts"]),
        # Named in the select list only: it spans projects.
        (
            "SELECT DISTINCT segments.project_id FROM segments WHERE segments.time_dependent",
            ["segments"],
        ),
        # Each table its own: the join's second table is not scoped by the first's filter.
        (
            "SELECT events.name FROM contacts JOIN events ON events.contact_id = contacts.id"
            " WHERE contacts.project_id = %(p)s",
            ["events"],
        ),
        (
            "SELECT segments.id FROM segments JOIN segment_references"
            " ON segment_references.project_id = segments.project_id"
            " WHERE segment_references.project_id = %(p)s",
            [],
        ),
        ("SELECT w.id FROM webhooks w WHERE w.project_id = ANY(%(ps)s::UUID[])", []),
        ("SELECT w.id FROM webhooks AS w WHERE w.project_id IN (%(p)s)", []),
        ("SELECT w.id FROM webhooks w WHERE webhooks.project_id = %(p)s", ["webhooks"]),
        ("SELECT w.id FROM webhooks w WHERE w.project_id <> %(p)s", ["webhooks"]),
        ("SELECT count(*) FROM (SELECT 1 FROM contacts WHERE project_id = %(p)s) small", []),
        (
            "SELECT 1 FROM contacts WHERE project_id = %(p)s AND id IN"
            " (SELECT contact_id FROM events WHERE name = %(n)s)",
            ["contacts", "events"],
        ),
        (
            "INSERT INTO events (project_id, contact_id, name) VALUES (%(p)s, %(c)s, %(n)s)",
            [],
        ),
        ("INSERT INTO events (contact_id, name) VALUES (%(c)s, %(n)s)", ["events"]),
        (
            "UPDATE contacts AS c SET data = r.patch FROM jsonb_to_recordset(%(rows)s) AS r"
            " WHERE c.project_id = %(p)s AND c.email = r.email",
            [],
        ),
        (
            "DELETE FROM segment_members WHERE segment_members.segment_id = %(s)s",
            ["segment_members"],
        ),
        ("ANALYZE segment_members", ["segment_members"]),
        # What only looks like a table: a qualified column, a label, a parameter, a literal.
        (
            "SELECT x.events, 1 AS events, %(segments)s, 'contacts' FROM"
            " generate_series(1, 2) AS x",
            [],
        ),
    ],
)
def test_unscoped_tables(statement: str, unscoped: list[str]) -> None:
    assert unscoped_tables(statement) == unscoped


def test_the_allowed_statements_are_exact_and_give_their_reason() -> None:
    for statement, reason in ALLOWED.items():
        assert statement == normalize(statement)
        assert reason.strip()
        assert unscoped_tables(statement), f"scoped, needs no listing: {statement}"
        assert check([statement]) == []
        # One more condition is another statement: not allowed by the listing.
        assert [v.statement for v in check([statement + " AND true"])] == [statement + " AND true"]


def test_check_reports_each_statement_once_with_its_tables() -> None:
    statement = "SELECT 1 FROM contacts JOIN events ON events.project_id = contacts.project_id"
    violations = check([statement, statement.replace(" ", "  ")])
    assert violations == [statement_scope.Violation(statement, ("contacts", "events"))]


def test_the_service_statements_are_recorded_and_the_tests_own_are_not(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = tmp_path / "statements.jsonl"
    monkeypatch.setenv(STATEMENT_LOG, str(log))
    engine = make_engine(database_url, pool_size=1)
    try:
        sessions = make_sessionmaker(engine)
        project_id = uuid.uuid4()
        with sessions.begin() as session:
            for _ in range(3):
                auth.list_keys(session, project_id)  # the service's code
            session.execute(select(tables.contacts.c.id).limit(1))  # the test's own
            session.execute(text("SELECT count(*) FROM events"))
    finally:
        engine.dispose()
    recorded = statement_scope.read_log(log)
    assert len(log.read_text().splitlines()) == len(recorded)  # each statement once
    assert [s for s in recorded if "api_keys" in s] == [
        next(s for s in recorded if s.startswith("SELECT api_keys.id"))
    ]
    assert not [s for s in recorded if "contacts" in s or "events" in s]
