"""Resets of runbook 003 (`reset-soft`, `reset-hard`): what a service's reset empties, counted, checked, emptied.

The inventory's ``reset:`` section declares the targets: tables per PostgreSQL database (the jobs table
first, then the declared order), Qdrant collections, Redis key patterns and temp directories. A hard
reset empties the soft targets and then its own ``hard:`` ones.

Decisions, each for a reason:

- Tables are emptied with ``DELETE FROM`` in the declared order, in one transaction per database: all of
  a database's tables or none of them. Not TRUNCATE: it takes an ACCESS EXCLUSIVE lock, refuses a table
  that another references unless all go in one statement (or CASCADE, which empties tables nobody
  declared), skips ON DELETE triggers and reports no row count. The plan refuses an order in which a
  table is emptied before one that references it, and a table outside the reset that references one in
  it (its rows would block the delete, or be cascaded away unseen).
- A reset empties whatever its targets hold when it runs, so counts are shown but are not drift; what
  is drift is a target that is no longer the same thing: a table's OID (dropped and re-created gives a
  new one) and a collection's vector config and payload indexes (Qdrant keeps no creation id: a
  collection re-created identically cannot be told apart, and deleting its points is then what the
  plan said). A changed identity stops the run before anything is deleted.
- Qdrant collections are emptied by deleting their points in batches by id (scroll, delete, again);
  a collection is never deleted or re-created, so its config and payload indexes stay.
- Redis keys go with SCAN MATCH + UNLINK, one SCAN page at a time; never KEYS or FLUSHDB.
- Files go through services/files.py: exactly the files the plan listed, each only if unchanged.
- A hard reset needs a good, verified backup younger than ``reset.backup_max_age`` of every component
  ``/ops backup`` covers, or takes and verifies them itself first (``--backup-first``); it snapshots each
  Qdrant collection where the server can, before deleting anything.
- A failure stops the run at that target; the message says per target what was done, what was not and,
  when a commit's fate is unknown (the connection dropped during it), says that.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal

import asyncpg  # asyncpg ships no type information
import redis.asyncio as aioredis
import structlog
from redis.exceptions import RedisError

from services.errors import CommandError
from services.failures import network_problem, short_error
from services.files import FileDeletion, FileScan, PlannedFile, RootRefused, delete_planned, root_identity, scan
from services.inventory import (
    Inventory,
    PostgresComponent,
    QdrantComponent,
    RedisComponent,
    ResetFiles,
    ResetSettings,
)
from services.plan_lists import PlanLists
from services.probes._common import scrubber
from services.probes.postgres import login_problem
from services.probes.redis import redis_problem
from services.redaction import Redactor
from services.sql import relation
from services.state import BackupRecord, BackupState
from services.text import ago, human_bytes

if TYPE_CHECKING:
    from qdrant_client import AsyncQdrantClient

    from services.backup.runner import BackupRunner

log = structlog.get_logger(__name__)

Mode = Literal["soft", "hard"]
LOCK_TIMEOUT_MS = 10_000  # a table locked by someone else fails the run instead of hanging it
QDRANT_BATCH = 1000  # point ids deleted per request
SCAN_COUNT = 1000  # SCAN's COUNT hint, for counting and for removing
SCAN_CALLS = 1000  # SCAN calls one count makes at most ("at least N" past it)
FILES_LIMIT = 100_000  # files one plan lists per directory; more are left for the next request
PROGRESS_EVERY = 2.0  # seconds between two progress notes of one target
_FAR_FUTURE = datetime(9999, 1, 1, tzinfo=UTC)

Progress = Callable[[str], Awaitable[None]]


# -- the targets ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class TableTarget:
    component: str
    spec: PostgresComponent
    table: str
    jobs: bool = False

    @property
    def label(self) -> str:
        return f"table {self.component}.{self.table}"


@dataclass(frozen=True)
class CollectionTarget:
    component: str
    spec: QdrantComponent
    collection: str

    @property
    def label(self) -> str:
        return f"collection {self.component}/{self.collection}"


@dataclass(frozen=True)
class KeyTarget:
    component: str
    spec: RedisComponent
    pattern: str

    @property
    def label(self) -> str:
        return f"keys {self.component} {self.pattern}"


@dataclass(frozen=True)
class FileTarget:
    spec: ResetFiles

    @property
    def label(self) -> str:
        return f"files {self.spec.path}" + (f" {self.spec.match}" if self.spec.match != "*" else "")


Target = TableTarget | CollectionTarget | KeyTarget | FileTarget


@dataclass(frozen=True)
class ResetScope:
    """Everything one reset of one service empties, in the order the run empties it."""

    service: str
    mode: Mode
    settings: ResetSettings
    databases: dict[str, list[TableTarget]]
    collections: list[CollectionTarget]
    keys: list[KeyTarget]
    files: list[FileTarget]

    @property
    def targets(self) -> list[Target]:
        found: list[Target] = [t for tables in self.databases.values() for t in tables]
        return [*found, *self.collections, *self.keys, *self.files]

    @property
    def keep(self) -> list[str]:
        return list(self.settings.keep) if self.mode == "soft" else []


def reset_scope(inventory: Inventory, service: str, mode: Mode) -> ResetScope:
    """What ``mode`` empties in ``service``; one sentence when the inventory declares nothing for it."""
    spec = inventory.services[service]
    settings = spec.reset
    if settings is None:
        raise CommandError(
            f"`{service}` has no `reset:` section in the inventory, so a reset would not know what to empty."
        )
    parts = [settings.soft, settings.hard] if mode == "hard" else [settings.soft]
    if all(part.empty for part in parts):
        raise CommandError(f"The `reset:` section of `{service}` declares nothing for a {mode} reset to empty.")
    components = spec.components
    databases: dict[str, list[TableTarget]] = {}
    collections: list[CollectionTarget] = []
    keys: list[KeyTarget] = []
    files: list[FileTarget] = []
    for part in parts:
        for name in part.jobs:
            db = components[name]
            if isinstance(db, PostgresComponent) and db.jobs is not None:
                databases.setdefault(name, []).append(TableTarget(name, db, db.jobs.table, jobs=True))
        for name, tables in part.tables.items():
            db = components[name]
            if isinstance(db, PostgresComponent):
                databases.setdefault(name, []).extend(TableTarget(name, db, t) for t in tables)
        for name, names in part.collections.items():
            qdrant = components[name]
            if isinstance(qdrant, QdrantComponent):
                collections += [CollectionTarget(name, qdrant, c) for c in names]
        for name, patterns in part.redis.items():
            cache = components[name]
            if isinstance(cache, RedisComponent):
                keys += [KeyTarget(name, cache, p) for p in patterns]
        files += [FileTarget(f) for f in part.files]
    return ResetScope(service, mode, settings, databases, collections, keys, files)


class ResetStopped(CommandError):
    """A reset that could not go on; the message says what was done and what was not."""


# -- PostgreSQL ----------------------------------------------------------------------------------

_TABLE_SQL = """
select c.oid::int8 as oid, c.relkind::text as kind, c.reltuples::float8 as reltuples, s.n_live_tup
from pg_class c left join pg_stat_user_tables s on s.relid = c.oid
where c.oid = to_regclass($1)
"""
_REFERENCES_SQL = """
select con.conrelid::int8 as child, con.confrelid::int8 as parent, con.conrelid::regclass::text as child_name,
       con.confrelid::regclass::text as parent_name, con.confdeltype::text as on_delete
