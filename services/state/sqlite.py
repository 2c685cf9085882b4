"""State in one SQLite file (the default): WAL mode, one writer connection, BEGIN IMMEDIATE."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
from collections.abc import AsyncGenerator, AsyncIterator, Collection, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiosqlite

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

_COLUMNS = AUDIT_COLUMNS


def _event(row: Iterable[Any]) -> AuditEvent:
    seq, ts, request_id, actor, command, args, channel, outcome, duration_ms, service, detail, prev, hash_ = row
    return AuditEvent(
        request_id=request_id,
        actor=actor,
        command=command,
        args=args,
        channel=channel,
        outcome=outcome,
        duration_ms=float(duration_ms),
        service=service,
        detail=detail,
        seq=int(seq),
        ts=datetime.fromisoformat(ts),
        prev_hash=prev,
        hash=hash_,
    )


_TIME_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"


def _ts(value: datetime | None) -> str | None:
    """Fixed-width UTC text: comparing two of them as text compares the times."""
    return None if value is None else utc(value).strftime(_TIME_FORMAT)


def _time(value: str) -> datetime:
    return datetime.strptime(value, _TIME_FORMAT).replace(tzinfo=UTC)


def _when(value: str | None) -> datetime | None:
    return None if value is None else _time(value)


async def _first(conn: aiosqlite.Connection, sql: str, params: tuple[Any, ...] = ()) -> Any:
    """The first row of a query, or None. Rows are fetched (and the cursor freed) on the connection's thread."""
    rows = list(await conn.execute_fetchall(sql, params))
    return rows[0] if rows else None


async def _connect(path: Path, busy_timeout: float) -> aiosqlite.Connection:
    # isolation_level=None: no implicit transactions; every write says BEGIN IMMEDIATE itself.
    conn = await aiosqlite.connect(path, isolation_level=None, timeout=busy_timeout)
    try:
        await conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
        await conn.execute("PRAGMA foreign_keys = ON")
        await conn.execute("PRAGMA synchronous = NORMAL")
    except BaseException:
        await conn.close()
        raise
    return conn


