"""scripts/protocheck.py: the protos as committed pass lint and the breaking-change check,
and each rule catches what it is there for."""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType

import pytest
from google.protobuf import descriptor_pb2

from tests.conftest import ROOT

FDP = descriptor_pb2.FieldDescriptorProto


@pytest.fixture(scope="module")
def protocheck() -> ModuleType:
    spec = importlib.util.spec_from_file_location("protocheck", ROOT / "scripts" / "protocheck.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["protocheck"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def current(protocheck: ModuleType) -> descriptor_pb2.FileDescriptorSet:
    fds: descriptor_pb2.FileDescriptorSet = protocheck.compile_protos()
    return fds


def _copy(fds: descriptor_pb2.FileDescriptorSet) -> descriptor_pb2.FileDescriptorSet:
    copy = descriptor_pb2.FileDescriptorSet()
    copy.CopyFrom(fds)
    return copy


def _file(fds: descriptor_pb2.FileDescriptorSet, name: str) -> descriptor_pb2.FileDescriptorProto:
    return next(f for f in fds.file if f.name == name)


def _message(fds: descriptor_pb2.FileDescriptorSet, name: str) -> descriptor_pb2.DescriptorProto:
    return next(m for f in fds.file for m in f.message_type if m.name == name)


def test_the_committed_protos_pass(
    protocheck: ModuleType, current: descriptor_pb2.FileDescriptorSet
) -> None:
    assert protocheck.lint(current) == []
    baseline = descriptor_pb2.FileDescriptorSet.FromString(protocheck.BASELINE.read_bytes())
    assert protocheck.breaking_changes(baseline, current) == []


def test_lint_wants_comments_unspecified_zero_values_and_package_directories(
    protocheck: ModuleType, current: descriptor_pb2.FileDescriptorSet
) -> None:
    fds = _copy(current)
    resources = _file(fds, "segments/v1/resources.proto")
    contact_path = [4, [m.name for m in resources.message_type].index("Contact")]
    email_path = [*contact_path, 2, 1]  # Contact's second field: email
    kept = [
        loc
        for loc in resources.source_code_info.location
        if list(loc.path) not in (contact_path, email_path)
    ]
    del resources.source_code_info.location[:]
    resources.source_code_info.location.extend(kept)
    kind = next(e for m in resources.message_type if m.name == "Segment" for e in m.enum_type)
    kind.value[0].name = "TYPE_NONE"
    resources.package = "segments.v2"
    problems = "\n".join(protocheck.lint(fds))
    assert "message Contact has no comment" in problems
    assert "field Contact.email has no comment" in problems
    assert "enum Segment.Type: its zero value must be named *_UNSPECIFIED" in problems
    assert "package 'segments.v2' is not its directory 'segments.v1'" in problems
    assert len(protocheck.lint(fds)) == 4


def test_breaking_changes_are_found_and_additions_allowed(
    protocheck: ModuleType, current: descriptor_pb2.FileDescriptorSet
) -> None:
    changed = _copy(current)
    contact = _message(changed, "Contact")
    email = next(f for f in contact.field if f.name == "email")
    email.type = FDP.TYPE_BYTES
    subscribed = next(f for f in contact.field if f.name == "subscribed")
    contact.field.remove(subscribed)
    contact.field.add(name="nickname", number=99, type=FDP.TYPE_STRING, json_name="nickname")
    segments = _file(changed, "segments/v1/segments.proto")
    service = segments.service[0]
    removed = service.method[0].name
    del service.method[0]
    problems = protocheck.breaking_changes(current, changed)
    assert sorted(problems) == sorted(
        [
            "field segments.v1.Contact.2: type changed from 'TYPE_STRING' to 'TYPE_BYTES'",
            "field segments.v1.Contact.3 was removed",
            f"method segments.v1.{service.name}.{removed} was removed",
        ]
    )
