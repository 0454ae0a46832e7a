"""How every RPC runs once the request interceptor (interceptors.py) has admitted it:
authenticate its key, take the project's fair share, do the domain work in one transaction
on a worker thread under the request's budget, and map what is raised.

The event loop never blocks on the database: the work runs on a thread of the unary pool
(streams have their own, fairness.py caps each project's share of both). The interceptor
gives each request its budget (its caller's gRPC deadline, capped by the server's default,
SEGMENTS_REQUEST_TIMEOUT) in its `RequestScope`; here every statement runs with what is left
of it as its `statement_timeout`, the statement in flight is cancelled when it passes or the
caller goes away, and a transaction whose budget ran out is rolled back, never committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Executor
from contextvars import ContextVar
from dataclasses import dataclass, field
from functools import partial
from typing import Any, NoReturn, TypeVar

import grpc
import psycopg
import psycopg.errors
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from segments_service import metrics
from segments_service.auth import Caller, KeyKind, authenticate
from segments_service.errors import DeadlineExceeded, ServiceError
from segments_service.fairness import FairShare
from segments_service.replica import MAY_LAG, Replica, unreachable
from segments_service.status import HTTP_STATUS_HEADER, to_status, translate_db_error

log = logging.getLogger(__name__)

# Set by Envoy's REST route on requests that came in over REST (the per-minute rate limit
# applies to those; internal gRPC callers are bounded by concurrency alone).
REST_HEADER = "x-segments-rest"
TRANSACTION_ATTEMPTS = 4
# SQLSTATEs worth a fresh attempt of the whole transaction.
_RETRYABLE = (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure)
# Time kept back from a budget to answer the caller after a statement is cancelled.
ANSWER_MARGIN = 0.05

R = TypeVar("R")


class Budget:
    """A request's deadline, and the connection whose statement to cancel when it passes."""

    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds
        self._lock = threading.Lock()
        self._connection: psycopg.Connection[Any] | None = None
        self._cancelled = False

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def statement_timeout_ms(self) -> int:
        return max(1, int((self.remaining() - ANSWER_MARGIN) * 1000))

    def check(self) -> None:
        if self._cancelled or self.remaining() <= 0:
            raise self.exceeded()

    @staticmethod
    def exceeded() -> DeadlineExceeded:
        return DeadlineExceeded(
            "the request ran out of time (its deadline or the server's request budget); "
            "nothing was changed"
        )

    @contextlib.contextmanager
    def attached(self, session: Session) -> Iterator[None]:
        """While inside, `cancel` interrupts the statement `session` is running."""
        dbapi = session.connection().connection.dbapi_connection
        assert isinstance(dbapi, psycopg.Connection)
        with self._lock:
            self._connection = dbapi
        try:
            yield
        finally:
            with self._lock:
                self._connection = None

    def cancel(self) -> None:
        """Mark the budget spent and cancel the statement in flight, if any (blocking)."""
        with self._lock:
            self._cancelled = True
            if self._connection is None:
                return
            try:
                self._connection.cancel_safe(timeout=2.0)
            except Exception as exc:  # the statement still ends by its statement_timeout
                log.warning("could not cancel a statement: %s", exc)


@dataclass(frozen=True)
class RequestScope:
    """What the request interceptor (interceptors.py) settled before the handler ran: the
    invocation metadata, read once, the key kind the method needs, and the request's time."""

    method: str  # the full name, /package.Service/Method
    kind: KeyKind
    # The bearer key as sent: well formed, looked up only in the transaction; kept out of
    # the scope's repr, and so out of logs.
    key: str = field(repr=False)
    request_id: str
    rest: bool  # came through Envoy's REST route: the project's per-minute rate applies
    budget: Budget  # the request's: its caller's deadline, capped by the server's default
    # A stream lasts as long as its caller's deadline; each of its database steps has this
    # long, afresh (the server's default).
    step_seconds: float

    def authenticate(self, session: Session) -> Caller:
        """The key looked up now, in `session`'s transaction: live and of the method's kind
        (a key revoked a moment ago is refused)."""
        return authenticate(session, self.key, self.kind)

    def step_budget(self) -> Budget:
        """The budget of one database step of a stream."""
        return Budget(self.step_seconds)


# Set by the interceptor around each handler of our services; read on the event loop (a
# worker thread runs in a copy of the context, but what the work needs of the scope is
# passed explicitly).
SCOPE: ContextVar[RequestScope] = ContextVar("segments_request_scope")


