"""Webhooks: the API over REST, gRPC and the typed client, and deliveries to a real HTTP
receiver started here (signed, retried with the same id, in feed order, after a restart,
from two replicas at once, and never to forbidden addresses)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
import pytest
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session, sessionmaker

from segments import (
    AsyncSegmentsClient,
    InvalidArgumentError,
    NotFoundError,
    SegmentsClient,
    delivery_last_error,
    delivery_next_attempt_at,
    verify_webhook_signature,
)
from segments_api.v1 import contacts_pb2, segments_pb2, webhooks_pb2, webhooks_pb2_grpc
from segments_service import event_ids
from segments_service.config import WebhookSettings
from segments_service.database import make_engine, make_sessionmaker
from segments_service.errors import ValidationError
from segments_service.webhooks import Sender, WebhookWorker, address_problem, check_url, outbox
from segments_service.webhooks.sender import signature
from tests.conditions import as_proto
from tests.conftest import Project, Replica, Rest, new_project

PRO = {
    "logic": "AND",
    "groups": [{"filters": [{"field": "data.plan", "operator": "equals", "value": "pro"}]}],
}


# --- a receiver -------------------------------------------------------------------------------


@dataclass
class Received:
    body: bytes
    headers: dict[str, str]
    at: float

    @property
    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Receiver:
    """An HTTP server on 127.0.0.1 recording every POST; `answer` picks each status."""

    answer: Callable[[Received], int] = lambda _: 200
    delay: float = 0.0
    received: list[Received] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                got = Received(
                    body, {k.lower(): v for k, v in self.headers.items()}, time.monotonic()
                )
                if receiver.delay:
                    time.sleep(receiver.delay)
                with receiver.lock:
                    receiver.received.append(got)
                status = receiver.answer(got)
                self.send_response(status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, format: str, *args: Any) -> None:
                pass

        class Server(ThreadingHTTPServer):
            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # a sender that gave up on a slow answer: not the test's concern

        self.server = Server(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    @property
    def url(self) -> str:
        # A host name resolving to loopback: the delivery-time address check applies.
        return f"http://localhost:{self.port}/hooks?source=segments"

    def events(self) -> list[dict[str, Any]]:
        with self.lock:
            return [r.json for r in self.received]

    def wait_for(self, count: int, timeout: float = 20.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.events()
            if len(got) >= count:
                return got
            time.sleep(0.05)
        raise AssertionError(f"received {len(self.events())} of {count} deliveries")

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


FAST = WebhookSettings(
    allow_private=True, poll_seconds=0.1, retry_first=0.4, retry_longest=1.0, timeout=5.0
)


@contextlib.contextmanager
def delivering(
    database_url: str, *projects: Project, settings: WebhookSettings = FAST
) -> Iterator[WebhookWorker]:
    """A delivery worker in this process, for these projects' webhooks only."""
    engine = make_engine(database_url, pool_size=2 * settings.workers + 2)
    worker = WebhookWorker(
        engine,
        make_sessionmaker(engine),
        settings,
        10.0,
        projects=[uuid.UUID(p.id) for p in projects],
    )
    worker.start()
    try:
        yield worker
    finally:
        worker.stop()
        worker.join(15)
        engine.dispose()


def tracked_segment(client: SegmentsClient, name: str = "Pro") -> str:
    return client.create_segment(name, condition=PRO, track_membership=True).id


def enter(client: SegmentsClient, *emails: str) -> None:
    client.batch_upsert_contacts([{"email": e, "data": {"plan": "pro"}} for e in emails])


def leave(client: SegmentsClient, *emails: str) -> None:
    client.batch_upsert_contacts([{"email": e, "data": {"plan": "free"}} for e in emails])


def feed_ids(engine: Engine, project: Project) -> list[int]:
    with engine.connect() as conn:
        return list(
            conn.execute(
                text(
                    "SELECT feed_seq FROM events WHERE project_id = :p AND feed_seq IS NOT NULL "
                    "ORDER BY feed_seq"
                ),
                {"p": project.id},
            ).scalars()
        )


def wait_until(check: Callable[[], bool], timeout: float = 20.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or check}")
        time.sleep(0.05)


# --- the API -----------------------------------------------------------------------------------


