"""What every state store offers, whatever the database behind it."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Protocol

GENESIS_HASH = "0" * 64


@dataclass(frozen=True)
class AuditRecord:
    """One thing that happened: who did what, where, with which outcome. Arguments are redacted."""

    request_id: str
    actor: str
    command: str
    args: str
    channel: str
    outcome: str
    duration_ms: float
    service: str | None = None
    detail: str = ""


@dataclass(frozen=True)
class AuditEvent(AuditRecord):
    """A stored audit record, chained to the one before it by ``prev_hash``."""

    seq: int = 0
    ts: datetime | None = None
    prev_hash: str = GENESIS_HASH
    hash: str = GENESIS_HASH


def chain_hash(prev_hash: str, record: AuditRecord, ts: datetime) -> str:
    """sha256 over the previous hash and a canonical JSON of the record and its timestamp."""
    body = {k: v for k, v in asdict(record).items() if k not in ("seq", "ts", "prev_hash", "hash")}
    body["duration_ms"] = round(float(body["duration_ms"]), 3)
    body["ts"] = ts.isoformat()
    payload = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(f"{prev_hash}\n{payload}".encode()).hexdigest()


class StateStore(Protocol):
    """The bot's state. Implementations: SQLite (default) and PostgreSQL."""

    kind: str

    async def ping(self) -> None:
        """Raise if the store cannot answer a trivial query."""

    async def append_audit(self, record: AuditRecord) -> AuditEvent:
        """Append one event to the hash chain, atomically with respect to other writers."""

    async def audit_events(
        self, *, service: str | None = None, actor: str | None = None, limit: int = 50
    ) -> list[AuditEvent]:
        """Newest first."""

    async def close(self) -> None: ...


async def open_state_store(url: str | None, *, default_path: Path) -> StateStore:
    """SQLite at ``default_path`` (or a sqlite:/// URL), PostgreSQL for a postgres DSN; migrated."""
    raise NotImplementedError
