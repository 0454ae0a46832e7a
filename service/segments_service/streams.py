"""Server streams on the event loop: the membership feed (WatchSegmentEvents) and exports
(ExportSegmentContacts, and ExportSegmentCsv: the same rows as CSV).

A stream holds no worker thread while it waits. Watch streams sleep until the one shared
poller of this server (FeedWatch) sees their project's feed move; exports wait on the
caller's flow control, and close (releasing their snapshot) when the caller takes nothing
for EXPORT_IDLE_SECONDS. Every stream re-checks its key every REAUTH_SECONDS, so a revoked
key ends it within that time, and counts against its project's stream limit (fairness.py).
"""

from __future__ import annotations

import asyncio
import csv
import io
import logging
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from google.api import httpbody_pb2
from sqlalchemy import bindparam, text
from sqlalchemy.orm import Session, sessionmaker

from segments_api.v1 import resources_pb2, segments_pb2
from segments_service import tables
from segments_service.jsonutil import dumps

log = logging.getLogger(__name__)

# How often the shared poller reads the feed positions of the projects being watched.
FEED_POLL_SECONDS = 0.2
# How often a stream checks that its key is still live (docs/limits.md: a revoked key ends it in 5 s).
REAUTH_SECONDS = 2.0
# An export whose reader takes nothing for this long is closed and its snapshot released.
EXPORT_IDLE_SECONDS = 60.0
# ExportSegmentContacts' messages: this many contacts at most, and about this many bytes
# (a message is sent before the contact that would take it past; one contact alone may).
EXPORT_BATCH_CONTACTS = 1000
EXPORT_BATCH_BYTES = 1 << 20
# ExportSegmentCsv: the header row of GET /segments/{id}/export and the type of its body.
CSV_COLUMNS = ("id", "email", "subscribed", "createdAt", "updatedAt", "data")
CSV_CONTENT_TYPE = "text/csv; charset=utf-8"

_POSITIONS = text(
    "SELECT project_id, last_seq FROM feed_positions WHERE project_id = ANY(:ids)"
).bindparams(bindparam("ids", type_=tables.UUID_ARRAY))


@dataclass
class _Watched:
    waiters: int = 0
    last_seq: int | None = None
    moved: asyncio.Condition = field(default_factory=asyncio.Condition)


class FeedWatch:
    """Tells waiting Watch streams when their project's feed moves: one statement per
    FEED_POLL_SECONDS for the whole server, however many streams are open."""

    def __init__(self, sessions: sessionmaker[Session], run: Callable[..., Any]) -> None:
        self.sessions = sessions
        self.run = run  # runs a blocking function off the event loop
        self.projects: dict[uuid.UUID, _Watched] = {}
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._poll(), name="feed-watch")

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)

    def known(self, project_id: uuid.UUID) -> int | None:
        watched = self.projects.get(project_id)
        return None if watched is None else watched.last_seq

    async def wait_beyond(self, project_id: uuid.UUID, seq: int, timeout: float) -> None:
        """Until the project's feed has a position after `seq`, or `timeout` passes."""
        watched = self.projects.setdefault(project_id, _Watched())
        watched.waiters += 1
        try:
            async with watched.moved:
                await asyncio.wait_for(
                    watched.moved.wait_for(
                        lambda: watched.last_seq is not None and watched.last_seq > seq
                    ),
                    timeout,
                )
        except TimeoutError:
            pass
        finally:
            watched.waiters -= 1
            if not watched.waiters and self.projects.get(project_id) is watched:
                del self.projects[project_id]

    def _read(self, ids: list[uuid.UUID]) -> dict[uuid.UUID, int]:
        with self.sessions.begin() as session:
            return {
                r.project_id: int(r.last_seq) for r in session.execute(_POSITIONS, {"ids": ids})
            }

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(FEED_POLL_SECONDS)
            ids = [pid for pid, w in self.projects.items() if w.waiters]
            if not ids:
                continue
            try:
                positions = await self.run(self._read, ids)
            except Exception as exc:  # the database may be restarting: streams re-read anyway
                log.warning("feed poll failed: %s", exc)
                continue
            for pid in ids:
                watched = self.projects.get(pid)
                seq = positions.get(pid, 0)
                if watched is not None and seq != watched.last_seq:
                    async with watched.moved:
                        watched.last_seq = seq
                        watched.moved.notify_all()


