"""Runbook 003's integrity check (``make check-data``): PostgreSQL chunks against Qdrant vectors.

Each check is a line with a status and its figures: the database answers, the required tables exist,
each collection's colour and counts, the chunk ids against the vector ids *as sets* (orphan vectors:
in Qdrant only; missing vectors: in PostgreSQL only), and jobs stale in processing. Memory does not
grow with the collection: with ``same_id`` both sides are read in id order, a page at a time (a
server-side cursor; Qdrant's scroll, which is ordered by point id), and merged; with a payload mapping
the points are copied into a temporary table and anti-joined there, both ways.

The result keeps the orphan point ids and the stale job ids in full while there are few enough
(``keep_ids``), so `/ops integrity fix` can plan exactly what the check found; above that it keeps
counts and a sample, and the fix re-derives the list (``orphan_sink`` streams every orphan id to it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg  # asyncpg ships no type information
from qdrant_client import AsyncQdrantClient
from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse
from qdrant_client.models import CollectionStatus, PayloadSelectorInclude

from services.errors import CommandError
from services.failures import network_problem, short_error
from services.health import Status
from services.inventory import (
    ChunkVectors,
    IntegritySettings,
    Inventory,
    JobsTable,
    PayloadId,
    PostgresComponent,
    QdrantComponent,
    secrets_in,
)
from services.jobs import Job, JobsClient
from services.probes.qdrant import default_qdrant_client
from services.redaction import Redactor
from services.sql import quote_ident, relation

log = logging.getLogger(__name__)

KEEP_IDS = 10_000  # orphan / missing ids kept in full per comparison; above this, counts and a sample
STALE_KEEP = 1_000  # stale jobs kept in full (the most one `jobs reset-stuck` approval resets)
SAMPLE = 5  # ids shown per finding
BULK_TIMEOUT = 60.0  # seconds one page, COPY or anti-join may take (a sort of millions of rows is slow)
UUID_BASE = 1 << 64  # Qdrant orders unsigned-integer ids before UUIDs: one integer key orders both

QdrantFactory = Callable[[QdrantComponent], AsyncQdrantClient]
OrphanSink = Callable[[str, Sequence[str]], Awaitable[None]]  # (collection, point ids), in batches

# pg_type oids of the id column types the comparison understands.
_INTS = {21: (-(1 << 15), 1 << 15), 23: (-(1 << 31), 1 << 31), 20: (-(1 << 63), 1 << 63)}
_UUID = 2950
_TEXTS = {25, 1043}  # text, varchar
_COLUMN_SQL = """
select format_type(a.atttypid, a.atttypmod) as sql_type,
       case when t.typtype = 'd' then t.typbasetype else t.oid end as base_type
from pg_attribute a join pg_type t on t.oid = a.atttypid
where a.attrelid = to_regclass($1) and a.attnum > 0 and not a.attisdropped and a.attname = $2
"""
_HEX = "[0-9a-fA-F]"
_UUID_RE = f"^({_HEX}{{8}}-{_HEX}{{4}}-{_HEX}{{4}}-{_HEX}{{4}}-{_HEX}{{12}}|{_HEX}{{32}})$"
_COLOURS = {
    CollectionStatus.GREEN: Status.HEALTHY,
    CollectionStatus.YELLOW: Status.WARNING,  # optimising: serves reads and writes
    CollectionStatus.GREY: Status.WARNING,  # optimisation pending until the next update
    CollectionStatus.RED: Status.CRITICAL,
}


# -- the result ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Line:
    """One check: what was checked, how it went, and its figures in words."""

    name: str
    status: Status
    detail: str


@dataclass(frozen=True)
class FoundIds:
    """Ids a comparison found: how many, and the first ``keep`` of them in id order."""

    count: int
    ids: tuple[str, ...]

    @property
    def complete(self) -> bool:
        """Whether ``ids`` is the whole list (else the fix must find them again)."""
        return len(self.ids) == self.count

    def sample(self, n: int = SAMPLE) -> tuple[str, ...]:
        return self.ids[:n]


@dataclass(frozen=True)
class ChunkDiff:
    """A chunk table against a collection, as id sets."""

    table: str
    collection: str
    mapping: str  # "same_id" or "payload:<field>"
    chunks: int  # distinct chunk ids read
    points: int  # points read
    orphans: FoundIds  # point ids of vectors whose chunk is not in the table (what the fix deletes)
    missing: FoundIds  # chunk ids without a vector
    unmapped: int = 0  # of the orphans: points without a usable chunk id in the payload field


@dataclass(frozen=True)
class StaleJobs:
    """Jobs in processing for longer than the integrity threshold (what the fix resets)."""

    component: str
    table: str
    threshold_minutes: int
    total: int
    jobs: tuple[Job, ...]  # oldest first, at most STALE_KEEP
    checked_at: datetime

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(job.id for job in self.jobs)

    @property
    def complete(self) -> bool:
        return len(self.jobs) == self.total


@dataclass(frozen=True)
class IntegrityReport:
    """Every check of one service, the overall status (the worst line), and the findings behind it."""

    service: str
    lines: tuple[Line, ...]
    diffs: tuple[ChunkDiff, ...]
    stale: StaleJobs | None
    seconds: float

    @property
    def status(self) -> Status:
        return max((line.status for line in self.lines), default=Status.HEALTHY)


@dataclass(frozen=True)
class IntegrityTarget:
    """A service's integrity section with the components it names."""

    service: str
    settings: IntegritySettings
    database_name: str
    database: PostgresComponent
    qdrant_name: str | None
    qdrant: QdrantComponent | None
    jobs_name: str | None
    jobs: PostgresComponent | None


