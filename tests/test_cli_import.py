"""`segments import` and `segments export`, run as a user would against the in-process server:
contacts and events files, typed data cells, rejected rows with their lines, the rejects
file imported again once fixed, resuming, and a clear error for every mistake."""

from __future__ import annotations

import csv
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import grpc
import pytest
from sqlalchemy import Engine, text

from segments import F, SegmentsClient, UnavailableError
from segments.csv_import import (
    CsvImportError,
    cell_value,
    detect_layout,
    import_csv,
    parse_occurred_at,
)
from segments_api.v1 import events_pb2
from tests.conftest import Project

SEGMENTS = Path(sys.executable).parent / "segments"


def segments(
    *args: str | Path, key: str | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    environ = {**os.environ, "LOG_LEVEL": "WARNING", **(env or {})}
    environ.pop("SEGMENTS_API_KEY", None)
    if key is not None:
        environ["SEGMENTS_API_KEY"] = key
    return subprocess.run(
        [str(SEGMENTS), *map(str, args)],
        env=environ,
        capture_output=True,
        text=True,
        timeout=600,
    )


def write_csv(path: Path, rows: Sequence[Sequence[Any]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows)
    return path


def summary(done: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def contact_data(engine: Engine, project: Project) -> dict[str, tuple[bool, dict[str, Any]]]:
    with engine.connect() as conn:
        rows = conn.execute(
            text("SELECT email, subscribed, data FROM contacts WHERE project_id = :p"),
            {"p": project.id},
        ).all()
    return {row.email: (row.subscribed, row.data) for row in rows}


# --- typing and the header, without a server ----------------------------------------------


@pytest.mark.parametrize(
    ("cell", "value"),
    [
        ("42", 42),
        ("-3", -3),
        ("0", 0),
        ("19.90", 19.9),
        ("true", True),
        ("FALSE", False),
        ("True", True),
        ("02134", "02134"),  # a zip code keeps its leading zero
        ("+14155550100", "+14155550100"),  # a phone number
        ("1e3", "1e3"),
        ("1,5", "1,5"),
        (".5", ".5"),
        ("NaN", "NaN"),
        ("12345678901234567890", "12345678901234567890"),  # past 2**53: an id, kept exact
        ("2024-05-01", "2024-05-01"),  # dates stay strings: the time operators read them
        ("yes", "yes"),
        ("premium", "premium"),
    ],
)
def test_cell_values(cell: str, value: Any) -> None:
    got = cell_value(cell)
    assert got == value and type(got) is type(value)
    assert cell_value(cell, as_text=True) == cell


def test_the_header_decides_the_kind() -> None:
    contacts = detect_layout(["Email", "Subscribed", "plan", "seats"])
    assert contacts.kind == "contacts"
    assert (contacts.email, contacts.subscribed) == (0, 1)
    assert contacts.data == ((2, "plan"), (3, "seats"))
    events = detect_layout(["email", "event", "occurred_at", "amount", "subscribed"])
    assert events.kind == "events"
    assert (events.event, events.occurred_at) == (1, 2)
    # In an events file `subscribed` is the event's data like any other column.
    assert events.data == ((3, "amount"), (4, "subscribed"))
    # A rejects file's report columns are never data.
    again = detect_layout(["email", "plan", "rejected_line", "rejected_reason"])
    assert again.data == ((1, "plan"),)


def test_timestamps_of_events() -> None:
    assert parse_occurred_at("2024-05-01T12:30:00Z").isoformat() == "2024-05-01T12:30:00+00:00"
    assert parse_occurred_at("2024-05-01 12:30").isoformat() == "2024-05-01T12:30:00+00:00"
    assert (
        parse_occurred_at("2024-05-01T12:30:00.123456+02:00").isoformat()
        == "2024-05-01T12:30:00.123456+02:00"
    )
    assert parse_occurred_at("2024-05-01").isoformat() == "2024-05-01T00:00:00+00:00"
    assert parse_occurred_at("1714566600000").isoformat() == "2024-05-01T12:30:00+00:00"
    for bad in ("yesterday", "2024-13-01", "01/05/2024", "2024-05-01T25:00"):
        with pytest.raises(ValueError):
            parse_occurred_at(bad)


class FailingClient:
    """Stands in for SegmentsClient: accepts every batch but the one holding `fail_email`,
    which the service answers UNAVAILABLE (as when its database went away)."""

    def __init__(self, fail_email: str) -> None:
        self.fail_email = fail_email
        self.accepted: list[str] = []
        self.lock = threading.Lock()

    def ingest_events(self, events: list[events_pb2.IngestedEvent]) -> None:
        emails = [e.email for e in events]
        if self.fail_email in emails:
            raise UnavailableError(grpc.StatusCode.UNAVAILABLE, "database unreachable")
        time.sleep(0.01)
        with self.lock:
            self.accepted += emails


@pytest.mark.parametrize("workers", [1, 3])
def test_a_stopped_import_says_where_to_resume(tmp_path: Path, workers: int) -> None:
    rows: list[list[Any]] = [["email", "event"]]
    rows += [[f"user{i}@example.com", "visit"] for i in range(10_000)]
    rows[5] = ["", "visit"]  # line 6: rejected before sending
    source = write_csv(tmp_path / "events.csv", rows)
    fake = FailingClient("user4321@example.com")  # line 4323
    with pytest.raises(CsvImportError) as stopped:
        import_csv(cast(SegmentsClient, fake), source, workers=workers)
    err = stopped.value
    assert err.result is not None and err.resume_line is not None
    accepted = {int(email[4:].split("@")[0]) + 2 for email in fake.accepted}  # their lines
    # Every line before the resume line was imported (or rejected), none at it.
    assert set(range(2, err.resume_line)) - {6} <= accepted
    assert err.resume_line not in accepted and err.resume_line <= 4323
    assert [r.line for r in err.result.rejected] == [6]
    # What went in past the resume line is named, batch by batch.
    after = {line for line in accepted if line > err.resume_line}
    named = {line for a, b in err.imported_after for line in range(a, b + 1)}
    assert after <= named
    if workers == 1:
        # Batches of 1,000 rows sent: lines 2-1002 (line 6 rejected), 1003-2002, …
        assert err.resume_line == 4003 and err.imported_after == []
    assert err.result.imported == len(fake.accepted)


# --- contacts -------------------------------------------------------------------------------


def test_contacts_import_types_data_and_reports_rejected_rows(
    tmp_path: Path, target: str, project: Project, engine: Engine, client: SegmentsClient
) -> None:
    source = write_csv(
        tmp_path / "contacts.csv",
        [
            ["email", "subscribed", "plan", "seats", "vip", "zip", "signup"],
            ["Ada@Example.com", "true", "premium", "5", "TRUE", "02134", "2024-05-01"],
            ["grace@example.com", "no", "free", "1", "false", "10001", ""],
            ["not-an-email", "", "free", "", "", "", ""],  # line 4: the service refuses it
            ["linus@example.com", "maybe", "free", "2", "", "", ""],  # line 5: subscribed
            ["", "true", "free", "", "", "", ""],  # line 6: no email
            ["ken@example.com", "", "pro"],  # line 7: too few fields
            ["dennis@example.com", "", "pro, annual", "3", "", "", ""],
        ],
    )
    done = segments("import", source, "--target", target, key=project.secret_key)
    assert done.returncode == 2, done.stderr
    result = summary(done)
    assert result["kind"] == "contacts"
    assert (result["rows"], result["imported"], result["rejected"]) == (7, 3, 4)
    assert (result["created"], result["updated"]) == (3, 0)
    rejects = tmp_path / "contacts.rejects.csv"
    assert result["rejectsFile"] == str(rejects)
    for line in (4, 5, 6, 7):
        assert f"contacts.csv:{line}: rejected:" in done.stderr
    assert "is not a valid email address" in done.stderr
    assert "subscribed must be true or false, got 'maybe'" in done.stderr
    assert "email is empty" in done.stderr
    assert "has 3 fields, the header has 7" in done.stderr
    # The zip column got text ("02134") and a number (10001): the import says so.
    assert "column 'zip' holds values of several types" in done.stderr
    assert "--text zip" in done.stderr

    stored = contact_data(engine, project)
    assert stored["ada@example.com"] == (
        True,
        {"plan": "premium", "seats": 5, "vip": True, "zip": "02134", "signup": "2024-05-01"},
    )
    # Empty cells are left out, not stored as "" or null.
    assert stored["grace@example.com"] == (
        False,
        {"plan": "free", "seats": 1, "vip": False, "zip": 10001},
    )
    assert stored["dennis@example.com"] == (True, {"plan": "pro, annual", "seats": 3})
    # Typed values are what filters compare: numbers with numbers, booleans with booleans.
    assert client.count_matching_contacts(F.data("seats") >= 3) == 2
    assert client.count_matching_contacts(F.data("vip") == True) == 1  # noqa: E712
    assert client.count_matching_contacts(F.data("signup").older_than(1, "days")) == 1

    with rejects.open(newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert rows[0] == [
        "email",
        "subscribed",
        "plan",
        "seats",
        "vip",
        "zip",
        "signup",
        "rejected_line",
        "rejected_reason",
    ]
    assert [row[-2] for row in rows[1:]] == ["4", "5", "6", "7"]
    assert rows[1][:3] == ["not-an-email", "", "free"]

    # Fixed, the rejects file is imported as it is; it is then removed (nothing rejected).
    fixed = [rows[0]] + [
        [
            {"not-an-email": "alan@example.com", "": "barbara@example.com"}.get(row[0], row[0]),
            "yes" if row[1] == "maybe" else row[1],
            *row[2:],
        ]
        for row in rows[1:]
        if row[-2] != "7"
    ]
    write_csv(rejects, fixed)
    again = segments("import", rejects, "--target", target, key=project.secret_key)
    assert again.returncode == 0, again.stderr
    assert summary(again)["imported"] == 3
    stored = contact_data(engine, project)
    assert stored["alan@example.com"] == (True, {"plan": "free"})
    assert stored["linus@example.com"] == (True, {"plan": "free", "seats": 2})
    assert not (tmp_path / "contacts.rejects.rejects.csv").exists()


def test_strings_and_text_columns_keep_text(
    tmp_path: Path, target: str, project: Project, engine: Engine
) -> None:
    source = write_csv(
        tmp_path / "c.csv", [["email", "zip", "seats"], ["a@example.com", "10001", "5"]]
    )
    done = segments("import", source, "--text", "zip", "--target", target, key=project.secret_key)
    assert done.returncode == 0, done.stderr
    assert contact_data(engine, project)["a@example.com"][1] == {"zip": "10001", "seats": 5}
    done = segments("import", source, "--strings", "--target", target, key=project.secret_key)
    assert done.returncode == 0, done.stderr
    assert contact_data(engine, project)["a@example.com"][1] == {"zip": "10001", "seats": "5"}
    unknown = segments("import", source, "--text", "zp", "--target", target, key=project.secret_key)
    assert unknown.returncode == 1
    assert "no data column named 'zp'" in unknown.stderr


def test_workers_keep_the_order_of_each_contacts_rows(
    tmp_path: Path, target: str, project: Project, engine: Engine
) -> None:
    """With several calls in flight, the rows of one email still apply in file order: the
    last row of a contact wins, as with one worker."""
    rows: list[list[Any]] = [["email", "version", "name"]]
    for version in range(1, 6):
        rows += [[f"User{i}@Example.com ", version, f"v{version}"] for i in range(1500)]
    source = write_csv(tmp_path / "versions.csv", rows)
    done = segments("import", source, "--workers", "3", "--target", target, key=project.secret_key)
    assert done.returncode == 0, done.stderr
    assert summary(done)["imported"] == 7500
    stored = contact_data(engine, project)
    assert len(stored) == 1500
    assert {data["version"] for _, data in stored.values()} == {5}
    too_many = segments(
        "import", source, "--workers", "9", "--target", target, key=project.secret_key
    )
    assert too_many.returncode == 1 and "--workers must be 1 to 8" in too_many.stderr


# --- events ---------------------------------------------------------------------------------


def test_events_import(
    tmp_path: Path, target: str, project: Project, engine: Engine, client: SegmentsClient
) -> None:
    source = write_csv(
        tmp_path / "events.csv",
        [
            ["email", "event", "occurredAt", "amount", "sku"],
            ["ada@example.com", "purchase", "2024-05-01T12:00:00Z", "19.90", "A-1"],
            ["ada@example.com", "purchase", "2024-05-02 08:00", "5", "B-2"],
            ["grace@example.com", "email.opened", "", "", ""],
            ["grace@example.com", "segment.vip.entry", "", "", ""],  # line 5: reserved
            ["grace@example.com", "purchase", "last tuesday", "1", ""],  # line 6
            ["grace@example.com", "", "", "", ""],  # line 7: no event
        ],
    )
    done = segments("import", source, "--target", target, key=project.secret_key)
    assert done.returncode == 2, done.stderr
    result = summary(done)
    assert result["kind"] == "events"
    assert (result["rows"], result["imported"], result["rejected"]) == (6, 3, 3)
    assert "created" not in result
    assert "events.csv:5: rejected: event: 'segment.vip.entry' is a reserved" in done.stderr
    assert "events.csv:6: rejected: occurredAt is not a timestamp" in done.stderr
    assert "events.csv:7: rejected: event is empty" in done.stderr
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT c.email, e.name, e.occurred_at, e.data FROM events e "
                "JOIN contacts c ON c.project_id = e.project_id AND c.id = e.contact_id "
                "WHERE e.project_id = :p ORDER BY e.occurred_at"
            ),
            {"p": project.id},
        ).all()
    purchases = [(r.occurred_at.isoformat(), r.data) for r in rows if r.name == "purchase"]
    assert purchases == [
        ("2024-05-01T12:00:00+00:00", {"amount": 19.9, "sku": "A-1"}),
        ("2024-05-02T08:00:00+00:00", {"amount": 5, "sku": "B-2"}),
    ]
    assert (
        client.count_matching_contacts(
            F.event("purchase").triggered(aggregate=F.sum("amount") > 20)
        )
        == 1
    )
    assert client.count_matching_contacts(F.email_activity("opened").triggered()) == 1


# --- export ---------------------------------------------------------------------------------


def test_export_writes_the_rest_csv(
    tmp_path: Path, target: str, project: Project, engine: Engine, client: SegmentsClient
) -> None:
    client.batch_upsert_contacts(
        [
            {
                "email": "ada@example.com",
                "data": {"plan": "pro", "note": 'says "hi", then\nleaves'},
            },
            {"email": "grace@example.com", "subscribed": False, "data": {"plan": "pro", "n": 5}},
            {"email": "linus@example.com", "data": {"plan": "free"}},
            {
                "email": "ünïcode@example.com",
                "data": {"plan": "pro", "nested": {"b": 1, "a": [1.5]}},
            },
        ]
    )
    segment = client.create_segment("Pro", condition=F.data("plan") == "pro")
    done = segments("export", segment.id, "--target", target, key=project.secret_key)
    assert done.returncode == 0, done.stderr
    with engine.connect() as conn:
        stored = conn.execute(
            text(
                "SELECT id::text, email, subscribed, created_at, updated_at, data::text AS data "
                "FROM contacts WHERE project_id = :p AND data->>'plan' = 'pro' ORDER BY id"
            ),
            {"p": project.id},
        ).all()
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["id", "email", "subscribed", "createdAt", "updatedAt", "data"])
    for row in stored:
        # jsonb prints its keys in its stored order with ", " and ": ": the same keys in
        # the same order, compact, is what the REST export writes.
        data = json.dumps(json.loads(row.data), ensure_ascii=False, separators=(",", ":"))
        writer.writerow(
            [
                row.id,
                row.email,
                "true" if row.subscribed else "false",
                rfc3339(row.created_at),
                rfc3339(row.updated_at),
                data,
            ]
        )
    # Compared as the bytes written: CRLF line ends, the csv module's quoting.
    assert done.stdout.replace("\n", "\r\n").replace("\r\r\n", "\r\n") == out.getvalue()
    raw = subprocess.run(
        [str(SEGMENTS), "export", segment.id, "--target", target, "--key", project.secret_key],
        capture_output=True,
        timeout=60,
    )
    assert raw.stdout == out.getvalue().encode()

    written = tmp_path / "pro.csv"
    to_file = segments(
        "export", segment.id, "-o", written, "--target", target, key=project.secret_key
    )
    assert to_file.returncode == 0, to_file.stderr
    assert written.read_bytes() == out.getvalue().encode()

    # What the export writes, the import reads back (data columns aside).
    empty = client.create_segment("Nobody", condition=F.data("plan") == "none")
    nobody = segments("export", empty.id, "--target", target, key=project.secret_key)
    assert nobody.stdout.strip() == "id,email,subscribed,createdAt,updatedAt,data"


def test_export_is_byte_for_byte_the_rest_export(
    target: str, rest_url: str, project: Project, client: SegmentsClient
) -> None:
    """`segments export` formats on the client what `GET /segments/{id}/export` formats on
    the server: the same bytes, whatever the data holds."""
    client.batch_upsert_contacts(
        [
            {
                "email": f"user{i}@example.com",
                "subscribed": i % 2 == 0,
                "data": {
                    "plan": "pro",
                    "zeta": i,
                    "a": 1.5,
                    "long key, with a comma": 'quote " and\nnewline',
                    "ü": ["x", {"b": True, "a": None}],
                    "big": 12345678901,
                },
            }
            for i in range(300)
        ]
    )
    segment = client.create_segment("Pro", condition=F.data("plan") == "pro")
    request = urllib.request.Request(
        f"{rest_url}/segments/{segment.id}/export",
        headers={"Authorization": f"Bearer {project.secret_key}"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        rest = response.read()
    cli = subprocess.run(
        [str(SEGMENTS), "export", segment.id, "--target", target, "--key", project.secret_key],
        capture_output=True,
        timeout=60,
    )
    assert cli.returncode == 0, cli.stderr
    assert rest.count(b"\r\n") == 301
    assert cli.stdout == rest


def rfc3339(moment: datetime) -> str:
    utc = moment.astimezone(UTC)
    base = utc.strftime("%Y-%m-%dT%H:%M:%S")
    if utc.microsecond == 0:
        return base + "Z"
    if utc.microsecond % 1000 == 0:
        return f"{base}.{utc.microsecond // 1000:03d}Z"
    return f"{base}.{utc.microsecond:06d}Z"


def test_export_of_an_unknown_segment(
    target: str, project: Project, other_project: Project
) -> None:
    missing = "00000000-0000-4000-8000-000000000000"
    done = segments("export", missing, "--target", target, key=project.secret_key)
    assert done.returncode == 1
    assert done.stdout == ""
    assert f"segments: no segment {missing} in the key's project" in done.stderr
    assert "Traceback" not in done.stderr


# --- mistakes -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def contacts_file(tmp_path: Path) -> Path:
    return write_csv(tmp_path / "c.csv", [["email", "plan"], ["a@example.com", "pro"]])


def test_mistakes_are_explained(
    tmp_path: Path, target: str, project: Project, contacts_file: Path
) -> None:
    cases: list[tuple[list[str | Path], str | None, str]] = [
        (["import", contacts_file, "--target", target], None, "no API key: pass --key"),
        (
            ["import", contacts_file, "--target", target],
            project.public_key,
            "needs the project's secret key (sk_…)",
        ),
        (
            ["import", contacts_file, "--target", target],
            "sk_not-a-key-of-this-installation",
            f"the server at {target} refused the key: Invalid API key",
        ),
        (
            ["import", contacts_file, "--target", f"127.0.0.1:{free_port()}"],
            project.secret_key,
            "no server answers at 127.0.0.1:",
        ),
        (
            ["export", "x", "--target", f"127.0.0.1:{free_port()}"],
            project.secret_key,
            "no server answers at 127.0.0.1:",
        ),
        (["import", tmp_path / "nope.csv", "--target", target], project.secret_key, "no such file"),
    ]
    for args, key, message in cases:
        done = segments(*args, key=key)
        assert done.returncode == 1, (args, done.stderr)
        assert message in done.stderr, (args, done.stderr)
        assert "Traceback" not in done.stderr
    # The key can come from --key, or from standard input with --key -.
    piped = subprocess.run(
        [str(SEGMENTS), "import", str(contacts_file), "--target", target, "--key", "-"],
        input=project.secret_key + "\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert piped.returncode == 0, piped.stderr


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([["name", "plan"], ["Ada", "pro"]], "the header has no email column (it has: name, plan)"),
        ([["email", "plan", "plan"]], "the header names 'plan' twice (columns 2 and 3)"),
        ([["email", "", "plan"]], "column 2 of the header has no name"),
        ([["email", "occurredAt"]], "occurredAt but no event column"),
        ([], "is empty: the first line must be the header"),
    ],
)
def test_files_that_cannot_be_imported(
    tmp_path: Path, target: str, project: Project, rows: list[list[str]], message: str
) -> None:
    source = write_csv(tmp_path / "bad.csv", rows)
    done = segments("import", source, "--target", target, key=project.secret_key)
    assert done.returncode == 1
    assert message in done.stderr
    assert "Traceback" not in done.stderr


def test_malformed_csv_stops_where_it_breaks_and_resumes(
    tmp_path: Path, target: str, project: Project, engine: Engine
) -> None:
    lines = ["email,plan"] + [f"user{i}@example.com,pro" for i in range(2500)]
    lines.insert(2300, '"broken@example.com"x,pro')  # line 2301: text after a closing quote
    source = tmp_path / "broken.csv"
    source.write_text("\n".join(lines) + "\n")
    done = segments("import", source, "--target", target, key=project.secret_key)
    assert done.returncode == 1
    assert "line 2301: not valid CSV" in done.stderr
    # The batches before the broken line were imported; the rows read after the last
    # batch were not, so the import resumes from the first of them.
    assert "--from-line 2002" in done.stderr
    assert summary(done)["imported"] == 2000
    assert len(contact_data(engine, project)) == 2000

    lines[2300] = "broken@example.com,pro"
    source.write_text("\n".join(lines) + "\n")
    resumed = segments(
        "import", source, "--from-line", "2002", "--target", target, key=project.secret_key
    )
    assert resumed.returncode == 0, resumed.stderr
    assert summary(resumed)["rows"] == 501
    assert len(contact_data(engine, project)) == 2501


def test_not_utf8(tmp_path: Path, target: str, project: Project) -> None:
    source = tmp_path / "latin1.csv"
    source.write_bytes("email,city\nada@example.com,Zürich\n".encode("latin-1"))
    done = segments("import", source, "--target", target, key=project.secret_key)
    assert done.returncode == 1
    assert "not utf-8-sig text" in done.stderr and "--encoding" in done.stderr
    ok = segments(
        "import", source, "--encoding", "latin-1", "--target", target, key=project.secret_key
    )
    assert ok.returncode == 0, ok.stderr


# --- at scale -------------------------------------------------------------------------------


def test_100k_contacts_and_events_end_to_end(
    tmp_path: Path, target: str, project: Project, client: SegmentsClient
) -> None:
    """100,000 contacts, then 100,000 events, with a few bad rows among them; then the
    members of a segment over the imported data, exported."""
    n = 100_000
    contacts = tmp_path / "contacts.csv"
    with contacts.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["email", "subscribed", "plan", "seats", "country"])
        for i in range(n):
            email = f"user{i}@example.com" if i % 25_000 != 7 else f"user{i}@"
            out.writerow(
                [email, "true" if i % 3 else "false", "pro" if i % 4 == 0 else "free", i % 10, "DE"]
            )
    events = tmp_path / "events.csv"
    with events.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["email", "event", "occurredAt", "amount"])
        for i in range(n):
            out.writerow(
                [
                    f"user{i % n}@example.com",
                    "purchase",
                    f"2024-{i % 12 + 1:02d}-01T00:00:00Z",
                    i % 100,
                ]
            )

    started = time.monotonic()
    done = segments("import", contacts, "--target", target, key=project.secret_key)
    contacts_seconds = time.monotonic() - started
    assert done.returncode == 2, done.stderr
    result = summary(done)
    assert (result["imported"], result["rejected"]) == (n - 4, 4)
    with (tmp_path / "contacts.rejects.csv").open(newline="") as f:
        lines = [int(row[-2]) for row in list(csv.reader(f))[1:]]
    assert lines == [9, 25_009, 50_009, 75_009]

    started = time.monotonic()
    done = segments("import", events, "--workers", "2", "--target", target, key=project.secret_key)
    events_seconds = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    assert summary(done)["imported"] == n

    segment = client.create_segment(
        "Pro buyers", condition=(F.data("plan") == "pro") & (F.data("seats") >= 4)
    )
    expected = sum(1 for i in range(n) if i % 4 == 0 and i % 10 >= 4 and i % 25_000 != 7)
    started = time.monotonic()
    exported = segments("export", segment.id, "--target", target, key=project.secret_key)
    export_seconds = time.monotonic() - started
    assert exported.returncode == 0, exported.stderr
    rows = list(csv.reader(io.StringIO(exported.stdout)))
    assert len(rows) == expected + 1
    assert {json.loads(row[5])["plan"] for row in rows[1:]} == {"pro"}
    print(
        f"\n100k contacts: {contacts_seconds:.1f} s, 100k events: {events_seconds:.1f} s, "
        f"export of {expected}: {export_seconds:.1f} s"
    )
