"""The one place errors become gRPC statuses: google.rpc details plus the REST error envelope
(rpc.py runs the RPCs and hands what they raise here)."""

from __future__ import annotations

import collections
import json
import math
from datetime import UTC, datetime
from typing import Any

import grpc
import psycopg.errors
from google.protobuf import any_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError

from segments_service.errors import (
    ERRORS,
    AlreadyExists,
    FieldViolation,
    NotFound,
    SegmentInUse,
    ServiceError,
    Unavailable,
    ValidationError,
)

DOMAIN = "segments.v1"
# Internal metadata read by Envoy's response filter; never shown to HTTP clients.
HTTP_STATUS_HEADER = "x-http-status"
ENVELOPE_HEADER = "x-error-envelope"
RETRY_AFTER_HEADER = "x-retry-after"  # whole seconds of the RetryInfo, as HTTP Retry-After
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


def grpc_code(err: ServiceError) -> grpc.StatusCode:
    """The gRPC status of `err`'s code in the error contract (errors.CONTRACT)."""
    name = ERRORS[err.code].grpc_status
    return grpc.StatusCode.INTERNAL if name is None else grpc.StatusCode[name]


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
    """The REST error envelope (docs/errors.md)."""
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
    retry_after = None if err.retry_after is None else max(1, math.ceil(err.retry_after))
    if retry_after is not None:
        details.append(error_details_pb2.RetryInfo(retry_delay={"seconds": retry_after}))
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
        *(() if retry_after is None else ((RETRY_AFTER_HEADER, str(retry_after)),)),
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