def test_create_list_get_delete_over_rest(
    rest: Rest, project: Project, other_project: Project
) -> None:
    key = project.secret_key
    created = rest.post("/webhooks", {"url": "https://hooks.example.com/segments"}, key=key)
    assert created.status == 201, created.raw
    body = created.json
    assert set(body) == {"id", "url", "segmentIds", "secret", "createdAt"}
    assert body["url"] == "https://hooks.example.com/segments"
    assert body["segmentIds"] == []
    assert body["secret"].startswith("whsec_") and len(body["secret"]) > 40
    webhook_id = body["id"]

    listed = rest.get("/webhooks", key=key)
    assert listed.status == 200
    assert listed.json == [{k: v for k, v in body.items() if k != "secret"}]
    got = rest.get(f"/webhooks/{webhook_id}", key=key)
    assert got.status == 200 and "secret" not in got.json and got.json["id"] == webhook_id
    deliveries = rest.get(f"/webhooks/{webhook_id}/deliveries?limit=5", key=key)
    assert deliveries.status == 200 and deliveries.json == {"data": []}

    # Another project's key sees nothing of it.
    other = other_project.secret_key
    assert rest.get("/webhooks", key=other).json == []
    for resp in (
        rest.get(f"/webhooks/{webhook_id}", key=other),
        rest.get(f"/webhooks/{webhook_id}/deliveries", key=other),
        rest.delete(f"/webhooks/{webhook_id}", key=other),
        rest.get("/webhooks/not-a-uuid", key=key),
    ):
        assert resp.status == 404, resp.raw
        assert resp.json["error"]["code"] == "NOT_FOUND"
    assert rest.get("/webhooks", key=project.public_key).status == 401

    deleted = rest.delete(f"/webhooks/{webhook_id}", key=key)
    assert deleted.status == 204 and deleted.raw == b""
    assert rest.get(f"/webhooks/{webhook_id}", key=key).status == 404
    assert rest.delete(f"/webhooks/{webhook_id}", key=key).status == 404
    assert rest.get("/webhooks", key=key).json == []


def _violations(resp: Any) -> dict[str, str]:
    return {e["field"]: e["code"] for e in resp.json["error"].get("errors", [])}


def test_create_validation_over_rest(
    rest: Rest, project: Project, other_project: Project, target: str
) -> None:
    key = project.secret_key
    with SegmentsClient(target, key) as client:
        tracked = tracked_segment(client, "Tracked")
        untracked = client.create_segment("Untracked", condition=PRO).id
    with SegmentsClient(target, other_project.secret_key) as client:
        foreign = tracked_segment(client, "Foreign")

    cases: list[tuple[dict[str, Any], str, str]] = [
        ({"url": "ftp://example.com/x"}, "url", "invalid"),
        ({"url": ""}, "url", "required"),
        ({"url": "https://user:pw@example.com/x"}, "url", "invalid"),
        ({"url": "https://example.com/x#frag"}, "url", "invalid"),
        ({"url": "https://exa mple.com/"}, "url", "invalid"),
        ({"url": "https://" + "a" * 2050 + ".com/"}, "url", "too_long"),
        # Cloud metadata: always refused; loopback and private literals without the flag.
        ({"url": "http://169.254.169.254/latest/meta-data"}, "url", "forbidden_address"),
        ({"url": "http://[fe80::1]/x"}, "url", "forbidden_address"),
        ({"url": "http://127.0.0.1:9/x"}, "url", "forbidden_address"),
        ({"url": "http://10.1.2.3/x"}, "url", "forbidden_address"),
        ({"url": "http://[::ffff:169.254.169.254]/x"}, "url", "forbidden_address"),
        ({"url": "https://example.com/", "segmentIds": ["nope"]}, "segmentIds.0", "invalid"),
        (
            {"url": "https://example.com/", "segmentIds": [tracked, untracked]},
            "segmentIds.1",
            "not_tracked",
        ),
        ({"url": "https://example.com/", "segmentIds": [foreign]}, "segmentIds.0", "not_found"),
    ]
    for body, name, code in cases:
        resp = rest.post("/webhooks", body, key=key)
        assert resp.status == 400, (body, resp.raw)
        assert resp.json["error"]["code"] == "VALIDATION_ERROR"
        assert _violations(resp).get(name) == code, (body, resp.raw)
    unknown = rest.post("/webhooks", {"url": "https://example.com/", "segmentsIds": []}, key=key)
    assert unknown.status == 400 and "segmentsIds" in unknown.raw.decode()
    assert rest.get("/webhooks", key=key).json == []

    ok = rest.post(
        "/webhooks", {"url": "https://example.com/", "segmentIds": [tracked, tracked]}, key=key
    )
    assert ok.status == 201 and ok.json["segmentIds"] == [tracked]
    bad_limit = rest.get(f"/webhooks/{ok.json['id']}/deliveries?limit=-1", key=key)
    assert bad_limit.status == 400 and "limit" in _violations(bad_limit)


