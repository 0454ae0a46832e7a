"""Event filters read `events` again: `event_stats` and its triggers go, `events_by_name`
comes back.

Keeping each contact's latest occurrence per name (0006) inside the writer's transaction
gave every IngestEvents batch a second write per distinct (name, contact). Measured side
by side at a million contacts, sustained ingestion fell by about a tenth, below its
20,000 events/s target, while count latency still grew faster than the contacts on other
scenarios (BENCHMARKS.md has the figures). Every event takes the write path, so it wins.

The downgrade is 0006's upgrade: the table is refilled from `events` and the triggers
come back.

Revision ID: 0007
Revises: 0006
"""

import importlib.util
from pathlib import Path
from types import ModuleType

from alembic import op

revision = "0007"
down_revision = "0006"


def _event_stats_migration() -> ModuleType:
    path = Path(__file__).with_name("0006_event_stats.py")
    spec = importlib.util.spec_from_file_location("segments_migration_0006", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def upgrade() -> None:
    op.execute(_event_stats_migration().DOWNGRADE)


def downgrade() -> None:
    op.execute(_event_stats_migration().UPGRADE)
