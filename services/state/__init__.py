"""The bot's own state (audit, approvals, backups, schedules, alerts, digests) in SQLite or PostgreSQL."""

from services.state.base import (
    GENESIS_HASH,
    Approval,
    ApprovalState,
    AuditEvent,
    AuditRecord,
    BackupRecord,
    BackupState,
    ProbeSample,
    ScheduleRun,
    SilenceRecord,
    StateStore,
    StoredAlert,
    Vote,
    VoteResult,
    chain_hash,
)
from services.state.factory import open_state_store
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
    "ProbeSample",
    "ScheduleRun",
    "SilenceRecord",
    "SqliteStateStore",
    "StateStore",
    "StoredAlert",
    "Vote",
    "VoteResult",
    "chain_hash",
    "open_state_store",
]