from pg_constraint con
where con.contype = 'f' and con.confrelid = any($1::oid[]) and con.conparentid = 0
"""


@asynccontextmanager
async def _postgres(component: str, spec: PostgresComponent, redactor: Redactor) -> AsyncIterator[Any]:
    """One connection to a component's database; a failure to connect is one sentence."""
    dsn = spec.dsn.get_secret_value()
    scrub = scrubber(dsn)
    try:
        conn: Any = await asyncpg.connect(
            dsn, timeout=spec.timeout, server_settings={"application_name": "opsbot reset"}
        )
    except Exception as exc:
        problem = redactor.redact(login_problem(exc, spec.timeout, scrub))
        raise CommandError(f"PostgreSQL `{component}` did not answer: {problem}.") from None
    try:
        yield conn
    finally:
        conn.terminate()


def _pg_problem(exc: BaseException, spec: PostgresComponent, redactor: Redactor) -> str:
    scrub = scrubber(spec.dsn.get_secret_value())
    if isinstance(exc, asyncpg.LockNotAvailableError):
        return f"a table was locked by another session for over {LOCK_TIMEOUT_MS // 1000} s"
    if isinstance(exc, TimeoutError):
        return f"no answer within {spec.timeout:g} s"
    if isinstance(exc, asyncpg.PostgresError):
        return redactor.redact(short_error(exc, scrub))
    return redactor.redact(network_problem(exc) or short_error(exc, scrub))


