"""Database probes against real servers: PostgreSQL, Redis, MongoDB (nx-27017), Qdrant local, SQLite."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from pymongo import AsyncMongoClient
from qdrant_client import AsyncQdrantClient, models

from services.health import Status, Target, check_health
from services.inventory import (
    MongoComponent,
    PostgresComponent,
    QdrantComponent,
    RedisComponent,
    SqliteComponent,
)
from services.probes.mongodb import MongoProbe
from services.probes.postgres import PostgresProbe
from services.probes.qdrant import QdrantProbe, default_qdrant_client
from services.probes.redis import RedisProbe
from services.probes.sqlite import SqliteProbe
from services.redaction import Redactor
from tests.fixtures.servers import PostgresServer, free_port
from tests.fixtures.wait import wait_until

PASSWORD = "Tr0ub4dor-and-3"


def everything_said(result: Any) -> str:
    """All text a result carries: detail, facts, checks."""
    return repr(result)


# --- PostgreSQL ---------------------------------------------------------------------------------


async def test_postgres_healthy_reports_version_size_and_connections(pg_login_dsn: str) -> None:
    component = PostgresComponent(type="postgres", dsn=pg_login_dsn)

    result = await PostgresProbe().probe(component)

    assert result.status == Status.HEALTHY, result.detail
    version, size, connections = result.detail.split(" · ")
    assert version.startswith("PostgreSQL ") and version.split()[1][0].isdigit()
    assert size.endswith((" MB", " KB"))
    assert connections.endswith(("connection", "connections"))
    assert result.facts["connections"] >= 1  # type: ignore[operator]
    assert result.facts["size_bytes"] > 1_000_000  # type: ignore[operator]
    assert result.facts["database"] == pg_login_dsn.rsplit("/", 1)[1]
    assert result.facts["max_connections"] == 200


async def test_postgres_unknown_user_is_critical_and_never_shows_the_password(
    postgres_server: PostgresServer,
) -> None:
    dsn = f"postgresql://ghost:{PASSWORD}@{postgres_server.host}:{postgres_server.port}/postgres"
    component = PostgresComponent(type="postgres", dsn=dsn)

    result = await PostgresProbe().probe(component)

    assert result.status == Status.CRITICAL
    assert result.detail == 'cannot log in: role "ghost" does not exist'
    assert PASSWORD not in everything_said(result)


@pytest.mark.parametrize("in_query", [False, True], ids=["user-password", "query-password"])
async def test_postgres_wrong_password_is_a_login_problem_that_never_shows_a_password(
    postgres_server: PostgresServer, caplog: pytest.LogCaptureFixture, in_query: bool
) -> None:
    role = postgres_server.scram_role()
    database = (await postgres_server.database_with(scram=True)).rsplit("/", 1)[1]
    right_dsn = postgres_server.scram_dsn(database, in_query=in_query)
    wrong_dsn = postgres_server.scram_dsn(database, password="not-" + role.password, in_query=in_query)
    caplog.set_level(logging.DEBUG)

    right = await PostgresProbe().probe(PostgresComponent(type="postgres", dsn=right_dsn))
    # No redaction from check_health: the probe's own words must already be clean.
    report = await check_health(
        [Target("shop", "db", PostgresComponent(type="postgres", dsn=wrong_dsn))],
        lambda _: PostgresProbe(),
        deadline=10,
        redactor=Redactor(),
    )

    refused = report.items[0].result
    assert right.status == Status.HEALTHY, right.detail  # the same DSN with its own password gets in
    assert refused.status == Status.CRITICAL
    assert refused.detail == f'cannot log in: password authentication failed for user "{role.name}"'
    said = everything_said(right) + everything_said(report) + caplog.text
    assert not role.found_in(said)  # neither the right password nor the wrong one (it contains it)


async def test_postgres_missing_database_is_named(postgres_server: PostgresServer) -> None:
    component = PostgresComponent(type="postgres", dsn=postgres_server.dsn("no_such_db", password=PASSWORD))

    result = await PostgresProbe().probe(component)

    assert result.status == Status.CRITICAL
    assert result.detail == 'database not found: database "no_such_db" does not exist'
    assert PASSWORD not in everything_said(result)


async def test_postgres_closed_port_is_connection_refused_without_the_password() -> None:
    component = PostgresComponent(type="postgres", dsn=f"postgresql://app:{PASSWORD}@127.0.0.1:{free_port()}/app")

    # No redaction from check_health: the probe's own words must already be clean.
    report = await check_health(
        [Target("shop", "db", component)], lambda _: PostgresProbe(), deadline=10, redactor=Redactor()
    )

    result = report.items[0].result
    assert result.status == Status.CRITICAL
    assert result.detail == "connection refused"
    assert PASSWORD not in everything_said(result)


async def test_postgres_malformed_dsn_does_not_echo_it() -> None:
    component = PostgresComponent(type="postgres", dsn=f"postgresql://app:{PASSWORD}@127.0.0.1:notaport/app")

    result = await PostgresProbe().probe(component)

    assert result.status == Status.CRITICAL
    assert result.detail.startswith("the connection string is not valid")
    assert PASSWORD not in everything_said(result)


# --- Redis --------------------------------------------------------------------------------------


@pytest.fixture
async def redis_admin(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """A client for CONFIG SET; puts maxmemory back as it was."""
    client = aioredis.from_url(redis_url)
    original = (await client.config_get("maxmemory"))["maxmemory"]
    yield client
    await client.config_set("maxmemory", original)
    await client.aclose()


async def test_redis_healthy_without_maxmemory(redis_url: str, redis_admin: aioredis.Redis) -> None:
    await redis_admin.config_set("maxmemory", 0)
    component = RedisComponent(type="redis", url=redis_url)

    result = await RedisProbe().probe(component)

    assert result.status == Status.HEALTHY, result.detail
    assert result.detail.startswith("Redis ")
    assert "no maxmemory set" in result.detail
    assert result.detail.endswith(("client", "clients"))
    assert result.facts["connected_clients"] >= 2  # type: ignore[operator]  # the probe and redis_admin
    assert result.facts["maxmemory_bytes"] == 0


async def test_redis_memory_over_the_warning_threshold(redis_url: str, redis_admin: aioredis.Redis) -> None:
    used = int((await redis_admin.info("memory"))["used_memory"])
    await redis_admin.config_set("maxmemory", used * 3 // 2)  # about 67 % used
    component = RedisComponent(type="redis", url=redis_url, memory_warning_pct=50, memory_critical_pct=99)

    result = await RedisProbe().probe(component)

    assert result.status == Status.WARNING, result.detail
    assert "at or over 50 %" in result.detail
    assert 50 <= result.facts["memory_used_pct"] < 99  # type: ignore[operator]


async def test_redis_memory_over_the_critical_threshold(redis_url: str, redis_admin: aioredis.Redis) -> None:
    used = int((await redis_admin.info("memory"))["used_memory"])
    await redis_admin.config_set("maxmemory", used)
    component = RedisComponent(type="redis", url=redis_url, memory_warning_pct=50, memory_critical_pct=90)

    result = await RedisProbe().probe(component)

    assert result.status == Status.CRITICAL, result.detail
    assert "at or over 90 %" in result.detail


async def test_redis_refused_is_critical_without_the_password() -> None:
    component = RedisComponent(type="redis", url=f"redis://:{PASSWORD}@127.0.0.1:{free_port()}/0")

    result = await RedisProbe().probe(component)

    assert result.status == Status.CRITICAL
    assert result.detail == "connection refused"
    assert PASSWORD not in everything_said(result)


async def test_redis_wrong_password_is_a_login_problem(redis_url: str, redis_admin: aioredis.Redis) -> None:
    user = f"probe_{uuid.uuid4().hex[:6]}"
    await redis_admin.acl_setuser(user, enabled=True, passwords=[f"+{PASSWORD}"], keys=["*"], commands=["+@all"])
    host_port_db = redis_url.removeprefix("redis://")
    try:
        right = await RedisProbe().probe(RedisComponent(type="redis", url=f"redis://{user}:{PASSWORD}@{host_port_db}"))
        wrong = await RedisProbe().probe(
            RedisComponent(type="redis", url=f"redis://{user}:nope-{PASSWORD}@{host_port_db}")
        )
    finally:
        await redis_admin.acl_deluser(user)

    assert right.status == Status.HEALTHY, right.detail
    assert wrong.status == Status.CRITICAL
    assert wrong.detail == "cannot log in: wrong password or user"
    assert PASSWORD not in everything_said(right) + everything_said(wrong)


# --- MongoDB ------------------------------------------------------------------------------------


async def test_mongodb_healthy_with_collection_counts(mongo_uri: str) -> None:
    database = f"probe_{uuid.uuid4().hex[:8]}"
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(mongo_uri)
    await client[database]["users"].insert_many([{"name": n} for n in ("ann", "bo", "cy")])
    await client[database]["workboards"].insert_many([{"n": 1}, {"n": 2}])
    await client.close()
    component = MongoComponent(
        type="mongodb", uri=mongo_uri, database=database, collections=["users", "workboards", "empty"]
    )

    result = await MongoProbe().probe(component)

    assert result.status == Status.HEALTHY, result.detail
    assert result.detail.startswith("MongoDB ")
    assert result.detail.endswith(" · users 3 · workboards 2 · empty 0")
    assert result.facts["count.users"] == 3
    assert result.facts["count.workboards"] == 2
    assert result.facts["version"] != "?"


async def test_mongodb_without_collections_still_pings(mongo_uri: str) -> None:
    component = MongoComponent(type="mongodb", uri=mongo_uri, database="admin")

    result = await MongoProbe().probe(component)

    assert result.status == Status.HEALTHY
    assert result.detail.endswith(" · ping ok")


def pymongo_tasks() -> list[asyncio.Task[Any]]:
    """Tasks of the PyMongo driver that have not finished yet."""
    return [
        task
        for task in asyncio.all_tasks()
        if not task.done() and "/pymongo/" in getattr(getattr(task.get_coro(), "cr_code", None), "co_filename", "")
    ]


# PyMongo leaks the socket of a connect attempt its monitor was making when the client closed
# (the CancelledError skips the driver's sock.close(); PYTHON-3923). The fd is freed by the GC;
# collect it here, where that ResourceWarning is expected, rather than in a later test.
@pytest.mark.filterwarnings("ignore::ResourceWarning")
async def test_mongodb_refused_is_critical_within_its_timeout() -> None:
    uri = f"mongodb://app:{PASSWORD}@127.0.0.1:{free_port()}/?authSource=admin"
    component = MongoComponent(type="mongodb", uri=uri, database="app", timeout=2)

    started = time.perf_counter()
    report = await check_health(
        [Target("vcc", "mongo", component)], lambda _: MongoProbe(), deadline=10, redactor=Redactor()
    )

    result = report.items[0].result
    assert result.status == Status.CRITICAL
    assert result.detail == "connection refused"
    assert PASSWORD not in everything_said(result)
    assert time.perf_counter() - started < 2.0
    await wait_until(lambda: not pymongo_tasks(), "PyMongo's cancelled monitor tasks finish")
    gc.collect()


# --- Qdrant (local mode; no server binary here) --------------------------------------------------


@pytest.fixture
async def qdrant_memory() -> AsyncIterator[AsyncQdrantClient]:
    client = AsyncQdrantClient(location=":memory:")
    await client.create_collection(
        "youtube_content", vectors_config=models.VectorParams(size=4, distance=models.Distance.COSINE)
    )
    await client.upsert(
        "youtube_content",
        points=[models.PointStruct(id=i, vector=[0.1 * i, 0.2, 0.3, 0.4]) for i in range(1, 4)],
    )
    yield client
    await client.close()


def qdrant(collections: list[str], **fields: Any) -> QdrantComponent:
    location = fields.pop("path", None)
    where = {"path": location} if location is not None else {"url": "http://qdrant.invalid:6333"}
    return QdrantComponent.model_validate({"type": "qdrant", "collections": collections, **where, **fields})


async def test_qdrant_green_collection_is_healthy(qdrant_memory: AsyncQdrantClient) -> None:
    probe = QdrantProbe(lambda _: qdrant_memory)

    result = await probe.probe(qdrant(["youtube_content"]))

    assert result.status == Status.HEALTHY, result.detail
    assert result.detail == "youtube_content green · 3 points"
    assert result.facts == {"status.youtube_content": "green", "points.youtube_content": 3}
    # An injected client belongs to its maker and is left open.
    assert (await qdrant_memory.count("youtube_content")).count == 3


async def test_qdrant_missing_collection_is_critical(qdrant_memory: AsyncQdrantClient) -> None:
    probe = QdrantProbe(lambda _: qdrant_memory)

    result = await probe.probe(qdrant(["youtube_content", "transcripts"]))

    assert result.status == Status.CRITICAL
    assert result.detail == "transcripts missing · youtube_content green · 3 points"
    checks = {c.name: c for c in result.checks}
    assert checks["transcripts"].status == Status.CRITICAL
    assert checks["youtube_content"].status == Status.HEALTHY
    assert result.facts["status.transcripts"] == "missing"


async def test_qdrant_default_factory_opens_local_storage_and_closes_it(tmp_path: Path) -> None:
    storage = tmp_path / "qdrant"
    seed = AsyncQdrantClient(path=str(storage))
    await seed.create_collection("videos", vectors_config=models.VectorParams(size=2, distance=models.Distance.DOT))
    await seed.close()
    component = qdrant(["videos"], path=storage)

    first = await QdrantProbe().probe(component)
    second = await QdrantProbe().probe(component)  # the first probe released the storage lock

    assert first.status == Status.HEALTHY, first.detail
    assert first.detail == "videos green · 0 points"
    assert second.status == Status.HEALTHY, second.detail


async def test_qdrant_default_factory_reports_a_refused_server() -> None:
    component = QdrantComponent(type="qdrant", url=f"http://127.0.0.1:{free_port()}", collections=["a", "b"], timeout=3)

    result = await QdrantProbe().probe(component)

    assert result.status == Status.CRITICAL
    assert result.detail == "connection refused"


def test_default_qdrant_client_uses_url_and_key() -> None:
    component = QdrantComponent(
        type="qdrant", url="https://qdrant.example.com:6333", api_key="k-123456", collections=["a"], timeout=2.5
    )

    client = default_qdrant_client(component)

    assert client.init_options["url"] == "https://qdrant.example.com:6333"
    assert client.init_options["api_key"] == "k-123456"
    assert client.init_options["timeout"] == 2
    assert client.init_options["check_compatibility"] is False


# --- SQLite -------------------------------------------------------------------------------------


def make_sqlite(path: Path, *, wal: bool, rows: int = 10) -> None:
    conn = sqlite3.connect(path)
    try:
        if wal:
            conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("create table orders (id integer primary key, note text)")
        conn.executemany("insert into orders (note) values (?)", [("x" * 200,) for _ in range(rows)])
        conn.commit()
    finally:
        conn.close()


async def test_sqlite_healthy_wal_file(tmp_path: Path) -> None:
    db = tmp_path / "ecommerce.db"
    make_sqlite(db, wal=True)

    result = await SqliteProbe().probe(SqliteComponent(type="sqlite", path=db))

    assert result.status == Status.HEALTHY, result.detail
    assert result.detail.startswith("SQLite · ")
    assert result.detail.endswith(" · WAL · quick_check ok")
    assert result.facts["journal_mode"] == "wal"
    assert result.facts["size_bytes"] == db.stat().st_size


async def test_sqlite_not_wal_is_only_mentioned(tmp_path: Path) -> None:
    db = tmp_path / "legacy.db"
    make_sqlite(db, wal=False)

    result = await SqliteProbe().probe(SqliteComponent(type="sqlite", path=db))

    assert result.status == Status.HEALTHY
    assert "journal mode delete (not WAL)" in result.detail


async def test_sqlite_missing_file_is_critical_and_not_created(tmp_path: Path) -> None:
    db = tmp_path / "gone.db"

    result = await SqliteProbe().probe(SqliteComponent(type="sqlite", path=db))

    assert result.status == Status.CRITICAL
    assert result.detail == f"file not found: {db}"
    assert not db.exists()
    assert not any(tmp_path.iterdir())  # noqa: ASYNC240  # nor any -wal/-shm companion


async def test_sqlite_garbage_file_is_critical(tmp_path: Path) -> None:
    db = tmp_path / "garbage.db"
    db.write_bytes(os.urandom(8192))

    result = await SqliteProbe().probe(SqliteComponent(type="sqlite", path=db))

    assert result.status == Status.CRITICAL
    assert result.detail.startswith("not a valid SQLite database (file is not a database)")


async def test_sqlite_corrupt_pages_are_critical(tmp_path: Path) -> None:
    db = tmp_path / "corrupt.db"
    make_sqlite(db, wal=False, rows=500)
    data = bytearray(db.read_bytes())
    page = 4096
    data[page : page * 3] = b"\xff" * (page * 2)  # wipe the table's first pages, keep the header
    db.write_bytes(bytes(data))

    result = await SqliteProbe().probe(SqliteComponent(type="sqlite", path=db))

    assert result.status == Status.CRITICAL
    assert result.detail.startswith(("quick_check failed: ", "database is corrupt")), result.detail


async def test_sqlite_directory_is_not_a_database(tmp_path: Path) -> None:
    result = await SqliteProbe().probe(SqliteComponent(type="sqlite", path=tmp_path))

    assert result.status == Status.CRITICAL
    assert result.detail.startswith("is a directory")


async def test_sqlite_check_of_a_big_database_is_interrupted_at_its_deadline(tmp_path: Path) -> None:
    path = tmp_path / "big.sqlite3"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, a TEXT, b TEXT)")
        db.execute("CREATE INDEX t_a ON t (a)")
        db.executemany("INSERT INTO t (a, b) VALUES (?, ?)", ((f"{i:08d}" * 4, "x" * 200) for i in range(150_000)))
    started = time.perf_counter()
    result = await SqliteProbe().probe(SqliteComponent(type="sqlite", path=path, timeout=0.02))
    elapsed = time.perf_counter() - started
    assert result.status is Status.CRITICAL
    assert result.detail == "quick_check did not finish within 0.018 s"
    assert elapsed < 1.0  # the worker thread stopped; nothing kept checking in the background
