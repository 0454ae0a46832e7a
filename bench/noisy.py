"""The noisy-neighbour phase (docs/limits.md, fair share): a small project's REST latency while the main
project holds many streams, runs heavy counts and builds a segment of every contact; and
the main project's own writes during that build. See BENCHMARKS.md, "Noisy neighbour"."""

from __future__ import annotations

import http.client
import json
import math
import random
import threading
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf import json_format, struct_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from sqlalchemy import select, text

from bench import load, scenarios
from bench.measure import percentile, summary
from bench.stack import status_engine
from segments import F, any_of
from segments_api.v1 import (
    contacts_pb2,
    events_pb2,
    resources_pb2,
    segments_pb2,
    segments_pb2_grpc,
)
from segments_service import auth, tables

if TYPE_CHECKING:
    from bench.context import Env, Stack

B_PROJECT = "bench-noisy-b"
B_DOMAIN = "noisy-b.example"
B_EVENTS_PER_CONTACT = 5
PROBE_EVENT = "noisy_probe"
# The limits of BENCHMARKS.md, "Noisy neighbour".
LIMITS = {
    "noisy_neighbour_streams": 3.0,
    "noisy_neighbour_counts": 3.0,
    "build_concurrent_writes": 3.0,
    "build_response_s": 2.0,
}
# An expensive valid condition: frequent events in windows, nested ORs of event filters,
# email activity, and a latest-occurrence test; every contact is tested against several
# event subqueries.
HEAVY_COUNT: dict[str, Any] = any_of(
    F.event("page_view").triggered_within(30, "days")
    & F.event("session_start").not_triggered_within(3, "days")
    & any_of(
        F.event("product_viewed").triggered_within(14, "days"),
        F.event("search").triggered_older_than(60, "days"),
        F.event("add_to_cart").triggered_within(7, "days")
        & F.event("purchase").not_triggered_within(7, "days"),
    ),
    F.email_activity("opened").triggered_within(30, "days")
    & F.email_activity("clicked").not_triggered_within(30, "days")
    & F.event("login").triggered()
    & any_of(
        F.event("feature_used").triggered_within(60, "days"),
        F.event("app_opened").not_triggered_within(90, "days"),
    ),
).to_dict()
# Fewer timed requests than this in a window make a p95 little more than their maximum.
MIN_SAMPLES = 20
EVERYONE = F.email.contains("@").to_dict()


@dataclass(frozen=True)
class Config:
    seconds: float  # each measurement window
    streams: int  # the main project's open WatchSegmentEvents streams
    counts: int  # its concurrent heavy counts
    rate: float  # the small project's requests per second, per endpoint; upserts alike
    timeout: float  # one request of the small project, one upsert
    build_timeout: float  # the 1M-member build, create and background work together
    b_contacts: int = 1000
    b_segments: int = 20


