"""Each contact's latest occurrence of each event name, kept by triggers on `events`.

Every event filter asks one question per contact and name: did it happen, and when last
(triggered, triggeredWithin, triggeredOlderThan and their negations all follow from the
latest occurrence). Answered from `events`, a project-wide question aggregated every
occurrence: `triggeredOlderThan` grouped all of a name's events by contact in a hash
table, whose time grew faster than the events (10 -> 151 ms from 100k to 1M contacts for
`login`, 1.46x linear) as the table outgrew the processor's cache. `event_stats` holds the
answer, one row per (project, name, contact): a window is one range of
`event_stats_by_last`, a name's contacts one range of the primary key, both already
distinct, and a batch's contacts probe the primary key.

Triggers keep it exact for every writer, in the writer's transaction: after each INSERT
statement on `events`, the inserted rows' latest occurrence per key is merged in (in key
order, so concurrent writers lock shared rows in one order); after DELETE or UPDATE, the
keys touched are recomputed from what `events` holds. TRUNCATE empties it.

`events_by_name` served only the project-wide event questions (and the sweeper's window
edges, which `event_stats_by_last` answers exactly: a contact crosses an edge when its
latest occurrence does), so it goes: every event insert no longer writes it.

Revision ID: 0006
Revises: 0005
"""

from alembic import op

revision = "0006"
down_revision = "0005"

# The latest occurrence of each key in `keys` (a query of project_id, name, contact_id)
# from what `events` holds now: kept where there is one, deleted where none is left.
RECOMPUTE = """
    WITH latest AS (
        SELECT k.project_id, k.name, k.contact_id,
               (SELECT max(e.occurred_at) FROM events e
                WHERE e.project_id = k.project_id AND e.contact_id = k.contact_id
                  AND e.name = k.name) AS at
        FROM ({keys}) k
    ), kept AS (
        INSERT INTO event_stats AS s (project_id, name, contact_id, last_at)
            SELECT project_id, name, contact_id, at FROM latest WHERE at IS NOT NULL
            ORDER BY project_id, name, contact_id
        ON CONFLICT (project_id, name, contact_id) DO UPDATE SET last_at = excluded.last_at
            WHERE s.last_at IS DISTINCT FROM excluded.last_at
    )
    DELETE FROM event_stats s USING latest
        WHERE latest.at IS NULL AND s.project_id = latest.project_id
          AND s.name = latest.name AND s.contact_id = latest.contact_id;"""

UPGRADE = """
CREATE TABLE event_stats (
    project_id uuid NOT NULL,
    name text NOT NULL,
    contact_id uuid NOT NULL,
    last_at timestamptz NOT NULL,
    -- last_at included: a batch's probes with a window read the index alone.
    PRIMARY KEY (project_id, name, contact_id) INCLUDE (last_at)
);

INSERT INTO event_stats (project_id, name, contact_id, last_at)
    SELECT project_id, name, contact_id, max(occurred_at)
    FROM events GROUP BY project_id, name, contact_id
    ORDER BY project_id, name, contact_id;

CREATE INDEX event_stats_by_last ON event_stats (project_id, name, last_at, contact_id);

CREATE FUNCTION event_stats_added() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO event_stats AS s (project_id, name, contact_id, last_at)
        SELECT project_id, name, contact_id, max(occurred_at)
        FROM added GROUP BY project_id, name, contact_id
        ORDER BY project_id, name, contact_id
    ON CONFLICT (project_id, name, contact_id) DO UPDATE SET last_at = excluded.last_at
        WHERE s.last_at < excluded.last_at;
    RETURN NULL;
END $$;

-- After rows went or changed, each key they had holds the latest occurrence that remains,
-- or no row when none does (the two parts touch different keys).
CREATE FUNCTION event_stats_removed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
{recompute_removed}
    RETURN NULL;
END $$;

CREATE FUNCTION event_stats_updated() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
{recompute_updated}
    RETURN NULL;
END $$;

CREATE FUNCTION event_stats_emptied() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    TRUNCATE event_stats;
    RETURN NULL;
END $$;

CREATE TRIGGER event_stats_insert AFTER INSERT ON events
    REFERENCING NEW TABLE AS added FOR EACH STATEMENT EXECUTE FUNCTION event_stats_added();
CREATE TRIGGER event_stats_delete AFTER DELETE ON events
    REFERENCING OLD TABLE AS removed FOR EACH STATEMENT EXECUTE FUNCTION event_stats_removed();
CREATE TRIGGER event_stats_update AFTER UPDATE ON events
    REFERENCING OLD TABLE AS removed NEW TABLE AS added
    FOR EACH STATEMENT EXECUTE FUNCTION event_stats_updated();
CREATE TRIGGER event_stats_truncate AFTER TRUNCATE ON events
    FOR EACH STATEMENT EXECUTE FUNCTION event_stats_emptied();

DROP INDEX events_by_name;
ANALYZE event_stats;
""".format(
    recompute_removed=RECOMPUTE.format(
        keys="SELECT DISTINCT project_id, name, contact_id FROM removed"
    ),
    recompute_updated=RECOMPUTE.format(
        keys="SELECT project_id, name, contact_id FROM removed\n"
        "              UNION SELECT project_id, name, contact_id FROM added"
    ),
)

DOWNGRADE = """
CREATE INDEX events_by_name ON events (project_id, name, occurred_at, contact_id);
DROP TRIGGER event_stats_truncate ON events;
DROP TRIGGER event_stats_update ON events;
DROP TRIGGER event_stats_delete ON events;
DROP TRIGGER event_stats_insert ON events;
DROP FUNCTION event_stats_emptied();
DROP FUNCTION event_stats_updated();
DROP FUNCTION event_stats_removed();
DROP FUNCTION event_stats_added();
DROP TABLE event_stats;
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
