"""One segment's part of the membership feed, read from an index.

The feed of a tracked segment (GET /segments/{id}/events) and its history (/history) read
the entry/exit events of one segment; those are the project's feed rows whose
data->>'segmentId' names it. Without this index every page scanned the project's whole
feed after the cursor to find one segment's rows.

Revision ID: 0015
Revises: 0014
"""

from alembic import op

revision = "0015"
down_revision = "0014"


def upgrade() -> None:
    op.execute(
        "CREATE INDEX events_segment_feed ON events (project_id, (data ->> 'segmentId'), feed_seq) "
        "WHERE feed_seq IS NOT NULL"
    )


def downgrade() -> None:
    op.execute("DROP INDEX events_segment_feed")