def test_typed_client_and_grpc(
    target: str, project: Project, other_project: Project, channel: grpc.Channel
) -> None:
    with SegmentsClient(target, project.secret_key) as client:
        segment = tracked_segment(client)
        created = client.create_webhook("https://example.com/a", segment_ids=[segment])
        assert created.secret.startswith("whsec_")
        second = client.create_webhook("https://example.com/b")
        listed = client.list_webhooks()
        assert [w.id for w in listed] == [second.id, created.id]  # newest first
        assert list(client.get_webhook(created.id).segment_ids) == [segment]
        assert client.list_webhook_deliveries(created.id) == []
        with pytest.raises(InvalidArgumentError) as err:
            client.create_webhook("gopher://example.com")
        assert [v.field for v in err.value.field_violations] == ["url"]
        client.delete_webhook(second.id)
        with pytest.raises(NotFoundError):
            client.get_webhook(second.id)
    with SegmentsClient(target, other_project.secret_key) as other, pytest.raises(NotFoundError):
        other.list_webhook_deliveries(created.id)
    # The raw stub with the secret key in the metadata, as over REST.
    stub = webhooks_pb2_grpc.WebhookServiceStub(channel)
    got = stub.GetWebhook(webhooks_pb2.GetWebhookRequest(id=created.id), metadata=project.auth)
    assert got.url == "https://example.com/a"
    with pytest.raises(grpc.RpcError) as rpc_err:
        stub.ListWebhooks(webhooks_pb2.ListWebhooksRequest())
    assert rpc_err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_too_many_webhooks_is_a_failed_precondition(
    rest: Rest, sessions: sessionmaker[Session]
) -> None:
    key = new_project(sessions).secret_key
    for i in range(25):
        assert rest.post("/webhooks", {"url": f"https://example.com/{i}"}, key=key).status == 201
    resp = rest.post("/webhooks", {"url": "https://example.com/x"}, key=key)
    assert resp.status == 400 and resp.json["error"]["code"] == "FAILED_PRECONDITION"


# --- deliveries --------------------------------------------------------------------------------


def test_events_are_posted_signed_in_the_documented_shape(
    database_url: str, target: str, project: Project, receiver: Receiver, rest: Rest
) -> None:
    with SegmentsClient(target, project.secret_key) as client, delivering(database_url, project):
        segment = tracked_segment(client, "Pro users")
        enter(client, "before@example.com")  # before the webhook: not delivered
        hook = client.create_webhook(receiver.url)
        enter(client, "ada@example.com")
        leave(client, "ada@example.com")
        got = receiver.wait_for(2)
    assert [e["type"] for e in got] == ["segment.entry", "segment.exit"]
    first = got[0]
    assert set(first) == {
        "id",
        "type",
        "segmentId",
        "segmentName",
        "contactId",
        "email",
        "occurredAt",
    }
    assert first["segmentId"] == segment and first["segmentName"] == "Pro users"
    assert first["email"] == "ada@example.com"
    assert first["occurredAt"].endswith("Z")
    assert got[0]["id"] != got[1]["id"] and len(first["id"]) == 16

    for r in receiver.received:
        header = r.headers["segments-signature"]
        # The documented recipe, by hand: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "t.body")>.
        parts = dict(p.split("=", 1) for p in header.split(","))
        expected = hmac.new(
            hook.secret.encode(), parts["t"].encode() + b"." + r.body, hashlib.sha256
        ).hexdigest()
        assert hmac.compare_digest(parts["v1"], expected)
        assert abs(int(parts["t"]) - time.time()) < 60
        assert verify_webhook_signature(hook.secret, header, r.body)
        assert not verify_webhook_signature(hook.secret, header, r.body + b" ")
        assert not verify_webhook_signature("whsec_other", header, r.body)
        assert r.headers["content-type"] == "application/json"
        assert r.headers["host"] == f"localhost:{receiver.port}"

    def listed() -> Any:
        return rest.get(f"/webhooks/{hook.id}/deliveries", key=project.secret_key).json["data"]

    # Deliveries are recorded within 0.1 s of their answer.
    wait_until(lambda: [d["status"] for d in listed()] == ["DELIVERED"] * 2, what="the records")
    deliveries = listed()
    assert [d["eventId"] for d in deliveries] == [got[1]["id"], got[0]["id"]]  # newest first
    assert deliveries[0]["attempts"] == 1
    assert deliveries[0]["lastError"] is None and deliveries[0]["nextAttemptAt"] is None
    assert int(deliveries[0]["eventCursor"]) > int(deliveries[1]["eventCursor"])
    assert set(deliveries[0]) == {
        "eventCursor",
        "eventId",
        "type",
        "status",
        "attempts",
        "lastError",
        "nextAttemptAt",
    }


