"""The backup runner with real sources and destinations: S3 (moto), SQLite, files, MongoDB, Cloud SQL
(a fake of its Admin API), and retention that never drops the newest good backup. The sweeper: test_sweep.py."""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import asyncpg
import pytest
from pymongo import AsyncMongoClient

from services.backup.base import BackupError
from services.backup.runner import BackupRunner, lock_key
from services.errors import CommandError
from services.inventory import Inventory, parse_inventory
from services.locks import LocalLocks
from services.redaction import Redactor
from services.state import BackupState, StateStore
from tests.fixtures.aws import FAKE_SECRET_ACCESS_KEY
from tests.fixtures.cloudsql import FakeCloudSql, start_fake
from tests.fixtures.servers import PG_BIN, PostgresServer, run_sql


def make_inventory(text: str) -> Inventory:
    return parse_inventory(text, "test", env={}).inventory


@pytest.fixture
async def cloudsql() -> AsyncIterator[FakeCloudSql]:
    fake = await start_fake(polls_to_done=1)
    try:
        yield fake
    finally:
        await fake.close()


def app_db(path: Path, rows: int = 500) -> None:
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("CREATE TABLE IF NOT EXISTS notes (id INTEGER PRIMARY KEY, body TEXT)")
        db.executemany("INSERT INTO notes (body) VALUES (?)", [(f"note {i}" * 20,) for i in range(rows)])


def count(path: Path) -> int:
    with sqlite3.connect(path) as db:
        return int(db.execute("SELECT count(*) FROM notes").fetchone()[0])


def runner_for(store: StateStore, inventory: Inventory, tmp_path: Path, **kwargs: object) -> BackupRunner:
    return BackupRunner(store, inventory, LocalLocks(), Redactor(), base_dir=tmp_path, **kwargs)  # type: ignore[arg-type]


async def test_sqlite_to_s3_backup_verify_and_restore(
    store: StateStore, tmp_path: Path, s3_bucket: tuple[str, str]
) -> None:
    endpoint, bucket = s3_bucket
    db = tmp_path / "app.db"
    app_db(db)
    inventory = make_inventory(f"""
backups:
  destinations:
    s3: {{type: s3, bucket: {bucket}, prefix: "opsbot/", endpoint_url: "{endpoint}", region: us-east-1}}
  destination: s3
  compression: gzip
services:
  notes:
    components:
      db: {{type: sqlite, path: "{db}"}}
""")
    runner = runner_for(store, inventory, tmp_path)
    try:
        record = await runner.backup("notes", "db", trigger="manual", requested_by="U1")
        assert record.location == f"s3://{bucket}/opsbot/{record.key}" and record.key.endswith(".sqlite.gz")
        assert record.manifest is not None and record.manifest["stats"]["tables"]["notes"] == 500
        check = await runner.verify(record.id)
        assert check.ok and "sha256 matches" in check.summary, check.summary
        assert FAKE_SECRET_ACCESS_KEY not in check.summary + record.location
        app_db(db, rows=100)  # the app goes on writing; the restore brings back the backed-up state
        assert count(db) == 600
        assert await runner.restore(record)
        assert count(db) == 500
    finally:
        await runner.close()


async def test_files_and_mongodb_round_trip_through_a_directory(
    store: StateStore, tmp_path: Path, mongo_uri: str
) -> None:
    uploads = tmp_path / "uploads"
    (uploads / "2026").mkdir(parents=True)
    (uploads / "2026" / "a.txt").write_text("alpha")
    (uploads / "b.bin").write_bytes(bytes(range(256)) * 100)
    database = f"shop_{id(store)}"
    client: AsyncMongoClient[dict[str, object]] = AsyncMongoClient(mongo_uri, serverSelectionTimeoutMS=5000)
    try:
        await client[database]["orders"].insert_many([{"n": i, "item": f"x{i}"} for i in range(300)])
        inventory = make_inventory(f"""
backups:
  destinations:
    local: {{type: directory, path: backups}}
services:
  shop:
    components:
      uploads: {{type: files, paths: ["{uploads}"]}}
      mongo: {{type: mongodb, uri: "{mongo_uri}", database: {database}}}
""")
        runner = runner_for(store, inventory, tmp_path)
        try:
            files = await runner.backup("shop", "uploads", trigger="manual", requested_by="U1")
            mongo = await runner.backup("shop", "mongo", trigger="manual", requested_by="U1")
            assert (tmp_path / "backups" / files.key).is_file()  # relative to base_dir
            for record in (files, mongo):
                check = await runner.verify(record.id)
                assert check.ok, check.summary
            (uploads / "2026" / "a.txt").write_text("changed")
            (uploads / "b.bin").unlink()
            await client[database]["orders"].delete_many({"n": {"$gte": 100}})
            await runner.restore(files)
            await runner.restore(mongo)
            assert (uploads / "2026" / "a.txt").read_text() == "alpha"
            assert (uploads / "b.bin").read_bytes() == bytes(range(256)) * 100
            assert await client[database]["orders"].count_documents({}) == 300
        finally:
            await runner.close()
    finally:
        await client.drop_database(database)
        await client.close()


