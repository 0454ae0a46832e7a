"""Proto hygiene: lint the API's protos and check them against the committed baseline.

    python scripts/protocheck.py               # lint, then breaking-change check
    python scripts/protocheck.py --baseline    # record the current protos as the baseline

Lint: every message, field, enum, enum value, service and method has a comment; the zero
value of every enum is named *_UNSPECIFIED; a file's package is its directory
(protos/segments/v1/x.proto declares `package segments.v1`); files are proto3.

Breaking changes, against protos/baseline.pb (a descriptor set of protos/ as released):
no message, field, enum value, service or method removed; a field keeps its number,
name, JSON name, type and label; an enum value its name; a method its request and
response types, streaming and HTTP binding. Additions are fine.
"""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import google.api
import grpc_tools
from google.protobuf import descriptor_pb2

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
BASELINE = PROTO_ROOT / "baseline.pb"
# Registers the google.api.http option so that method options carry it.
_annotations = importlib.import_module("google.api.annotations_pb2")

# Field numbers of descriptor.proto, as SourceCodeInfo paths use them.
_FILE_MESSAGE, _FILE_ENUM, _FILE_SERVICE = 4, 5, 6
_MESSAGE_FIELD, _MESSAGE_NESTED, _MESSAGE_ENUM = 2, 3, 4
_ENUM_VALUE = 2
_SERVICE_METHOD = 2

FDP = descriptor_pb2.FieldDescriptorProto


def compile_protos() -> descriptor_pb2.FileDescriptorSet:
    """The API's own files (no imports), with their comments."""
    common_protos = Path(google.api.__path__[0]).parent.parent
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "protos.pb"
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "grpc_tools.protoc",
                f"-I{PROTO_ROOT}",
                f"-I{common_protos}",
                f"-I{well_known}",
                "--include_source_info",
                f"--descriptor_set_out={out}",
                *protos,
            ],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            sys.stderr.write(done.stdout + done.stderr)
            raise SystemExit(f"protoc failed ({done.returncode})")
        return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


# -- lint ----------------------------------------------------------------------------------


def _commented(file: descriptor_pb2.FileDescriptorProto) -> set[tuple[int, ...]]:
    return {
        tuple(location.path)
        for location in file.source_code_info.location
        if location.leading_comments.strip() or location.trailing_comments.strip()
    }


def _enum_problems(
    enum: descriptor_pb2.EnumDescriptorProto,
    name: str,
    path: tuple[int, ...],
    commented: set[tuple[int, ...]],
) -> Iterator[str]:
    if path not in commented:
        yield f"enum {name} has no comment"
    if enum.value and not (
        enum.value[0].number == 0 and enum.value[0].name.endswith("_UNSPECIFIED")
    ):
        yield f"enum {name}: its zero value must be named *_UNSPECIFIED"
    for i, value in enumerate(enum.value):
        if (*path, _ENUM_VALUE, i) not in commented:
            yield f"enum value {name}.{value.name} has no comment"


def _message_problems(
    message: descriptor_pb2.DescriptorProto,
    name: str,
    path: tuple[int, ...],
    commented: set[tuple[int, ...]],
) -> Iterator[str]:
    if message.options.map_entry:
        return
    if path not in commented:
        yield f"message {name} has no comment"
    for i, field in enumerate(message.field):
        if (*path, _MESSAGE_FIELD, i) not in commented:
            yield f"field {name}.{field.name} has no comment"
    for i, nested in enumerate(message.nested_type):
        yield from _message_problems(
            nested, f"{name}.{nested.name}", (*path, _MESSAGE_NESTED, i), commented
        )
    for i, enum in enumerate(message.enum_type):
        yield from _enum_problems(enum, f"{name}.{enum.name}", (*path, _MESSAGE_ENUM, i), commented)