@dataclass(frozen=True)
class TargetCount:
    """One target as a plan saw it: how much it holds, in words, and its identity (a drift fact)."""

    target: Target
    number: int | None
    exact: bool
    text: str
    identity: str
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return self.exact and self.number == 0


def _estimate(reltuples: float, live: int | None) -> int | None:
    if reltuples < 0 or (reltuples == 0 and live):
        return int(live) if live is not None else None
    return int(reltuples)


async def survey_database(
    component: str, tables: Sequence[TableTarget], *, count_seconds: float, redactor: Redactor
) -> list[TargetCount]:
    """Each table's OID and rows (exact within ``count_seconds``, else the planner's estimate, said so);
    CommandError for a missing table or a foreign key the declared order would break."""
    spec = tables[0].spec
    found: list[TargetCount] = []
    async with _postgres(component, spec, redactor) as conn:
        try:
            oids: dict[int, TableTarget] = {}
            for target in tables:
                row = await conn.fetchrow(_TABLE_SQL, relation(target.table), timeout=spec.timeout)
                if row is None or row["kind"] not in ("r", "p"):
                    raise CommandError(
                        f"PostgreSQL `{component}` has no table `{target.table}` (declared in the reset section); "
                        "nothing was planned."
                        if row is None
                        else f"`{component}.{target.table}` is not a table; nothing was planned."
                    )
                oids[int(row["oid"])] = target
                number, exact, text = await _count_rows(conn, target, row, count_seconds)
                found.append(TargetCount(target, number, exact, text, f"oid {int(row['oid'])}"))
            await _check_references(conn, component, oids, spec.timeout)
        except CommandError:
            raise
        except Exception as exc:
            problem = _pg_problem(exc, spec, redactor)
            raise CommandError(f"PostgreSQL `{component}` failed while planning: {problem}.") from None
    return found


async def _count_rows(conn: Any, target: TableTarget, row: Any, seconds: float) -> tuple[int | None, bool, str]:
    try:
        async with conn.transaction(readonly=True):
            await conn.execute(f"set local statement_timeout = {max(1, int(seconds * 1000))}")
            number = int(await conn.fetchval(f"select count(*) from {relation(target.table)}"))  # noqa: S608
        return number, True, f"{number:,} row(s)"
    except asyncpg.QueryCanceledError:
        guess = _estimate(float(row["reltuples"]), row["n_live_tup"])
        shown = f"about {guess:,}" if guess is not None else "an unknown number of"
        return guess, False, f"{shown} row(s) (an estimate: counting them took over {seconds:g} s)"


async def _check_references(conn: Any, component: str, oids: Mapping[int, TableTarget], seconds: float) -> None:
    order = {oid: index for index, oid in enumerate(oids)}
    rows = await conn.fetch(_REFERENCES_SQL, list(oids), timeout=seconds)
    for row in sorted(rows, key=lambda r: (r["parent_name"], r["child_name"])):
        child, parent = int(row["child"]), int(row["parent"])
        if child == parent:
            continue  # a table referring to itself is emptied by one statement
        parent_name, child_name = str(row["parent_name"]), str(row["child_name"])
        if child not in order:
            what = "would be deleted with it, unseen" if row["on_delete"] == "c" else "would block the delete"
            raise CommandError(
                f"`{component}.{child_name}` references `{parent_name}` but is not emptied by this reset: its rows "
                f"{what}; declare it (before `{parent_name}`) or keep `{parent_name}`. Nothing was planned."
            )
        if order[child] > order[parent]:
            raise CommandError(
                f"The reset empties `{component}.{parent_name}` before `{child_name}`, which references it; "
                f"list `{child_name}` first. Nothing was planned."
            )


