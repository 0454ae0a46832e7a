"""The one place errors become gRPC statuses: google.rpc details plus the REST error envelope.

Every RPC runs through `run_unary`: authenticate, call the domain in one transaction
(retried on deadlock or serialization failure), and map whatever is raised.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any, NoReturn, TypeVar

import grpc
import psycopg.errors
from google.protobuf import any_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from segments_service.auth import Caller, KeyKind, authenticate
from segments_service.errors import (
    AlreadyExists,
    FailedPrecondition,
    FieldViolation,
    InvalidApiKey,
    MissingAuth,
    NotFound,
    SegmentBuilding,
    SegmentInUse,
    ServiceError,
    Unavailable,
    ValidationError,
)

log = logging.getLogger(__name__)

DOMAIN = "segments.v1"
# Internal metadata read by Envoy's response filter; never shown to HTTP clients.
HTTP_STATUS_HEADER = "x-http-status"
ENVELOPE_HEADER = "x-error-envelope"
MAX_ENVELOPE_VIOLATIONS = 50
# Errors travel as trailing metadata, i.e. HTTP/2 headers, three times over (grpc-message,
# grpc-status-details-bin, the envelope): gRPC clients refuse more than 8 KiB of metadata
# by default and Envoy more than 60 KiB. Messages quote request values (an id, an email,
# a data key), so texts are clipped and violations dropped beyond these budgets, counted
# in JSON-escaped bytes.
MAX_MESSAGE_BYTES = 500
MAX_FIELD_BYTES = 400  # a dot path 10 conditions deep is about 250
MAX_VIOLATION_TEXT_BYTES = 200
MAX_VIOLATIONS_BYTES = 2000
ELLIPSIS = "\u2026"
TRANSACTION_ATTEMPTS = 4

_GRPC_CODES: list[tuple[type[ServiceError], grpc.StatusCode]] = [
    (ValidationError, grpc.StatusCode.INVALID_ARGUMENT),
    (MissingAuth, grpc.StatusCode.UNAUTHENTICATED),
    (InvalidApiKey, grpc.StatusCode.UNAUTHENTICATED),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (SegmentInUse, grpc.StatusCode.FAILED_PRECONDITION),
    (FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (SegmentBuilding, grpc.StatusCode.UNAVAILABLE),
    (Unavailable, grpc.StatusCode.UNAVAILABLE),
]

# SQLSTATEs worth a fresh attempt of the whole transaction.
_RETRYABLE = (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure)


def grpc_code(err: ServiceError) -> grpc.StatusCode:
    for cls, code in _GRPC_CODES:
        if isinstance(err, cls):
            return code
    return grpc.StatusCode.INTERNAL


def request_id_of(context: grpc.ServicerContext) -> str:
    for key, value in context.invocation_metadata():
        if key == "x-request-id" and isinstance(value, str) and value:
            return value[:128]
    return str(uuid.uuid4())


def metadata_value(context: grpc.ServicerContext, name: str) -> str | None:
    for key, value in context.invocation_metadata():
        if key == name and isinstance(value, str):
            return value
    return None


def _escaped_size(text: str) -> int:
    return len(json.dumps(text, ensure_ascii=True)) - 2


def clip(text: str, max_bytes: int) -> str:
    """`text`, cut (with an ellipsis) so that its JSON-escaped form fits in `max_bytes`."""
    if _escaped_size(text) <= max_bytes:
        return text
    budget = max_bytes - _escaped_size(ELLIPSIS)
    kept: list[str] = []
    for char in text:
        budget -= _escaped_size(char)
        if budget < 0:
            break
        kept.append(char)
    return "".join(kept) + ELLIPSIS


def bounded_violations(err: ValidationError) -> list[FieldViolation]:
    """The violations shown: the first ones, with clipped texts, within the budget."""
    shown: list[FieldViolation] = []
    used = 0
    for v in err.violations[:MAX_ENVELOPE_VIOLATIONS]:
        item = FieldViolation(
            clip(v.field, MAX_FIELD_BYTES),
            clip(v.message, MAX_VIOLATION_TEXT_BYTES),
            clip(v.code, MAX_VIOLATION_TEXT_BYTES),
        )
        size = sum(_escaped_size(t) for t in (item.field, item.message, item.code)) + 40
        if shown and used + size > MAX_VIOLATIONS_BYTES:
            break
        shown.append(item)
        used += size
    return shown


def envelope(err: ServiceError, request_id: str) -> dict[str, Any]:
    """The REST error body of SPEC §3."""
    body: dict[str, Any] = {
        "code": err.code,
        "message": clip(err.message, MAX_MESSAGE_BYTES),
        "statusCode": err.http_status,
        "requestId": request_id,
    }
    if isinstance(err, ValidationError):
        body["errors"] = [
            {"field": v.field, "message": v.message, "code": v.code}
            for v in bounded_violations(err)
        ]
    # SEGMENT_IN_USE names the referencing segments in its message; gRPC callers also get
    # their ids in ErrorInfo.metadata (to_status). The envelope has no other keys.
    now = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return {"success": False, "error": body, "timestamp": now}


def to_status(err: ServiceError, request_id: str) -> grpc.Status:
    code = grpc_code(err)
    details: list[Message] = []
    info = error_details_pb2.ErrorInfo(
        reason=err.code,
        domain=DOMAIN,
        metadata={"httpStatus": str(err.http_status), "requestId": request_id},
    )
    if isinstance(err, SegmentInUse):
        info.metadata["referencedBy"] = ",".join(err.referenced_by)
    details.append(info)
    if isinstance(err, ValidationError):
        details.append(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(
                        field=v.field, description=v.message, reason=v.code
                    )
                    for v in bounded_violations(err)
                ]
            )
        )
    if isinstance(err, Unavailable):
        details.append(error_details_pb2.RetryInfo(retry_delay={"seconds": 1}))
    packed = []
    for detail in details:
        holder = any_pb2.Any()
        holder.Pack(detail)
        packed.append(holder)
    status = rpc_status.to_status(
        status_pb2.Status(
            code=code.value[0], message=clip(err.message, MAX_MESSAGE_BYTES), details=packed
        )
    )
    body = json.dumps(envelope(err, request_id), ensure_ascii=True, separators=(",", ":"))
    trailing = (
        *status.trailing_metadata,
        (HTTP_STATUS_HEADER, str(err.http_status)),
        (ENVELOPE_HEADER, body),
    )
    return _Status(status.code, status.details, trailing)


class _Status(
    collections.namedtuple("_Status", ("code", "details", "trailing_metadata")), grpc.Status
):
    """A grpc.Status carrying our extra trailing metadata."""


def translate_db_error(exc: DBAPIError) -> ServiceError:
    """Database failures as the caller should see them; unknown ones stay internal."""
    orig = exc.orig
    if isinstance(exc, IntegrityError):
        if isinstance(orig, psycopg.errors.UniqueViolation):
            return AlreadyExists("a record with these values already exists")
        if isinstance(orig, psycopg.errors.ForeignKeyViolation):
            return NotFound("a referenced record does not exist (it may have just been deleted)")
        return ServiceError("the request conflicts with stored data")
    if isinstance(orig, psycopg.errors.QueryCanceled):
        return Unavailable("the database did not answer in time; retry the request")
    if isinstance(exc, OperationalError) or exc.connection_invalidated:
        return Unavailable("the database is unreachable; retry the request")
    # psycopg.DataError: every SQLSTATE of class 22 (most derive from it directly, not from
    # DataException, e.g. 22P05 for "\u0000" in jsonb) and psycopg's own refusal of NUL
    # characters in text parameters; a value the caller sent, not a server failure.
    if isinstance(orig, (psycopg.errors.ProgramLimitExceeded, psycopg.DataError)):
        return ValidationError.single("", f"the database refused a value: {orig}", "invalid")
    return ServiceError("internal error")


def abort(context: grpc.ServicerContext, err: ServiceError, request_id: str) -> NoReturn:
    context.abort_with_status(to_status(err, request_id))
    raise AssertionError("abort_with_status returned")  # pragma: no cover


R = TypeVar("R")


def in_transaction(sessions: sessionmaker[Session], work: Callable[[Session], R]) -> R:
    """Run `work` in one transaction, again from scratch after a deadlock or serialization
    failure, so such conflicts between concurrent requests never reach the caller."""
    for attempt in range(1, TRANSACTION_ATTEMPTS + 1):
        try:
            with sessions.begin() as session:
                return work(session)
        except DBAPIError as exc:
            if attempt < TRANSACTION_ATTEMPTS and isinstance(exc.orig, _RETRYABLE):
                log.info("retrying transaction after %s", type(exc.orig).__name__)
                continue
            raise
    raise AssertionError("unreachable")  # pragma: no cover


@contextlib.contextmanager
def errors_mapped(context: grpc.ServicerContext, request_id: str) -> Iterator[None]:
    """Abort the RPC with the mapped status for anything raised inside."""
    try:
        yield
    except ServiceError as err:
        abort(context, err, request_id)
    except DBAPIError as exc:
        mapped = translate_db_error(exc)
        if type(mapped) is ServiceError:
            log.exception("database error (request %s)", request_id)
        else:
            log.warning("database error mapped to %s: %s", mapped.code, exc.orig)
        abort(context, mapped, request_id)
    except Exception:
        log.exception("unexpected error (request %s)", request_id)
        abort(context, ServiceError("internal error"), request_id)


def run_unary(
    context: grpc.ServicerContext,
    sessions: sessionmaker[Session],
    kind: KeyKind,
    work: Callable[[Session, Caller], tuple[R, int | None]],
) -> R:
    """Authenticate, run `work` in one transaction and map errors; `work` answers
    (response, HTTP status for REST or None for 200)."""

    def authenticated(session: Session) -> tuple[R, int | None]:
        caller = authenticate(session, metadata_value(context, "authorization"), kind)
        return work(session, caller)

    with errors_mapped(context, request_id_of(context)):
        response, http_status = in_transaction(sessions, authenticated)
    if http_status is not None:
        context.send_initial_metadata(((HTTP_STATUS_HEADER, str(http_status)),))
    return response
