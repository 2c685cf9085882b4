"""State in PostgreSQL (when OPSBOT_STATE_URL is a postgres DSN), so several replicas can share it."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import json
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Collection, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import structlog

from services.errors import AuditSpooled, StateStoreUnavailable
from services.probes._common import network_problem
from services.state import migrations
from services.state.base import (
    APPROVAL_COLUMNS,
    AUDIT_BATCH_SIZE,
    AUDIT_COLUMNS,
    BACKUP_COLUMNS,
    Approval,
    ApprovalState,
    AuditEvent,
    AuditRecord,
    BackupRecord,
    BackupState,
    ProbeSample,
    ScheduleRun,
    SilenceRecord,
    StoredAlert,
    Vote,
    VoteResult,
    approval_from_row,
    approval_row,
    audit_row,
    backup_from_row,
    backup_row,
    seal,
    transition_columns,
    utc,
    verify_chain,
)
from services.state.spool import AuditSpool

_COLUMNS = AUDIT_COLUMNS

# pg_advisory_xact_lock key held while migrating ("opsbotmg"); advisory locks are per database.
MIGRATION_LOCK_KEY = int.from_bytes(b"opsbotmg", "big")


def _event(row: Mapping[str, Any]) -> AuditEvent:
    ts: datetime = row["ts"]
    return AuditEvent(
        request_id=row["request_id"],
        actor=row["actor"],
        command=row["command"],
        args=row["args"],
        channel=row["channel"],
        outcome=row["outcome"],
        duration_ms=float(row["duration_ms"]),
        service=row["service"],
        detail=row["detail"],
        seq=int(row["seq"]),
        ts=ts.astimezone(UTC),
        prev_hash=row["prev_hash"],
        hash=row["hash"],
    )


def _same(value: Any) -> Any:
    return value


def _when(value: datetime | None) -> datetime | None:
    return None if value is None else utc(value)


async def _approval(conn: Any, approval_id: str, *, lock: bool = False) -> Approval | None:
    query = f"SELECT {APPROVAL_COLUMNS} FROM approvals WHERE id = $1" + (" FOR UPDATE" if lock else "")  # noqa: S608
    row = await conn.fetchrow(query, approval_id)
    if row is None:
        return None
    votes = await conn.fetch(
        "SELECT voter, voted_at FROM approval_votes WHERE approval_id = $1 ORDER BY voted_at, voter", approval_id
    )
    return approval_from_row(row.values(), tuple(Vote(v["voter"], utc(v["voted_at"])) for v in votes), _when)


def _schedule_run(row: Mapping[str, Any]) -> ScheduleRun:
    return ScheduleRun(
        name=row["name"],
        fire_at=utc(row["fire_at"]),
        holder=row["holder"],
        started_at=utc(row["started_at"]),
        finished_at=_when(row["finished_at"]),
        outcome=row["outcome"],
    )


log = structlog.get_logger(__name__)

# What asyncpg raises when the server is down, restarting, cut off or too slow: the store is not
# answering (as opposed to a query that is wrong, which stays a bug with its traceback).
_UNAVAILABLE = (
    OSError,
    TimeoutError,
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.TooManyConnectionsError,
)

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


@contextlib.contextmanager
def _answering() -> Any:
    """Turn "the server did not answer" into :class:`StateStoreUnavailable` (a plain sentence)."""
    try:
        yield
    except StateStoreUnavailable:
        raise
    except _UNAVAILABLE as exc:
        reason = network_problem(exc) or type(exc).__name__
        log.warning("state_store_unavailable", reason=reason)
        raise StateStoreUnavailable(reason) from exc


def _guarded(method: F) -> F:
    @functools.wraps(method)
    async def call(*args: Any, **kwargs: Any) -> Any:
        with _answering():
            return await method(*args, **kwargs)

    return call  # type: ignore[return-value]


class PostgresStateStore:
    """The state store on PostgreSQL, through an asyncpg pool.

    Writers serialize on the single ``audit_head`` row (``SELECT … FOR UPDATE``), so appends from
    any number of coroutines, pools or replicas form one chain.
    """

    kind = "postgres"

    def __init__(self, pool: asyncpg.Pool, *, close_timeout: float, spool: AuditSpool | None = None) -> None:
        self._pool = pool
        self._close_timeout = close_timeout
        self.spool = spool

    @classmethod
    async def open(
        cls,
        dsn: str,
        *,
        min_size: int = 1,
        max_size: int = 10,
        command_timeout: float = 30.0,
        connect_timeout: float = 10.0,
        spool_path: Path | None = None,
    ) -> PostgresStateStore:
        """Connect a pool to ``dsn`` and migrate the database."""
        pool = await asyncpg.create_pool(
            dsn,
            min_size=min_size,
            max_size=max_size,
            command_timeout=command_timeout,
            timeout=connect_timeout,
            server_settings={"application_name": "opsbot"},
        )
        spool = AuditSpool(spool_path) if spool_path is not None else None
        store = cls(pool, close_timeout=command_timeout, spool=spool)
        try:
            await store._migrate()
        except BaseException:
            pool.terminate()
            raise
        if spool is not None and spool.pending:  # events of an outage before a restart
            with contextlib.suppress(StateStoreUnavailable):
                await spool.drain(store._append_audit)
        return store

    async def _migrate(self) -> None:
        async with self._pool.acquire() as conn, conn.transaction():
            # Held to the end of the transaction: a second process starting now waits, then finds
            # the work done. Taken before CREATE TABLE IF NOT EXISTS, which races on its own.
            await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK_KEY)
            await conn.execute(migrations.SCHEMA_VERSION_TABLE["postgres"])
            current = int(await conn.fetchval("SELECT coalesce(max(version), 0) FROM schema_version"))
            for migration in migrations.pending(current):
                for statement in migration.statements("postgres"):
                    await conn.execute(statement)
                await conn.execute(
                    "INSERT INTO schema_version (version, name) VALUES ($1, $2)", migration.version, migration.name
                )

    async def schema_version(self) -> int:
        """The highest migration applied to the database."""
        return int(await self._pool.fetchval("SELECT coalesce(max(version), 0) FROM schema_version"))

    async def ping(self) -> None:
        """Raise if the database cannot answer ``SELECT 1``."""
        await self._pool.fetchval("SELECT 1")

    async def append_audit(self, record: AuditRecord) -> AuditEvent:
        """Append one event to the hash chain, atomically with respect to other writers.

        With a spool: what an outage spooled is appended first, in order; if the store does not
        answer, the event is spooled (fsynced) and :class:`AuditSpooled` raised.
        """
        try:
            if self.spool is not None and self.spool.pending:
                await self.spool.drain(self._append_audit)
            return await self._append_audit(record)
        except StateStoreUnavailable as exc:
            if self.spool is None:
                raise
            kept = await self.spool.add(record)
            log.warning("audit_spooled" if kept else "audit_dropped", pending=self.spool.pending,
                        dropped=self.spool.dropped, command=record.command)  # fmt: skip
            raise AuditSpooled(exc.reason) from exc

    @_guarded
    async def _append_audit(self, record: AuditRecord) -> AuditEvent:
        async with self._pool.acquire() as conn, conn.transaction():
            head = await conn.fetchrow("SELECT seq, hash FROM audit_head WHERE id = 1 FOR UPDATE")
            if head is None:
                raise RuntimeError("audit_head row is missing: the state database was damaged")
            # The timestamp is taken under the lock, so ts never goes backwards along the chain
            # (within one clock).
            event = seal(record, seq=int(head["seq"]) + 1, ts=datetime.now(UTC), prev_hash=str(head["hash"]))
            await conn.execute(
                f"INSERT INTO audit_events ({_COLUMNS})"  # noqa: S608
                " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
                *audit_row(event, event.ts),
            )
            await conn.execute("UPDATE audit_head SET seq = $1, hash = $2 WHERE id = 1", event.seq, event.hash)
        return event

    async def audit_events(
        self, *, service: str | None = None, actor: str | None = None, limit: int = 50
    ) -> list[AuditEvent]:
        """The newest ``limit`` events, optionally only those of one service and/or one actor."""
        if limit < 1:
            raise ValueError(f"limit must be at least 1, not {limit}")
        where: list[str] = []
        params: list[Any] = []
        if service is not None:
            params.append(service)
            where.append(f"service = ${len(params)}")
        if actor is not None:
            params.append(actor)
            where.append(f"actor = ${len(params)}")
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        params.append(limit)
        query = f"SELECT {_COLUMNS} FROM audit_events {clause} ORDER BY seq DESC LIMIT ${len(params)}"  # noqa: S608
        rows = await self._pool.fetch(query, *params)
        return [_event(row) for row in rows]

    async def iter_audit(self, *, batch_size: int = AUDIT_BATCH_SIZE) -> AsyncIterator[AuditEvent]:
        """Every event up to the head at the start, oldest first, fetched ``batch_size`` rows at a time."""
        last_seq = int(await self._pool.fetchval("SELECT seq FROM audit_head WHERE id = 1") or 0)
        after = 0
        while after < last_seq:
            # No connection is held between batches: the consumer may be slow, or append.
            rows = await self._pool.fetch(
                f"SELECT {_COLUMNS} FROM audit_events WHERE seq > $1 AND seq <= $2 ORDER BY seq LIMIT $3",  # noqa: S608
                after,
                last_seq,
                batch_size,
            )
            if not rows:
                return
            for row in rows:
                event = _event(row)
                after = event.seq
                yield event

    async def verify_audit(self) -> int | None:
        """None if the hash chain is intact, else the seq of the first broken link."""
        async with self._pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
            # One snapshot for the head and every row; a server-side cursor streams the rows.
            head = await conn.fetchrow("SELECT seq, hash FROM audit_head WHERE id = 1")
            head_seq, head_hash = (int(head["seq"]), str(head["hash"])) if head else (0, "")

            async def events() -> AsyncGenerator[AuditEvent, None]:
                query = f"SELECT {_COLUMNS} FROM audit_events ORDER BY seq"  # noqa: S608
                async for row in conn.cursor(query, prefetch=AUDIT_BATCH_SIZE):
                    yield _event(row)

            async with contextlib.aclosing(events()) as rows:
                return await verify_chain(rows, head_seq=head_seq, head_hash=head_hash)

    async def create_approval(self, approval: Approval) -> None:
        """Store a new approval; raise ``KeyError`` if its id is taken."""
        marks = ", ".join(f"${n}" for n in range(1, len(APPROVAL_COLUMNS.split(",")) + 1))
        try:
            await self._pool.execute(
                f"INSERT INTO approvals ({APPROVAL_COLUMNS}) VALUES ({marks})",  # noqa: S608
                *approval_row(approval, _same),
            )
        except asyncpg.UniqueViolationError:
            raise KeyError(approval.id) from None

    async def get_approval(self, approval_id: str) -> Approval | None:
        """The approval with this id, with its votes, or None."""
        async with self._pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
            return await _approval(conn, approval_id)

    async def list_approvals(self, states: Collection[ApprovalState], *, limit: int = 100) -> list[Approval]:
        """Approvals in any of ``states``, newest first."""
        wanted = [ApprovalState(s).value for s in states]
        async with self._pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
            ids = await conn.fetch(
                "SELECT id FROM approvals WHERE state = ANY($1::text[]) ORDER BY created_at DESC, id LIMIT $2",
                wanted,
                limit,
            )
            found = [await _approval(conn, row["id"]) for row in ids]
        return [a for a in found if a is not None]

    async def transition_approval(
        self,
        approval_id: str,
        from_states: Collection[ApprovalState],
        to: ApprovalState,
        *,
        at: datetime,
        by: str | None = None,
        result: str | None = None,
    ) -> Approval | None:
        """Compare-and-set: move the approval to ``to`` only if it is in one of ``from_states``."""
        allowed = [ApprovalState(s).value for s in from_states]
        time_column, by_column = transition_columns(to)
        params: list[Any] = [approval_id, allowed, to.value, at]
        sets = ["state = $3", f"{time_column} = $4", "version = version + 1"]
        if by_column is not None:
            params.append(by)
            sets.append(f"{by_column} = ${len(params)}")
        if result is not None:
            params.append(result)
            sets.append(f"result = ${len(params)}")
        async with self._pool.acquire() as conn, conn.transaction():
            updated = await conn.fetchval(
                f"UPDATE approvals SET {', '.join(sets)} WHERE id = $1 AND state = ANY($2::text[]) RETURNING id",  # noqa: S608
                *params,
            )
            return None if updated is None else await _approval(conn, approval_id)

    async def vote_approval(self, approval_id: str, voter: str, *, at: datetime) -> VoteResult:
        """Atomically count ``voter``'s Approve on a pending, unexpired approval."""
        async with self._pool.acquire() as conn, conn.transaction():
            # The row lock serializes votes on one approval across connections and replicas.
            approval = await _approval(conn, approval_id, lock=True)
            if approval is None or approval.state is not ApprovalState.PENDING or approval.expires_at <= at:
                return VoteResult(approval, counted=False, completed=False)
            inserted = await conn.fetchval(
                "INSERT INTO approval_votes (approval_id, voter, voted_at) VALUES ($1, $2, $3)"
                " ON CONFLICT DO NOTHING RETURNING voter",
                approval_id,
                voter,
                at,
            )
            if inserted is None:
                return VoteResult(approval, counted=False, completed=False)
            completed = len(approval.votes) + 1 >= approval.required_approvals
            if completed:
                await conn.execute(
                    "UPDATE approvals SET state = $2, decided_at = $3, decided_by = $4, version = version + 1"
                    " WHERE id = $1",
                    approval_id,
                    ApprovalState.APPROVED.value,
                    at,
                    voter,
                )
            return VoteResult(await _approval(conn, approval_id), counted=True, completed=completed)

    async def expire_approvals(self, *, at: datetime) -> list[Approval]:
        """Move every pending approval whose expiry is at or before ``at`` to ``expired``; return them."""
        async with self._pool.acquire() as conn, conn.transaction():
            ids = await conn.fetch(
                "UPDATE approvals SET state = $1, decided_at = $2, version = version + 1"
                " WHERE state = $3 AND expires_at <= $2 RETURNING id",
                ApprovalState.EXPIRED.value,
                at,
                ApprovalState.PENDING.value,
            )
            found = [await _approval(conn, row["id"]) for row in ids]
        return [a for a in found if a is not None]

    async def attach_approval_message(self, approval_id: str, channel: str, ts: str) -> None:
        """Remember the Slack message that shows the approval."""
        await self._pool.execute(
            "UPDATE approvals SET message_channel = $2, message_ts = $3 WHERE id = $1", approval_id, channel, ts
        )

    async def create_backup(self, record: BackupRecord) -> None:
        """Catalog a backup that is starting; raise ``KeyError`` if its id is taken."""
        marks = ", ".join(f"${n}" for n in range(1, len(BACKUP_COLUMNS.split(",")) + 1))
        try:
            await self._pool.execute(
                f"INSERT INTO backups ({BACKUP_COLUMNS}) VALUES ({marks})",  # noqa: S608
                *backup_row(record, _same),
            )
        except asyncpg.UniqueViolationError:
            raise KeyError(record.id) from None

    async def finish_backup(
        self,
        backup_id: str,
        state: BackupState,
        *,
        at: datetime,
        size: int | None = None,
        sha256: str | None = None,
        manifest: dict[str, Any] | None = None,
        error: str = "",
    ) -> BackupRecord | None:
        """Compare-and-set a ``running`` backup to ``good`` or ``failed``; None if it was not running."""
        row = await self._pool.fetchrow(
            "UPDATE backups SET state = $2, finished_at = $3, size = $4, sha256 = $5, manifest = $6, error = $7"  # noqa: S608
            f" WHERE id = $1 AND state = $8 RETURNING {BACKUP_COLUMNS}",
            backup_id,
            BackupState(state).value,
            at,
            size,
            sha256,
            json.dumps(manifest or {}, sort_keys=True, ensure_ascii=False),
            error,
            BackupState.RUNNING.value,
        )
        return None if row is None else backup_from_row(row.values(), _when)

    async def renew_backup(self, backup_id: str, *, at: datetime) -> bool:
        """Stamp a ``running`` backup's heartbeat with ``at``; False if it is no longer running."""
        renewed = await self._pool.fetchval(
            "UPDATE backups SET heartbeat_at = $2 WHERE id = $1 AND state = $3 RETURNING id",
            backup_id,
            at,
            BackupState.RUNNING.value,
        )
        return renewed is not None

    async def get_backup(self, backup_id: str) -> BackupRecord | None:
        """The backup with this id, or None."""
        row = await self._pool.fetchrow(f"SELECT {BACKUP_COLUMNS} FROM backups WHERE id = $1", backup_id)  # noqa: S608
        return None if row is None else backup_from_row(row.values(), _when)

    async def list_backups(
        self,
        *,
        service: str | None = None,
        component: str | None = None,
        states: Collection[BackupState] | None = None,
        limit: int = 50,
    ) -> list[BackupRecord]:
        """Newest first; ``None`` filters mean any."""
        wanted = None if states is None else [BackupState(s).value for s in states]
        rows = await self._pool.fetch(
            f"SELECT {BACKUP_COLUMNS} FROM backups"  # noqa: S608
            " WHERE ($1::text IS NULL OR service = $1) AND ($2::text IS NULL OR component = $2)"
            " AND ($3::text[] IS NULL OR state = ANY($3::text[]))"
            " ORDER BY started_at DESC, id DESC LIMIT $4",
            service,
            component,
            wanted,
            limit,
        )
        return [backup_from_row(row.values(), _when) for row in rows]

    async def record_backup_check(self, backup_id: str, *, at: datetime, result: str) -> None:
        """Remember when a backup was last verified, and the outcome."""
        await self._pool.execute(
            "UPDATE backups SET verified_at = $2, verify_result = $3 WHERE id = $1", backup_id, at, result
        )

    async def delete_backup(self, backup_id: str, *, at: datetime) -> bool:
        """Mark a ``good`` or ``failed`` backup ``deleted``; False if it was neither."""
        done = await self._pool.fetchval(
            "UPDATE backups SET state = $2, finished_at = COALESCE(finished_at, $3)"
            " WHERE id = $1 AND state = ANY($4::text[]) RETURNING id",
            backup_id,
            BackupState.DELETED.value,
            at,
            [BackupState.GOOD.value, BackupState.FAILED.value],
        )
        return done is not None

    async def claim_schedule_run(self, name: str, fire_at: datetime, *, holder: str, at: datetime) -> bool:
        """Claim one fire time of a schedule; True for exactly one caller across every replica."""
        claimed = await self._pool.fetchval(
            "INSERT INTO schedule_runs (name, fire_at, holder, started_at) VALUES ($1, $2, $3, $4)"
            " ON CONFLICT DO NOTHING RETURNING name",
            name,
            fire_at,
            holder,
            at,
        )
        return claimed is not None

    async def finish_schedule_run(self, name: str, fire_at: datetime, *, outcome: str, at: datetime) -> None:
        """Record how a claimed run ended."""
        await self._pool.execute(
            "UPDATE schedule_runs SET finished_at = $3, outcome = $4 WHERE name = $1 AND fire_at = $2",
            name,
            fire_at,
            at,
            outcome,
        )

    async def last_schedule_runs(self) -> dict[str, ScheduleRun]:
        """The newest claimed run of each schedule."""
        rows = await self._pool.fetch(
            "SELECT DISTINCT ON (name) name, fire_at, holder, started_at, finished_at, outcome"
            " FROM schedule_runs ORDER BY name, fire_at DESC"
        )
        return {row["name"]: _schedule_run(row) for row in rows}

    async def load_alerts(self) -> dict[str, StoredAlert]:
        """Every alert's stored state, by key."""
        rows = await self._pool.fetch(
            "SELECT key, service, state, updated_at, message_channel, message_ts FROM alert_states"
        )
        return {
            r["key"]: StoredAlert(
                r["key"],
                r["service"],
                json.loads(r["state"]),
                utc(r["updated_at"]),
                r["message_channel"],
                r["message_ts"],
            )
            for r in rows
        }

    async def save_alert(self, alert: StoredAlert) -> None:
        """Insert or replace one alert's state (and its message, when known)."""
        await self._pool.execute(
            "INSERT INTO alert_states (key, service, state, updated_at, message_channel, message_ts)"
            " VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (key) DO UPDATE SET service = excluded.service,"
            " state = excluded.state, updated_at = excluded.updated_at,"
            " message_channel = COALESCE(excluded.message_channel, alert_states.message_channel),"
            " message_ts = COALESCE(excluded.message_ts, alert_states.message_ts)",
            alert.key,
            alert.service,
            json.dumps(alert.state, sort_keys=True),
            alert.updated_at,
            alert.message_channel,
            alert.message_ts,
        )

    async def add_silence(self, key: str, *, until: datetime, by: str, reason: str, at: datetime) -> SilenceRecord:
        """Silence one alert until ``until``."""
        silence_id = await self._pool.fetchval(
            "INSERT INTO silences (key, until, by, reason, created_at) VALUES ($1, $2, $3, $4, $5) RETURNING id",
            key,
            until,
            by,
            reason,
            at,
        )
        return SilenceRecord(int(silence_id), key, utc(until), by, reason, utc(at))

    async def active_silences(self, at: datetime) -> list[SilenceRecord]:
        """Silences not ended and not yet expired at ``at``, newest first."""
        rows = await self._pool.fetch(
            "SELECT id, key, until, by, reason, created_at, ended_at FROM silences"
            " WHERE ended_at IS NULL AND until > $1 ORDER BY created_at DESC, id DESC",
            at,
        )
        return [
            SilenceRecord(
                int(r["id"]),
                r["key"],
                utc(r["until"]),
                r["by"],
                r["reason"],
                utc(r["created_at"]),
                _when(r["ended_at"]),
            )
            for r in rows
        ]

    async def end_silence(self, key: str, *, at: datetime) -> int:
        """End every active silence of ``key`` now; how many were ended."""
        ended = await self._pool.fetch(
            "UPDATE silences SET ended_at = $2 WHERE key = $1 AND ended_at IS NULL AND until > $2 RETURNING id",
            key,
            at,
        )
        return len(ended)

    async def record_probes(self, samples: Collection[ProbeSample], *, keep_after: datetime) -> None:
        """Keep probe results, dropping those older than ``keep_after``."""
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.executemany(
                "INSERT INTO probe_results (service, component, at, status, latency_ms) VALUES ($1, $2, $3, $4, $5)",
                [(p.service, p.component, p.at, p.status, p.latency_ms) for p in samples],
            )
            await conn.execute("DELETE FROM probe_results WHERE at < $1", keep_after)

    async def probe_history(self, *, since: datetime) -> list[ProbeSample]:
        """Probe results at or after ``since``, oldest first."""
        rows = await self._pool.fetch(
            "SELECT service, component, at, status, latency_ms FROM probe_results WHERE at >= $1 ORDER BY at",
            since,
        )
        return [
            ProbeSample(r["service"], r["component"], utc(r["at"]), int(r["status"]), float(r["latency_ms"]))
            for r in rows
        ]

    async def save_digest(self, kind: str, *, at: datetime, snapshot: dict[str, Any]) -> None:
        """Remember what a posted digest showed."""
        await self._pool.execute(
            "INSERT INTO digests (kind, at, snapshot) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
            kind,
            at,
            json.dumps(snapshot, sort_keys=True),
        )

    async def last_digest(self, kind: str) -> tuple[datetime, dict[str, Any]] | None:
        """The newest digest of ``kind`` and what it showed."""
        row = await self._pool.fetchrow(
            "SELECT at, snapshot FROM digests WHERE kind = $1 ORDER BY at DESC LIMIT 1", kind
        )
        return None if row is None else (utc(row["at"]), json.loads(row["snapshot"]))

    async def close(self) -> None:
        """Close the pool, waiting a bounded time for connections in use."""
        try:
            await asyncio.wait_for(self._pool.close(), self._close_timeout)
        except TimeoutError:
            self._pool.terminate()


for _name, _method in list(vars(PostgresStateStore).items()):
    # Every public query says "not answering" plainly (append_audit handles it itself, to spool).
    if inspect.iscoroutinefunction(_method) and not _name.startswith("_") and _name not in ("append_audit", "close"):
        setattr(PostgresStateStore, _name, _guarded(_method))
