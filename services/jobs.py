"""Jobs tables of runbook 003: count jobs by status, find the stuck ones, reset them to pending."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg  # asyncpg ships no type information

from services.errors import CommandError
from services.failures import network_problem, short_error
from services.inventory import JobsTable, PostgresComponent, secrets_in
from services.redaction import Redactor
from services.sql import quote_ident

log = logging.getLogger(__name__)

# pg_type oids of the two timestamp types a started column may have.
_TIMESTAMP = 1114
_TIMESTAMPTZ = 1184

_COLUMNS_SQL = """
select a.attname::text as name,
       format_type(a.atttypid, a.atttypmod) as sql_type,
       case when t.typtype = 'd' then t.typbasetype else t.oid end as base_type
from pg_class c
left join pg_attribute a
       on a.attrelid = c.oid and a.attnum > 0 and not a.attisdropped and a.attname::text = any($2::text[])
left join pg_type t on t.oid = a.atttypid
where c.oid = to_regclass($1)
"""


@dataclass(frozen=True)
class Job:
    """One row of a jobs table as the bot sees it."""

    id: str
    status: str
    started_at: datetime | None  # aware, UTC


@dataclass(frozen=True)
class JobsSummary:
    """Jobs by status and the ones stuck in processing, as of ``checked_at`` (the database's clock)."""

    counts: dict[str, int]
    stuck: list[Job]
    stuck_total: int
    threshold_minutes: int
    checked_at: datetime


@dataclass(frozen=True)
class _Table:
    """SQL fragments for one jobs table, built from what the catalog says about it."""

    relation: str
    id: str
    id_type: str
    status: str
    started: str
    started_utc: str  # the started column as timestamptz
    now: str  # the current time in the started column's own type
    error: str | None
    error_type: str | None

    def stuck_condition(self, processing: int, minutes: int) -> str:
        """``status = processing and started < now - threshold``, with the given parameter numbers."""
        return f"{self.status} = ${processing} and {self.started} < {self.now} - make_interval(mins => ${minutes}::int)"

    def job_columns(self) -> str:
        return f"{self.id}::text as id, {self.status}::text as status, {self.started_utc} as started_at"


def _job(row: Any) -> Job:
    started = row["started_at"]
    return Job(str(row["id"]), str(row["status"]), started.astimezone(UTC) if started is not None else None)


def _unique(ids: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(str(i) for i in ids))


def _sort_key(job_id: str) -> tuple[int, int, str]:
    return (0, int(job_id), job_id) if job_id.isascii() and job_id.isdigit() else (1, 0, job_id)


def job_facts(jobs: Mapping[str, Job | None]) -> dict[str, str]:
    """``{"job 42": "processing since 2024-05-01T10:00:00+00:00", "job 43": "gone"}``, in a stable order.

    Used as the fingerprint of a plan: two calls on unchanged rows give equal dicts.
    """
    facts: dict[str, str] = {}
    for key in sorted(jobs, key=_sort_key):
        job = jobs[key]
        if job is None:
            facts[f"job {key}"] = "gone"
        elif job.started_at is None:
            facts[f"job {key}"] = f"{job.status}, not started"
        else:
            facts[f"job {key}"] = f"{job.status} since {job.started_at.astimezone(UTC).isoformat()}"
    return facts


class JobsClient:
    """Reads and repairs one jobs table; each call opens its own connection and closes it."""

    def __init__(self, dsn: str, spec: JobsTable, *, timeout: float, redactor: Redactor | None = None) -> None:
        self._dsn = dsn
        self._spec = spec
        self._timeout = timeout
        self._redactor = redactor
        self._scrubber = Redactor(secrets_in(dsn))

    @property
    def spec(self) -> JobsTable:
        return self._spec

    async def summary(self, *, limit: int = 1000) -> JobsSummary:
        """Counts by status and the stuck jobs (oldest first, at most ``limit``) in one snapshot."""
        if limit < 0:
            raise ValueError("limit must not be negative")
        minutes = self._spec.stuck_after_minutes
        async with self._session() as (conn, table), conn.transaction(isolation="repeatable_read", readonly=True):
            checked_at = await conn.fetchval("select now()")
            counts = await conn.fetch(
                f"select coalesce({table.status}::text, '(none)') as status, count(*) as n "  # noqa: S608 (quoted identifiers)
                f"from {table.relation} group by 1 order by 1"
            )
            stuck_total = await conn.fetchval(
                f"select count(*) from {table.relation} where {table.stuck_condition(1, 2)}",  # noqa: S608
                self._spec.processing_value,
                minutes,
            )
            rows = await conn.fetch(
                f"select {table.job_columns()} from {table.relation} "  # noqa: S608
                f"where {table.stuck_condition(1, 2)} order by {table.started}, {table.id} limit $3",
                self._spec.processing_value,
                minutes,
                limit,
            )
        return JobsSummary(
            counts={str(r["status"]): int(r["n"]) for r in counts},
            stuck=[_job(r) for r in rows],
            stuck_total=int(stuck_total),
            threshold_minutes=minutes,
            checked_at=checked_at.astimezone(UTC),
        )

    async def observe(self, ids: Sequence[str]) -> dict[str, Job | None]:
        """The current state of exactly these ids, keyed as given; None when the row is gone."""
        wanted = _unique(ids)
        if not wanted:
            return {}
        async with self._session() as (conn, table):
            canonical = await self._canonical(conn, table, wanted)
            rows = await conn.fetch(
                f"select {table.job_columns()} from {table.relation} "  # noqa: S608
                f"where {table.id} = any($1::text[]::{table.id_type}[])",
                sorted(set(canonical.values())),
            )
        found = {str(r["id"]): _job(r) for r in rows}
        return {given: found.get(canonical[given]) for given in wanted}

    async def reset_stuck(self, ids: Sequence[str], *, message: str) -> list[str]:
        """Put these jobs back to pending if they are still stuck, in one transaction; returns those reset.

        A job that finished or was picked up again since it was listed is left alone.
        """
        wanted = _unique(ids)
        if not wanted:
            return []
        spec = self._spec
        async with self._session() as (conn, table), conn.transaction():
            canonical = await self._canonical(conn, table, wanted)
            assignments = [f"{table.status} = $2", f"{table.started} = null"]
            args: list[Any] = [sorted(set(canonical.values())), spec.pending_value, spec.processing_value]
            args.append(spec.stuck_after_minutes)
            if table.error is not None:
                # An explicit cast to varchar(n) cuts a long message instead of failing the reset.
                assignments.append(f"{table.error} = $5::{table.error_type}")
                args.append(message)
            rows = await conn.fetch(
                f"update {table.relation} set {', '.join(assignments)} "  # noqa: S608
                f"where {table.id} = any($1::text[]::{table.id_type}[]) and {table.stuck_condition(3, 4)} "
                f"returning {table.id}::text as id",
                *args,
            )
        done = {str(r["id"]) for r in rows}
        reset = [given for given in wanted if canonical[given] in done]
        log.info("reset %d stuck job(s) in %s: %s", len(reset), spec.table, ", ".join(reset) or "none")
        return reset

    async def processing_count(self) -> int:
        """How many jobs are in processing now, stuck or not (safe-stop waits for this to reach 0)."""
        async with self._session() as (conn, table):
            count = await conn.fetchval(
                f"select count(*) from {table.relation} where {table.status} = $1",  # noqa: S608 (quoted identifiers)
                self._spec.processing_value,
            )
        return int(count)

    async def reset_processing(self, message: str) -> list[str]:
        """Put every job in processing back to pending, however recent, in one transaction; returns their ids.

        For safe-stop: once the workers are being stopped, no job in processing will finish.
        """
        spec = self._spec
        async with self._session() as (conn, table), conn.transaction():
            assignments = [f"{table.status} = $1", f"{table.started} = null"]
            args: list[Any] = [spec.pending_value, spec.processing_value]
            if table.error is not None:
                # An explicit cast to varchar(n) cuts a long message instead of failing the reset.
                assignments.append(f"{table.error} = $3::{table.error_type}")
                args.append(message)
            rows = await conn.fetch(
                f"update {table.relation} set {', '.join(assignments)} "  # noqa: S608
                f"where {table.status} = $2 returning {table.id}::text as id",
                *args,
            )
        reset = sorted((str(r["id"]) for r in rows), key=_sort_key)
        log.info("reset %d processing job(s) in %s: %s", len(reset), spec.table, ", ".join(reset) or "none")
        return reset

    # -- internals ---------------------------------------------------------------------------------

    def _say(self, exc: BaseException) -> str:
        text = short_error(exc, self._scrubber)
        return self._redactor.redact(text) if self._redactor is not None else text

    def _connect_problem(self, exc: BaseException) -> str:
        if isinstance(exc, TimeoutError):
            return f"no answer within {self._timeout:g} s"
        if isinstance(exc, asyncpg.TooManyConnectionsError):
            return "too many connections, the server refuses new ones"
        if isinstance(exc, asyncpg.CannotConnectNowError):
            return "the server is starting up or shutting down"
        if isinstance(exc, asyncpg.PostgresError):
            return self._say(exc)
        if isinstance(exc, asyncpg.ClientConfigurationError | ValueError):
            # The DSN itself is malformed and its text may hold the password: name the class only.
            return f"the connection string is not valid ({type(exc).__name__})"
        return network_problem(exc) or self._say(exc)

    @asynccontextmanager
    async def _session(self) -> AsyncIterator[tuple[Any, _Table]]:
        """One connection, the table's shape, and plain sentences for whatever goes wrong."""
        name = self._spec.table
        try:
            conn: Any = await asyncpg.connect(
                self._dsn,
                timeout=self._timeout,
                command_timeout=self._timeout,
                server_settings={
                    "statement_timeout": str(max(1, int(self._timeout * 1000))),
                    "application_name": "opsbot",
                },
            )
        except Exception as exc:
            problem = self._connect_problem(exc)
            raise CommandError(f"Cannot connect to the database of the jobs table `{name}`: {problem}.") from None
        try:
            yield conn, await self._inspect(conn)
        except CommandError:
            conn.terminate()
            raise
        except (TimeoutError, asyncpg.QueryCanceledError):
            conn.terminate()
            raise CommandError(
                f"The jobs table `{name}` did not answer within {self._timeout:g} s (is it locked?)."
            ) from None
        except asyncpg.PostgresError as exc:
            conn.terminate()
            raise CommandError(f"The query on the jobs table `{name}` failed: {self._say(exc)}.") from None
        except (OSError, asyncpg.InterfaceError) as exc:
            conn.terminate()
            problem = network_problem(exc) or self._say(exc)
            raise CommandError(f"Lost the connection to the database of the jobs table `{name}`: {problem}.") from None
        except BaseException:
            conn.terminate()  # cancelled or a bug: don't wait for a polite goodbye
            raise
        try:
            await conn.close(timeout=self._timeout)
        except Exception:
            # The work is done (a reset is committed); a rude goodbye must not turn it into a failure.
            conn.terminate()

    async def _inspect(self, conn: Any) -> _Table:
        """Check the table and its columns exist and learn their types."""
        spec = self._spec
        parts = spec.table.split(".")
        if len(parts) > 2 or not all(parts):
            raise CommandError(f"The jobs table name `{spec.table}` is not valid; use table or schema.table.")
        relation = ".".join(quote_ident(p) for p in parts)
        wanted = [spec.id_column, spec.status_column, spec.started_column]
        if spec.error_column is not None:
            wanted.append(spec.error_column)
        rows = await conn.fetch(_COLUMNS_SQL, relation, wanted)
        if not rows:
            raise CommandError(
                f"The jobs table `{spec.table}` does not exist (or this database user cannot see it); "
                "check the jobs settings of this component in the inventory."
            )
        columns = {str(r["name"]): r for r in rows if r["name"] is not None}
        missing = [c for c in dict.fromkeys(wanted) if c not in columns]
        if missing:
            names = " or ".join(f"`{c}`" for c in missing)
            raise CommandError(
                f"The jobs table `{spec.table}` has no column {names}; "
                "check the jobs settings of this component in the inventory."
            )
        started = columns[spec.started_column]
        if started["base_type"] not in (_TIMESTAMP, _TIMESTAMPTZ):
            raise CommandError(
                f"The column `{spec.started_column}` of the jobs table `{spec.table}` is of type "
                f"{started['sql_type']}, not a timestamp; check the jobs settings of this component in the inventory."
            )
        started_sql = quote_ident(spec.started_column)
        # A timestamp without time zone is taken to hold UTC, whatever the session's TimeZone is.
        naive = started["base_type"] == _TIMESTAMP
        return _Table(
            relation=relation,
            id=quote_ident(spec.id_column),
            id_type=str(columns[spec.id_column]["sql_type"]),
            status=quote_ident(spec.status_column),
            started=started_sql,
            started_utc=f"({started_sql} at time zone 'UTC')" if naive else started_sql,
            now="(now() at time zone 'UTC')" if naive else "now()",
            error=quote_ident(spec.error_column) if spec.error_column is not None else None,
            error_type=str(columns[spec.error_column]["sql_type"]) if spec.error_column is not None else None,
        )

    async def _canonical(self, conn: Any, table: _Table, ids: list[str]) -> dict[str, str]:
        """Each given id → the database's own spelling of it (``007`` → ``7``, upper → lower-case uuid)."""
        try:
            rows = await conn.fetch(
                f"select given, given::{table.id_type}::text as canonical from unnest($1::text[]) as u(given)",  # noqa: S608
                ids,
            )
        except asyncpg.DataError as exc:
            raise CommandError(
                f"Not every job id fits the `{self._spec.id_column}` column ({table.id_type}) of `{self._spec.table}`: "
                f"{self._say(exc)}."
            ) from None
        return {str(r["given"]): str(r["canonical"]) for r in rows}


@dataclass(frozen=True)
class JobsTarget:
    """A service's PostgreSQL component that has a jobs table."""

    component: str
    spec: PostgresComponent
    table: JobsTable

    def client(self, redactor: Redactor) -> JobsClient:
        dsn = self.spec.dsn.get_secret_value()
        return JobsClient(dsn, self.table, timeout=self.spec.timeout, redactor=redactor)
