"""Python client of the segments service: generated stubs in `segments.v1`, typed client here."""

from segments.client import (
    AlreadyExistsError,
    AsyncSegmentsClient,
    Condition,
    FailedPreconditionError,
    FieldViolation,
    InvalidArgumentError,
    NotFoundError,
    SegmentInUseError,
    SegmentsClient,
    SegmentsError,
    UnauthenticatedError,
    UnavailableError,
    segment_condition,
    segment_description,
)

__all__ = [
    "AlreadyExistsError",
    "AsyncSegmentsClient",
    "Condition",
    "FailedPreconditionError",
    "FieldViolation",
    "InvalidArgumentError",
    "NotFoundError",
    "SegmentInUseError",
    "SegmentsClient",
    "SegmentsError",
    "UnauthenticatedError",
    "UnavailableError",
    "segment_condition",
    "segment_description",
]
