"""Fair share between projects in one server: in-flight requests, open streams, a
per-minute rate and whole-project condition evaluations, each counted per project, so
that one project's load cannot take the capacity another project needs.

The counters are per process: with several servers behind Envoy each enforces them
for itself (README, "Limits")."""

from __future__ import annotations

import contextlib
import math
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from segments_service.errors import DeadlineExceeded, RateLimited

# Token buckets kept at most (least recently used dropped: a dropped bucket starts full).
MAX_BUCKETS = 100_000
# The delay suggested to a caller refused for concurrency: about one request's time.
BUSY_RETRY_SECONDS = 1.0


@dataclass(frozen=True)
class Limits:
    """Per project, in one server; 0 turns a limit off."""

    concurrency: int = 8
    streams: int = 16
    per_minute: int = 0
    # Of its requests, how many may evaluate a condition over all of the project's
    # contacts at once (the rest queue): such a statement keeps a core or more busy (with
    # parallel workers), and on a small machine one is all a project can take while other
    # projects are still served.
    evaluations: int = 1


class _Counter:
    """How many of something each project holds, with a ceiling (0: none), and how many
    were ever taken."""

    def __init__(self, ceiling: int, what: str) -> None:
        self.ceiling = ceiling
        self.what = what
        self.held: dict[uuid.UUID, int] = {}
        self.taken = 0
        self.lock = threading.Lock()

    @contextlib.contextmanager
    def hold(self, project_id: uuid.UUID) -> Iterator[None]:
        with self.lock:
            now = self.held.get(project_id, 0)
            if 0 < self.ceiling <= now:
                raise RateLimited(
                    f"this project already has {now} {self.what} in flight (at most "
                    f"{self.ceiling}); retry shortly",
                    BUSY_RETRY_SECONDS,
                )
            self.held[project_id] = now + 1
            self.taken += 1
        try:
            yield
        finally:
            with self.lock:
                left = self.held[project_id] - 1
                if left:
                    self.held[project_id] = left
                else:
                    del self.held[project_id]

    def count(self, project_id: uuid.UUID) -> int:
        with self.lock:
            return self.held.get(project_id, 0)

    def activity(self) -> tuple[int, int]:
        """How many were ever taken, and how many are held now, over all projects."""
        with self.lock:
            return self.taken, sum(self.held.values())


class _Buckets:
    """A token bucket per project: `per_minute` tokens, refilled evenly."""

    def __init__(self, per_minute: int, clock: Callable[[], float]) -> None:
        self.per_minute = per_minute
        self.clock = clock
        self.buckets: OrderedDict[uuid.UUID, tuple[float, float]] = OrderedDict()
        self.lock = threading.Lock()

    def take(self, project_id: uuid.UUID) -> None:
        if self.per_minute <= 0:
            return
        rate = self.per_minute / 60.0
        with self.lock:
            now = self.clock()
            tokens, at = self.buckets.pop(project_id, (float(self.per_minute), now))
            tokens = min(float(self.per_minute), tokens + (now - at) * rate)
            if tokens < 1.0:
                self.buckets[project_id] = (tokens, now)
                wait = math.ceil((1.0 - tokens) / rate)
                raise RateLimited(
                    f"this project is over its limit of {self.per_minute} requests a minute; "
                    f"retry in {wait} s",
                    float(wait),
                )
            self.buckets[project_id] = (tokens - 1.0, now)
            while len(self.buckets) > MAX_BUCKETS:
                self.buckets.popitem(last=False)


class FairShare:
    """The limits of one server, shared by all its RPCs."""

    def __init__(self, limits: Limits, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self.unary = _Counter(limits.concurrency, "requests")
        self.streams = _Counter(limits.streams, "streams")
        self.rate = _Buckets(limits.per_minute, clock)
        self.evaluations = _Queue(limits.evaluations)

    def activity(self) -> tuple[int, int]:
        """(requests ever started, requests in flight): background work compares two
        readings to tell whether requests were served meanwhile."""
        return self.unary.activity()


class _Queue:
    """At most `ceiling` of something running per project; more wait their turn (within
    their own budget) instead of being refused."""

    def __init__(self, ceiling: int) -> None:
        self.ceiling = ceiling
        self.running: dict[uuid.UUID, int] = {}
        self.turn = threading.Condition()

    @contextlib.contextmanager
    def hold(self, project_id: uuid.UUID, timeout: float) -> Iterator[None]:
        if self.ceiling <= 0:
            yield
            return
        with self.turn:
            if not self.turn.wait_for(
                lambda: self.running.get(project_id, 0) < self.ceiling, timeout
            ):
                raise DeadlineExceeded(
                    "the request ran out of time waiting for this project's earlier "
                    "condition evaluations; nothing was changed"
                )
            self.running[project_id] = self.running.get(project_id, 0) + 1
        try:
            yield
        finally:
            with self.turn:
                left = self.running[project_id] - 1
                if left:
                    self.running[project_id] = left
                else:
                    del self.running[project_id]
                self.turn.notify_all()
