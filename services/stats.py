"""What `/ops stats` shows: sizes and counts of a service's datastores (runbook 003's `stats`).

PostgreSQL: per table a row estimate (``pg_class.reltuples``, or ``pg_stat_user_tables.n_live_tup``
while the table was never analysed), table, index and total size, and the database size. Qdrant: per
collection points, segments, vector config and status. MongoDB: per collection the estimated count,
data and storage size, index count and size (``$collStats``, else the ``collStats`` command). Redis:
used memory, keys in the database, and keys per declared prefix, counted with SCAN bounded in calls
and in time ("at least N" when the bound stops it).

Components are read concurrently, each under its own timeout; one that fails or hangs becomes a
sentence saying why it could not be read and never fails the others. Connections and error phrases
are those of the health probes (services/probes) and of MongoAccess (services/cleanup). The Qdrant
client is imported only when a Qdrant component is read: it takes seconds to import.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import asyncpg  # asyncpg ships no type information
import redis.asyncio as aioredis
import structlog
from redis.exceptions import RedisError

from services.errors import CommandError
from services.failures import network_problem, short_error
from services.health import Status
from services.inventory import Component, MongoComponent, PostgresComponent, QdrantComponent, RedisComponent
from services.probes._common import connect_budget, scrubber, since_ms
from services.probes.postgres import login_problem as postgres_login_problem
from services.probes.redis import redis_problem
from services.redaction import Redactor
from services.text import escape

if TYPE_CHECKING:
    from pymongo.asynchronous.database import AsyncDatabase
    from qdrant_client import AsyncQdrantClient

log = structlog.get_logger(__name__)

STATS_TYPES = ("postgres", "qdrant", "mongodb", "redis")
_TYPES_TEXT = "PostgreSQL, Qdrant, MongoDB and Redis"


@dataclass(frozen=True)
class StatsLimits:
    """How much one `/ops stats` reads and shows at most."""

    top: int = 15  # tables or collections listed per component, largest first; the rest are summed up
    mongo_read: int = 100  # MongoDB collections read when none are declared (by name)
    mongo_concurrency: int = 8  # MongoDB collections read at once
    scan_count: int = 1000  # SCAN's COUNT hint
    scan_calls: int = 200  # SCAN calls at most per Redis component
    scan_share: float = 0.6  # of the component's timeout a SCAN may take at most


class Unreadable(Exception):
    """A component could not be read; the message says why in a phrase without secrets."""


# -- results -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TableStats:
    schema: str
    name: str
    rows: int | None  # an estimate; None when the server has no figure
    rows_from: str  # "reltuples" (the planner's figure) or "n_live_tup" (the statistics collector's)
    table_bytes: int
    index_bytes: int
    total_bytes: int


@dataclass(frozen=True)
class PostgresStats:
    database: str
    database_bytes: int
    tables: list[TableStats]  # the largest, by total size
    table_count: int  # every user table and materialized view
    others_bytes: int  # total size of the tables not listed


@dataclass(frozen=True)
class VectorConfig:
    name: str  # "" for a collection's single unnamed vector
    size: int | None  # None for a sparse vector
    distance: str  # Cosine, Dot, Euclid, Manhattan; "sparse" for sparse vectors
    on_disk: bool = False


@dataclass(frozen=True)
class CollectionStats:
    """One Qdrant collection, or why it could not be read (``problem``)."""

    name: str
    status: str | None = None  # green, yellow, grey, red
    level: Status = Status.CRITICAL
    points: int | None = None
    indexed_vectors: int | None = None
    segments: int | None = None
    vectors: list[VectorConfig] = field(default_factory=list)
    payload_indexes: int = 0
    problem: str | None = None


@dataclass(frozen=True)
class QdrantStats:
    collections: list[CollectionStats]


@dataclass(frozen=True)
class MongoCollectionStats:
    """One MongoDB collection, or why it could not be read (``problem``)."""

    name: str
    count: int | None = None  # from the collection's metadata: an estimate
    size_bytes: int | None = None  # uncompressed data
    storage_bytes: int | None = None
    index_count: int | None = None
    index_bytes: int | None = None
    problem: str | None = None


@dataclass(frozen=True)
class MongoStats:
    database: str
    collections: list[MongoCollectionStats]  # problems first, then the largest
    collection_count: int  # collections in the database (or declared)
    others: int  # read but not listed
    others_bytes: int
    unread: int  # not read at all (over StatsLimits.mongo_read)
    data_bytes: int | None = None  # dbStats, when the server answers it
    storage_bytes: int | None = None
    index_bytes: int | None = None


@dataclass(frozen=True)
class PrefixCount:
    prefix: str
    keys: int


@dataclass(frozen=True)
class RedisStats:
    used_memory: int
    peak_memory: int | None
    max_memory: int  # 0: no limit
    db: int
    db_keys: int
    prefixes: list[PrefixCount]
    other_keys: int  # seen by the SCAN under no declared prefix
    scanned: int  # keys the SCAN returned
    complete: bool  # the SCAN went round the whole keyspace; else the counts are lower bounds
    stopped: str | None = None  # why it did not: "after 200 SCAN calls", "after 3 s", an error


StatsData = PostgresStats | QdrantStats | MongoStats | RedisStats


@dataclass(frozen=True)
class ComponentStats:
    """One component's figures, or the phrase saying why it could not be read."""

    component: str
    type: str
    elapsed_ms: float
    data: StatsData | None = None
    problem: str | None = None