def lint(fds: descriptor_pb2.FileDescriptorSet) -> list[str]:
    problems: list[str] = []
    for file in fds.file:
        where = f"protos/{file.name}"
        directory = str(Path(file.name).parent).replace("/", ".")
        if file.package != directory:
            problems.append(f"{where}: package {file.package!r} is not its directory {directory!r}")
        if file.syntax != "proto3":
            problems.append(f"{where}: not proto3")
        commented = _commented(file)
        found: list[str] = []
        for i, message in enumerate(file.message_type):
            found += _message_problems(message, message.name, (_FILE_MESSAGE, i), commented)
        for i, enum in enumerate(file.enum_type):
            found += _enum_problems(enum, enum.name, (_FILE_ENUM, i), commented)
        for i, service in enumerate(file.service):
            if (_FILE_SERVICE, i) not in commented:
                found.append(f"service {service.name} has no comment")
            for j, method in enumerate(service.method):
                if (_FILE_SERVICE, i, _SERVICE_METHOD, j) not in commented:
                    found.append(f"method {service.name}.{method.name} has no comment")
        problems += [f"{where}: {problem}" for problem in found]
    return problems


# -- breaking changes ----------------------------------------------------------------------


def _shapes(fds: descriptor_pb2.FileDescriptorSet) -> dict[str, dict[str, object]]:
    """Everything a caller depends on, keyed by what it is: 'message X', 'field X.3',
    'enum value X.2', 'method S.M'."""
    found: dict[str, dict[str, object]] = {}

    def enum(scope: str, e: descriptor_pb2.EnumDescriptorProto) -> None:
        found[f"enum {scope}.{e.name}"] = {}
        for value in e.value:
            found[f"enum value {scope}.{e.name}.{value.number}"] = {"name": value.name}

    def message(scope: str, m: descriptor_pb2.DescriptorProto) -> None:
        name = f"{scope}.{m.name}"
        found[f"message {name}"] = {}
        for field in m.field:
            found[f"field {name}.{field.number}"] = {
                "name": field.name,
                "json_name": field.json_name,
                "type": FDP.Type.Name(field.type),
                "type_name": field.type_name,
                "label": FDP.Label.Name(field.label),
                "oneof": m.oneof_decl[field.oneof_index].name
                if field.HasField("oneof_index")
                else None,
            }
        for nested in m.nested_type:
            message(name, nested)
        for e in m.enum_type:
            enum(name, e)

    for file in fds.file:
        for m in file.message_type:
            message(file.package, m)
        for e in file.enum_type:
            enum(file.package, e)
        for service in file.service:
            found[f"service {file.package}.{service.name}"] = {}
            for method in service.method:
                rule = method.options.Extensions[_annotations.http]
                found[f"method {file.package}.{service.name}.{method.name}"] = {
                    "input": method.input_type,
                    "output": method.output_type,
                    "client_streaming": method.client_streaming,
                    "server_streaming": method.server_streaming,
                    "http": rule.SerializeToString(deterministic=True).hex(),
                }
    return found


def breaking_changes(
    baseline: descriptor_pb2.FileDescriptorSet, current: descriptor_pb2.FileDescriptorSet
) -> list[str]:
    before, after = _shapes(baseline), _shapes(current)
    problems: list[str] = []
    for key, shape in before.items():
        if key not in after:
            problems.append(f"{key} was removed")
            continue
        for attribute, value in shape.items():
            if after[key][attribute] != value:
                problems.append(
                    f"{key}: {attribute} changed from {value!r} to {after[key][attribute]!r}"
                )
    return problems


def _without_source_info(fds: descriptor_pb2.FileDescriptorSet) -> bytes:
    stripped = descriptor_pb2.FileDescriptorSet()
    stripped.CopyFrom(fds)
    for file in stripped.file:
        file.ClearField("source_code_info")
    return stripped.SerializeToString(deterministic=True)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--baseline", action="store_true", help=f"write {BASELINE.relative_to(ROOT)}"
    )
    args = parser.parse_args()
    current = compile_protos()
    if args.baseline:
        BASELINE.write_bytes(_without_source_info(current))
        print(f"wrote {BASELINE.relative_to(ROOT)}")
        return 0
    problems = lint(current)
    baseline = descriptor_pb2.FileDescriptorSet.FromString(BASELINE.read_bytes())
    problems += [f"breaking change: {p}" for p in breaking_changes(baseline, current)]
    if problems:
        print(*problems, sep="\n")
        return 1
    print(f"protos lint clean, no breaking change against {BASELINE.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