def test_event_ids_and_cursors_are_those_of_watch(
    database_url: str, target: str, project: Project, receiver: Receiver
) -> None:
    with SegmentsClient(target, project.secret_key) as client, delivering(database_url, project):
        tracked_segment(client)
        hook = client.create_webhook(receiver.url)
        enter(client, "a@example.com", "b@example.com")
        got = receiver.wait_for(2)
        watched = []
        for event in client.watch_segment_events(after="0"):
            watched.append(event)
            if len(watched) == 2:
                break
        deliveries = client.list_webhook_deliveries(hook.id)
    assert [e["id"] for e in got] == [w.event_id for w in watched]
    assert [d.event_cursor for d in reversed(deliveries)] == [w.cursor for w in watched]


def test_a_failed_delivery_is_retried_with_the_same_id_after_a_backoff(
    database_url: str, target: str, project: Project
) -> None:
    answers = iter([500, 503])
    receiver = Receiver(answer=lambda _: next(answers, 200))
    try:
        with (
            SegmentsClient(target, project.secret_key) as client,
            delivering(database_url, project),
        ):
            tracked_segment(client)
            hook = client.create_webhook(receiver.url)
            enter(client, "ada@example.com")
            receiver.wait_for(1)
            # Between attempts: PENDING, the failure and the next attempt shown.
            wait_until(
                lambda: any(d.attempts for d in client.list_webhook_deliveries(hook.id)),
                what="1 attempt",
            )
            pending = client.list_webhook_deliveries(hook.id)[0]
            assert pending.status == webhooks_pb2.WebhookDelivery.PENDING
            assert (delivery_last_error(pending) or "").startswith("HTTP 50")
            assert delivery_next_attempt_at(pending) is not None
            got = receiver.wait_for(3)
            wait_until(
                lambda: (
                    client.list_webhook_deliveries(hook.id)[0].status
                    == webhooks_pb2.WebhookDelivery.DELIVERED
                ),
                what="delivered",
            )
            done = client.list_webhook_deliveries(hook.id)[0]
    finally:
        receiver.close()
    assert len({e["id"] for e in got}) == 1  # the same event each time
    assert len({r.body for r in receiver.received}) == 1  # the same body, byte for byte
    gaps = [b.at - a.at for a, b in zip(receiver.received, receiver.received[1:], strict=False)]
    # Backoff of FAST: the first retry after 0.2-0.4 s, the second after 0.4-0.8 s.
    assert gaps[0] >= 0.2 and gaps[1] >= 0.4, gaps
    assert done.attempts == 3
    assert delivery_last_error(done) == "HTTP 503: ok"
    assert delivery_next_attempt_at(done) is None


