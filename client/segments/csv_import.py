"""Contacts or events from a CSV file into a project through the public API
(BatchUpsertContacts, IngestEvents), 1,000 rows a call; rows the service or the file's own
shape rejects are set aside with their line numbers and reasons, and the rest is imported."""

from __future__ import annotations

import codecs
import collections
import contextlib
import csv
import io
import math
import queue
import re
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Literal, TextIO

from google.protobuf.message import Message

from segments.client import (
    InvalidArgumentError,
    RateLimitedError,
    SegmentsClient,
    SegmentsError,
)
from segments_api.v1 import contacts_pb2, events_pb2

__all__ = [
    "BATCH_ROWS",
    "MAX_WORKERS",
    "REPORT_COLUMNS",
    "CsvImportError",
    "ImportResult",
    "Layout",
    "Rejected",
    "cell_value",
    "detect_layout",
    "import_csv",
    "parse_occurred_at",
    "write_rejects",
]

#: Rows per call: the most BatchUpsertContacts and IngestEvents take.
BATCH_ROWS = 1000
#: A batch is also cut after this much CSV text, well under the server's 8 MiB message limit.
BATCH_BYTES = 2 * 1024 * 1024
#: Columns a rejects file adds to the file's own; an import skips them, so a rejects file,
#: fixed, is imported as it is.
REPORT_COLUMNS = ("rejected_line", "rejected_reason")

Kind = Literal["contacts", "events"]


class CsvImportError(Exception):
    """The file cannot be imported (no header, no email column, not CSV, not UTF-8), or the
    import stopped (`resume_line` then says where to start again)."""

    def __init__(self, message: str, *, resume_line: int | None = None) -> None:
        super().__init__(message)
        self.resume_line = resume_line
        #: What was done before the import stopped, when it had started.
        self.result: ImportResult | None = None
        #: Batches (first line, last line) after `resume_line` that were imported all the
        #: same: with several workers, one may stop while the others go on.
        self.imported_after: list[tuple[int, int]] = []


