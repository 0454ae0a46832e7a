"""Why a contact is (or is not) a member: the segment's condition tree with the truth of
every filter, group and condition for that contact, now.

The truths come from the compiler itself, not from a second evaluator that could disagree
with it: compiling records the node of every part (filters.CompileContext.parts), and one
statement selects each node's truth for the contact, scoped to that contact so every
event read is an index probe. `member` is the truth of the whole condition, the same the
segment's membership is computed from.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import literal, select
from sqlalchemy.orm import Session

from segments_service import membership, segments, tables
from segments_service.contacts import get_contact
from segments_service.filters import (
    CompileContext,
    Part,
    compile_members,
    load_references,
    parse_condition,
)


@dataclass(frozen=True)
class Explanation:
    member: bool
    # The condition's JSON with `matched` on every filter, group and condition; None for
    # a STATIC segment.
    condition: dict[str, Any] | None


def explain(
    session: Session,
    project_id: uuid.UUID,
    segment_id: uuid.UUID,
    contact_id: uuid.UUID,
    now: datetime | None = None,
) -> Explanation:
    """The truths at `now` (default: the database's clock)."""
    row = segments.get_row(session, project_id, segment_id)
    get_contact(session, project_id, contact_id)  # NotFound for another project's contact
    if row.condition is None:
        s = tables.static_members.c
        listed = session.execute(
            select(literal(1)).where(
                s.project_id == project_id, s.segment_id == segment_id, s.contact_id == contact_id
            )
        ).first()
        return Explanation(listed is not None, None)
    condition = parse_condition(row.condition)
    refs = load_references(
        condition, lambda ids: membership.load_definitions(session, project_id, ids)
    )
    parts: dict[str, Part] = {}
    ctx = CompileContext(now=now or membership.db_now(session), segments=refs, parts=parts)
    compile_members(condition, ctx, project_id, tables.any_uuid([contact_id]))
    # Only the segment's own tree: a referenced segment's parts are summed up by the
    # filter naming it.
    paths = [p for p in parts if p == "condition" or ".condition." not in p + "."]
    c = tables.contacts.c
    labels = {path: f"p{i}" for i, path in enumerate(paths)}
    truths = session.execute(
        select(*(parts[path].truth().label(labels[path]) for path in paths)).where(
            c.project_id == project_id, c.id == contact_id
        )
    ).one()
    matched = {path: bool(getattr(truths, labels[path])) for path in paths}
    return Explanation(matched["condition"], _annotate(row.condition, "condition", matched))


def _annotate(node: Any, path: str, matched: dict[str, bool]) -> dict[str, Any]:
    """A condition's JSON with `matched` on each part."""
    out: dict[str, Any] = dict(node)
    out["matched"] = matched[path]
    groups = []
    for i, group in enumerate(out.get("groups", [])):
        at = f"{path}.groups.{i}"
        annotated = dict(group)
        annotated["filters"] = [
            {**f, "matched": matched[f"{at}.filters.{j}"]}
            for j, f in enumerate(group.get("filters") or [])
        ]
        if group.get("conditions") is not None:
            annotated["conditions"] = _annotate(group["conditions"], f"{at}.conditions", matched)
        annotated["matched"] = matched[at]
        groups.append(annotated)
    out["groups"] = groups
    return out