@dataclass(frozen=True)
class ServiceStats:
    service: str
    components: list[ComponentStats]
    skipped: list[tuple[str, str]]  # (component, type) of the service's components without stats

    @property
    def unreadable(self) -> list[ComponentStats]:
        return [c for c in self.components if c.problem is not None]


# -- which components ----------------------------------------------------------------------------------


def stats_components(
    service: str, components: Mapping[str, Component], only: str | None = None
) -> tuple[dict[str, Component], list[tuple[str, str]]]:
    """The components of a service that have stats (only ``only``, when named) and those that have none.

    CommandError, one sentence, for an unknown component, one without stats, or a service with none.
    """
    if only is not None:
        if only not in components:
            known = ", ".join(f"`{c}`" for c in list(components)[:20])
            shown = escape(only[:40].replace("`", "'"))
            raise CommandError(f"`{service}` has no component called `{shown}`; its components are {known}.")
        spec = components[only]
        if spec.type not in STATS_TYPES:
            raise CommandError(f"`{service}/{only}` is a {spec.type} component: stats cover {_TYPES_TEXT} only.")
        return {only: spec}, []
    found = {name: spec for name, spec in components.items() if spec.type in STATS_TYPES}
    if not found:
        raise CommandError(f"`{service}` has no component with stats ({_TYPES_TEXT}).")
    skipped: list[tuple[str, str]] = [(n, spec.type) for n, spec in components.items() if spec.type not in STATS_TYPES]
    return found, skipped


async def read_stats(
    service: str,
    components: Mapping[str, Component],
    *,
    redactor: Redactor,
    limits: StatsLimits | None = None,
    skipped: Sequence[tuple[str, str]] = (),
) -> ServiceStats:
    """Read every component concurrently, each under its own timeout; failures become problems."""
    limits = limits or StatsLimits()
    found = await asyncio.gather(*(_read(name, spec, redactor, limits) for name, spec in components.items()))
    return ServiceStats(service, list(found), list(skipped))


