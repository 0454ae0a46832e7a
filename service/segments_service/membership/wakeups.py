"""When time alone can next change a contact's answer to a window on a data timestamp.

A window filter on `data.<key>` (within, olderThan, withinNext) turns at instants fixed by
the contact's timestamp t and the window W: `within` at t (a future date is reached) and
t + W (it leaves), `olderThan` at t + W, `withinNext` at t - W (it comes within reach) and
t (it passes). Each contact of a project whose stored segments have such windows keeps, in
`contact_wakeups`, the earliest of those instants at or after its last evaluation; the
sweeper re-evaluates the contacts due (an index range on wake_at) instead of reading every
contact's data each period (sweeper.py), and their rows move on to the next instant.

Rows are written where contacts are evaluated: by writes of contact data
(refresh_contacts) and by the sweeper. Which windows they were computed for is recorded
per project (`wakeup_definitions`, as a signature of the windows): when a segment change
alters them, the sweeper's next pass is a full one that recomputes every row.

Calendar months have no fixed length: t ± N months is computed in UTC as the compiler
computes a window's start (filters.add_months), and the first instant of the following
month is a candidate too, for a day the shorter month lacks (the window's start then stays
on the month's last day until the month turns). An early wake costs one re-evaluation; a
late one would be a missed exit, so candidates err early.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Select, and_, case, delete, func, literal, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session
from sqlalchemy.types import DateTime, Interval

from segments_service import tables
from segments_service.filters import Filter, Kind, Op, Window, window_value
from segments_service.membership.dynamic import Dynamic


def data_windows(segments: Iterable[Dynamic]) -> list[Filter]:
    """The distinct window filters on data timestamps of these segments (references
    inlined), in a stable order."""
    found: dict[tuple[Any, ...], Filter] = {}
    for seg in segments:
        for f in seg.filters():
            if f.kind is Kind.DATA and f.window is not None:
                found.setdefault(_key(f), f)
    return [found[k] for k in sorted(found, key=repr)]


def _key(f: Filter) -> tuple[Any, ...]:
    assert f.window is not None
    return (getattr(f, "path", ()), f.operator.value, f.window.span, f.window.months)


def signature(windows: Sequence[Filter]) -> str:
    """What the project's rows were computed for: changes when the windows change."""
    return json.dumps([repr(_key(f)) for f in windows])


def next_change(windows: Sequence[Filter], now: datetime) -> ColumnElement[datetime]:
    """The earliest instant at or after `now` when one of the windows may turn for the
    contact of the `contacts` row in scope; NULL when none ever will."""
    at = literal(now, DateTime(timezone=True))
    candidates: list[ColumnElement[datetime]] = []
    for f in windows:
        assert f.window is not None
        t = window_value(f)
        if f.operator is Op.WITHIN:
            candidates += [t, *_shifted(t, f.window, 1)]
        elif f.operator is Op.OLDER_THAN:
            candidates += _shifted(t, f.window, 1)
        elif f.operator is Op.WITHIN_NEXT:
            candidates += [*_shifted(t, f.window, -1), t]
    return func.least(*(case((x >= at, x)) for x in candidates))


def _shifted(t: ColumnElement[datetime], window: Window, sign: int) -> list[ColumnElement[Any]]:
    if window.span is not None:
        span = literal(window.span, Interval)
        return [t + span if sign > 0 else t - span]
    # In UTC, whatever the session's time zone: timestamps without one, then back.
    utc = func.timezone("UTC", t)
    moved = utc + func.make_interval(0, sign * window.months, type_=Interval)
    month_after = func.date_trunc("month", moved) + func.make_interval(0, 1, type_=Interval)
    return [func.timezone("UTC", moved), func.timezone("UTC", month_after)]


def refresh(
    session: Session,
    project_id: uuid.UUID,
    windows: Sequence[Filter],
    now: datetime,
    ids: Sequence[uuid.UUID] | None = None,
    first: uuid.UUID | None = None,
    last: uuid.UUID | None = None,
) -> None:
    """Recompute the rows of the contacts `ids` (or of the contacts from `first` to `last`,
    a slice in id order) at `now`: two statements, so a deleted contact loses its row."""
    w = tables.contact_wakeups
    c = tables.contacts.c
    if ids is not None:
        mine = w.c.contact_id == tables.any_uuid(ids)
        theirs = c.id == tables.any_uuid(ids)
    else:
        assert first is not None and last is not None
        mine = and_(w.c.contact_id >= first, w.c.contact_id <= last)
        theirs = and_(c.id >= first, c.id <= last)
    session.execute(delete(w).where(w.c.project_id == project_id, mine))
    if not windows:
        return
    computed = (
        select(c.project_id, c.id.label("contact_id"), next_change(windows, now).label("wake_at"))
        .where(c.project_id == project_id, theirs)
        .subquery()
    )
    session.execute(
        pg_insert(w).from_select(
            ["project_id", "contact_id", "wake_at"],
            select(computed).where(computed.c.wake_at.is_not(None)),
        )
    )


def due(project_id: uuid.UUID, now: datetime) -> Select[Any]:
    """The ids (`contact_id`) of the contacts whose answer may have turned by `now`."""
    w = tables.contact_wakeups.c
    return select(w.contact_id).where(w.project_id == project_id, w.wake_at <= now)


def recorded(session: Session, project_id: uuid.UUID) -> str | None:
    d = tables.wakeup_definitions.c
    found = session.execute(select(d.signature).where(d.project_id == project_id)).scalar()
    return None if found is None else str(found)


def record(session: Session, project_id: uuid.UUID, windows: Sequence[Filter]) -> None:
    """Every row of the project is now computed for these windows."""
    d = tables.wakeup_definitions
    value = signature(windows)
    session.execute(
        pg_insert(d)
        .values(project_id=project_id, signature=value)
        .on_conflict_do_update(index_elements=[d.c.project_id], set_={"signature": value})
    )