async def orders(dsn: str) -> int:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        return int(await conn.fetchval("select count(*) from orders"))
    finally:
        await conn.close()


async def test_postgres_as_a_password_only_role_round_trips_and_never_shows_its_password(
    store: StateStore, tmp_path: Path, postgres_server: PostgresServer, caplog: pytest.LogCaptureFixture
) -> None:
    """pg_dump and pg_restore get in as the SCRAM role with the inventory's password; a rotated
    password fails in words the bot can show, and no password is in any of them."""
    role = postgres_server.scram_role()
    dsn = await postgres_server.database_with(
        "create table orders (id bigint primary key, item text not null)",
        "insert into orders select n, 'item ' || n from generate_series(1, 2000) as n",
        scram=True,
    )
    rotated = postgres_server.scram_dsn(dsn.rsplit("/", 1)[1], password="not-" + role.password)
    inventory = parse_inventory(
        f"""
backups:
  pg_bin: "{PG_BIN}"
  destinations: {{local: {{type: directory, path: "{tmp_path / "b"}"}}}}
services:
  shop:
    components:
      db: {{type: postgres, dsn: "${{SHOP_DB}}"}}
      old: {{type: postgres, dsn: "${{OLD_DB}}"}}
""",
        "test",
        env={"SHOP_DB": dsn, "OLD_DB": rotated},
    ).inventory
    caplog.set_level(logging.DEBUG)
    runner = runner_for(store, inventory, tmp_path)
    try:
        described = runner.describe(inventory.services["shop"].components["db"])
        record = await runner.backup("shop", "db", trigger="manual", requested_by="U1")
        check = await runner.verify(record.id)
        await run_sql(dsn, "delete from orders where id > 10")
        restored = await runner.restore(record)
        with pytest.raises(BackupError) as refused:
            await runner.backup("shop", "old", trigger="manual", requested_by="U1")
        [failed] = await store.list_backups(service="shop", component="old")
    finally:
        await runner.close()

    assert check.ok, check.summary
    assert restored.startswith("restored 1 table into PostgreSQL database t_")
    assert await orders(dsn) == 2000  # the rows deleted after the backup are back
    problem = (
        f'pg_dump failed: connection to server at "{postgres_server.host}", port {postgres_server.port} failed: '
        f'FATAL:  password authentication failed for user "{role.name}"'
    )
    assert refused.value.message == problem
    assert failed.state is BackupState.FAILED and failed.error == problem
    manifest = (tmp_path / "b" / f"{record.key}.manifest.json").read_text()
    said = [described, repr(record), repr(check), restored, refused.value.message, repr(failed), manifest, caplog.text]
    assert not [text for text in said if role.found_in(text)]
    assert "backup_finished" in caplog.text and "backup_failed" in caplog.text  # the logs were captured


async def test_a_corrupted_object_fails_verification_and_is_never_restored(store: StateStore, tmp_path: Path) -> None:
    db = tmp_path / "app.db"
    app_db(db)
    inventory = make_inventory(f"""
backups: {{destinations: {{local: {{type: directory, path: "{tmp_path / "b"}"}}}}}}
services: {{notes: {{components: {{db: {{type: sqlite, path: "{db}"}}}}}}}}
""")
    runner = runner_for(store, inventory, tmp_path)
    record = await runner.backup("notes", "db", trigger="manual", requested_by="U1")
    stored = tmp_path / "b" / record.key
    stored.write_bytes(stored.read_bytes()[:-10] + b"0123456789")
    check = await runner.verify(record.id)
    assert not check.ok
    assert check.record.verify_result.startswith("failed: ")
    app_db(db, rows=1)
    with pytest.raises(BackupError, match="does not match its checksum"):
        await runner.restore(record)
    assert count(db) == 501  # untouched
    with pytest.raises(CommandError, match="There is no backup `nope`"):
        await runner.verify("nope")


