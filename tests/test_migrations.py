"""Migration 0004: events lose their foreign key to contacts, and get it back on downgrade."""

from __future__ import annotations

import uuid

import pytest
from alembic import command
from sqlalchemy import create_engine, pool, text
from sqlalchemy.exc import IntegrityError

from segments_service.database import alembic_config


def test_events_foreign_key_goes_and_comes_back(empty_database_url: str) -> None:
    cfg = alembic_config(empty_database_url)
    command.upgrade(cfg, "0004")
    engine = create_engine(empty_database_url, poolclass=pool.NullPool)
    try:
        with engine.begin() as conn:
            project = conn.execute(
                text("INSERT INTO projects (name) VALUES ('p') RETURNING id")
            ).scalar_one()
            kept = conn.execute(
                text(
                    "INSERT INTO contacts (project_id, email) VALUES (:p, 'a@x.com') RETURNING id"
                ),
                {"p": project},
            ).scalar_one()
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