async def _read(name: str, spec: Component, redactor: Redactor, limits: StatsLimits) -> ComponentStats:
    started = time.perf_counter()
    reader = _READERS[spec.type]
    try:
        async with asyncio.timeout(spec.timeout):
            data = await reader(spec, redactor, limits)
    except TimeoutError:
        return ComponentStats(name, spec.type, since_ms(started), problem=f"no answer within {spec.timeout:g} s")
    except Unreadable as exc:
        return ComponentStats(name, spec.type, since_ms(started), problem=redactor.redact(str(exc)))
    except Exception as exc:
        # A bug or an answer we did not expect: this component says so, the others are still shown.
        log.exception("stats_read_failed", component=name, type=spec.type)
        problem = f"unexpected error ({short_error(exc, redactor)})"
        return ComponentStats(name, spec.type, since_ms(started), problem=problem)
    return ComponentStats(name, spec.type, since_ms(started), data=data)


# -- PostgreSQL ----------------------------------------------------------------------------------------

# Window functions run before LIMIT: the count and the sum cover every table, the rows only the largest.
_TABLES_SQL = """
with t as (
    select n.nspname::text as schema, c.relname::text as name, c.reltuples::float8 as reltuples,
           s.n_live_tup, pg_table_size(c.oid) as table_bytes, pg_indexes_size(c.oid) as index_bytes,
           pg_total_relation_size(c.oid) as total_bytes
    from pg_class c
    join pg_namespace n on n.oid = c.relnamespace
    left join pg_stat_user_tables s on s.relid = c.oid
    where c.relkind in ('r', 'm') and n.nspname <> 'information_schema' and n.nspname !~ '^pg_'
)
select *, count(*) over () as table_count, sum(total_bytes) over ()::int8 as all_bytes
from t
order by total_bytes desc, schema, name
limit $1
"""
_DATABASE_SQL = "select current_database() as name, pg_database_size(current_database()) as size_bytes"


def _row_estimate(reltuples: float, live: int | None) -> tuple[int | None, str]:
    """reltuples is -1 until the table is first vacuumed or analysed (PostgreSQL 14+), and stays 0 after
    a vacuum of an empty table however many rows arrive later: then the statistics collector's count."""
    if reltuples < 0 or (reltuples == 0 and live):
        return (int(live), "n_live_tup") if live is not None else (None, "n_live_tup")
    return int(reltuples), "reltuples"


async def _postgres(spec: Component, redactor: Redactor, limits: StatsLimits) -> PostgresStats:
    if not isinstance(spec, PostgresComponent):
        raise TypeError(f"not a PostgresComponent: {spec.type}")
    dsn = spec.dsn.get_secret_value()
    scrub = scrubber(dsn)
    budget = connect_budget(spec.timeout)
    try:
        conn: Any = await asyncpg.connect(
            dsn,
            timeout=budget,
            # The sizes take a lock per table: a table locked by a migration stops the query here.
            server_settings={"statement_timeout": str(max(1, int(budget * 1000))), "application_name": "opsbot"},
        )
    except Exception as exc:
        raise Unreadable(postgres_login_problem(exc, budget, scrub)) from None
    try:
        database = await conn.fetchrow(_DATABASE_SQL, timeout=budget)
        rows = await conn.fetch(_TABLES_SQL, limits.top, timeout=budget)
    except (TimeoutError, asyncpg.QueryCanceledError):
        conn.terminate()
        raise Unreadable(f"the size query did not finish within {budget:g} s (is a table locked?)") from None
    except asyncpg.PostgresError as exc:
        conn.terminate()
        raise Unreadable(f"logged in, but the size query failed: {short_error(exc, scrub)}") from None
    except (OSError, asyncpg.InterfaceError) as exc:
        conn.terminate()
        raise Unreadable(f"lost the connection: {network_problem(exc) or short_error(exc, scrub)}") from None
    except BaseException:
        conn.terminate()  # cancelled: don't wait for a polite goodbye
        raise
    try:
        await conn.close(timeout=budget)
    except Exception:
        conn.terminate()  # everything was read; a rude goodbye changes nothing
    tables = []
    for row in rows:
        estimate, source = _row_estimate(float(row["reltuples"]), row["n_live_tup"])
        tables.append(
            TableStats(
                row["schema"], row["name"], estimate, source,
                int(row["table_bytes"]), int(row["index_bytes"]), int(row["total_bytes"]),
            )
        )  # fmt: skip
    count = int(rows[0]["table_count"]) if rows else 0
    all_bytes = int(rows[0]["all_bytes"]) if rows else 0
    return PostgresStats(
        database=str(database["name"]),
        database_bytes=int(database["size_bytes"]),
        tables=tables,
        table_count=count,
        others_bytes=max(0, all_bytes - sum(t.total_bytes for t in tables)),
    )


