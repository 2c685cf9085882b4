"""The sweep: a running backup whose writer stopped renewing its heartbeat is failed, a live one in
another process is left alone (and stops if the catalog gives up on it), and partial objects of
backups that are not running are deleted (directory) or aborted (S3 multipart uploads), audited.

"Another process" is a second runner with its own in-process locks on the same catalog: without
Redis that is all a process knows of another one.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest

from services.backup.base import BackupError
from services.backup.runner import BackupRunner, lock_key
from services.inventory import Inventory, parse_inventory
from services.locks import LocalLocks
from services.redaction import Redactor
from services.state import AuditEvent, BackupRecord, BackupState, StateStore, open_state_store
from tests.fixtures.aws import aws_client
from tests.fixtures.servers import PG_BIN, PostgresServer
from tests.fixtures.wait import wait_until

NOW = datetime.now(UTC).replace(microsecond=0)


def make_inventory(text: str, **env: str) -> Inventory:
    return parse_inventory(text, "test", env=env).inventory


def runner_for(store: StateStore, inventory: Inventory, tmp_path: Path, **kwargs: float) -> BackupRunner:
    return BackupRunner(store, inventory, LocalLocks(), Redactor(), base_dir=tmp_path, **kwargs)  # type: ignore[arg-type]


def running(backup_id: str, *, beat: datetime | None, destination: str = "local") -> BackupRecord:
    key = f"notes/db/{backup_id}.sqlite.gz"
    return BackupRecord(
        id=backup_id, service="notes", component="db", source="sqlite", trigger="scheduled", requested_by="cron",
        destination=destination, key=key, location=f"/b/{key}", codec="gzip", state=BackupState.RUNNING,
        started_at=NOW - timedelta(hours=1), heartbeat_at=beat,
    )  # fmt: skip


async def failed(store: StateStore, backup_id: str, destination: str = "local") -> BackupRecord:
    await store.create_backup(running(backup_id, beat=NOW - timedelta(hours=1), destination=destination))
    done = await store.finish_backup(backup_id, BackupState.FAILED, at=NOW - timedelta(hours=1), error="killed")
    assert done is not None
    return done


async def sweep_events(store: StateStore) -> list[AuditEvent]:
    return [e for e in reversed(await store.audit_events(limit=100)) if e.command == "backup sweep"]


def state_of(record: BackupRecord | None) -> BackupState | None:
    return None if record is None else record.state


async def test_running_backups_are_failed_once_their_heartbeat_is_stale_not_when_they_are_old(
    store: StateStore, tmp_path: Path
) -> None:
    inventory = make_inventory(f"""
backups: {{destinations: {{local: {{type: directory, path: "{tmp_path / "b"}"}}}}, stall_timeout: 60}}
services: {{notes: {{components: {{db: {{type: sqlite, path: "{tmp_path / "app.db"}"}}}}}}}}
""")
    runner = runner_for(store, inventory, tmp_path)
    runner.clock = lambda: NOW
    # All three started an hour ago. One stopped beating 61 s ago; one beat 20 s ago (its process is
    # alive, wherever it is); one stopped beating, but this very process holds its lock.
    await store.create_backup(running("notes-db-dead", beat=NOW - timedelta(seconds=61)))
    await store.create_backup(running("notes-db-alive", beat=NOW - timedelta(seconds=20)))
    await store.create_backup(running("notes-db-here", beat=NOW - timedelta(minutes=10)))
    await runner.locks.acquire(lock_key("notes", "db"), "notes-db-here")

    swept = await runner.sweep()

    assert [r.id for r in swept] == ["notes-db-dead"]
    since = (NOW - timedelta(seconds=61)).strftime("%Y-%m-%d %H:%M:%S")
    assert swept[0].state is BackupState.FAILED
    assert swept[0].error == f"the process running it stopped: no heartbeat since {since} UTC"
    assert state_of(await store.get_backup("notes-db-alive")) is BackupState.RUNNING
    assert state_of(await store.get_backup("notes-db-here")) is BackupState.RUNNING
    [event] = await sweep_events(store)
    assert (event.actor, event.args, event.outcome, event.service) == ("opsbot", "notes-db-dead", "ok", "notes")
    assert event.detail == f"marked notes-db-dead failed: {swept[0].error}"
    assert await runner.sweep() == []  # nothing is failed twice


async def test_a_scoped_sweep_leaves_other_services_alone(store: StateStore, tmp_path: Path) -> None:
    inventory = make_inventory(f"""