async def table_identities(component: str, tables: Sequence[TableTarget], redactor: Redactor) -> dict[str, str]:
    """Each table's identity now: ``oid N``, ``missing``, or why it cannot be checked."""
    try:
        async with _postgres(component, tables[0].spec, redactor) as conn:
            found: dict[str, str] = {}
            for target in tables:
                oid = await conn.fetchval(
                    "select to_regclass($1)::oid::int8", relation(target.table), timeout=target.spec.timeout
                )
                found[target.label] = f"oid {oid}" if oid is not None else "missing"
            return found
    except CommandError as exc:
        return {t.label: f"cannot check: {exc.message}" for t in tables}
    except Exception as exc:
        why = _pg_problem(exc, tables[0].spec, redactor)
        return {t.label: f"cannot check: {why}" for t in tables}


# -- Qdrant --------------------------------------------------------------------------------------


def _qdrant_client(component: str, spec: QdrantComponent) -> AsyncQdrantClient:
    from services.probes.qdrant import default_qdrant_client

    try:
        return default_qdrant_client(spec)
    except (ValueError, RuntimeError, OSError) as exc:
        scrub = scrubber(spec.api_key.get_secret_value() if spec.api_key else "")
        raise CommandError(f"Cannot open Qdrant `{component}`: {short_error(exc, scrub)}.") from None


def _qdrant_problem(exc: Exception, spec: QdrantComponent, redactor: Redactor) -> str:
    from services.probes.qdrant import qdrant_problem

    scrub = scrubber(spec.api_key.get_secret_value() if spec.api_key else "")
    return redactor.redact(qdrant_problem(exc, spec.timeout, scrub))


def collection_identity(info: Any) -> str:
    """A digest of a collection's vector config and payload indexes (Qdrant keeps no creation id)."""
    params = info.config.params
    shape = {
        "vectors": json.loads(json.dumps(params.vectors, default=_plain)),
        "sparse": json.loads(json.dumps(params.sparse_vectors, default=_plain)),
        "shards": params.shard_number,
        "indexes": {k: str(getattr(v, "data_type", v)) for k, v in sorted((info.payload_schema or {}).items())},
    }
    digest = hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:16]
    return f"config {digest}"


def _plain(value: Any) -> Any:
    dump = getattr(value, "model_dump", None)
    return dump(mode="json", exclude_none=True) if dump is not None else str(value)


async def _collection_info(client: AsyncQdrantClient, target: CollectionTarget, redactor: Redactor) -> Any:
    from services.probes.qdrant import missing_collection

    try:
        async with asyncio.timeout(target.spec.timeout):
            return await client.get_collection(target.collection)
    except TimeoutError:
        raise CommandError(f"Qdrant `{target.component}` did not answer within {target.spec.timeout:g} s.") from None
    except Exception as exc:
        if missing_collection(exc):
            raise CommandError(f"Qdrant `{target.component}` has no collection `{target.collection}`.") from None
        problem = _qdrant_problem(exc, target.spec, redactor)
        raise CommandError(f"Qdrant `{target.component}` did not answer: {problem}.") from None


async def survey_collection(target: CollectionTarget, *, count_seconds: float, redactor: Redactor) -> TargetCount:
    """Points in a collection (exact within ``count_seconds``, else Qdrant's figure, said so) and its identity."""
    client = _qdrant_client(target.component, target.spec)
    try:
        info = await _collection_info(client, target, redactor)
        try:
            async with asyncio.timeout(count_seconds):
                number = (await client.count(target.collection, exact=True)).count
            text = f"{number:,} point(s)"
            exact = True
        except Exception:
            number = info.points_count
            exact = False
            text = f"about {number or 0:,} point(s) (Qdrant's own figure: an exact count took too long or failed)"
        return TargetCount(target, number, exact, text, collection_identity(info))
    finally:
        await client.close()


async def collection_identities(targets: Sequence[CollectionTarget], redactor: Redactor) -> dict[str, str]:
    found: dict[str, str] = {}
    for target in targets:
        try:
            client = _qdrant_client(target.component, target.spec)
        except CommandError as exc:
            found[target.label] = f"cannot check: {exc.message}"
            continue
        try:
            found[target.label] = collection_identity(await _collection_info(client, target, redactor))
        except CommandError as exc:
            found[target.label] = "missing" if "has no collection" in exc.message else f"cannot check: {exc.message}"
        finally:
            await client.close()
    return found