# -- Qdrant --------------------------------------------------------------------------------------------


async def _qdrant(spec: Component, redactor: Redactor, limits: StatsLimits) -> QdrantStats:
    if not isinstance(spec, QdrantComponent):
        raise TypeError(f"not a QdrantComponent: {spec.type}")
    from services.probes.qdrant import default_qdrant_client

    scrub = scrubber(spec.api_key.get_secret_value() if spec.api_key else "")
    try:
        client = default_qdrant_client(spec)
    except (ValueError, RuntimeError, OSError) as exc:
        # e.g. local-mode storage already locked by another process.
        raise Unreadable(f"cannot open Qdrant: {short_error(exc, scrub)}") from None
    budget = connect_budget(spec.timeout)
    try:
        found = await asyncio.gather(*(_collection(client, name, budget, scrub, redactor) for name in spec.collections))
    finally:
        await client.close()
    problems = {c.problem for c in found}
    if len(problems) == 1 and None not in problems and "missing" not in problems:
        raise Unreadable(str(problems.pop()))  # the same failure everywhere: the server, not a collection
    return QdrantStats(list(found))


async def _collection(
    client: AsyncQdrantClient, name: str, budget: float, scrub: Redactor, redactor: Redactor
) -> CollectionStats:
    from qdrant_client.models import CollectionStatus, SparseVectorParams, VectorParams

    from services.probes.qdrant import COLOUR_STATUS, missing_collection, qdrant_problem

    try:
        async with asyncio.timeout(budget):
            info = await client.get_collection(name)
    except TimeoutError:
        return CollectionStats(name, problem=f"no answer within {budget:g} s")
    except Exception as exc:  # the client raises a different type per transport
        if missing_collection(exc):
            return CollectionStats(name, problem="missing")
        return CollectionStats(name, problem=redactor.redact(qdrant_problem(exc, budget, scrub)))
    colour = CollectionStatus(info.status)
    vectors: list[VectorConfig] = []
    params = info.config.params.vectors
    named: Mapping[str, VectorParams] = params if isinstance(params, dict) else ({"": params} if params else {})
    for vector_name, vector in sorted(named.items()):
        vectors.append(VectorConfig(vector_name, vector.size, str(vector.distance.value), bool(vector.on_disk)))
    sparse: Mapping[str, SparseVectorParams] = info.config.params.sparse_vectors or {}
    vectors += [VectorConfig(sparse_name, None, "sparse") for sparse_name in sorted(sparse)]
    return CollectionStats(
        name,
        status=colour.value,
        level=COLOUR_STATUS.get(colour, Status.CRITICAL),
        points=info.points_count,
        indexed_vectors=info.indexed_vectors_count,
        segments=info.segments_count,
        vectors=vectors,
        payload_indexes=len(info.payload_schema or {}),
    )


# -- MongoDB -------------------------------------------------------------------------------------------


def _number(value: object) -> int | None:
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _total(values: Sequence[object]) -> int | None:
    """The sum over a sharded collection's per-shard documents; None when no shard says."""
    numbers = [n for n in map(_number, values) if n is not None]
    return sum(numbers) if numbers else None


