"""Runbook 003's ``check-data-fix``: delete the orphan vectors the integrity check found and reset its stale jobs.

The plan is the check's own findings, saved beside the approval (services/plan_lists.py): every orphan point
id, streamed from the check as it is found, one list per collection, and the stale jobs it flagged (over the
integrity threshold, so a fixed warning clears). The run re-reads what the plan names (the tables' and
collections' identities, the lists themselves: the drift check), takes a snapshot of each collection where
the server takes one, then deletes only planned points that are *still* orphans (the point is there and its
chunk is not), in batches by id, and resets only planned jobs still stale, in one UPDATE; what it leaves
alone it reports. Then it runs the check again. When Qdrant or PostgreSQL fails part way, the error says
what was done and what was not.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg  # asyncpg ships no type information
from qdrant_client import AsyncQdrantClient
from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse
from qdrant_client.models import PayloadSelectorInclude, PointIdsList

from services.errors import CommandError
from services.failures import network_problem, short_error
from services.health import Status
from services.integrity import (
    ChunkDiff,
    IntegrityChecker,
    IntegrityReport,
    IntegrityTarget,
    QdrantFactory,
    chunk_id_type,
    chunks_back,
    minutes_text,
)
from services.inventory import ChunkVectors, PayloadId, PostgresComponent, QdrantComponent, secrets_in
from services.jobs import JobsClient
from services.plan_lists import PlanList, PlanLists, PlanListWriter
from services.probes.qdrant import default_qdrant_client
from services.redaction import Redactor
from services.sql import relation

log = logging.getLogger(__name__)

BATCH = 500  # point ids per retrieve/delete request
SNAPSHOT_TIMEOUT = 600.0  # seconds a snapshot of a large collection may take
JOBS_FACT = "stale jobs"
_UNAVAILABLE = (502, 503, 504)  # a gateway's or an overloaded server's answer, not "no snapshots here"

Report = Callable[[str], Awaitable[None]]


def orphans_fact(collection: str) -> str:
    return f"orphan ids of {collection}"


# -- the plan --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlannedOrphans:
    """The orphan vectors of one collection: where they are, and their saved id list."""

    collection: str
    table: str
    mapping: str
    points: int  # points in the collection when checked
    saved: PlanList


@dataclass(frozen=True)
class PlannedJobs:
    """The stale jobs to reset: where, the threshold, and their saved id list (oldest first)."""

    component: str
    table: str
    minutes: int
    total: int  # stale when checked; more than ``saved.count`` when the check kept only the oldest
    saved: PlanList


@dataclass(frozen=True)
class FixPlan:
    """What `/ops integrity fix` would do, from one integrity check, and the facts the run re-reads."""

    report: IntegrityReport
    orphans: tuple[PlannedOrphans, ...]
    jobs: PlannedJobs | None
    facts: Mapping[str, str]

    @property
    def empty(self) -> bool:
        return not self.orphans and self.jobs is None

    @property
    def count(self) -> int:
        """Items the fix deletes or resets: the ceiling of a pre-approval."""
        return sum(o.saved.count for o in self.orphans) + (self.jobs.saved.count if self.jobs else 0)

    @property
    def total(self) -> int | None:
        """Points in the compared collections (what the orphans are deleted from), for a share ceiling."""
        diffs = self.report.diffs
        return sum(d.points for d in diffs) if diffs else None

    @property
    def missing(self) -> tuple[ChunkDiff, ...]:
        """Comparisons with chunks that have no vector (not fixed here: they need re-indexing)."""
        return tuple(d for d in self.report.diffs if d.missing.count)

    def params(self) -> dict[str, Any]:
        """The plan as JSON, for the approval row (the lists stay beside it)."""
        return {
            "orphans": [
                {"collection": o.collection, "table": o.table, "ref": o.saved.ref, "count": o.saved.count}
                for o in self.orphans
            ],
            "jobs": None
            if self.jobs is None
            else {
                "component": self.jobs.component,
                "table": self.jobs.table,
                "minutes": self.jobs.minutes,
                "ref": self.jobs.saved.ref,
                "count": self.jobs.saved.count,
            },
        }


# -- the run's result ------------------------------------------------------------------------------


@dataclass
class CollectionRun:
    """What the run did to one collection."""

    collection: str
    planned: int
    snapshot: str | None = None  # its name, when one was taken
    no_snapshot: str = ""  # why not
    deleted: int = 0
    back: list[str] = field(default_factory=list)  # planned ids whose chunk is back: left alone
    gone: list[str] = field(default_factory=list)  # planned ids no longer in the collection
    checked: int = 0  # planned ids handled so far


@dataclass
class JobsRun:
    planned: int
    reset: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    done: bool = False


@dataclass
class FixRun:
    """The run so far: enough to say exactly what was and was not done if it stops part way."""

    collections: list[CollectionRun]
    jobs: JobsRun | None
    recheck: IntegrityReport | None = None

    def done_text(self) -> str:
        parts = []
        for c in self.collections:
            if c.snapshot:
                parts.append(f"snapshot `{c.snapshot}` of `{c.collection}` taken")
            if c.checked:
                parts.append(f"{c.deleted:,} of {c.planned:,} planned orphan vector(s) deleted from `{c.collection}`")
        if self.jobs is not None and self.jobs.done:
            parts.append(f"{len(self.jobs.reset):,} of {self.jobs.planned:,} stale job(s) reset")
        return "; ".join(parts) if parts else "nothing"

    def not_done_text(self) -> str:
        parts = [
            f"{c.planned - c.checked:,} planned orphan vector(s) of `{c.collection}` not deleted"
            for c in self.collections
            if c.checked < c.planned
        ]
        if self.jobs is not None and not self.jobs.done:
            parts.append(f"{self.jobs.planned:,} stale job(s) not reset")
        return "; ".join(parts) if parts else "nothing"


def _sample(ids: Sequence[str], n: int = 20) -> str:
    return ", ".join(ids[:n]) + (" …" if len(ids) > n else "")


def _point_id(text: str) -> int | str:
    return int(text) if text.isascii() and text.isdigit() else text


class _Stopped(Exception):
    """A step failed; the message says which and why (no secrets)."""


# -- the fixer -------------------------------------------------------------------------------------


class IntegrityFixer:
    """Plans and runs `/ops integrity fix` for one service's integrity target."""

    def __init__(
        self,
        redactor: Redactor,
        lists: PlanLists,
        *,
        qdrant_factory: QdrantFactory | None = None,
        batch: int = BATCH,
        checker: IntegrityChecker | None = None,
    ) -> None:
        self._redactor = redactor
        self._lists = lists
        self._factory = qdrant_factory
        self._batch = batch
        self._checker = checker or IntegrityChecker(redactor, qdrant_factory=qdrant_factory)

    # -- helpers -----------------------------------------------------------------------------------

    def _scrub(self, target: IntegrityTarget) -> Redactor:
        found = secrets_in(target.database.dsn.get_secret_value())
        if target.jobs is not None:
            found |= secrets_in(target.jobs.dsn.get_secret_value())
        if target.qdrant is not None and target.qdrant.api_key is not None:
            found |= secrets_in(target.qdrant.api_key.get_secret_value())
        return Redactor(found)

    def _say(self, exc: BaseException, scrub: Redactor) -> str:
        if isinstance(exc, TimeoutError | asyncpg.QueryCanceledError):
            return "no answer in time"
        if isinstance(exc, UnexpectedResponse):
            if exc.status_code in (401, 403):
                return "the API key was refused"
            return f"Qdrant answered {exc.status_code} {exc.reason_phrase}".strip()
        if isinstance(exc, asyncpg.InvalidPasswordError | asyncpg.InvalidAuthorizationSpecificationError):
            return "the login was refused"
        source = exc.source if isinstance(exc, ResponseHandlingException) else exc
        found = network_problem(source)
        return found or self._redactor.redact(short_error(source, scrub))

    @contextlib.asynccontextmanager
    async def _pg(self, spec: PostgresComponent, scrub: Redactor, what: str) -> AsyncIterator[Any]:
        try:
            async with asyncio.timeout(spec.timeout):
                conn: Any = await asyncpg.connect(
                    spec.dsn.get_secret_value(),
                    timeout=spec.timeout,
                    server_settings={"application_name": "opsbot-integrity-fix"},
                )
        except (asyncpg.ClientConfigurationError, ValueError) as exc:  # its text may hold the password
            raise _Stopped(
                f"cannot connect to {what}: the connection string is not valid ({type(exc).__name__})"
            ) from None
        except Exception as exc:
            raise _Stopped(f"cannot connect to {what}: {self._say(exc, scrub)}") from None
        try:
            yield conn
        finally:
            conn.terminate()  # nothing here is left uncommitted at the end of a block

    @contextlib.asynccontextmanager
    async def _qdrant(
        self, spec: QdrantComponent, scrub: Redactor, seconds: float | None = None
    ) -> AsyncIterator[AsyncQdrantClient]:
        if seconds is not None:
            spec = spec.model_copy(update={"timeout": seconds})
        try:
            client = (self._factory or default_qdrant_client)(spec)
        except (ValueError, RuntimeError, OSError) as exc:
            raise _Stopped(f"cannot open the Qdrant client: {self._say(exc, scrub)}") from None
        try:
            yield client
        finally:
            if self._factory is None:
                with contextlib.suppress(Exception):
                    await client.close()

    # -- identities (the drift check) --------------------------------------------------------------

    async def identities(self, target: IntegrityTarget) -> dict[str, str]:
        """What the planned lists refer to, as it is now: each chunk table's and the jobs table's oid, each
        collection's vector config. A table or collection dropped and made again reads differently."""
        scrub = self._scrub(target)
        facts: dict[str, str] = {}
        try:
            tables = [c.table for c in target.settings.chunks]
            if tables:
                async with self._pg(target.database, scrub, f"the database `{target.database_name}`") as conn:
                    facts |= await self._table_oids(conn, "table", tables, target.database.timeout)
            if target.jobs is not None and target.jobs.jobs is not None:
                async with self._pg(target.jobs, scrub, f"the database `{target.jobs_name}`") as conn:
                    facts |= await self._table_oids(conn, "jobs table", [target.jobs.jobs.table], target.jobs.timeout)
            if target.qdrant is not None and target.settings.chunks:
                async with self._qdrant(target.qdrant, scrub) as client:
                    for name in dict.fromkeys(c.collection for c in target.settings.chunks):
                        facts[f"collection {name}"] = await self._collection_identity(client, name, target.qdrant)
        except _Stopped as exc:
            raise CommandError(f"Cannot read the state of `{target.service}`: {exc}.") from None
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
            raise CommandError(f"Cannot read the state of `{target.service}`: {self._say(exc, scrub)}.") from None
        return facts

    @staticmethod
    async def _table_oids(conn: Any, label: str, tables: list[str], seconds: float) -> dict[str, str]:
        database = await conn.fetchval("select current_database()", timeout=seconds)
        found: dict[str, str] = {}
        for table in dict.fromkeys(tables):
            quoted = relation(table)
            oid = await conn.fetchval("select to_regclass($1)::oid", quoted, timeout=seconds)
            found[f"{label} {table}"] = f"oid {oid} in {database}" if oid is not None else "absent"
        return found

    async def _collection_identity(self, client: AsyncQdrantClient, name: str, spec: QdrantComponent) -> str:
        try:
            async with asyncio.timeout(spec.timeout):
                info = await client.get_collection(name)
        except UnexpectedResponse as exc:
            if exc.status_code == 404:
                return "absent"
            raise _Stopped(f"reading the collection `{name}` failed: {self._say(exc, Redactor())}") from None
        except ValueError as exc:
            if "not found" in str(exc):
                return "absent"
            raise
        except Exception as exc:
            raise _Stopped(f"reading the collection `{name}` failed: {self._say(exc, Redactor())}") from None
        vectors: Any = info.config.params.vectors
        dumped = (
            {k: v.model_dump(mode="json", exclude_none=True) for k, v in vectors.items()}
            if isinstance(vectors, dict)
            else vectors.model_dump(mode="json", exclude_none=True)
            if vectors is not None
            else None
        )
        return "vectors " + json.dumps(dumped, sort_keys=True, separators=(",", ":"))

    # -- planning ----------------------------------------------------------------------------------

    async def plan(self, target: IntegrityTarget) -> FixPlan:
        """Run the check, streaming every orphan id into a saved list; refuse when the check is critical
        (an emptied chunk table, a red or unreachable collection, a missing table: nothing to trust)."""
        collections = [c.collection for c in target.settings.chunks]
        shared = sorted({c for c in collections if collections.count(c) > 1})
        if shared:
            listed = ", ".join(f"`{c}`" for c in shared)
            raise CommandError(
                f"{listed} of `{target.service}` is compared with more than one chunk table "
                "(a vector orphaned from one may belong to another, so `/ops integrity fix` leaves its vectors alone)."
            )
        facts = await self.identities(target)
        async with contextlib.AsyncExitStack() as stack:
            writers: dict[str, PlanListWriter] = {}

            async def sink(collection: str, ids: Sequence[str]) -> None:
                writer = writers.get(collection)
                if writer is None:
                    writer = writers[collection] = await stack.enter_async_context(self._lists.writer())
                await writer.add(ids)

            report = await self._checker.check(target, orphan_sink=sink)
            critical = [line for line in report.lines if line.status is Status.CRITICAL]
            if critical:
                problems = "; ".join(f"{line.name}: {line.detail}" for line in critical)
                raise CommandError(
                    f"The integrity check of `{target.service}` is critical, so no fix is planned "
                    f"(nothing is deleted while it cannot be trusted): {problems}."
                )
            orphans: list[PlannedOrphans] = []
            for diff in report.diffs:
                writer = writers.get(diff.collection)
                if not diff.orphans.count:
                    continue
                if writer is None or writer.count != diff.orphans.count:
                    raise CommandError(
                        f"The orphan ids of `{diff.collection}` were not all saved ({writer.count if writer else 0:,} "
                        f"of {diff.orphans.count:,}); ask for a new plan."
                    )
                saved = await writer.finish()
                orphans.append(PlannedOrphans(diff.collection, diff.table, diff.mapping, diff.points, saved))
        jobs: PlannedJobs | None = None
        stale = report.stale
        if stale is not None and stale.jobs:
            saved_jobs = await self._lists.save(list(stale.ids))
            jobs = PlannedJobs(stale.component, stale.table, stale.threshold_minutes, stale.total, saved_jobs)
        for planned in orphans:
            facts[orphans_fact(planned.collection)] = planned.saved.ref
        if jobs is not None:
            facts[JOBS_FACT] = jobs.saved.ref
        return FixPlan(report, tuple(orphans), jobs, facts)

    async def observe(self, target: IntegrityTarget, params: Mapping[str, Any]) -> dict[str, str]:
        """The plan's facts as they are now: identities, and whether each saved list is there, intact."""
        facts = await self.identities(target)
        for entry in params.get("orphans", []):
            facts[orphans_fact(str(entry["collection"]))] = await self._list_fact(str(entry["ref"]))
        if params.get("jobs"):
            facts[JOBS_FACT] = await self._list_fact(str(params["jobs"]["ref"]))
        return facts

    async def _list_fact(self, ref: str) -> str:
        try:
            await self._lists.load(ref)
        except CommandError as exc:
            return exc.message
        return ref

    # -- running -----------------------------------------------------------------------------------

    async def run(self, target: IntegrityTarget, params: Mapping[str, Any], progress: Report) -> FixRun:
        """Snapshot, delete the planned orphans still orphans, reset the planned jobs still stale, check again.

        CommandError when a step fails, saying what was done and what was not."""
        scrub = self._scrub(target)
        entries = list(params.get("orphans", []))
        jobs_entry = params.get("jobs")
        state = FixRun(
            [CollectionRun(str(e["collection"]), int(e["count"])) for e in entries],
            JobsRun(int(jobs_entry["count"])) if jobs_entry else None,
        )
        chunks = {c.collection: c for c in target.settings.chunks}
        step = "starting"
        try:
            if entries:
                if target.qdrant is None:
                    raise _Stopped(f"`{target.service}` declares no Qdrant component any more")
                step = "taking snapshots"
                await self._snapshots(target.qdrant, state, scrub, progress)
                for entry, run in zip(entries, state.collections, strict=True):
                    chunk = chunks.get(run.collection)
                    if chunk is None:
                        raise _Stopped(f"`{run.collection}` is no longer compared with a chunk table")
                    step = f"deleting orphan vectors from `{run.collection}`"
                    ids = await self._lists.load(str(entry["ref"]))
                    await self._delete(target, chunk, ids, run, scrub, progress)
            if jobs_entry and state.jobs is not None:
                step = "resetting the stale jobs"
                await self._reset(target, jobs_entry, state.jobs, progress)
        except (_Stopped, CommandError) as exc:
            reason = exc.message if isinstance(exc, CommandError) else str(exc)
            raise CommandError(
                f"The fix of `{target.service}` stopped while {step}: {reason.rstrip('.')}. "
                f"Done: {state.done_text()}. Not done: {state.not_done_text()}."
            ) from None
        await progress("Checking the integrity again…")
        state.recheck = await self._checker.check(target)
        return state

    async def _snapshots(self, spec: QdrantComponent, state: FixRun, scrub: Redactor, progress: Report) -> None:
        async with self._qdrant(spec, scrub, max(spec.timeout, SNAPSHOT_TIMEOUT)) as client:
            for run in state.collections:
                await progress(f"Taking a snapshot of `{run.collection}`…")
                try:
                    async with asyncio.timeout(max(spec.timeout, SNAPSHOT_TIMEOUT)):
                        made = await client.create_snapshot(run.collection, wait=True)
                except NotImplementedError:
                    run.no_snapshot = "embedded Qdrant (local mode) takes no snapshots"
                    continue
                except UnexpectedResponse as exc:
                    if exc.status_code in _UNAVAILABLE:  # a proxy or a server that is not there: stop
                        raise _Stopped(
                            f"Qdrant did not answer the snapshot request for `{run.collection}`: "
                            f"{self._say(exc, scrub)}"
                        ) from None
                    # Qdrant answered and took none (no snapshot support, no disk, not allowed).
                    run.no_snapshot = f"Qdrant took none ({self._say(exc, scrub)})"
                    continue
                except Exception as exc:
                    raise _Stopped(
                        f"Qdrant did not answer the snapshot request for `{run.collection}`: {self._say(exc, scrub)}"
                    ) from None
                if made is None:
                    run.no_snapshot = "Qdrant did not name one"
                else:
                    run.snapshot = made.name

    async def _delete(
        self,
        target: IntegrityTarget,
        chunk: ChunkVectors,
        ids: list[str],
        run: CollectionRun,
        scrub: Redactor,
        progress: Report,
    ) -> None:
        spec = target.qdrant
        if spec is None:
            raise _Stopped(f"`{target.service}` declares no Qdrant component any more")
        payload = chunk.vector_id.payload if isinstance(chunk.vector_id, PayloadId) else None
        with_payload: Any = PayloadSelectorInclude(include=[payload]) if payload else False
        seconds = target.database.timeout
        await progress(f"Deleting {len(ids):,} orphan vector(s) from `{run.collection}`…")
        async with (
            self._qdrant(spec, scrub) as client,
            self._pg(target.database, scrub, f"the database `{target.database_name}`") as conn,
        ):
            try:
                _, base = await chunk_id_type(conn, chunk, seconds)
            except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
                raise _Stopped(f"PostgreSQL failed: {self._say(exc, scrub)}") from None
            for start in range(0, len(ids), self._batch):
                batch = ids[start : start + self._batch]
                try:
                    async with asyncio.timeout(spec.timeout):
                        records = await client.retrieve(
                            run.collection, ids=[_point_id(i) for i in batch], with_payload=with_payload,
                            with_vectors=False,
                        )  # fmt: skip
                except Exception as exc:
                    raise _Stopped(f"Qdrant failed: {self._say(exc, scrub)}") from None
                present = {str(r.id): r.payload for r in records}
                try:
                    back = await chunks_back(conn, chunk, base, list(present.items()), seconds)
                except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
                    raise _Stopped(f"PostgreSQL failed: {self._say(exc, scrub)}") from None
                doomed = [i for i in batch if i in present and i not in back]
                if doomed:
                    try:
                        async with asyncio.timeout(spec.timeout):
                            await client.delete(
                                run.collection, points_selector=PointIdsList(points=[_point_id(i) for i in doomed]),
                                wait=True,
                            )  # fmt: skip
                    except Exception as exc:
                        raise _Stopped(f"Qdrant failed: {self._say(exc, scrub)}") from None
                run.deleted += len(doomed)
                run.back += [i for i in batch if i in back]
                run.gone += [i for i in batch if i not in present]
                run.checked += len(batch)
                await progress(
                    f"{run.checked:,} of {run.planned:,} planned orphan vector(s) of `{run.collection}` handled…"
                )
        log.info(
            "integrity fix %s: deleted %d of %d orphan vector(s) from %s (%d with a chunk again, %d already gone)",
            target.service, run.deleted, run.planned, run.collection, len(run.back), len(run.gone),
        )  # fmt: skip

    async def _reset(self, target: IntegrityTarget, entry: Mapping[str, Any], run: JobsRun, progress: Report) -> None:
        if target.jobs is None or target.jobs.jobs is None:
            raise _Stopped(f"`{target.service}` declares no jobs table any more")
        minutes = int(entry["minutes"])
        table = target.jobs.jobs.model_copy(update={"stuck_after_minutes": minutes})
        client = JobsClient(
            target.jobs.dsn.get_secret_value(), table, timeout=target.jobs.timeout, redactor=self._redactor
        )
        ids = await self._lists.load(str(entry["ref"]))
        await progress(f"Resetting {len(ids):,} stale job(s)…")
        message = f"reset by opsbot (integrity fix): in processing for over {minutes_text(minutes)}"
        reset = await client.reset_stuck(ids, message=message)  # one UPDATE; CommandError if the database fails
        done = set(reset)
        run.reset = reset
        run.skipped = [i for i in ids if i not in done]
        run.done = True