async def test_retention_counts_only_good_backups_and_keeps_the_newest(store: StateStore, tmp_path: Path) -> None:
    db = tmp_path / "app.db"
    app_db(db, rows=5)
    inventory = make_inventory(f"""
backups:
  destinations: {{local: {{type: directory, path: "{tmp_path / "b"}"}}}}
  retention: {{keep_last: null, keep_days: 7}}
services: {{notes: {{components: {{db: {{type: sqlite, path: "{db}"}}}}}}}}
""")
    runner = runner_for(store, inventory, tmp_path)
    only = await runner.backup("notes", "db", trigger="manual", requested_by="U1")
    db.unlink()  # later backups fail: the file is gone
    with pytest.raises(BackupError):
        await runner.backup("notes", "db", trigger="manual", requested_by="U1")
    runner.clock = lambda: datetime.now(UTC) + timedelta(days=30)
    assert await runner.apply_retention("notes", "db") == []  # the only good backup stays, however old
    assert (tmp_path / "b" / only.key).is_file()
    states = [r.state for r in await store.list_backups(service="notes")]
    assert states == [BackupState.FAILED, BackupState.GOOD]


async def test_cloudsql_on_demand_backup_verify_and_restore_of_an_automated_run(
    store: StateStore, tmp_path: Path, cloudsql: FakeCloudSql
) -> None:
    automated = cloudsql.add_run("main-db", started=datetime.now(UTC) - timedelta(hours=3))
    inventory = make_inventory(f"""
services:
  vcbl:
    components:
      sql:
        type: cloudsql
        project: {cloudsql.project}
        instance: main-db
        api_url: "{cloudsql.url}"
        access_token: "{cloudsql.token}"
        poll_seconds: 0.05
""")
    async with aiohttp.ClientSession() as http:
        runner = runner_for(store, inventory, tmp_path, http=http)
        record = await runner.backup("vcbl", "sql", trigger="manual", requested_by="U1")
        assert record.state is BackupState.GOOD and record.source == "cloudsql"
        run_id = record.manifest["cloudsql"]["backup_run"]  # type: ignore[index]
        assert cloudsql.backup_runs[run_id]["type"] == "ON_DEMAND"
        check = await runner.verify(record.id)
        assert check.ok and "SUCCESSFUL" in check.summary
        found = await runner.find("vcbl", automated)
        assert found.id == automated and found.state is BackupState.GOOD and found.trigger == "automated"
        assert "restored Cloud SQL instance" in await runner.restore(found)
        assert cloudsql.instances["main-db"]["restored_from"] == [automated]
        runs = await runner.cloudsql_runs("vcbl")
        assert {r.id for r in runs["sql"]} >= {automated, run_id}


async def test_cloudsql_with_a_wrong_token_fails_clearly_without_the_token(
    store: StateStore, tmp_path: Path, cloudsql: FakeCloudSql
) -> None:
    inventory = make_inventory(f"""
services:
  vcbl:
    components:
      sql: {{type: cloudsql, project: {cloudsql.project}, instance: main-db, api_url: "{cloudsql.url}",
             access_token: "ya29.wrong-token-abcdef", poll_seconds: 0.05}}
""")
    async with aiohttp.ClientSession() as http:
        runner = runner_for(store, inventory, tmp_path, http=http)
        with pytest.raises(BackupError) as caught:
            await runner.backup("vcbl", "sql", trigger="manual", requested_by="U1")
        assert "may not manage Cloud SQL instance" in caught.value.message
        assert "wrong-token" not in caught.value.message
        [failed] = await store.list_backups()
        assert failed.state is BackupState.FAILED and "wrong-token" not in failed.error


async def test_two_backups_of_one_component_at_once_are_refused(store: StateStore, tmp_path: Path) -> None:
    db = tmp_path / "app.db"
    app_db(db, rows=5)
    inventory = make_inventory(f"""
backups: {{destinations: {{local: {{type: directory, path: "{tmp_path / "b"}"}}}}}}
services: {{notes: {{components: {{db: {{type: sqlite, path: "{db}"}}}}}}}}
""")
    runner = runner_for(store, inventory, tmp_path)
    await runner.locks.acquire(lock_key("notes", "db"), "notes-db-other")
    with pytest.raises(CommandError, match="already running"):
        await runner.backup("notes", "db", trigger="manual", requested_by="U1")
    assert await store.list_backups() == []