# --- the header -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """What each column of a file is: the kind of rows, where their fields are, and the
    data columns (index, key)."""

    kind: Kind
    header: tuple[str, ...]
    email: int
    subscribed: int | None
    event: int | None
    occurred_at: int | None
    data: tuple[tuple[int, str], ...]


def _fold(name: str) -> str:
    return name.strip().lower().replace("_", "").replace(" ", "")


def detect_layout(header: Sequence[str]) -> Layout:
    """Contacts (an `email` column, optional `subscribed`) or events (`email` and `event`,
    optional `occurredAt`), from the header; these names match in any case, and
    `occurred_at` too. Every other column is data, keyed by its name. CsvImportError for a
    header without `email`, a repeated name or an unnamed column."""
    names = [name.strip() for name in header]
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        if not name:
            raise CsvImportError(
                f"column {i + 1} of the header has no name: name it, or remove the column"
            )
        if name in seen:
            raise CsvImportError(
                f"the header names {name!r} twice (columns {seen[name] + 1} and {i + 1})"
            )
        seen[name] = i
    folded: dict[str, int] = {}
    for i, name in enumerate(names):
        key = _fold(name)
        if key in ("email", "event", "subscribed", "occurredat"):
            if key in folded:
                raise CsvImportError(
                    f"the header has two {key!r} columns ({names[folded[key]]!r} and {name!r})"
                )
            folded[key] = i
    if "email" not in folded:
        shown = ", ".join(names[:8]) + (", …" if len(names) > 8 else "")
        raise CsvImportError(
            f"the header has no email column (it has: {shown}); contacts need `email` "
            "(and optionally `subscribed`), events `email,event` (and optionally `occurredAt`)"
        )
    kind: Kind = "events" if "event" in folded else "contacts"
    if kind == "contacts" and "occurredat" in folded:
        raise CsvImportError(
            "the header has occurredAt but no event column: events need `email,event`"
        )
    special = {folded["email"]}
    subscribed = folded.get("subscribed") if kind == "contacts" else None
    event = folded.get("event")
    occurred_at = folded.get("occurredat")
    special.update(i for i in (subscribed, event, occurred_at) if i is not None)
    special.update(i for i, name in enumerate(names) if name in REPORT_COLUMNS)
    data = tuple((i, name) for i, name in enumerate(names) if i not in special)
    return Layout(kind, tuple(names), folded["email"], subscribed, event, occurred_at, data)


# --- the cells --------------------------------------------------------------------------------

# A number as JSON writes it and a spreadsheet shows it: no sign but minus, no leading zero,
# no exponent. "02134" (a zip code), "+4915…" (a phone number) and "1e3" stay text.
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?")
# Integers past 2**53 do not survive a double (protobuf's Struct carries numbers as doubles):
# long ids stay text.
_MAX_EXACT_INTEGER = 2**53
_BOOLEANS = {"true": True, "false": False}


def cell_value(text: str, *, as_text: bool = False) -> Any:
    """The JSON value of a data cell (already stripped, not empty): `true`/`false` in any
    case a boolean, a plain decimal number a number, anything else the text itself; with
    `as_text`, always the text."""
    if as_text:
        return text
    boolean = _BOOLEANS.get(text.lower())
    if boolean is not None:
        return boolean
    if _NUMBER.fullmatch(text):
        if "." not in text:
            number = int(text)
            return number if abs(number) < _MAX_EXACT_INTEGER else text
        value = float(text)
        return value if math.isfinite(value) else text
    return text


_SUBSCRIBED = {
    "true": True,
    "false": False,
    "yes": True,
    "no": False,
    "1": True,
    "0": False,
    "y": True,
    "n": False,
}

_TIMESTAMP = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})(?:[Tt ](\d{2}):(\d{2})(?::(\d{2})(?:\.(\d{1,9}))?)?"
    r"\s*([Zz]|[+-]\d{2}:?\d{2})?)?"
)


def parse_occurred_at(text: str) -> datetime:
    """An RFC 3339 timestamp, also with a space for `T`, without seconds, or without an
    offset (then UTC, as in filters); a date alone (midnight UTC); or epoch milliseconds.
    ValueError otherwise."""
    if text.isdigit():
        return datetime.fromtimestamp(int(text) / 1000, UTC)
    match = _TIMESTAMP.fullmatch(text)
    if match is not None and match.group(7) is None:
        # The common forms, parsed in C (a fraction of the time, at millions of rows).
        with contextlib.suppress(ValueError):
            moment = datetime.fromisoformat(text)
            return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
    if match is None:
        raise ValueError(
            f"occurredAt is not a timestamp (RFC 3339, e.g. 2024-05-01T12:00:00Z): {text!r}"
        )
    year, month, day, hour, minute, second, fraction, offset = match.groups()
    zone = UTC
    if offset and offset not in ("Z", "z"):
        digits = offset[1:].replace(":", "")
        delta = timedelta(hours=int(digits[:2]), minutes=int(digits[2:]))
        zone = timezone(-delta if offset[0] == "-" else delta)
    micros = int((fraction or "0").ljust(6, "0")[:6])
    try:
        return datetime(
            int(year),
            int(month),
            int(day),
            int(hour or 0),
            int(minute or 0),
            int(second or 0),
            micros,
            tzinfo=zone,
        )
    except ValueError as err:
        raise ValueError(f"occurredAt is not a valid time: {text!r} ({err})") from None


# --- rows -------------------------------------------------------------------------------------


@dataclass
class _Row:
    line: int  # where the record starts in the file
    cells: list[str]
    # The message sent: built here, not parsed from JSON by the client (a third of the time).
    item: Message


@dataclass(frozen=True)
class Rejected:
    """A row set aside: its first line in the file, why, and its cells as read."""

    line: int
    reason: str
    cells: tuple[str, ...]


@dataclass
class ImportResult:
    kind: Kind
    #: The file's header, as read.
    header: tuple[str, ...]
    #: Rows read (data rows, not the header; rows before `from_line` are not counted).
    rows: int = 0
    #: Contacts upserted or events recorded.
    imported: int = 0
    created: int = 0
    updated: int = 0
    rejected: list[Rejected] = field(default_factory=list)
    #: How many values of each type every data column gave (column -> {"number": n,
    #: "text": m, "boolean": k}); see `mixed_columns`.
    column_types: dict[str, dict[str, int]] = field(default_factory=dict)
    seconds: float = 0.0

    def mixed_columns(self) -> dict[str, dict[str, int]]:
        """The data columns whose values came out of more than one type (a zip code column
        of "02134" and "10001" gives text and numbers): candidates for `text_columns`."""
        return {key: kinds for key, kinds in self.column_types.items() if len(kinds) > 1}


def _item(
    layout: Layout, cells: list[str], text_columns: frozenset[str] | None
) -> tuple[Message, dict[str, Any]]:
    """The message of one row (UpsertContactRequest or IngestedEvent) and its data;
    ValueError says what is wrong with the row."""
    if len(cells) != len(layout.header):
        raise ValueError(f"has {len(cells)} fields, the header has {len(layout.header)}")
    email = cells[layout.email].strip()
    if not email:
        raise ValueError("email is empty")
    data: dict[str, Any] = {}
    for i, key in layout.data:
        text = cells[i].strip()
        if text:
            # Empty cells are left out: an import never erases what a contact has.
            as_text = text_columns is None or key in text_columns
            data[key] = cell_value(text, as_text=as_text)
    item: contacts_pb2.UpsertContactRequest | events_pb2.IngestedEvent
    if layout.kind == "events":
        assert layout.event is not None
        event = cells[layout.event].strip()
        if not event:
            raise ValueError("event is empty")
        item = events_pb2.IngestedEvent(email=email, event=event)
        if layout.occurred_at is not None:
            moment = cells[layout.occurred_at].strip()
            if moment:
                item.occurred_at.FromDatetime(parse_occurred_at(moment))
    else:
        item = contacts_pb2.UpsertContactRequest(email=email)
        if layout.subscribed is not None:
            raw = cells[layout.subscribed].strip()
            if raw:
                subscribed = _SUBSCRIBED.get(raw.lower())
                if subscribed is None:
                    raise ValueError(f"subscribed must be true or false, got {raw!r}")
                item.subscribed = subscribed
    if data:
        item.data.update(data)
    return item, data


_VIOLATION_ROW = re.compile(r"(?:contacts|events)\.(\d+)(?:\.(.*))?")


def _rejected_rows(err: InvalidArgumentError, size: int) -> dict[int, str]:
    """Rows of a refused batch the error's field violations name, with the reasons; empty
    when a violation is about no row (then the batch as a whole is wrong)."""
    reasons: dict[int, list[str]] = {}
    for violation in err.field_violations:
        match = _VIOLATION_ROW.fullmatch(violation.field)
        if match is None or int(match.group(1)) >= size:
            return {}
        where = match.group(2)
        reasons.setdefault(int(match.group(1)), []).append(
            f"{where}: {violation.description}" if where else violation.description
        )
    return {i: "; ".join(texts) for i, texts in reasons.items()}


# --- reading ------------------------------------------------------------------------------


class _CountingReader(io.RawIOBase):
    """The bytes of a file, counting how many were read (the progress of an import)."""

    def __init__(self, raw: io.BufferedReader) -> None:
        self.raw = raw
        self.count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = self.raw.readinto(buffer)
        self.count += n or 0
        return n or 0


def _records(text: TextIO, path: Path) -> Iterator[tuple[int, list[str]]]:
    """(first line, cells) of each record; a blank line is no record."""
    reader = csv.reader(text, strict=True)
    line = 1
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as err:
            raise CsvImportError(
                f"{path}: line {reader.line_num}: not valid CSV ({err})", resume_line=line
            ) from None
        except UnicodeDecodeError as err:
            raise CsvImportError(
                f"{path}: near line {reader.line_num + 1}: not {text.encoding} text ({err.reason}); "
                "save the file as UTF-8 CSV, or pass its encoding with --encoding",
                resume_line=line,
            ) from None
        if cells:
            yield line, cells
        line = reader.line_num + 1


# --- sending ------------------------------------------------------------------------------


class _Shared:
    """What the senders of one import share: its result, and whether to stop."""

    def __init__(self, result: ImportResult, on_batch: Callable[[int], None]) -> None:
        self.result = result
        self.on_batch = on_batch
        self.lock = threading.Lock()
        # Set to send nothing more: a sender failed, or the import was interrupted. The
        # calls under way complete.
        self.stopped = threading.Event()
        self.failure: CsvImportError | None = None
        # (first line, last line) of every batch the service accepted.
        self.acknowledged: list[tuple[int, int]] = []


class _Stopped(Exception):
    """The import stopped while a batch waited to be sent again."""


class _Sender(threading.Thread):
    """Sends one shard's batches in file order, one call at a time, while the reader
    prepares the next: reading and the server's work overlap. Every row of one email goes to
    the same shard, so a later row of a contact still wins."""

    def __init__(self, client: SegmentsClient, shared: _Shared) -> None:
        super().__init__(name="segments-import", daemon=True)
        self.client = client
        self.shared = shared
        self.batches: queue.Queue[list[_Row] | None] = queue.Queue(maxsize=2)
        # The first line of every batch handed over and not yet done, oldest first (of the
        # one being sent, its first row not yet sent): an import that stops resumes there.
        self.outstanding: collections.deque[int] = collections.deque()

    def hand_over(self, batch: list[_Row]) -> None:
        self.outstanding.append(batch[0].line)
        self.batches.put(batch)

    def run(self) -> None:
        shared = self.shared
        while (batch := self.batches.get()) is not None:
            if shared.stopped.is_set():
                continue
            try:
                self.send(batch)
                self.outstanding.popleft()
            except _Stopped:
                pass
            except Exception as err:  # keeps draining the queue, so the reader never blocks
                with shared.lock:
                    if shared.failure is None:
                        if isinstance(err, CsvImportError):
                            shared.failure = err
                        else:
                            shared.failure = CsvImportError(f"the import failed: {err!r}")
                            shared.failure.__cause__ = err
                shared.stopped.set()
            shared.on_batch(len(batch))

    def send(self, batch: list[_Row]) -> None:
        shared, result = self.shared, self.shared.result
        pending = batch
        while pending:
            try:
                self.call([row.item for row in pending])
                with shared.lock:
                    result.imported += len(pending)
                    shared.acknowledged.append((pending[0].line, pending[-1].line))
                return
            except InvalidArgumentError as err:
                bad = _rejected_rows(err, len(pending))
                if not bad:
                    raise self.stop(pending, err) from None
                with shared.lock:
                    result.rejected.extend(
                        Rejected(row.line, bad[i], tuple(row.cells))
                        for i, row in enumerate(pending)
                        if i in bad
                    )
                pending = [row for i, row in enumerate(pending) if i not in bad]
                if pending:
                    self.outstanding[0] = pending[0].line
            except RateLimitedError as err:
                # Over the project's share (requests at once): wait as long as it says.
                if shared.stopped.wait(err.retry_after if err.retry_after is not None else 1.0):
                    raise _Stopped from None
            except SegmentsError as err:
                raise self.stop(pending, err) from None

    def call(self, items: list[Message]) -> None:
        if self.shared.result.kind == "contacts":
            contacts = [i for i in items if isinstance(i, contacts_pb2.UpsertContactRequest)]
            response = self.client.batch_upsert_contacts(contacts)
            with self.shared.lock:
                self.shared.result.created += response.created
                self.shared.result.updated += response.updated
        else:
            events = [i for i in items if isinstance(i, events_pb2.IngestedEvent)]
            self.client.ingest_events(events)

    def stop(self, pending: list[_Row], err: SegmentsError) -> CsvImportError:
        first, last = pending[0].line, pending[-1].line
        return CsvImportError(
            f"the service refused the batch of lines {first}-{last}: {err}",
            resume_line=first,
        )


#: Most calls one import has in flight (a project's share of a server is 8 by default).
MAX_WORKERS = 8


def _shard(email: str, workers: int) -> int:
    # The service trims and lower-cases emails: rows it takes for one contact share a shard.
    return zlib.crc32(email.strip().lower().encode()) % workers if workers > 1 else 0


def import_csv(
    client: SegmentsClient,
    path: Path,
    *,
    text_columns: Sequence[str] | None = (),
    from_line: int = 2,
    encoding: str = "utf-8-sig",
    workers: int = 1,
    on_progress: Callable[[int, int], None] | None = None,
) -> ImportResult:
    """Import the contacts or events of the CSV file at `path` (see `detect_layout`) with
    `client` (the project's secret key), a batch of up to BATCH_ROWS rows at a time.

    Data cells are typed by `cell_value`, except in `text_columns` (None: every column),
    which keep their text; empty cells are left out. Rows that cannot be sent (a wrong
    number of fields, no email, an unreadable `subscribed` or `occurredAt`) and rows the
    service refuses (an invalid email, a reserved event name) come back in `rejected`;
    every other row is imported. Records starting before `from_line` are skipped (to resume).

    `workers` calls are in flight at once, each for the rows of its share of the emails (so
    the rows of one contact keep their order). `on_progress(bytes read, rows done)` is
    called after each batch. CsvImportError when the file cannot be read or the service
    refuses a batch for another reason than its rows; its `resume_line` is the first line
    not known to be imported, and its `imported_after` the batches after that line that
    were (with one worker, none)."""
    started = time.monotonic()
    if not 1 <= workers <= MAX_WORKERS:
        raise CsvImportError(f"workers must be 1 to {MAX_WORKERS}, got {workers}")
    try:
        codecs.lookup(encoding)
    except LookupError:
        raise CsvImportError(f"unknown encoding {encoding!r}") from None
    try:
        raw = path.open("rb")
    except OSError as err:
        raise CsvImportError(f"cannot read {path}: {err.strerror or err}") from None
    counting = _CountingReader(raw)
    with raw, io.TextIOWrapper(io.BufferedReader(counting), encoding=encoding, newline="") as text:
        records = _records(text, path)
        first = next(records, None)
        if first is None:
            raise CsvImportError(f"{path} is empty: the first line must be the header")
        layout = detect_layout(first[1])
        wanted = None if text_columns is None else frozenset(c.strip() for c in text_columns)
        if wanted:
            unknown = sorted(wanted - {key for _, key in layout.data})
            if unknown:
                raise CsvImportError(
                    f"no data column named {', '.join(map(repr, unknown))} in the header"
                )
        result = ImportResult(layout.kind, layout.header)
        done = 0

        def on_batch(rows: int) -> None:
            nonlocal done
            with shared.lock:
                done += rows
                rows_done = done
            if on_progress is not None:
                on_progress(counting.count, rows_done)

        shared = _Shared(result, on_batch)
        senders = [_Sender(client, shared) for _ in range(workers)]
        for sender in senders:
            sender.start()
        # Each shard's rows read but not handed to its sender yet, and their size.
        batches: list[list[_Row]] = [[] for _ in senders]
        sizes = [0] * workers
        failure: CsvImportError | None = None
        try:
            for line, cells in records:
                if line < from_line:
                    continue
                if shared.stopped.is_set():
                    break
                result.rows += 1
                try:
                    item, data = _item(layout, cells, wanted)
                except ValueError as err:
                    with shared.lock:
                        result.rejected.append(Rejected(line, str(err), tuple(cells)))
                    continue
                _note_types(result, data)
                shard = _shard(cells[layout.email], workers)
                batch = batches[shard]
                batch.append(_Row(line, cells, item))
                sizes[shard] += sum(map(len, cells))
                if len(batch) == BATCH_ROWS or sizes[shard] >= BATCH_BYTES:
                    senders[shard].hand_over(batch)
                    batches[shard], sizes[shard] = [], 0
            for shard, sender in enumerate(senders):
                if batches[shard] and not shared.stopped.is_set():
                    sender.hand_over(batches[shard])
                    batches[shard] = []
        except KeyboardInterrupt:
            shared.stopped.set()
            failure = CsvImportError("interrupted")
        except CsvImportError as err:
            failure = err
        finally:
            for sender in senders:
                sender.batches.put(None)
            for sender in senders:
                sender.join()
        failure = shared.failure or failure
    result.seconds = time.monotonic() - started
    if failure is not None:
        # Rows from the resume line on are read again by the import that resumes: the first
        # batch not acknowledged, else the first row not sent, else where reading failed.
        candidates = [
            *(sender.outstanding[0] for sender in senders if sender.outstanding),
            *(batch[0].line for batch in batches if batch),
            failure.resume_line,
        ]
        stop = min((line for line in candidates if line is not None), default=None)
        failure.resume_line = stop
        if stop is not None:
            result.rejected = [r for r in result.rejected if r.line < stop]
            # Shards interleave: a batch accepted may span the resume line.
            failure.imported_after = sorted(
                (max(first, stop + 1), last) for first, last in shared.acknowledged if last > stop
            )
        result.rejected.sort(key=lambda r: r.line)
        failure.result = result
        raise failure
    result.rejected.sort(key=lambda r: r.line)
    return result


def _note_types(result: ImportResult, data: Mapping[str, Any]) -> None:
    for key, value in data.items():
        kind = (
            "boolean"
            if isinstance(value, bool)
            else "number"
            if isinstance(value, (int, float))
            else "text"
        )
        counts = result.column_types.setdefault(key, {})
        counts[kind] = counts.get(kind, 0) + 1


def write_rejects(result: ImportResult, out: TextIO) -> None:
    """The rejected rows as CSV: the file's own columns (its report columns replaced), then
    `rejected_line` and `rejected_reason`. Fixed, the file imports as it is."""
    header = result.header
    keep = [i for i, name in enumerate(header) if name.strip() not in REPORT_COLUMNS]
    writer = csv.writer(out)
    writer.writerow([*(header[i] for i in keep), *REPORT_COLUMNS])
    for row in result.rejected:
        cells = [row.cells[i] if i < len(row.cells) else "" for i in keep]
        # A row with more fields than the header keeps its extra cells before the report.
        cells += list(row.cells[len(header) :])
        writer.writerow([*cells, row.line, row.reason])