def current_scope() -> RequestScope:
    """The scope of the RPC being handled."""
    try:
        return SCOPE.get()
    except LookupError:
        raise RuntimeError(
            "no request scope: the method is not in interceptors.KEY_KINDS, or the server "
            "was built without the request interceptor"
        ) from None


def set_statement_timeout(session: Session, milliseconds: int) -> None:
    session.execute(
        text("SELECT set_config('statement_timeout', :ms, true)"), {"ms": str(milliseconds)}
    )


def in_transaction(
    sessions: sessionmaker[Session], work: Callable[[Session], R], budget: Budget | None = None
) -> R:
    """Run `work` in one transaction, again from scratch after a deadlock or serialization
    failure, so such conflicts between concurrent requests never reach the caller. With a
    budget: each statement's timeout is what is left of it, and a transaction that outlives
    it is rolled back."""
    for attempt in range(1, TRANSACTION_ATTEMPTS + 1):
        try:
            with sessions.begin() as session:
                if budget is None:
                    return work(session)
                budget.check()
                with budget.attached(session):
                    set_statement_timeout(session, budget.statement_timeout_ms())
                    result = work(session)
                budget.check()  # raising here rolls the transaction back
                return result
        except DBAPIError as exc:
            if budget is not None and isinstance(exc.orig, psycopg.errors.QueryCanceled):
                # Its statement_timeout or its cancel: the budget is spent.
                raise budget.exceeded() from exc
            if attempt < TRANSACTION_ATTEMPTS and isinstance(exc.orig, _RETRYABLE):
                log.info("retrying transaction after %s", type(exc.orig).__name__)
                continue
            raise
    raise AssertionError("unreachable")  # pragma: no cover


def mapped(exc: BaseException, request_id: str) -> ServiceError:
    """What a caller is told of an exception raised by an RPC's work."""
    if isinstance(exc, ServiceError):
        return exc
    if isinstance(exc, DBAPIError):
        error = translate_db_error(exc)
        if type(error) is ServiceError:
            log.error("database error (request %s)", request_id, exc_info=exc)
        else:
            log.warning("database error mapped to %s: %s", error.code, exc.orig)
        return error
    log.error("unexpected error (request %s)", request_id, exc_info=exc)
    return ServiceError("internal error")


async def abort(
    context: grpc.aio.ServicerContext[Any, Any], err: ServiceError, request_id: str
) -> NoReturn:
    await context.abort_with_status(to_status(err, request_id))
    raise AssertionError("abort_with_status returned")  # pragma: no cover


