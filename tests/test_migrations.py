"""Migrations with data to carry: 0004 (events lose their foreign key to contacts, and get it
back on downgrade), 0006 (event_stats filled from the events there are) and 0007 (which
takes it away again, and whose downgrade refills it); 0008 (memberships lose their
foreign keys to contacts and segments, and get them back on downgrade)."""

from __future__ import annotations

import uuid

import pytest
from alembic import command
from sqlalchemy import Connection, create_engine, pool, text
from sqlalchemy.exc import IntegrityError

from segments_service.database import alembic_config


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


STATS = text(
    "SELECT name, contact_id, last_at FROM event_stats WHERE project_id = :p ORDER BY name"
)
LATEST = text(
    "SELECT name, contact_id, max(occurred_at) FROM events WHERE project_id = :p "
    "GROUP BY name, contact_id ORDER BY name"
)


def test_event_stats_come_and_go_with_the_events_there_are(empty_database_url: str) -> None:
    cfg = alembic_config(empty_database_url)
    command.upgrade(cfg, "0005")
    engine = create_engine(empty_database_url, poolclass=pool.NullPool)

    def relation(conn: Connection, name: str) -> object:
        return conn.execute(text("SELECT to_regclass(:n)"), {"n": name}).scalar()

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
            latest = conn.execute(LATEST, {"p": project}).all()
            assert [row[0] for row in latest] == ["login", "purchase"]
            assert conn.execute(STATS, {"p": project}).all() == latest
            assert relation(conn, "events_by_name") is None
        command.upgrade(cfg, "0007")
        with engine.begin() as conn:
            assert relation(conn, "event_stats") is None
            assert relation(conn, "events_by_name") is not None
            # No trigger is left behind: events take inserts and deletes as before 0006.
            conn.execute(
                text(
                    "INSERT INTO events (project_id, contact_id, name, occurred_at) "
                    "VALUES (:p, :c, 'login', now())"
                ),
                {"p": project, "c": contact},
            )
            conn.execute(text("DELETE FROM events WHERE name = 'purchase'"))
        command.downgrade(cfg, "0006")
        with engine.begin() as conn:
            # Refilled from the events as they are now: the latest login, no purchase.
            latest = conn.execute(LATEST, {"p": project}).all()
            assert [row[0] for row in latest] == ["login"]
            assert conn.execute(STATS, {"p": project}).all() == latest
            conn.execute(text("TRUNCATE events"))
            assert conn.execute(STATS, {"p": project}).all() == []
        command.downgrade(cfg, "0005")
        with engine.begin() as conn:
            assert relation(conn, "event_stats") is None
            assert relation(conn, "events_by_name") is not None
        command.upgrade(cfg, "head")
    finally:
        engine.dispose()


MEMBERS = text("SELECT segment_id, contact_id FROM segment_members ORDER BY contact_id")
ADD_MEMBER = text(
    "INSERT INTO segment_members (project_id, segment_id, contact_id, contact_created_at) "
    "VALUES (:p, :s, :c, now())"
)


def test_membership_foreign_keys_go_and_come_back(empty_database_url: str) -> None:
    cfg = alembic_config(empty_database_url)
    command.upgrade(cfg, "0008")
    engine = create_engine(empty_database_url, poolclass=pool.NullPool)
    try:
        with engine.begin() as conn:
            project, contact = project_with_contact(conn)
            segment = conn.execute(
                text(
                    "INSERT INTO segments (project_id, name, type, condition) "
                    "VALUES (:p, 's', 'DYNAMIC', '{}') RETURNING id"
                ),
                {"p": project},
            ).scalar_one()
            # Without the keys, a membership of no contact or no segment is storable
            # (writers prevent it).
            for s, c in ((segment, contact), (segment, uuid.uuid4()), (uuid.uuid4(), contact)):
                conn.execute(ADD_MEMBER, {"p": project, "s": s, "c": c})
            assert len(conn.execute(MEMBERS).all()) == 3
        command.downgrade(cfg, "0007")
        with engine.begin() as conn:
            # The orphans went; the real membership stayed.
            assert conn.execute(MEMBERS).all() == [(segment, contact)]
        for s, c in ((segment, uuid.uuid4()), (uuid.uuid4(), contact)):
            with pytest.raises(IntegrityError), engine.begin() as conn:
                conn.execute(ADD_MEMBER, {"p": project, "s": s, "c": c})
        with engine.begin() as conn:
            # The restored keys cascade as before 0008.
            conn.execute(text("DELETE FROM contacts WHERE id = :c"), {"c": contact})
            assert conn.execute(MEMBERS).all() == []
        command.upgrade(cfg, "head")
    finally:
        engine.dispose()
