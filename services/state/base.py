"""What every state store offers, whatever the database behind it."""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterable, AsyncIterator, Collection
from dataclasses import asdict, dataclass
from dataclasses import fields as dataclass_fields
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

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


class ApprovalState(StrEnum):
    """Where an approval is in its life: ``pending → approved | denied | expired | cancelled``,
    then ``running → succeeded | failed | interrupted``."""

    PENDING = "pending"
    APPROVED = "approved"
    DENIED = "denied"
    EXPIRED = "expired"
    CANCELLED = "cancelled"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    INTERRUPTED = "interrupted"

    @property
    def final(self) -> bool:
        """Nothing more will happen to an approval in this state."""
        return self not in (ApprovalState.PENDING, ApprovalState.APPROVED, ApprovalState.RUNNING)


@dataclass(frozen=True)
class Vote:
    """One approver's Approve click."""

    voter: str
    at: datetime


@dataclass(frozen=True)
class Approval:
    """A plan waiting for (or past) its approvers: what will happen, who asked, the policy, the outcome.

    ``plan`` is the engine's JSON (details, parameters, the facts behind the fingerprint); the store
    keeps it opaque.
    """

    id: str
    action: str
    service: str
    risk: str
    requester: str
    channel: str
    request_id: str
    summary: str
    plan: dict[str, Any]
    approver_role: str
    required_approvals: int
    self_approve: bool
    created_at: datetime
    expires_at: datetime
    state: ApprovalState = ApprovalState.PENDING
    votes: tuple[Vote, ...] = ()
    decided_by: str | None = None
    decided_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    result: str = ""
    message_channel: str | None = None
    message_ts: str | None = None
    version: int = 1


@dataclass(frozen=True)
class VoteResult:
    """What an Approve click did: ``approval`` as it is now (None if no such id), whether the vote was
    counted, and whether it was the vote that moved the approval to ``approved``."""

    approval: Approval | None
    counted: bool
    completed: bool


APPROVAL_COLUMNS = (
    "id, action, service, risk, requester, channel, request_id, summary, plan, approver_role,"
    " required_approvals, self_approve, created_at, expires_at, state, decided_by, decided_at,"
    " started_at, finished_at, result, message_channel, message_ts, version"
)


def approval_row(approval: Approval, ts: Any) -> tuple[object, ...]:
    """An approval's values in ``APPROVAL_COLUMNS`` order; ``ts`` converts datetimes for the database."""
    return (
        approval.id,
        approval.action,
        approval.service,
        approval.risk,
        approval.requester,
        approval.channel,
        approval.request_id,
        approval.summary,
        json.dumps(approval.plan, sort_keys=True, ensure_ascii=False),
        approval.approver_role,
        approval.required_approvals,
        approval.self_approve,
        ts(approval.created_at),
        ts(approval.expires_at),
        approval.state.value,
        approval.decided_by,
        ts(approval.decided_at),
        ts(approval.started_at),
        ts(approval.finished_at),
        approval.result,
        approval.message_channel,
        approval.message_ts,
        approval.version,
    )


def approval_from_row(row: Any, votes: tuple[Vote, ...], when: Any) -> Approval:
    """An approval from a row in ``APPROVAL_COLUMNS`` order; ``when`` converts stored times back."""
    (id_, action, service, risk, requester, channel, request_id, summary, plan, approver_role, required,
     self_approve, created, expires, state, decided_by, decided_at, started, finished, result,
     message_channel, message_ts, version) = tuple(row)  # fmt: skip
    return Approval(
        id=id_,
        action=action,
        service=service,
        risk=risk,
        requester=requester,
        channel=channel,
        request_id=request_id,
        summary=summary,
        plan=json.loads(plan),
        approver_role=approver_role,
        required_approvals=int(required),
        self_approve=bool(self_approve),
        created_at=when(created),
        expires_at=when(expires),
        state=ApprovalState(state),
        votes=votes,
        decided_by=decided_by,
        decided_at=when(decided_at),
        started_at=when(started),
        finished_at=when(finished),
        result=result,
        message_channel=message_channel,
        message_ts=message_ts,
        version=int(version),
    )


def transition_columns(to: ApprovalState) -> tuple[str, str | None]:
    """The time column a transition to ``to`` stamps, and the column that records who did it."""
    if to in (ApprovalState.APPROVED, ApprovalState.DENIED, ApprovalState.EXPIRED, ApprovalState.CANCELLED):
        return "decided_at", "decided_by"
    if to is ApprovalState.RUNNING:
        return "started_at", None
    return "finished_at", None


