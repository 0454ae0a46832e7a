"""Explaining a membership (README.md, REST): the condition tree with `matched` on every
filter, group and condition, from the compiler's own statement. A property test holds
`member` to the membership the segment's statement computes, and every part's `matched`
to the reference evaluator (tests/reference.py), for random conditions and data."""

from __future__ import annotations

import json
import os
import uuid
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from segments import NotFoundError, SegmentsClient
from segments_service import explain
from segments_service.filters import parse_condition
from segments_service.segments import member_ids
from tests.conditions import cond, flt, groups_of
from tests.conftest import Project, Rest
from tests.reference import evaluate
from tests.rest_helpers import Api, check_error
from tests.test_filter_properties import NOW, World, _store, worlds

EXAMPLES = int(os.environ.get("EXPLAIN_PROPERTY_EXAMPLES", "60"))


def test_explain_over_rest(rest: Rest, project: Project) -> None:
    api = Api(rest, project)
    ann = api.upsert("ann@x.com", {"plan": "pro"})
    bob = api.upsert("bob@x.com", {"plan": "free"})
    api.events([{"email": "ann@x.com", "event": "login"}])
    condition = groups_of(
        "OR",
        {"filters": [flt("data.plan", "equals", "pro"), flt("event.login", "triggered")]},
        {
            "filters": [flt("email", "startsWith", "z")],
            "conditions": cond(flt("data.plan", "in", ["free"])),
        },
    )
    seg = api.create_segment("Explained", condition)

    def explained(contact_id: str) -> dict[str, Any]:
        resp = rest.get(f"/segments/{seg['id']}/contacts/{contact_id}/explain", key=api.key)
        assert resp.status == 200, resp.raw[:500]
        body = resp.json
        assert set(body) == {"member", "condition"}, body
        return dict(body)

    got = explained(ann["id"])
    assert got["member"] is True
    tree = got["condition"]
    assert tree["matched"] is True and tree["logic"] == "OR"
    first, second = tree["groups"]
    assert first["matched"] is True
    assert [f["matched"] for f in first["filters"]] == [True, True]
    assert first["filters"][0] == {**flt("data.plan", "equals", "pro"), "matched": True}
    assert second["matched"] is False
    assert [f["matched"] for f in second["filters"]] == [False]
    assert second["conditions"]["matched"] is False
    assert second["conditions"]["groups"][0]["filters"][0]["matched"] is False

    got = explained(bob["id"])
    assert got["member"] is False
    first, second = got["condition"]["groups"]
    assert [f["matched"] for f in first["filters"]] == [False, False]
    assert second["conditions"]["matched"] is True and second["matched"] is False

    # STATIC: membership of the list, no condition.
    listed = api.static_segment("List")
    api.add(listed["id"], ["bob@x.com"])
    resp = rest.get(f"/segments/{listed['id']}/contacts/{bob['id']}/explain", key=api.key)
    assert resp.status == 200 and resp.json == {"member": True, "condition": None}, resp.raw

    # Unknown ids and other projects' are 404s; no key is a 401.
    for path in (
        f"/segments/{seg['id']}/contacts/{uuid.uuid4()}/explain",
        f"/segments/{uuid.uuid4()}/contacts/{ann['id']}/explain",
        f"/segments/{seg['id']}/contacts/nope/explain",
    ):
        check_error(rest.get(path, key=api.key), 404, "NOT_FOUND")
    path = f"/segments/{seg['id']}/contacts/{ann['id']}/explain"
    check_error(rest.get(path), 401, "MISSING_AUTH")
    check_error(rest.get(path, key=project.public_key), 401, "INVALID_API_KEY")


def test_explain_over_grpc(client: SegmentsClient, target: str, other_project: Project) -> None:
    contact = client.upsert_contact("a@x.com", data={"tags": ["vip"]})
    seg = client.create_segment("VIP", condition=cond(flt("data.tags", "arrayContains", "vip")))
    found = client.explain_membership(seg.id, contact.id)
    assert found.member is True
    assert found.condition is not None
    assert found.condition["groups"][0]["filters"][0]["matched"] is True
    # Another project's key sees neither the segment nor the contact.
    with (
        SegmentsClient(target, other_project.secret_key) as other,
        pytest.raises(NotFoundError),
    ):
        other.explain_membership(seg.id, contact.id)


def _check_tree(
    node: dict[str, Any], raw: dict[str, Any], world: World, person: Any, path: str
) -> None:
    """`node` (explained) has raw's shape, and each part's `matched` is the reference's."""

    def ref(condition: dict[str, Any]) -> bool:
        return evaluate(condition, person, world.events, NOW, world.segments)

    assert node["matched"] is ref(raw), path
    for i, (group, raw_group) in enumerate(zip(node["groups"], raw["groups"], strict=True)):
        at = f"{path}.groups.{i}"
        assert group["matched"] is ref({"logic": "AND", "groups": [raw_group]}), at
        raw_filters = raw_group.get("filters") or []
        assert len(group["filters"]) == len(raw_filters), at
        for j, (f, raw_f) in enumerate(zip(group["filters"], raw_filters, strict=True)):
            assert {k: v for k, v in f.items() if k != "matched"} == raw_f, f"{at}.filters.{j}"
            assert f["matched"] is ref(cond(raw_f)), (f"{at}.filters.{j}", raw_f)
        if raw_group.get("conditions") is not None:
            _check_tree(
                group["conditions"], raw_group["conditions"], world, person, f"{at}.conditions"
            )


def test_explain_agrees_with_membership_and_the_reference(
    sessions: sessionmaker[Session],
) -> None:
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=[
            HealthCheck.function_scoped_fixture,
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
        ],
    )
    @given(world=worlds())
    def run(world: World) -> None:
        with sessions() as session:
            try:
                project_id = _store(session, world)
                for raw in world.conditions:
                    segment_id = uuid.uuid4()
                    session.execute(
                        text(
                            "INSERT INTO segments (project_id, id, name, type, condition) "
                            "VALUES (:p, :id, 'explained', 'DYNAMIC', CAST(:c AS jsonb))"
                        ),
                        {"p": project_id, "id": segment_id, "c": json.dumps(raw)},
                    )
                    statement = member_ids(session, project_id, parse_condition(raw), now=NOW)
                    members = set(session.execute(statement).scalars())
                    for person in world.contacts:
                        found = explain.explain(session, project_id, segment_id, person.id, NOW)
                        assert found.member is (person.id in members), raw
                        assert found.condition is not None
                        _check_tree(found.condition, raw, world, person, "condition")
            finally:
                session.rollback()

    run()
