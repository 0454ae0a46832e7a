"""What compiling a condition depends on besides the condition: the evaluation instant and
the referenced segments, and how values derived from the instant enter a statement."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from sqlalchemy import ColumnElement, bindparam, literal
from sqlalchemy.types import DateTime

from segments_service.filters.model import Condition, Filter


@dataclass(frozen=True)
class SegmentDefinition:
    """What the compiler needs to know about a referenced segment."""

    id: uuid.UUID
    type: str
    condition: Condition | None
    # The condition's stored JSON text, when loaded from the table.
    source: str | None = field(default=None, compare=False, repr=False)


# A value of a statement derived from its evaluation instant (a window's start, say).
Derive = Callable[[datetime], Any]


class Part(Protocol):
    """A compiled part of a condition: a filter, or a nested or referenced condition."""

    def truth(self) -> ColumnElement[bool]:
        """Whether the part holds for the contact of the `contacts` row in scope: TRUE or
        FALSE, never NULL."""
        ...


@dataclass
class CompileContext:
    """Inputs of compilation: the evaluation instant and the referenced segments.

    With `relative` (a dict, shared by every condition of one statement), each value
    derived from `now` becomes a named parameter recorded there with how to derive it,
    instead of a literal: the statement then serves any instant, given
    relative_values(relative, instant) as parameters.

    With `parts` (a dict), compiling records there each filter and each nested or
    referenced condition under its dot path (a referenced segment's condition under the
    path of the filter naming it, plus `.condition`): selecting `part.truth()` from
    `contacts` tells which parts hold for each contact, which is what explaining a match
    needs. Recording changes nothing in the statement.
    """

    now: datetime
    segments: Mapping[uuid.UUID, SegmentDefinition] = field(default_factory=dict)
    relative: dict[str, Derive] | None = None
    parts: dict[str, Part] | None = None
    # Filters compiled so far, references expanded, and the current nesting level.
    expanded: int = 0
    level: int = 0


def relative_values(relative: Mapping[str, Derive], now: datetime) -> dict[str, Any]:
    """The parameters of a statement compiled with CompileContext.relative, at `now`."""
    return {name: derive(now) for name, derive in relative.items()}


def at(ctx: CompileContext, derive: Derive, type_: Any) -> ColumnElement[Any]:
    """`derive(ctx.now)` as a value of the statement; see CompileContext.relative."""
    if ctx.relative is None:
        return literal(derive(ctx.now), type_)
    name = f"at_{len(ctx.relative)}"
    ctx.relative[name] = derive
    return bindparam(name, derive(ctx.now), type_=type_)


def now_of(ctx: CompileContext) -> ColumnElement[datetime]:
    return at(ctx, lambda now: now, DateTime(timezone=True))


def window_start(f: Filter, ctx: CompileContext) -> ColumnElement[datetime]:
    """The start of the filter's window."""
    return at(ctx, start_of(f), DateTime(timezone=True))


def start_of(f: Filter) -> Derive:
    """The start of the filter's window (one that ends now) as a function of the instant."""
    window = f.window
    assert window is not None
    return window.before


def end_of(f: Filter) -> Derive:
    """The end of the filter's window (one that starts now: withinNext) as a function of
    the instant."""
    window = f.window
    assert window is not None
    return window.after


def window_end(f: Filter, ctx: CompileContext) -> ColumnElement[datetime]:
    """The end of a withinNext filter's window."""
    return at(ctx, end_of(f), DateTime(timezone=True))
