"""The schema stays distributable by project_id (Citus, co-located tables), read from the
migrated database's catalog so that a migration breaking it fails here.

Every table holding a `project_id` is tenant data. Tenant tables are distributed by
`project_id`, with two exceptions declared below with their reasons: tables that must be
on every node (reference tables). A distributed table has `project_id` (uuid, NOT NULL) in
its primary key and in every unique constraint and unique index, and a foreign key
between two distributed tables pairs `project_id` with `project_id`; a reference table
refers to reference tables only. Tables without a `project_id` are global and declared.

The README's Citus DDL ("Scaling") is run here too, against stand-ins of Citus's
functions that check what Citus would check of this schema: Citus itself is not installed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import Connection, Engine, text

from tests import statement_scope

ROOT = Path(__file__).resolve().parent.parent

# Tables without a project_id: global, reference tables under Citus (alembic_version stays
# on the coordinator, where migrations run).
GLOBAL_TABLES = {
    "projects": "the tenants themselves; tenant tables refer to them",
    "server_secrets": "server-wide secrets every node reads",
    "alembic_version": "the schema's revision",
}
# Tables holding a project_id that are reference tables rather than distributed.
REFERENCE_TENANT_TABLES = {
    "api_keys": "a bearer key is resolved to its project before the project is known: the "
    "lookup by key hash must be answered on any node without visiting every shard",
}


@dataclass(frozen=True)
class Catalog:
    tables: frozenset[str]
    project_column: dict[str, tuple[str, bool]]  # table -> (type, NOT NULL)
    primary_keys: dict[str, list[str]]
    unique_indexes: list[tuple[str, str, list[str]]]  # table, index, its key columns
    exclusions: list[tuple[str, str, list[str]]]
    foreign_keys: list[tuple[str, str, str, list[tuple[str, str]]]]  # from, name, to, pairs


def read_catalog(conn: Connection) -> Catalog:
    tables = frozenset(
        conn.execute(
            text(
                "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
                " WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p')"
                " AND NOT c.relispartition"
            )
        ).scalars()
    )
    project_column = {
        row.table: (row.type, row.notnull)
        for row in conn.execute(
            text(
                "SELECT c.relname AS table, format_type(a.atttypid, a.atttypmod) AS type,"
                " a.attnotnull AS notnull"
                " FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid"
                " JOIN pg_namespace n ON n.oid = c.relnamespace"
                " WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p')"
                " AND a.attname = 'project_id' AND a.attnum > 0 AND NOT a.attisdropped"
            )
        )
    }
    primary_keys = {
        row.table: list(row.columns)
        for row in conn.execute(
            text(
                "SELECT con.conrelid::regclass::text AS table,"
                " array(SELECT a.attname FROM unnest(con.conkey) k"
                "   JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k) AS columns"
                " FROM pg_constraint con JOIN pg_namespace n ON n.oid = con.connamespace"
                " WHERE n.nspname = 'public' AND con.contype = 'p'"
            )
        )
    }
    # Unique indexes cover primary keys, unique constraints and CREATE UNIQUE INDEX alike;
    # only key columns count (not INCLUDE), and an expression (attnum 0) is not a column.
    unique_indexes = [
        (row.table, row.index_name, [c for c in row.columns if c is not None])
        for row in conn.execute(
            text(
                "SELECT i.indrelid::regclass::text AS table,"
                " i.indexrelid::regclass::text AS index_name,"
                " array(SELECT a.attname FROM unnest((i.indkey::int2[])[0:i.indnkeyatts - 1]) k"
                "   LEFT JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k)"
                "   AS columns"
                " FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid"
                " JOIN pg_namespace n ON n.oid = c.relnamespace"
                " WHERE n.nspname = 'public' AND i.indisunique"
            )
        )
    ]
    exclusions = [
        (row.table, row.name, list(row.columns))
        for row in conn.execute(
            text(
                "SELECT con.conrelid::regclass::text AS table, con.conname AS name,"
                " array(SELECT a.attname FROM unnest(con.conkey) k"
                "   JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k) AS columns"
                " FROM pg_constraint con JOIN pg_namespace n ON n.oid = con.connamespace"
                " WHERE n.nspname = 'public' AND con.contype = 'x'"
            )
        )
    ]
    foreign_keys = [
        (row.source, row.name, row.target, list(zip(row.columns, row.referenced, strict=True)))
        for row in conn.execute(
            text(
                "SELECT con.conrelid::regclass::text AS source, con.conname AS name,"
                " con.confrelid::regclass::text AS target,"
                " array(SELECT a.attname FROM unnest(con.conkey) WITH ORDINALITY k(n, i)"
                "   JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.n"
                "   ORDER BY k.i) AS columns,"
                " array(SELECT a.attname FROM unnest(con.confkey) WITH ORDINALITY k(n, i)"
                "   JOIN pg_attribute a ON a.attrelid = con.confrelid AND a.attnum = k.n"
                "   ORDER BY k.i) AS referenced"
                " FROM pg_constraint con JOIN pg_namespace n ON n.oid = con.connamespace"
                " WHERE n.nspname = 'public' AND con.contype = 'f'"
            )
        )
    ]
    return Catalog(tables, project_column, primary_keys, unique_indexes, exclusions, foreign_keys)


@pytest.fixture(scope="module")
def catalog(engine: Engine) -> Catalog:
    with engine.connect() as conn:
        return read_catalog(conn)


def distributed(catalog: Catalog) -> set[str]:
    return set(catalog.project_column) - set(REFERENCE_TENANT_TABLES)


def reference(catalog: Catalog) -> set[str]:
    return set(catalog.tables - set(catalog.project_column)) | set(REFERENCE_TENANT_TABLES)


def test_every_table_is_tenant_data_or_declared_global(catalog: Catalog) -> None:
    assert catalog.tables - set(catalog.project_column) == set(GLOBAL_TABLES)
    assert set(REFERENCE_TENANT_TABLES) <= set(catalog.project_column)
    # The distributed tables are many; a catalog query that found none would prove nothing.
    assert {"contacts", "events", "segments", "segment_members"} <= distributed(catalog)


def test_the_statement_check_knows_every_tenant_table(catalog: Catalog) -> None:
    """tests/statement_scope.py takes its tenant tables from tables.py: the same set."""
    assert set(catalog.project_column) == statement_scope.TENANT_TABLES


def test_project_id_is_one_type_and_never_null(catalog: Catalog) -> None:
    """Co-located tables are distributed by columns of the same type."""
    assert {table: catalog.project_column[table] for table in distributed(catalog)} == {
        table: ("uuid", True) for table in distributed(catalog)
    }


def test_every_primary_key_and_unique_index_includes_project_id(catalog: Catalog) -> None:
    tables = distributed(catalog)
    assert tables - set(catalog.primary_keys) == set(), "distributed tables need a primary key"
    wrong_keys = {
        table: columns
        for table, columns in catalog.primary_keys.items()
        if table in tables and "project_id" not in columns
    }
    assert wrong_keys == {}
    checked = [index for index in catalog.unique_indexes if index[0] in tables]
    assert len(checked) >= len(tables)  # the primary keys at least
    wrong_indexes = [
        (table, index, columns) for table, index, columns in checked if "project_id" not in columns
    ]
    assert wrong_indexes == []
    wrong_exclusions = [
        x for x in catalog.exclusions if x[0] in tables and "project_id" not in x[2]
    ]
    assert wrong_exclusions == []


def test_foreign_keys_stay_within_a_project(catalog: Catalog) -> None:
    """Between distributed tables a foreign key pairs project_id with project_id (both
    rows on one node); a reference table may refer only to reference tables."""
    tables = distributed(catalog)
    assert any(
        source in tables and target in tables for source, _, target, _ in catalog.foreign_keys
    )
    crossing = [
        (source, name, target, pairs)
        for source, name, target, pairs in catalog.foreign_keys
        if source in tables and target in tables and ("project_id", "project_id") not in pairs
    ]
    assert crossing == []
    into_distributed = [
        (source, name, target)
        for source, name, target, _ in catalog.foreign_keys
        if source not in tables and target in tables
    ]
    assert into_distributed == []


# Stand-ins for the Citus functions the README's DDL calls, with Citus's signatures; each
# checks what Citus would refuse on this schema, in the order the DDL runs.
CITUS_STAND_INS = """
CREATE SCHEMA citus_stand_in;
CREATE TABLE citus_stand_in.placed (name regclass PRIMARY KEY, kind text NOT NULL, colocated text);
CREATE FUNCTION citus_stand_in.create_reference_table(table_name regclass) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE bad text;
BEGIN
    SELECT confrelid::regclass::text INTO bad FROM pg_constraint
    WHERE conrelid = table_name AND contype = 'f'
      AND confrelid NOT IN (SELECT name FROM citus_stand_in.placed WHERE kind = 'reference');
    IF bad IS NOT NULL THEN
        RAISE EXCEPTION '% refers to %, which is not a reference table yet', table_name, bad;
    END IF;
    INSERT INTO citus_stand_in.placed VALUES (table_name, 'reference', NULL);
