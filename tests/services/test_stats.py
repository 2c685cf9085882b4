"""services/stats.py on real servers: PostgreSQL, Redis, Qdrant over REST (the fake), MongoDB (nx-27017
for the collStats path, RawMongo for MongoDB 7's $collStats answer), and components that are down or hang."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis
from bson import decode, encode
from bson.raw_bson import RawBSONDocument
from pydantic import TypeAdapter
from pymongo import AsyncMongoClient
from qdrant_client import AsyncQdrantClient, models

from bot.logging import configure_logging
from services import stats as stats_module
from services.errors import CommandError, InventoryError
from services.health import Status
from services.inventory import Component, RedisComponent, parse_inventory
from services.redaction import Redactor
from services.stats import (
    MongoStats,
    PostgresStats,
    QdrantStats,
    RedisStats,
    StatsLimits,
    read_stats,
    stats_components,
)
from tests.fixtures.qdrant import FakeQdrant
from tests.fixtures.raw_mongo import RawMongo, id_index
from tests.fixtures.servers import PostgresServer, free_port
from tests.fixtures.wait import wait_until

pytestmark = pytest.mark.filterwarnings("ignore:Api key is used with an insecure connection:UserWarning")

COMPONENT: TypeAdapter[Component] = TypeAdapter(Component)
PASSWORD = "s3cret-Pa55word"


def spec(**fields: Any) -> Component:
    return COMPONENT.validate_python(fields)


async def one(name: str, component: Component, limits: StatsLimits | None = None) -> Any:
    """Read one component; its data (or a failed assertion showing the problem)."""
    report = await read_stats("svc", {name: component}, redactor=Redactor([PASSWORD]), limits=limits)
    [item] = report.components
    assert item.problem is None, item.problem
    return item.data


async def problem_of(component: Component) -> str:
    report = await read_stats("svc", {"it": component}, redactor=Redactor([PASSWORD]))
    [item] = report.components
    assert item.data is None and item.problem is not None
    assert PASSWORD not in item.problem
    return item.problem


# -- which components ----------------------------------------------------------------------------------


def test_components_without_stats_are_set_aside_and_bad_names_are_one_sentence() -> None:
    components = {
        "web": spec(type="http", url="http://127.0.0.1:1"),
        "db": spec(type="postgres", dsn="postgresql://u@127.0.0.1:1/db"),
        "cache": spec(type="redis", url="redis://127.0.0.1:1/0"),
    }
    found, skipped = stats_components("svc", components)
    assert list(found) == ["db", "cache"] and skipped == [("web", "http")]
    assert list(stats_components("svc", components, "cache")[0]) == ["cache"]
    with pytest.raises(CommandError, match=r"^`svc` has no component called `nope`; its components are `web`"):
        stats_components("svc", components, "nope")
    with pytest.raises(CommandError, match=r"`svc/web` is a http component: stats cover PostgreSQL, Qdrant"):
        stats_components("svc", components, "web")
    with pytest.raises(CommandError, match=r"^`svc` has no component with stats"):
        stats_components("svc", {"web": components["web"]})
    with pytest.raises(CommandError) as caught:
        stats_components("svc", components, "<!channel>`x")
    assert "<!channel>" not in caught.value.message and "&lt;!channel&gt;'x" in caught.value.message


# -- PostgreSQL ----------------------------------------------------------------------------------------


async def sizes(dsn: str, *tables: str) -> dict[str, tuple[int, int, int]]:
    """(table, index, total) bytes of each table, as PostgreSQL reports them."""
    query = "select pg_table_size($1::regclass), pg_indexes_size($1::regclass), pg_total_relation_size($1::regclass)"
    conn = await asyncpg.connect(dsn)
    try:
        found = {}
        for name in tables:
            table_bytes, index_bytes, total_bytes = await conn.fetchrow(query, name)
            found[name] = (int(table_bytes), int(index_bytes), int(total_bytes))
        return found
    finally:
        await conn.close()


async def test_postgres_tables_rows_sizes_and_database_size(postgres_server: PostgresServer) -> None:
    dsn = await postgres_server.database_with(
        "create table chunks (id bigint primary key, body text)",
        "insert into chunks select g, repeat('x', 500) from generate_series(1, 2000) g",
        "create schema ops",
        "create table ops.jobs (id int primary key, status text)",
        "insert into ops.jobs select g, 'pending' from generate_series(1, 40) g",
        "create table empty_one (id int)",
        "analyze chunks",
        "analyze ops.jobs",
        password=PASSWORD,
    )
    data = await one("db", spec(type="postgres", dsn=dsn, timeout=5))
    assert isinstance(data, PostgresStats)
    expected = await sizes(dsn, "chunks", "ops.jobs", "empty_one")
    by_name = {f"{t.schema}.{t.name}": t for t in data.tables}
    assert list(by_name) == ["public.chunks", "ops.jobs", "public.empty_one"]  # largest first
    chunks, jobs = by_name["public.chunks"], by_name["ops.jobs"]
    assert (chunks.rows, chunks.rows_from) == (2000, "reltuples")
    assert (jobs.rows, jobs.rows_from) == (40, "reltuples")
    # Autovacuum may add a table's free-space or visibility map fork (8 KB pages) between the two reads.
    for found, (table, index, total) in ((chunks, expected["chunks"]), (jobs, expected["ops.jobs"])):
        assert found.index_bytes == index
        assert 0 <= table - found.table_bytes <= 4 * 8192 and table - found.table_bytes == total - found.total_bytes
    assert chunks.index_bytes > 0 and chunks.total_bytes > chunks.table_bytes
    conn = await asyncpg.connect(dsn)
    try:
        name, size = await conn.fetchrow("select current_database(), pg_database_size(current_database())")
    finally:
        await conn.close()
    assert data.database == name and abs(data.database_bytes - size) < 1024 * 1024
    assert data.table_count == 3 and data.others_bytes == 0


async def test_a_never_analysed_table_is_estimated_from_the_statistics_collector(
    postgres_server: PostgresServer,
) -> None:
    dsn = await postgres_server.database_with(
        "create table fresh (id int)", "insert into fresh select generate_series(1, 30)"
    )
    conn = await asyncpg.connect(dsn)
    try:
        # The inserting session flushes its counts when it ends, a moment after its client has gone.
        await wait_until(
            lambda: conn.fetchval("select n_live_tup from pg_stat_user_tables where relname = 'fresh'"),
            "the statistics collector counts the inserted rows",
        )
        assert await conn.fetchval("select reltuples from pg_class where relname = 'fresh'") == -1
    finally:
        await conn.close()
    data = await one("db", spec(type="postgres", dsn=dsn, timeout=5))
    [fresh] = data.tables
    assert (fresh.rows, fresh.rows_from) == (30, "n_live_tup")


async def test_only_the_largest_tables_are_listed_and_the_rest_are_summed(postgres_server: PostgresServer) -> None:
    statements = []
    for i, rows in enumerate((10, 4000, 300, 2000, 1)):
        statements += [
            f"create table t{i} (v text)",
            f"insert into t{i} select repeat('y', 200) from generate_series(1, {rows})",
        ]
    dsn = await postgres_server.database_with(*statements)
    data = await one("db", spec(type="postgres", dsn=dsn, timeout=5), StatsLimits(top=2))
    assert [t.name for t in data.tables] == ["t1", "t3"]
    rest = await sizes(dsn, "t0", "t2", "t4")
    assert data.table_count == 5 and data.others_bytes == sum(total for _, _, total in rest.values())


async def test_postgres_refusing_or_refusing_the_login_is_one_phrase_without_the_password(
    postgres_server: PostgresServer,
) -> None:
    down = f"postgresql://postgres:{PASSWORD}@127.0.0.1:{free_port()}/postgres"
    assert await problem_of(spec(type="postgres", dsn=down, timeout=3)) == "connection refused"
    wrong = postgres_server.scram_dsn(password=PASSWORD)
    problem = await problem_of(spec(type="postgres", dsn=wrong, timeout=3))
    assert problem.startswith("cannot log in: ") and "password authentication failed" in problem
    missing = postgres_server.dsn("no_such_database_here", password=PASSWORD)
    assert (await problem_of(spec(type="postgres", dsn=missing, timeout=3))).startswith("database not found")


async def test_a_locked_table_stops_the_size_query_within_the_timeout(postgres_server: PostgresServer) -> None:
    dsn = await postgres_server.database_with("create table busy (id int)")
    holder = await asyncpg.connect(dsn)
    try:
        await holder.execute("begin; lock table busy in access exclusive mode")
        started = time.monotonic()
        problem = await problem_of(spec(type="postgres", dsn=dsn, timeout=2))
        elapsed = time.monotonic() - started
    finally:
        await holder.close()
    assert problem == "the size query did not finish within 1.6 s (is a table locked?)"
    assert elapsed < 2.5


# -- Redis ---------------------------------------------------------------------------------------------


async def seed_keys(url: str, **counts: int) -> None:
    client = aioredis.from_url(url)
    try:
        for prefix, count in counts.items():
            await client.mset({f"{prefix.replace('_', ':')}{i}": "v" for i in range(count)})
    finally:
        await client.aclose()


async def test_redis_memory_and_keys_per_prefix_from_a_full_scan(redis_url: str) -> None:
    await seed_keys(redis_url, cache_=30, yt_job_=12, misc_=5)
    component = spec(type="redis", url=redis_url, key_prefixes=["cache:", "yt:", "yt:job:", "none:"])
    data = await one("cache", component)
    assert isinstance(data, RedisStats)
    assert [(p.prefix, p.keys) for p in data.prefixes] == [("cache:", 30), ("yt:", 12), ("yt:job:", 12), ("none:", 0)]
    assert data.other_keys == 5 and data.scanned == 47 and data.db_keys == 47 and data.db == 0
    assert data.complete and data.stopped is None
    client = aioredis.from_url(redis_url)
    try:
        memory = await client.info("memory")
    finally:
        await client.aclose()
    assert data.used_memory > 0 and data.max_memory == int(memory["maxmemory"])
    assert data.peak_memory is not None and data.peak_memory >= int(memory["used_memory"]) // 2


async def test_the_scan_stops_at_its_call_bound_and_says_the_counts_are_lower_bounds(redis_url: str) -> None:
    await seed_keys(redis_url, cache_=300)
    component = spec(type="redis", url=redis_url, key_prefixes=["cache:"])
    data = await one("cache", component, StatsLimits(scan_calls=2, scan_count=10))
    assert not data.complete and data.stopped == "the SCAN stopped after 2 calls"
    assert 0 < data.prefixes[0].keys < 300 and data.scanned == data.prefixes[0].keys
    assert data.db_keys == 300


async def test_the_scan_stops_at_its_time_bound(redis_url: str) -> None:
    await seed_keys(redis_url, cache_=300)
    component = spec(type="redis", url=redis_url, key_prefixes=["cache:"])
    data = await one("cache", component, StatsLimits(scan_share=0.0, scan_count=10))
    assert not data.complete and data.stopped is not None and data.stopped.startswith("the SCAN stopped after ")
    assert data.stopped.endswith(" s") and data.scanned < 300


async def test_without_declared_prefixes_nothing_is_scanned(redis_url: str) -> None:
    await seed_keys(redis_url, a_=3)
    data = await one("cache", spec(type="redis", url=redis_url))
    assert data.prefixes == [] and data.scanned == 0 and data.db_keys == 3 and data.complete


@contextlib.asynccontextmanager
async def silent_server() -> AsyncIterator[int]:
    """A TCP server that accepts connections and never answers: a hung component."""
    held: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for writer in held:
            writer.close()
        await server.wait_closed()


async def test_redis_down_or_hanging_is_one_phrase_and_does_not_hold_the_others(
    redis_url: str, postgres_server: PostgresServer
) -> None:
    down = f"redis://:{PASSWORD}@127.0.0.1:{free_port()}/0"
    assert await problem_of(spec(type="redis", url=down, timeout=2)) == "connection refused"
    assert await problem_of(spec(type="redis", url="redis://127.0.0.1:notaport/0")) == (
        "the Redis URL is not valid (ValueError)"
    )
    dsn = await postgres_server.database_with("create table t (id int)")
    async with silent_server() as port:
        components = {
            "hung": spec(type="redis", url=f"redis://:{PASSWORD}@127.0.0.1:{port}/0", timeout=1),
            "db": spec(type="postgres", dsn=dsn, timeout=5),
            "cache": spec(type="redis", url=redis_url, key_prefixes=["a:"]),
        }
        started = time.monotonic()
        report = await read_stats("svc", components, redactor=Redactor())
        elapsed = time.monotonic() - started
    hung, db, cache = report.components
    assert hung.problem == "no answer within 0.8 s" and PASSWORD not in hung.problem
    assert isinstance(db.data, PostgresStats) and [t.name for t in db.data.tables] == ["t"]
    assert isinstance(cache.data, RedisStats)
    assert report.unreadable == [hung] and elapsed < 3


# -- Qdrant over REST ----------------------------------------------------------------------------------


async def seed_qdrant(fake: FakeQdrant) -> None:
    client = fake.client()
    try:
        await client.create_collection(
            "docs", vectors_config=models.VectorParams(size=4, distance=models.Distance.COSINE)
        )
        await client.upsert("docs", [models.PointStruct(id=i, vector=[0.1 * i, 0.2, 0.3, 0.4]) for i in range(1, 8)])
        await client.create_collection(
            "multi",
            vectors_config={
                "text": models.VectorParams(size=8, distance=models.Distance.DOT),
                "image": models.VectorParams(size=4, distance=models.Distance.EUCLID, on_disk=True),
            },
            sparse_vectors_config={"bm25": models.SparseVectorParams()},
        )
    finally:
        await client.close()


async def test_qdrant_collections_points_segments_vectors_and_status(fake_qdrant: FakeQdrant) -> None:
    await seed_qdrant(fake_qdrant)
    fake_qdrant.set_status("multi", "yellow")
    fake_qdrant.clear_requests()
    component = spec(type="qdrant", url=fake_qdrant.url, collections=["docs", "multi", "gone"], timeout=3)
    data = await one("vectors", component)
    assert isinstance(data, QdrantStats)
    docs, multi, gone = data.collections
    assert (docs.status, docs.level, docs.points, docs.problem) == ("green", Status.HEALTHY, 7, None)
    assert docs.segments is not None and docs.segments >= 1
    assert [(v.name, v.size, v.distance) for v in docs.vectors] == [("", 4, "Cosine")]
    assert (multi.status, multi.level, multi.points) == ("yellow", Status.WARNING, 0)
    assert [(v.name, v.size, v.distance, v.on_disk) for v in multi.vectors] == [
        ("image", 4, "Euclid", True),
        ("text", 8, "Dot", False),
        ("bm25", None, "sparse", False),
    ]
    assert gone.problem == "missing" and gone.points is None
    assert {r.path for r in fake_qdrant.requests_to("/collections/*", "GET")} == {
        "/collections/docs", "/collections/multi", "/collections/gone",
    }  # fmt: skip


async def test_qdrant_failures_per_collection_and_for_the_whole_server(fake_qdrant: FakeQdrant) -> None:
    await seed_qdrant(fake_qdrant)
    fake_qdrant.fail(500, path="/collections/multi")
    component = spec(type="qdrant", url=fake_qdrant.url, collections=["docs", "multi"], timeout=3)
    docs, multi = (await one("vectors", component)).collections
    assert docs.points == 7 and multi.problem == "Qdrant answered 500 Internal Server Error"

    fake_qdrant.require_api_key("the-right-key")
    keyed = spec(type="qdrant", url=fake_qdrant.url, api_key=PASSWORD, collections=["docs", "multi"], timeout=3)
    assert await problem_of(keyed) == "cannot log in: the API key was refused"
    assert {r.api_key for r in fake_qdrant.requests_to("/collections/*")} >= {PASSWORD}

    fake_qdrant.hang(path="/collections/*")
    started = time.monotonic()
    hung = spec(type="qdrant", url=fake_qdrant.url, collections=["docs", "multi"], timeout=1)
    assert await problem_of(hung) == "no answer within 0.8 s"
    assert time.monotonic() - started < 2
    fake_qdrant.release()

    down = spec(type="qdrant", url=f"http://127.0.0.1:{free_port()}", collections=["docs"], timeout=2)
    assert await problem_of(down) == "connection refused"


async def test_qdrant_in_local_mode_is_read_from_its_directory(tmp_path: Path) -> None:
    seeding = AsyncQdrantClient(path=str(tmp_path))
    try:
        await seeding.create_collection(
            "notes", vectors_config=models.VectorParams(size=2, distance=models.Distance.DOT)
        )
        await seeding.upsert("notes", [models.PointStruct(id=i, vector=[1.0, 0.5]) for i in range(1, 4)])
    finally:
        await seeding.close()
    data = await one("vectors", spec(type="qdrant", path=str(tmp_path), collections=["notes"]))
    [notes] = data.collections
    assert (notes.status, notes.points, [(v.size, v.distance) for v in notes.vectors]) == ("green", 3, [(2, "Dot")])


# -- MongoDB -------------------------------------------------------------------------------------------


async def test_mongodb_collections_counts_sizes_and_indexes_on_the_test_server(mongo_uri: str) -> None:
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(mongo_uri)
    try:
        db = client["vcc_stats"]
        await db.drop_collection("users")
        await db.drop_collection("workboards")
        await db.users.insert_many([{"n": i, "pad": "x" * 300} for i in range(60)])
        await db.users.create_index("n")
        await db.workboards.insert_many([{"n": i} for i in range(5)])
        expected = await db.command("collStats", "users")
    finally:
        await client.close()
    declared = spec(type="mongodb", uri=mongo_uri, database="vcc_stats", collections=["users", "workboards", "gone"])
    data = await one("mongo", declared)
    assert isinstance(data, MongoStats)
    gone, users, workboards = data.collections  # problems first, then the largest
    assert gone.problem == "missing (no such collection)"
    assert (users.name, users.count, users.index_count) == ("users", 60, 2)
    assert users.size_bytes == expected["size"] and users.storage_bytes == expected["storageSize"]
    assert (workboards.count, workboards.index_count) == (5, 1)
    assert data.collection_count == 3 and data.others == 0 and data.unread == 0
    assert data.data_bytes is not None and data.data_bytes > 0  # the server answers dbStats

    every = spec(type="mongodb", uri=mongo_uri, database="vcc_stats")
    data = await one("mongo", every, StatsLimits(top=1))
    assert [c.name for c in data.collections] == ["users"] and data.collection_count == 2
    assert data.others == 1 and data.others_bytes > 0
    data = await one("mongo", every, StatsLimits(mongo_read=1))
    assert data.unread == 1 and [c.name for c in data.collections] == ["users"]


class MongoSeven(RawMongo):
    """RawMongo answering $collStats with storageStats as a sharded MongoDB 7 does (one document per
    shard), and dbStats; it has no collStats command, so the aggregation must be what is read."""

    def _aggregate(self, database: str, body: RawBSONDocument, documents: list[bytes]) -> dict[str, Any]:
        name = body["aggregate"]
        shards = [
            {"ns": f"{database}.{name}", "shard": "s0", "storageStats": {
                "size": 1000, "count": 10, "storageSize": 4096, "nindexes": 3, "totalIndexSize": 8192,
                "indexSizes": {"_id_": 4096, "n_1": 2048, "t_1": 2048}, "scaleFactor": 1}},
            {"ns": f"{database}.{name}", "shard": "s1", "storageStats": {
                "size": 500, "count": 5, "storageSize": 4096, "nindexes": 3, "totalIndexSize": 4096,
                "indexSizes": {"_id_": 2048, "n_1": 1024, "t_1": 1024}, "scaleFactor": 1}},
        ]  # fmt: skip
        return self._cursor(f"{database}.{name}", [encode(s) for s in shards], None, True)

    def _dbStats(self, database: str, body: RawBSONDocument, documents: list[bytes]) -> dict[str, Any]:
        return {"db": database, "dataSize": 1500, "storageSize": 8192, "indexSize": 12288, "ok": 1.0}


async def test_collstats_aggregation_is_read_and_summed_over_shards() -> None:
    server = MongoSeven()
    await server.start()
    try:
        server.seed("app", "events", indexes=[id_index()])
        data = await one("mongo", spec(type="mongodb", uri=server.uri, database="app", collections=["events"]))
    finally:
        await server.stop()
    [events] = data.collections
    assert (events.count, events.size_bytes, events.storage_bytes) == (15, 1500, 8192)
    assert (events.index_count, events.index_bytes) == (3, 12288)
    assert (data.data_bytes, data.storage_bytes, data.index_bytes) == (1500, 8192, 12288)
    [aggregate] = [c for c in server.commands("app") if c.name == "aggregate"]
    assert decode(aggregate.body.raw)["pipeline"][0] == {"$collStats": {"storageStats": {}}}


async def test_a_server_without_collection_statistics_says_so_per_collection(raw_mongo: RawMongo) -> None:
    raw_mongo.seed("app", "events")
    data = await one("mongo", spec(type="mongodb", uri=raw_mongo.uri, database="app"))
    [events] = data.collections
    assert events.problem is not None and events.problem.startswith("no collection statistics: ")
    assert "no such command: 'collStats'" in events.problem
    assert data.data_bytes is None  # no dbStats either: the totals are left out, the rest is shown


def pymongo_tasks() -> list[asyncio.Task[Any]]:
    """Tasks of the PyMongo driver that have not finished yet."""
    return [
        task
        for task in asyncio.all_tasks()
        if not task.done() and "/pymongo/" in getattr(getattr(task.get_coro(), "cr_code", None), "co_filename", "")
    ]


# PyMongo leaks the socket of a connect attempt its monitor was making when the client closed
# (PYTHON-3923, see tests/services/test_probes_datastores.py): collected here, where it is expected.
@pytest.mark.filterwarnings("ignore::ResourceWarning")
async def test_mongodb_down_is_one_phrase_without_the_password() -> None:
    down = spec(type="mongodb", uri=f"mongodb://u:{PASSWORD}@127.0.0.1:{free_port()}/", database="x", timeout=2)
    started = time.monotonic()
    assert await problem_of(down) == "connection refused"
    assert time.monotonic() - started < 2.5
    await wait_until(lambda: not pymongo_tasks(), "PyMongo's cancelled monitor tasks finish")
    gc.collect()


@pytest.fixture
def logs(capfd: pytest.CaptureFixture[str]) -> Callable[[], str]:
    """Everything logged during the test, as JSON, through a redactor that knows the test's password (as
    the bot's knows the inventory's secrets)."""
    configure_logging("json", "DEBUG", Redactor([PASSWORD]))
    capfd.readouterr()
    return lambda: "".join(capfd.readouterr())


async def test_a_component_that_fails_unexpectedly_is_a_line_the_others_are_shown_and_it_is_logged(
    redis_url: str, monkeypatch: pytest.MonkeyPatch, logs: Callable[[], str]
) -> None:
    async def broken(spec: Component, redactor: Redactor, limits: StatsLimits) -> None:
        raise KeyError(f"a bug near {PASSWORD}")

    monkeypatch.setitem(stats_module._READERS, "postgres", broken)
    components = {
        "db": spec(type="postgres", dsn=f"postgresql://u:{PASSWORD}@127.0.0.1:1/x"),
        "cache": spec(type="redis", url=redis_url),
    }
    report = await read_stats("svc", components, redactor=Redactor([PASSWORD]))
    db, cache = report.components
    assert db.problem == "unexpected error (KeyError: 'a bug near ***')"
    assert isinstance(cache.data, RedisStats)
    logged = logs()
    assert "stats_read_failed" in logged and "KeyError" in logged and PASSWORD not in logged


# -- the inventory's key_prefixes ----------------------------------------------------------------------


def redis_inventory(prefixes: str) -> str:
    return f"""
services:
  svc:
    components:
      cache:
        type: redis
        url: redis://127.0.0.1:6379/0
        key_prefixes: {prefixes}
"""


def test_key_prefixes_are_plain_distinct_and_bounded() -> None:
    loaded = parse_inventory(redis_inventory('["yt:cache:", "{user}:", "a.b/c|d-e_f"]'), "inv")
    cache = loaded.inventory.services["svc"].components["cache"]
    assert isinstance(cache, RedisComponent) and cache.key_prefixes == ["yt:cache:", "{user}:", "a.b/c|d-e_f"]
    for given, said in [
        ('["cache*"]', "'cache*' is not a key prefix: letters, digits and _ { } : . / | - only (no wildcards"),
        ('["a b"]', "'a b' is not a key prefix"),
        ('[""]', "'' is not a key prefix"),
        ('["x:", "x:"]', "'x:' is listed twice"),
        (str([f"p{i}:" for i in range(21)]), "List should have at most 20 items"),
    ]:
        with pytest.raises(InventoryError) as caught:
            parse_inventory(redis_inventory(given), "inv")
        [problem] = caught.value.problems
        assert problem.startswith("services.svc.components.cache.key_prefixes: ") and said in problem, problem
