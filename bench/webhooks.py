"""Webhook deliveries: how fast a backlog drains to a local receiver, and the delay from a
membership change to its delivery under a steady rate of changes.

    python -m bench.webhooks                       # 2,000-event backlog, 1,000 changes/s for 10 s
    python -m bench.webhooks --backlog 500 --rate 200 --seconds 5 --webhooks 2

One `segments serve` process (bench.stack.Server) on a new database of DATABASE_URL (or
TEST_DATABASE_URL), dropped afterwards; the receiver is an HTTP server in this process.
Phase 1 (throughput): `--backlog` entries are recorded while the receiver answers 503, then
it answers 204; events/s is the backlog over the time from then to its last delivery.
Phase 2 (latency): `--rate` entries a second for `--seconds`, sent in batches every 100 ms
by `--senders` concurrent clients;
an event's delay is its arrival at the receiver minus its `occurredAt` (the transaction
that recorded it; same clock). With several webhooks, every event goes to each of them.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from google.protobuf import json_format

from bench.measure import summary
from bench.stack import Server
from segments_api.v1 import (
    contacts_pb2,
    resources_pb2,
    segments_pb2,
    webhooks_pb2,
    webhooks_pb2_grpc,
)
from segments_service.auth import create_project
from segments_service.database import (
    create_database,
    drop_database,
    make_engine,
    make_sessionmaker,
    migrate,
    sqlalchemy_url,
)

EVERYONE = {
    "logic": "AND",
    "groups": [{"filters": [{"field": "email", "operator": "contains", "value": "@"}]}],
}


class Receiver:
    """Records each delivery's arrival (wall clock) by path and event id; `up` decides 204/503."""

    def __init__(self) -> None:
        self.up = True
        self.lock = threading.Lock()
        self.arrivals: dict[str, dict[str, tuple[float, str]]] = {}
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                now = time.time()
                status = 204 if receiver.up else 503
                if status == 204:
                    event = json.loads(body)
                    with receiver.lock:
                        receiver.arrivals.setdefault(self.path.lstrip("/"), {}).setdefault(
                            event["id"], (now, event["occurredAt"])
                        )
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/{path}"

    def count(self, path: str) -> int:
        with self.lock:
            return len(self.arrivals.get(path, {}))

    def wait(self, path: str, count: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.count(path) < count:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _entries(server: Server, metadata: Any, prefix: str, start: int, count: int) -> None:
    server.contacts.BatchUpsertContacts(
        contacts_pb2.BatchUpsertContactsRequest(
            contacts=[
                contacts_pb2.UpsertContactRequest(email=f"{prefix}{i}@bench.example")
                for i in range(start, start + count)
            ]
        ),
        metadata=metadata,
        timeout=30,
    )


def run(args: argparse.Namespace, admin: str | None = None) -> dict[str, Any]:
    """Both phases against a server of its own, on a new database of `admin`'s server
    (default: DATABASE_URL or TEST_DATABASE_URL), dropped afterwards."""
    admin = admin or os.environ.get("DATABASE_URL") or os.environ.get("TEST_DATABASE_URL")
    if not admin:
        raise SystemExit("set DATABASE_URL (or TEST_DATABASE_URL) to a PostgreSQL server")
    name = f"segments_bench_webhooks_{uuid.uuid4().hex[:8]}"
    create_database(sqlalchemy_url(admin), name)
    from sqlalchemy.engine import make_url

    url = make_url(sqlalchemy_url(admin)).set(database=name).render_as_string(False)
    receiver = Receiver()
    server: Server | None = None
    try:
        migrate(url)
        engine = make_engine(url, pool_size=2)
        with make_sessionmaker(engine).begin() as session:
            keys = create_project(session, "webhook bench")
        engine.dispose()
        metadata = (("authorization", f"Bearer {keys['secretKey']}"),)
        os.environ.update(
            {
                "SEGMENTS_WEBHOOK_ALLOW_PRIVATE": "1",
                "SEGMENTS_WEBHOOK_POLL_SECONDS": "0.1",
                "SEGMENTS_WEBHOOK_RETRY_FIRST": "0.2",
                "SEGMENTS_WEBHOOK_RETRY_LONGEST": "0.5",
                "SEGMENTS_WEBHOOK_WORKERS": str(max(4, args.webhooks)),
                "SEGMENTS_WEBHOOK_PROJECT_WORKERS": str(max(2, args.webhooks)),
            }
        )
        log = Path(tempfile.gettempdir()) / f"{name}.log"
        server = Server(url, sweep_seconds=0, log_path=log)
        server.segments.CreateSegment(
            segments_pb2.CreateSegmentRequest(
                name="Everyone",
                condition=json_format.ParseDict(EVERYONE, resources_pb2.FilterCondition()),
                track_membership=True,
            ),
            metadata=metadata,
        )
        hooks = webhooks_pb2_grpc.WebhookServiceStub(server.channel)
        paths = [f"hook{i}" for i in range(args.webhooks)]
        for path in paths:
            hooks.CreateWebhook(
                webhooks_pb2.CreateWebhookRequest(url=receiver.url(path)), metadata=metadata
            )

        # Phase 1: a backlog drains.
        receiver.up = False
        for start in range(0, args.backlog, 1000):
            _entries(server, metadata, "b", start, min(1000, args.backlog - start))
        time.sleep(1.0)
        up_at = time.time()
        receiver.up = True
        drained = all(receiver.wait(p, args.backlog, args.timeout) for p in paths)
        with receiver.lock:
            last = max(max(a for a, _ in receiver.arrivals[p].values()) for p in paths)
        backlog = {
            "events": args.backlog,
            "webhooks": args.webhooks,
            "drained": drained,
            "seconds": round(last - up_at, 3),
            "events_per_second_per_webhook": round(args.backlog / (last - up_at), 1),
            "deliveries_per_second": round(args.backlog * args.webhooks / (last - up_at), 1),
        }

        # Phase 2: a steady rate of membership changes. Each tick's batch is sent from a
        # pool of senders, so that a batch slower than the tick does not hold back the next
        # one: the rate is the clock's, as from several independent clients.
        tick = 0.1
        per_tick = max(1, round(args.rate * tick))
        sent = 0
        started = time.monotonic()
        with ThreadPoolExecutor(max_workers=args.senders) as senders:
            pending = []
            while time.monotonic() - started < args.seconds:
                pending.append(senders.submit(_entries, server, metadata, "r", sent, per_tick))
                sent += per_tick
                pause = started + (sent / per_tick) * tick - time.monotonic()
                if pause > 0:
                    time.sleep(pause)
            for done in pending:
                done.result()
        achieved = sent / (time.monotonic() - started)
        total = args.backlog + sent
        kept_up = all(receiver.wait(p, total, args.timeout) for p in paths)
        delays: list[float] = []
        with receiver.lock:
            for p in paths:
                for arrived, occurred in receiver.arrivals[p].values():
                    at = datetime.fromisoformat(occurred.replace("Z", "+00:00")).timestamp()
                    if at >= up_at:
                        delays.append((arrived - at) * 1000)
        steady = {
            "target_changes_per_second": args.rate,
            "achieved_changes_per_second": round(achieved, 1),
            "changes": sent,
            "all_delivered_within_timeout": kept_up,
            "entry_to_delivery_ms": summary(delays, 1),
        }
        return {"backlog": backlog, "steady": steady}
    finally:
        if server is not None:
            server.stop()
        receiver.close()
        drop_database(sqlalchemy_url(admin), name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backlog", type=int, default=2000)
    parser.add_argument("--rate", type=int, default=1000, help="membership changes a second")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--webhooks", type=int, default=1)
    parser.add_argument("--senders", type=int, default=4, help="concurrent clients of phase 2")
    parser.add_argument(
        "--timeout", type=float, default=120.0, help="seconds to wait for deliveries"
    )
    print(json.dumps(run(parser.parse_args()), indent=2))


if __name__ == "__main__":
    main()