END $$;
CREATE FUNCTION citus_stand_in.create_distributed_table(
    table_name regclass, distribution_column text, distribution_type text DEFAULT 'hash',
    colocate_with text DEFAULT 'default', shard_count int DEFAULT NULL
) RETURNS void LANGUAGE plpgsql AS $$
DECLARE bad text;
BEGIN
    IF NOT EXISTS (SELECT FROM pg_attribute WHERE attrelid = table_name
                   AND attname = distribution_column AND NOT attisdropped) THEN
        RAISE EXCEPTION '% has no column %', table_name, distribution_column;
    END IF;
    IF colocate_with NOT IN ('default', 'none') AND NOT EXISTS (
        SELECT FROM citus_stand_in.placed
        WHERE name = colocate_with::regclass AND kind = 'distributed') THEN
        RAISE EXCEPTION '% is co-located with %, which is not distributed yet',
            table_name, colocate_with;
    END IF;
    SELECT confrelid::regclass::text INTO bad FROM pg_constraint
    WHERE conrelid = table_name AND contype = 'f'
      AND confrelid NOT IN (SELECT name FROM citus_stand_in.placed);
    IF bad IS NOT NULL THEN
        RAISE EXCEPTION '% refers to %, which is not placed yet', table_name, bad;
    END IF;
    INSERT INTO citus_stand_in.placed VALUES (table_name, 'distributed', colocate_with);
