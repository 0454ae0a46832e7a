"""The grpcio server: servicers, health and reflection, and a graceful drain on SIGTERM."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from segments.v1 import (
    contacts_pb2,
    contacts_pb2_grpc,
    events_pb2,
    events_pb2_grpc,
    segments_pb2,
    segments_pb2_grpc,
)
from segments_service.builds import Builder, BuildSettings
from segments_service.config import Settings
from segments_service.database import make_engine, make_sessionmaker
from segments_service.errors import ValidationError
from segments_service.servicers import (
    STREAMS_STOPPING,
    ContactServicer,
    EventServicer,
    SegmentServicer,
)
from segments_service.status import abort, request_id_of
from segments_service.sweeper import Sweeper

log = logging.getLogger(__name__)

SERVICE_NAMES = (
    segments_pb2.DESCRIPTOR.services_by_name["SegmentService"].full_name,
    contacts_pb2.DESCRIPTOR.services_by_name["ContactService"].full_name,
    events_pb2.DESCRIPTOR.services_by_name["EventService"].full_name,
)
# Envoy limits REST bodies to 1 MiB of JSON, which can transcode to more protobuf bytes
# (numbers as doubles); 8 MiB leaves room for that and for direct gRPC callers.
MAX_MESSAGE_BYTES = 8 * 1024 * 1024
# How soon the main thread notices a signal another thread received.
SIGNAL_POLL_SECONDS = 0.2


@dataclass
class Running:
    """A started server and what must be stopped with it."""

    server: grpc.Server
    port: int
    health: health.HealthServicer
    engine: Engine
    sweeper: Sweeper | None
    builder: Builder | None = None

    def stop(self, grace: float) -> None:
        """Refuse new RPCs (health NOT_SERVING first, so Envoy stops routing here), end
        resumable streams, let in-flight unary RPCs finish within `grace` seconds, then
        release the database."""
        self.health.enter_graceful_shutdown()
        STREAMS_STOPPING.set()
        if self.sweeper is not None:
            self.sweeper.stop()
        if self.builder is not None:
            self.builder.stop()
        self.server.stop(grace).wait()
        if self.sweeper is not None:
            self.sweeper.join(timeout=grace)
        if self.builder is not None:
            self.builder.join(timeout=grace)
        self.engine.dispose()


@dataclass(frozen=True)
class _Undecodable:
    """A request protobuf could not parse (e.g. nested past its recursion limit)."""

    reason: str


def _safe_deserializer(deserialize: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as exc:
            return _Undecodable(str(exc) or type(exc).__name__)

    return parse


def _guard(behavior: Callable[[Any, grpc.ServicerContext], Any]) -> Any:
    def call(request: Any, context: grpc.ServicerContext) -> Any:
        if isinstance(request, _Undecodable):
            err = ValidationError.single(
                "",
                "the request could not be decoded (messages may nest at most about 100 "
                f"levels deep): {request.reason}",
                "undecodable",
            )
            abort(context, err, request_id_of(context))
        return behavior(request, context)

    return call


class _GuardedRegistration:
    """Stands in for the server when the generated add_*_to_server functions register
    handlers: grpcio answers INTERNAL when a request fails to decode, before any of our
    code runs; here such a request reaches the error mapping as INVALID_ARGUMENT."""

    def __init__(self, server: grpc.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, _handlers: Any) -> None:
        """Replaced by add_registered_method_handlers, which carries the same handlers."""

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        wrapped = {}
        for name, handler in handlers.items():
            changes: dict[str, Any] = {
                "request_deserializer": _safe_deserializer(handler.request_deserializer)
            }
            for kind in ("unary_unary", "unary_stream"):
                if getattr(handler, kind) is not None:
                    changes[kind] = _guard(getattr(handler, kind))
            wrapped[name] = handler._replace(**changes)
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(service, wrapped),)
        )
        self._server.add_registered_method_handlers(service, wrapped)


def create_server(
    address: str,
    sessions: sessionmaker[Session],
    *,
    workers: int = 16,
) -> tuple[grpc.Server, int, health.HealthServicer]:
    """A server bound to `address` (port 0 picks a free one), not yet started."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rpc"),
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 0),
        ],
    )
    guarded: Any = _GuardedRegistration(server)  # stands in for grpc.Server
    segments_pb2_grpc.add_SegmentServiceServicer_to_server(SegmentServicer(sessions), guarded)
    contacts_pb2_grpc.add_ContactServiceServicer_to_server(ContactServicer(sessions), guarded)
    events_pb2_grpc.add_EventServiceServicer_to_server(EventServicer(sessions), guarded)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", *SERVICE_NAMES):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
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
    return server, port, health_servicer


def start(database_url: str, address: str, settings: Settings) -> Running:
    port_hint = address.rsplit(":", 1)[-1]
    engine = make_engine(
        database_url, pool_size=settings.db_pool_size, application_name=f"segments:{port_hint}"
    )
    server, port, health_servicer = create_server(
        address, make_sessionmaker(engine), workers=settings.workers
    )
    server.start()
    sweeper = None
    if settings.sweep_seconds > 0:
        sweeper = Sweeper(engine, make_sessionmaker(engine), settings.sweep_seconds)
        sweeper.start()
    builder = Builder(
        make_sessionmaker(engine),
        BuildSettings(
            settings.inline_build_contacts, settings.build_slice, settings.background_timeout
        ),
    )
    builder.start()
    return Running(server, port, health_servicer, engine, sweeper, builder)


def serve(database_url: str, settings: Settings, port: int) -> None:
    """Run one server until SIGTERM or SIGINT, then drain."""
    running = start(database_url, f"{settings.host}:{port}", settings)
    log.info("gRPC server listening on %s:%d", settings.host, running.port)
    stopping = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("signal %d: draining in-flight RPCs (up to %.0fs)", signum, settings.drain_seconds)
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    # In slices: Python runs signal handlers in the main thread only, when it runs Python
    # code. A signal the kernel hands to another thread (gRPC's, a worker's) leaves a main
    # thread blocked in an untimed wait asleep, and the server would never drain.
    while not stopping.wait(SIGNAL_POLL_SECONDS):
        pass
    running.stop(settings.drain_seconds)
    log.info("gRPC server stopped")