class Reauthenticate:
    """Whether a stream's key should be checked again now."""

    def __init__(self) -> None:
        self.at = time.monotonic()

    def due(self) -> bool:
        now = time.monotonic()
        if now - self.at < REAUTH_SECONDS:
            return False
        self.at = now
        return True


def next_export_message(
    contacts: Iterator[resources_pb2.Contact], pending: list[resources_pb2.Contact]
) -> segments_pb2.ExportSegmentContactsResponse | None:
    """The next message of an export: contacts from `contacts` up to EXPORT_BATCH_CONTACTS
    and (unless one contact alone is larger) EXPORT_BATCH_BYTES. `pending` carries the
    contact that did not fit into the next call. None when nothing is left."""
    batch = pending[:]
    pending.clear()
    size = sum(c.ByteSize() for c in batch)
    for contact in contacts:
        contact_size = contact.ByteSize()
        full = len(batch) == EXPORT_BATCH_CONTACTS or size + contact_size > EXPORT_BATCH_BYTES
        if batch and full:
            pending.append(contact)
            break
        batch.append(contact)
        size += contact_size
    return segments_pb2.ExportSegmentContactsResponse(contacts=batch) if batch else None


def export_messages(
    contacts: Iterator[resources_pb2.Contact],
) -> Iterator[segments_pb2.ExportSegmentContactsResponse]:
    """ExportSegmentContacts' messages, one per next_export_message."""
    pending: list[resources_pb2.Contact] = []
    while (message := next_export_message(contacts, pending)) is not None:
        yield message


def rfc3339(moment: datetime) -> str:
    """`moment` in UTC as the REST JSON writes a timestamp (protobuf's JSON mapping: no
    fraction, or 3 or 6 digits, whichever holds it exactly), so that a value read from the
    CSV compares equal to the API's."""
    utc = moment.astimezone(UTC)
    text = utc.strftime("%Y-%m-%dT%H:%M:%S")
    micros = utc.microsecond
    if micros == 0:
        return text + "Z"
    if micros % 1000 == 0:
        return f"{text}.{micros // 1000:03d}Z"
    return f"{text}.{micros:06d}Z"


def csv_row(row: Any) -> tuple[str, str, str, str, str, str]:
    """A contact (a row of the contacts table) as CSV_COLUMNS: `subscribed` as true/false,
    `data` as compact JSON (keys as stored, integral numbers without a fraction)."""
    return (
        str(row.id),
        row.email,
        "true" if row.subscribed else "false",
        rfc3339(row.created_at),
        rfc3339(row.updated_at),
        dumps(row.data),
    )


def csv_messages(rows: Iterable[Any]) -> Iterator[httpbody_pb2.HttpBody]:
    """ExportSegmentCsv's messages: the header row, then the rows of `rows` (contacts), each
    message holding whole rows, up to EXPORT_BATCH_CONTACTS of them and (unless one row
    alone is larger) about EXPORT_BATCH_BYTES. Quoting is the csv module's (the excel
    dialect of RFC 4180: CRLF line ends, a field quoted when it holds a comma, a quote or
    a line break, quotes doubled). The first message always comes, with the header alone
    for a segment without members; every message carries the content type."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(CSV_COLUMNS)
    in_buffer = 0

    def take() -> httpbody_pb2.HttpBody:
        data = buffer.getvalue().encode()
        buffer.seek(0)
        buffer.truncate()
        return httpbody_pb2.HttpBody(content_type=CSV_CONTENT_TYPE, data=data)

    sent = False
    for row in rows:
        writer.writerow(csv_row(row))
        in_buffer += 1
        # tell() counts characters, not bytes: "about" the bound, as for the other export.
        if in_buffer == EXPORT_BATCH_CONTACTS or buffer.tell() >= EXPORT_BATCH_BYTES:
            yield take()
            sent = True
            in_buffer = 0
    if in_buffer or not sent:
        yield take()
