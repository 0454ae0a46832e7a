"""GET /segments/{id}/export and ExportSegmentCsv: a segment's members as CSV, streamed
through Envoy from one snapshot in bounded memory. The bytes exactly (header, quoting, data
as JSON, timestamps as the JSON's), every member once, writes during an export unseen, the
errors of any REST call before the first row and a reset stream after it, the project's
stream share, a stalled reader cut off with its snapshot released, and no route timeout."""

from __future__ import annotations

import asyncio
import csv
import http.client
import io
import json
import shutil
import subprocess
import time
import tracemalloc
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import urlsplit

import grpc
import pytest
from google.protobuf import json_format, struct_pb2
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session, sessionmaker

from segments import F, NotFoundError
from segments.client import AsyncSegmentsClient, SegmentsClient
from segments_api.v1 import contacts_pb2, resources_pb2, segments_pb2, segments_pb2_grpc
from segments_service import auth, envoy_proxy, streams
from segments_service.fairness import Limits
from segments_service.server import Options, ServerThread
from tests.conditions import as_proto
from tests.conftest import ROOT, Project, Rest, Stubs, free_port, new_project
from tests.rest_helpers import check_error

HEADER = b"id,email,subscribed,createdAt,updatedAt,data\r\n"
CONTENT_TYPE = "text/csv; charset=utf-8"
EVERYONE = F.email.contains("@")
# The big project of the streaming tests: far more bytes than Envoy's and the sockets'
# buffers hold, so a reader that stops holds the server back.
BIG = 9_000  # under the in-request build threshold: READY when created
PADDING = "x" * 2000


def quote(field: str) -> str:
    """RFC 4180 quoting, written out here rather than taken from the csv module."""
    if any(c in field for c in ',"\r\n'):
        return '"' + field.replace('"', '""') + '"'
    return field


def upsert(stubs: Stubs, project: Project, email: str, data: dict[str, Any], **kw: Any) -> str:
    struct = json_format.ParseDict(data, struct_pb2.Struct())
    contact = stubs.contacts.UpsertContact(
        contacts_pb2.UpsertContactRequest(email=email, data=struct, **kw), metadata=project.auth
    )
    return str(contact.id)


def add_contacts(
    stubs: Stubs, project: Project, count: int, prefix: str = "c", pad: str = ""
) -> None:
    for start in range(0, count, 1000):
        stubs.contacts.BatchUpsertContacts(
            contacts_pb2.BatchUpsertContactsRequest(
                contacts=[
                    contacts_pb2.UpsertContactRequest(
                        email=f"{prefix}{i:05d}@x.com",
                        data=json_format.ParseDict(
                            {"pad": pad} if pad else {}, struct_pb2.Struct()
                        ),
                    )
                    for i in range(start, min(start + 1000, count))
                ]
            ),
            metadata=project.auth,
            timeout=60,
        )


def create(stubs: Stubs, project: Project, condition: Any = EVERYONE, **kw: Any) -> Any:
    request = (
        segments_pb2.CreateSegmentRequest(name="Export", **kw)
        if kw.get("type")
        else segments_pb2.CreateSegmentRequest(name="Export", condition=as_proto(condition), **kw)
    )
    return stubs.segments.CreateSegment(request, metadata=project.auth, timeout=30)


def grpc_csv(stubs: Stubs, project: Project, segment_id: str) -> bytes:
    stream = stubs.segments.ExportSegmentCsv(
        segments_pb2.ExportSegmentCsvRequest(id=segment_id), metadata=project.auth, timeout=60
    )
    chunks = list(stream)
    assert {c.content_type for c in chunks} == {CONTENT_TYPE}
    return b"".join(c.data for c in chunks)


def rows_of(body: bytes) -> list[list[str]]:
    rows = list(csv.reader(io.StringIO(body.decode(), newline="")))
    assert rows[0] == ["id", "email", "subscribed", "createdAt", "updatedAt", "data"]
    return rows[1:]


def open_export(base: str, key: str, segment_id: str) -> tuple[http.client.HTTPConnection, Any]:
    """An HTTP/1.1 export whose body the caller reads at its own pace."""
    url = urlsplit(base)
    conn = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port, timeout=60)
    conn.request(
        "GET", f"/segments/{segment_id}/export", headers={"Authorization": f"Bearer {key}"}
    )
    resp = conn.getresponse()
    return conn, resp


