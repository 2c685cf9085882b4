"""The four backup sources against real servers and real files: PostgreSQL with pg_dump/pg_restore,
MongoDB (nx-27017), SQLite under a busy writer, a directory tree; plus the thread bridges."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import io
import json
import logging
import os
import random
import re
import sqlite3
import sys
import tarfile
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

import asyncpg
import pytest
from bson import Binary, Int64, ObjectId, json_util
from pymongo import ASCENDING, DESCENDING, AsyncMongoClient

from services.backup.base import CHUNK, BackupError
from services.backup.bridge import TEMP_PREFIX, parse_stream, read_stream, stream_from_writer
from services.backup.files import FilesSource
from services.backup.mongodb import MongoSource
from services.backup.postgres import PostgresSource
from services.backup.sqlite import SqliteSource
from services.redaction import Redactor
from tests.fixtures.servers import PG_BIN, PostgresServer, free_port
from tests.fixtures.wait import wait_until

PASSWORD = "Kn0ck-kn0ck-wh0s-there"


# --- helpers --------------------------------------------------------------------------------------


async def collect(chunks: AsyncIterator[bytes]) -> list[bytes]:
    return [chunk async for chunk in chunks]


async def feed(data: bytes, size: int = 300_000) -> AsyncIterator[bytes]:
    """An artifact as a stream, in pieces that do not line up with anything inside it."""
    for start in range(0, len(data), size):
        await asyncio.sleep(0)
        yield data[start : start + size]


async def breaks_off(data: bytes, after: int) -> AsyncIterator[bytes]:
    """The first ``after`` bytes, then the stream fails (a destination read going wrong)."""
    async for chunk in feed(data[:after]):
        yield chunk
    raise ConnectionResetError("the artifact's stream broke off")


def children(*names: str) -> list[int]:
    """Our child processes with one of these names (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        if ppid == os.getpid() and comm in names:
            found.append(int(entry.name))
    return found


def proc_file(pid: int, name: str) -> bytes:
    """/proc/<pid>/<name>, or b"" once the process is gone."""
    try:
        return (Path("/proc") / str(pid) / name).read_bytes()
    except FileNotFoundError:
        return b""


def leftovers(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir() if path.name.startswith(TEMP_PREFIX))


@pytest.fixture
def private_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """tempfile's directory for this test, so temporary files the sources leave behind show."""
    directory = tmp_path / "tmp"
    directory.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(directory))
    return directory


# --- bridges ----------------------------------------------------------------------------------------


def opsbot_threads() -> list[str]:
    """Bridge threads still alive (one that has just reported its result gets a moment to exit)."""
    deadline = time.monotonic() + 2
    while True:
        alive = [thread.name for thread in threading.enumerate() if thread.name.startswith("opsbot-")]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.01)


async def test_writer_bridge_reports_the_producer_error() -> None:
    def produce(out: BinaryIO) -> None:
        for _ in range(5):
            out.write(b"x" * 700_000)
        raise ValueError("disk on fire")

    with pytest.raises(ValueError, match="disk on fire"):
        await collect(stream_from_writer(produce))
    assert opsbot_threads() == []


async def test_writer_bridge_stops_the_thread_when_the_reader_goes_away() -> None:
    writes_after_close: list[type[BaseException]] = []
    ended = threading.Event()

    def produce(out: BinaryIO) -> None:
        try:
            while True:
                out.write(b"y" * 100_000)
        except BaseException as exc:
            writes_after_close.append(type(exc))
            raise
        finally:
            ended.set()

    stream = stream_from_writer(produce)
    assert 0 < len(await anext(stream)) <= CHUNK
    await stream.aclose()

    assert ended.is_set()  # joined before aclose returned
    assert writes_after_close == [BrokenPipeError]
    assert opsbot_threads() == []


async def test_reader_bridge_reports_the_input_error_not_the_parser_complaint() -> None:
    def consume(source: BinaryIO) -> int:
        total = 0
        while block := source.read(4096):
            total += len(block)
        return total

    assert await read_stream(feed(b"z" * 2_000_000), consume) == 2_000_000
    with pytest.raises(ConnectionResetError, match="broke off"):
        await read_stream(breaks_off(b"z" * 2_000_000, 1_000_000), consume)
    assert opsbot_threads() == []


async def test_reader_bridge_parser_error_and_early_stop() -> None:
    def bad(source: BinaryIO) -> Iterator[int]:
        yield len(source.read(10))
        raise ValueError("not a tar file")

    with pytest.raises(ValueError, match="not a tar file"):
        [item async for item in parse_stream(feed(b"a" * 100), bad)]

    def endless(source: BinaryIO) -> Iterator[int]:
        while block := source.read(1000):
            yield len(block)

    items = parse_stream(feed(b"b" * 5_000_000, 100_000), endless)
    assert await anext(items) == 1000
    await items.aclose()
    assert opsbot_threads() == []


