"""Segment memberships keep their contact and segment by the writers' locks instead of
foreign keys.

Each key checked every inserted membership with its own lookup and KEY SHARE lock of the
referenced row: creating a segment of a million members spent about 15 s on each of the
two, of 52 s in all. Every writer of `segment_members` already excludes the deletes
those keys guarded against (see membership._apply):

- a contact: writers re-evaluating contacts hold their rows locked (membership.
  lock_contacts), and rebuilds hold the project's membership lock exclusively, which
  deleting a contact takes shared; the contact's memberships are deleted in the same
  transaction as the contact (membership.forget_contact);
- a segment: deleting one takes the project's membership lock exclusively, so no writer
  that loaded its definition is still running, and deletes its memberships in the same
  transaction (segments.delete_segment).

The downgrade removes memberships of contacts or segments that are gone (none, if every
writer kept the rule) and restores both keys.

Revision ID: 0008
Revises: 0007
"""

from alembic import op

revision = "0008"
down_revision = "0007"

UPGRADE = """
ALTER TABLE segment_members DROP CONSTRAINT segment_members_project_id_contact_id_fkey;
ALTER TABLE segment_members DROP CONSTRAINT segment_members_project_id_segment_id_fkey;
"""

DOWNGRADE = """
DELETE FROM segment_members m
    WHERE NOT EXISTS (
        SELECT 1 FROM contacts c WHERE c.project_id = m.project_id AND c.id = m.contact_id
    )
    OR NOT EXISTS (
        SELECT 1 FROM segments s WHERE s.project_id = m.project_id AND s.id = m.segment_id
    );
ALTER TABLE segment_members ADD CONSTRAINT segment_members_project_id_segment_id_fkey
    FOREIGN KEY (project_id, segment_id) REFERENCES segments (project_id, id) ON DELETE CASCADE;
ALTER TABLE segment_members ADD CONSTRAINT segment_members_project_id_contact_id_fkey
    FOREIGN KEY (project_id, contact_id) REFERENCES contacts (project_id, id) ON DELETE CASCADE;
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