def outcome_lines(run: FixRun, pending: str = "pending") -> tuple[str, list[str]]:
    """The run as a summary line and detail lines (the re-check last)."""
    deleted = sum(c.deleted for c in run.collections)
    planned = sum(c.planned for c in run.collections)
    parts = []
    if run.collections:
        parts.append(f"deleted {deleted:,} of {planned:,} planned orphan vector(s)")
    if run.jobs is not None:
        parts.append(f"reset {len(run.jobs.reset):,} of {run.jobs.planned:,} stale job(s) to `{pending}`")
    summary = ("; ".join(parts) or "nothing to do").capitalize() + "."
    details: list[str] = []
    for c in run.collections:
        if c.snapshot:
            details.append(
                f"snapshot of `{c.collection}` taken first: `{c.snapshot}` (recover the collection from it to undo)"
            )
        else:
            details.append(
                f"no snapshot of `{c.collection}`: {c.no_snapshot}; the deleted vectors cannot be restored "
                "from a snapshot"
            )
        details.append(f"`{c.collection}`: deleted {c.deleted:,} of {c.planned:,} planned orphan vector(s)")
        if c.back:
            details.append(f"left alone ({len(c.back):,}, their chunk is back): {_sample(c.back)}")
        if c.gone:
            details.append(f"already gone ({len(c.gone):,}, not counted as deleted): {_sample(c.gone)}")
    if run.jobs is not None:
        if run.jobs.reset:
            details.append(f"jobs reset: {_sample(run.jobs.reset, 50)}")
        if run.jobs.skipped:
            details.append(
                f"jobs left alone ({len(run.jobs.skipped):,}, no longer stale): {_sample(run.jobs.skipped, 50)}"
            )
    if run.recheck is not None:
        details.append(f"integrity check again: {run.recheck.status.label}")
        details += [f"{line.status.label.upper()} {line.name}: {line.detail}" for line in run.recheck.lines]
    return summary, details
