"""Per-project feed sequence for entry/exit events, replacing the transaction-id cursor.

A transaction that records entry/exit events takes its positions from the project's row in
feed_positions and holds that row lock until it commits, so positions become visible in
order: a reader that has seen position N has seen every position below it. Unlike a cursor
bounded by the oldest running transaction, a long transaction elsewhere (another project,
another database of the cluster) no longer holds a project's feed back.

Revision ID: 0003
Revises: 0002
"""

from alembic import op

revision = "0003"
down_revision = "0002"

UPGRADE = """
CREATE TABLE feed_positions (
    project_id uuid PRIMARY KEY REFERENCES projects (id) ON DELETE CASCADE,
    last_seq bigint NOT NULL
);
ALTER TABLE events ADD COLUMN feed_seq bigint;
CREATE INDEX events_feed ON events (project_id, feed_seq) WHERE feed_seq IS NOT NULL;
DROP INDEX events_membership_feed;
ALTER TABLE events DROP COLUMN tx;
"""

DOWNGRADE = """
ALTER TABLE events ADD COLUMN tx xid8 NOT NULL DEFAULT pg_current_xact_id();
CREATE INDEX events_membership_feed ON events (project_id, tx, id)
    WHERE name LIKE 'segment.%' AND (name LIKE '%.entry' OR name LIKE '%.exit');
DROP INDEX events_feed;
ALTER TABLE events DROP COLUMN feed_seq;
DROP TABLE feed_positions;
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