def integrity_target(inventory: Inventory, service: str) -> IntegrityTarget:
    """The integrity declaration of ``service`` (already resolved), or one sentence saying why there is none."""
    spec = inventory.services[service]
    settings = spec.integrity
    if settings is None:
        raise CommandError(
            f"`{service}` declares no integrity check in the inventory "
            "(an `integrity:` section naming its database, tables and collections)."
        )
    # The inventory's cross-checks guarantee the names and types (an inventory built without them is refused).
    database = spec.components.get(settings.database)
    qdrant = spec.components.get(settings.qdrant) if settings.qdrant is not None else None
    jobs_name = settings.jobs
    if jobs_name is None and isinstance(database, PostgresComponent) and database.jobs is not None:
        jobs_name = settings.database
    jobs = spec.components.get(jobs_name) if jobs_name is not None else None
    if (
        not isinstance(database, PostgresComponent)
        or not (qdrant is None or isinstance(qdrant, QdrantComponent))
        or not (jobs is None or isinstance(jobs, PostgresComponent))
    ):
        raise CommandError(
            f"The integrity section of `{service}` names components that are not there; run `opsbot config check`."
        )
    return IntegrityTarget(service, settings, settings.database, database, settings.qdrant, qdrant, jobs_name, jobs)


# -- small pieces ----------------------------------------------------------------------------------


class _Unavailable(Exception):
    """A check could not be made; the message is a plain phrase (no secrets)."""


def minutes_text(minutes: int) -> str:
    """``1440`` → ``"1 day"``, ``90`` → ``"90 min"``, ``120`` → ``"2 h"``."""
    if minutes % 1440 == 0:
        days = minutes // 1440
        return f"{days} day" if days == 1 else f"{days} days"
    if minutes % 60 == 0:
        return f"{minutes // 60} h"
    return f"{minutes} min"


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}" if n == 1 else f"{n:,} {noun}s"


def _ids_text(found: FoundIds) -> str:
    shown = ", ".join(f"`{i}`" for i in found.sample())
    return f"{shown}{' …' if found.count > len(found.sample()) else ''}"


class _Collector:
    """Ids as they are found: a count, the first ``keep``, and batches handed to an optional sink."""

    def __init__(self, keep: int, collection: str, sink: OrphanSink | None = None) -> None:
        self.count = 0
        self.kept: list[str] = []
        self._keep = keep
        self._collection = collection
        self._sink = sink
        self._pending: list[str] = []

    def add(self, value: object) -> None:
        self.count += 1
        if len(self.kept) < self._keep or self._sink is not None:
            text = str(value)
            if len(self.kept) < self._keep:
                self.kept.append(text)
            if self._sink is not None:
                self._pending.append(text)

    async def flush(self) -> None:
        if self._sink is not None and self._pending:
            batch, self._pending = self._pending, []
            await self._sink(self._collection, batch)

    def found(self) -> FoundIds:
        return FoundIds(self.count, tuple(self.kept))


def _point_key(point_id: object) -> int:
    """Qdrant's own order of point ids as one integer: unsigned ints first, then UUIDs by value."""
    if isinstance(point_id, int):
        return point_id
    return UUID_BASE + uuid.UUID(str(point_id)).int


class _OutOfOrder(Exception):
    pass


# -- the checker -----------------------------------------------------------------------------------


@dataclass
class _Findings:
    lines: list[Line] = field(default_factory=list)
    diffs: list[ChunkDiff] = field(default_factory=list)
    stale: StaleJobs | None = None


@dataclass
class _Collection:
    name: str
    status: Status
    points: int | None  # None: could not be read