async def _mongodb(spec: Component, redactor: Redactor, limits: StatsLimits) -> MongoStats:
    if not isinstance(spec, MongoComponent):
        raise TypeError(f"not a MongoComponent: {spec.type}")
    from services.cleanup import MongoAccess

    # Server selection overshoots its timeout by up to one heartbeat (0.5 s): leave room for it, so a
    # server that is down is reported with its reason rather than cut off by the component's timeout.
    budget = max(spec.timeout * 0.5, connect_budget(spec.timeout) - 0.5)
    access = MongoAccess(spec.model_copy(update={"timeout": budget}), redactor)
    doing = f"MongoDB database {spec.database}"
    try:
        async with access.database(doing) as db:
            return await _mongo_database(db, spec, access.problem, limits)
    except CommandError as exc:
        raise Unreadable(exc.message.removeprefix(f"{doing}: ")) from None


async def _mongo_database(
    db: AsyncDatabase[dict[str, Any]],
    spec: MongoComponent,
    problem: Callable[[BaseException], str],
    limits: StatsLimits,
) -> MongoStats:
    from pymongo.errors import OperationFailure

    listed = await (await db.list_collections()).to_list()
    present = {str(c["name"]) for c in listed if c.get("type", "collection") == "collection"}
    declared = list(spec.collections)
    names = declared or sorted(n for n in present if not n.startswith("system."))
    unread = max(0, len(names) - limits.mongo_read)
    gate = asyncio.Semaphore(limits.mongo_concurrency)

    async def one(name: str) -> MongoCollectionStats:
        if name not in present:
            return MongoCollectionStats(name, problem="missing (no such collection)")
        async with gate:
            return await _mongo_collection(db, name, problem)

    found = await asyncio.gather(*(one(name) for name in names[: limits.mongo_read]))
    ordered = sorted(found, key=lambda c: (c.problem is None, -(c.storage_bytes or c.size_bytes or 0), c.name))
    shown = ordered[: limits.top]
    rest = ordered[limits.top :]
    try:
        totals: Mapping[str, Any] = await db.command("dbStats")
    except OperationFailure:
        totals = {}  # not allowed or not supported: the collections are still shown
    return MongoStats(
        database=spec.database,
        collections=shown,
        collection_count=len(names),
        others=len(rest),
        others_bytes=sum(c.storage_bytes or c.size_bytes or 0 for c in rest),
        unread=unread,
        data_bytes=_number(totals.get("dataSize")),
        storage_bytes=_number(totals.get("storageSize")),
        index_bytes=_number(totals.get("indexSize")),
    )


async def _mongo_collection(
    db: AsyncDatabase[dict[str, Any]], name: str, problem: Callable[[BaseException], str]
) -> MongoCollectionStats:
    """``$collStats`` (MongoDB 3.4+, one document per shard), else the ``collStats`` command (deprecated
    since 6.2; some servers that speak the protocol answer only this one)."""
    from pymongo.errors import OperationFailure

    collection = db[name]
    storage: list[Mapping[str, Any]] = []
    try:
        cursor = await collection.aggregate([{"$collStats": {"storageStats": {}}}])
        storage = [d["storageStats"] for d in await cursor.to_list() if isinstance(d.get("storageStats"), dict)]
    except OperationFailure as exc:
        if exc.code in (13, 18):
            return MongoCollectionStats(name, problem=problem(exc))
    if not storage:
        try:
            storage = [await db.command("collStats", name)]
        except OperationFailure as exc:
            return MongoCollectionStats(name, problem=f"no collection statistics: {problem(exc)}")
    # Every shard holds the same indexes: their number is not summed.
    index_count = max((n for n in (_number(s.get("nindexes")) for s in storage) if n is not None), default=None)
    if index_count is None:
        sizes = [s.get("indexSizes") for s in storage]
        named = {k for s in sizes if isinstance(s, dict) for k in s}
        index_count = len(named) or len(await (await collection.list_indexes()).to_list())
    return MongoCollectionStats(
        name,
        count=_total([s.get("count") for s in storage]),
        size_bytes=_total([s.get("size") for s in storage]),
        storage_bytes=_total([s.get("storageSize") for s in storage]),
        index_count=index_count,
        index_bytes=_total([s.get("totalIndexSize") for s in storage]),
    )


