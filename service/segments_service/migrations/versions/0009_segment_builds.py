"""Segment builds leave the request: a segment has a status, and large builds run in the
background in slices (builds.py).

- `segments.status` (READY | BUILDING | FAILED) and `status_reason` are what callers see;
  `membership_state` is what writers act on: `stored` (segment_members holds the
  membership and writers keep it current), `building` (writers note the contacts they
  touch in `segment_build_dirty` instead of evaluating the segment) or `none` (a failed
  first build: nothing is stored, reads evaluate the condition). `build_generation` is
  bumped by every change of definition that starts a build.
- `segment_builds`: one row per segment being built, with its phase and cursor, so a
  build a stopped server left is resumed by the next one.
- `segment_build_shadow`: the members a build computed, before they are applied.
- `segment_build_dirty`: contacts written while a segment was being built, re-evaluated
  when the build catches up.

Existing segments are READY with stored membership.

Revision ID: 0009
Revises: 0008
"""

from alembic import op

revision = "0009"
down_revision = "0008"

UPGRADE = """
ALTER TABLE segments
    ADD COLUMN status text NOT NULL DEFAULT 'READY'
        CHECK (status IN ('READY', 'BUILDING', 'FAILED')),
    ADD COLUMN status_reason text,
    ADD COLUMN membership_state text NOT NULL DEFAULT 'stored'
        CHECK (membership_state IN ('stored', 'building', 'none')),
    ADD COLUMN build_generation bigint NOT NULL DEFAULT 0;

CREATE TABLE segment_builds (
    project_id uuid NOT NULL,
    segment_id uuid NOT NULL,
    generation bigint NOT NULL,
    phase text NOT NULL CHECK (phase IN ('compute', 'apply', 'catchup', 'final')),
    cursor uuid,
    previous_condition jsonb,
    enter_all boolean NOT NULL,
    entered_to uuid,
    failure text,
    attempts integer NOT NULL DEFAULT 0,
    moved bigint NOT NULL DEFAULT 0,
    queued_at timestamptz NOT NULL,
    PRIMARY KEY (project_id, segment_id),
    FOREIGN KEY (project_id, segment_id) REFERENCES segments (project_id, id) ON DELETE CASCADE
);
CREATE INDEX segment_builds_queue ON segment_builds (project_id, queued_at, segment_id);

CREATE TABLE segment_build_shadow (
    project_id uuid NOT NULL,
    segment_id uuid NOT NULL,
    contact_id uuid NOT NULL,
    PRIMARY KEY (project_id, segment_id, contact_id)
);

CREATE TABLE segment_build_dirty (
    project_id uuid NOT NULL,
    segment_id uuid NOT NULL,
    contact_id uuid NOT NULL,
    PRIMARY KEY (project_id, segment_id, contact_id)
);
"""

DOWNGRADE = """
DROP TABLE segment_build_dirty;
DROP TABLE segment_build_shadow;
DROP TABLE segment_builds;
ALTER TABLE segments
    DROP COLUMN build_generation,
    DROP COLUMN membership_state,
    DROP COLUMN status_reason,
    DROP COLUMN status;
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