def open_snapshots(engine: Engine) -> int:
    """Exports holding a snapshot now: transactions whose last statement read from a cursor
    (whether running a FETCH or idle between two)."""
    with engine.connect() as conn:
        return int(
            conn.execute(
                text(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND pid <> pg_backend_pid() AND xact_start IS NOT NULL "
                    "AND query LIKE 'FETCH %'"
                )
            ).scalar_one()
        )


def curl_http2(url: str, key: str, *options: str) -> subprocess.CompletedProcess[str]:
    """A request over HTTP/2 (curl; Python's standard library speaks HTTP/1.1 only)."""
    command = ["curl", "-sS", "--http2-prior-knowledge", "-o", "/dev/null", *options]
    return subprocess.run(
        [*command, "-H", f"Authorization: Bearer {key}", url],
        capture_output=True,
        text=True,
        timeout=30,
    )


def wait_until(check: Callable[[], bool], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(what)
        time.sleep(0.05)


@pytest.fixture(scope="module")
def big(sessions: sessionmaker[Session], stubs: Stubs) -> SimpleNamespace:
    """A project of BIG contacts carrying 2 KB of data each (18 MB of CSV), and a segment
    of all of them."""
    project = new_project(sessions, "big")
    add_contacts(stubs, project, BIG, pad=PADDING)
    segment = create(stubs, project)
    assert segment.member_count == BIG
    return SimpleNamespace(project=project, segment_id=str(segment.id))


def start_envoy(grpc_port: int, workdir: Path, request_timeout: float = 30.0) -> tuple[str, Any]:
    http_port = free_port()
    config = envoy_proxy.render_config(
        http_port=http_port,
        upstreams=[("127.0.0.1", grpc_port)],
        descriptor_path=ROOT / "envoy" / "segments.pb",
        request_timeout=request_timeout,
    )
    proc = envoy_proxy.start_envoy(config, workdir=workdir, log_path=workdir / "envoy.log")
    envoy_proxy.wait_ready(http_port, timeout=30, process=proc)
    return f"http://127.0.0.1:{http_port}", proc


# -- the bytes -------------------------------------------------------------------------------


def test_the_csv_is_exact_and_the_same_over_rest_and_grpc(
    rest: Rest, stubs: Stubs, project: Project
) -> None:
    tricky = {
        "q": 'say "hi", then leave',
        "nl": "one\ntwo\r\nthree",
        "uni": "café ☕ 日本 🎉",
        "gone": None,  # a key sent as null is not stored
        "nest": {"a": [1, 2.5, {"b": None}], "t": True, 'k,"ey': ""},
        "seats": 5.0,  # integral numbers read back as integers
    }
    ids = [
        upsert(stubs, project, "ada@example.com", tricky),
        upsert(stubs, project, "grace@example.com", {}, subscribed=False),
        upsert(stubs, project, "o'brien+tag@example.com", {"plan": "pro"}),
    ]
    segment = create(stubs, project, type=resources_pb2.Segment.STATIC)
    added = stubs.segments.AddSegmentMembers(
        segments_pb2.AddSegmentMembersRequest(
            id=segment.id,
            emails=["ada@example.com", "grace@example.com", "o'brien+tag@example.com"],
        ),
        metadata=project.auth,
    )
    assert added.added == 3

    resp = rest.get(f"/segments/{segment.id}/export", key=project.secret_key)
    assert resp.status == 200, resp.raw[:500]
    assert resp.headers["content-type"] == CONTENT_TYPE
    assert resp.headers["content-disposition"] == f'attachment; filename="segment-{segment.id}.csv"'
    assert not any(h.startswith(("grpc-", "x-http-status", "x-error")) for h in resp.headers)

    # Expected from the REST JSON of each contact: timestamps as the API prints them.
    lines = [HEADER.decode()]
    stored_data = {
        ids[0]: '{"q":"say \\"hi\\", then leave","nl":"one\\ntwo\\r\\nthree",'
        '"uni":"café ☕ 日本 🎉","nest":{"a":[1,2.5,{"b":null}],"t":true,"k,\\"ey":""},"seats":5}',
        ids[1]: "{}",
        ids[2]: '{"plan":"pro"}',
    }
    for contact_id in sorted(ids):
        contact = rest.get(f"/contacts/{contact_id}", key=project.secret_key).json
        assert json.loads(stored_data[contact_id]) == contact["data"]
        fields = [
            contact_id,
            contact["email"],
            "true" if contact["subscribed"] else "false",
            contact["createdAt"],
            contact["updatedAt"],
            stored_data[contact_id],
        ]
        lines.append(",".join(quote(f) for f in fields) + "\r\n")
    assert resp.raw == "".join(lines).encode()
    # A CSV reader reads the data back as the JSON it was.
    parsed = {row[0]: json.loads(row[5]) for row in rows_of(resp.raw)}
    assert parsed[ids[0]] == {k: v for k, v in tricky.items() if k != "gone"}

    assert grpc_csv(stubs, project, str(segment.id)) == resp.raw


def test_an_empty_segment_is_the_header_alone(rest: Rest, stubs: Stubs, project: Project) -> None:
    segment = create(stubs, project, F.data("plan") == "none")
    resp = rest.get(f"/segments/{segment.id}/export", key=project.secret_key)
    assert (resp.status, resp.headers["content-type"], resp.raw) == (200, CONTENT_TYPE, HEADER)
    assert grpc_csv(stubs, project, str(segment.id)) == HEADER


def test_every_member_once_in_id_order(rest: Rest, stubs: Stubs, project: Project) -> None:
    add_contacts(stubs, project, 2100)
    upsert(stubs, project, "outsider@y.org", {})
    segment = create(stubs, project, F.email.ends_with("@x.com"))
    resp = rest.get(f"/segments/{segment.id}/export", key=project.secret_key)
    rows = rows_of(resp.raw)
    assert len(rows) == segment.member_count == 2100
    assert [r[0] for r in rows] == sorted(r[0] for r in rows)
    assert sorted(r[1] for r in rows) == [f"c{i:05d}@x.com" for i in range(2100)]
    # Three messages of at most 1,000 rows, the header in the first.
    stream = stubs.segments.ExportSegmentCsv(
        segments_pb2.ExportSegmentCsvRequest(id=segment.id), metadata=project.auth
    )
    assert [c.data.count(b"\r\n") for c in stream] == [1001, 1000, 100]
    assert grpc_csv(stubs, project, str(segment.id)) == resp.raw


def test_the_typed_clients_write_the_csv(
    rest: Rest, target: str, stubs: Stubs, project: Project
) -> None:
    add_contacts(stubs, project, 1001)
    segment_id = str(create(stubs, project).id)
    expected = rest.get(f"/segments/{segment_id}/export", key=project.secret_key).raw
    out = io.BytesIO()
    with SegmentsClient(target, project.secret_key) as client:
        assert client.export_segment_csv(segment_id, out) == len(expected)
        with pytest.raises(NotFoundError):
            client.export_segment_csv(str(uuid.uuid4()), io.BytesIO())
    assert out.getvalue() == expected

    async def exported() -> bytes:
        buffer = io.BytesIO()
        async with AsyncSegmentsClient(target, project.secret_key) as client:
            await client.export_segment_csv(segment_id, buffer)
        return buffer.getvalue()

    assert asyncio.run(exported()) == expected


# -- before the first row: the status of any REST call ---------------------------------------


def test_auth_and_scoping(
    rest: Rest, stubs: Stubs, project: Project, other_project: Project, sessions: Any
) -> None:
    upsert(stubs, project, "ada@example.com", {})
    segment_id = str(create(stubs, project).id)
    path = f"/segments/{segment_id}/export"
    check_error(rest.get(path), 401, "MISSING_AUTH")
    check_error(rest.get(path, key="sk_nope"), 401, "INVALID_API_KEY")
    check_error(rest.get(path, key=project.public_key), 401, "INVALID_API_KEY")
    check_error(rest.get(path, key=other_project.secret_key), 404, "NOT_FOUND")
    check_error(
        rest.get(f"/segments/{uuid.uuid4()}/export", key=project.secret_key), 404, "NOT_FOUND"
    )
    check_error(rest.get("/segments/not-a-uuid/export", key=project.secret_key), 404, "NOT_FOUND")
    check_error(rest.get(f"{path}?page=1", key=project.secret_key), 400, "VALIDATION_ERROR", "page")
    # The other project's own export of its own segment is its members alone.
    upsert(stubs, other_project, "bob@example.com", {})
    theirs = str(create(stubs, other_project).id)
    rows = rows_of(rest.get(f"/segments/{theirs}/export", key=other_project.secret_key).raw)
    assert [r[1] for r in rows] == ["bob@example.com"]
    with pytest.raises(grpc.RpcError) as caught:
        grpc_csv(stubs, other_project, segment_id)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_building_segment_is_exported_live_from_its_condition(
    rest: Rest, stubs: Stubs, project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SEGMENTS_INLINE_BUILD_CONTACTS", "50")
    add_contacts(stubs, project, 60)
    segment = create(stubs, project, F.email.ends_with("1@x.com"))
    assert segment.status == resources_pb2.Segment.BUILDING
    rows = rows_of(rest.get(f"/segments/{segment.id}/export", key=project.secret_key).raw)
    assert sorted(r[1] for r in rows) == [f"c{i:05d}@x.com" for i in range(1, 60, 10)]


# -- after the first row: a reset, never a clean end ----------------------------------------


def test_an_error_after_the_first_rows_resets_the_stream(
    rest_url: str, stubs: Stubs, project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    add_contacts(stubs, project, 2500)
    segment_id = str(create(stubs, project).id)
    row = streams.csv_row
    written = [0]

    def failing(contact: Any) -> tuple[str, ...]:
        written[0] += 1
        if written[0] > 1500:
            raise RuntimeError("the database went away")
        return row(contact)

    monkeypatch.setattr(streams, "csv_row", failing)
    conn, resp = open_export(rest_url, project.secret_key, segment_id)
    assert resp.status == 200
    with pytest.raises(http.client.IncompleteRead) as cut:
        resp.read()
    assert cut.value.partial.startswith(HEADER)
    conn.close()
    # Over HTTP/2 the stream is reset (RST_STREAM): curl says so (exit status 92).
    if shutil.which("curl"):
        written[0] = 0
        done = curl_http2(f"{rest_url}/segments/{segment_id}/export", project.secret_key)
        assert done.returncode == 92, done.stderr
    # gRPC callers get the status.
    written[0] = 0
    with pytest.raises(grpc.RpcError) as caught:
        grpc_csv(stubs, project, segment_id)
    assert caught.value.code() == grpc.StatusCode.INTERNAL


def test_a_whole_export_over_http2_ends_without_grpc_trailers(
    rest_url: str, stubs: Stubs, project: Project
) -> None:
    if not shutil.which("curl"):
        pytest.skip("curl is needed for an HTTP/2 request")
    add_contacts(stubs, project, 10)
    segment_id = str(create(stubs, project).id)
    done = curl_http2(f"{rest_url}/segments/{segment_id}/export", project.secret_key, "-D", "-")
    assert done.returncode == 0, done.stderr
    assert "HTTP/2 200" in done.stdout
    assert "grpc-" not in done.stdout.lower() and "x-http-status" not in done.stdout


# -- one snapshot ----------------------------------------------------------------------------


def test_writes_during_an_export_do_not_show(
    rest_url: str, stubs: Stubs, big: SimpleNamespace, engine: Engine
) -> None:
    project, segment_id = big.project, big.segment_id
    conn, resp = open_export(rest_url, project.secret_key, segment_id)
    first = resp.read(64 << 10)
    assert first.startswith(HEADER)
    # The export is under way and far from its end: its snapshot is still held.
    wait_until(lambda: open_snapshots(engine) == 1, 5, "the export holds no snapshot")
    with engine.connect() as db:
        last_ids = [
            str(i)
            for i in db.execute(
                text("SELECT id FROM contacts WHERE project_id = :p ORDER BY id DESC LIMIT 2"),
                {"p": project.id},
            ).scalars()
        ]
    changed = stubs.contacts.GetContact(
        contacts_pb2.GetContactRequest(id=last_ids[1]), metadata=project.auth
    ).email
    # Rows the export has not read yet: one contact deleted, one changed, new ones added.
    stubs.contacts.DeleteContact(
        contacts_pb2.DeleteContactRequest(id=last_ids[0]), metadata=project.auth
    )
    upsert(stubs, project, changed, {"pad": "changed"})
    add_contacts(stubs, project, 50, prefix="late")
    rows = rows_of(first + resp.read())
    conn.close()
    assert len(rows) == BIG
    by_id = {r[0]: r for r in rows}
    assert last_ids[0] in by_id
    assert json.loads(by_id[last_ids[1]][5]) == {"pad": PADDING}
    assert not any(r[1].startswith("late") for r in rows)
    # A new export sees the writes.
    after = rows_of(urllib_get(rest_url, project.secret_key, segment_id))
    assert len(after) == BIG - 1 + 50
    # Leave the big project as it was for the other tests: BIG members, 2 KB each.
    for row in after:
        if row[1].startswith("late"):
            stubs.contacts.DeleteContact(
                contacts_pb2.DeleteContactRequest(id=row[0]), metadata=project.auth
            )
    upsert(stubs, project, changed, {"pad": PADDING})
    upsert(stubs, project, by_id[last_ids[0]][1], {"pad": PADDING})


def urllib_get(base: str, key: str, segment_id: str) -> bytes:
    conn, resp = open_export(base, key, segment_id)
    try:
        assert resp.status == 200
        return bytes(resp.read())
    finally:
        conn.close()


# -- flow control, idle readers and timeouts -------------------------------------------------


def test_a_stalled_reader_is_cut_off_and_its_snapshot_released(
    rest_url: str, big: SimpleNamespace, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(streams, "EXPORT_IDLE_SECONDS", 1.0)
    conn, resp = open_export(rest_url, big.project.secret_key, big.segment_id)
    assert resp.read(len(HEADER)) == HEADER
    # Flow control holds the server back (Envoy buffers a bounded amount): its write
    # waits, the snapshot is held, then released when the idle limit passes (well before
    # PostgreSQL's own idle-in-transaction limit, 10 s later).
    wait_until(lambda: open_snapshots(engine) == 1, 5, "the export never held its snapshot")
    wait_until(lambda: open_snapshots(engine) == 0, 5, "the stalled export kept its snapshot")
    # What was buffered on the way is delivered, then the stream is cut, not ended.
    with pytest.raises(http.client.IncompleteRead) as cut:
        resp.read()
    assert len(cut.value.partial) < BIG * len(PADDING)
    conn.close()


def test_no_route_timeout_cuts_a_long_export(
    grpc_port: int, big: SimpleNamespace, tmp_path: Path
) -> None:
    # An Envoy whose REST requests time out after 3 s (a 1 s budget plus its margin).
    base, proc = start_envoy(grpc_port, tmp_path, request_timeout=1.0)
    try:
        started = time.monotonic()
        conn, resp = open_export(base, big.project.secret_key, big.segment_id)
        body = bytearray()
        # About 2.5 MB/s: some 7 s for the 18 MB, past the 3 s of the REST routes.
        while chunk := resp.read(128 << 10):
            body += chunk
            time.sleep(0.05)
        conn.close()
        assert time.monotonic() - started > 4
        assert len(rows_of(bytes(body))) == BIG
    finally:
        proc.terminate()
        proc.wait(10)


# -- the project's share ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def narrow(
    sessions: sessionmaker[Session], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SimpleNamespace]:
    """A server with 2 streams a project and a 1 s budget per step, behind its own Envoy."""
    server = ServerThread(
        "127.0.0.1:0",
        sessions,
        Options(limits=Limits(concurrency=8, streams=2), request_timeout=1.0),
    )
    base, proc = start_envoy(server.port, tmp_path_factory.mktemp("narrow-envoy"))
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    yield SimpleNamespace(server=server, rest=Rest(base), base=base, channel=channel)
    channel.close()
    proc.terminate()
    proc.wait(10)
    server.stop(1)


def test_exports_count_against_the_projects_streams(
    narrow: SimpleNamespace, big: SimpleNamespace, stubs: Stubs, sessions: Any
) -> None:
    project = big.project
    path = f"/segments/{big.segment_id}/export"
    conn, resp = open_export(narrow.base, project.secret_key, big.segment_id)
    assert resp.read(len(HEADER)) == HEADER  # open, and stalled
    watch = segments_pb2_grpc.SegmentServiceStub(narrow.channel).WatchSegmentEvents(
        segments_pb2.WatchSegmentEventsRequest(), metadata=project.auth
    )
    watch.initial_metadata()  # open: it holds the project's second stream
    refused = narrow.rest.get(path, key=project.secret_key)
    check_error(refused, 429, "RATE_LIMITED")
    assert int(refused.headers["retry-after"]) >= 1
    # Another project is not held back by it.
    other = new_project(sessions, "other")
    upsert(stubs, other, "bob@example.com", {})
    theirs = str(create(stubs, other).id)
    assert rows_of(narrow.rest.get(f"/segments/{theirs}/export", key=other.secret_key).raw)
    # Closing the streams gives the share back.
    watch.cancel()
    conn.close()

    def exports() -> bool:
        got = narrow.rest.get(f"/segments/{theirs}/export", key=other.secret_key)
        again = narrow.rest.get(path, key=project.secret_key)
        return bool(got.status == 200 and again.status == 200)

    wait_until(exports, 10, "the closed streams kept their share")


def test_a_building_segment_that_cannot_be_read_in_time_is_segment_building(
    narrow: SimpleNamespace,
    stubs: Stubs,
    project: Project,
    engine: Engine,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SEGMENTS_INLINE_BUILD_CONTACTS", "50")
    add_contacts(stubs, project, 60)
    segment = create(stubs, project, F.event("purchase").triggered())
    assert segment.status == resources_pb2.Segment.BUILDING
    with engine.connect() as blocker:
        blocker.execute(text("LOCK TABLE events IN ACCESS EXCLUSIVE MODE"))
        resp = narrow.rest.get(f"/segments/{segment.id}/export", key=project.secret_key)
        blocker.rollback()
    check_error(resp, 503, "SEGMENT_BUILDING")
    assert int(resp.headers["retry-after"]) >= 1


# -- bounded memory --------------------------------------------------------------------------


def test_the_csv_is_made_a_message_at_a_time_in_bounded_memory() -> None:
    moment = datetime(2026, 1, 2, 3, 4, 5, 678900, tzinfo=UTC)
    taken = [0]

    def contacts(count: int) -> Iterator[Any]:
        for i in range(count):
            taken[0] += 1
            yield SimpleNamespace(
                id=uuid.UUID(int=i),
                email=f"c{i}@x.com",
                subscribed=bool(i % 2),
                created_at=moment,
                updated_at=moment + timedelta(microseconds=i),
                data={"i": i, "pad": "y" * 200},
            )

    messages = streams.csv_messages(contacts(100_000))
    first = next(messages)
    assert taken[0] <= streams.EXPORT_BATCH_CONTACTS + 1  # the rows of one message, no more
    assert first.data.startswith(HEADER)
    assert b",2026-01-02T03:04:05.678900Z," in first.data

    def peak(count: int) -> int:
        tracemalloc.start()
        try:
            for _message in streams.csv_messages(contacts(count)):
                pass
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    small, large = peak(5_000), peak(50_000)
    assert large < 4 << 20 and large < small * 1.5, (small, large)


def test_timestamps_are_written_as_the_json_writes_them() -> None:
    from google.protobuf import timestamp_pb2

    for micros in (0, 1000, 120000, 123456, 1):
        moment = datetime(2026, 12, 7, 2, 3, 4, micros, tzinfo=UTC)
        stamp = timestamp_pb2.Timestamp()
        stamp.FromDatetime(moment)
        assert streams.rfc3339(moment) == stamp.ToJsonString()
    east = datetime(2026, 12, 7, 5, 3, 4, tzinfo=UTC).astimezone(datetime.now().astimezone().tzinfo)
    assert streams.rfc3339(east) == "2026-12-07T05:03:04Z"


def test_a_revoked_key_ends_the_export(
    rest_url: str, big: SimpleNamespace, sessions: sessionmaker[Session]
) -> None:
    # A key of its own, so that the big project's other keys keep working.
    with sessions.begin() as session:
        key = auth.issue_key(session, uuid.UUID(big.project.id), "secret")
    conn, resp = open_export(rest_url, key, big.segment_id)
    assert resp.read(len(HEADER)) == HEADER
    with sessions.begin() as session:
        auth.revoke_key(session, key)
    revoked = time.monotonic()
    # The reader waits past the key's next check (every 2 s), the server's write waiting
    # for it meanwhile; the check comes with the write that follows.
    time.sleep(2.5)
    with pytest.raises(http.client.IncompleteRead):
        while resp.read(1 << 20):
            time.sleep(0.1)
    assert time.monotonic() - revoked < 10
    conn.close()
