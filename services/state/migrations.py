"""The state schema as an ordered list of migrations, each written for SQLite and for PostgreSQL.

A migration is never edited once released: a later change to the schema is a new entry at the
end (approvals, runs, backup catalog, alert state, schedule leases…). Each store applies, in
one transaction under a cross-process lock, every migration above the version it finds in
``schema_version``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Dialect = Literal["sqlite", "postgres"]


@dataclass(frozen=True)
class Migration:
    """One step of the schema; ``sqlite`` and ``postgres`` are statements run in order."""

    version: int
    name: str
    sqlite: tuple[str, ...]
    postgres: tuple[str, ...]

    def statements(self, dialect: Dialect) -> tuple[str, ...]:
        """The statements of this step for one database."""
        return self.sqlite if dialect == "sqlite" else self.postgres


SCHEMA_VERSION_TABLE = {
    "sqlite": (
        "CREATE TABLE IF NOT EXISTS schema_version ("
        " version INTEGER PRIMARY KEY,"
        " name TEXT NOT NULL,"
        " applied_at TEXT NOT NULL)"
    ),
    "postgres": (
        "CREATE TABLE IF NOT EXISTS schema_version ("
        " version integer PRIMARY KEY,"
        " name text NOT NULL,"
        " applied_at timestamptz NOT NULL DEFAULT now())"
    ),
}

_AUDIT_V1 = Migration(
    version=1,
    name="audit log with hash chain",
    sqlite=(
        """
        CREATE TABLE audit_events (
            seq INTEGER PRIMARY KEY,
            ts TEXT NOT NULL,
            request_id TEXT NOT NULL,
            actor TEXT NOT NULL,
            command TEXT NOT NULL,
            args TEXT NOT NULL,
            channel TEXT NOT NULL,
            outcome TEXT NOT NULL,
            duration_ms REAL NOT NULL,
            service TEXT,
            detail TEXT NOT NULL,
            prev_hash TEXT NOT NULL UNIQUE,
            hash TEXT NOT NULL UNIQUE
        )
        """,
        "CREATE INDEX audit_events_service ON audit_events (service, seq)",
        "CREATE INDEX audit_events_actor ON audit_events (actor, seq)",
        # The head row is what writers lock and advance; it also lets verify notice a cut-off tail.
        # It starts at GENESIS_HASH (written out: a released migration never changes).
        """
        CREATE TABLE audit_head (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            seq INTEGER NOT NULL,
            hash TEXT NOT NULL
        )
        """,
        "INSERT INTO audit_head (id, seq, hash)"
        " VALUES (1, 0, '0000000000000000000000000000000000000000000000000000000000000000')",
        """
        CREATE TRIGGER audit_events_no_update BEFORE UPDATE ON audit_events
        BEGIN SELECT RAISE(ABORT, 'audit_events is append-only'); END
        """,
        """
        CREATE TRIGGER audit_events_no_delete BEFORE DELETE ON audit_events
        BEGIN SELECT RAISE(ABORT, 'audit_events is append-only'); END
        """,
    ),
    postgres=(
        """
        CREATE TABLE audit_events (
            seq bigint PRIMARY KEY,
            ts timestamptz NOT NULL,
            request_id text NOT NULL,
            actor text NOT NULL,
            command text NOT NULL,
            args text NOT NULL,
            channel text NOT NULL,
            outcome text NOT NULL,
            duration_ms double precision NOT NULL,
            service text,
            detail text NOT NULL,
            prev_hash text NOT NULL UNIQUE,
            hash text NOT NULL UNIQUE
        )
        """,
        "CREATE INDEX audit_events_service ON audit_events (service, seq)",
        "CREATE INDEX audit_events_actor ON audit_events (actor, seq)",
        """
        CREATE TABLE audit_head (
            id smallint PRIMARY KEY CHECK (id = 1),
            seq bigint NOT NULL,
            hash text NOT NULL
        )
        """,
        "INSERT INTO audit_head (id, seq, hash)"
        " VALUES (1, 0, '0000000000000000000000000000000000000000000000000000000000000000')",
        """
        CREATE FUNCTION audit_events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            RAISE EXCEPTION 'audit_events is append-only';
        END
        $$
        """,
        """
        CREATE TRIGGER audit_events_append_only BEFORE UPDATE OR DELETE ON audit_events
        FOR EACH ROW EXECUTE FUNCTION audit_events_append_only()
        """,
        """
        CREATE TRIGGER audit_events_no_truncate BEFORE TRUNCATE ON audit_events
        FOR EACH STATEMENT EXECUTE FUNCTION audit_events_append_only()
        """,
    ),
)

_APPROVALS_V2 = Migration(
    version=2,
    name="approvals and their votes",
    sqlite=(
        # Times are stored as fixed-width ISO 8601 UTC text, so text comparison is time order.
        """
        CREATE TABLE approvals (
            id TEXT PRIMARY KEY,
            action TEXT NOT NULL,
            service TEXT NOT NULL,
            risk TEXT NOT NULL,
            requester TEXT NOT NULL,
            channel TEXT NOT NULL,
            request_id TEXT NOT NULL,
            summary TEXT NOT NULL,
            plan TEXT NOT NULL,
            approver_role TEXT NOT NULL,
            required_approvals INTEGER NOT NULL CHECK (required_approvals >= 1),
            self_approve INTEGER NOT NULL,
            created_at TEXT NOT NULL,
            expires_at TEXT NOT NULL,
            state TEXT NOT NULL,
            decided_by TEXT,
            decided_at TEXT,
            started_at TEXT,
            finished_at TEXT,
            result TEXT NOT NULL DEFAULT '',
            message_channel TEXT,
            message_ts TEXT,
            version INTEGER NOT NULL DEFAULT 1
        )
        """,
        "CREATE INDEX approvals_state ON approvals (state, expires_at)",
        """
        CREATE TABLE approval_votes (
            approval_id TEXT NOT NULL REFERENCES approvals (id),
            voter TEXT NOT NULL,
            voted_at TEXT NOT NULL,
            PRIMARY KEY (approval_id, voter)
        )
        """,
    ),
    postgres=(
        """
        CREATE TABLE approvals (
            id text PRIMARY KEY,
            action text NOT NULL,
            service text NOT NULL,
            risk text NOT NULL,
            requester text NOT NULL,
            channel text NOT NULL,
            request_id text NOT NULL,
            summary text NOT NULL,
            plan text NOT NULL,
            approver_role text NOT NULL,
            required_approvals integer NOT NULL CHECK (required_approvals >= 1),
            self_approve boolean NOT NULL,
            created_at timestamptz NOT NULL,
            expires_at timestamptz NOT NULL,
            state text NOT NULL,
            decided_by text,
            decided_at timestamptz,
            started_at timestamptz,
            finished_at timestamptz,
            result text NOT NULL DEFAULT '',
            message_channel text,
            message_ts text,
            version integer NOT NULL DEFAULT 1
        )
        """,
        "CREATE INDEX approvals_state ON approvals (state, expires_at)",
        """
        CREATE TABLE approval_votes (
            approval_id text NOT NULL REFERENCES approvals (id),
            voter text NOT NULL,
            voted_at timestamptz NOT NULL,
            PRIMARY KEY (approval_id, voter)
        )
        """,
    ),
)

_BACKUPS_V3 = Migration(
    version=3,
    name="backup catalog",
    sqlite=(
        """
        CREATE TABLE backups (
            id TEXT PRIMARY KEY,
            service TEXT NOT NULL,
            component TEXT NOT NULL,
            source TEXT NOT NULL,
            trigger TEXT NOT NULL,
            requested_by TEXT NOT NULL,
            destination TEXT NOT NULL,
            object_key TEXT NOT NULL,
            location TEXT NOT NULL,
            codec TEXT NOT NULL,
            state TEXT NOT NULL,
            started_at TEXT NOT NULL,
            finished_at TEXT,
            size INTEGER,
            sha256 TEXT,
            manifest TEXT NOT NULL DEFAULT '{}',
            error TEXT NOT NULL DEFAULT '',
            verified_at TEXT,
            verify_result TEXT NOT NULL DEFAULT ''
        )
        """,
        "CREATE INDEX backups_service ON backups (service, component, started_at)",
        "CREATE INDEX backups_state ON backups (state, started_at)",
    ),
    postgres=(
        """
        CREATE TABLE backups (
            id text PRIMARY KEY,
            service text NOT NULL,
            component text NOT NULL,
            source text NOT NULL,
            trigger text NOT NULL,
            requested_by text NOT NULL,
            destination text NOT NULL,
            object_key text NOT NULL,
            location text NOT NULL,
            codec text NOT NULL,
            state text NOT NULL,
            started_at timestamptz NOT NULL,
            finished_at timestamptz,
            size bigint,
            sha256 text,
            manifest text NOT NULL DEFAULT '{}',
            error text NOT NULL DEFAULT '',
            verified_at timestamptz,
            verify_result text NOT NULL DEFAULT ''
        )
        """,
        "CREATE INDEX backups_service ON backups (service, component, started_at)",
        "CREATE INDEX backups_state ON backups (state, started_at)",
    ),
)

_SCHEDULES_V4 = Migration(
    version=4,
    name="schedule runs (one row per fire time: the lease that makes each run happen once)",
    sqlite=(
        """
        CREATE TABLE schedule_runs (
            name TEXT NOT NULL,
            fire_at TEXT NOT NULL,
            holder TEXT NOT NULL,
            started_at TEXT NOT NULL,
            finished_at TEXT,
            outcome TEXT NOT NULL DEFAULT '',
            PRIMARY KEY (name, fire_at)
        )
        """,
    ),
    postgres=(
        """
        CREATE TABLE schedule_runs (
            name text NOT NULL,
            fire_at timestamptz NOT NULL,
            holder text NOT NULL,
            started_at timestamptz NOT NULL,
            finished_at timestamptz,
            outcome text NOT NULL DEFAULT '',
            PRIMARY KEY (name, fire_at)
        )
        """,
    ),
)

_WATCH_V5 = Migration(
    version=5,
    name="alert states, silences, probe history and digest snapshots",
    sqlite=(
        """
        CREATE TABLE alert_states (
            key TEXT PRIMARY KEY,
            service TEXT NOT NULL,
            state TEXT NOT NULL,
            message_channel TEXT,
            message_ts TEXT,
            updated_at TEXT NOT NULL
        )
        """,
        """
        CREATE TABLE silences (
            id INTEGER PRIMARY KEY,
            key TEXT NOT NULL,
            until TEXT NOT NULL,
            by TEXT NOT NULL,
            reason TEXT NOT NULL DEFAULT '',
            created_at TEXT NOT NULL,
            ended_at TEXT
        )
        """,
        "CREATE INDEX silences_key ON silences (key, until)",
        """
        CREATE TABLE probe_results (
            service TEXT NOT NULL,
            component TEXT NOT NULL,
            at TEXT NOT NULL,
            status INTEGER NOT NULL,
            latency_ms REAL NOT NULL
        )
        """,
        "CREATE INDEX probe_results_at ON probe_results (at)",
        """
        CREATE TABLE digests (
            kind TEXT NOT NULL,
            at TEXT NOT NULL,
            snapshot TEXT NOT NULL,
            PRIMARY KEY (kind, at)
        )
        """,
    ),
    postgres=(
        """
        CREATE TABLE alert_states (
            key text PRIMARY KEY,
            service text NOT NULL,
            state text NOT NULL,
            message_channel text,
            message_ts text,
            updated_at timestamptz NOT NULL
        )
        """,
        """
        CREATE TABLE silences (
            id bigserial PRIMARY KEY,
            key text NOT NULL,
            until timestamptz NOT NULL,
            by text NOT NULL,
            reason text NOT NULL DEFAULT '',
            created_at timestamptz NOT NULL,
            ended_at timestamptz
        )
        """,
        "CREATE INDEX silences_key ON silences (key, until)",
        """
        CREATE TABLE probe_results (
            service text NOT NULL,
            component text NOT NULL,
            at timestamptz NOT NULL,
            status smallint NOT NULL,
            latency_ms double precision NOT NULL
        )
        """,
        "CREATE INDEX probe_results_at ON probe_results (at)",
        """
        CREATE TABLE digests (
            kind text NOT NULL,
            at timestamptz NOT NULL,
            snapshot text NOT NULL,
            PRIMARY KEY (kind, at)
        )
        """,
    ),
)

_BACKUP_HEARTBEAT_V6 = Migration(
    version=6,
    name="backup heartbeat (a running backup's writer renews it; a stale one has no live writer)",
    # NULL for rows written before: the sweeper then goes by started_at.
    sqlite=("ALTER TABLE backups ADD COLUMN heartbeat_at TEXT",),
    postgres=("ALTER TABLE backups ADD COLUMN heartbeat_at timestamptz",),
)

MIGRATIONS: tuple[Migration, ...] = (
    _AUDIT_V1,
    _APPROVALS_V2,
    _BACKUPS_V3,
    _SCHEDULES_V4,
    _WATCH_V5,
    _BACKUP_HEARTBEAT_V6,
)

LATEST_VERSION = MIGRATIONS[-1].version


def pending(current: int) -> tuple[Migration, ...]:
    """The migrations to apply, in order, to a database at version ``current``."""
    return tuple(m for m in MIGRATIONS if m.version > current)


def _check(migrations: tuple[Migration, ...]) -> None:
    versions = [m.version for m in migrations]
    if versions != list(range(1, len(migrations) + 1)):
        raise RuntimeError(f"migration versions must run 1, 2, 3… without gaps; got {versions}")


_check(MIGRATIONS)
