"""SQLAlchemy Core view of the schema (the migrations in migrations/ create it)."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    LargeBinary,
    MetaData,
    Table,
    Text,
    Uuid,
    func,
)
from sqlalchemy.dialects.postgresql import JSONB

metadata = MetaData()


def _ts(name: str, *, nullable: bool = False) -> Column[object]:
    return Column(name, DateTime(timezone=True), nullable=nullable)


projects = Table(
    "projects",
    metadata,
    Column("id", Uuid, primary_key=True, server_default=func.gen_random_uuid()),
    Column("name", Text, nullable=False),
    _ts("created_at"),
)

api_keys = Table(
    "api_keys",
    metadata,
    Column("id", Uuid, primary_key=True, server_default=func.gen_random_uuid()),
    Column("project_id", Uuid, nullable=False),
    Column("kind", Text, nullable=False),
    Column("key_hash", LargeBinary, nullable=False),
    Column("key_prefix", Text, nullable=False),
    _ts("created_at"),
    _ts("revoked_at", nullable=True),
)

contacts = Table(
    "contacts",
    metadata,
    Column("project_id", Uuid, primary_key=True),
    Column("id", Uuid, primary_key=True, server_default=func.gen_random_uuid()),
    Column("email", Text, nullable=False),
    Column("subscribed", Boolean, nullable=False),
    Column("data", JSONB, nullable=False),
    _ts("created_at"),
    _ts("updated_at"),
)

events = Table(
    "events",
    metadata,
    Column("project_id", Uuid, primary_key=True),
    Column("id", BigInteger, primary_key=True),
    Column("contact_id", Uuid, nullable=False),
    Column("name", Text, nullable=False),
    Column("data", JSONB, nullable=False),
    Column("occurred_at", DateTime(timezone=True), primary_key=True),
    _ts("created_at"),
    Column("feed_seq", BigInteger),  # position in the project's entry/exit feed
)

segments = Table(
    "segments",
    metadata,
    Column("project_id", Uuid, primary_key=True),
    Column("id", Uuid, primary_key=True, server_default=func.gen_random_uuid()),
    Column("name", Text, nullable=False),
    Column("description", Text),
    Column("type", Text, nullable=False),
    Column("condition", JSONB(none_as_null=True)),
    Column("track_membership", Boolean, nullable=False),
    _ts("created_at"),
    _ts("updated_at"),
    Column("member_count", BigInteger, nullable=False),
    Column("time_dependent", Boolean, nullable=False),
)

segment_references = Table(
    "segment_references",
    metadata,
    Column("project_id", Uuid, primary_key=True),
    Column("segment_id", Uuid, primary_key=True),
    Column("referenced_id", Uuid, primary_key=True),
)

static_members = Table(
    "static_members",
    metadata,
    Column("project_id", Uuid, primary_key=True),
    Column("segment_id", Uuid, primary_key=True),
    Column("contact_id", Uuid, primary_key=True),
    _ts("added_at"),
)


segment_members = Table(
    "segment_members",
    metadata,
    Column("project_id", Uuid, primary_key=True),
    Column("segment_id", Uuid, primary_key=True),
    Column("contact_id", Uuid, primary_key=True),
    _ts("entered_at"),
)

feed_positions = Table(
    "feed_positions",
    metadata,
    Column("project_id", Uuid, primary_key=True),
    Column("last_seq", BigInteger, nullable=False),
)
