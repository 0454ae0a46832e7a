"""Segment references: loading what a condition reaches, and bounding the condition it
becomes with every reference to a DYNAMIC segment inlined."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from segments_service.errors import ValidationError
from segments_service.filters.context import SegmentDefinition
from segments_service.filters.limits import MAX_EXPANDED_DEPTH, MAX_EXPANDED_FILTERS
from segments_service.filters.model import Condition, Filter

SegmentLoader = Callable[[set[uuid.UUID]], Mapping[uuid.UUID, SegmentDefinition]]


def load_references(
    condition: Condition, loader: SegmentLoader
) -> dict[uuid.UUID, SegmentDefinition]:
    """Every segment reachable through references, loaded level by level."""
    found: dict[uuid.UUID, SegmentDefinition] = {}
    pending = condition.referenced_segments()
    while pending:
        loaded = loader(pending)
        found.update(loaded)
        nxt: set[uuid.UUID] = set()
        for definition in loaded.values():
            if definition.condition is not None:
                nxt |= definition.condition.referenced_segments()
        pending = nxt - set(found)
    return found


def expands(f: Filter, segments: Mapping[uuid.UUID, SegmentDefinition]) -> bool:
    """Whether compiling `f` inlines another condition: a reference to a DYNAMIC segment."""
    if f.segment_id is None:
        return False
    definition = segments.get(f.segment_id)
    return definition is not None and definition.condition is not None


@dataclass(frozen=True)
class Expansion:
    """A condition with its segment references expanded: how many filters it holds and
    how deep its conditions nest (a condition without nested ones is 1 deep)."""

    filters: int
    depth: int


# What a segment on a reference cycle (refused when saved) counts as: over every limit.
_OVER = Expansion(MAX_EXPANDED_FILTERS + 1, MAX_EXPANDED_DEPTH + 1)


def _walk(condition: Condition, base: str, level: int = 1) -> Iterator[tuple[str, int, Filter]]:
    """Each filter with its dot path and the level of the condition holding it, in
    document order. Recursion is bounded by the validated depth (MAX_DEPTH)."""
    for i, group in enumerate(condition.groups):
        for j, f in enumerate(group.filters):
            yield f"{base}.groups.{i}.filters.{j}", level, f
        if group.conditions is not None:
            yield from _walk(group.conditions, f"{base}.groups.{i}.conditions", level + 1)


def _expansion_of(
    condition: Condition,
    segments: Mapping[uuid.UUID, SegmentDefinition],
    measured: Mapping[uuid.UUID, Expansion],
) -> Expansion:
    filters, depth = 0, 0
    for _path, level, f in _walk(condition, ""):
        if expands(f, segments):
            assert f.segment_id is not None
            inner = measured[f.segment_id]
            filters += inner.filters
            depth = max(depth, level + inner.depth)
        else:
            filters += f.size
            depth = max(depth, level)
    # Capped: diamonds of references would otherwise grow the numbers exponentially.
    return Expansion(min(filters, _OVER.filters), min(depth, _OVER.depth))


def expansions(segments: Mapping[uuid.UUID, SegmentDefinition]) -> dict[uuid.UUID, Expansion]:
    """The expansion of each DYNAMIC segment of `segments`, which holds every segment they
    reach (load_references). Each is measured once, after those it references, with an
    explicit stack: a chain of references costs no Python recursion."""
    measured: dict[uuid.UUID, Expansion] = {}
    for root, definition in segments.items():
        if definition.condition is None or root in measured:
            continue
        stack = [root]
        entered: set[uuid.UUID] = set()
        while stack:
            sid = stack[-1]
            if sid in measured:
                stack.pop()
                continue
            condition = segments[sid].condition
            assert condition is not None
            waiting = [
                f.segment_id
                for f in condition.iter_filters()
                if f.segment_id is not None
                and expands(f, segments)
                and f.segment_id not in measured
            ]
            if not waiting:
                measured[sid] = _expansion_of(condition, segments, measured)
                stack.pop()
            elif sid in entered:
                # Its references were measured first, unless one leads back here: a cycle.
                measured[sid] = _OVER
                stack.pop()
            else:
                entered.add(sid)
                for ref in waiting:
                    if ref in entered:
                        measured[ref] = _OVER
                    else:
                        stack.append(ref)
    return measured


def expansion(condition: Condition, segments: Mapping[uuid.UUID, SegmentDefinition]) -> Expansion:
    """`condition` with the references it reaches (all in `segments`) expanded."""
    return _expansion_of(condition, segments, expansions(segments))


def check_expansion(
    condition: Condition,
    segments: Mapping[uuid.UUID, SegmentDefinition],
    base: str = "condition",
) -> None:
    """Refuse a condition that, with its references (all in `segments`) expanded, holds
    more than MAX_EXPANDED_FILTERS filters or nests more than MAX_EXPANDED_DEPTH deep,
    naming the reference that takes it over the limit."""
    measured = expansions(segments)
    total = sum(1 for f in condition.iter_filters() if not expands(f, segments))
    for path, level, f in _walk(condition, base):
        if not expands(f, segments):
            continue
        assert f.segment_id is not None
        inner = measured[f.segment_id]
        if level + inner.depth > MAX_EXPANDED_DEPTH:
            raise ValidationError.single(
                f"{path}.field",
                f"segment {f.segment_id} nests conditions {inner.depth} deep: referenced here, "
                f"conditions would nest more than {MAX_EXPANDED_DEPTH} deep with references "
                "expanded",
                "too_deep",
            )
        total += inner.filters
        if total > MAX_EXPANDED_FILTERS:
            raise ValidationError.single(
                f"{path}.field",
                f"segment {f.segment_id} expands to {inner.filters} filters: with it, the "
                f"condition holds more than {MAX_EXPANDED_FILTERS} filters with references "
                "expanded",
                "too_many",
            )
