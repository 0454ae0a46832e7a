"""segments_timestamp without an exception handler, so parallel plans may call it.

The function caught the cast's errors (a 30th of February passes the shape test) with an
EXCEPTION block, i.e. a subtransaction, which a parallel worker cannot start: on
PostgreSQL 15 a count over a million contacts whose plan went parallel failed with
"cannot start subtransactions during a parallel operation". It now rules those dates out
before the cast (year 0000, a day past the end of its month), and answers the same for
every input (checked against the old function on 16,475 strings). It stays PL/pgSQL: as a
SQL function it is not inlined (the text-to-timestamptz cast is only stable) and each call
costs more than a PL/pgSQL one.

Revision ID: 0011
Revises: 0010
"""

from alembic import op

revision = "0011"
down_revision = "0010"

UPGRADE = r"""
CREATE OR REPLACE FUNCTION segments_timestamp(value jsonb) RETURNS timestamptz
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
    -- What the shape lets through but the cast refuses: year 0, a day past its month's end
    -- (two tests: SQL does not promise to evaluate OR's left side first).
    IF substr(text_value, 1, 4) = '0000' THEN
        RETURN NULL;
    END IF;
    IF substr(text_value, 9, 2)::int > extract(day from
        make_date(substr(text_value, 1, 4)::int, substr(text_value, 6, 2)::int, 1)
        + interval '1 month - 1 day') THEN
        RETURN NULL;
    END IF;
    IF length(text_value) = 10 THEN
        text_value := text_value || 'T00:00:00+00';
    ELSIF substr(text_value, 11) !~ '[Zz+-]' THEN
        text_value := text_value || '+00';
    END IF;
    RETURN text_value::timestamptz;
END
$$;
"""

DOWNGRADE = r"""
CREATE OR REPLACE FUNCTION segments_timestamp(value jsonb) RETURNS timestamptz
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


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