class SqliteStateStore:
    """The state store on a local SQLite file.

    One connection serves the whole process, guarded by an asyncio lock so that coroutines never
    interleave inside a transaction; BEGIN IMMEDIATE (with busy_timeout) serializes writers across
    processes sharing the file.
    """

    kind = "sqlite"

    def __init__(self, conn: aiosqlite.Connection, path: Path, busy_timeout: float) -> None:
        self._conn = conn
        self._path = path
        self._busy_timeout = busy_timeout
        self._lock = asyncio.Lock()

    @classmethod
    async def open(cls, path: Path, *, busy_timeout: float = 10.0) -> SqliteStateStore:
        """Open (creating the file and its parent directories) and migrate the database at ``path``."""
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = await _connect(path, busy_timeout)
        store = cls(conn, path, busy_timeout)
        try:
            await store._enable_wal()
            await store._migrate()
        except BaseException:
            await conn.close()
            raise
        return store

    @property
    def path(self) -> Path:
        """The database file."""
        return self._path

    @contextlib.asynccontextmanager
    async def _write(self) -> AsyncIterator[aiosqlite.Connection]:
        """One write transaction, taken with BEGIN IMMEDIATE so the file's write lock is held from the start."""
        async with self._lock:
            try:
                await self._conn.execute("BEGIN IMMEDIATE")
                yield self._conn
                await self._conn.execute("COMMIT")
            except BaseException:
                # Queued behind whatever ran before it, so it also undoes a BEGIN whose await was cancelled.
                with contextlib.suppress(sqlite3.Error, ValueError):
                    await self._conn.execute("ROLLBACK")
                raise

    async def _enable_wal(self) -> None:
        # Switching a file to WAL needs an exclusive lock, and when another process is opening the
        # same fresh file SQLite may answer "database is locked" without waiting on busy_timeout;
        # so retry here, within the same time budget. Once set, WAL is a property of the file.
        deadline = asyncio.get_running_loop().time() + self._busy_timeout
        delay = 0.005
        while True:
            try:
                async with self._lock:
                    rows = list(await self._conn.execute_fetchall("PRAGMA journal_mode = WAL"))
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or asyncio.get_running_loop().time() + delay > deadline:
                    raise
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.2)
        mode = str(rows[0][0]).lower() if rows else None
        if mode != "wal":
            raise RuntimeError(f"SQLite at {self._path} refused WAL mode (journal_mode={mode})")

    async def _migrate(self) -> None:
        async with self._write() as conn:
            await conn.execute(migrations.SCHEMA_VERSION_TABLE["sqlite"])
            row = await _first(conn, "SELECT coalesce(max(version), 0) FROM schema_version")
            current = int(row[0]) if row else 0
            for migration in migrations.pending(current):
                for statement in migration.statements("sqlite"):
                    await conn.execute(statement)
                await conn.execute(
                    "INSERT INTO schema_version (version, name, applied_at) VALUES (?, ?, ?)",
                    (migration.version, migration.name, datetime.now(UTC).isoformat()),
                )

    async def schema_version(self) -> int:
        """The highest migration applied to the database."""
        async with self._lock:
            row = await _first(self._conn, "SELECT coalesce(max(version), 0) FROM schema_version")
        return int(row[0]) if row else 0

    async def ping(self) -> None:
        """Raise if the database cannot answer ``SELECT 1``."""
        async with self._lock:
            await _first(self._conn, "SELECT 1")

    async def append_audit(self, record: AuditRecord) -> AuditEvent:
        """Append one event to the hash chain, atomically with respect to other writers."""
        async with self._write() as conn:
            head = await _first(conn, "SELECT seq, hash FROM audit_head WHERE id = 1")
            if head is None:
                raise RuntimeError("audit_head row is missing: the state database was damaged")
            seq, prev_hash = int(head[0]) + 1, str(head[1])
            ts = datetime.now(UTC)
            event = seal(record, seq=seq, ts=ts, prev_hash=prev_hash)
            await conn.execute(
                f"INSERT INTO audit_events ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",  # noqa: S608
                audit_row(event, ts.isoformat()),
            )
            await conn.execute("UPDATE audit_head SET seq = ?, hash = ? WHERE id = 1", (event.seq, event.hash))
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
            where.append("service = ?")
            params.append(service)
        if actor is not None:
            where.append("actor = ?")
            params.append(actor)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        query = f"SELECT {_COLUMNS} FROM audit_events {clause} ORDER BY seq DESC LIMIT ?"  # noqa: S608
        async with self._lock:
            rows = await self._conn.execute_fetchall(query, (*params, limit))
        return [_event(row) for row in rows]

    async def iter_audit(self, *, batch_size: int = AUDIT_BATCH_SIZE) -> AsyncIterator[AuditEvent]:
        """Every event up to the head at the start, oldest first, fetched ``batch_size`` rows at a time."""
        async with self._lock:
            head = await _first(self._conn, "SELECT seq FROM audit_head WHERE id = 1")
        last_seq = int(head[0]) if head else 0
        after = 0
        while after < last_seq:
            # The lock is held per batch only: the consumer may append (or take its time) between batches.
            async with self._lock:
                rows = list(
                    await self._conn.execute_fetchall(
                        f"SELECT {_COLUMNS} FROM audit_events WHERE seq > ? AND seq <= ? ORDER BY seq LIMIT ?",  # noqa: S608
                        (after, last_seq, batch_size),
                    )
                )
            if not rows:
                return
            for row in rows:
                event = _event(row)
                after = event.seq
                yield event

    async def verify_audit(self) -> int | None:
        """None if the hash chain is intact, else the seq of the first broken link."""
        # A connection of its own, in one read transaction: a consistent WAL snapshot that neither
        # blocks writers nor holds the store's lock while every hash is recomputed.
        conn = await _connect(self._path, self._busy_timeout)
        try:
            await conn.execute("BEGIN")
            head = await _first(conn, "SELECT seq, hash FROM audit_head WHERE id = 1")
            head_seq, head_hash = (int(head[0]), str(head[1])) if head else (0, "")

            async def events() -> AsyncGenerator[AuditEvent, None]:
                cursor = await conn.execute(f"SELECT {_COLUMNS} FROM audit_events ORDER BY seq")  # noqa: S608
                while batch := list(await cursor.fetchmany(AUDIT_BATCH_SIZE)):
                    for row in batch:
                        yield _event(row)

            async with contextlib.aclosing(events()) as rows:
                return await verify_chain(rows, head_seq=head_seq, head_hash=head_hash)
        finally:
            with contextlib.suppress(sqlite3.Error):
                await conn.execute("ROLLBACK")
            await conn.close()

    async def create_approval(self, approval: Approval) -> None:
        """Store a new approval; raise ``KeyError`` if its id is taken."""
        placeholders = ", ".join("?" * len(APPROVAL_COLUMNS.split(",")))
        try:
            async with self._write() as conn:
                await conn.execute(
                    f"INSERT INTO approvals ({APPROVAL_COLUMNS}) VALUES ({placeholders})",  # noqa: S608
                    approval_row(approval, _ts),
                )
        except sqlite3.IntegrityError:
            raise KeyError(approval.id) from None

    async def _approval(self, conn: aiosqlite.Connection, approval_id: str) -> Approval | None:
        row = await _first(conn, f"SELECT {APPROVAL_COLUMNS} FROM approvals WHERE id = ?", (approval_id,))  # noqa: S608
        if row is None:
            return None
        votes = await conn.execute_fetchall(
            "SELECT voter, voted_at FROM approval_votes WHERE approval_id = ? ORDER BY voted_at, voter", (approval_id,)
        )
        return approval_from_row(row, tuple(Vote(v, _time(t)) for v, t in votes), _when)

    async def get_approval(self, approval_id: str) -> Approval | None:
        """The approval with this id, with its votes, or None."""
        async with self._lock:
            return await self._approval(self._conn, approval_id)

    async def list_approvals(self, states: Collection[ApprovalState], *, limit: int = 100) -> list[Approval]:
        """Approvals in any of ``states``, newest first."""
        wanted = [ApprovalState(s).value for s in states]
        if not wanted:
            return []
        marks = ", ".join("?" * len(wanted))
        async with self._lock:
            rows = await self._conn.execute_fetchall(
                f"SELECT id FROM approvals WHERE state IN ({marks}) ORDER BY created_at DESC, id LIMIT ?",  # noqa: S608
                (*wanted, limit),
            )
            found = [await self._approval(self._conn, str(row[0])) for row in rows]
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
        if not allowed:
            return None
        time_column, by_column = transition_columns(to)
        sets = ["state = ?", f"{time_column} = ?", "version = version + 1"]
        params: list[Any] = [to.value, _ts(at)]
        if by_column is not None:
            sets.append(f"{by_column} = ?")
            params.append(by)
        if result is not None:
            sets.append("result = ?")
            params.append(result)
        marks = ", ".join("?" * len(allowed))
        async with self._write() as conn:
            cursor = await conn.execute(
                f"UPDATE approvals SET {', '.join(sets)} WHERE id = ? AND state IN ({marks})",  # noqa: S608
                (*params, approval_id, *allowed),
            )
            if cursor.rowcount != 1:
                return None
            return await self._approval(conn, approval_id)

    async def vote_approval(self, approval_id: str, voter: str, *, at: datetime) -> VoteResult:
        """Atomically count ``voter``'s Approve on a pending, unexpired approval."""
        async with self._write() as conn:
            approval = await self._approval(conn, approval_id)
            if approval is None or approval.state is not ApprovalState.PENDING or approval.expires_at <= at:
                return VoteResult(approval, counted=False, completed=False)
            cursor = await conn.execute(
                "INSERT INTO approval_votes (approval_id, voter, voted_at) VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
                (approval_id, voter, _ts(at)),
            )
            if cursor.rowcount != 1:
                return VoteResult(approval, counted=False, completed=False)
            completed = len(approval.votes) + 1 >= approval.required_approvals
            if completed:
                await conn.execute(
                    "UPDATE approvals SET state = ?, decided_at = ?, decided_by = ?, version = version + 1"
                    " WHERE id = ? AND state = ?",
                    (ApprovalState.APPROVED.value, _ts(at), voter, approval_id, ApprovalState.PENDING.value),
                )
            return VoteResult(await self._approval(conn, approval_id), counted=True, completed=completed)

    async def expire_approvals(self, *, at: datetime) -> list[Approval]:
        """Move every pending approval whose expiry is at or before ``at`` to ``expired``; return them."""
        async with self._write() as conn:
            rows = await conn.execute_fetchall(
                "UPDATE approvals SET state = ?, decided_at = ?, version = version + 1"
                " WHERE state = ? AND expires_at <= ? RETURNING id",
                (ApprovalState.EXPIRED.value, _ts(at), ApprovalState.PENDING.value, _ts(at)),
            )
            found = [await self._approval(conn, str(row[0])) for row in rows]
        return [a for a in found if a is not None]

    async def attach_approval_message(self, approval_id: str, channel: str, ts: str) -> None:
        """Remember the Slack message that shows the approval."""
        async with self._write() as conn:
            await conn.execute(
                "UPDATE approvals SET message_channel = ?, message_ts = ? WHERE id = ?", (channel, ts, approval_id)
            )

    async def create_backup(self, record: BackupRecord) -> None:
        """Catalog a backup that is starting; raise ``KeyError`` if its id is taken."""
        placeholders = ", ".join("?" * len(BACKUP_COLUMNS.split(",")))
        try:
            async with self._write() as conn:
                await conn.execute(
                    f"INSERT INTO backups ({BACKUP_COLUMNS}) VALUES ({placeholders})",  # noqa: S608
                    backup_row(record, _ts),
                )
        except sqlite3.IntegrityError:
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
        async with self._write() as conn:
            rows = await conn.execute_fetchall(
                "UPDATE backups SET state = ?, finished_at = ?, size = ?, sha256 = ?, manifest = ?, error = ?"  # noqa: S608
                f" WHERE id = ? AND state = ? RETURNING {BACKUP_COLUMNS}",
                (
                    BackupState(state).value,
                    _ts(at),
                    size,
                    sha256,
                    json.dumps(manifest or {}, sort_keys=True, ensure_ascii=False),
                    error,
                    backup_id,
                    BackupState.RUNNING.value,
                ),
            )
            rows = list(rows)
        return backup_from_row(rows[0], _when) if rows else None

    async def renew_backup(self, backup_id: str, *, at: datetime) -> bool:
        """Stamp a ``running`` backup's heartbeat with ``at``; False if it is no longer running."""
        async with self._write() as conn:
            cursor = await conn.execute(
                "UPDATE backups SET heartbeat_at = ? WHERE id = ? AND state = ?",
                (_ts(at), backup_id, BackupState.RUNNING.value),
            )
            return cursor.rowcount == 1

    async def get_backup(self, backup_id: str) -> BackupRecord | None:
        """The backup with this id, or None."""
        async with self._lock:
            row = await _first(self._conn, f"SELECT {BACKUP_COLUMNS} FROM backups WHERE id = ?", (backup_id,))  # noqa: S608
        return None if row is None else backup_from_row(row, _when)

    async def list_backups(
        self,
        *,
        service: str | None = None,
        component: str | None = None,
        states: Collection[BackupState] | None = None,
        limit: int = 50,
    ) -> list[BackupRecord]:
        """Newest first; ``None`` filters mean any."""
        where: list[str] = []
        params: list[Any] = []
        if service is not None:
            where.append("service = ?")
            params.append(service)
        if component is not None:
            where.append("component = ?")
            params.append(component)
        if states is not None:
            wanted = [BackupState(s).value for s in states]
            if not wanted:
                return []
            where.append(f"state IN ({', '.join('?' * len(wanted))})")
            params += wanted
        clause = f" WHERE {' AND '.join(where)}" if where else ""
        async with self._lock:
            rows = await self._conn.execute_fetchall(
                f"SELECT {BACKUP_COLUMNS} FROM backups{clause} ORDER BY started_at DESC, id DESC LIMIT ?",  # noqa: S608
                (*params, limit),
            )
        return [backup_from_row(row, _when) for row in rows]

    async def record_backup_check(self, backup_id: str, *, at: datetime, result: str) -> None:
        """Remember when a backup was last verified, and the outcome."""
        async with self._write() as conn:
            await conn.execute(
                "UPDATE backups SET verified_at = ?, verify_result = ? WHERE id = ?", (_ts(at), result, backup_id)
            )

    async def delete_backup(self, backup_id: str, *, at: datetime) -> bool:
        """Mark a ``good`` or ``failed`` backup ``deleted``; False if it was neither."""
        async with self._write() as conn:
            cursor = await conn.execute(
                "UPDATE backups SET state = ?, finished_at = COALESCE(finished_at, ?) WHERE id = ? AND state IN (?, ?)",
                (BackupState.DELETED.value, _ts(at), backup_id, BackupState.GOOD.value, BackupState.FAILED.value),
            )
            return cursor.rowcount == 1

    async def claim_schedule_run(self, name: str, fire_at: datetime, *, holder: str, at: datetime) -> bool:
        """Claim one fire time of a schedule; True for exactly one caller across every process."""
        async with self._write() as conn:
            cursor = await conn.execute(
                "INSERT INTO schedule_runs (name, fire_at, holder, started_at) VALUES (?, ?, ?, ?)"
                " ON CONFLICT DO NOTHING",
                (name, _ts(fire_at), holder, _ts(at)),
            )
            return cursor.rowcount == 1

    async def finish_schedule_run(self, name: str, fire_at: datetime, *, outcome: str, at: datetime) -> None:
        """Record how a claimed run ended."""
        async with self._write() as conn:
            await conn.execute(
                "UPDATE schedule_runs SET finished_at = ?, outcome = ? WHERE name = ? AND fire_at = ?",
                (_ts(at), outcome, name, _ts(fire_at)),
            )

    async def last_schedule_runs(self) -> dict[str, ScheduleRun]:
        """The newest claimed run of each schedule."""
        async with self._lock:
            rows = await self._conn.execute_fetchall(
                "SELECT name, fire_at, holder, started_at, finished_at, outcome FROM schedule_runs r"
                " WHERE fire_at = (SELECT max(fire_at) FROM schedule_runs WHERE name = r.name)"
            )
        return {
            row[0]: ScheduleRun(row[0], _time(row[1]), row[2], _time(row[3]), _when(row[4]), row[5]) for row in rows
        }

    async def load_alerts(self) -> dict[str, StoredAlert]:
        """Every alert's stored state, by key."""
        async with self._lock:
            rows = await self._conn.execute_fetchall(
                "SELECT key, service, state, updated_at, message_channel, message_ts FROM alert_states"
            )
        return {r[0]: StoredAlert(r[0], r[1], json.loads(r[2]), _time(r[3]), r[4], r[5]) for r in rows}

    async def save_alert(self, alert: StoredAlert) -> None:
        """Insert or replace one alert's state (and its message, when known)."""
        async with self._write() as conn:
            await conn.execute(
                "INSERT INTO alert_states (key, service, state, updated_at, message_channel, message_ts)"
                " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (key) DO UPDATE SET service = excluded.service,"
                " state = excluded.state, updated_at = excluded.updated_at,"
                " message_channel = COALESCE(excluded.message_channel, alert_states.message_channel),"
                " message_ts = COALESCE(excluded.message_ts, alert_states.message_ts)",
                (alert.key, alert.service, json.dumps(alert.state, sort_keys=True), _ts(alert.updated_at),
                 alert.message_channel, alert.message_ts),
            )  # fmt: skip

    async def add_silence(self, key: str, *, until: datetime, by: str, reason: str, at: datetime) -> SilenceRecord:
        """Silence one alert until ``until``."""
        async with self._write() as conn:
            cursor = await conn.execute(
                "INSERT INTO silences (key, until, by, reason, created_at) VALUES (?, ?, ?, ?, ?)",
                (key, _ts(until), by, reason, _ts(at)),
            )
            silence_id = int(cursor.lastrowid or 0)
        return SilenceRecord(silence_id, key, utc(until), by, reason, utc(at))

    async def active_silences(self, at: datetime) -> list[SilenceRecord]:
        """Silences not ended and not yet expired at ``at``, newest first."""
        async with self._lock:
            rows = await self._conn.execute_fetchall(
                "SELECT id, key, until, by, reason, created_at, ended_at FROM silences"
                " WHERE ended_at IS NULL AND until > ? ORDER BY created_at DESC, id DESC",
                (_ts(at),),
            )
        return [SilenceRecord(r[0], r[1], _time(r[2]), r[3], r[4], _time(r[5]), _when(r[6])) for r in rows]

    async def end_silence(self, key: str, *, at: datetime) -> int:
        """End every active silence of ``key`` now; how many were ended."""
        async with self._write() as conn:
            cursor = await conn.execute(
                "UPDATE silences SET ended_at = ? WHERE key = ? AND ended_at IS NULL AND until > ?",
                (_ts(at), key, _ts(at)),
            )
            return int(cursor.rowcount)

    async def record_probes(self, samples: Collection[ProbeSample], *, keep_after: datetime) -> None:
        """Keep probe results, dropping those older than ``keep_after``."""
        async with self._write() as conn:
            await conn.executemany(
                "INSERT INTO probe_results (service, component, at, status, latency_ms) VALUES (?, ?, ?, ?, ?)",
                [(p.service, p.component, _ts(p.at), p.status, p.latency_ms) for p in samples],
            )
            await conn.execute("DELETE FROM probe_results WHERE at < ?", (_ts(keep_after),))

    async def probe_history(self, *, since: datetime) -> list[ProbeSample]:
        """Probe results at or after ``since``, oldest first."""
        async with self._lock:
            rows = await self._conn.execute_fetchall(
                "SELECT service, component, at, status, latency_ms FROM probe_results WHERE at >= ? ORDER BY at",
                (_ts(since),),
            )
        return [ProbeSample(r[0], r[1], _time(r[2]), int(r[3]), float(r[4])) for r in rows]

    async def save_digest(self, kind: str, *, at: datetime, snapshot: dict[str, Any]) -> None:
        """Remember what a posted digest showed."""
        async with self._write() as conn:
            await conn.execute(
                "INSERT INTO digests (kind, at, snapshot) VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
                (kind, _ts(at), json.dumps(snapshot, sort_keys=True)),
            )

    async def last_digest(self, kind: str) -> tuple[datetime, dict[str, Any]] | None:
        """The newest digest of ``kind`` and what it showed."""
        async with self._lock:
            row = await _first(
                self._conn, "SELECT at, snapshot FROM digests WHERE kind = ? ORDER BY at DESC LIMIT 1", (kind,)
            )
        return None if row is None else (_time(row[0]), json.loads(row[1]))

    async def close(self) -> None:
        """Close the connection."""
        async with self._lock:
            await self._conn.close()