def _discard_outcome(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


class Runner:
    """Runs the RPCs of one server: its pools and its fair share. Each RPC's key kind and
    budget come from its RequestScope (the interceptor's), never from the servicer."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        stream_sessions: sessionmaker[Session],
        unary_pool: Executor,
        stream_pool: Executor,
        fair: FairShare,
        replica: Replica | None = None,
    ) -> None:
        self.sessions = sessions
        # Streams hold a connection for as long as they read (an export's snapshot): from a
        # pool of their own, so they never take the connections unary requests need.
        self.stream_sessions = stream_sessions
        self.unary_pool = unary_pool
        self.stream_pool = stream_pool
        self.fair = fair
        # The standby serving the reads that may lag (replica.py), if one is configured.
        self.replica = replica

    def standby_sessions(
        self, scope: RequestScope, stream: bool = False
    ) -> sessionmaker[Session] | None:
        """The standby's sessions (its stream pool's for a stream) when the RPC's reads may
        lag and the standby may serve now; None: the primary's. The one place that chooses."""
        if self.replica is None or scope.method not in MAY_LAG:
            return None
        verdict = self.replica.verdict()
        if not verdict.standby:
            metrics.REPLICA_READS.labels("primary", verdict.reason).inc()
            return None
        return self.replica.stream_sessions if stream else self.replica.sessions

    def _standby_failed(self, exc: BaseException) -> None:
        assert self.replica is not None
        self.replica.failed(exc)
        metrics.REPLICA_READS.labels("primary", "failed").inc()

    def on_standby(
        self,
        scope: RequestScope,
        standby: sessionmaker[Session],
        work: Callable[[Session, Caller], R],
        budget: Budget,
    ) -> R:
        """`work` in one transaction of the standby, for a caller authenticated on the
        primary; on the primary instead when the standby cannot be reached."""
        caller = in_transaction(self.sessions, partial(self.authenticated, scope), budget)

        def read(session: Session) -> R:
            return work(session, caller)

        served = True  # by the standby, whatever it answered (a segment not found too)
        try:
            return in_transaction(standby, read, budget)
        except DBAPIError as exc:
            if not unreachable(exc):
                raise
            served = False
            self._standby_failed(exc)
        finally:
            if served:
                metrics.REPLICA_READS.labels("replica", "fresh").inc()
        return in_transaction(self.sessions, read, budget)

    def snapshot(
        self, scope: RequestScope, begin: Callable[[Session], None]
    ) -> tuple[Session, Caller]:
        """A stream's session whose transaction `begin` opened (an export's snapshot), and
        its caller: on the standby when the RPC may lag and the standby serves (the key
        looked up on the primary), else on the primary (the key looked up in the snapshot).
        The caller closes the session."""
        standby = self.standby_sessions(scope, stream=True)
        if standby is not None:
            caller = in_transaction(self.stream_sessions, partial(self.authenticated, scope))
            session = standby()
            try:
                begin(session)
            except DBAPIError as exc:
                session.close()
                if not unreachable(exc):
                    raise
                self._standby_failed(exc)
            except BaseException:
                session.close()
                raise
            else:
                metrics.REPLICA_READS.labels("replica", "fresh").inc()
                return session, caller
        session = self.stream_sessions()
        try:
            begin(session)
            return session, self.authenticated(scope, session)
        except BaseException:
            session.close()
            raise

    def authenticated(self, scope: RequestScope, session: Session) -> Caller:
        """The request's key looked up in `session`'s transaction; a request that came in
        over REST also takes one of its project's per-minute tokens."""
        caller = scope.authenticate(session)
        if scope.rest:
            self.fair.rate.take(caller.project_id)
        return caller

    def still_valid(self, scope: RequestScope) -> None:
        """Raise InvalidApiKey if a stream's key was revoked since it opened."""
        in_transaction(self.stream_sessions, scope.authenticate)

    async def unary(
        self,
        context: grpc.aio.ServicerContext[Any, Any],
        work: Callable[[Session, Caller], tuple[R, int | None]],
        *,
        evaluates: bool = False,
    ) -> R:
        """Authenticate, run `work` in one transaction within the budget and the project's
        share, and map errors; `work` answers (response, HTTP status for REST or None).
        `evaluates`: the work evaluates a condition over all of the project's contacts, and
        waits for the project's turn to (fairness.Limits.evaluations)."""
        scope = current_scope()
        budget = scope.budget

        def shared(session: Session, caller: Caller) -> tuple[R, int | None]:
            with contextlib.ExitStack() as shares:
                shares.enter_context(self.fair.unary.hold(caller.project_id))
                if evaluates:
                    shares.enter_context(
                        self.fair.evaluations.hold(caller.project_id, budget.remaining())
                    )
                return work(session, caller)

        def run(session: Session) -> tuple[R, int | None]:
            return shared(session, self.authenticated(scope, session))

        standby = self.standby_sessions(scope)

        def blocking() -> tuple[R, int | None]:
            if standby is not None:
                return self.on_standby(scope, standby, shared, budget)
            return in_transaction(self.sessions, run, budget)

        response, http_status = await self.call(context, scope, blocking, budget)
        if http_status is not None:
            await context.send_initial_metadata(((HTTP_STATUS_HEADER, str(http_status)),))
        return response

    async def call(
        self,
        context: grpc.aio.ServicerContext[Any, Any],
        scope: RequestScope,
        blocking: Callable[[], R],
        budget: Budget,
        pool: Executor | None = None,
    ) -> R:
        """`blocking()` on a worker thread; cancelled when the budget passes or the caller
        goes away; errors abort the RPC with their mapped status."""
        loop = asyncio.get_running_loop()
        # In a copy of the request's context: the thread's log lines carry its request id,
        # and the entries and exits it writes are measured from its arrival.
        future = loop.run_in_executor(
            pool or self.unary_pool, contextvars.copy_context().run, blocking
        )
        try:
            done, _ = await asyncio.wait({future}, timeout=max(0.0, budget.remaining()))
            if not done:
                await loop.run_in_executor(None, budget.cancel)
            result = await future
        except asyncio.CancelledError:
            # The caller went away: stop its statement; the transaction rolls back. What the
            # work then raises has no one to go to.
            future.add_done_callback(_discard_outcome)
            threading.Thread(target=budget.cancel, name="cancel", daemon=True).start()
            raise
        except Exception as exc:
            await abort(context, mapped(exc, scope.request_id), scope.request_id)
        return result

    async def blocking(self, context: grpc.aio.ServicerContext[Any, Any], fn: Callable[[], R]) -> R:
        """`fn()` on the stream pool within one step's budget, its errors mapped: a stream's
        own database work."""
        scope = current_scope()
        return await self.call(context, scope, fn, scope.step_budget(), self.stream_pool)
