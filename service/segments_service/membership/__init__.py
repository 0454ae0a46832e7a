"""Membership of dynamic segments, kept current in SQL, with entry/exit events for tracked ones.

Every DYNAMIC segment's members live in `segment_members`, so counts and listings never
re-run a condition over all contacts. One statement re-evaluates a set of contacts against
all of a project's dynamic segments: it inserts the entries, deletes the exits, records
`segment.<slug>.entry` / `.exit` events for tracked segments and adjusts `member_count`.

A batch of events evaluates only what it can change: a segment meets the contacts that got
an event its condition reads (and the contacts the batch created); exits are probed only
where an event can cause one (Dynamic.exit_event_names); and a contact whose membership
an event stored at the batch's start settles (Dynamic.certain), or a new contact without
any event the condition reads (Dynamic.blank), is not evaluated at all: the members among
them are given to the statement as a list. A batch that leaves nothing to evaluate, insert
or probe (events of names no segment reads) runs no statement.

Concurrency, without a coordinator of our own:
- Writers take the project's advisory lock in shared mode, then row-lock the contacts they
  re-evaluate (in id order); the evaluating statement starts after both, so its snapshot
  includes every earlier writer of those contacts. Two writers of one contact therefore
  evaluate one after the other, and each real entry or exit is recorded exactly once.
- Changing a definition (create, new condition, tracking on) takes the same lock in
  exclusive mode and rebuilds: no writer evaluates against a half-changed definition.
  In a large project the rebuild leaves the request (builds.py): the exclusive lock is
  held only to mark the segment `building`; from then on writers do not evaluate it but
  note the contacts they lock in `segment_build_dirty`, and the build catches them up.
- Deleting a contact takes the shared lock and the contact's row; deleting a segment takes
  the exclusive lock. So no membership is written for a contact or segment being deleted,
  and `segment_members` needs no foreign keys (migration 0008), whose per-row checks
  doubled the time of a large create.
- Everything happens in the caller's transaction: a crash leaves no partial state.
"""

from segments_service.membership.dynamic import (
    BUILDING,
    NOT_STORED,
    STORED,
    Changes,
    Dynamic,
    dynamic_segments,
    load_definitions,
)
from segments_service.membership.locks import (
    BACKGROUND_TIMEOUT,
    advisory_key,
    allow_long_statements,
    db_now,
    lock_contacts,
    lock_exclusive,
    lock_shared,
)
from segments_service.membership.refresh import (
    ANALYZE_AFTER_ROWS,
    CHUNK,
    MAX_EVENT_ROUNDS,
    adjust_count,
    apply_scoped,
    dependents,
    forget_contact,
    mark_dirty,
    rebuild,
    record_entries_for_all,
    refresh_contacts,
)
from segments_service.membership.statement import (
    STATEMENT_CACHE_SIZE,
    Scope,
    desired_members,
    record_events,
    scope_lists,
    scope_parameters,
    slugify,
)

__all__ = [
    "ANALYZE_AFTER_ROWS",
    "BACKGROUND_TIMEOUT",
    "BUILDING",
    "CHUNK",
    "MAX_EVENT_ROUNDS",
    "NOT_STORED",
    "STATEMENT_CACHE_SIZE",
    "STORED",
    "Changes",
    "Dynamic",
    "Scope",
    "adjust_count",
    "advisory_key",
    "allow_long_statements",
    "apply_scoped",
    "db_now",
    "dependents",
    "desired_members",
    "dynamic_segments",
    "forget_contact",
    "load_definitions",
    "lock_contacts",
    "lock_exclusive",
    "lock_shared",
    "mark_dirty",
    "rebuild",
    "record_entries_for_all",
    "record_events",
    "refresh_contacts",
    "scope_lists",
    "scope_parameters",
    "slugify",
]