class BackupState(StrEnum):
    """A catalogued backup: being written, complete and checked, failed, or removed by retention."""

    RUNNING = "running"
    GOOD = "good"
    FAILED = "failed"
    DELETED = "deleted"


@dataclass(frozen=True)
class BackupRecord:
    """One backup in the catalog: where it is, what it holds, and whether it can be trusted.

    Only ``good`` backups have a complete object and manifest at ``location``; a ``running`` row
    whose writer died is turned ``failed`` by the sweeper. The writer renews ``heartbeat_at`` while
    it works, so any process sharing the catalog can tell a live writer from a dead one.
    """

    id: str
    service: str
    component: str
    source: str  # the source kind: postgres, mongodb, sqlite, files, cloudsql
    trigger: str  # manual, safety (before a restore), scheduled, cli
    requested_by: str
    destination: str  # the inventory's name of the destination
    key: str  # object key inside the destination
    location: str  # human-readable address (path or s3://…)
    codec: str
    state: BackupState
    started_at: datetime
    finished_at: datetime | None = None
    size: int | None = None
    sha256: str | None = None
    manifest: dict[str, Any] | None = None
    error: str = ""
    verified_at: datetime | None = None
    verify_result: str = ""
    heartbeat_at: datetime | None = None  # last renewed by the writer while running (None: never)

    @property
    def duration(self) -> float | None:
        if self.finished_at is None:
            return None
        return (self.finished_at - self.started_at).total_seconds()


BACKUP_COLUMNS = (
    "id, service, component, source, trigger, requested_by, destination, object_key, location, codec,"
    " state, started_at, finished_at, size, sha256, manifest, error, verified_at, verify_result, heartbeat_at"
)


def backup_row(record: BackupRecord, ts: Any) -> tuple[object, ...]:
    """A backup's values in ``BACKUP_COLUMNS`` order; ``ts`` converts datetimes for the database."""
    return (
        record.id,
        record.service,
        record.component,
        record.source,
        record.trigger,
        record.requested_by,
        record.destination,
        record.key,
        record.location,
        record.codec,
        record.state.value,
        ts(record.started_at),
        ts(record.finished_at),
        record.size,
        record.sha256,
        json.dumps(record.manifest or {}, sort_keys=True, ensure_ascii=False),
        record.error,
        ts(record.verified_at),
        record.verify_result,
        ts(record.heartbeat_at),
    )


def backup_from_row(row: Any, when: Any) -> BackupRecord:
    """A backup from a row in ``BACKUP_COLUMNS`` order; ``when`` converts stored times back."""
    (id_, service, component, source, trigger, requested_by, destination, key, location, codec, state,
     started, finished, size, sha256, manifest, error, verified, verify_result, heartbeat) = tuple(row)  # fmt: skip
    return BackupRecord(
        id=id_,
        service=service,
        component=component,
        source=source,
        trigger=trigger,
        requested_by=requested_by,
        destination=destination,
        key=key,
        location=location,
        codec=codec,
        state=BackupState(state),
        started_at=when(started),
        finished_at=when(finished),
        size=None if size is None else int(size),
        sha256=sha256,
        manifest=json.loads(manifest) or None,
        error=error,
        verified_at=when(verified),
        verify_result=verify_result,
        heartbeat_at=when(heartbeat),
    )


@dataclass(frozen=True)
class ScheduleRun:
    """One fire time of one schedule, claimed by the replica that runs it."""

    name: str
    fire_at: datetime
    holder: str
    started_at: datetime
    finished_at: datetime | None = None
    outcome: str = ""


@dataclass(frozen=True)
class StoredAlert:
    """One alert's state machine, kept as JSON (services/alerts owns its shape), and its message."""

    key: str  # service/component/AlertName
    service: str
    state: dict[str, Any]
    updated_at: datetime
    message_channel: str | None = None
    message_ts: str | None = None


@dataclass(frozen=True)
class SilenceRecord:
    """An operator's silence of one alert until a time."""

    id: int
    key: str
    until: datetime
    by: str
    reason: str
    created_at: datetime
    ended_at: datetime | None = None