class IntegrityChecker:
    """Runs the integrity check of one service; every network call has a timeout, the whole a deadline."""

    def __init__(
        self,
        redactor: Redactor,
        *,
        qdrant_factory: QdrantFactory | None = None,
        keep_ids: int = KEEP_IDS,
        bulk_timeout: float = BULK_TIMEOUT,
    ) -> None:
        self._redactor = redactor
        self._factory = qdrant_factory
        self._keep = keep_ids
        self._bulk_timeout = bulk_timeout

    async def check(self, target: IntegrityTarget, *, orphan_sink: OrphanSink | None = None) -> IntegrityReport:
        """Every check of the target's service; never raises for what it finds, only says it."""
        started = time.perf_counter()
        found = _Findings()
        deadline = target.settings.deadline_seconds
        dsn = target.database.dsn.get_secret_value()
        scrub = Redactor(secrets_in(dsn) | (secrets_in(target.qdrant.api_key.get_secret_value()) if (
            target.qdrant is not None and target.qdrant.api_key is not None) else set()))  # fmt: skip
        client: AsyncQdrantClient | None = None
        try:
            async with asyncio.timeout(deadline):
                if target.qdrant is not None:
                    try:
                        client = (self._factory or default_qdrant_client)(target.qdrant)
                    except (ValueError, RuntimeError, OSError) as exc:
                        found.lines.append(
                            Line(
                                f"qdrant {target.qdrant_name}", Status.CRITICAL, f"cannot open: {self._say(exc, scrub)}"
                            )
                        )
                await self._run(target, client, found, scrub, orphan_sink)
        except TimeoutError:
            found.lines.append(
                Line(
                    "deadline",
                    Status.CRITICAL,
                    f"the check did not finish within {deadline:g} s; what is not listed above was not checked",
                )
            )
        finally:
            if client is not None and self._factory is None:
                with contextlib.suppress(Exception):
                    await client.close()
        report = IntegrityReport(
            target.service, tuple(found.lines), tuple(found.diffs), found.stale, time.perf_counter() - started
        )
        log.info(
            "integrity %s: %s (%s)",
            target.service,
            report.status.label,
            "; ".join(f"{line.name} {line.status.label}" for line in report.lines),
        )
        return report

    async def _run(
        self,
        target: IntegrityTarget,
        client: AsyncQdrantClient | None,
        found: _Findings,
        scrub: Redactor,
        sink: OrphanSink | None,
    ) -> None:
        settings = target.settings
        tables = list(dict.fromkeys([*settings.required_tables, *(c.table for c in settings.chunks)]))
        qdrant_lines: list[Line] = []
        collections: dict[str, _Collection] = {}
        # Task groups: when the deadline cuts the check short, nothing is left running behind it.
        async with asyncio.TaskGroup() as group:
            database_task = group.create_task(self._database(target, tables, scrub))
            if client is not None and target.qdrant is not None:
                spec = target.qdrant
                found_collections = await asyncio.gather(
                    *(self._collection(client, spec, name, scrub) for name in spec.collections)
                )
                for collection, line in found_collections:
                    collections[collection.name] = collection
                    qdrant_lines.append(line)
        db_lines, present = database_task.result()
        found.lines += db_lines + qdrant_lines
        async with asyncio.TaskGroup() as group:
            stale_task = group.create_task(self._stale(target, scrub)) if target.jobs is not None else None
            for chunk in settings.chunks:
                read = collections.get(chunk.collection)
                await self._compare(target, chunk, present, read, client, found, scrub, sink)
        if stale_task is not None:
            line, stale = stale_task.result()
            found.lines.append(line)
            found.stale = stale

    # -- database and tables -----------------------------------------------------------------------

    def _say(self, exc: BaseException, scrub: Redactor) -> str:
        return self._redactor.redact(short_error(exc, scrub))

    def _pg_problem(self, exc: BaseException, timeout: float, scrub: Redactor) -> str:
        if isinstance(exc, TimeoutError | asyncpg.QueryCanceledError):
            return f"no answer within {timeout:g} s"
        if isinstance(exc, asyncpg.InvalidPasswordError | asyncpg.InvalidAuthorizationSpecificationError):
            return "the login was refused"
        if isinstance(exc, asyncpg.InvalidCatalogNameError):
            return "the database does not exist"
        if isinstance(exc, asyncpg.PostgresError):
            return self._say(exc, scrub)
        if isinstance(exc, asyncpg.ClientConfigurationError | ValueError):
            return f"the connection string is not valid ({type(exc).__name__})"  # its text may hold the password
        return network_problem(exc) or self._say(exc, scrub)

    @contextlib.asynccontextmanager
    async def _connection(self, target: IntegrityTarget, scrub: Redactor) -> AsyncIterator[Any]:
        """A connection to the database component; _Unavailable with a plain reason when there is none."""
        spec = target.database
        try:
            async with asyncio.timeout(spec.timeout):
                conn: Any = await asyncpg.connect(
                    spec.dsn.get_secret_value(),
                    timeout=spec.timeout,
                    server_settings={"application_name": "opsbot-integrity"},
                )
        except Exception as exc:
            raise _Unavailable(self._pg_problem(exc, spec.timeout, scrub)) from None
        try:
            yield conn
        finally:
            conn.terminate()  # read-only work: nothing to say goodbye for, and never a hang on close

    async def _database(
        self, target: IntegrityTarget, tables: list[str], scrub: Redactor
    ) -> tuple[list[Line], dict[str, bool]]:
        """The database line, the tables line, and which tables have at least one row."""
        timeout = target.database.timeout
        name = f"database {target.database_name}"
        started = time.perf_counter()
        try:
            async with self._connection(target, scrub) as conn:
                version = await conn.fetchval("show server_version", timeout=timeout)
                ms = (time.perf_counter() - started) * 1000
                lines = [Line(name, Status.HEALTHY, f"answers (PostgreSQL {version}, {ms:,.0f} ms)")]
                rows = await conn.fetch(
                    "select t, to_regclass(q) is not null as present from unnest($1::text[], $2::text[]) as u(t, q)",
                    tables,
                    [relation(t) for t in tables],
                    timeout=timeout,
                )
                exists = {str(r["t"]): bool(r["present"]) for r in rows}
                absent = [t for t in tables if not exists.get(t)]
                present: dict[str, bool] = {}
                for chunk_table in {c.table for c in target.settings.chunks} - set(absent):
                    present[chunk_table] = bool(
                        await conn.fetchval(
                            f"select exists(select 1 from {relation(chunk_table)})",  # noqa: S608 (quoted identifier)
                            timeout=timeout,
                        )
                    )
        except _Unavailable as exc:
            return [Line(name, Status.CRITICAL, f"does not answer: {exc}")], {}
        except (TimeoutError, asyncpg.PostgresError, OSError, asyncpg.InterfaceError) as exc:
            return [Line(name, Status.CRITICAL, f"failed: {self._pg_problem(exc, timeout, scrub)}")], {}
        if not tables:
            return lines, present
        if absent:
            listed = ", ".join(f"`{t}`" for t in absent)
            lines.append(
                Line(
                    "tables",
                    Status.CRITICAL,
                    f"missing: {listed} ({len(tables) - len(absent)} of {len(tables)} present)",
                )
            )
        else:
            lines.append(Line("tables", Status.HEALTHY, f"all {len(tables)} present: {', '.join(tables)}"))
        return lines, present

    # -- collections -------------------------------------------------------------------------------

    def _qdrant_problem(self, exc: BaseException, timeout: float, scrub: Redactor) -> str:
        if isinstance(exc, TimeoutError):
            return f"no answer within {timeout:g} s"
        if isinstance(exc, UnexpectedResponse):
            if exc.status_code in (401, 403):
                return "the API key was refused"
            return f"Qdrant answered {exc.status_code} {exc.reason_phrase}".strip()
        source = exc.source if isinstance(exc, ResponseHandlingException) else exc
        found = network_problem(source)
        if found == "timed out":
            return f"no answer within {timeout:g} s"
        return found or self._say(source, scrub)

    async def _collection(
        self, client: AsyncQdrantClient, spec: QdrantComponent, name: str, scrub: Redactor
    ) -> tuple[_Collection, Line]:
        label = f"collection {name}"
        try:
            async with asyncio.timeout(spec.timeout):
                info = await client.get_collection(name)
        except Exception as exc:  # the client raises a different type per transport
            if (isinstance(exc, UnexpectedResponse) and exc.status_code == 404) or (
                isinstance(exc, ValueError) and "not found" in str(exc)
            ):
                return _Collection(name, Status.CRITICAL, None), Line(label, Status.CRITICAL, "does not exist")
            problem = self._qdrant_problem(exc, spec.timeout, scrub)
            return _Collection(name, Status.CRITICAL, None), Line(label, Status.CRITICAL, f"unreachable: {problem}")
        colour = CollectionStatus(info.status)
        status = _COLOURS.get(colour, Status.CRITICAL)
        points = info.points_count or 0
        indexed = "?" if info.indexed_vectors_count is None else f"{info.indexed_vectors_count:,}"
        detail = f"{colour.value} · {points:,} points · {indexed} indexed vectors"
        return _Collection(name, status, points), Line(label, status, detail)

    # -- chunk ids against vector ids --------------------------------------------------------------

    async def _compare(
        self,
        target: IntegrityTarget,
        chunk: ChunkVectors,
        present: dict[str, bool],
        collection: _Collection | None,
        client: AsyncQdrantClient | None,
        found: _Findings,
        scrub: Redactor,
        sink: OrphanSink | None,
    ) -> None:
        label = f"chunks {chunk.table} ↔ vectors {chunk.collection}"
        if chunk.table not in present:
            found.lines.append(Line(label, Status.CRITICAL, "not compared: the chunk table could not be read"))
            return
        if client is None or collection is None or collection.points is None:
            found.lines.append(Line(label, Status.CRITICAL, "not compared: the collection could not be read"))
            return
        if collection.status is Status.CRITICAL:
            found.lines.append(Line(label, Status.CRITICAL, "not compared: the collection is red"))
            return
        if not present[chunk.table] and collection.points > 0:
            found.lines.append(
                Line(
                    label,
                    Status.CRITICAL,
                    f"the chunk table is empty while the collection has {collection.points:,} points: not compared "
                    "(every vector would be an orphan; was the table emptied or restored without its rows?)",
                )
            )
            return
        try:
            async with self._connection(target, scrub) as conn:
                id_type, base = await self._id_column(conn, chunk, target.database.timeout)
                if isinstance(chunk.vector_id, PayloadId):
                    diff = await self._payload_diff(
                        conn, chunk, chunk.vector_id, id_type, base, client, target, scrub, sink
                    )
                else:
                    diff = await self._same_id_diff(conn, chunk, base, client, target, scrub, sink)
        except _Unavailable as exc:
            found.lines.append(Line(label, Status.CRITICAL, f"not compared: {exc}"))
            return
        except _OutOfOrder as exc:
            found.lines.append(Line(label, Status.CRITICAL, f"not compared: {exc}"))
            return
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
            problem = self._pg_problem(exc, self._bulk_timeout, scrub)
            found.lines.append(Line(label, Status.CRITICAL, f"not compared: the database failed: {problem}"))
            return
        found.diffs.append(diff)
        found.lines.append(self._diff_line(label, diff))

    def _diff_line(self, label: str, diff: ChunkDiff) -> Line:
        figures = f"{diff.chunks:,} chunks, {diff.points:,} vectors"
        if not diff.orphans.count and not diff.missing.count:
            return Line(label, Status.HEALTHY, f"{figures}: the ids match")
        parts = []
        if diff.orphans.count:
            unmapped = f", {diff.unmapped:,} without a chunk id in the payload" if diff.unmapped else ""
            parts.append(f"{_count(diff.orphans.count, 'orphan vector')}{unmapped} (e.g. {_ids_text(diff.orphans)})")
        if diff.missing.count:
            parts.append(f"{_count(diff.missing.count, 'missing vector')} (e.g. chunks {_ids_text(diff.missing)})")
        return Line(label, Status.WARNING, f"{figures}: " + "; ".join(parts))

    async def _id_column(self, conn: Any, chunk: ChunkVectors, seconds: float) -> tuple[str, int]:
        row = await conn.fetchrow(_COLUMN_SQL, relation(chunk.table), chunk.id_column, timeout=seconds)
        if row is None:
            raise _Unavailable(f"the chunk table `{chunk.table}` has no column `{chunk.id_column}`")
        base = int(row["base_type"])
        if base not in _INTS and base != _UUID and base not in _TEXTS:
            raise _Unavailable(
                f"the id column `{chunk.id_column}` of `{chunk.table}` is of type {row['sql_type']}; "
                "the check compares smallint, integer, bigint, uuid, text or varchar ids"
            )
        return str(row["sql_type"]), base

    async def _pages(
        self,
        client: AsyncQdrantClient,
        collection: str,
        target: IntegrityTarget,
        payload: str | None,
        scrub: Redactor,
    ) -> AsyncGenerator[list[Any], None]:
        """The collection's points, a page at a time in point-id order, the next page fetched while the
        caller works on this one. Only the ids (and the one payload field, if asked) travel."""
        timeout = target.qdrant.timeout if target.qdrant is not None else 5.0
        limit = target.settings.page_size
        with_payload: Any = PayloadSelectorInclude(include=[payload]) if payload else False

        async def fetch(offset: Any) -> tuple[list[Any], Any]:
            try:
                async with asyncio.timeout(timeout):
                    records, next_offset = await client.scroll(
                        collection, limit=limit, offset=offset, with_payload=with_payload, with_vectors=False
                    )
            except Exception as exc:
                problem = self._qdrant_problem(exc, timeout, scrub)
                raise _Unavailable(f"reading the points of `{collection}` failed: {problem}") from None
            return list(records), next_offset

        task = asyncio.create_task(fetch(None))
        try:
            while True:
                records, offset = await task
                if offset is not None:
                    task = asyncio.create_task(fetch(offset))
                yield records
                if offset is None:
                    return
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, _Unavailable):
                    await task

    def _chunk_query(self, chunk: ChunkVectors, base: int) -> str:
        column, table_sql = quote_ident(chunk.id_column), relation(chunk.table)
        if base in _TEXTS:
            # Text ids in Qdrant's order: unsigned integers (by value), then UUIDs (by value), then
            # anything else (which no point id can equal). Nested CASEs: SQL does not promise to
            # evaluate AND left to right, and a cast of a non-number would fail.
            kind = (
                f"case when {column} ~ '^[0-9]{{1,20}}$' then case when {column}::numeric < 18446744073709551616 "
                f"then 0 else 2 end when {column} ~ '{_UUID_RE}' then 1 else 2 end"
            )
            return (
                f"select {column}::text as id, {kind} as kind from {table_sql} where {column} is not null "  # noqa: S608
                f"order by 2, case when {column} ~ '^[0-9]{{1,20}}$' then {column}::numeric end, "
                f"case when {column} ~ '{_UUID_RE}' then {column}::uuid end, {column} collate \"C\""
            )
        return f"select {column} as id from {table_sql} where {column} is not null order by {column}"  # noqa: S608

    async def _same_id_diff(
        self,
        conn: Any,
        chunk: ChunkVectors,
        base: int,
        client: AsyncQdrantClient,
        target: IntegrityTarget,
        scrub: Redactor,
        sink: OrphanSink | None,
    ) -> ChunkDiff:
        page = target.settings.page_size
        orphans = _Collector(self._keep, chunk.collection, sink)
        missing = _Collector(self._keep, chunk.collection)
        if base in _TEXTS:

            def key(row: Any) -> int | None:
                kind = row[1]
                if kind == 0:
                    return int(row[0])
                return UUID_BASE + uuid.UUID(row[0]).int if kind == 1 else None

        elif base == _UUID:

            def key(row: Any) -> int | None:
                value: uuid.UUID = row[0]
                return UUID_BASE + value.int

        else:

            def key(row: Any) -> int | None:
                value: int = row[0]
                return value if value >= 0 else None  # a negative id can never be a point id

        chunks = points = 0
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            cursor = await conn.cursor(self._chunk_query(chunk, base), timeout=self._bulk_timeout)
            rows: list[Any] = []
            pg_keys: list[int | None] = []
            i = 0
            pg_done = False
            last_pg = -1
            last_q = -1
            q_keys: list[int] = []
            q_ids: list[Any] = []
            j = 0
            async with contextlib.aclosing(self._pages(client, chunk.collection, target, None, scrub)) as pages:
                q_iter = aiter(pages)
                q_done = False
                while True:
                    if i == len(pg_keys) and not pg_done:
                        rows = await cursor.fetch(page, timeout=self._bulk_timeout)
                        pg_keys = [key(r) for r in rows]
                        i = 0
                        pg_done = not rows
                    if j == len(q_keys) and not q_done:
                        await orphans.flush()
                        try:
                            records = await anext(q_iter)
                        except StopAsyncIteration:
                            records = []
                        q_ids = [r.id for r in records]
                        q_keys = [_point_key(p) for p in q_ids]
                        points += len(q_keys)
                        j = 0
                        q_done = not records
                    if pg_done and q_done:
                        break
                    # Merge until one page runs out; both sides ascend (checked: a merge of unordered
                    # input would report nonsense).
                    while i < len(pg_keys) and (j < len(q_keys) or q_done):
                        a = pg_keys[i]
                        if a is None:
                            missing.add(rows[i][0])
                            chunks += 1
                            i += 1
                            continue
                        if a <= last_pg:
                            if a < last_pg:
                                raise _OutOfOrder(f"the chunk ids of `{chunk.table}` did not come in id order")
                            i += 1  # the same id spelled twice ("7" and "007"): one chunk id
                            continue
                        if q_done:
                            missing.add(rows[i][0])
                            chunks += 1
                            last_pg = a
                            i += 1
                            continue
                        b = q_keys[j]
                        if b <= last_q:
                            raise _OutOfOrder(f"Qdrant did not return the points of `{chunk.collection}` in id order")
                        if a == b:
                            chunks += 1
                            last_pg, last_q = a, b
                            i += 1
                            j += 1
                        elif a < b:
                            missing.add(rows[i][0])
                            chunks += 1
                            last_pg = a
                            i += 1
                        else:
                            orphans.add(q_ids[j])
                            last_q = b
                            j += 1
                    if pg_done:
                        while j < len(q_keys):
                            b = q_keys[j]
                            if b <= last_q:
                                raise _OutOfOrder(
                                    f"Qdrant did not return the points of `{chunk.collection}` in id order"
                                )
                            orphans.add(q_ids[j])
                            last_q = b
                            j += 1
            await orphans.flush()
        return ChunkDiff(chunk.table, chunk.collection, "same_id", chunks, points, orphans.found(), missing.found())

    async def _payload_diff(
        self,
        conn: Any,
        chunk: ChunkVectors,
        mapping: PayloadId,
        id_type: str,
        base: int,
        client: AsyncQdrantClient,
        target: IntegrityTarget,
        scrub: Redactor,
        sink: OrphanSink | None,
    ) -> ChunkDiff:
        path = mapping.payload.split(".")
        column, table_sql = quote_ident(chunk.id_column), relation(chunk.table)
        temp_type = "text" if base in _TEXTS else id_type
        convert = _converter(base)
        page = target.settings.page_size
        points = unmapped = 0
        orphans = _Collector(self._keep, chunk.collection, sink)
        missing = _Collector(self._keep, chunk.collection)
        async with conn.transaction(isolation="repeatable_read"):
            await conn.execute(
                f"create temporary table opsbot_points (point_id text not null, chunk_id {temp_type}) on commit drop",
                timeout=self._bulk_timeout,
            )
            async with contextlib.aclosing(
                self._pages(client, chunk.collection, target, mapping.payload, scrub)
            ) as pages:
                async for records in pages:
                    batch = []
                    for record in records:
                        value = _field(record.payload, path)
                        chunk_id = convert(value)
                        unmapped += chunk_id is None
                        batch.append((str(record.id), chunk_id))
                    points += len(batch)
                    if batch:
                        await conn.copy_records_to_table("opsbot_points", records=batch, timeout=self._bulk_timeout)
            await conn.execute(
                "create index on opsbot_points (chunk_id); analyze opsbot_points", timeout=self._bulk_timeout
            )
            # Orphans in Qdrant's id order (numbers are shorter than UUIDs, and by length then text is by value).
            orphan_cursor = await conn.cursor(
                f"select p.point_id from opsbot_points p where p.chunk_id is null or not exists "  # noqa: S608
                f"(select 1 from {table_sql} c where c.{column} = p.chunk_id) order by length(p.point_id), p.point_id",
                timeout=self._bulk_timeout,
            )
            while rows := await orphan_cursor.fetch(page, timeout=self._bulk_timeout):
                for row in rows:
                    orphans.add(row[0])
                await orphans.flush()
            missing_cursor = await conn.cursor(
                f"select c.{column}::text from {table_sql} c where c.{column} is not null and not exists "  # noqa: S608
                f"(select 1 from opsbot_points p where p.chunk_id = c.{column}) order by c.{column}",
                timeout=self._bulk_timeout,
            )
            while rows := await missing_cursor.fetch(page, timeout=self._bulk_timeout):
                for row in rows:
                    missing.add(row[0])
            chunks = await conn.fetchval(
                f"select count({column}) from {table_sql}",  # noqa: S608 (quoted identifiers)
                timeout=self._bulk_timeout,
            )
        mapped = f"payload:{mapping.payload}"
        found_orphans, found_missing = orphans.found(), missing.found()
        return ChunkDiff(
            chunk.table, chunk.collection, mapped, int(chunks), points, found_orphans, found_missing, unmapped
        )

    # -- stale jobs --------------------------------------------------------------------------------

    async def _stale(self, target: IntegrityTarget, scrub: Redactor) -> tuple[Line, StaleJobs | None]:
        if target.jobs is None or target.jobs.jobs is None or target.jobs_name is None:
            return Line("jobs", Status.CRITICAL, "not checked: no jobs table is declared"), None
        minutes = target.settings.stale_after_minutes
        table: JobsTable = target.jobs.jobs.model_copy(update={"stuck_after_minutes": minutes})
        label = f"jobs {target.jobs_name}/{table.table}"
        client = JobsClient(
            target.jobs.dsn.get_secret_value(), table, timeout=target.jobs.timeout, redactor=self._redactor
        )
        try:
            summary = await client.summary(limit=STALE_KEEP)
        except CommandError as exc:
            return Line(label, Status.CRITICAL, f"not checked: {scrub.redact(exc.message)}"), None
        stale = StaleJobs(
            target.jobs_name, table.table, minutes, summary.stuck_total, tuple(summary.stuck), summary.checked_at
        )
        over = minutes_text(minutes)
        if not stale.total:
            return Line(label, Status.HEALTHY, f"no job in `{table.processing_value}` for over {over}"), stale
        shown = ", ".join(f"`{i}`" for i in stale.ids[:SAMPLE]) + (" …" if stale.total > SAMPLE else "")
        detail = f"{_count(stale.total, 'job')} in `{table.processing_value}` for over {over}: {shown}"
        return Line(label, Status.WARNING, detail), stale


