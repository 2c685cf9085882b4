"""The migration list itself: ordered, complete for both dialects."""

from __future__ import annotations

from services.state.base import GENESIS_HASH
from services.state.migrations import LATEST_VERSION, MIGRATIONS, pending


def test_versions_run_from_one_without_gaps() -> None:
    assert [m.version for m in MIGRATIONS] == list(range(1, len(MIGRATIONS) + 1))
    assert len(MIGRATIONS) == LATEST_VERSION


def test_every_migration_has_both_dialects() -> None:
    for migration in MIGRATIONS:
        assert migration.name
        assert migration.statements("sqlite")
        assert migration.statements("postgres")


def test_pending_is_what_is_above_the_current_version() -> None:
    assert pending(0) == MIGRATIONS
    assert pending(LATEST_VERSION) == ()


def test_chain_head_starts_at_genesis() -> None:
    first = MIGRATIONS[0]
    assert any(GENESIS_HASH in s for s in first.statements("sqlite"))
    assert any(GENESIS_HASH in s for s in first.statements("postgres"))
