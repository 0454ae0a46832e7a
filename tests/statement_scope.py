"""Every statement the service issues on tenant data names its project.

The suite records each distinct statement the service's code runs (database.STATEMENT_LOG,
set by conftest.py for in-process and subprocess servers alike); at the end of the session
every recorded statement is checked here: each tenant table it reads or writes (a table
holding `project_id`) must be compared on its `project_id` (`t.project_id = ...`,
`... = t.project_id`, `t.project_id IN ...`), or, for an INSERT, be given one in its column
list. That is what lets a distributed database route each statement to the one node that
holds the project, and what keeps one project's request away from another's rows.

Parsing is deliberately conservative: every bare occurrence of a tenant table's name is
taken as a use of that table. The few statements that span projects on purpose are listed
in ALLOWED, exactly as recorded, each with its reason; a new one fails until it is listed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from segments_service import tables

# Every table of the schema holding a project_id (test_schema_distribution.py checks this
# against the database's catalog).
TENANT_TABLES = frozenset(
    table.name for table in tables.metadata.tables.values() if "project_id" in table.c
)

# Statements that read or write tenant tables across projects on purpose, as recorded
# (whitespace collapsed), each with why it may.
ALLOWED: dict[str, str] = {
    # A bearer key is looked up by its hash before its project is known (api_keys is a
    # reference table, on every node, for that reason).
    "SELECT api_keys.project_id, api_keys.kind, api_keys.key_hash FROM api_keys"
    " WHERE api_keys.key_hash = %(key_hash_1)s AND api_keys.revoked_at IS NULL": (
        "authentication resolves a key to its project"
    ),
    "UPDATE api_keys SET revoked_at=now() WHERE api_keys.key_hash = %(key_hash_1)s"
    " AND api_keys.revoked_at IS NULL RETURNING api_keys.project_id": (
        "admin command line, `keys revoke KEY` (and rotate): the key names its project"
    ),
    "UPDATE api_keys SET revoked_at=now() WHERE api_keys.id = %(id_1)s::UUID"
    " AND api_keys.revoked_at IS NULL RETURNING api_keys.project_id": (
        "admin command line: revoking a lost key by the id `keys list` shows"
    ),
    # Background work finding the projects that have some, then working project by project.
    "SELECT DISTINCT segments.project_id FROM segments WHERE segments.type = %(type_1)s::VARCHAR"
    " AND segments.time_dependent ORDER BY segments.project_id": (
        "the sweeper's pass: the projects with time-dependent segments"
    ),
    "SELECT DISTINCT segment_builds.project_id FROM segment_builds"
    " ORDER BY segment_builds.project_id": "the build queue: the projects with builds queued",
    "DELETE FROM webhook_deliveries WHERE (project_id, ctid) IN ( SELECT project_id, ctid"
    " FROM webhook_deliveries WHERE status <> 'PENDING' AND finished_at < now()"
    " - make_interval(secs => %(age)s) LIMIT %(slice)s)": (
        "the webhook workers' retention of finished deliveries, every project's"
    ),
    # Statistics of a whole table, refreshed after a build or refresh moved many rows.
    "ANALYZE segment_members": "planner statistics after many membership changes",
    "ANALYZE segment_build_shadow": "planner statistics of a build's shadow before it is read",
}


@dataclass(frozen=True)
class Violation:
    statement: str
    tables: tuple[str, ...]  # the tenant tables it uses without naming their project


def normalize(statement: str) -> str:
    return " ".join(statement.split())


# What is not SQL structure: string literals, bind parameters, quoted identifiers' quotes.
_LITERAL = re.compile(r"'(?:[^']|'')*'")
_PARAMETER = re.compile(r"%\(\w+\)s|__\[POSTCOMPILE_\w+\]")
# A word that ends a table reference instead of naming its alias.
_KEYWORDS = frozenset(
    [
        "where",
        "join",
        "inner",
        "left",
        "right",
        "full",
        "cross",
        "natural",
        "lateral",
        "on",
        "set",
        "using",
        "order",
        "group",
        "limit",
        "offset",
        "returning",
        "for",
        "union",
        "except",
        "intersect",
        "having",
        "window",
        "values",
        "select",
        "as",
        "default",
        "with",
        "and",
        "or",
        "tablesample",
        "into",
        "from",
    ]
)
_IDENTIFIER = r"[a-z_][a-z0-9_$]*"


def _strip(statement: str) -> str:
    text = _LITERAL.sub("''", statement)
    text = _PARAMETER.sub("?", text)
    text = text.replace('"', "").lower()
    return re.sub(r"\bpublic\.", "", text)


def _references(text: str, table: str) -> list[tuple[str, bool]]:
    """Each use of `table` in `text`: (the name its columns are qualified by, whether it
    is an INSERT's target with project_id in its column list)."""
    uses = []
    pattern = re.compile(
        rf"(?<![\w.$]){table}(?![\w$.(])(?:\s+(?:as\s+)?({_IDENTIFIER}))?(\s*\(([^()]*)\))?"
    )
    for match in pattern.finditer(text):
        preceding = text[: match.start()].rstrip()
        if re.search(r"(?<![\w$])as$", preceding):
            continue  # `... AS events`: a name given to something else
        alias = match.group(1)
        if alias is None or alias in _KEYWORDS:
            alias = table
        inserted = (
            preceding.endswith("insert into")
            and match.group(3) is not None
            and "project_id" in re.split(r"\s*,\s*", match.group(3).strip())
        )
        uses.append((alias, inserted))
    return uses


# `alias.project_id` or a bare `project_id`, as a whole name.
_PROJECT_COLUMN = re.compile(rf"(?<![\w.$])(?:({_IDENTIFIER})\.)?project_id(?![\w$])")
_OPERATOR = re.compile(r"\s*(?:=|\bin\b)\s*")


def _comparisons(text: str) -> tuple[dict[str, int], set[frozenset[str]]]:
    """Which names' project_id is compared to a value (a parameter, a literal, an array: how
    many times), and which pairs are joined on it (`a.project_id = b.project_id`). A bare
    project_id is the name ""."""
    pinned: dict[str, int] = {}
    joined: set[frozenset[str]] = set()
    columns = list(_PROJECT_COLUMN.finditer(text))
    starts = {m.start(): m for m in columns}
    paired: set[int] = set()
    for match in columns:
        if match.start() in paired:
            continue
        name = match.group(1) or ""
        operator = _OPERATOR.match(text, match.end())
        if operator and text[match.end() : operator.end()].strip():
            other = starts.get(operator.end())
            if other is not None:
                paired.add(other.start())
                joined.add(frozenset({name, other.group(1) or ""}))
            else:
                pinned[name] = pinned.get(name, 0) + 1
        elif re.search(r"(?<![<>!])=\s*$", text[: match.start()]):
            pinned[name] = pinned.get(name, 0) + 1  # `value = t.project_id`
    return pinned, joined


def _reachable(pinned: Iterable[str], joined: set[frozenset[str]]) -> set[str]:
    """The names whose project_id is pinned, directly or by joins to a pinned one."""
    reached = set(pinned)
    grew = True
    while grew:
        grew = False
        for pair in joined:
            if pair & reached and not pair <= reached:
                reached |= pair
                grew = True
    return reached


def unscoped_tables(statement: str, tenant_tables: Iterable[str] = TENANT_TABLES) -> list[str]:
    """The tenant tables `statement` uses without naming their project (empty: scoped)."""
    text = _strip(statement)
    pinned, joined = _comparisons(text)
    scoped = _reachable((name for name in pinned if name), joined)
    missing: list[str] = []
    bare: list[str] = []  # unqualified uses, which a bare `project_id = ...` may scope
    for table in sorted(tenant_tables):
        for alias, inserted in _references(text, table):
            if inserted or alias in scoped:
                continue
            (bare if alias == table else missing).append(table)
    if len(bare) > pinned.get("", 0):
        missing += bare
    return sorted(set(missing))


def check(statements: Iterable[str]) -> list[Violation]:
    violations = []
    for statement in sorted({normalize(s) for s in statements}):
        if statement in ALLOWED:
            continue
        missing = unscoped_tables(statement)
        if missing:
            violations.append(Violation(statement, tuple(missing)))
    return violations


def read_log(path: Path) -> set[str]:
    """The statements a STATEMENT_LOG file holds (every process appends to it)."""
    if not path.exists():
        return set()
    return {json.loads(line) for line in path.read_text().splitlines() if line.strip()}