def _field(payload: Any, path: list[str]) -> Any:
    value = payload
    for part in path:
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def _converter(base: int) -> Callable[[Any], Any]:
    """Payload value → a value of the chunk id column's type, or None when it cannot be one."""
    if base in _INTS:
        low, high = _INTS[base]

        def to_int(value: Any) -> int | None:
            if isinstance(value, str) and value.isascii() and value.isdigit():
                value = int(value)
            if isinstance(value, int) and not isinstance(value, bool) and low <= value < high:
                return value
            return None

        return to_int
    if base == _UUID:

        def to_uuid(value: Any) -> uuid.UUID | None:
            if not isinstance(value, str):
                return None
            try:
                return uuid.UUID(value)
            except ValueError:
                return None

        return to_uuid

    def to_text(value: Any) -> str | None:
        if isinstance(value, bool) or not isinstance(value, str | int):
            return None
        return str(value)

    return to_text


# -- for the fix: which planned orphans have a chunk again -----------------------------------------


async def chunk_id_type(conn: Any, chunk: ChunkVectors, seconds: float) -> tuple[str, int]:
    """The chunk id column's SQL type and base type oid; CommandError when it is absent or not comparable."""
    row = await conn.fetchrow(_COLUMN_SQL, relation(chunk.table), chunk.id_column, timeout=seconds)
    if row is None:
        raise CommandError(f"The chunk table `{chunk.table}` has no column `{chunk.id_column}` any more.")
    base = int(row["base_type"])
    if base not in _INTS and base != _UUID and base not in _TEXTS:
        raise CommandError(f"The id column `{chunk.id_column}` of `{chunk.table}` is of type {row['sql_type']} now.")
    return str(row["sql_type"]), base


