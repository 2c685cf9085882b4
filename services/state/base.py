"""What every state store offers, whatever the database behind it."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import asdict, dataclass
from dataclasses import fields as dataclass_fields
from datetime import datetime
from pathlib import Path
from typing import Protocol

GENESIS_HASH = "0" * 64

# Read in batches of this many rows when walking the whole audit log (verify, export).
AUDIT_BATCH_SIZE = 500


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


AUDIT_COLUMNS = (
    "seq, ts, request_id, actor, command, args, channel, outcome, duration_ms, service, detail, prev_hash, hash"
)


def audit_row(event: AuditEvent, ts: object) -> tuple[object, ...]:
    """An event's values in ``AUDIT_COLUMNS`` order; ``ts`` as the database wants it stored."""
    return (
        event.seq,
        ts,
        event.request_id,
        event.actor,
        event.command,
        event.args,
        event.channel,
        event.outcome,
        event.duration_ms,
        event.service,
        event.detail,
        event.prev_hash,
        event.hash,
    )


def seal(record: AuditRecord, *, seq: int, ts: datetime, prev_hash: str) -> AuditEvent:
    """The event that stores ``record`` as link ``seq`` of the chain, after ``prev_hash``, at ``ts``."""
    fields = {f.name: getattr(record, f.name) for f in dataclass_fields(AuditRecord)}
    fields["duration_ms"] = float(fields["duration_ms"])
    return AuditEvent(**fields, seq=seq, ts=ts, prev_hash=prev_hash, hash=chain_hash(prev_hash, record, ts))


async def verify_chain(events: AsyncIterable[AuditEvent], *, head_seq: int, head_hash: str) -> int | None:
    """Walk ``events`` (oldest first, one consistent snapshot) and return the seq of the first broken link.

    A link is broken when a seq is missing, when ``prev_hash`` is not the hash of the event before,
    or when the stored hash is not the hash of the stored content. The chain must also end exactly
    at the recorded head, so rows cut off the end or forged past it are caught too.
    """
    expected_seq = 1
    expected_prev = GENESIS_HASH
    async for event in events:
        if event.seq != expected_seq:
            return expected_seq
        if event.ts is None or event.prev_hash != expected_prev:
            return event.seq
        if chain_hash(event.prev_hash, event, event.ts) != event.hash:
            return event.seq
        expected_prev = event.hash
        expected_seq += 1
    last_seq = expected_seq - 1
    if last_seq != head_seq:
        return min(last_seq, head_seq) + 1
    if expected_prev != head_hash:
        return max(head_seq, 1)
    return None


class StateStore(Protocol):
    """The bot's state. Implementations: SQLite (default) and PostgreSQL."""

    kind: str

    async def ping(self) -> None:
        """Raise if the store cannot answer a trivial query."""

    async def schema_version(self) -> int:
        """The highest migration applied to the database."""

    async def append_audit(self, record: AuditRecord) -> AuditEvent:
        """Append one event to the hash chain, atomically with respect to other writers."""

    async def audit_events(
        self, *, service: str | None = None, actor: str | None = None, limit: int = 50
    ) -> list[AuditEvent]:
        """Newest first."""

    def iter_audit(self, *, batch_size: int = AUDIT_BATCH_SIZE) -> AsyncIterator[AuditEvent]:
        """Every event, oldest first, read in batches (for export)."""

    async def verify_audit(self) -> int | None:
        """None if the hash chain is intact, else the seq of the first broken link."""

    async def close(self) -> None:
        """Release connections; the store is unusable afterwards."""


_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")


def _describe_url(url: str) -> str:
    """Name the scheme of a rejected URL without echoing anything that could hold a secret."""
    match = _SCHEME.match(url)
    return f"scheme {match.group(1)!r}" if match else "a value that is not a URL"


def sqlite_path_from_url(url: str) -> Path | None:
    """The SQLite file named by a ``sqlite:`` URL, or None when ``url`` is not a SQLite URL."""
    if not url.startswith("sqlite:"):
        return None
    rest = url.removeprefix("sqlite:")
    if rest.startswith("//"):
        rest = rest.removeprefix("//")
        if not rest.startswith("/"):
            raise ValueError("a sqlite:// state store URL must name an absolute path: sqlite:///abs/path.db")
    if not rest or "?" in rest or rest.endswith("/"):
        raise ValueError("a sqlite state store URL must name a file: sqlite:///abs/path.db or sqlite:relative.db")
    return Path(rest)


async def open_state_store(url: str | None, *, default_path: Path) -> StateStore:
    """SQLite at ``default_path`` (or a sqlite:/// URL), PostgreSQL for a postgres DSN; migrated."""
    # Imported here because each backend module imports this one.
    from services.state.postgres import PostgresStateStore
    from services.state.sqlite import SqliteStateStore

    if not url:
        return await SqliteStateStore.open(default_path)
    if (path := sqlite_path_from_url(url)) is not None:
        return await SqliteStateStore.open(path)
    if url.startswith(("postgresql://", "postgres://")):
        return await PostgresStateStore.open(url)
    raise ValueError(
        f"unsupported state store URL ({_describe_url(url)}): "
        "use sqlite:///abs/path.db, sqlite:relative.db, postgresql://… or postgres://…"
    )