async def snapshot(target: CollectionTarget, redactor: Redactor) -> tuple[str | None, str]:
    """Ask Qdrant for a snapshot of the collection: its name, or None and why not (as a phrase)."""
    try:
        client = _qdrant_client(target.component, target.spec)
    except CommandError as exc:
        return None, exc.message
    try:
        async with asyncio.timeout(max(60.0, target.spec.timeout)):
            made = await client.create_snapshot(target.collection, wait=True)
    except TimeoutError:
        return None, "Qdrant did not finish a snapshot within 60 s"
    except NotImplementedError:
        return None, "this Qdrant (local mode) makes no snapshots"
    except Exception as exc:
        return None, f"Qdrant could not make one ({_qdrant_problem(exc, target.spec, redactor)})"
    finally:
        await client.close()
    if made is None:
        return None, "Qdrant answered without naming a snapshot"
    return str(made.name), "ok"


async def empty_collection(target: CollectionTarget, identity: str, redactor: Redactor, progress: Progress) -> int:
    """Delete every point, a batch of ids at a time; the collection, its config and indexes stay.

    ResetStopped says how many were deleted before a failure."""
    from qdrant_client import models

    client = _qdrant_client(target.component, target.spec)
    deleted = 0
    noted = time.monotonic()
    try:
        info = await _collection_info(client, target, redactor)
        if collection_identity(info) != identity:
            raise ResetStopped(f"`{target.collection}` is not the collection the plan saw (its config changed)")
        previous: list[Any] = []
        while True:
            async with asyncio.timeout(target.spec.timeout * 4):
                points, _ = await client.scroll(
                    target.collection, limit=QDRANT_BATCH, with_payload=False, with_vectors=False
                )
            ids = [p.id for p in points]
            if not ids:
                return deleted
            if ids[: len(previous)] == previous[: len(ids)] and previous:
                raise ResetStopped(f"Qdrant kept points it had just been told to delete ({deleted:,} deleted)")
            async with asyncio.timeout(target.spec.timeout * 4):
                await client.delete(target.collection, points_selector=models.PointIdsList(points=ids), wait=True)
            deleted += len(ids)
            previous = ids
            if time.monotonic() - noted >= PROGRESS_EVERY:
                noted = time.monotonic()
                await progress(f"{target.label}: {deleted:,} point(s) deleted…")
    except ResetStopped:
        raise
    except CommandError as exc:
        raise ResetStopped(f"{exc.message} ({deleted:,} point(s) deleted before that)") from None
    except TimeoutError:
        raise ResetStopped(
            f"Qdrant `{target.component}` did not answer in time ({deleted:,} point(s) deleted before that)"
        ) from None
    except Exception as exc:
        problem = _qdrant_problem(exc, target.spec, redactor)
        raise ResetStopped(
            f"Qdrant `{target.component}` failed: {problem} ({deleted:,} point(s) deleted before that)"
        ) from None
    finally:
        await client.close()


# -- Redis ---------------------------------------------------------------------------------------


def _redis(target: KeyTarget) -> aioredis.Redis:
    try:
        return aioredis.from_url(
            target.spec.url.get_secret_value(),
            socket_timeout=target.spec.timeout,
            socket_connect_timeout=target.spec.timeout,
        )
    except ValueError as exc:
        raise CommandError(f"The URL of Redis `{target.component}` is not valid ({type(exc).__name__}).") from None


def _redis_problem(exc: BaseException, target: KeyTarget, redactor: Redactor) -> str:
    return redactor.redact(redis_problem(exc, target.spec.timeout, scrubber(target.spec.url.get_secret_value())))


def key_identity(target: KeyTarget) -> str:
    return f"pattern {target.pattern}"


async def survey_keys(target: KeyTarget, *, seconds: float, redactor: Redactor) -> TargetCount:
    """Keys matching the pattern: SCAN MATCH, bounded in calls and time ("at least N" when bounded)."""
    client = _redis(target)
    number = calls = 0
    cursor: int = 0
    started = time.monotonic()
    try:
        while True:
            cursor, keys = await client.scan(cursor, match=target.pattern, count=SCAN_COUNT)
            number += len(keys)
            calls += 1
            if cursor == 0:
                return TargetCount(target, number, True, f"{number:,} key(s)", key_identity(target))
            if calls >= SCAN_CALLS or time.monotonic() - started > seconds:
                why = f"{calls:,} SCAN calls" if calls >= SCAN_CALLS else f"{seconds:g} s"
                text = f"at least {number:,} key(s) (the count stopped after {why}; the run removes them all)"
                return TargetCount(target, number, False, text, key_identity(target))
    except (RedisError, OSError, TimeoutError) as exc:
        raise CommandError(
            f"Redis `{target.component}` did not answer: {_redis_problem(exc, target, redactor)}."
        ) from None
    finally:
        await client.aclose()