def test_a_receiver_down_for_a_while_gets_everything_in_order(
    database_url: str, target: str, project: Project, engine: Engine
) -> None:
    up_at = time.monotonic() + 2.0
    receiver = Receiver(answer=lambda r: 200 if r.at > up_at else 503)
    try:
        with (
            SegmentsClient(target, project.secret_key) as client,
            delivering(database_url, project),
        ):
            tracked_segment(client)
            hook = client.create_webhook(receiver.url)
            for i in range(20):
                enter(client, f"c{i}@example.com")
                if i % 3 == 0:
                    leave(client, f"c{i}@example.com")
            expected = len(feed_ids(engine, project))
            wait_until(
                lambda: sum(1 for r in receiver.received if r.at > up_at) >= expected,
                timeout=30,
                what="the backlog",
            )
            # Deliveries are recorded within 0.1 s of their answer.
            wait_until(
                lambda: all(
                    d.status == webhooks_pb2.WebhookDelivery.DELIVERED
                    for d in client.list_webhook_deliveries(hook.id, limit=100)
                ),
                what="the records",
            )
            deliveries = client.list_webhook_deliveries(hook.id, limit=100)
    finally:
        receiver.close()
    delivered = [r.json for r in receiver.received if r.at > up_at]
    assert len(delivered) == expected
    ids = [d.event_id for d in reversed(deliveries)]  # feed order
    assert [e["id"] for e in delivered] == ids
    # While the receiver was down only the oldest event was attempted.
    assert {r.json["id"] for r in receiver.received if r.at <= up_at} == {ids[0]}
    assert all(d.status == webhooks_pb2.WebhookDelivery.DELIVERED for d in deliveries)


def test_an_event_is_given_up_after_the_limit_and_the_next_ones_follow(
    database_url: str, target: str, project: Project
) -> None:
    receiver = Receiver(answer=lambda r: 500 if r.json["email"] == "bad@example.com" else 200)
    settings = WebhookSettings(
        allow_private=True, poll_seconds=0.1, retry_first=0.2, retry_longest=0.4, give_up=1.0
    )
    try:
        with (
            SegmentsClient(target, project.secret_key) as client,
            delivering(database_url, project, settings=settings),
        ):
            tracked_segment(client)
            hook = client.create_webhook(receiver.url)
            enter(client, "bad@example.com")
            enter(client, "good@example.com")
            wait_until(
                lambda: any(e["email"] == "good@example.com" for e in receiver.events()),
                what="the next event",
            )
            # A delivery is recorded shortly after its answer (within a poll).
            wait_until(
                lambda: (
                    client.list_webhook_deliveries(hook.id)[0].status
                    == webhooks_pb2.WebhookDelivery.DELIVERED
                ),
                what="the next event's record",
            )
            failed, delivered = reversed(client.list_webhook_deliveries(hook.id))
    finally:
        receiver.close()
    assert failed.status == webhooks_pb2.WebhookDelivery.FAILED
    assert failed.attempts >= 2 and delivery_last_error(failed) == "HTTP 500: ok"
    assert delivery_next_attempt_at(failed) is None
    assert delivered.status == webhooks_pb2.WebhookDelivery.DELIVERED


def test_segment_filter_deletion_and_isolation(
    database_url: str, target: str, sessions: sessionmaker[Session], receiver: Receiver
) -> None:
    a, b = new_project(sessions, "a"), new_project(sessions, "b")
    other = Receiver()
    try:
        with (
            SegmentsClient(target, a.secret_key) as ca,
            SegmentsClient(target, b.secret_key) as cb,
            delivering(database_url, a, b),
        ):
            chosen = tracked_segment(ca, "Chosen")
            ca.create_segment(
                "Also pro", condition=PRO, track_membership=True
            )  # not chosen: its events are not sent
            only = ca.create_webhook(receiver.url, segment_ids=[chosen])
            tracked_segment(cb, "B pro")
            cb.create_webhook(other.url)
            enter(ca, "a1@example.com")
            enter(cb, "b1@example.com")
            receiver.wait_for(1)
            other.wait_for(1)
            time.sleep(0.5)
            assert [e["segmentId"] for e in receiver.events()] == [chosen]
            assert [e["email"] for e in other.events()] == ["b1@example.com"]
            with pytest.raises(NotFoundError):
                cb.delete_webhook(only.id)
            ca.delete_webhook(only.id)
            enter(ca, "a2@example.com")
            enter(cb, "b2@example.com")
            other.wait_for(2)

            def removed() -> bool:
                with sessions.begin() as session:
                    rows = session.execute(
                        text(
                            "SELECT (SELECT count(*) FROM webhooks WHERE id = :id)"
                            " + (SELECT count(*) FROM webhook_deliveries WHERE webhook_id = :id)"
                        ),
                        {"id": only.id},
                    ).scalar_one()
                return bool(rows == 0)

            # The worker removes the webhook and its deliveries.
            wait_until(removed, what="the deleted webhook's removal")
            time.sleep(0.3)
            assert len(receiver.events()) == 1  # nothing after the delete
    finally:
        other.close()


