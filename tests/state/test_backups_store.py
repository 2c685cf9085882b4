"""The backup catalog in the state store, on SQLite and PostgreSQL: finishing is a compare-and-set."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from services.state import BackupRecord, BackupState, StateStore
from services.state.migrations import LATEST_VERSION, MIGRATIONS, SCHEMA_VERSION_TABLE
from tests.state.conftest import Backend

NOW = datetime(2026, 11, 22, 3, 0, 0, 123456, tzinfo=UTC)


def record(backup_id: str = "shop-db-1", *, minutes: int = 0, component: str = "db") -> BackupRecord:
    return BackupRecord(
        id=backup_id,
        service="shop",
        component=component,
        source="postgres",
        trigger="manual",
        requested_by="U0OPS",
        destination="local",
        key=f"shop/{component}/{backup_id}.dump.zst",
        location=f"/backups/shop/{component}/{backup_id}.dump.zst",
        codec="zstd",
        state=BackupState.RUNNING,
        started_at=NOW + timedelta(minutes=minutes),
    )


async def test_a_backup_is_running_until_finished_and_then_has_its_checksum(store: StateStore) -> None:
    await store.create_backup(record())
    assert (await store.get_backup("shop-db-1")) == record()
    manifest = {"sha256": "ab" * 32, "stats": {"tables": {"orders": 3}}}
    done = await store.finish_backup(
        "shop-db-1", BackupState.GOOD, at=NOW + timedelta(seconds=5), size=123, sha256="ab" * 32, manifest=manifest
    )
    assert done is not None
    assert (done.state, done.size, done.sha256, done.manifest) == (BackupState.GOOD, 123, "ab" * 32, manifest)
    assert done.duration == pytest.approx(5.0)
    assert await store.get_backup("shop-db-1") == done
    # Finishing twice does nothing: the second writer (the sweeper, say) learns it lost.
    again = await store.finish_backup("shop-db-1", BackupState.FAILED, at=NOW, error="interrupted")
    assert again is None
    assert (await store.get_backup("shop-db-1")).state is BackupState.GOOD  # type: ignore[union-attr]


async def test_ids_are_unique(store: StateStore) -> None:
    await store.create_backup(record())
    with pytest.raises(KeyError):
        await store.create_backup(record())


async def test_only_one_of_racing_finishers_wins(store: StateStore) -> None:
    await store.create_backup(record())
    results = await asyncio.gather(
        *(store.finish_backup("shop-db-1", BackupState.FAILED, at=NOW, error=f"e{i}") for i in range(10)),
        store.finish_backup("shop-db-1", BackupState.GOOD, at=NOW, size=1, sha256="00"),
    )
    assert sum(r is not None for r in results) == 1


async def test_listing_is_newest_first_and_filters(store: StateStore) -> None:
    for i in range(5):
        await store.create_backup(record(f"shop-db-{i}", minutes=i))
    await store.create_backup(record("shop-files-0", minutes=10, component="files"))
    await store.create_backup(replace(record("other-db-0", minutes=20), service="other"))
    await store.finish_backup("shop-db-3", BackupState.GOOD, at=NOW, size=1, sha256="00")
    ids = [r.id for r in await store.list_backups(service="shop")]
    assert ids == ["shop-files-0", "shop-db-4", "shop-db-3", "shop-db-2", "shop-db-1", "shop-db-0"]
    db = await store.list_backups(service="shop", component="db", limit=2)
    assert [r.id for r in db] == ["shop-db-4", "shop-db-3"]
    good = await store.list_backups(service="shop", states=[BackupState.GOOD])
    assert [r.id for r in good] == ["shop-db-3"]
    assert await store.list_backups(states=[]) == []
    assert len(await store.list_backups()) == 7


async def test_verification_is_remembered_and_retention_deletes_only_finished(store: StateStore) -> None:
    await store.create_backup(record())
    assert not await store.delete_backup("shop-db-1", at=NOW)  # a running backup is never deleted
    await store.finish_backup("shop-db-1", BackupState.GOOD, at=NOW, size=1, sha256="00")
    await store.record_backup_check("shop-db-1", at=NOW + timedelta(hours=1), result="ok: sha256 matches")
    checked = await store.get_backup("shop-db-1")
    assert checked is not None
    assert (checked.verified_at, checked.verify_result) == (NOW + timedelta(hours=1), "ok: sha256 matches")
    assert await store.delete_backup("shop-db-1", at=NOW)
    assert not await store.delete_backup("shop-db-1", at=NOW)
    assert (await store.get_backup("shop-db-1")).state is BackupState.DELETED  # type: ignore[union-attr]


async def test_the_writer_renews_a_running_backups_heartbeat_and_learns_when_it_is_no_longer_running(
    store: StateStore,
) -> None:
    await store.create_backup(replace(record(), heartbeat_at=NOW))
    assert (await store.get_backup("shop-db-1")).heartbeat_at == NOW  # type: ignore[union-attr]
    assert await store.renew_backup("shop-db-1", at=NOW + timedelta(seconds=30))
    assert (await store.get_backup("shop-db-1")).heartbeat_at == NOW + timedelta(seconds=30)  # type: ignore[union-attr]
    await store.finish_backup("shop-db-1", BackupState.FAILED, at=NOW + timedelta(minutes=6), error="no heartbeat")
    assert not await store.renew_backup("shop-db-1", at=NOW + timedelta(minutes=7))  # swept: the writer must stop
    assert (await store.get_backup("shop-db-1")).heartbeat_at == NOW + timedelta(seconds=30)  # type: ignore[union-attr]
    assert not await store.renew_backup("nope", at=NOW)


async def test_a_catalog_from_before_heartbeats_is_migrated_and_keeps_its_rows(backend: Backend) -> None:
    """Version 6 adds the heartbeat column to a database at version 5 that already holds backups."""
    before = [m for m in MIGRATIONS if m.version <= 5]
    statements = [SCHEMA_VERSION_TABLE[backend.kind]]
    for migration in before:
        statements += migration.statements(backend.kind)
        statements.append(
            f"INSERT INTO schema_version (version, name, applied_at) VALUES ({migration.version}, 'v', '{NOW}')"
        )
    started = "2026-11-22T03:00:00.123456Z" if backend.kind == "sqlite" else "2026-11-22 03:00:00.123456+00"
    statements.append(
        "INSERT INTO backups (id, service, component, source, trigger, requested_by, destination, object_key,"
        " location, codec, state, started_at) VALUES ('shop-db-old', 'shop', 'db', 'postgres', 'manual', 'U0OPS',"
        f" 'local', 'shop/db/shop-db-old.dump.zst', '/b/shop-db-old.dump.zst', 'zstd', 'running', '{started}')"
    )
    if backend.kind == "sqlite":
        Path(backend.url.removeprefix("sqlite://")).parent.mkdir(parents=True, exist_ok=True)
    await backend.execute(*statements)
    store = await backend.open()
    try:
        assert await store.schema_version() == LATEST_VERSION
        old = await store.get_backup("shop-db-old")
        assert old is not None and old.state is BackupState.RUNNING and old.started_at == NOW
        assert old.heartbeat_at is None  # never renewed: the sweeper goes by its start
        assert await store.renew_backup("shop-db-old", at=NOW + timedelta(minutes=1))
    finally:
        await store.close()
