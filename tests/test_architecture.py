"""The import rules of docs/ARCHITECTURE.md, checked on the source: every module under
service/, client/ and stubs/ is parsed (ast, never imported) and each of its imports, wherever in
the module it stands, is held against the rules of its layer.

The rules are about layers and packages, not files: a module belongs to a layer by the
first component of its name under `segments_service` (so `membership.py` split into a
`membership/` package stays where it was), and a module no rule names is domain.
"""

from __future__ import annotations

import ast
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCE_ROOTS = (ROOT / "service", ROOT / "client", ROOT / "stubs")
SERVICE = "segments_service"
CLIENT = "segments"
# The generated messages and gRPC stubs: a package of their own, which the service and the
# client both import.
STUBS = "segments_api"

# Layers of the service, by the first component of a module's name under segments_service.
# Foundations: the error contract, the schema, settings, JSON helpers; they import nothing
# of the service but each other.
FOUNDATIONS = frozenset({"errors", "tables", "config", "jsonutil"})
# The filter compiler: a package of its own.
FILTERS = "filters"
# The gRPC edge: what every RPC is given before it runs (interceptors), how RPCs run (rpc,
# status), the servicers, proto conversion, streams, the server that wires them, and the
# check of REST requests against the request messages (rest_check, json_shapes), and the
# end-of-stream check of streamed REST responses (rest_stream_end), and which database
# serves an RPC's reads (replica).
EDGE = frozenset(
    {
        "replica",
        "interceptors",
        "rpc",
        "status",
        "servicers",
        "convert",
        "streams",
        "server",
        "rest_check",
        "json_shapes",
        "rest_stream_end",
    }
)
# The process around the service: the command line, engines and the embedded server (and
# its standby), Envoy's generated configuration and launcher, migrations.
PROCESS = frozenset({"cli", "database", "migrations", "standby"})
ENVOY_PREFIX = "envoy"

# Imports that reach the wire format: none of these in the domain or the filters.
GRPC_AND_PROTOBUF = ("grpc", "grpc_status", "grpc_health", "grpc_reflection", "google")
# Drivers and SQL: servicers hold none of it (sqlalchemy.orm's Session type excepted).
SQL = ("sqlalchemy", "psycopg")
SESSION_TYPES = "sqlalchemy.orm"

# The known exceptions, each (importer's layer, imported module, imported name): a rule
# names its exceptions here rather than weakening itself.
SERVICER_SQL_EXCEPTIONS = frozenset(
    {
        # The exports (ExportSegmentContacts, ExportSegmentCsv) open their snapshot and
        # bound its idle time with one set_config statement before handing over to the
        # domain's export.
        ("servicers", "sqlalchemy", "text"),
    }
)


@dataclass(frozen=True)
class Module:
    name: str  # dotted, as imported
    path: Path
    is_package: bool


@dataclass(frozen=True)
class Import:
    importer: Module
    line: int
    module: str  # the module imported, or imported from (absolute)
    name: str | None  # the name imported from it, for `from module import name`

    def targets(self) -> tuple[str, ...]:
        """What this import may refer to: the module, and module.name for a from-import
        (a submodule or an attribute; which one is decided against the known modules)."""
        if self.name is None or self.name == "*":
            return (self.module,)
        return (self.module, f"{self.module}.{self.name}")

    def where(self) -> str:
        shown = self.module if self.name is None else f"{self.module} import {self.name}"
        return f"{self.importer.path.relative_to(ROOT)}:{self.line}: {shown}"


