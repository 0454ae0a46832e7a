"""Segment builds that leave the request, in the manner of CREATE INDEX CONCURRENTLY.

A project of at most `inline_contacts` contacts builds a segment inside the request, under
the exclusive project lock, as membership.rebuild always did. A larger project's create or
update only marks the segment (and the segments that reference it) BUILDING, in a short
transaction under the exclusive lock (start_build), and queues a build that a Builder runs
in steps, each its own short transaction under the shared lock and the background budget:

1. compute: per slice of contacts (by id), the new members into `segment_build_shadow`;
2. apply: per slice, the difference between the shadow and the stored memberships, for
   the slice's contacts that are not dirty: entries, exits, `member_count`, entry/exit
   events of tracked segments;
3. catch up: the dirty contacts (noted by writers since the build started, see
   membership.refresh_contacts), re-evaluated through the writers' locked path;
4. final: under the exclusive lock for a moment, what is still dirty, then READY.

Writers never evaluate a segment whose membership is `building`, and no step evaluates a
contact a writer touched without catching it up afterwards under that writer's locks, so
each real entry or exit is recorded once. A step's work and its cursor commit together:
a server stopped mid-build leaves a build the next Builder resumes where it stood.

A compute step over its budget (or refused by the database) fails the build: after an
update, the previous condition comes back and keeps serving (its memberships were not
touched before the apply), the dirty contacts are caught up under it, and the segment is
FAILED with a reason; a failed create is FAILED and answered live. Steps after the
compute are retried (they apply a difference already known to fit), MAX_ATTEMPTS times
before the build fails without a condition to fall back to. A change of definition
while a build runs replaces it with a new generation (start_build), in the same
transaction as the change; a deleted segment takes its build along.

Builds are shared fairly: a Builder's round gives one step to each project with queued
builds (a project's builds run one at a time, oldest first), so one project's queue
never delays another's first build. Several Builders (servers) coordinate through a
transaction-level advisory try-lock per project.
"""

from segments_service.builds.queue import (
    APPLY,
    BUILDING,
    CATCHUP,
    COMPUTE,
    FAILED,
    FINAL,
    MAX_ATTEMPTS,
    READY,
    BuildSettings,
    builds_inline,
    cancel_build,
    queued_projects,
    start_build,
)
from segments_service.builds.runner import (
    Builder,
    StepHook,
    step,
)

__all__ = [
    "APPLY",
    "BUILDING",
    "CATCHUP",
    "COMPUTE",
    "FAILED",
    "FINAL",
    "MAX_ATTEMPTS",
    "READY",
    "BuildSettings",
    "Builder",
    "StepHook",
    "builds_inline",
    "cancel_build",
    "queued_projects",
    "start_build",
    "step",
]
