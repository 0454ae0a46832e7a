"""A server-wide secret, from which each project's event id key is derived.

`events.id` is one sequence for every project: shown as it is, the gaps between a
project's own ids would count every other project's events. The API shows instead a keyed
permutation of the id (event_ids.py) whose key is derived from this secret and the project
id, so it is the same in every replica and after restarts without a query per request.
The secret is 32 bytes of gen_random_uuid() (122 random bits per UUID) drawn here, in
the database, so it never passes through a migration script or its output.

Revision ID: 0010
Revises: 0009
"""

from alembic import op

revision = "0010"
down_revision = "0009"

UPGRADE = """
CREATE TABLE server_secrets (
    name text PRIMARY KEY,
    secret bytea NOT NULL CHECK (length(secret) >= 32),
    created_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO server_secrets (name, secret)
VALUES ('event_ids', uuid_send(gen_random_uuid()) || uuid_send(gen_random_uuid()));
"""

DOWNGRADE = """
DROP TABLE server_secrets;
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
