"""Each membership of a dynamic segment carries its contact's created_at, so a page of the
segment's contacts is read from an index in listing order.

A DYNAMIC segment lists its contacts newest first (contacts.created_at DESC, id DESC).
With that order held only by contacts, a page meant joining every member and sorting, or
walking the project's contacts newest first and probing each for membership: the cost grew
with the page number and the segment's size (page 100 of a 23k-member segment took about
half a second at a million contacts). With the order copied into segment_members and
indexed per segment, a page is LIMIT/OFFSET over one index range, then one lookup per
contact returned.

The copy stays exact because a contact's created_at is written once, when the contact is
inserted, and each membership row is inserted after its contact.

Revision ID: 0005
Revises: 0004
"""

from alembic import op

revision = "0005"
down_revision = "0004"

UPGRADE = """
ALTER TABLE segment_members ADD COLUMN contact_created_at timestamptz;
UPDATE segment_members m SET contact_created_at = c.created_at
    FROM contacts c WHERE c.project_id = m.project_id AND c.id = m.contact_id;
ALTER TABLE segment_members ALTER COLUMN contact_created_at SET NOT NULL;
CREATE INDEX segment_members_page ON segment_members
    (project_id, segment_id, contact_created_at DESC, contact_id DESC);
"""

DOWNGRADE = """
DROP INDEX segment_members_page;
ALTER TABLE segment_members DROP COLUMN contact_created_at;
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