async def empty_keys(target: KeyTarget, redactor: Redactor, progress: Progress) -> int:
    """UNLINK every key matching the pattern, one SCAN page at a time; ResetStopped says how many went."""
    client = _redis(target)
    removed = 0
    cursor: int = 0
    noted = time.monotonic()
    try:
        while True:
            cursor, keys = await client.scan(cursor, match=target.pattern, count=SCAN_COUNT)
            if keys:
                removed += int(await client.unlink(*keys))
            if cursor == 0:
                return removed
            if time.monotonic() - noted >= PROGRESS_EVERY:
                noted = time.monotonic()
                await progress(f"{target.label}: {removed:,} key(s) removed…")
    except (RedisError, OSError, TimeoutError) as exc:
        raise ResetStopped(
            f"Redis `{target.component}` failed: {_redis_problem(exc, target, redactor)} "
            f"({removed:,} key(s) removed before that)"
        ) from None
    finally:
        await client.aclose()


# -- files ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FilesPlan(FileScan):
    """The files of one temp directory a plan lists (or why the directory is skipped)."""

    refused: str | None = None


def survey_files(target: FileTarget) -> FilesPlan:
    """Every regular file matching under the directory (blocking: run it in a thread)."""
    spec = target.spec
    try:
        found = scan(spec.path, match=spec.match, older_than=_FAR_FUTURE, recursive=spec.recursive, limit=FILES_LIMIT)
    except RootRefused as exc:
        return FilesPlan(str(spec.path), "", (), 0, 0, (), 0, refused=exc.message)
    return FilesPlan(
        found.root, found.root_id, found.files, found.total, found.total_bytes, found.skipped, found.skipped_total
    )


def files_identity(root_id: str, ref: str, count: int) -> str:
    return f"root {root_id}, {count} file(s) listed, list {ref}"


async def files_identity_now(target: FileTarget, ref: str, lists: PlanLists) -> str:
    """The directory's identity now, with whether the plan's list is still there and intact."""
    try:
        _, root_id = await asyncio.to_thread(root_identity, target.spec.path)
    except RootRefused as exc:
        return f"refused: {exc.message}"
    try:
        listed = len(await lists.load(ref))
    except CommandError as exc:
        return exc.message
    return files_identity(root_id, ref, listed)


async def empty_files(target: FileTarget, root_id: str, planned: Sequence[PlannedFile]) -> FileDeletion:
    try:
        return await asyncio.to_thread(delete_planned, target.spec.path, root_id, planned)
    except RootRefused as exc:
        raise ResetStopped(f"{exc.message}; none of its files was deleted") from None


# -- backups -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BackupCheck:
    """Whether one component has a good, verified backup young enough for a hard reset."""

    component: str
    record: BackupRecord | None
    problem: str | None

    @property
    def fact(self) -> str:
        return "a good, verified backup is young enough" if self.problem is None else self.problem


def _age(delta: timedelta) -> str:
    return ago(delta).removesuffix(" ago")