backups: {{destinations: {{local: {{type: directory, path: "{tmp_path / "b"}"}}}}, stall_timeout: 60}}
services: {{notes: {{components: {{db: {{type: sqlite, path: "{tmp_path / "app.db"}"}}}}}}}}
""")
    runner = runner_for(store, inventory, tmp_path)
    await store.create_backup(running("notes-db-dead", beat=NOW - timedelta(hours=1)))
    await store.create_backup(replace(running("shop-db-dead", beat=NOW - timedelta(hours=1)), service="shop"))
    assert [r.id for r in await runner.sweep(service="shop")] == ["shop-db-dead"]
    assert state_of(await store.get_backup("notes-db-dead")) is BackupState.RUNNING


@dataclass
class BlockedDump:
    """A PostgreSQL database whose table is locked, so pg_dump waits (alive, writing nothing) until
    ``release``."""

    dsn: str
    conn: asyncpg.Connection

    async def release(self) -> None:
        await self.conn.execute("ROLLBACK")


@contextlib.asynccontextmanager
async def blocked_dump(server: PostgresServer) -> AsyncIterator[BlockedDump]:
    dsn = await server.database_with(
        "create table orders (id int)", "insert into orders select generate_series(1, 100)"
    )
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        await conn.execute("BEGIN; LOCK TABLE orders IN ACCESS EXCLUSIVE MODE")
        yield BlockedDump(dsn, conn)
    finally:
        await conn.close()


async def stopped(task: asyncio.Task[BackupRecord]) -> None:
    """A test that failed half-way leaves no backup running behind it."""
    task.cancel()
    await asyncio.wait({task})
    if not task.cancelled():
        task.exception()


def pg_inventory(tmp_path: Path, dsn: str) -> Inventory:
    # stall_timeout bounds how long pg_dump may wait on the lock; the tests' clocks do the aging.
    return make_inventory(
        f"""
backups:
  pg_bin: "{PG_BIN}"
  destinations: {{local: {{type: directory, path: "{tmp_path / "b"}"}}}}
  stall_timeout: 60
services: {{shop: {{components: {{db: {{type: postgres, dsn: "${{SHOP_DB}}"}}}}}}}}
""",
        SHOP_DB=dsn,
    )


async def test_a_backup_running_in_another_process_is_not_swept_while_it_renews_its_heartbeat(
    tmp_path: Path, postgres_server: PostgresServer
) -> None:
    now = [datetime.now(UTC)]
    writer_store = await open_state_store(f"sqlite://{tmp_path / 'state.db'}", default_path=tmp_path / "x.db")
    sweeper_store = await open_state_store(f"sqlite://{tmp_path / 'state.db'}", default_path=tmp_path / "x.db")
    async with blocked_dump(postgres_server) as dump:
        inventory = pg_inventory(tmp_path, dump.dsn)
        writer = runner_for(writer_store, inventory, tmp_path, heartbeat_every=0.05)
        sweeper = runner_for(sweeper_store, inventory, tmp_path)  # its own locks: it cannot see the writer's
        writer.clock = sweeper.clock = lambda: now[0]
        task = asyncio.create_task(writer.backup("shop", "db", trigger="manual", requested_by="U1"))
        try:
            [record] = await wait_until(
                lambda: sweeper_store.list_backups(states=[BackupState.RUNNING]), "the backup is catalogued"
            )
            partial = await wait_until(
                lambda: list((tmp_path / "b").rglob("*.partial-*")), "the writer opens its partial file"
            )
            now[0] += timedelta(minutes=10)  # ten minutes on, as both processes' clocks tell it

            async def renewed() -> bool:
                found = await sweeper_store.get_backup(record.id)
                return found is not None and found.heartbeat_at == now[0]

            await wait_until(renewed, "the writer renews its heartbeat")
            assert await sweeper.sweep() == []
            assert state_of(await sweeper_store.get_backup(record.id)) is BackupState.RUNNING
            assert partial[0].exists()  # ten minutes untouched by the sweeper's clock, but its backup runs
            assert await sweep_events(sweeper_store) == []
            await dump.release()
            done = await asyncio.wait_for(task, 30)
            assert done.state is BackupState.GOOD and (tmp_path / "b" / done.key).is_file()
        finally:
            await stopped(task)
            await writer.close()
            await sweeper.close()
            await writer_store.close()
            await sweeper_store.close()


async def test_a_writer_whose_backup_another_process_failed_stops_and_cleans_up(
    store: StateStore, tmp_path: Path, postgres_server: PostgresServer
) -> None:
    async with blocked_dump(postgres_server) as dump:
        writer = runner_for(store, pg_inventory(tmp_path, dump.dsn), tmp_path, heartbeat_every=0.05)
        task = asyncio.create_task(writer.backup("shop", "db", trigger="manual", requested_by="U1"))
        try:
            [record] = await wait_until(
                lambda: store.list_backups(states=[BackupState.RUNNING]), "the backup is catalogued"
            )
            await wait_until(lambda: list((tmp_path / "b").rglob("*.partial-*")), "the writer opens its file")
            # What another process's sweep does when this one's heartbeat could not be written for long.
            await store.finish_backup(record.id, BackupState.FAILED, at=datetime.now(UTC), error="no heartbeat")
            with pytest.raises(BackupError, match="another process marked it failed"):
                await asyncio.wait_for(task, 20)
            assert [p for p in (tmp_path / "b").rglob("*") if p.is_file()] == []
            assert (await store.get_backup(record.id)).error == "no heartbeat"  # type: ignore[union-attr]
        finally:
            await stopped(task)
            await writer.close()


def partial_file(root: Path, key: str, *, age: timedelta, suffix: str = "") -> Path:
    path = root / f"{key}{suffix}.partial-{os.urandom(6).hex()}"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"half a dump")
    when = (NOW - age).timestamp()
    os.utime(path, (when, when))
    return path


async def test_partial_files_of_backups_that_are_not_running_are_deleted_and_audited(
    store: StateStore, tmp_path: Path
) -> None:
    root = tmp_path / "b"
    inventory = make_inventory(f"""