def _canonical_point(point_id: str) -> int | uuid.UUID | None:
    if point_id.isascii() and point_id.isdigit():
        return int(point_id)
    try:
        return uuid.UUID(point_id)
    except ValueError:
        return None


async def chunks_back(
    conn: Any, chunk: ChunkVectors, base: int, points: Sequence[tuple[str, Any]], seconds: float
) -> set[str]:
    """Of these points (id, payload), the ids of those whose chunk is in the table now: no longer orphans.

    With ``same_id`` the point id is looked up in the id column by equality (so the column's index
    serves it); a text column is matched on the canonical spellings of the id (``7``; a UUID lower- or
    upper-case, with or without hyphens). With a payload mapping the payload field is looked up, as the
    check converts it.
    """
    column, table_sql = quote_ident(chunk.id_column), relation(chunk.table)
    wanted: dict[str, list[str]] = {}  # the column's text of a match -> the point ids it stands for
    if isinstance(chunk.vector_id, PayloadId):
        path, convert = chunk.vector_id.payload.split("."), _converter(base)
        for point_id, payload in points:
            value = convert(_field(payload, path))
            if value is not None:
                wanted.setdefault(str(value), []).append(point_id)
    else:
        for point_id, _ in points:
            key = _canonical_point(point_id)
            if key is None:
                continue
            if base in _TEXTS:
                text = str(key)
                spellings = [text] if isinstance(key, int) else [text, text.upper(), key.hex, key.hex.upper()]
            elif base == _UUID:
                spellings = [str(key)] if isinstance(key, uuid.UUID) else []
            else:
                low, high = _INTS[base]
                spellings = [str(key)] if isinstance(key, int) and low <= key < high else []
            for spelling in spellings:
                wanted.setdefault(spelling, []).append(point_id)
    if not wanted:
        return set()
    if base in _INTS:
        values: list[Any] = [int(v) for v in wanted]
        array = "bigint[]"
    elif base == _UUID:
        values, array = [uuid.UUID(v) for v in wanted], "uuid[]"
    else:
        values, array = list(wanted), "text[]"
    rows = await conn.fetch(
        f"select {column}::text as id from {table_sql} where {column} = any($1::{array})",  # noqa: S608 (quoted identifiers)
        values,
        timeout=seconds,
    )
    back: set[str] = set()
    for row in rows:
        text = str(row["id"])
        if base == _UUID:
            text = str(uuid.UUID(text))
        back.update(wanted.get(text, ()))
    return back
