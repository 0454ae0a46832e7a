"""Filter conditions: the JSON tree a segment is defined by, validated and compiled to SQL.

A reader's path through the package, each file one job:

- model.py      the validated form: Condition / Group, and one type per kind of filter
- parse.py      untrusted JSON -> model, every violation named by its dot path (pure)
- compile.py    model -> one SQLAlchemy Core statement selecting (or counting) members (pure)
- predicates.py contact-field and data filters as predicates over `contacts`
- context.py    what compiling depends on: the instant, the referenced segments
- references.py segment references: loading them, bounding their expansion
- limits.py     the bounds a condition must keep
- timestamps.py the timestamp strings filters and stored data spell

Everything other modules use is importable from here.
"""

from segments_service.filters.compile import compile_count, compile_members, compile_sampled_count
from segments_service.filters.context import (
    CompileContext,
    Derive,
    Part,
    SegmentDefinition,
    relative_values,
)
from segments_service.filters.limits import (
    MAX_DEPTH,
    MAX_EXPANDED_DEPTH,
    MAX_EXPANDED_FILTERS,
    MAX_FIELD_LENGTH,
    MAX_FIELD_PARTS,
    MAX_FILTERS,
    MAX_STRING_VALUE,
    MAX_WINDOW,
)
from segments_service.filters.model import (
    APPLICABLE,
    EMAIL_ACTIVITY_EVENTS,
    Aggregate,
    Aggregation,
    Condition,
    Count,
    DataFilter,
    EmailFilter,
    EventFilter,
    Filter,
    FilterFacts,
    Group,
    Kind,
    Logic,
    Op,
    Scalar,
    SegmentFilter,
    SubscribedFilter,
    TimeFilter,
    Unit,
    Window,
    add_months,
)
from segments_service.filters.parse import parse_condition
from segments_service.filters.predicates import window_value
from segments_service.filters.references import (
    Expansion,
    SegmentLoader,
    check_expansion,
    expansion,
    expansions,
    load_references,
)
from segments_service.filters.timestamps import (
    is_date_only,
    parse_stored_timestamp,
    parse_value_timestamp,
)

__all__ = [
    "APPLICABLE",
    "EMAIL_ACTIVITY_EVENTS",
    "MAX_DEPTH",
    "MAX_EXPANDED_DEPTH",
    "MAX_EXPANDED_FILTERS",
    "MAX_FIELD_LENGTH",
    "MAX_FIELD_PARTS",
    "MAX_FILTERS",
    "MAX_STRING_VALUE",
    "MAX_WINDOW",
    "Aggregate",
    "Aggregation",
    "CompileContext",
    "Condition",
    "Count",
    "DataFilter",
    "Derive",
    "EmailFilter",
    "EventFilter",
    "Expansion",
    "Filter",
    "FilterFacts",
    "Group",
    "Kind",
    "Logic",
    "Op",
    "Part",
    "Scalar",
    "SegmentDefinition",
    "SegmentFilter",
    "SegmentLoader",
    "SubscribedFilter",
    "TimeFilter",
    "Unit",
    "Window",
    "add_months",
    "check_expansion",
    "compile_count",
    "compile_members",
    "compile_sampled_count",
    "expansion",
    "expansions",
    "is_date_only",
    "load_references",
    "parse_condition",
    "parse_stored_timestamp",
    "parse_value_timestamp",
    "relative_values",
    "window_value",
]