# -- Redis ---------------------------------------------------------------------------------------------


async def _redis(spec: Component, redactor: Redactor, limits: StatsLimits) -> RedisStats:
    if not isinstance(spec, RedisComponent):
        raise TypeError(f"not a RedisComponent: {spec.type}")
    started = time.monotonic()
    url = spec.url.get_secret_value()
    scrub = scrubber(url)
    budget = connect_budget(spec.timeout)
    try:
        client = aioredis.from_url(url, socket_timeout=budget, socket_connect_timeout=budget)
    except ValueError as exc:
        # The URL itself is wrong; its text may hold the password, so only the class is kept.
        raise Unreadable(f"the Redis URL is not valid ({type(exc).__name__})") from None
    try:
        try:
            info = await client.info("memory")
            db_keys = int(await client.dbsize())
        except (RedisError, OSError, TimeoutError) as exc:
            raise Unreadable(redis_problem(exc, budget, scrub)) from None
        db = int(client.connection_pool.connection_kwargs.get("db") or 0)
        seconds = spec.timeout * limits.scan_share
        scan = await _count_prefixes(client, spec.key_prefixes, started, seconds, limits, budget, scrub)
    finally:
        await client.aclose()
    peak = info.get("used_memory_peak")
    return RedisStats(
        used_memory=int(info.get("used_memory", 0)),
        peak_memory=int(peak) if peak is not None else None,
        max_memory=int(info.get("maxmemory", 0)),
        db=db,
        db_keys=db_keys,
        **scan,
    )


async def _count_prefixes(
    client: aioredis.Redis,
    prefixes: Sequence[str],
    started: float,
    seconds: float,
    limits: StatsLimits,
    budget: float,
    scrub: Redactor,
) -> dict[str, Any]:
    """One SCAN round over the keyspace (no MATCH: one pass counts every prefix), stopped by the call or
    time bound. SCAN may return a key twice while Redis resizes its table, so a count is a sample's, not
    a promise; when the bound stops it, the counts are lower bounds."""
    counts = dict.fromkeys(prefixes, 0)
    encoded = [(prefix, prefix.encode()) for prefix in prefixes]
    other = scanned = calls = 0
    cursor: int = 0
    stopped: str | None = None
    if prefixes:
        while True:
            try:
                cursor, keys = await client.scan(cursor, count=limits.scan_count)
            except (RedisError, OSError, TimeoutError) as exc:
                stopped = f"Redis failed during the SCAN: {redis_problem(exc, budget, scrub)}"
                break
            calls += 1
            for key in keys:
                scanned += 1
                name = key if isinstance(key, bytes) else str(key).encode()
                hits = [prefix for prefix, raw in encoded if name.startswith(raw)]
                for prefix in hits:
                    counts[prefix] += 1
                other += not hits
            if cursor == 0:
                break
            if calls >= limits.scan_calls:
                stopped = f"the SCAN stopped after {calls:,} calls"
                break
            if time.monotonic() - started >= seconds:
                stopped = f"the SCAN stopped after {time.monotonic() - started:.1f} s"
                break
    return {
        "prefixes": [PrefixCount(prefix, counts[prefix]) for prefix in prefixes],
        "other_keys": other,
        "scanned": scanned,
        "complete": stopped is None,
        "stopped": stopped,
    }


_READERS: dict[str, Callable[[Component, Redactor, StatsLimits], Awaitable[StatsData]]] = {
    "postgres": _postgres,
    "qdrant": _qdrant,
    "mongodb": _mongodb,
    "redis": _redis,
}
