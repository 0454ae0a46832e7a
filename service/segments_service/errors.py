"""The public error contract and the domain errors that carry it.

`CONTRACT` is the one declaration of every public error code: its HTTP status, its gRPC
status, whether a retry may succeed, and its default message. The service's mapping
(status.py), Envoy's (the local replies of envoy_config.py, the tables envoy_tables.py
generates for envoy/filter.lua), the OpenAPI document (scripts/openapi.py) and
docs/errors.md are all derived from it; tests/test_contract.py fails when any of them
disagrees.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class ErrorSpec:
    """One public error code and how it travels over REST and gRPC."""

    code: str
    http_status: int
    # Name of the grpc.StatusCode; None for codes only Envoy answers (REST callers only).
    grpc_status: str | None
    # What the code means to a caller (docs, OpenAPI), and the message Envoy uses when it
    # answers with this code itself.
    situation: str
    message: str
    # Seconds after which a retry may succeed (google.rpc.RetryInfo, REST Retry-After).
    retry_after: float | None = None
    # The code Envoy gives an error of this HTTP status that arrives without the service's
    # envelope (Envoy's own replies, or a gRPC status the service did not explain).
    gateway_default: bool = False


CONTRACT: tuple[ErrorSpec, ...] = (
    ErrorSpec(
        "VALIDATION_ERROR",
        400,
        "INVALID_ARGUMENT",
        "Invalid request: malformed JSON, an unknown or ill-typed field, a value outside "
        "its limits",
        "The request is invalid",
        gateway_default=True,
    ),
    ErrorSpec(
        "FAILED_PRECONDITION",
        400,
        "FAILED_PRECONDITION",
        "A members call on a DYNAMIC segment",
        "The request does not apply to this resource in its current state",
    ),
    ErrorSpec(
        "MISSING_AUTH",
        401,
        "UNAUTHENTICATED",
        "Missing or malformed Authorization header",
        "Authorization header is required: `Authorization: Bearer <key>`",
    ),
    ErrorSpec(
        "INVALID_API_KEY",
        401,
        "UNAUTHENTICATED",
        "Unknown, revoked or wrong-type key",
        "Invalid API key",
    ),
    ErrorSpec(
        "UNAUTHENTICATED",
        401,
        "UNAUTHENTICATED",
        "An authentication failure the service gave no more precise code",
        "Unauthenticated",
        gateway_default=True,
    ),
    ErrorSpec(
        "NOT_FOUND",
        404,
        "NOT_FOUND",
        "No such segment or contact in this project, or no such path",
        "Not found",
        gateway_default=True,
    ),
    ErrorSpec(
        "METHOD_NOT_ALLOWED",
        405,
        None,
        "A method the path does not serve; the `Allow` header lists the ones it does",
        "Method not allowed",
        gateway_default=True,
    ),
    ErrorSpec(
        "SEGMENT_IN_USE",
        409,
        "FAILED_PRECONDITION",
        "The segment is referenced by other segments",
        "The segment is referenced by other segments",
    ),
    ErrorSpec(
        "ALREADY_EXISTS",
        409,
        "ALREADY_EXISTS",
        "A record with these values already exists",
        "A record with these values already exists",
    ),
    ErrorSpec(
        "CONFLICT",
        409,
        "ABORTED",
        "A conflict the service gave no more precise code",
        "Conflict",
        gateway_default=True,
    ),
    ErrorSpec(
        "PAYLOAD_TOO_LARGE",
        413,
        None,
        "Request body larger than the limit (1 MiB by default)",
        "Request body larger than {limit} bytes",
        gateway_default=True,
    ),
    ErrorSpec(
        "RATE_LIMITED",
        429,
        "RESOURCE_EXHAUSTED",
        "Over the project's per-minute rate limit or its concurrent requests",
        "Too many requests for this project",
        retry_after=1.0,
        gateway_default=True,
    ),
    ErrorSpec(
        "INTERNAL_ERROR",
        500,
        "INTERNAL",
        "Unexpected server error",
        "internal error",
        gateway_default=True,
    ),
    ErrorSpec(
        "SERVICE_UNAVAILABLE",
        503,
        "UNAVAILABLE",
        "Database or service unreachable",
        "The service is unavailable; retry the request",
        retry_after=1.0,
        gateway_default=True,
    ),
    ErrorSpec(
        "SEGMENT_BUILDING",
        503,
        "UNAVAILABLE",
        "A segment's membership is still being built and could not be counted in time",
        "The segment is still being built; retry the request",
        retry_after=1.0,
    ),
    ErrorSpec(
        "DEADLINE_EXCEEDED",
        504,
        "DEADLINE_EXCEEDED",
        "The request did not complete within its time budget; nothing was written",
        "The request did not complete in time",
        gateway_default=True,
    ),
)
ERRORS: dict[str, ErrorSpec] = {spec.code: spec for spec in CONTRACT}
# The code of an error whose HTTP status has no gateway default.
FALLBACK_CODE = "INTERNAL_ERROR"


@dataclass(frozen=True)
class FieldViolation:
    """One problem with one request field; `field` is a dot path such as `condition.groups.0`."""

    field: str
    message: str
    code: str = "invalid"


class ServiceError(Exception):
    """Base of every error a caller may see; `code` is the public UPPER_SNAKE error code."""

    code = FALLBACK_CODE
    # Both from the error's entry in CONTRACT (set for each subclass by __init_subclass__).
    http_status = ERRORS[FALLBACK_CODE].http_status
    retry_after: float | None = ERRORS[FALLBACK_CODE].retry_after

    def __init_subclass__(cls) -> None:
        super().__init_subclass__()
        spec = ERRORS[cls.code]  # every error class has its code in the contract
        cls.http_status = spec.http_status
        cls.retry_after = spec.retry_after

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ValidationError(ServiceError):
    code = "VALIDATION_ERROR"

    def __init__(self, violations: list[FieldViolation], message: str | None = None) -> None:
        if message is None:
            first = violations[0]
            message = f"{first.field}: {first.message}" if first.field else first.message
            if len(violations) > 1:
                message += f" (and {len(violations) - 1} more)"
        super().__init__(message)
        self.violations = violations

    @classmethod
    def single(cls, field: str, message: str, code: str = "invalid") -> ValidationError:
        return cls([FieldViolation(field, message, code)])


class MissingAuth(ServiceError):
    code = "MISSING_AUTH"


class InvalidApiKey(ServiceError):
    code = "INVALID_API_KEY"


class NotFound(ServiceError):
    code = "NOT_FOUND"


class MethodNotAllowed(ServiceError):
    """A REST request whose method its path does not serve (no RPC is bound to the pair);
    `allowed` are the methods the path serves, for the `Allow` header."""

    code = "METHOD_NOT_ALLOWED"

    def __init__(self, message: str, allowed: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.allowed = tuple(allowed)


class FailedPrecondition(ServiceError):
    code = "FAILED_PRECONDITION"


class SegmentInUse(FailedPrecondition):
    code = "SEGMENT_IN_USE"

    def __init__(self, message: str, referenced_by: list[str]) -> None:
        super().__init__(message)
        self.referenced_by = referenced_by


class AlreadyExists(ServiceError):
    code = "ALREADY_EXISTS"


class Unavailable(ServiceError):
    code = "SERVICE_UNAVAILABLE"


class RateLimited(ServiceError):
    """A project is over one of its fair-share limits; the caller may retry after a delay."""

    code = "RATE_LIMITED"

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class DeadlineExceeded(ServiceError):
    """The request's budget ran out; nothing it did was committed."""

    code = "DEADLINE_EXCEEDED"


class SegmentBuilding(Unavailable):
    """A segment's membership is being built and its live answer did not fit the budget."""

    code = "SEGMENT_BUILDING"
