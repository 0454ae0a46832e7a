"""Domain errors, each with its public error code and HTTP status (status.py maps them)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FieldViolation:
    """One problem with one request field; `field` is a dot path such as `condition.groups.0`."""

    field: str
    message: str
    code: str = "invalid"


class ServiceError(Exception):
    """Base of every error a caller may see; `code` is the public UPPER_SNAKE error code."""

    code = "INTERNAL_ERROR"
    http_status = 500
    # Seconds after which a retry may succeed (google.rpc.RetryInfo, REST Retry-After).
    retry_after: float | None = None

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ValidationError(ServiceError):
    code = "VALIDATION_ERROR"
    http_status = 400

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
    http_status = 401


class InvalidApiKey(ServiceError):
    code = "INVALID_API_KEY"
    http_status = 401


class NotFound(ServiceError):
    code = "NOT_FOUND"
    http_status = 404


class FailedPrecondition(ServiceError):
    code = "FAILED_PRECONDITION"
    http_status = 400


class SegmentInUse(FailedPrecondition):
    code = "SEGMENT_IN_USE"
    http_status = 409

    def __init__(self, message: str, referenced_by: list[str]) -> None:
        super().__init__(message)
        self.referenced_by = referenced_by


class AlreadyExists(ServiceError):
    code = "ALREADY_EXISTS"
    http_status = 409


class Unavailable(ServiceError):
    code = "SERVICE_UNAVAILABLE"
    http_status = 503
    retry_after = 1.0


class RateLimited(ServiceError):
    """A project is over one of its fair-share limits; the caller may retry after a delay."""

    code = "RATE_LIMITED"
    http_status = 429

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class DeadlineExceeded(ServiceError):
    """The request's budget ran out; nothing it did was committed."""

    code = "DEADLINE_EXCEEDED"
    http_status = 504


class SegmentBuilding(Unavailable):
    """A segment's membership is being built and its live answer did not fit the budget."""

    code = "SEGMENT_BUILDING"
    http_status = 503
