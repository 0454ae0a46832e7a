"""Migrations with data to carry: 0004 (events lose their foreign key to contacts, and get it
back on downgrade) and 0006 (event_stats filled from the events there are)."""

from __future__ import annotations

import uuid

import pytest
from alembic import command
from sqlalchemy import Connection, create_engine, pool, text
from sqlalchemy.exc import IntegrityError

from segments_service.database import alembic_config
from tests.test_event_stats import recomputed, stats


def project_with_contact(conn: Connection) -> tuple[uuid.UUID, uuid.UUID]:
    project = conn.execute(
        text("INSERT INTO projects (name) VALUES ('p') RETURNING id")
    ).scalar_one()
    contact = conn.execute(
        text("INSERT INTO contacts (project_id, email) VALUES (:p, 'a@x.com') RETURNING id"),
        {"p": project},
    ).scalar_one()
    return project, contact


def test_events_foreign_key_goes_and_comes_back(empty_database_url: str) -> None:
    cfg = alembic_config(empty_database_url)
    command.upgrade(cfg, "0004")
    engine = create_engine(empty_database_url, poolclass=pool.NullPool)
    try:
        with engine.begin() as conn:
            project, kept = project_with_contact(conn)
            # Without the key, an event of no contact is storable (writers prevent it).
            for contact in (kept, uuid.uuid4()):
                conn.execute(
                    text("INSERT INTO events (project_id, contact_id, name) VALUES (:p, :c, 'x')"),
                    {"p": project, "c": contact},
                )
        command.downgrade(cfg, "0003")
        with engine.begin() as conn:
            # The orphan went; the contact's event stayed.
            rows = conn.execute(text("SELECT contact_id FROM events")).scalars().all()
            assert rows == [kept]
        with pytest.raises(IntegrityError), engine.begin() as conn:
            conn.execute(
                text("INSERT INTO events (project_id, contact_id, name) VALUES (:p, :c, 'x')"),
                {"p": project, "c": uuid.uuid4()},
            )
        command.upgrade(cfg, "head")
    finally:
        engine.dispose()


def test_migration_fills_the_table_and_gives_back_the_name_index(
    empty_database_url: str,
) -> None:
    cfg = alembic_config(empty_database_url)
    command.upgrade(cfg, "0005")
    engine = create_engine(empty_database_url, poolclass=pool.NullPool)
    try:
        with engine.begin() as conn:
            project, contact = project_with_contact(conn)
            for name, days in (("login", 5), ("login", 1), ("purchase", 9)):
                conn.execute(
                    text(
                        "INSERT INTO events (project_id, contact_id, name, occurred_at) "
                        "VALUES (:p, :c, :n, now() - make_interval(days => :d))"
                    ),
                    {"p": project, "c": contact, "n": name, "d": days},
                )
        command.upgrade(cfg, "0006")
        with engine.begin() as conn:
            stored = stats(conn, project)
            assert stored == recomputed(conn, project)
            assert [name for name, _, _ in stored] == ["login", "purchase"]
            conn.execute(text("TRUNCATE events"))
            assert stats(conn, project) == []
        command.downgrade(cfg, "0005")
        with engine.begin() as conn:
            assert conn.execute(text("SELECT to_regclass('event_stats')")).scalar() is None
            assert conn.execute(text("SELECT to_regclass('events_by_name')")).scalar()
        command.upgrade(cfg, "head")
    finally:
        engine.dispose()
