"""segments_timestamp costs less, and says so to the planner.

Declared with PL/pgSQL's default cost (100 operators a call), the function made every
scan that filters on a data timestamp look 100 times dearer per row than it is: the
planner then preferred a serial bitmap over a parallel sequential scan, and the count of
contacts whose `data.lastPurchaseAt` is within 30 days took 1.5 times as long as the same
count written by hand. Its real cost is a few operators (it runs after the cheap range
prefilter on the date text). And the month-length test, a date computation on every call,
now runs only for days past the 28th; on PostgreSQL 16 and later pg_input_is_valid()
replaces it. Answers are unchanged (tests/test_filter_properties.py compares them with the
Python reading of the same shape).

Revision ID: 0012
Revises: 0011
"""

from alembic import op

revision = "0012"
down_revision = "0011"

# The body of 0011, with the month-length test behind a cheaper one; %s is that test.
BODY = r"""
CREATE OR REPLACE FUNCTION segments_timestamp(value jsonb) RETURNS timestamptz
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE COST 5 AS $$
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
    -- What the shape lets through but the cast refuses: year 0, a day past its month's end.
    IF substr(text_value, 1, 4) = '0000' THEN
        RETURN NULL;
    END IF;
    %s
    RETURN text_value::timestamptz;
END
$$;
"""

# PostgreSQL 16 and later: the cast's own check, without an exception.
VALID_16 = """IF NOT pg_input_is_valid(text_value, 'timestamptz') THEN
        RETURN NULL;
    END IF;"""

# PostgreSQL 15: days up to the 28th exist in every month; past it, the month's length.
VALID_15 = """IF substr(text_value, 9, 2) > '28' AND substr(text_value, 9, 2)::int > extract(day from
        make_date(substr(text_value, 1, 4)::int, substr(text_value, 6, 2)::int, 1)
        + interval '1 month - 1 day') THEN
        RETURN NULL;
    END IF;"""

# 0011's function, as it was.
PREVIOUS = r"""
CREATE OR REPLACE FUNCTION segments_timestamp(value jsonb) RETURNS timestamptz
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE COST 100 AS $$
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


def upgrade() -> None:
    version = int(op.get_bind().exec_driver_sql("SHOW server_version_num").scalar_one())
    op.execute(BODY % (VALID_16 if version >= 160000 else VALID_15))


def downgrade() -> None:
    op.execute(PREVIOUS)