def max_age_text(age: timedelta) -> str:
    minutes = int(age.total_seconds() // 60)
    if minutes % 1440 == 0:
        return f"{minutes // 1440} d"
    return f"{minutes // 60} h" if minutes % 60 == 0 else f"{minutes} min"


async def check_backups(runner: BackupRunner, service: str, max_age: timedelta) -> list[BackupCheck]:
    """Each backed-up component's newest good, verified backup younger than ``max_age``, or why there is none."""
    now = runner.clock()
    checks: list[BackupCheck] = []
    for component in runner.components(service):
        records = await runner.store.list_backups(
            service=service, component=component, states=[BackupState.GOOD], limit=50
        )
        fresh = [r for r in records if now - r.started_at <= max_age]
        verified = [r for r in fresh if r.verify_result.startswith("ok")]
        if verified:
            checks.append(BackupCheck(component, verified[0], None))
        elif not records:
            checks.append(BackupCheck(component, None, f"`{component}` has no good backup"))
        elif not fresh:
            newest = records[0]
            checks.append(BackupCheck(component, newest, (
                f"`{component}`'s newest good backup `{newest.id}` is {_age(now - newest.started_at)} old, "
                f"older than {max_age_text(max_age)}"
            )))  # fmt: skip
        else:
            newest = fresh[0]
            state = "failed verification" if newest.verify_result.startswith("failed") else "is not verified"
            checks.append(BackupCheck(component, newest, f"`{component}`'s backup `{newest.id}` {state}"))
    return checks


async def backup_first(runner: BackupRunner, service: str, requested_by: str, progress: Progress) -> list[BackupRecord]:
    """Back up and verify every backed-up component; ResetStopped (nothing deleted) if one fails."""
    taken: list[BackupRecord] = []

    def so_far() -> str:
        return f" (taken and verified before it: {', '.join(f'`{r.id}`' for r in taken)})" if taken else ""

    for component in runner.components(service):
        await progress(f"Backing up {service}/{component} before the reset…")
        try:
            record = await runner.backup(service, component, trigger="safety", requested_by=requested_by)
        except CommandError as exc:
            raise ResetStopped(
                f"Nothing was deleted: the backup of `{component}` failed: {exc.message}{so_far()}"
            ) from None
        await progress(f"Verifying backup `{record.id}`…")
        try:
            checked = await runner.verify(record.id)
        except CommandError as exc:
            raise ResetStopped(
                f"Nothing was deleted: backup `{record.id}` of `{component}` could not be verified: {exc.message}"
                f"{so_far()}"
            ) from None
        if not checked.ok:
            raise ResetStopped(
                f"Nothing was deleted: backup `{record.id}` of `{component}` failed verification: {checked.summary}"
                f"{so_far()}"
            )
        taken.append(checked.record)
    return taken


# -- the run -------------------------------------------------------------------------------------


@dataclass
class Ledger:
    """What a run did, target by target, for its result or its failure message."""

    done: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def stopped(self, scope: ResetScope, at: str, why: str, not_started: Sequence[str]) -> ResetStopped:
        what = f"{scope.mode.capitalize()} reset of {scope.service}"
        lines = [f"{what} stopped at {at}: {why}."]
        lines += [f"done — {line}" for line in self.done]
        lines += [f"note — {line}" for line in self.notes]
        lines += [f"not done — {label}" for label in not_started]
        if not self.done:
            lines.append("Nothing was deleted before it.")
        return ResetStopped("\n".join(lines))


async def empty_database(
    component: str,
    tables: Sequence[TableTarget],
    identities: Mapping[str, str],
    redactor: Redactor,
    progress: Progress,
) -> list[tuple[TableTarget, int]]:
    """DELETE every table of one database in the declared order, in one transaction.

    ResetStopped if a table is not the one planned, or on any failure: before the commit nothing of
    this database is deleted; a connection lost during the commit leaves it unknown, and says so."""
    spec = tables[0].spec
    deleted: list[tuple[TableTarget, int]] = []
    committing = False
    try:
        async with _postgres(component, spec, redactor) as conn:
            transaction = conn.transaction()
            await transaction.start()
            await conn.execute(f"set local lock_timeout = {LOCK_TIMEOUT_MS}")
            await conn.execute("set local statement_timeout = 0")
            for target in tables:
                oid = await conn.fetchval("select to_regclass($1)::oid::int8", relation(target.table))
                now = f"oid {oid}" if oid is not None else "missing"
                if now != identities.get(target.label):
                    raise ResetStopped(
                        f"`{target.table}` is not the table the plan saw ({identities.get(target.label)} → {now}); "
                        f"nothing of database `{component}` was deleted (its transaction was rolled back)"
                    )
                status = await conn.execute(f"delete from {relation(target.table)}")  # noqa: S608
                deleted.append((target, int(str(status).split()[-1])))
                await progress(f"{target.label}: {deleted[-1][1]:,} row(s) deleted (not committed yet)…")
            committing = True
            await transaction.commit()
    except ResetStopped:
        raise
    except CommandError as exc:
        raise ResetStopped(f"{exc.message} Nothing of database `{component}` was deleted") from None
    except Exception as exc:
        problem = _pg_problem(exc, spec, redactor)
        if committing:
            raise ResetStopped(
                f"PostgreSQL `{component}` failed during the commit ({problem}): whether its deletes were committed "
                "is unknown — check the tables before anything else"
            ) from None
        raise ResetStopped(
            f"PostgreSQL `{component}` failed: {problem}; nothing of database `{component}` was deleted "
            "(its transaction was rolled back)"
        ) from None
    return deleted


async def run_reset(
    scope: ResetScope,
    *,
    identities: Mapping[str, str],
    files: Mapping[str, Mapping[str, Any]],
    lists: PlanLists,
    runner: BackupRunner | None,
    take_backups: bool,
    requested_by: str,
    redactor: Redactor,
    progress: Progress,
) -> Ledger:
    """Run a planned reset: backups (hard, --backup-first), snapshots (hard), then tables, collections,
    keys and files in that order. ResetStopped at the first failure, saying what was and wasn't done."""
    ledger = Ledger()
    if scope.mode == "hard" and take_backups:
        if runner is None:
            raise ResetStopped(
                "Nothing was deleted: backups are not set up in this bot, so --backup-first cannot work."
            )
        for record in await backup_first(runner, scope.service, requested_by, progress):
            ledger.notes.append(f"backup `{record.id}` of {record.component} taken and verified ({record.location})")
    if scope.mode == "hard":
        for target in scope.collections:
            await progress(f"Snapshot of {target.label}…")
            name, why = await snapshot(target, redactor)
            if name is not None:
                ledger.notes.append(f"{target.label}: snapshot `{name}` taken first (restorable from it)")
            elif scope.settings.require_snapshot:
                raise ledger.stopped(scope, target.label, f"no snapshot: {why}; `require_snapshot` is set, so "
                                     "nothing was deleted", [t.label for t in scope.targets])  # fmt: skip
            else:
                ledger.notes.append(
                    f"{target.label}: no snapshot — {why}; its vectors can only be rebuilt by re-indexing"
                )
    remaining = [t.label for t in scope.targets]

    def finished(label: str, line: str) -> None:
        ledger.done.append(line)
        remaining.remove(label)

    for component, tables in scope.databases.items():
        await progress(f"Emptying {len(tables)} table(s) of {component} in one transaction…")
        try:
            deleted = await empty_database(component, tables, identities, redactor, progress)
        except ResetStopped as exc:
            raise ledger.stopped(scope, f"database {component}", exc.message, remaining) from None
        for table, rows in deleted:
            finished(table.label, f"{table.label}: deleted {rows:,} row(s)")
    for target in scope.collections:
        await progress(f"Emptying {target.label}…")
        try:
            points = await empty_collection(target, identities.get(target.label, ""), redactor, progress)
        except ResetStopped as exc:
            raise ledger.stopped(scope, target.label, exc.message, remaining) from None
        finished(target.label, f"{target.label}: deleted {points:,} point(s); config and payload indexes kept")
    for key_target in scope.keys:
        await progress(f"Removing {key_target.label}…")
        try:
            removed = await empty_keys(key_target, redactor, progress)
        except ResetStopped as exc:
            raise ledger.stopped(scope, key_target.label, exc.message, remaining) from None
        finished(key_target.label, f"{key_target.label}: removed {removed:,} key(s)")
    for file_target in scope.files:
        planned_files = files.get(file_target.label)
        if planned_files is None:
            finished(file_target.label, f"{file_target.label}: nothing was planned there")
            continue
        listed = [PlannedFile.from_stored(json.loads(item)) for item in await lists.load(str(planned_files["ref"]))]
        try:
            done = await empty_files(file_target, str(planned_files["root_id"]), listed)
        except ResetStopped as exc:
            raise ledger.stopped(scope, file_target.label, exc.message, remaining) from None
        line = (
            f"{file_target.label}: deleted {len(done.deleted):,} of {len(listed):,} file(s) ({human_bytes(done.freed)})"
        )
        if done.skipped:
            line += (
                f"; kept {len(done.skipped):,}: "
                + "; ".join(done.skipped[:10])
                + (" …" if len(done.skipped) > 10 else "")
            )
        finished(file_target.label, line)
    return ledger


def stored_file(planned: PlannedFile) -> str:
    return json.dumps(planned.stored(), separators=(",", ":"), ensure_ascii=False)