END $$;
CREATE FUNCTION citus_stand_in.create_distributed_function(
    function_name regprocedure, distribution_arg_name text DEFAULT NULL,
    colocate_with text DEFAULT 'default', force_delegation bool DEFAULT NULL
) RETURNS void LANGUAGE sql AS $$ SELECT $$;
"""


def readme_citus_ddl() -> str:
    """The SQL block of README.md that distributes the schema."""
    readme = (ROOT / "README.md").read_text()
    blocks = [
        b for b in re.findall(r"```sql\n(.*?)```", readme, re.S) if "create_distributed_table" in b
    ]
    assert len(blocks) == 1, "README.md should hold one SQL block distributing the schema"
    return str(blocks[0])


def test_the_readme_distributes_every_table(engine: Engine, catalog: Catalog) -> None:
    ddl = readme_citus_ddl()
    with engine.connect() as conn:
        # On the driver's cursor, without parameters: the SQL is run as written (% included).
        driver = conn.connection.dbapi_connection
        assert driver is not None
        cursor = driver.cursor()
        try:
            cursor.execute(CITUS_STAND_INS)
            cursor.execute("SET LOCAL search_path = citus_stand_in, public")
            cursor.execute(ddl)
            cursor.execute("SELECT name::text, kind, colocated FROM citus_stand_in.placed")
            placed = cursor.fetchall()
        finally:
            cursor.close()
            driver.rollback()
    assert {name for name, kind, _ in placed if kind == "reference"} == reference(catalog) - {
        "alembic_version"
    }
    assert {name for name, kind, _ in placed if kind == "distributed"} == distributed(catalog)
    # contacts first, in a group of its own; every other tenant table in its group.
    assert {name: colocated for name, kind, colocated in placed if kind == "distributed"} == {
        name: "none" if name == "contacts" else "contacts" for name in distributed(catalog)
    }
