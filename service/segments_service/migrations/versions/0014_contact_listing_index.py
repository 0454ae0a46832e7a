"""The contacts listing (GET /contacts) reads email and subscribed from the index it pages.

A page of a project's contacts is a keyset range of `contacts_by_created` (project_id,
created_at DESC, id DESC). Its filters, an email substring and the subscribed flag, were
only in the table: each index entry walked cost a heap visit, in random order, so a
search matching one contact of a million walked the whole project through the heap (6 s
at a million contacts on a cold-ish cache; 4.6 s for `subscribed=false` where 100 of a
million were unsubscribed). With both columns carried in the index (INCLUDE), the walk
is an index-only scan that tests each entry where it stands and visits the heap only for
the page's contacts (0.5 s and 0.3 s for those two; the first page's count the same
way). The keys are unchanged, so every other use of the index (createdAt filters, member
listings of segments being built) reads it as before.

Revision ID: 0014
Revises: 0013
"""

from alembic import op

revision = "0014"
down_revision = "0013"

UPGRADE = """
CREATE INDEX contacts_by_created_listing ON contacts
    (project_id, created_at DESC, id DESC) INCLUDE (email, subscribed);
DROP INDEX contacts_by_created;
ALTER INDEX contacts_by_created_listing RENAME TO contacts_by_created;
"""

DOWNGRADE = """
CREATE INDEX contacts_by_created_keys ON contacts (project_id, created_at DESC, id DESC);
DROP INDEX contacts_by_created;
ALTER INDEX contacts_by_created_keys RENAME TO contacts_by_created;
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