def discover(roots: Iterable[Path] = SOURCE_ROOTS) -> dict[str, Module]:
    found: dict[str, Module] = {}
    for root in roots:
        for path in sorted(root.rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            if is_package:
                parts.pop()
            name = ".".join(parts)
            found[name] = Module(name, path, is_package)
    return found


def imports_of(module: Module) -> Iterator[Import]:
    tree = ast.parse(module.path.read_text(encoding="utf-8"), str(module.path))
    package = module.name if module.is_package else module.name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(module, node.lineno, alias.name, None)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                yield Import(module, node.lineno, base, alias.name)


MODULES = discover()
IMPORTS = [imp for module in MODULES.values() for imp in imports_of(module)]


Rule = Callable[[list["Import"]], list["Import"]]


def under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def reaches(imp: Import, prefixes: Iterable[str]) -> bool:
    return any(under(target, p) for target in imp.targets() for p in prefixes)


def ours(imp: Import) -> str | None:
    """The project module an import resolves to (the most specific one known), else None."""
    for target in reversed(imp.targets()):
        if target in MODULES:
            return target
    return None


def is_generated(name: str) -> bool:
    return name.endswith(("_pb2", "_pb2_grpc"))


def layer(name: str) -> str | None:
    """The layer of a module of the service (by its first component), None outside it."""
    if not under(name, SERVICE) or name == SERVICE:
        return None
    first = name.split(".")[1]
    if first in FOUNDATIONS:
        return "foundations"
    if first == FILTERS:
        return "filters"
    if first in EDGE:
        return first if first == "servicers" else "edge"
    if first in PROCESS:
        return first
    if first.startswith(ENVOY_PREFIX):
        return "envoy"
    return "domain"


def first_component(name: str) -> str:
    return name.split(".")[1] if under(name, SERVICE) and name != SERVICE else ""


def in_layers(imports: list[Import], *layers: str) -> list[Import]:
    return [imp for imp in imports if layer(imp.importer.name) in layers]


# Each rule: the imports of `imports` that break it.


def foundations_depend_on_each_other_only(imports: list[Import]) -> list[Import]:
    """errors, tables, config and jsonutil import nothing else of the service."""
    return [
        imp
        for imp in in_layers(imports, "foundations")
        if (target := ours(imp)) and layer(target) != "foundations"
    ]


def filters_import_their_package_the_schema_and_the_errors(imports: list[Import]) -> list[Import]:
    """filters/ imports of the service only filters/, tables and errors."""
    allowed = {FILTERS, "tables", "errors"}
    return [
        imp
        for imp in in_layers(imports, "filters")
        if (target := ours(imp)) and first_component(target) not in allowed
    ]


def filters_are_pure(imports: list[Import]) -> list[Import]:
    """filters/ builds statements and never runs them: no session, engine or driver."""
    return [
        imp
        for imp in in_layers(imports, "filters")
        if reaches(imp, (SESSION_TYPES, "sqlalchemy.engine", "psycopg"))
    ]


def filters_used_through_the_package(imports: list[Import]) -> list[Import]:
    """Outside filters/, the compiler is imported as segments_service.filters, not by module."""
    return [
        imp
        for imp in imports
        if layer(imp.importer.name) != "filters"
        and (target := ours(imp))
        and under(target, f"{SERVICE}.{FILTERS}")
        and target != f"{SERVICE}.{FILTERS}"
    ]


def domain_knows_no_wire(imports: list[Import]) -> list[Import]:
    """The domain, the filters and the foundations import no grpc, protobuf or stubs."""
    return [
        imp
        for imp in in_layers(imports, "domain", "foundations", "filters")
        if reaches(imp, GRPC_AND_PROTOBUF) or reaches(imp, (CLIENT, STUBS))
    ]


def domain_imports_nothing_above_it(imports: list[Import]) -> list[Import]:
    """The domain never imports the gRPC edge (interceptors, rpc, status, servicers, convert,
    streams, server), the database setup, Envoy's modules, migrations or the command line."""
    above = {"edge", "servicers", "envoy", "cli", "database", "migrations"}
    return [
        imp
        for imp in in_layers(imports, "domain", "foundations", "filters")
        if (target := ours(imp)) and layer(target) in above
    ]


def servicers_hold_no_sql(imports: list[Import]) -> list[Import]:
    """Servicers import no SQL construct or driver; the Session type alone."""
    return [
        imp
        for imp in in_layers(imports, "servicers")
        if reaches(imp, SQL)
        and not under(imp.module, SESSION_TYPES)
        and ("servicers", imp.module, imp.name) not in SERVICER_SQL_EXCEPTIONS
    ]


def servicers_go_through_the_domain(imports: list[Import]) -> list[Import]:
    """Servicers reach the schema, the compiler and the engines only through the domain."""
    return [
        imp
        for imp in in_layers(imports, "servicers")
        if (target := ours(imp)) and first_component(target) in {"tables", FILTERS, "database"}
    ]


def interceptor_does_no_database_work(imports: list[Import]) -> list[Import]:
    """The request interceptor admits or refuses an RPC before any database work: it imports
    no SQL construct or driver, and neither the schema, the compiler nor the engines."""
    data = {"tables", FILTERS, "database"}
    return [
        imp
        for imp in imports
        if first_component(imp.importer.name) == "interceptors"
        and (reaches(imp, SQL) or first_component(ours(imp) or "") in data)
    ]


def wiring_imported_from_above(imports: list[Import]) -> list[Import]:
    """Servicers are imported by the server, the server by the command line, the command
    line by nothing."""
    importers = {"servicers": {"server"}, "server": {"cli"}, "cli": set[str]()}
    return [
        imp
        for imp in imports
        if under(imp.importer.name, SERVICE)
        and (target := ours(imp))
        and (wanted := first_component(target)) in importers
        and first_component(imp.importer.name) not in importers[wanted] | {wanted}
    ]


def envoy_stays_apart(imports: list[Import]) -> list[Import]:
    """Envoy's modules are imported by the command line (and each other) only, and import
    neither the domain, the filters nor the database setup: their configuration derives
    from the error contract and the descriptor."""
    return [
        imp
        for imp in imports
        if under(imp.importer.name, SERVICE)
        and (target := ours(imp))
        and (
            (layer(target) == "envoy" and layer(imp.importer.name) not in {"envoy", "cli"})
            or (
                layer(imp.importer.name) == "envoy"
                and layer(target) in {"domain", "filters", "database"}
            )
        )
    ]


def migrations_are_frozen(imports: list[Import]) -> list[Import]:
    """Migrations import nothing of the service: history must not change with tables.py."""
    return [imp for imp in in_layers(imports, "migrations") if under(imp.module, SERVICE)]


def service_never_imports_the_client(imports: list[Import]) -> list[Import]:
    """The service reaches the generated stubs in segments_api, never the client package."""
    return [imp for imp in imports if under(imp.importer.name, SERVICE) and reaches(imp, (CLIENT,))]


def client_never_imports_the_service(imports: list[Import]) -> list[Import]:
    """client/ never imports segments_service."""
    return [imp for imp in imports if under(imp.importer.name, CLIENT) and reaches(imp, (SERVICE,))]


def stubs_import_only_stubs(imports: list[Import]) -> list[Import]:
    """Generated stubs import nothing of ours but each other."""
    return [
        imp
        for imp in imports
        if under(imp.importer.name, STUBS) and reaches(imp, (CLIENT, SERVICE))
    ]


RULES = [
    foundations_depend_on_each_other_only,
    filters_import_their_package_the_schema_and_the_errors,
    filters_are_pure,
    filters_used_through_the_package,
    domain_knows_no_wire,
    domain_imports_nothing_above_it,
    servicers_hold_no_sql,
    servicers_go_through_the_domain,
    interceptor_does_no_database_work,
    wiring_imported_from_above,
    envoy_stays_apart,
    migrations_are_frozen,
    service_never_imports_the_client,
    client_never_imports_the_service,
    stubs_import_only_stubs,
]


@pytest.mark.parametrize("rule", RULES, ids=lambda rule: rule.__name__)
def test_the_code_keeps_the_rule(rule: Rule) -> None:
    bad = rule(IMPORTS)
    assert not bad, (rule.__doc__ or "").strip() + "\n  " + "\n  ".join(imp.where() for imp in bad)


# One planted import per rule: (importing module, module imported, name imported or None).
PLANTED: dict[str, tuple[str, str, str | None]] = {
    "foundations_depend_on_each_other_only": (
        "segments_service.tables",
        "segments_service",
        "membership",
    ),
    "filters_import_their_package_the_schema_and_the_errors": (
        "segments_service.filters.compile",
        "segments_service.membership",
        "lock_shared",
    ),
    "filters_are_pure": ("segments_service.filters.compile", "sqlalchemy.orm", "Session"),
    "filters_used_through_the_package": (
        "segments_service.segments",
        "segments_service.filters.parse",
        "parse_condition",
    ),
    "domain_knows_no_wire": ("segments_service.membership", "grpc", None),
    "domain_imports_nothing_above_it": (
        "segments_service.segments",
        "segments_service.rpc",
        "Runner",
    ),
    "servicers_hold_no_sql": ("segments_service.servicers", "sqlalchemy", "select"),
    "servicers_go_through_the_domain": ("segments_service.servicers", "segments_service", "tables"),
    "interceptor_does_no_database_work": (
        "segments_service.interceptors",
        "sqlalchemy.orm",
        "Session",
    ),
    "wiring_imported_from_above": (
        "segments_service.rpc",
        "segments_service.server",
        "create_server",
    ),
    "envoy_stays_apart": ("segments_service.envoy_config", "segments_service", "segments"),
    "migrations_are_frozen": (
        "segments_service.migrations.env",
        "segments_service.tables",
        "metadata",
    ),
    "service_never_imports_the_client": (
        "segments_service.servicers",
        "segments.client",
        "SegmentsClient",
    ),
    "client_never_imports_the_service": ("segments.client", "segments_service.errors", None),
    "stubs_import_only_stubs": ("segments_api.v1.segments_pb2", "segments.conditions", "F"),
}


def test_every_rule_has_a_planted_import() -> None:
    assert sorted(PLANTED) == sorted(rule.__name__ for rule in RULES)


@pytest.mark.parametrize("rule", RULES, ids=lambda rule: rule.__name__)
def test_a_planted_forbidden_import_is_caught(rule: Rule) -> None:
    importer, module, name = PLANTED[rule.__name__]
    planted = Import(MODULES[importer], 0, module, name)
    assert rule([*IMPORTS, planted]) == [*rule(IMPORTS), planted]


def test_the_walk_sees_the_code() -> None:
    # Guards the guard: an empty or misread tree would pass every rule.
    assert {layer(name) for name in MODULES} >= {
        "foundations",
        "filters",
        "domain",
        "edge",
        "servicers",
        "envoy",
        "cli",
        "database",
        "migrations",
    }
    assert any(is_generated(name) for name in MODULES if under(name, STUBS))
    # The generated code lives in segments_api alone: none of it in the client.
    assert not any(is_generated(name) for name in MODULES if under(name, CLIENT))
    assert any(ours(imp) == f"{SERVICE}.filters" for imp in in_layers(IMPORTS, "domain")), (
        "the domain's imports of the compiler are resolved"
    )
    assert any(under(imp.module, "grpc") for imp in in_layers(IMPORTS, "servicers"))


def test_the_exceptions_are_still_needed() -> None:
    # An exception the code no longer needs would silently allow the import again.
    present = {("servicers", imp.module, imp.name) for imp in in_layers(IMPORTS, "servicers")}
    gone = SERVICER_SQL_EXCEPTIONS - present
    assert not gone, f"remove from SERVICER_SQL_EXCEPTIONS and docs/ARCHITECTURE.md: {gone}"


def test_no_import_cycles_between_modules() -> None:
    graph: dict[str, set[str]] = {name: set() for name in MODULES}
    for imp in IMPORTS:
        target = ours(imp)
        if target and target != imp.importer.name:
            graph[imp.importer.name].add(target)
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    on_path: list[str] = []
    done: set[str] = set()

    def visit(node: str) -> list[str] | None:
        on_path.append(node)
        for nxt in sorted(graph[node]):
            if nxt in on_path:
                return [*on_path[on_path.index(nxt) :], nxt]
            if nxt not in done and (found := visit(nxt)):
                return found
        on_path.pop()
        done.add(node)
        return None

    for node in sorted(graph):
        if node not in done and (found := visit(node)):
            return found
    return None
