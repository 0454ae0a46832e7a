"""Materialized membership of dynamic segments, maintained counts, and the event cursor.

Revision ID: 0002
Revises: 0001
"""

from alembic import op

revision = "0002"
down_revision = "0001"

UPGRADE = r"""
-- Current members of every DYNAMIC segment, kept in step with each write (and with time
-- by the sweeper), so counts and listings never re-run the condition over all contacts.
CREATE TABLE segment_members (
    project_id uuid NOT NULL,
    segment_id uuid NOT NULL,
    contact_id uuid NOT NULL,
    entered_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (project_id, segment_id, contact_id),
    FOREIGN KEY (project_id, segment_id) REFERENCES segments (project_id, id) ON DELETE CASCADE,
    FOREIGN KEY (project_id, contact_id) REFERENCES contacts (project_id, id) ON DELETE CASCADE
);
CREATE INDEX segment_members_by_contact ON segment_members (project_id, contact_id);

ALTER TABLE segments ADD COLUMN member_count bigint NOT NULL DEFAULT 0;
-- Whether the condition depends on the clock (windows), so the sweeper must revisit it.
ALTER TABLE segments ADD COLUMN time_dependent boolean NOT NULL DEFAULT false;

-- The committing transaction of each event: watchers read in (tx, id) order and only up to
-- the oldest transaction still running, so an event committed late is never skipped.
ALTER TABLE events ADD COLUMN tx xid8 NOT NULL DEFAULT pg_current_xact_id();
CREATE INDEX events_membership_feed ON events (project_id, tx, id)
    WHERE name LIKE 'segment.%' AND (name LIKE '%.entry' OR name LIKE '%.exit');
"""

DOWNGRADE = """
DROP INDEX events_membership_feed;
ALTER TABLE events DROP COLUMN tx;
ALTER TABLE segments DROP COLUMN time_dependent;
ALTER TABLE segments DROP COLUMN member_count;
DROP TABLE segment_members;
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