backups: {{destinations: {{local: {{type: directory, path: "{root}"}}}}, stall_timeout: 60}}
services: {{notes: {{components: {{db: {{type: sqlite, path: "{tmp_path / "app.db"}"}}}}}}}}
""")
    runner = runner_for(store, inventory, tmp_path)
    runner.clock = lambda: NOW
    old, new = timedelta(minutes=5), timedelta(seconds=5)
    dead = await failed(store, "notes-db-20261122-010000-dead")
    recent = await failed(store, "notes-db-20261122-010000-0new")
    await store.create_backup(live := running("notes-db-20261122-010000-live", beat=NOW - new))
    await store.create_backup(stale := running("notes-db-20261122-010000-0old", beat=NOW - old))
    complete = root / "notes/db/notes-db-20261122-000000-good.sqlite.gz"
    complete.parent.mkdir(parents=True)
    complete.write_bytes(b"a whole dump")
    gone = [
        partial_file(root, dead.key, age=old),
        partial_file(root, dead.key, age=old, suffix=".manifest.json"),
        partial_file(root, "notes/db/notes-db-20250101-000000-beef.sqlite.gz", age=old),  # in no catalog
        partial_file(root, stale.key, age=old),  # its entry is failed first, by the same sweep
    ]
    kept = [
        partial_file(root, recent.key, age=new),  # written to 5 s ago: leave it for later
        partial_file(root, live.key, age=old),  # the backup runs (it renewed its heartbeat)
        partial_file(root, "notes/db/not-a-backup.tar", age=old),  # no name the runner gives
        complete,
    ]

    swept = await runner.sweep()

    assert [r.id for r in swept] == [stale.id]
    assert [p for p in gone if p.exists()] == []
    assert [p for p in kept if not p.exists()] == []
    events = await sweep_events(store)
    assert events[0].detail.startswith(f"marked {stale.id} failed")
    removed = {e.detail for e in events[1:]}
    assert removed == {
        f"deleted the partial {gone[0]} (untouched for 300 s; backup {dead.id} is failed)",
        f"deleted the partial {gone[1]} (untouched for 300 s; backup {dead.id} is failed)",
        f"deleted the partial {gone[2]} (untouched for 300 s; backup notes-db-20250101-000000-beef is not catalogued)",
        f"deleted the partial {gone[3]} (untouched for 300 s; backup {stale.id} is failed)",
    }
    assert all(e.actor == "opsbot" and e.service == "notes" and e.outcome == "ok" for e in events)


async def test_multipart_uploads_of_backups_that_are_not_running_are_aborted_and_audited(
    store: StateStore, tmp_path: Path, s3_bucket: tuple[str, str]
) -> None:
    endpoint, bucket = s3_bucket
    inventory = make_inventory(f"""
backups:
  destinations:
    s3: {{type: s3, bucket: {bucket}, prefix: "opsbot/", endpoint_url: "{endpoint}", region: us-east-1}}
  destination: s3
  stall_timeout: 60
services: {{notes: {{components: {{db: {{type: sqlite, path: "{tmp_path / "app.db"}"}}}}}}}}
""")
    later = datetime.now(UTC) + timedelta(minutes=10)  # S3 stamps parts with the real time: age them
    runner = runner_for(store, inventory, tmp_path)
    runner.clock = lambda: later
    dead = await failed(store, "notes-db-20261122-010000-dead", destination="s3")
    await store.create_backup(live := running("notes-db-20261122-010000-live", beat=later, destination="s3"))
    stray = "notes/db/notes-db-20250101-000000-beef.sqlite.gz"
    client = aws_client("s3", endpoint)
    try:
        for key in (dead.key, live.key, stray):
            upload = client.create_multipart_upload(Bucket=bucket, Key=f"opsbot/{key}")
            client.upload_part(
                Bucket=bucket, Key=f"opsbot/{key}", UploadId=upload["UploadId"], PartNumber=1, Body=b"x" * 1024
            )

        assert await runner.sweep() == []

        pending = client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
        assert [u["Key"] for u in pending] == [f"opsbot/{live.key}"]
    finally:
        client.close()
        await runner.close()
    events = {e.args: e.detail for e in await sweep_events(store)}
    assert set(events) == {dead.id, "notes-db-20250101-000000-beef"}
    assert all(detail.startswith("aborted the partial multipart upload ") for detail in events.values())
    assert f"of s3://{bucket}/opsbot/{dead.key} (untouched for " in events[dead.id]
    assert events[dead.id].endswith(f"backup {dead.id} is failed)")
    stray_line = events["notes-db-20250101-000000-beef"]
    assert f"of s3://{bucket}/opsbot/{stray} (untouched for " in stray_line
    assert stray_line.endswith("backup notes-db-20250101-000000-beef is not catalogued)")