async def test_event_loop_keeps_ticking_while_a_big_tree_is_archived(tmp_path: Path) -> None:
    """Reading and tarring 64 MB happens in a thread: the loop answers within a fraction of a second."""
    (tmp_path / "big").mkdir()
    block = os.urandom(1 << 20)
    with (tmp_path / "big" / "blob").open("wb") as out:
        for _ in range(64):
            out.write(block)
    gaps: list[float] = []
    done = asyncio.Event()

    async def ticker() -> None:
        last = time.monotonic()
        while not done.is_set():
            await asyncio.sleep(0.01)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    task = asyncio.create_task(ticker())
    total = sum(len(chunk) for chunk in await collect(FilesSource([tmp_path / "big"], timeout=5).dump()))
    done.set()
    await task
    assert total > 64 << 20
    assert max(gaps) < 0.5, f"the event loop stalled for {max(gaps):.2f} s"


# --- PostgreSQL ------------------------------------------------------------------------------------


async def fetch(dsn: str, query: str) -> list[tuple[Any, ...]]:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        return [tuple(row) for row in await conn.fetch(query)]
    finally:
        await conn.close()


ITEMS_DIGEST = (
    "select count(*), md5(string_agg(id || ':' || name || ':' || encode(payload, 'hex'), ',' order by id)) from items"
)


@dataclass(frozen=True)
class PgArtifact:
    server: PostgresServer
    scram: bool  # dumped (and restored) as the SCRAM role, whose password must reach pg_dump
    dsn: str
    data: bytes
    chunks: list[int]
    stats: dict[str, Any]
    tools: dict[str, str]

    async def new_database(self, *statements: str) -> str:
        """A fresh database for the same login as the artifact's (owned by it), after ``statements``."""
        return await self.server.database_with(*statements, scram=self.scram)


def pg_source(dsn: str, **options: Any) -> PostgresSource:
    options.setdefault("timeout", 10.0)
    options.setdefault("redactor", Redactor())
    options.setdefault("pg_bin", str(PG_BIN))
    return PostgresSource(dsn, **options)


@pytest.fixture(scope="module", params=["trust", "scram"], ids=["trusted-superuser", "scram-role"])
async def pg_artifact(request: pytest.FixtureRequest, postgres_server: PostgresServer) -> PgArtifact:
    """A database with a 50k-row table (bytea included) and its dump, made once for the module for
    each login: the trusted superuser, and the SCRAM role (its tests prove the password got through)."""
    scram = request.param == "scram"
    dsn = await postgres_server.database_with(
        "create table items (id integer primary key, name text not null, payload bytea)",
        "insert into items select g, 'item ' || g || E'\\t€', decode(md5(g::text), 'hex') || '\\x00ff'::bytea "
        "from generate_series(1, 50000) g",
        "create index items_name on items (name)",
        "create table notes (id serial primary key, body text)",
        "insert into notes (body) values ('line one\nline two'), ('quote '' and backslash \\'), (null)",
        scram=scram,
    )
    source = pg_source(dsn)
    chunks = await collect(source.dump())
    data = b"".join(chunks)
    return PgArtifact(postgres_server, scram, dsn, data, [len(c) for c in chunks], source.info.stats, source.info.tools)


async def test_postgres_dump_restores_into_a_new_database_with_the_same_rows(pg_artifact: PgArtifact) -> None:
    assert pg_artifact.data.startswith(b"PGDMP")
    assert len(pg_artifact.chunks) > 2 and max(pg_artifact.chunks) <= CHUNK
    assert re.fullmatch(r"\d+\.\d+", pg_artifact.tools["pg_dump"])
    database = pg_artifact.dsn.rsplit("/", 1)[1]
    assert pg_artifact.stats["database"] == database
    assert pg_artifact.stats["tables"] == 2 and pg_artifact.stats["table_data"] == 2
    assert pg_artifact.stats["entries"] >= 6  # 2 tables, 2 data, sequence, pkeys, index...

    target = await pg_artifact.new_database()
    summary = await pg_source(target).restore(feed(pg_artifact.data))

    assert summary.startswith("restored 2 tables into PostgreSQL database t_")
    assert await fetch(target, ITEMS_DIGEST) == await fetch(pg_artifact.dsn, ITEMS_DIGEST)
    assert (await fetch(target, ITEMS_DIGEST))[0][0] == 50000
    notes = "select id, body from notes order by id"
    assert await fetch(target, notes) == await fetch(pg_artifact.dsn, notes)
    assert await fetch(target, "select indexname from pg_indexes where tablename = 'items' order by 1") == [
        ("items_name",),
        ("items_pkey",),
    ]
    assert children("pg_dump", "pg_restore") == []


