"""SQLAlchemy Core view of the schema (the migrations in migrations/ create it)."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Integer,
    LargeBinary,
    MetaData,
    Table,
    Text,
    Uuid,
    any_,
    func,
    literal,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB

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
    # READY | BUILDING | FAILED, as callers see it; status_reason says why it FAILED.
    Column("status", Text, nullable=False),
    Column("status_reason", Text),
    # What writers do with it: `stored` (evaluate), `building` (note dirty contacts),
    # `none` (nothing: a failed first build); migration 0009.
    Column("membership_state", Text, nullable=False),
    Column("build_generation", BigInteger, nullable=False),
)

# Builds of segments in the background (builds.py; migration 0009).
segment_builds = Table(
    "segment_builds",
    metadata,
    Column("project_id", Uuid, primary_key=True),
    Column("segment_id", Uuid, primary_key=True),
    Column("generation", BigInteger, nullable=False),
    Column("phase", Text, nullable=False),
    Column("cursor", Uuid),
    Column("previous_condition", JSONB(none_as_null=True)),
    Column("enter_all", Boolean, nullable=False),
    # With enter_all: contacts up to this id were entered by an earlier generation.
    Column("entered_to", Uuid),
    Column("failure", Text),
    Column("attempts", Integer, nullable=False),
    Column("moved", BigInteger, nullable=False),
    _ts("queued_at"),
)

segment_build_shadow = Table(
    "segment_build_shadow",
    metadata,
    Column("project_id", Uuid, primary_key=True),
    Column("segment_id", Uuid, primary_key=True),
    Column("contact_id", Uuid, primary_key=True),
)

segment_build_dirty = Table(
    "segment_build_dirty",
    metadata,
    Column("project_id", Uuid, primary_key=True),
    Column("segment_id", Uuid, primary_key=True),
    Column("contact_id", Uuid, primary_key=True),
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
    # The contact's created_at, copied so a segment's members are listed from an index in
    # the contacts' order (migration 0005).
    _ts("contact_created_at"),
)

# When time alone can next change a contact's answer to a data-timestamp window
# (membership/wakeups.py; migration 0013).
contact_wakeups = Table(
    "contact_wakeups",
    metadata,
    Column("project_id", Uuid, primary_key=True),
    Column("contact_id", Uuid, primary_key=True),
    _ts("wake_at"),
)

wakeup_definitions = Table(
    "wakeup_definitions",
    metadata,
    Column("project_id", Uuid, primary_key=True),
    Column("signature", Text, nullable=False),
)

feed_positions = Table(
    "feed_positions",
    metadata,
    Column("project_id", Uuid, primary_key=True),
    Column("last_seq", BigInteger, nullable=False),
)

# Webhooks and their outbox, filled from the feed (webhooks/; migration 0016).
webhooks = Table(
    "webhooks",
    metadata,
    Column("project_id", Uuid, primary_key=True),
    Column("id", Uuid, primary_key=True, server_default=func.gen_random_uuid()),
    Column("url", Text, nullable=False),
    Column("segment_ids", ARRAY(Uuid())),  # NULL: every tracked segment
    Column("secret", Text, nullable=False),
    _ts("created_at"),
    _ts("deleted_at", nullable=True),
    # The feed position up to which the webhook's events are in webhook_deliveries.
    Column("fanned_seq", BigInteger, nullable=False),
    Column("pending", Integer, nullable=False),
    # When the oldest PENDING delivery's next attempt is due; NULL: none pending.
    _ts("due_at", nullable=True),
)

webhook_deliveries = Table(
    "webhook_deliveries",
    metadata,
    Column("project_id", Uuid, primary_key=True),
    Column("webhook_id", Uuid, primary_key=True),
    Column("feed_seq", BigInteger, primary_key=True),
    Column("event_id", Text, nullable=False),
    Column("type", Text, nullable=False),
    Column("body", Text, nullable=False),  # the JSON POSTed, the same on every attempt
    _ts("occurred_at"),
    Column("status", Text, nullable=False),  # PENDING | DELIVERED | FAILED
    Column("attempts", Integer, nullable=False),
    Column("last_error", Text),
    _ts("next_attempt_at", nullable=True),
    _ts("finished_at", nullable=True),
)


UUID_ARRAY = ARRAY(Uuid())


def any_uuid(values: Iterable[uuid.UUID]) -> Any:
    """`= ANY(:array)`: one array parameter instead of one parameter per value, so a
    thousand ids cost one bind and a small statement to parse and plan."""
    return any_(literal(list(values), UUID_ARRAY))


def any_text(values: Iterable[str]) -> Any:
    """`= ANY(:array)` for text values; see any_uuid."""
    return any_(literal(list(values), ARRAY(Text())))
