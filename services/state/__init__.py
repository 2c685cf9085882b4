"""The bot's own state (audit log now; approvals, runs, catalogs later) in SQLite or PostgreSQL."""

from services.state.base import AuditEvent, AuditRecord, StateStore, open_state_store

__all__ = ["AuditEvent", "AuditRecord", "StateStore", "open_state_store"]
