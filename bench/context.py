"""What every phase is given: the dataset and the bench's connections (Env), the server and
Envoy being measured (Stack), and the calls they all make."""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from google.protobuf import json_format
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session, sessionmaker

from bench import load
from bench.measure import timed
from bench.stack import Envoy, Rest, Sampler, Server, status_engine
from segments_api.v1 import resources_pb2, segments_pb2
from segments_service import auth


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def size_label(n: int) -> str:
    if n % 1_000_000 == 0:
        return f"{n // 1_000_000}m"
    if n % 1_000 == 0:
        return f"{n // 1_000}k"
    return str(n)


@dataclass
class Env:
    args: argparse.Namespace
    url: str
    engine: Engine
    sessions: sessionmaker[Session]
    dataset: load.Dataset
    keys: dict[str, str] = field(default_factory=dict)


@dataclass
class Stack:
    server: Server
    envoy: Envoy
    sampler: Sampler

    def rest(self, key: str) -> Rest:
        return Rest(self.envoy.http_port, key)


def issue_keys(env: Env) -> None:
    with env.sessions.begin() as session:
        for project in env.dataset.projects:
            env.keys[project.tag] = auth.issue_key(session, uuid.UUID(project.id), "secret")


def md(key: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {key}"),)


def condition_proto(condition: dict[str, Any]) -> resources_pb2.FilterCondition:
    return json_format.ParseDict(condition, resources_pb2.FilterCondition())


def db_now(engine: Engine) -> datetime:
    with engine.connect() as conn:
        now: datetime = conn.execute(text("SELECT clock_timestamp()")).scalar_one()
    return now


def create_segment(
    stack: Stack, key: str, name: str, condition: dict[str, Any], *, track: bool = False
) -> tuple[float, Any]:
    """Create a segment and wait until its membership is stored: the milliseconds from the
    request to READY (a large project's segment is built in the background), and the READY
    segment."""
    request = segments_pb2.CreateSegmentRequest(
        name=name, condition=condition_proto(condition), track_membership=track
    )
    return timed(lambda: until_ready(stack.server, key, request))


BUILD_POLL_SECONDS = 0.05
BUILD_TIMEOUT_SECONDS = 900


def until_ready(server: Server, key: str, request: segments_pb2.CreateSegmentRequest) -> Any:
    """Create, then wait for READY reading the status column (a GetSegment of a BUILDING
    segment counts it live, which would compete with the build it waits for)."""
    segment = server.segments.CreateSegment(request, metadata=md(key), timeout=60)
    if segment.status != resources_pb2.Segment.BUILDING:
        return segment
    deadline = time.monotonic() + BUILD_TIMEOUT_SECONDS
    engine = status_engine(server.database_url)
    while True:
        with engine.connect() as conn:
            status = conn.execute(
                text("SELECT status FROM segments WHERE id = :id"), {"id": segment.id}
            ).scalar_one()
        if status != "BUILDING":
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"{segment.name!r} still BUILDING after {BUILD_TIMEOUT_SECONDS} s")
        time.sleep(BUILD_POLL_SECONDS)
    segment = server.segments.GetSegment(
        segments_pb2.GetSegmentRequest(id=segment.id), metadata=md(key), timeout=60
    )
    if segment.status != resources_pb2.Segment.READY:
        raise RuntimeError(f"{segment.name!r} failed to build: {segment.status_reason}")
    return segment