async def test_postgres_check_reads_the_whole_archive(pg_artifact: PgArtifact) -> None:
    source = pg_source(pg_artifact.dsn)

    summary = await source.check(feed(pg_artifact.data), pg_artifact.stats)
    assert "2 tables, 2 with data" in summary

    with pytest.raises(BackupError, match="archive is damaged"):
        await source.check(feed(pg_artifact.data[: len(pg_artifact.data) * 2 // 3]), pg_artifact.stats)
    with pytest.raises(BackupError, match="archive is damaged"):
        await source.check(feed(os.urandom(50_000)), {})
    damaged = bytearray(pg_artifact.data)
    damaged[len(damaged) // 2 : len(damaged) // 2 + 64] = b"\xff" * 64
    with pytest.raises(BackupError, match="archive is damaged"):
        await source.check(feed(bytes(damaged)), pg_artifact.stats)
    with pytest.raises(BackupError, match="manifest says 3"):
        await source.check(feed(pg_artifact.data), {**pg_artifact.stats, "table_data": 3})
    assert children("pg_restore") == []


async def test_postgres_restore_failing_half_way_leaves_the_target_as_it_was(pg_artifact: PgArtifact) -> None:
    target = await pg_artifact.new_database(
        "create table items (id integer primary key, name text not null, payload bytea)",
        "insert into items values (1, 'old one', null), (2, 'old two', '\\x01')",
        "create table keep (x integer)",
        "insert into keep values (42)",
    )
    before = await fetch(target, "select id, name, payload from items order by id")
    source = pg_source(target)

    # The archive ends in the middle of the items data: pg_restore has already dropped and
    # re-created tables in its transaction when it fails.
    with pytest.raises(BackupError, match=r"pg_restore failed, database t_\w+ is unchanged: .*end of file"):
        await source.restore(feed(pg_artifact.data[: len(pg_artifact.data) * 2 // 3]))
    # The input itself breaks: pg_restore is killed before it can commit.
    with pytest.raises(ConnectionResetError):
        await source.restore(breaks_off(pg_artifact.data, len(pg_artifact.data) // 2))

    assert await fetch(target, "select id, name, payload from items order by id") == before
    assert await fetch(target, "select x from keep") == [(42,)]
    assert await fetch(target, "select count(*) from pg_tables where tablename = 'notes'") == [(0,)]
    assert children("pg_restore") == []


def scram_dsn(artifact: PgArtifact, *, in_query: bool = False, password: str | None = None) -> str:
    """The SCRAM role's DSN for the artifact's database (with its own password unless one is given)."""
    dsn = artifact.server.scram_dsn(artifact.dsn.rsplit("/", 1)[1], password=password, in_query=in_query)
    return dsn + "&application_name=opsbot-test" if in_query else dsn  # other parameters stay in --dbname


@pytest.mark.parametrize("pg_artifact", ["scram"], indirect=True)
@pytest.mark.parametrize("in_query", [False, True], ids=["user-password", "query-password"])
async def test_postgres_password_is_never_on_pg_dumps_command_line(
    pg_artifact: PgArtifact, monkeypatch: pytest.MonkeyPatch, in_query: bool
) -> None:
    monkeypatch.setenv("OPSBOT_SLACK_BOT_TOKEN", "xoxb-not-for-pg-dump")
    role = pg_artifact.server.scram_role()
    stream = pg_source(scram_dsn(pg_artifact, in_query=in_query)).dump()

    await anext(stream)  # pg_dump is running now (so it logged in), blocked on a full pipe
    (pid,) = children("pg_dump")
    cmdline = proc_file(pid, "cmdline")
    environ = proc_file(pid, "environ").split(b"\0")
    await stream.aclose()

    assert not role.found_in(cmdline)
    server = pg_artifact.server
    assert f"--dbname=postgresql://{role.name}@{server.host}:{server.port}/".encode() in cmdline
    assert in_query == (b"application_name=opsbot-test" in cmdline)
    assert f"PGPASSWORD={role.password}".encode() in environ  # unquoted; readable only by the bot's own user
    assert not [line for line in environ if line.startswith(b"OPSBOT_SLACK")]
    assert proc_file(pid, "cmdline") == b""  # killed and reaped
    assert children("pg_dump", "pg_restore") == []


@dataclass(frozen=True)
class Call:
    """One run of pg_dump or pg_restore as the wrapper in front of it saw it."""

    argv: list[str]
    env_keys: list[str]

    @property
    def connects(self) -> bool:
        return any(arg.startswith("--dbname=") for arg in self.argv)


class RecordingPgBin:
    """A pg_bin directory whose pg_dump and pg_restore write down their argv and the *names* of their
    environment variables (never values: the password is one), then exec the real program."""

    def __init__(self, root: Path) -> None:
        self.dir = root / "pg_bin"
        self.calls_dir = root / "calls"
        self.dir.mkdir()
        self.calls_dir.mkdir()
        for name in ("pg_dump", "pg_restore"):
            wrapper = self.dir / name
            wrapper.write_text(
                f"#!{sys.executable}\n"
                "import json, os, sys\n"
                f"with open(os.path.join({str(self.calls_dir)!r}, str(os.getpid())), 'w') as out:\n"
                "    json.dump({'argv': sys.argv, 'env_keys': sorted(os.environ)}, out)\n"
                f"os.execv({str(PG_BIN / name)!r}, [{str(PG_BIN / name)!r}, *sys.argv[1:]])\n"
            )
            wrapper.chmod(0o755)

    def calls(self) -> list[Call]:
        found = [json.loads(path.read_text()) for path in sorted(self.calls_dir.iterdir())]
        return [Call(call["argv"], call["env_keys"]) for call in found]


@pytest.mark.parametrize("pg_artifact", ["scram"], indirect=True)
async def test_postgres_password_reaches_every_child_only_through_its_environment(
    pg_artifact: PgArtifact, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Dump, check and restore as the SCRAM role, through wrappers that record each child's argv."""
    monkeypatch.setenv("OPSBOT_SLACK_BOT_TOKEN", "xoxb-not-for-pg-tools")
    caplog.set_level(logging.DEBUG)
    role = pg_artifact.server.scram_role()
    pg_bin = RecordingPgBin(tmp_path)
    target = await pg_artifact.new_database()

    source = pg_source(scram_dsn(pg_artifact), pg_bin=str(pg_bin.dir))
    data = b"".join(await collect(source.dump()))
    checked = await source.check(feed(data), source.info.stats)
    restored = await pg_source(target, pg_bin=str(pg_bin.dir)).restore(feed(data))
    wrong = pg_source(scram_dsn(pg_artifact, password="not-" + role.password), pg_bin=str(pg_bin.dir))
    with pytest.raises(BackupError) as refused:
        await collect(wrong.dump())

    assert "2 tables, 2 with data" in checked and restored.startswith("restored 2 tables into ")
    assert await fetch(target, ITEMS_DIGEST) == await fetch(pg_artifact.dsn, ITEMS_DIGEST)  # the password got in
    calls = pg_bin.calls()
    programs = sorted(f"{Path(call.argv[0]).name} {call.argv[1]}" for call in calls)
    assert programs == sorted([
        "pg_dump --version", "pg_dump --format=custom", "pg_restore --list",  # dump
        "pg_restore --file=/dev/null", "pg_restore --list",  # check
        "pg_restore --clean", "pg_restore --list",  # restore
        "pg_dump --version", "pg_dump --format=custom", "pg_restore --list",  # dump with the wrong password
    ])  # fmt: skip
    for call in calls:
        assert not role.found_in("\0".join(call.argv)), call.argv
        assert not [key for key in call.env_keys if key.startswith("OPSBOT_")], call.env_keys
    assert sum(call.connects for call in calls) == 3  # the two dumps and the restore
    assert all("PGPASSWORD" in call.env_keys for call in calls if call.connects)
    assert refused.value.message == (
        f'pg_dump failed: connection to server at "{pg_artifact.server.host}", port {pg_artifact.server.port} '
        f'failed: FATAL:  password authentication failed for user "{role.name}"'
    )
    assert not role.found_in(str(refused.value) + repr(refused.value) + caplog.text)
    assert children("pg_dump", "pg_restore") == []


@contextlib.asynccontextmanager
async def table_locked(dsn: str) -> AsyncIterator[None]:
    """Another session holds an exclusive lock on items: pg_dump waits for it and sends nothing."""
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        async with conn.transaction():
            await conn.execute("lock table items in access exclusive mode")
            yield
    finally:
        await conn.close()


async def test_postgres_dump_cancelled_while_pg_dump_waits_leaves_no_process(pg_artifact: PgArtifact) -> None:
    async def consume() -> None:
        async with contextlib.aclosing(pg_source(pg_artifact.dsn).dump()) as stream:
            async for _ in stream:
                pass

    async with table_locked(pg_artifact.dsn):
        task = asyncio.create_task(consume())
        await wait_until(lambda: children("pg_dump"), "pg_dump starts")
        assert len(children("pg_dump")) == 1 and not task.done()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

        assert children("pg_dump", "pg_restore") == []


async def test_postgres_dump_that_stalls_is_stopped(pg_artifact: PgArtifact) -> None:
    source = pg_source(pg_artifact.dsn, stall_timeout=0.5)

    async with table_locked(pg_artifact.dsn):
        with pytest.raises(BackupError, match=r"^pg_dump sent nothing for 0.5 s .*; stopped it$"):
            await collect(source.dump())

    assert children("pg_dump", "pg_restore") == []


async def test_postgres_missing_binary_is_named(tmp_path: Path) -> None:
    source = pg_source(f"postgresql://me:{PASSWORD}@127.0.0.1:5432/shop", pg_bin=str(tmp_path))

    with pytest.raises(BackupError, match=r"^pg_dump is not installed on the bot's host") as raised:
        await anext(source.dump())
    assert PASSWORD not in str(raised.value)


async def test_postgres_unreachable_database_fails_without_the_password(pg_artifact: PgArtifact) -> None:
    port = free_port()
    source = pg_source(f"postgresql://me:{PASSWORD}@127.0.0.1:{port}/shop", timeout=3.0)

    assert source.describe() == f"PostgreSQL database shop on 127.0.0.1:{port}"
    with pytest.raises(BackupError, match=r"^pg_dump failed: .*Connection refused") as raised:
        await collect(source.dump())
    assert PASSWORD not in str(raised.value)
    with pytest.raises(BackupError, match=r"^pg_restore failed, database shop is unchanged: .*refused") as raised:
        await source.restore(feed(pg_artifact.data))
    assert PASSWORD not in str(raised.value)
    assert children("pg_dump", "pg_restore") == []


# --- MongoDB ---------------------------------------------------------------------------------------


@pytest.fixture
async def mongo(mongo_uri: str) -> AsyncIterator[AsyncMongoClient[dict[str, Any]]]:
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(mongo_uri, serverSelectionTimeoutMS=5000)
    yield client
    await client.close()


def mongo_source(uri: str, database: str, **options: Any) -> MongoSource:
    options.setdefault("timeout", 5.0)
    options.setdefault("redactor", Redactor())
    return MongoSource(uri, database, **options)


def index_shapes(indexes: list[dict[str, Any]]) -> set[tuple[tuple[str, ...], bool]]:
    """Indexed fields and uniqueness: nx-27017 rewrites index names and directions."""
    return {(tuple(index["key"]), bool(index.get("unique"))) for index in indexes if index["name"] != "_id_"}


async def seeded_mongo(client: AsyncMongoClient[dict[str, Any]]) -> str:
    name = f"src_{uuid.uuid4().hex[:8]}"
    db = client[name]
    moment = datetime(2024, 5, 1, 12, 30, tzinfo=UTC)
    await db.users.insert_many(
        [
            {
                "_id": ObjectId(),
                "email": f"user{i}@example.com",
                "n": Int64(i * 10**12),
                "tags": ["a", {"deep": [i, None, True]}],
                "avatar": Binary(bytes([i % 256]) * 40),
                "joined": moment,
            }
            for i in range(3000)
        ]
    )
    await db.orders.insert_many([{"customer": i % 50, "total": i / 3} for i in range(500)])
    await db.create_collection("empty")
    await db.users.create_index([("email", ASCENDING)], unique=True)
    await db.orders.create_index([("customer", ASCENDING), ("total", DESCENDING)])
    return name


async def test_mongodb_dump_restores_into_another_database(
    mongo_uri: str, mongo: AsyncMongoClient[dict[str, Any]]
) -> None:
    source_db = await seeded_mongo(mongo)
    target_db = f"dst_{uuid.uuid4().hex[:8]}"
    await mongo[target_db].users.insert_one({"email": "stale@example.com"})
    await mongo[target_db].untouched.insert_one({"keep": True})
    source = mongo_source(mongo_uri, source_db)

    data = b"".join(await collect(source.dump()))

    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        names = tar.getnames()
        metadata = json_util.loads(tar.extractfile(f"{source_db}/users.metadata.json").read())  # type: ignore[union-attr]
    assert names == [
        f"{source_db}/{collection}{suffix}"
        for collection in ("empty", "orders", "users")
        for suffix in (".metadata.json", ".bson")
    ]
    assert metadata["collectionName"] == "users" and metadata["type"] == "collection"
    assert ("email",) in {tuple(index["key"]) for index in metadata["indexes"]}
    assert source.info.stats == {"collections": {"empty": 0, "orders": 500, "users": 3000}}
    assert source.info.tools["pymongo"]
    assert await source.check(feed(data), source.info.stats) == "archive decodes: 3 collections, 3,500 documents"

    summary = await mongo_source(mongo_uri, target_db).restore(feed(data))

    host = mongo_uri.split("://", 1)[1].split("/", 1)[0].rpartition("@")[2]
    assert summary == f"restored 3 collections (3,500 documents) into MongoDB database {target_db} on {host}"
    for collection in ("users", "orders"):
        original = [doc async for doc in mongo[source_db][collection].find().sort("_id")]
        restored = [doc async for doc in mongo[target_db][collection].find().sort("_id")]
        assert restored == original
        before = [dict(i) async for i in await mongo[source_db][collection].list_indexes()]
        after = [dict(i) async for i in await mongo[target_db][collection].list_indexes()]
        assert index_shapes(after) == index_shapes(before) != set()
    assert "empty" in await mongo[target_db].list_collection_names()
    assert await mongo[target_db].untouched.count_documents({}) == 1
    assert await mongo[target_db].users.count_documents({"email": "stale@example.com"}) == 0


async def test_mongodb_check_detects_damage(mongo_uri: str, mongo: AsyncMongoClient[dict[str, Any]]) -> None:
    source = mongo_source(mongo_uri, await seeded_mongo(mongo), collections=["users", "orders"])
    data = b"".join(await collect(source.dump()))
    stats = source.info.stats
    assert stats == {"collections": {"users": 3000, "orders": 500}}

    with pytest.raises(BackupError, match="archive is damaged"):
        await source.check(feed(data[: len(data) // 2]), stats)
    with pytest.raises(BackupError, match="collection users has 3000 documents in the archive, its manifest says 2999"):
        await source.check(feed(data), {"collections": {"users": 2999, "orders": 500}})
    # A document's length prefix overwritten: the BSON no longer parses.
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        offset = tar.getmember(f"{source.describe().split()[2]}/users.bson").offset_data
    damaged = bytearray(data)
    damaged[offset + 200 : offset + 204] = b"\xff\xff\xff\x7f"
    with pytest.raises(BackupError, match="archive is damaged"):
        await source.check(feed(bytes(damaged)), stats)


async def test_mongodb_cancelled_dump_removes_its_temporary_files(
    mongo_uri: str, mongo: AsyncMongoClient[dict[str, Any]], private_tmp: Path
) -> None:
    stream = mongo_source(mongo_uri, await seeded_mongo(mongo)).dump()
    await anext(stream)
    assert leftovers(private_tmp) != []  # the spool directory exists while the dump runs
    await stream.aclose()
    assert leftovers(private_tmp) == []


def pymongo_tasks() -> list[asyncio.Task[Any]]:
    """Tasks of the PyMongo driver that have not finished yet."""
    return [
        task
        for task in asyncio.all_tasks()
        if not task.done() and "/pymongo/" in getattr(getattr(task.get_coro(), "cr_code", None), "co_filename", "")
    ]


# PyMongo leaks the socket of the connect attempt its monitor was making when the client closed
# (PYTHON-3923, see tests/services/test_probes_datastores.py): collect it here, where it is expected.
@pytest.mark.filterwarnings("ignore::ResourceWarning")
async def test_mongodb_unreachable_fails_without_the_password(private_tmp: Path) -> None:
    port = free_port()
    source = mongo_source(f"mongodb://me:{PASSWORD}@127.0.0.1:{port}/?authSource=admin", "app", timeout=0.5)

    assert source.describe() == f"MongoDB database app on 127.0.0.1:{port}"
    with pytest.raises(BackupError, match=r"^cannot read MongoDB database app: connection refused$") as raised:
        await collect(source.dump())
    assert PASSWORD not in str(raised.value)
    assert leftovers(private_tmp) == []
    await wait_until(lambda: not pymongo_tasks(), "PyMongo's cancelled monitor tasks finish")
    gc.collect()  # free the leaked socket here, where its warning is expected


# --- SQLite ----------------------------------------------------------------------------------------


def make_ledger(path: Path, rows: int) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("create table debit (id integer primary key, amount integer, memo blob)")
    conn.execute("create table credit (id integer primary key, amount integer)")
    conn.execute("begin")
    for i in range(rows):
        conn.execute("insert into debit (amount, memo) values (?, randomblob(600))", (i,))
        conn.execute("insert into credit (amount) values (?)", (i,))
    conn.execute("commit")
    conn.close()


class LedgerWriter:
    """The app: inserts a debit and a credit in one transaction, as fast as it can."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.commits = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, name="ledger-writer")

    def run(self) -> None:
        conn = sqlite3.connect(self.path, isolation_level=None, timeout=10)
        try:
            while not self.stop.is_set():
                conn.execute("begin immediate")
                conn.execute("insert into debit (amount, memo) values (1, randomblob(600))")
                conn.execute("insert into credit (amount) values (1)")
                conn.execute("commit")
                self.commits += 1
        finally:
            conn.close()

    def __enter__(self) -> LedgerWriter:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(10)


def counts(path: Path) -> tuple[int, int]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute("select (select count(*) from debit), (select count(*) from credit)").fetchone()  # type: ignore[no-any-return]
    finally:
        conn.close()


async def test_sqlite_dump_is_consistent_while_the_app_writes(tmp_path: Path, private_tmp: Path) -> None:
    db = tmp_path / "app.db"
    make_ledger(db, 8000)  # ~6 MB: more than one backup step
    source = SqliteSource(db, timeout=5)

    with LedgerWriter(db) as writer:
        await wait_until(lambda: writer.commits >= 50, "the app commits 50 times")
        data = b"".join(await collect(source.dump()))
        during = writer.commits
        await wait_until(lambda: writer.commits > during, "the app commits again after the dump")
    copy = tmp_path / "copy.db"
    copy.write_bytes(data)

    conn = sqlite3.connect(copy)
    assert conn.execute("pragma integrity_check").fetchall() == [("ok",)]
    conn.close()
    debit, credit = counts(copy)
    assert debit == credit  # one snapshot: never a debit without its credit
    assert debit >= 8050 and debit < counts(db)[0]  # the app kept writing
    assert source.info.stats["tables"] == {"credit": credit, "debit": debit}
    assert source.info.stats["page_count"] > 1024
    assert await source.check(feed(data), source.info.stats) == f"integrity_check ok: 2 tables, {2 * debit:,} rows"
    assert leftovers(private_tmp) == []


async def test_sqlite_restore_while_the_app_holds_a_connection(tmp_path: Path, private_tmp: Path) -> None:
    origin = tmp_path / "origin.db"
    make_ledger(origin, 300)
    source = SqliteSource(origin, timeout=5)
    data = b"".join(await collect(source.dump()))
    target = tmp_path / "live.db"
    make_ledger(target, 5)
    app = sqlite3.connect(target, isolation_level=None)
    assert app.execute("select count(*) from debit").fetchone() == (5,)

    summary = await SqliteSource(target, timeout=5).restore(feed(data))

    assert summary == f"restored 2 tables (600 rows) into {target}"
    assert app.execute("select count(*) from debit").fetchone() == (300,)  # the open connection sees it
    assert app.execute("pragma integrity_check").fetchone() == ("ok",)
    app.close()
    assert leftovers(private_tmp) == []


async def test_sqlite_check_and_restore_refuse_damaged_copies(tmp_path: Path, private_tmp: Path) -> None:
    db = tmp_path / "app.db"
    make_ledger(db, 3000)
    source = SqliteSource(db, timeout=5)
    data = b"".join(await collect(source.dump()))
    stats = source.info.stats

    with pytest.raises(BackupError, match=r"^the SQLite backup cannot be used: the file is damaged"):
        await source.check(feed(data[: len(data) // 2]), stats)
    with pytest.raises(BackupError, match=r"^the SQLite backup cannot be used: the file is not an SQLite database$"):
        await source.check(feed(os.urandom(8192)), stats)
    with pytest.raises(BackupError, match="row counts differ from its manifest"):
        await source.check(feed(data), {"tables": {"credit": 3000, "debit": 2999}})
    with pytest.raises(BackupError, match=r"^the SQLite backup cannot be used: the file is damaged"):
        await source.restore(feed(data[: len(data) // 2]))
    assert counts(db) == (3000, 3000)  # a refused copy never reaches the database
    assert leftovers(private_tmp) == []


async def test_sqlite_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(BackupError, match=r"^the SQLite database .*nope\.db does not exist$"):
        await anext(SqliteSource(tmp_path / "nope.db", timeout=5).dump())
    assert not (tmp_path / "nope.db").exists()
    with pytest.raises(BackupError, match=r"the directory .*missing does not exist"):
        await SqliteSource(tmp_path / "missing" / "app.db", timeout=5).restore(feed(b"x"))


async def test_sqlite_cancelled_dump_removes_the_copy(tmp_path: Path, private_tmp: Path) -> None:
    db = tmp_path / "app.db"
    make_ledger(db, 4000)
    stream = SqliteSource(db, timeout=5).dump()
    await anext(stream)
    assert leftovers(private_tmp) != []
    await stream.aclose()
    assert leftovers(private_tmp) == []


# --- files -----------------------------------------------------------------------------------------


def make_tree(root: Path) -> tuple[Path, Path]:
    uploads = root / "uploads"
    (uploads / "2024" / "05").mkdir(parents=True)
    (uploads / "empty").mkdir()
    (uploads / "a.txt").write_text("hello\n")
    (uploads / "2024" / "05" / "photo.bin").write_bytes(random.Random(7).randbytes(3 << 20))
    (uploads / "latest").symlink_to("2024/05/photo.bin")
    config = root / "app.yml"
    config.write_text("debug: false\n")
    return uploads, config


async def test_files_round_trip_keeps_tree_and_symlinks(tmp_path: Path) -> None:
    uploads, config = make_tree(tmp_path / "live")
    source = FilesSource([uploads, config], timeout=5)

    chunks = await collect(source.dump())
    data = b"".join(chunks)

    assert max(len(chunk) for chunk in chunks) <= CHUNK and len(chunks) > 1
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = {member.name: member for member in tar.getmembers()}
    assert members["uploads/latest"].issym() and members["uploads/latest"].linkname == "2024/05/photo.bin"
    assert "app.yml" in members and "uploads/2024/05/photo.bin" in members and "uploads/empty" in members
    assert source.info.stats == {"files": 3, "bytes": 6 + (3 << 20) + 13, "members": 8}
    assert await source.check(feed(data), source.info.stats) == "archive reads to the end: 3 files, 3.0 MB"

    other = tmp_path / "restored"
    (other / "uploads").mkdir(parents=True)
    (other / "uploads" / "a.txt").write_text("stale")
    (other / "uploads" / "extra.txt").write_text("kept")
    target = FilesSource([other / "uploads", other / "app.yml"], timeout=5)
    summary = await target.restore(feed(data))

    assert summary.startswith("restored 3 files (3.0 MB) into ")
    assert (other / "uploads" / "a.txt").read_text() == "hello\n"
    assert (other / "uploads" / "2024" / "05" / "photo.bin").read_bytes() == (
        uploads / "2024" / "05" / "photo.bin"
    ).read_bytes()
    assert os.readlink(other / "uploads" / "latest") == "2024/05/photo.bin"
    assert (other / "uploads" / "empty").is_dir()
    assert (other / "app.yml").read_text() == "debug: false\n"
    assert (other / "uploads" / "extra.txt").read_text() == "kept"


async def test_files_check_detects_damage(tmp_path: Path) -> None:
    uploads, config = make_tree(tmp_path)
    source = FilesSource([uploads, config], timeout=5)
    data = b"".join(await collect(source.dump()))
    stats = source.info.stats

    with pytest.raises(BackupError, match="archive is damaged"):
        await source.check(feed(data[: len(data) // 2]), stats)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        header = tar.getmember("uploads/a.txt").offset
    damaged = bytearray(data)
    damaged[header + 100 : header + 108] = b"garbage!"  # the mode field: the header checksum fails
    with pytest.raises(BackupError, match=r"archive is damaged: there is data after the end of the archive"):
        await source.check(feed(bytes(damaged)), stats)
    with pytest.raises(BackupError, match="holds 3 files, its manifest says 4"):
        await source.check(feed(data), {**stats, "files": 4})


def crafted_tar(*members: tuple[str, bytes | str]) -> bytes:
    """A tar with files (bytes) and symlinks (str targets)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for name, content in members:
            info = tarfile.TarInfo(name)
            if isinstance(content, str):
                info.type = tarfile.SYMTYPE
                info.linkname = content
                tar.addfile(info)
            else:
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
    return out.getvalue()


async def test_files_restore_refuses_members_outside_the_configured_paths(tmp_path: Path) -> None:
    root = tmp_path / "srv"
    (root / "uploads").mkdir(parents=True)
    (root / "other").mkdir()
    source = FilesSource([root / "uploads"], timeout=5)

    with pytest.raises(BackupError, match=r"'other/x.txt', which is not inside a configured path"):
        await source.restore(feed(crafted_tar(("other/x.txt", b"no"))))
    with pytest.raises(BackupError, match="not inside a configured path"):
        await source.restore(feed(crafted_tar(("uploads/../escape.txt", b"no"))))
    with pytest.raises(BackupError, match="outside"):
        await source.restore(feed(crafted_tar(("uploads/sneaky", "../other"), ("uploads/sneaky/x.txt", b"no"))))
    with pytest.raises(BackupError, match="restoring the files failed"):
        await source.restore(feed(crafted_tar(("uploads/abs", "/etc/passwd"))))

    assert not (root / "escape.txt").exists()
    assert list((root / "other").iterdir()) == []


async def test_files_missing_path_fails_before_any_byte(tmp_path: Path) -> None:
    (tmp_path / "here").mkdir()
    stream = FilesSource([tmp_path / "here", tmp_path / "gone"], timeout=5).dump()

    with pytest.raises(BackupError, match=r"^nothing to back up at .*gone: no such file or directory$"):
        await anext(stream)