# --- where deliveries may go -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "allowed", "always_refused"),
    [
        ("169.254.169.254", False, True),
        ("fe80::1", False, True),
        ("::ffff:169.254.169.254", False, True),
        ("0.0.0.0", False, True),
        ("224.0.0.1", False, True),
        ("127.0.0.1", False, False),
        ("::1", False, False),
        ("10.0.0.5", False, False),
        ("192.168.1.1", False, False),
        ("172.16.0.1", False, False),
        ("fd00::1", False, False),
        ("100.64.0.1", False, False),
        ("93.184.216.34", True, False),
        ("2606:4700::1111", True, False),
    ],
)
def test_address_rules(address: str, allowed: bool, always_refused: bool) -> None:
    assert (address_problem(address, allow_private=False) is None) == allowed
    assert (address_problem(address, allow_private=True) is not None) == always_refused


def test_literal_addresses_are_checked_at_creation() -> None:
    assert check_url("http://127.0.0.1:8000/x", allow_private=True) == "http://127.0.0.1:8000/x"
    for url in ("http://169.254.169.254/", "http://[fe80::1%25eth0]/"):
        with pytest.raises(ValidationError, match="link-local"):
            check_url(url, allow_private=True)


def test_a_name_resolving_to_a_forbidden_address_is_never_connected_to(receiver: Receiver) -> None:
    """The check applies to the address connected to, whatever the URL's text."""
    resolved: dict[str, list[str]] = {
        "metadata.example": ["169.254.169.254"],
        "sneaky.example": ["169.254.169.254", "127.0.0.1"],
    }
    sender = Sender(allow_private=True, timeout=2.0, resolver=lambda host, port: resolved[host])
    body = b'{"id":"x"}'
    refused = sender.post(f"http://metadata.example:{receiver.port}/", "whsec_x", body)
    assert not refused.delivered and "link-local" in (refused.error or "")
    # Of several addresses only the permitted one is connected to (the receiver, pinned).
    pinned = sender.post(f"http://sneaky.example:{receiver.port}/", "whsec_x", body)
    assert pinned.delivered
    assert receiver.received[-1].headers["host"] == f"sneaky.example:{receiver.port}"
    assert len(receiver.received) == 1


def test_localhost_is_refused_without_the_flag_and_delivered_with_it(
    database_url: str, target: str, project: Project, receiver: Receiver
) -> None:
    strict = WebhookSettings(allow_private=False, poll_seconds=0.1, retry_first=5.0)
    with SegmentsClient(target, project.secret_key) as client:
        tracked_segment(client)
        hook = client.create_webhook(receiver.url)  # a name: checked when delivering
        with delivering(database_url, project, settings=strict):
            enter(client, "ada@example.com")
            wait_until(
                lambda: any(d.attempts for d in client.list_webhook_deliveries(hook.id)),
                what="an attempt",
            )
        refused = client.list_webhook_deliveries(hook.id)[0]
        assert receiver.received == []
        assert "loopback" in (delivery_last_error(refused) or "")
        assert refused.status == webhooks_pb2.WebhookDelivery.PENDING
        with delivering(database_url, project, settings=FAST) as worker:
            # The retry is due in about 5 s; the same event then arrives.
            receiver.wait_for(1, timeout=15)
            wait_until(lambda: worker.stats.delivered == 1, what="the delivery's record")
    assert receiver.events()[0]["email"] == "ada@example.com"


def test_signature_function_matches_the_documented_recipe() -> None:
    body = b'{"id":"1"}'
    header = signature("whsec_abc", 1700000000, body)
    mac = hmac.new(b"whsec_abc", b"1700000000." + body, hashlib.sha256).hexdigest()
    assert header == f"t=1700000000,v1={mac}"
    assert verify_webhook_signature("whsec_abc", header, body, now=1700000100)
    assert not verify_webhook_signature("whsec_abc", header, body, now=1700000400)


