"""The gRPC server (grpc.aio): servicers, health and reflection, and a graceful drain on SIGTERM.

RPCs run on an event loop; their database work runs on bounded thread pools (rpc.py), so
open streams cost no thread and one project's requests cannot take every worker
(fairness.py). `create_server` builds a server on the running loop; `ServerThread` runs one
on a loop of its own (tests, benchmarks); `serve` runs one in the foreground until a signal.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import threading
from concurrent import futures
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from segments_api.v1 import (
    contacts_pb2,
    contacts_pb2_grpc,
    events_pb2,
    events_pb2_grpc,
    segments_pb2,
    segments_pb2_grpc,
    webhooks_pb2,
    webhooks_pb2_grpc,
)
from segments_service import metrics
from segments_service.builds import Builder, BuildSettings
from segments_service.config import Settings, host_port
from segments_service.database import make_engine, make_sessionmaker
from segments_service.fairness import FairShare, Limits
from segments_service.interceptors import RequestInterceptor
from segments_service.replica import Replica
from segments_service.rest_check import add_to_server as add_rest_check
from segments_service.rest_stream_end import add_to_server as add_rest_stream_end
from segments_service.rpc import Runner
from segments_service.servicers import (
    ContactServicer,
    EventServicer,
    SegmentServicer,
    WebhookServicer,
)
from segments_service.streams import FeedWatch
from segments_service.sweeper import Sweeper
from segments_service.webhooks import WebhookWorker

log = logging.getLogger(__name__)

SERVICE_NAMES = (
    segments_pb2.DESCRIPTOR.services_by_name["SegmentService"].full_name,
    contacts_pb2.DESCRIPTOR.services_by_name["ContactService"].full_name,
    events_pb2.DESCRIPTOR.services_by_name["EventService"].full_name,
    webhooks_pb2.DESCRIPTOR.services_by_name["WebhookService"].full_name,
)
# Envoy limits REST bodies to 1 MiB of JSON, which can transcode to more protobuf bytes
# (numbers as doubles); 8 MiB leaves room for that and for direct gRPC callers.
MAX_MESSAGE_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True)
class Options:
    """How much of the machine one server uses, and how it is shared between projects."""

    workers: int = 16  # threads for unary requests' database work
    stream_workers: int = 8  # threads for streams' database work (short reads)
    limits: Limits = field(default_factory=Limits)
    request_timeout: float = 30.0  # a request's budget when its caller sets no deadline
    # Webhook URLs may name loopback and private address literals (SEGMENTS_WEBHOOK_ALLOW_PRIVATE).
    allow_private_webhooks: bool = False

    @classmethod
    def from_settings(cls, settings: Settings) -> Options:
        return cls(
            workers=settings.workers,
            limits=Limits(
                concurrency=settings.project_concurrency,
                streams=settings.project_streams,
                evaluations=settings.project_evaluations,
                per_minute=settings.rate_limit_per_minute,
            ),
            request_timeout=settings.request_timeout,
            allow_private_webhooks=settings.webhooks.allow_private,
        )


@dataclass
class Built:
    """A started server on the running loop and what must be stopped with it."""

    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    watch: FeedWatch
    stopping: asyncio.Event
    pools: tuple[futures.ThreadPoolExecutor, ...]
    fair: FairShare

    async def stop(self, grace: float) -> None:
        """Refuse new RPCs (health NOT_SERVING first, so Envoy stops routing here), end
        resumable streams, let in-flight unary RPCs finish within `grace` seconds."""
        await self.health.enter_graceful_shutdown()
        self.stopping.set()
        await self.server.stop(grace)
        await self.watch.stop()
        for pool in self.pools:
            pool.shutdown(wait=False, cancel_futures=True)


async def create_server(
    address: str,
    sessions: sessionmaker[Session],
    options: Options = Options(),
    stream_sessions: sessionmaker[Session] | None = None,
    replica: Replica | None = None,
) -> Built:
    """A started server bound to `address` (port 0 picks a free one), on the running loop;
    with a `replica`, the reads that may lag go to its standby while it serves (replica.py)."""
    server = grpc.aio.server(
        interceptors=[RequestInterceptor(options.request_timeout)],
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 0),
        ],
    )
    unary_pool = futures.ThreadPoolExecutor(options.workers, thread_name_prefix="rpc")
    stream_pool = futures.ThreadPoolExecutor(options.stream_workers, thread_name_prefix="stream")
    # Envoy's checks of REST bodies of 64 KiB and more (rest_check): parsing, no database.
    check_pool = futures.ThreadPoolExecutor(2, thread_name_prefix="rest-check")
    fair = FairShare(options.limits)
    runner = Runner(
        sessions,
        stream_sessions or sessions,
        unary_pool,
        stream_pool,
        fair,
        replica,
    )
    loop = asyncio.get_running_loop()
    watch = FeedWatch(
        stream_sessions or sessions, lambda fn, *a: loop.run_in_executor(stream_pool, fn, *a)
    )
    stopping = asyncio.Event()
    segments_pb2_grpc.add_SegmentServiceServicer_to_server(
        SegmentServicer(runner, watch, stopping), server
    )
    contacts_pb2_grpc.add_ContactServiceServicer_to_server(ContactServicer(runner), server)
    events_pb2_grpc.add_EventServiceServicer_to_server(EventServicer(runner), server)
    webhooks_pb2_grpc.add_WebhookServiceServicer_to_server(
        WebhookServicer(runner, options.allow_private_webhooks), server
    )
    # Envoy's check of REST requests before transcoding; keyless (the RPC then authenticates).
    add_rest_check(server, SERVICE_NAMES, check_pool)
    # Envoy's question at the end of a streamed REST response: did it end well?
    add_rest_stream_end(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", *SERVICE_NAMES):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        (
            *SERVICE_NAMES,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    port = server.add_insecure_port(address)
    if port == 0:
        raise RuntimeError(f"could not bind {address}")
    await server.start()
    watch.start()
    return Built(
        server, port, health_servicer, watch, stopping, (unary_pool, stream_pool, check_pool), fair
    )


class ServerThread:
    """A server on an event loop of its own thread, driven from synchronous code."""

    def __init__(
        self,
        address: str,
        sessions: sessionmaker[Session],
        options: Options = Options(),
        stream_sessions: sessionmaker[Session] | None = None,
        replica: Replica | None = None,
    ) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="grpc-aio", daemon=True)
        self.thread.start()
        self.built = asyncio.run_coroutine_threadsafe(
            create_server(address, sessions, options, stream_sessions, replica), self.loop
        ).result(30)
        self.port = self.built.port

    def stop(self, grace: float = 1.0) -> None:
        asyncio.run_coroutine_threadsafe(self.built.stop(grace), self.loop).result(grace + 30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def _replica(
    database_url: str, settings: Settings, port: int
) -> tuple[Replica | None, tuple[Engine, ...]]:
    """The standby of DATABASE_REPLICA_URL, measuring its lag, and its engines (pools sized
    as the primary's: it takes the reads that may lag off the primary)."""
    if settings.replica_url is None:
        return None, ()
    engine = make_engine(
        settings.replica_url,
        pool_size=settings.db_pool_size,
        application_name=f"segments:{port}:replica",
        connect_timeout=2,
    )
    stream_engine = make_engine(
        settings.replica_url,
        pool_size=2,
        max_overflow=2 * settings.project_streams,
        application_name=f"segments:{port}:replica-streams",
        connect_timeout=2,
    )
    metrics.PoolWatch(engine, "replica")
    metrics.PoolWatch(stream_engine, "replica-streams")
    replica = Replica(
        database_url,
        settings.replica_url,
        make_sessionmaker(engine),
        make_sessionmaker(stream_engine),
        settings.replica_max_lag,
    ).start()
    log.info(
        "reads that may lag go to DATABASE_REPLICA_URL while at most %.1f s behind",
        settings.replica_max_lag,
    )
    return replica, (engine, stream_engine)


def serve(database_url: str, settings: Settings, port: int) -> None:
    """Run one server until SIGTERM or SIGINT, then drain."""
    asyncio.run(_serve(database_url, settings, port))


async def _serve(database_url: str, settings: Settings, port: int) -> None:
    options = Options.from_settings(settings)
    engine = make_engine(
        database_url, pool_size=settings.db_pool_size, application_name=f"segments:{port}"
    )
    # Streams' connections: a few kept, more opened while many streams read at once.
    stream_engine = make_engine(
        database_url,
        pool_size=2,
        max_overflow=2 * settings.project_streams,
        application_name=f"segments:{port}:streams",
    )
    metrics.PoolWatch(engine, "requests")
    metrics.PoolWatch(stream_engine, "streams")
    replica, replica_engines = _replica(database_url, settings, port)
    built = await create_server(
        host_port(settings.host, port),
        make_sessionmaker(engine),
        options,
        make_sessionmaker(stream_engine),
        replica,
    )
    log.info("gRPC server listening on %s", host_port(settings.host, built.port))
    sweeper = None
    if settings.sweep_seconds > 0:
        sweeper = Sweeper(
            engine, make_sessionmaker(engine), settings.sweep_seconds, settings.background_timeout
        )
        sweeper.start()
    builder = Builder(
        make_sessionmaker(engine),
        BuildSettings(
            settings.inline_build_contacts, settings.build_slice, settings.background_timeout
        ),
        foreground=built.fair.activity,
    )
    builder.start()
    # Deliveries: a lock connection and a working one per delivery thread, one to dispatch.
    webhook_engine = make_engine(
        database_url,
        pool_size=2 * settings.webhooks.workers + 1,
        max_overflow=2,
        application_name=f"segments:{port}:webhooks",
    )
    metrics.PoolWatch(webhook_engine, "webhooks")
    deliveries = WebhookWorker(
        webhook_engine,
        make_sessionmaker(webhook_engine),
        settings.webhooks,
        settings.background_timeout,
    )
    deliveries.start()
    # What startup made (modules, descriptors, pools) lives as long as the process: frozen,
    # the collector's full passes no longer walk it, the loop and every thread waiting on
    # them (a full pass over the service's modules alone, 84k objects, takes 29 ms here).
    gc.freeze()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    await stopping.wait()
    log.info("draining in-flight RPCs (up to %.0fs)", settings.drain_seconds)
    if sweeper is not None:
        sweeper.stop()
    builder.stop()
    deliveries.stop()
    await built.stop(settings.drain_seconds)
    for worker in (sweeper, builder, deliveries):
        if worker is not None:
            await loop.run_in_executor(None, worker.join, settings.drain_seconds)
    if replica is not None:
        replica.stop()
    for each in (engine, stream_engine, webhook_engine, *replica_engines):
        each.dispose()
    log.info("gRPC server stopped")
