"""The bot's own state (audit log now; approvals, runs, catalogs later) in SQLite or PostgreSQL."""

from services.state.base import (
    GENESIS_HASH,
    AuditEvent,
    AuditRecord,
    StateStore,
    chain_hash,
    open_state_store,
)
from services.state.postgres import PostgresStateStore
from services.state.sqlite import SqliteStateStore

__all__ = [
    "GENESIS_HASH",
    "AuditEvent",
    "AuditRecord",
    "PostgresStateStore",
    "SqliteStateStore",
    "StateStore",
    "chain_hash",
    "open_state_store",
]