# --- several server processes ------------------------------------------------------------------

REPLICA_ENV = {
    "SEGMENTS_WEBHOOK_ALLOW_PRIVATE": "1",
    "SEGMENTS_WEBHOOK_POLL_SECONDS": "0.1",
    "SEGMENTS_WEBHOOK_RETRY_FIRST": "0.3",
    "SEGMENTS_WEBHOOK_RETRY_LONGEST": "1",
}


def _backlog(replica: Replica, project: Project, contacts: int) -> None:
    """A tracked segment and `contacts` entries, 100 per transaction."""
    for start in range(0, contacts, 100):
        replica.contacts.BatchUpsertContacts(
            contacts_pb2.BatchUpsertContactsRequest(
                contacts=[
                    contacts_pb2.UpsertContactRequest(email=f"c{i}@example.com")
                    for i in range(start, min(contacts, start + 100))
                ]
            ),
            metadata=project.auth,
        )


def _setup_replica_project(
    replica: Replica, project: Project, receivers: list[Receiver]
) -> list[str]:
    replica.segments.CreateSegment(
        segments_pb2.CreateSegmentRequest(
            name="Everyone",
            condition=as_proto(
                {
                    "logic": "AND",
                    "groups": [
                        {"filters": [{"field": "email", "operator": "contains", "value": "@"}]}
                    ],
                }
            ),
            track_membership=True,
        ),
        metadata=project.auth,
    )
    stub = webhooks_pb2_grpc.WebhookServiceStub(replica.channel)
    return [
        stub.CreateWebhook(webhooks_pb2.CreateWebhookRequest(url=r.url), metadata=project.auth).id
        for r in receivers
    ]


def _expected_ids(engine: Engine, project: Project) -> list[str]:
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT id FROM events WHERE project_id = :p AND feed_seq IS NOT NULL ORDER BY feed_seq"
            ),
            {"p": project.id},
        ).scalars()
        with Session(conn) as session:
            key = event_ids.key_for(session, uuid.UUID(project.id))
        return [event_ids.public_event_id(key, r) for r in rows]


@pytest.mark.slow
@pytest.mark.parametrize("how", ["terminate", "kill"])
def test_a_restart_in_the_middle_of_a_backlog_loses_nothing(
    database_url: str, engine: Engine, sessions: sessionmaker[Session], how: str
) -> None:
    project = new_project(sessions, "restart")
    receiver = Receiver(delay=0.01)
    first = Replica(database_url, env=REPLICA_ENV)
    second: Replica | None = None
    try:
        _setup_replica_project(first, project, [receiver])
        _backlog(first, project, 300)
        expected = _expected_ids(engine, project)
        assert len(expected) == 300
        receiver.wait_for(40)
        if how == "kill":
            first.proc.send_signal(signal.SIGKILL)
        first.stop()
        stopped_at = len(receiver.events())
        assert stopped_at < 300, "the backlog was delivered before the restart"
        second = Replica(database_url, env=REPLICA_ENV)
        wait_until(lambda: len({e["id"] for e in receiver.events()}) >= 300, timeout=60, what="all")
        time.sleep(0.5)
    finally:
        first.stop()
        if second is not None:
            second.stop()
        receiver.close()
    got = [e["id"] for e in receiver.events()]
    assert set(got) == set(expected)
    first_seen = list(dict.fromkeys(got))
    assert first_seen == expected  # in feed order
    duplicates = len(got) - len(set(got))
    if how == "terminate":
        assert duplicates == 0  # a graceful stop finishes and records the attempt in flight
    else:
        assert duplicates <= 20  # at most the deliveries not yet recorded (RECORD_BATCH)


@pytest.mark.slow
def test_two_replicas_deliver_each_event_once(
    database_url: str, engine: Engine, sessions: sessionmaker[Session]
) -> None:
    project = new_project(sessions, "two replicas")
    receivers = [Receiver(delay=0.002) for _ in range(4)]
    replicas = [Replica(database_url, env=REPLICA_ENV) for _ in range(2)]
    try:
        _setup_replica_project(replicas[0], project, receivers)
        for i in range(3):
            _backlog(replicas[i % 2], project, 100 * (i + 1))  # 100 entries, then 100 more...
        expected = _expected_ids(engine, project)
        assert len(expected) == 300
        wait_until(
            lambda: all(len(r.events()) >= 300 for r in receivers),
            timeout=60,
            what="every webhook's events",
        )
        time.sleep(0.5)
    finally:
        for replica in replicas:
            replica.stop()
        for r in receivers:
            r.close()
    for r in receivers:
        assert [e["id"] for e in r.events()] == expected  # each once, in feed order


