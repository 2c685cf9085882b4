"""The bot's own state (audit log, approvals and runs, backup catalog, schedule runs) in SQLite or PostgreSQL."""

from services.state.base import (
    GENESIS_HASH,
    Approval,
    ApprovalState,
    AuditEvent,
    AuditRecord,
    BackupRecord,
    BackupState,
    ScheduleRun,
    StateStore,
    Vote,
    VoteResult,
    chain_hash,
    open_state_store,
)
from services.state.postgres import PostgresStateStore
from services.state.sqlite import SqliteStateStore

__all__ = [
    "GENESIS_HASH",
    "Approval",
    "ApprovalState",
    "AuditEvent",
    "AuditRecord",
    "BackupRecord",
    "BackupState",
    "PostgresStateStore",
    "ScheduleRun",
    "SqliteStateStore",
    "StateStore",
    "Vote",
    "VoteResult",
    "chain_hash",
    "open_state_store",
]
