"""Webhooks and their deliveries: an outbox per webhook, filled from the membership feed.

The feed (events.feed_seq, migration 0003) is already written in the transaction that
changes a membership: it is the durable log. `webhooks.fanned_seq` is how far a webhook's
worker has copied it into `webhook_deliveries`, one row per (webhook, event) with the exact
body POSTed on every attempt; a webhook's PENDING rows are delivered in feed order, the
oldest first. `pending` and `due_at` (when the oldest PENDING row's next attempt is due)
let the workers find webhooks with work without reading the deliveries. A deleted
webhook keeps its row (deleted_at) until a worker has removed its deliveries in slices.

The secret is kept as created, since signing needs it; no API returns it after creation.

Revision ID: 0016
Revises: 0015
"""

from alembic import op

revision = "0016"
down_revision = "0015"

UPGRADE = """
CREATE TABLE webhooks (
    project_id uuid NOT NULL,
    id uuid NOT NULL DEFAULT gen_random_uuid(),
    url text NOT NULL,
    segment_ids uuid[],
    secret text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    deleted_at timestamptz,
    fanned_seq bigint NOT NULL,
    pending integer NOT NULL DEFAULT 0,
    due_at timestamptz,
    PRIMARY KEY (project_id, id)
);
CREATE INDEX webhooks_listing ON webhooks (project_id, created_at DESC, id)
    WHERE deleted_at IS NULL;

CREATE TABLE webhook_deliveries (
    project_id uuid NOT NULL,
    webhook_id uuid NOT NULL,
    feed_seq bigint NOT NULL,
    event_id text NOT NULL,
    type text NOT NULL,
    body text NOT NULL,
    occurred_at timestamptz NOT NULL,
    status text NOT NULL DEFAULT 'PENDING'
        CHECK (status IN ('PENDING', 'DELIVERED', 'FAILED')),
    attempts integer NOT NULL DEFAULT 0,
    last_error text,
    next_attempt_at timestamptz,
    finished_at timestamptz,
    PRIMARY KEY (project_id, webhook_id, feed_seq)
);
CREATE INDEX webhook_deliveries_pending ON webhook_deliveries (project_id, webhook_id, feed_seq)
    WHERE status = 'PENDING';
CREATE INDEX webhook_deliveries_finished ON webhook_deliveries (finished_at)
    WHERE status <> 'PENDING';
"""

DOWNGRADE = """
DROP TABLE webhook_deliveries;
DROP TABLE webhooks;
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