def test_a_project_with_dead_receivers_does_not_hold_up_another(
    database_url: str, target: str, sessions: sessionmaker[Session]
) -> None:
    """Two threads, at most one per project: A's webhooks to a receiver that never answers
    in time take one thread each attempt, B's deliveries go on at once on the other."""
    slow, quick = new_project(sessions, "slow"), new_project(sessions, "quick")
    hanging = Receiver(delay=3.0)
    fast = Receiver()
    settings = WebhookSettings(
        allow_private=True,
        workers=2,
        project_workers=1,
        poll_seconds=0.1,
        timeout=1.0,
        retry_first=0.2,
        retry_longest=0.2,
    )
    try:
        with (
            SegmentsClient(target, slow.secret_key) as cs,
            SegmentsClient(target, quick.secret_key) as cq,
            delivering(database_url, slow, quick, settings=settings),
        ):
            tracked_segment(cs)
            for _ in range(3):
                cs.create_webhook(hanging.url)
            tracked_segment(cq)
            cq.create_webhook(fast.url)
            enter(cs, *(f"s{i}@example.com" for i in range(5)))
            hanging.wait_for(1)
            latencies = []
            for i in range(5):
                sent = time.monotonic()
                enter(cq, f"q{i}@example.com")
                fast.wait_for(i + 1)
                latencies.append(time.monotonic() - sent)
    finally:
        hanging.close()
        fast.close()
    assert max(latencies) < 1.0, latencies


def test_the_async_client(target: str, project: Project) -> None:
    async def scenario() -> None:
        async with AsyncSegmentsClient(target, project.secret_key) as client:
            created = await client.create_webhook("https://example.com/async")
            assert created.secret.startswith("whsec_")
            assert [w.id for w in await client.list_webhooks()] == [created.id]
            assert (await client.get_webhook(created.id)).url == "https://example.com/async"
            assert await client.list_webhook_deliveries(created.id, limit=5) == []
            await client.delete_webhook(created.id)
            with pytest.raises(NotFoundError):
                await client.get_webhook(created.id)

    asyncio.run(scenario())


def test_finished_deliveries_past_their_retention_are_removed_in_every_project(
    sessions: sessionmaker[Session],
) -> None:
    """The prune reads across projects and removes, a slice at a time, the deliveries
    finished before the retention: of every project, and those only."""
    projects = [new_project(sessions, "prune-a"), new_project(sessions, "prune-b")]
    webhook = uuid.uuid4()
    rows = [
        # (feed_seq, status, finished how long ago)
        (1, "DELIVERED", "2 days"),
        (2, "FAILED", "2 days"),
        (3, "DELIVERED", "1 minute"),
        (4, "PENDING", None),
    ]
    insert = text(
        "INSERT INTO webhook_deliveries (project_id, webhook_id, feed_seq, event_id, type, body,"
        " occurred_at, status, finished_at) VALUES (:p, :w, :seq, 'e', 't', '{}', now(),"
        " :status, now() - CAST(:ago AS interval))"
    )
    with sessions.begin() as session:
        for project in projects:
            for seq, status, ago in rows:
                session.execute(
                    insert,
                    {"p": project.id, "w": webhook, "seq": seq, "status": status, "ago": ago},
                )
    removed = []
    with sessions.begin() as session:
        while step := outbox.prune_finished(session, age=3600, slice_rows=3):
            removed.append(step)
    assert removed == [3, 1]
    with sessions.begin() as session:
        left = session.execute(
            text(
                "SELECT project_id, feed_seq FROM webhook_deliveries WHERE webhook_id = :w"
                " ORDER BY project_id, feed_seq"
            ),
            {"w": webhook},
        ).all()
    assert left == sorted((uuid.UUID(p.id), seq) for p in projects for seq in (3, 4))
