"""open_state_store: which URL opens which backend, and what a bad URL says."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiosqlite
import asyncpg
import pytest

from services.errors import StateStoreUnavailable
from services.state import PostgresStateStore, SqliteStateStore, open_state_store
from services.state.migrations import LATEST_VERSION
from tests.fixtures.servers import free_port
from tests.state.test_store import record

PASSWORD = "s3cr3t-Pa55"


@pytest.mark.parametrize("url", [None, ""])
async def test_no_url_opens_sqlite_at_the_default_path(tmp_path: Path, url: str | None) -> None:
    default = tmp_path / "var" / "lib" / "opsbot" / "state.db"
    store = await open_state_store(url, default_path=default)
    try:
        assert isinstance(store, SqliteStateStore)
        assert store.kind == "sqlite"
        assert store.path == default
        assert default.is_file()
        assert await store.schema_version() == LATEST_VERSION
    finally:
        await store.close()


async def test_sqlite_absolute_url(tmp_path: Path) -> None:
    target = tmp_path / "abs" / "state.db"
    store = await open_state_store(f"sqlite://{target}", default_path=tmp_path / "unused.db")
    try:
        assert store.kind == "sqlite"
        assert target.is_file()
        assert not (tmp_path / "unused.db").exists()
    finally:
        await store.close()


async def test_sqlite_relative_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    store = await open_state_store("sqlite:data/state.db", default_path=tmp_path / "unused.db")
    try:
        assert store.kind == "sqlite"
        assert (tmp_path / "data" / "state.db").is_file()
    finally:
        await store.close()


async def test_sqlite_uses_wal(tmp_path: Path) -> None:
    store = await open_state_store(None, default_path=tmp_path / "state.db")
    try:
        async with aiosqlite.connect(tmp_path / "state.db") as conn:
            rows = list(await conn.execute_fetchall("PRAGMA journal_mode"))
        assert rows[0][0] == "wal"
    finally:
        await store.close()


async def test_sqlite_writer_waits_for_another_process_lock(tmp_path: Path) -> None:
    store = await open_state_store(None, default_path=tmp_path / "state.db")
    try:
        async with aiosqlite.connect(tmp_path / "state.db", isolation_level=None) as other:
            await other.execute("BEGIN IMMEDIATE")
            append = asyncio.create_task(store.append_audit(record(1)))
            await asyncio.sleep(0.3)
            assert not append.done(), "the append should wait on the file's write lock"
            await other.execute("COMMIT")
            event = await asyncio.wait_for(append, 5)
        assert event.seq == 1
    finally:
        await store.close()


@pytest.mark.parametrize("scheme", ["postgresql", "postgres"])
async def test_postgres_urls(pg_dsn: str, scheme: str) -> None:
    url = scheme + pg_dsn.removeprefix("postgresql")
    store = await open_state_store(url, default_path=Path("/nonexistent/unused.db"))
    try:
        assert isinstance(store, PostgresStateStore)
        assert store.kind == "postgres"
        await store.ping()
        assert await store.schema_version() == LATEST_VERSION
    finally:
        await store.close()


async def test_postgres_writer_is_bounded_by_command_timeout(pg_dsn: str) -> None:
    store = await PostgresStateStore.open(pg_dsn, command_timeout=0.5)
    holder = await asyncpg.connect(pg_dsn, timeout=10)
    try:
        async with holder.transaction():
            await holder.execute("SELECT 1 FROM audit_head WHERE id = 1 FOR UPDATE")
            with pytest.raises(StateStoreUnavailable) as caught:  # said plainly, the timeout kept as its cause
                await store.append_audit(record(1))
            assert isinstance(caught.value.__cause__, TimeoutError)
        assert (await store.append_audit(record(2))).seq == 1
        assert await store.verify_audit() is None
    finally:
        await holder.close()
        await store.close()


@pytest.mark.parametrize(
    "url",
    [
        f"mysql://admin:{PASSWORD}@db.internal:3306/ops",
        f"redis://:{PASSWORD}@127.0.0.1:6379/0",
        f"postgresql+asyncpg://admin:{PASSWORD}@db.internal/ops",
        f"admin:{PASSWORD}@db.internal/ops",
        f"host=db.internal user=admin password={PASSWORD}",
        PASSWORD,
        f"http://admin:{PASSWORD}@[::1/ops",
    ],
)
async def test_bad_url_is_refused_without_its_password(tmp_path: Path, url: str) -> None:
    with pytest.raises(ValueError, match="unsupported state store URL") as caught:
        await open_state_store(url, default_path=tmp_path / "state.db")
    assert PASSWORD not in str(caught.value)
    assert PASSWORD not in repr(caught.value)
    assert not (tmp_path / "state.db").exists()


@pytest.mark.parametrize("url", ["sqlite:", "sqlite://", f"sqlite://{PASSWORD}/state.db", "sqlite:///tmp/dir/"])
async def test_bad_sqlite_url_is_refused(tmp_path: Path, url: str) -> None:
    with pytest.raises(ValueError, match="sqlite") as caught:
        await open_state_store(url, default_path=tmp_path / "state.db")
    assert PASSWORD not in str(caught.value)


async def test_unreachable_postgres_error_has_no_password(tmp_path: Path) -> None:
    url = f"postgresql://admin:{PASSWORD}@127.0.0.1:{free_port()}/ops"
    with pytest.raises(OSError) as caught:
        await open_state_store(url, default_path=tmp_path / "state.db")
    assert PASSWORD not in str(caught.value)
    assert PASSWORD not in repr(caught.value)
