"""A segment's members as CSV, written as `GET /segments/{id}/export` writes them, from the
ExportSegmentContacts stream (one snapshot, read as it comes)."""

from __future__ import annotations

import csv
import itertools
import json
import math
from collections.abc import Iterable
from typing import Any, TextIO

from google.protobuf import json_format

from segments.client import Contact, SegmentsClient

__all__ = ["CSV_COLUMNS", "contact_row", "data_json", "export_csv", "write_contacts"]

#: The header of the export, REST's and this one alike.
CSV_COLUMNS = ("id", "email", "subscribed", "createdAt", "updatedAt", "data")


def _jsonb_order(key: str) -> tuple[int, bytes]:
    # PostgreSQL's jsonb keeps an object's keys shorter first, then by their bytes: the
    # order the REST export prints them in (gRPC's Struct is a map, without an order).
    raw = key.encode()
    return len(raw), raw


def _normalized(value: Any) -> Any:
    """`value` with keys in jsonb's order and integral numbers as integers (Struct carries
    every number as a double; 5 was stored as 5)."""
    if isinstance(value, float):
        if math.isfinite(value) and value.is_integer() and abs(value) < 2**53:
            return int(value)
        return value
    if isinstance(value, dict):
        return {k: _normalized(value[k]) for k in sorted(value, key=_jsonb_order)}
    if isinstance(value, list):
        return [_normalized(v) for v in value]
    return value


def data_json(contact: Contact) -> str:
    """The contact's data as the export's compact JSON."""
    data = json_format.MessageToDict(contact.data) if contact.HasField("data") else {}
    return json.dumps(_normalized(data), ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def contact_row(contact: Contact) -> tuple[str, str, str, str, str, str]:
    """One contact as CSV_COLUMNS: `subscribed` as true/false, timestamps as the JSON API
    writes them (RFC 3339 UTC), `data` as compact JSON."""
    return (
        contact.id,
        contact.email,
        "true" if contact.subscribed else "false",
        contact.created_at.ToJsonString(),
        contact.updated_at.ToJsonString(),
        data_json(contact),
    )


def write_contacts(contacts: Iterable[Contact], out: TextIO) -> int:
    """Write the header and one row per contact (the csv module's quoting: CRLF line ends,
    a field quoted when it holds a comma, a quote or a line break); answers the count.
    `out` should be opened with newline=""."""
    writer = csv.writer(out)
    writer.writerow(CSV_COLUMNS)
    count = 0
    for contact in contacts:
        writer.writerow(contact_row(contact))
        count += 1
    return count


def export_csv(client: SegmentsClient, segment_id: str, out: TextIO) -> int:
    """Every current member of the segment, from one snapshot, as CSV into `out`. A refusal
    (no such segment, a wrong key) raises before anything is written."""
    contacts = client.export_segment_contacts(segment_id)
    first = next(contacts, None)
    return write_contacts(itertools.chain([] if first is None else [first], contacts), out)