def md(key: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {key}"),)


def condition_proto(condition: dict[str, Any]) -> resources_pb2.FilterCondition:
    return json_format.ParseDict(condition, resources_pb2.FilterCondition())


def segment_status(segment: Any) -> str | None:
    """The Segment's `status` by name (READY, BUILDING, FAILED), or None where the Segment
    has no such field (builds run inside the create request)."""
    status = segment.DESCRIPTOR.fields_by_name.get("status")
    if status is None:
        return None
    value = segment.status
    if status.enum_type is not None:
        value = status.enum_type.values_by_number[value].name
    return str(value).upper().removeprefix("STATUS_")


def retry_delay(err: grpc.RpcError) -> float | None:
    """The google.rpc.RetryInfo delay of a refusal, in seconds, if it carries one."""
    try:
        status = rpc_status.from_call(err)  # type: ignore[arg-type]
    except ValueError:
        return None
    for detail in status.details if status is not None else ():
        info = error_details_pb2.RetryInfo()
        if detail.Unpack(info):
            return info.retry_delay.seconds + info.retry_delay.nanos / 1e9
    return None


def code_of(err: grpc.RpcError) -> str:
    code = err.code() if isinstance(err, grpc.Call) else None
    return code.name if code is not None else type(err).__name__


# --- the small project's REST caller ---------------------------------------------------


class Probe:
    """One keep-alive HTTP/1.1 connection to Envoy; every outcome is recorded, never raised:
    status codes as they come, transport failures and timeouts by name."""

    def __init__(self, port: int, timeout: float) -> None:
        self.port = port
        self.timeout = timeout
        self.conn: http.client.HTTPConnection | None = None

    def call(self, method: str, path: str, key: str, body: Any = None) -> tuple[float, str]:
        headers = {"Authorization": f"Bearer {key}"}
        payload = None
        if body is not None:
            payload = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        started = time.perf_counter()
        for attempt in (1, 2):
            reused = self.conn is not None
            try:
                if self.conn is None:
                    self.conn = http.client.HTTPConnection(
                        "127.0.0.1", self.port, timeout=self.timeout
                    )
                self.conn.request(method, path, body=payload, headers=headers)
                response = self.conn.getresponse()
                response.read()
                outcome = str(response.status)
            except TimeoutError:
                outcome = "timeout"
            except (OSError, http.client.HTTPException) as err:
                outcome = type(err).__name__
                # A keep-alive connection the proxy closed meanwhile: once more on a new
                # one, as HTTP clients do.
                stale = isinstance(
                    err, (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError)
                )
                if reused and stale and attempt == 1:
                    self.close()
                    continue
            if not outcome.isdigit():
                self.close()
            break
        return (time.perf_counter() - started) * 1000, outcome

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def succeeded(outcome: str) -> bool:
    """An HTTP 2xx, or gRPC OK."""
    return outcome == "OK" or (outcome.isdigit() and outcome.startswith("2"))


@dataclass
class Calls:
    """Latencies and outcomes of one kind of request."""

    ms: list[float] = field(default_factory=list)
    outcomes: Counter[str] = field(default_factory=Counter)

    def add(self, ms: float, outcome: str) -> None:
        self.ms.append(ms)
        self.outcomes[outcome] += 1

    @property
    def errors(self) -> int:
        return sum(n for o, n in self.outcomes.items() if not succeeded(o))

    def to_json(self) -> dict[str, Any]:
        return {
            "ms": summary(self.ms, 2),
            "errors": self.errors,
            "outcomes": dict(sorted(self.outcomes.items())),
        }


def paced(rate: float, until: Callable[[], bool]) -> Iterator[int]:
    """Yields at `rate` per second until `until()`; a late start is not made up for (no
    bursts after a slow request)."""
    interval = 1 / rate
    next_at = time.perf_counter()
    n = 0
    while not until():
        delay = next_at - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        yield n
        n += 1
        next_at = max(next_at + interval, time.perf_counter())


@dataclass
class Small:
    """The small project B: its keys and its contacts' emails."""

    id: str
    secret: str
    public: str
    emails: list[str]
    segments: int
    events: int


def b_traffic(stack: Stack, b: Small, cfg: Config, seconds: float) -> dict[str, Calls]:
    """B's GET /segments and POST /v1/track through Envoy, alternating at cfg.rate each."""
    probe = Probe(stack.envoy.http_port, cfg.timeout)
    rng = random.Random(7)
    calls = {"get_segments": Calls(), "track": Calls()}
    end = time.perf_counter() + seconds
    try:
        for _ in paced(cfg.rate, lambda: time.perf_counter() >= end):
            calls["get_segments"].add(*probe.call("GET", "/segments", b.secret))
            body = {"event": PROBE_EVENT, "email": rng.choice(b.emails)}
            calls["track"].add(*probe.call("POST", "/v1/track", b.public, body))
    finally:
        probe.close()
    return calls


# --- setup and cleanup ---------------------------------------------------------------------


def delete_all_segments(stub: Any, key: str) -> int:
    """Deletes every segment of a project; one that another still references (refused
    with FAILED_PRECONDITION) goes in a later round."""
    deleted = 0
    for _round in range(5):
        reply = stub.ListSegments(segments_pb2.ListSegmentsRequest(), metadata=md(key), timeout=60)
        if not reply.segments:
            break
        for segment in reply.segments:
            try:
                stub.DeleteSegment(
                    segments_pb2.DeleteSegmentRequest(id=segment.id), metadata=md(key), timeout=600
                )
                deleted += 1
            except grpc.RpcError as err:
                if code_of(err) != "FAILED_PRECONDITION":
                    raise
    return deleted


def setup_small(env: Env, stack: Stack, cfg: Config) -> Small:
    """Project B, made once and reused: cfg.b_contacts contacts with a few events each over
    the last 90 days (removed with the other runs' events by the next run's reset) and
    cfg.b_segments segments made afresh."""
    with env.sessions.begin() as session:
        project_id = session.execute(
            select(tables.projects.c.id).where(tables.projects.c.name == B_PROJECT)
        ).scalar_one_or_none()
        if project_id is None:
            project_id = uuid.UUID(auth.create_project(session, B_PROJECT)["id"])
        secret = auth.issue_key(session, project_id, "secret")
        public = auth.issue_key(session, project_id, "public")
    server = stack.server
    delete_all_segments(server.segments, secret)
    rng = random.Random(5)
    plans = ("free", "starter", "pro", "enterprise")
    emails = [f"user{n}@{B_DOMAIN}" for n in range(1, cfg.b_contacts + 1)]
    for start in range(0, len(emails), 1000):
        contacts = []
        for email in emails[start : start + 1000]:
            data = struct_pb2.Struct()
            data.update(
                {
                    "plan": rng.choice(plans),
                    "age": rng.randint(18, 80),
                    "country": rng.choice(load.COUNTRIES),
                }
            )
            contacts.append(contacts_pb2.UpsertContactRequest(email=email, data=data))
        server.contacts.BatchUpsertContacts(
            contacts_pb2.BatchUpsertContactsRequest(contacts=contacts),
            metadata=md(secret),
            timeout=120,
        )
    now = datetime.now(UTC)
    items = []
    for email in emails:
        for _ in range(B_EVENTS_PER_CONTACT):
            item = events_pb2.IngestedEvent(
                email=email,
                event=load.EVENT_NAMES[int(len(load.EVENT_NAMES) * rng.random() ** 2.2)],
            )
            item.occurred_at.FromDatetime(now - timedelta(days=90 * rng.random()))
            items.append(item)
    for start in range(0, len(items), 1000):
        server.events.IngestEvents(
            events_pb2.IngestEventsRequest(events=items[start : start + 1000]),
            metadata=md(secret),
            timeout=120,
        )
    # The reference language's conditions, as before the extended scenarios were added.
    conditions = [(s.name, s.condition) for s in scenarios.REFERENCE_SCENARIOS if not s.references]
    conditions += [scenarios.filler(i) for i in range(max(0, cfg.b_segments - len(conditions)))]
    for name, condition in conditions[: cfg.b_segments]:
        server.segments.CreateSegment(
            segments_pb2.CreateSegmentRequest(name=name, condition=condition_proto(condition)),
            metadata=md(secret),
            timeout=120,
        )
    return Small(str(project_id), secret, public, emails, cfg.b_segments, len(items))


def drain(env: Env, limit: float = 120.0) -> float:
    """Seconds until no statement of the server is running (three samples in a row), at
    most `limit`: what a condition left running (a cancelled count's statement, a build)
    must not load the next one."""
    started = time.perf_counter()
    quiet = 0
    while quiet < 3 and time.perf_counter() - started < limit:
        with env.engine.connect() as conn:
            active = conn.execute(
                text(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND application_name LIKE 'segments:%' AND state = 'active' "
                    "AND pid <> pg_backend_pid()"
                )
            ).scalar_one()
        quiet = quiet + 1 if active == 0 else 0
        time.sleep(0.2)
    return round(time.perf_counter() - started, 1)


def recover(stack: Stack, b: Small, cfg: Config, limit: float = 120.0) -> float:
    """Seconds until B's GET /segments answers 2xx again, at most `limit`: a server whose
    workers were all held fails Envoy's health checks, and Envoy then answers 503 for a
    while; the next baseline must not start before it routes again."""
    started = time.perf_counter()
    probe = Probe(stack.envoy.http_port, cfg.timeout)
    try:
        while time.perf_counter() - started < limit:
            if succeeded(probe.call("GET", "/segments", b.secret)[1]):
                break
            time.sleep(0.5)
    finally:
        probe.close()
    return round(time.perf_counter() - started, 1)


# --- the main project's load ------------------------------------------------------------------


@contextmanager
def open_streams(stack: Stack, key: str, n: int, seconds: float) -> Iterator[dict[str, Any]]:
    """n WatchSegmentEvents streams of the main project, held open (nothing is read: the
    project has no tracked segment, so nothing comes) and cancelled on exit. The summary
    says how many the server refused or ended early, by code."""
    channels = [stack.server.new_channel() for _ in range(max(1, math.ceil(n / 8)))]
    calls = []
    report: dict[str, Any] = {"requested": n}
    try:
        for i in range(n):
            stub: Any = segments_pb2_grpc.SegmentServiceStub(channels[i % len(channels)])
            calls.append(
                stub.WatchSegmentEvents(
                    segments_pb2.WatchSegmentEventsRequest(),
                    metadata=md(key),
                    timeout=seconds + 120,
                )
            )
        # A refusal comes at once; give the server a moment to answer every stream.
        settle_until = time.perf_counter() + 2
        while time.perf_counter() < settle_until and not all(c.done() for c in calls):
            time.sleep(0.1)
        yield report
    finally:
        ended = Counter(c.code().name for c in calls if c.done())
        report["ended_before_cancel"] = dict(ended)
        report["refused"] = ended.get("RESOURCE_EXHAUSTED", 0)
        report["open_at_end"] = len(calls) - sum(ended.values())
        for c in calls:
            c.cancel()
        for channel in channels:
            channel.close()


@dataclass
class Counts:
    """The main project's heavy counts, looped by cfg.counts threads, and its one
    expensive create, until stop."""

    stack: Stack
    key: str
    cfg: Config
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    ms: list[float] = field(default_factory=list)
    outcomes: Counter[str] = field(default_factory=Counter)
    create: dict[str, Any] = field(default_factory=dict)
    threads: list[threading.Thread] = field(default_factory=list)

    def start(self, deadline: float) -> None:
        self.deadline = deadline
        for i in range(self.cfg.counts):
            self.threads.append(threading.Thread(target=self.count_loop, name=f"count-{i}"))
        self.threads.append(threading.Thread(target=self.create_once, name="create"))
        for t in self.threads:
            t.start()

    def remaining(self) -> float:
        return max(1.0, self.deadline - time.perf_counter())

    def count_loop(self) -> None:
        request = segments_pb2.CountMatchingContactsRequest(condition=condition_proto(HEAVY_COUNT))
        while not self.stop.is_set():
            started = time.perf_counter()
            try:
                self.stack.server.segments.CountMatchingContacts(
                    request, metadata=md(self.key), timeout=self.remaining()
                )
                outcome, delay = "OK", 0.0
            except grpc.RpcError as err:
                outcome = code_of(err)
                # A refused caller waits as told (at most a second), as a client would.
                delay = min(retry_delay(err) or 0.1, 1.0) if outcome == "RESOURCE_EXHAUSTED" else 0
            with self.lock:
                self.outcomes[outcome] += 1
                if outcome == "OK":
                    self.ms.append((time.perf_counter() - started) * 1000)
            if delay:
                self.stop.wait(delay)

    def create_once(self) -> None:
        request = segments_pb2.CreateSegmentRequest(
            name="Noisy everyone (counts)", condition=condition_proto(EVERYONE)
        )
        started = time.perf_counter()
        try:
            reply = self.stack.server.segments.CreateSegment(
                request, metadata=md(self.key), timeout=self.remaining() + 60
            )
            self.create.update(
                outcome="OK", id=reply.id, status=segment_status(reply), members=reply.member_count
            )
        except grpc.RpcError as err:
            self.create["outcome"] = code_of(err)
        self.create["seconds"] = round(time.perf_counter() - started, 2)

    def finish(self) -> dict[str, Any]:
        self.stop.set()
        for t in self.threads:
            t.join()
        refused = self.outcomes.get("RESOURCE_EXHAUSTED", 0)
        return {
            "concurrent": self.cfg.counts,
            "condition": HEAVY_COUNT,
            "completed": self.outcomes.get("OK", 0),
            "refused": refused,
            "other_errors": sum(self.outcomes.values()) - self.outcomes.get("OK", 0) - refused,
            "outcomes": dict(sorted(self.outcomes.items())),
            "count_ms": summary(self.ms, 1),
            "create": self.create,
        }


def b_report(loaded: dict[str, Calls], unloaded: dict[str, Calls]) -> dict[str, Any]:
    """B's figures under load, each endpoint's p95 against its unloaded p95."""
    out: dict[str, Any] = {}
    for name, calls in loaded.items():
        base = percentile(unloaded[name].ms, 95)
        p95 = percentile(calls.ms, 95)
        ratio = round(p95 / base, 2) if calls.ms and base > 0 else None
        out[name] = {**calls.to_json(), "unloaded": unloaded[name].to_json(), "p95_ratio": ratio}
    return out


def b_unloaded(stack: Stack, b: Small, cfg: Config) -> dict[str, Calls]:
    """B's traffic with A idle, just before a condition: on a shared machine a baseline
    taken next to the load it is compared with drifts least."""
    with stack.sampler.phase("noisy_unloaded"):
        return b_traffic(stack, b, cfg, cfg.seconds)


# --- the conditions ---------------------------------------------------------------------------


def streams_condition(env: Env, stack: Stack, b: Small, cfg: Config) -> dict[str, Any]:
    unloaded = b_unloaded(stack, b, cfg)
    with open_streams(stack, env.keys["main"], cfg.streams, cfg.seconds) as streams:
        loaded = b_traffic(stack, b, cfg, cfg.seconds)
    return {
        "b": b_report(loaded, unloaded),
        "a_streams": streams,
        "drain_s": drain(env),
        "recover_s": recover(stack, b, cfg),
    }


def counts_condition(env: Env, stack: Stack, b: Small, cfg: Config) -> dict[str, Any]:
    unloaded = b_unloaded(stack, b, cfg)
    counts = Counts(stack, env.keys["main"], cfg)
    counts.start(time.perf_counter() + cfg.seconds + 5)
    try:
        loaded = b_traffic(stack, b, cfg, cfg.seconds)
    finally:
        a = counts.finish()
    created = a["create"].get("id")
    if created:
        stack.server.segments.DeleteSegment(
            segments_pb2.DeleteSegmentRequest(id=created),
            metadata=md(env.keys["main"]),
            timeout=600,
        )
    return {
        "b": b_report(loaded, unloaded),
        "a": a,
        "drain_s": drain(env),
        "recover_s": recover(stack, b, cfg),
    }


def upserts(
    stack: Stack, key: str, cfg: Config, emails: list[str], until: Callable[[], bool]
) -> Calls:
    """The main project's UpsertContact, one at a time at cfg.rate, until `until()`."""
    calls = Calls()
    for n in paced(cfg.rate, until):
        data = struct_pb2.Struct()
        data.update({"noisyRound": n})
        request = contacts_pb2.UpsertContactRequest(email=emails[n % len(emails)], data=data)
        started = time.perf_counter()
        try:
            stack.server.contacts.UpsertContact(request, metadata=md(key), timeout=cfg.timeout)
            outcome = "OK"
        except grpc.RpcError as err:
            outcome = code_of(err)
        calls.add((time.perf_counter() - started) * 1000, outcome)
    return calls


def build_condition(env: Env, stack: Stack, cfg: Config) -> dict[str, Any]:
    """Upserts before, then during, the build of a segment of every contact."""
    key = env.keys["main"]
    segments_stub = stack.server.segments
    # Contacts of the domain the next run's reset removes; created here so that every
    # timed upsert, before the build and during it, is an update.
    emails = [f"noisy{n}@{load.NEW_CONTACT_DOMAIN}" for n in range(50)]
    for email in emails:
        stack.server.contacts.UpsertContact(
            contacts_pb2.UpsertContactRequest(email=email), metadata=md(key), timeout=60
        )
    before_end = time.perf_counter() + cfg.seconds
    before = upserts(stack, key, cfg, emails, lambda: time.perf_counter() >= before_end)

    created: dict[str, Any] = {}
    done = threading.Event()

    def create_and_wait() -> None:
        started = time.perf_counter()
        try:
            reply = segments_stub.CreateSegment(
                segments_pb2.CreateSegmentRequest(
                    name="Noisy everyone (build)", condition=condition_proto(EVERYONE)
                ),
                metadata=md(key),
                timeout=cfg.build_timeout,
            )
            created.update(
                outcome="OK",
                id=reply.id,
                response_s=round(time.perf_counter() - started, 3),
                status_in_response=segment_status(reply),
                members_in_response=reply.member_count,
            )
            status = created["status_in_response"]
            # Background build: wait for READY reading the status column, every 0.5 s. (A
            # GetSegment of a BUILDING segment counts it live: polling that way would add a
            # count over every contact each time, competing with the writes measured.)
            polls: Counter[str] = Counter()
            if status == "BUILDING":
                engine = status_engine(stack.server.database_url)
                while time.perf_counter() - started < cfg.build_timeout:
                    time.sleep(0.5)
                    with engine.connect() as conn:
                        status = conn.execute(
                            text("SELECT status FROM segments WHERE id = :id"), {"id": reply.id}
                        ).scalar_one()
                    polls["status"] += 1
                    if status != "BUILDING":
                        break
                created["build_s"] = round(time.perf_counter() - started, 2)
                reply = segments_stub.GetSegment(
                    segments_pb2.GetSegmentRequest(id=reply.id), metadata=md(key), timeout=60
                )
                status = segment_status(reply)
            created.update(final_status=status, members=reply.member_count, polls=dict(polls))
        except grpc.RpcError as err:
            created["outcome"] = code_of(err)
            created["response_s"] = round(time.perf_counter() - started, 3)
        finally:
            created["build_total_s"] = round(time.perf_counter() - started, 2)
            done.set()

    builder = threading.Thread(target=create_and_wait, name="build")
    builder.start()
    during = upserts(stack, key, cfg, emails, done.is_set)
    builder.join()
    if created.get("id"):
        segments_stub.DeleteSegment(
            segments_pb2.DeleteSegmentRequest(id=created["id"]), metadata=md(key), timeout=600
        )
    base = percentile(before.ms, 95)
    p95 = percentile(during.ms, 95)
    return {
        "upserts_before": before.to_json(),
        "upserts_during": during.to_json(),
        "p95_ratio": round(p95 / base, 2) if during.ms and base > 0 else None,
        "create": created,
        "measured_while": "the build (create, then until its status is READY)"
        if created.get("status_in_response") == "BUILDING"
        else "the create request (the build runs inside it)",
        "drain_s": drain(env),
    }


def run(env: Env, stack: Stack, cfg: Config, log: Callable[[str], None]) -> dict[str, Any]:
    main_key = env.keys["main"]
    removed = delete_all_segments(stack.server.segments, main_key)
    if removed:
        log(f"    deleted the main project's {removed} segments")
    b = setup_small(env, stack, cfg)
    log(f"    project B: {len(b.emails):,} contacts, {b.events:,} events, {b.segments} segments")
    results: dict[str, Any] = {
        "config": {
            "window_seconds": cfg.seconds,
            "streams": cfg.streams,
            "counts": cfg.counts,
            "rate_per_endpoint": cfg.rate,
            "request_timeout_s": cfg.timeout,
            "build_timeout_s": cfg.build_timeout,
        },
        "project_b": {"contacts": len(b.emails), "events": b.events, "segments": b.segments},
    }

    def part(name: str, measure: Callable[[], dict[str, Any]]) -> dict[str, Any] | None:
        """One condition, in its own sampler phase; a failure is recorded and the next
        condition still runs."""
        try:
            with stack.sampler.phase(f"noisy_{name}"):
                results[name] = measure()
        except Exception as err:
            log(traceback.format_exc())
            log(f"    noisy {name!r} failed: {type(err).__name__}: {err}")
            results[name] = {"error": f"{type(err).__name__}: {err}"}
            drain(env)
            return None
        return dict(results[name])

    try:
        drain(env)
        if streams := part("streams", lambda: streams_condition(env, stack, b, cfg)):
            log(
                f"    with {cfg.streams} streams: {_brief(streams['b'])}; A: {streams['a_streams']}"
            )
        if counts := part("counts", lambda: counts_condition(env, stack, b, cfg)):
            a = counts["a"]
            log(
                f"    with {cfg.counts} heavy counts: {_brief(counts['b'])}; A: "
                f"{a['completed']} counts, {a['refused']} refused, create {a['create']}"
            )
        if build := part("build", lambda: build_condition(env, stack, cfg)):
            log(
                f"    upserts during the build: p95 x{build['p95_ratio']} "
                f"({build['upserts_during']['ms'].get('n', 0)} upserts); create "
                f"{build['create']}"
            )
    finally:
        with suppress(grpc.RpcError):
            delete_all_segments(stack.server.segments, b.secret)
        with env.sessions.begin() as session:
            for key in (b.secret, b.public):
                auth.revoke_key(session, key)
    return results


def _brief(b: dict[str, Any]) -> str:
    return ", ".join(
        f"{name} p95 {v['ms'].get('p95', math.nan)} ms (x{v['p95_ratio']}, {v['errors']} errors)"
        for name, v in b.items()
    )


# --- targets ----------------------------------------------------------------------------------


def _b_target(condition: dict[str, Any], name: str, what: str) -> dict[str, Any]:
    b = condition["b"]
    ratios = {k: v["p95_ratio"] for k, v in b.items()}
    worst = max(ratios, key=lambda k: -1 if ratios[k] is None else ratios[k])
    errors = sum(v["errors"] for v in b.values())
    measured = ratios[worst]
    limit = LIMITS[name]
    entry: dict[str, Any] = {
        "measured": measured,
        "limit": limit,
        "met": measured is not None and measured <= limit and errors == 0,
        "unit": "x",
        "rule": f"project B's p95 (GET /segments and POST /v1/track through Envoy) while {what}, "
        "over its p95 unloaded just before, the worse endpoint shown; any B request "
        "that fails or times out is a miss",
        "endpoint": worst,
        "b_errors": errors,
        "p95_ratios": ratios,
    }
    notes = []
    if errors:
        outcomes: Counter[str] = Counter()
        for v in b.values():
            outcomes.update(v["outcomes"])
        failed = {k: n for k, n in outcomes.items() if not succeeded(k)}
        notes.append(f"{errors} of B's requests failed: {failed}")
    if measured is not None and measured > limit:
        notes.append(f"{measured / limit:.2f} times the limit")
    if notes:
        entry["note"] = "; ".join(notes)
    return entry


def targets(noisy: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The phase's four targets; a part that did not run is reported as not measured."""
    makers: dict[str, Callable[[], dict[str, Any]]] = {
        "noisy_neighbour_streams": lambda: {
            **_b_target(
                noisy["streams"],
                "noisy_neighbour_streams",
                f"A holds {noisy['config']['streams']} WatchSegmentEvents streams",
            ),
            "a_streams": noisy["streams"]["a_streams"],
        },
        "noisy_neighbour_counts": lambda: {
            **_b_target(
                noisy["counts"],
                "noisy_neighbour_counts",
                f"A runs {noisy['config']['counts']} heavy CountMatchingContacts and one "
                "create of a segment of every contact (A's refusals are not B's errors)",
            ),
            "a_refused": noisy["counts"]["a"]["refused"],
            "a_completed": noisy["counts"]["a"]["completed"],
        },
        "build_concurrent_writes": lambda: _build_writes(noisy["build"]),
        "build_response_s": lambda: _build_response(noisy["build"]),
    }
    out: dict[str, dict[str, Any]] = {}
    for name, make in makers.items():
        try:
            out[name] = make()
        except (KeyError, TypeError, ValueError) as err:
            out[name] = {
                "measured": None,
                "limit": LIMITS[name],
                "met": False,
                "note": f"not measured: {type(err).__name__}: {err} (see the phase's error)",
            }
    return out


def _build_writes(build: dict[str, Any]) -> dict[str, Any]:
    ratio = build["p95_ratio"]
    limit = LIMITS["build_concurrent_writes"]
    errors = build["upserts_during"]["errors"]
    entry: dict[str, Any] = {
        "measured": ratio,
        "limit": limit,
        "met": ratio is not None and ratio <= limit and errors == 0,
        "unit": "x",
        "rule": "A's UpsertContact p95, one at a time, during "
        f"{build['measured_while']}, over its p95 just before; a failed upsert is a miss",
        "upserts_during": build["upserts_during"]["ms"].get("n", 0),
        "build_total_s": build["create"].get("build_total_s"),
    }
    notes = []
    if ratio is None:
        notes.append("no upsert completed during the build")
    elif entry["upserts_during"] < MIN_SAMPLES:
        notes.append(f"only {entry['upserts_during']} upserts during the build: a rough ratio")
    if errors:
        notes.append(f"{errors} upserts failed: {build['upserts_during']['outcomes']}")
    if ratio is not None and ratio > limit:
        notes.append(f"{ratio / limit:.2f} times the limit")
    if notes:
        entry["note"] = "; ".join(notes)
    return entry


def _build_response(build: dict[str, Any]) -> dict[str, Any]:
    create = build["create"]
    seconds = create["response_s"]
    limit = LIMITS["build_response_s"]
    entry: dict[str, Any] = {
        "measured": seconds,
        "limit": limit,
        "met": create.get("outcome") == "OK" and seconds <= limit,
        "unit": "s",
        "rule": "CreateSegment of a segment matching every contact of A: the response time",
        "status_in_response": create.get("status_in_response"),
        "members": create.get("members"),
        "build_total_s": create.get("build_total_s"),
    }
    if create.get("outcome") != "OK":
        entry["note"] = f"the create failed: {create.get('outcome')}"
    elif seconds > limit:
        entry["note"] = f"{seconds / limit:.2f} times the limit"
    return entry


# --- the table --------------------------------------------------------------------------------


def render(noisy: dict[str, Any] | None) -> str:
    """The phase's figures as a markdown table ("" when it did not run)."""
    if not noisy or "config" not in noisy:
        return "" if not noisy else f"noisy neighbour: failed: {noisy.get('error')}"
    cfg = noisy["config"]
    lines = [
        "| noisy neighbour (B: small project, A: main project) | B GET /segments p95 ms, "
        "unloaded -> loaded (ratio) | B POST /v1/track p95 ms, unloaded -> loaded (ratio) "
        "| B errors | A |",
        "|---|---|---|---|---|",
    ]

    def b_cells(b: dict[str, Any]) -> str:
        cells = []
        for name in ("get_segments", "track"):
            v = b[name]
            cells.append(
                f"{v['unloaded']['ms'].get('p95', '-')} -> {v['ms'].get('p95', '-')} "
                f"(x{v['p95_ratio']})"
            )
        errors = sum(v["errors"] for v in b.values())
        return " | ".join(cells) + f" | {errors}"

    streams = noisy.get("streams", {})
    if "b" in streams:
        a = streams["a_streams"]
        lines.append(
            f"| A holds {cfg['streams']} WatchSegmentEvents streams | {b_cells(streams['b'])} | "
            f"{a['refused']} refused, {a['open_at_end']} open at the end |"
        )
    elif "error" in streams:
        lines.append(f"| A holds streams | failed: {streams['error'][:80]} | | | |")
    counts = noisy.get("counts", {})
    if "b" in counts:
        a = counts["a"]
        create = a["create"]
        lines.append(
            f"| A runs {cfg['counts']} heavy counts + a create of every contact | "
            f"{b_cells(counts['b'])} | {a['completed']} counts done (p50 "
            f"{a['count_ms'].get('median', '-')} ms), {a['refused']} refused, "
            f"{a['other_errors']} other errors; create {create.get('outcome')} in "
            f"{create.get('seconds')} s |"
        )
    elif "error" in counts:
        lines.append(f"| A runs heavy counts | failed: {counts['error'][:80]} | | | |")
    build = noisy.get("build", {})
    if "create" in build:
        before, during = build["upserts_before"], build["upserts_during"]
        create = build["create"]
        lines.append(
            f"| A builds a segment of every contact | - | - | - | UpsertContact p95 "
            f"{before['ms'].get('p95', '-')} ms before, {during['ms'].get('p95', '-')} ms during "
            f"(x{build['p95_ratio']}, {during['ms'].get('n', 0)} upserts, {during['errors']} "
            f"errors); create {create.get('outcome')} answered in {create.get('response_s')} s "
            f"(status {create.get('status_in_response') or 'none'}), built in "
            f"{create.get('build_total_s')} s |"
        )
    elif "error" in build:
        lines.append(f"| A builds a segment of every contact | failed: {build['error'][:80]} |")
    return "\n".join(lines)