@dataclass(frozen=True)
class ProbeSample:
    """One probe result kept for digests and charts (status: 0 healthy, 1 warning, 2 critical)."""

    service: str
    component: str
    at: datetime
    status: int
    latency_ms: float


def utc(value: datetime) -> datetime:
    """``value`` as an aware UTC datetime (naive ones are taken to be UTC)."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


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

    async def create_approval(self, approval: Approval) -> None:
        """Store a new approval; raise ``KeyError`` if its id is taken."""

    async def get_approval(self, approval_id: str) -> Approval | None:
        """The approval with this id, with its votes, or None."""

    async def list_approvals(self, states: Collection[ApprovalState], *, limit: int = 100) -> list[Approval]:
        """Approvals in any of ``states``, newest first."""

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
        """Compare-and-set: move the approval to ``to`` only if it is in one of ``from_states``.

        Returns the updated approval, or None when it was not in ``from_states`` (or does not exist).
        """

    async def vote_approval(self, approval_id: str, voter: str, *, at: datetime) -> VoteResult:
        """Atomically count ``voter``'s Approve on a pending, unexpired approval; the vote that reaches
        ``required_approvals`` moves it to ``approved``. A second vote by the same voter is not counted."""

    async def expire_approvals(self, *, at: datetime) -> list[Approval]:
        """Move every pending approval whose expiry is at or before ``at`` to ``expired``; return them."""

    async def attach_approval_message(self, approval_id: str, channel: str, ts: str) -> None:
        """Remember the Slack message that shows the approval, so later transitions can edit it."""

    async def create_backup(self, record: BackupRecord) -> None:
        """Catalog a backup that is starting; raise ``KeyError`` if its id is taken."""

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

    async def renew_backup(self, backup_id: str, *, at: datetime) -> bool:
        """Stamp a ``running`` backup's heartbeat with ``at``; False if it is no longer running."""

    async def get_backup(self, backup_id: str) -> BackupRecord | None:
        """The backup with this id, or None."""

    async def list_backups(
        self,
        *,
        service: str | None = None,
        component: str | None = None,
        states: Collection[BackupState] | None = None,
        limit: int = 50,
    ) -> list[BackupRecord]:
        """Newest first; ``None`` filters mean any."""

    async def record_backup_check(self, backup_id: str, *, at: datetime, result: str) -> None:
        """Remember when a backup was last verified, and the outcome ("ok: …" or "failed: …")."""

    async def delete_backup(self, backup_id: str, *, at: datetime) -> bool:
        """Mark a ``good`` or ``failed`` backup ``deleted`` (retention); False if it was neither."""

    async def claim_schedule_run(self, name: str, fire_at: datetime, *, holder: str, at: datetime) -> bool:
        """Claim one fire time of a schedule; True for exactly one caller across every replica."""

    async def finish_schedule_run(self, name: str, fire_at: datetime, *, outcome: str, at: datetime) -> None:
        """Record how a claimed run ended (one line)."""

    async def last_schedule_runs(self) -> dict[str, ScheduleRun]:
        """The newest claimed run of each schedule."""

    async def load_alerts(self) -> dict[str, StoredAlert]:
        """Every alert's stored state, by key."""

    async def save_alert(self, alert: StoredAlert) -> None:
        """Insert or replace one alert's state (and its message, when known)."""

    async def add_silence(self, key: str, *, until: datetime, by: str, reason: str, at: datetime) -> SilenceRecord:
        """Silence one alert until ``until``."""

    async def active_silences(self, at: datetime) -> list[SilenceRecord]:
        """Silences not ended and not yet expired at ``at``, newest first."""

    async def end_silence(self, key: str, *, at: datetime) -> int:
        """End every active silence of ``key`` now; how many were ended."""

    async def record_probes(self, samples: Collection[ProbeSample], *, keep_after: datetime) -> None:
        """Keep probe results, dropping those older than ``keep_after`` (the history stays bounded)."""

    async def probe_history(self, *, since: datetime) -> list[ProbeSample]:
        """Probe results at or after ``since``, oldest first."""

    async def save_digest(self, kind: str, *, at: datetime, snapshot: dict[str, Any]) -> None:
        """Remember what a posted digest showed, so the next one can say what changed."""

    async def last_digest(self, kind: str) -> tuple[datetime, dict[str, Any]] | None:
        """The newest digest of ``kind`` (daily, weekly, monthly) and what it showed."""

    async def close(self) -> None:
        """Release connections; the store is unusable afterwards."""


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
