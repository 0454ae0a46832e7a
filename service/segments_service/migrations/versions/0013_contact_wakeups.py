"""When time alone can next change a contact's answer to a window on a data timestamp.

`contact_wakeups` holds, per contact of a project whose segments have such windows
(within, olderThan, withinNext on data.*), the earliest instant at or after the last
evaluation when one of them turns; the sweeper reads the contacts due (by the index on
wake_at) instead of parsing every contact's timestamps each period. `wakeup_definitions`
records which windows the project's rows were computed for: a change to them makes the
sweeper recompute every contact's row once.

Revision ID: 0013
Revises: 0012
"""

from alembic import op

revision = "0013"
down_revision = "0012"


def upgrade() -> None:
    op.execute(
        """
CREATE TABLE contact_wakeups (
    project_id uuid NOT NULL,
    contact_id uuid NOT NULL,
    wake_at timestamptz NOT NULL,
    PRIMARY KEY (project_id, contact_id)
);
CREATE INDEX contact_wakeups_due ON contact_wakeups (project_id, wake_at);
CREATE TABLE wakeup_definitions (
    project_id uuid PRIMARY KEY,
    signature text NOT NULL
);
"""
    )


def downgrade() -> None:
    op.execute("DROP TABLE wakeup_definitions; DROP TABLE contact_wakeups;")
