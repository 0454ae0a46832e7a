"""Events keep their contact by the writers' row locks instead of a foreign key.

The foreign key checked every inserted event with its own lookup and KEY SHARE lock of
the contact row: about half the cost of inserting a batch of 1,000 events at a million
contacts. Every writer of events already holds a lock on the contact's row that
conflicts with deleting it (see membership.lock_contacts), and deleting a contact
deletes its events in the same transaction (contacts.delete_contact), so each event
still belongs to an existing contact of its project.

Revision ID: 0004
Revises: 0003
"""

from alembic import op

revision = "0004"
down_revision = "0003"

UPGRADE = """
ALTER TABLE events DROP CONSTRAINT events_project_id_contact_id_fkey;
"""

# Events of contacts deleted since the upgrade (none, if every writer kept the rule) would
# fail the restored constraint: remove them first.
DOWNGRADE = """
DELETE FROM events e
    WHERE NOT EXISTS (
        SELECT 1 FROM contacts c WHERE c.project_id = e.project_id AND c.id = e.contact_id
    );
ALTER TABLE events ADD CONSTRAINT events_project_id_contact_id_fkey
    FOREIGN KEY (project_id, contact_id) REFERENCES contacts (project_id, id) ON DELETE CASCADE;
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
