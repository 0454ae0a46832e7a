"""Events are indexed by name, then contact: `events_by_name_contact` replaces
`events_by_contact`.

A filter over a project's whole history of one name (triggered, notTriggered,
triggeredOlderThan) needs each contact's events of that name together. Read from
`events_by_name` (time order), they had to be hashed or sorted by contact first: for
triggeredOlderThan, a hash table of every contact who ever logged in (22 MB at a million
contacts), whose cost grew faster than the contacts as it outgrew the CPU caches (count
latency 1.2-2x linear from 100k to 1M). Read from this index, they arrive grouped by
contact and are counted in one pass, with no table at all.

It replaces `events_by_contact` (project_id, contact_id, name, occurred_at DESC) rather
than joining it, so each event still writes three index entries. The probes of a batch's
contacts (`name = ... AND contact_id = ANY(:ids)`) find their entries with both orders
alike. The one question that named no event, deleting a contact's events, lists the
project's event names first (contacts.delete_contact).

Revision ID: 0008
Revises: 0007
"""

from alembic import op

revision = "0008"
down_revision = "0007"

UPGRADE = """
CREATE INDEX events_by_name_contact ON events (project_id, name, contact_id, occurred_at DESC);
DROP INDEX events_by_contact;
"""

DOWNGRADE = """
CREATE INDEX events_by_contact ON events (project_id, contact_id, name, occurred_at DESC);
DROP INDEX events_by_name_contact;
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
