"""Initial schema: projects, keys, contacts, events, segments and memberships.

Every tenant table leads with project_id, and every primary key, unique constraint and
foreign key of tenant data includes it, so the schema can be distributed by project_id.

Revision ID: 0001
Revises:
"""

from alembic import op

revision = "0001"
down_revision = None

UPGRADE = r"""
CREATE TABLE projects (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    name text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- Looked up by hash before the project is known; a reference table under Citus.
CREATE TABLE api_keys (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    project_id uuid NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    kind text NOT NULL CHECK (kind IN ('secret', 'public')),
    key_hash bytea NOT NULL UNIQUE,
    key_prefix text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    revoked_at timestamptz
);
CREATE INDEX api_keys_project ON api_keys (project_id);

CREATE TABLE contacts (
    project_id uuid NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    id uuid NOT NULL DEFAULT gen_random_uuid(),
    email text NOT NULL,
    subscribed boolean NOT NULL DEFAULT true,
    data jsonb NOT NULL DEFAULT '{}'::jsonb CHECK (jsonb_typeof(data) = 'object'),
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (project_id, id),
    UNIQUE (project_id, email)
);
CREATE INDEX contacts_by_created ON contacts (project_id, created_at DESC, id DESC);
CREATE INDEX contacts_by_updated ON contacts (project_id, updated_at);
CREATE INDEX contacts_data ON contacts USING gin (data jsonb_path_ops);

CREATE TABLE events (
    project_id uuid NOT NULL,
    id bigint GENERATED ALWAYS AS IDENTITY,
    contact_id uuid NOT NULL,
    name text NOT NULL CHECK (name <> ''),
    data jsonb NOT NULL DEFAULT '{}'::jsonb,
    occurred_at timestamptz NOT NULL DEFAULT now(),
    created_at timestamptz NOT NULL DEFAULT now(),
    -- occurred_at is in the key so events can move to native time partitioning.
    PRIMARY KEY (project_id, id, occurred_at),
    FOREIGN KEY (project_id, contact_id) REFERENCES contacts (project_id, id) ON DELETE CASCADE
);
-- Per-contact probes: triggered / notTriggered / windows, evaluated for one contact.
CREATE INDEX events_by_contact ON events (project_id, contact_id, name, occurred_at DESC);
-- Set-based scans: who triggered this name (in this window), for counts over many contacts.
CREATE INDEX events_by_name ON events (project_id, name, occurred_at, contact_id);

CREATE TABLE segments (
    project_id uuid NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    id uuid NOT NULL DEFAULT gen_random_uuid(),
    name text NOT NULL,
    description text,
    type text NOT NULL CHECK (type IN ('DYNAMIC', 'STATIC')),
    condition jsonb,
    track_membership boolean NOT NULL DEFAULT false,
    created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    updated_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (project_id, id),
    CHECK ((type = 'DYNAMIC') = (condition IS NOT NULL))
);
CREATE INDEX segments_by_created ON segments (project_id, created_at DESC, id DESC);

-- Which segment's condition names which other segment: refuses deleting a referenced one.
CREATE TABLE segment_references (
    project_id uuid NOT NULL,
    segment_id uuid NOT NULL,
    referenced_id uuid NOT NULL,
    PRIMARY KEY (project_id, segment_id, referenced_id),
    FOREIGN KEY (project_id, segment_id) REFERENCES segments (project_id, id) ON DELETE CASCADE,
    FOREIGN KEY (project_id, referenced_id) REFERENCES segments (project_id, id)
);
CREATE INDEX segment_references_by_referenced ON segment_references (project_id, referenced_id);

CREATE TABLE static_members (
    project_id uuid NOT NULL,
    segment_id uuid NOT NULL,
    contact_id uuid NOT NULL,
    added_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (project_id, segment_id, contact_id),
    FOREIGN KEY (project_id, segment_id) REFERENCES segments (project_id, id) ON DELETE CASCADE,
    FOREIGN KEY (project_id, contact_id) REFERENCES contacts (project_id, id) ON DELETE CASCADE
);
CREATE INDEX static_members_by_added ON static_members
    (project_id, segment_id, added_at DESC, contact_id DESC);
CREATE INDEX static_members_by_contact ON static_members (project_id, contact_id);

-- Top-level merge of contact data: keys of the patch replace stored keys, null removes.
CREATE FUNCTION segments_merge_data(stored jsonb, patch jsonb) RETURNS jsonb
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT coalesce(jsonb_object_agg(key, value), '{}'::jsonb)
    FROM jsonb_each(coalesce(stored, '{}'::jsonb) || coalesce(patch, '{}'::jsonb))
    WHERE jsonb_typeof(value) <> 'null'
$$;

-- A JSON string read as a timestamp (UTC when it has no offset), or NULL when it is not
-- one. The shape test runs first so most non-timestamps never reach the cast.
CREATE FUNCTION segments_timestamp(value jsonb) RETURNS timestamptz
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
DECLARE
    text_value text;
BEGIN
    IF jsonb_typeof(value) IS DISTINCT FROM 'string' THEN
        RETURN NULL;
    END IF;
    text_value := value #>> '{}';
    IF text_value !~ '^\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])([T ]([01]\d|2[0-3]):[0-5]\d(:[0-5]\d(\.\d{1,6})?)?(Z|z|[+-](0\d|1[0-5])(:?[0-5]\d)?)?)?$' THEN
        RETURN NULL;
    END IF;
    IF length(text_value) = 10 THEN
        text_value := text_value || 'T00:00:00+00';
    ELSIF substr(text_value, 11) !~ '[Zz+-]' THEN
        text_value := text_value || '+00';
    END IF;
    RETURN text_value::timestamptz;
EXCEPTION WHEN others THEN
    RETURN NULL;
END
$$;
"""

DOWNGRADE = """
DROP FUNCTION segments_timestamp(jsonb);
DROP FUNCTION segments_merge_data(jsonb, jsonb);
DROP TABLE static_members, segment_references, segments, events, contacts, api_keys, projects;
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
