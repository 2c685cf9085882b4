"""What a digest shows, gathered as plain data: fresh probes, the backup catalog, the approvals and
runs of the period, the alert states, stuck jobs and the audit chain, and the previous posted digest
of the same kind to compare with. ``handlers/digest.py`` renders it; nothing here knows of Slack.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from services.alerts.rules import AlertState
from services.alerts.watch import state_from_json, watched
from services.backup.runner import BackupRunner
from services.charts import weekly_chart
from services.errors import CommandError
from services.health import HealthProbe, HealthReport, ProbeObserver, Status, Target, check_health, targets_for
from services.inventory import CloudSqlComponent, Inventory, PostgresComponent
from services.jobs import JobsTarget
from services.redaction import Redactor
from services.state import Approval, ApprovalState, BackupRecord, BackupState, StateStore

PERIODS: dict[str, timedelta] = {
    "daily": timedelta(hours=24),
    "weekly": timedelta(days=7),
    "monthly": timedelta(days=30),
}
APPROVALS_READ = 1000  # approvals read per digest (newest first); plenty for a small team's month
FAILED_BACKUPS_READ = 200
JOBS_LIMIT = 5  # stuck jobs fetched per jobs table: the count is what the checklist needs

S = ApprovalState
OPEN_STATES = (S.PENDING, S.APPROVED, S.RUNNING)
FINISHED_STATES = (S.SUCCEEDED, S.FAILED, S.INTERRUPTED, S.DENIED, S.EXPIRED, S.CANCELLED)
FAILED_STATES = (S.FAILED, S.INTERRUPTED)


class DigestSources(Protocol):
    """What a digest reads (the bot's ``Deps`` is one)."""

    @property
    def inventory(self) -> Inventory: ...

    @property
    def store(self) -> StateStore: ...

    @property
    def probes(self) -> Mapping[str, HealthProbe]: ...

    @property
    def redactor(self) -> Redactor: ...

    @property
    def backups(self) -> BackupRunner | None: ...

    @property
    def observe_probe(self) -> ProbeObserver | None: ...

    def probe_for(self, target: Target) -> HealthProbe | None: ...


@dataclass(frozen=True)
class PreviousDigest:
    """The last posted digest of this kind (or none): when, and the snapshot it saved."""

    at: datetime | None
    snapshot: Mapping[str, Any]

    @property
    def first(self) -> bool:
        return self.at is None

    def names(self, key: str) -> set[str]:
        value = self.snapshot.get(key)
        return {str(v) for v in value} if isinstance(value, list) else set()

    def pairs(self, key: str) -> list[tuple[str, str]]:
        """A list of ``[key, text]`` pairs, in the order the digest showed them."""
        value = self.snapshot.get(key)
        items = value if isinstance(value, list) else []
        return [(str(i[0]), str(i[1])) for i in items if isinstance(i, list | tuple) and len(i) == 2]

    def mapping(self, key: str) -> dict[str, Any]:
        value = self.snapshot.get(key)
        return {str(k): v for k, v in value.items()} if isinstance(value, dict) else {}


@dataclass(frozen=True)
class BackupStanding:
    """One backed-up component: its newest good backup and whether that is older than expected."""

    service: str
    component: str
    newest: BackupRecord | None
    expected: timedelta
    overdue: bool
    note: str = ""  # why the newest may be unknown (Cloud SQL unreachable)


@dataclass(frozen=True)
class BackupFacts:
    """Every backed-up component's standing, and the backups that failed in the period."""

    standings: list[BackupStanding]
    failed: list[BackupRecord]


@dataclass(frozen=True)
class RunFacts:
    """Approvals still open, and those that finished in the period."""

    opened: list[Approval]
    finished: list[Approval]
    failed: list[Approval]  # failed or interrupted in the period, newest first
    pending: list[Approval]
    overdue: list[Approval]  # pending past their expiry (the sweeper has not expired them)


@dataclass(frozen=True)
class AlertFacts:
    """The alerts firing now, and what resolved in the period."""

    any_stored: bool  # has any alert ever had a state
    firing: list[AlertState]  # oldest first
    resolved_in_period: set[str]  # keys not firing now whose recorded resolution falls in the period
    silenced_until: dict[str, datetime]
    severity: dict[str, Status]  # from each alert's rule in the inventory


@dataclass(frozen=True)
class JobsCheck:
    """One jobs table: how many jobs are stuck, or why that could not be checked (``stuck`` None)."""

    service: str
    component: str
    stuck: int | None
    threshold_minutes: int = 0
    problem: str = ""


@dataclass(frozen=True)
class DigestFacts:
    """Everything one digest shows, for the ``kind`` period ending ``now``."""

    kind: str
    now: datetime
    start: datetime
    timezone: str
    previous: PreviousDigest
    health: HealthReport
    backups: BackupFacts | None  # None: backups are not set up in this bot
    runs: RunFacts
    alerts: AlertFacts
    jobs: list[JobsCheck]  # empty: no component has a jobs table
    audit_broken_at: int | None  # the event where the hash chain breaks, None when intact

    def in_period(self, moment: datetime | None) -> bool:
        return _in(self.start, self.now, moment)


async def gather_digest(sources: DigestSources, kind: str, *, now: datetime) -> DigestFacts:
    """Probe and read everything the ``kind`` digest ending ``now`` shows (nothing is saved)."""
    if kind not in PERIODS:
        raise ValueError(f"unknown digest kind {kind!r}")
    now = now.astimezone(UTC)
    start = now - PERIODS[kind]
    inventory = sources.inventory
    previous = await _previous(sources.store, kind)
    try:
        # One task group: should one read fail unexpectedly, the others (probes too) are cancelled.
        async with asyncio.TaskGroup() as group:
            probing = group.create_task(
                check_health(
                    targets_for(inventory, "all"), sources.probe_for, deadline=inventory.health.deadline,
                    redactor=sources.redactor, observe=sources.observe_probe,
                )
            )  # fmt: skip
            backups = group.create_task(_backups(sources, now, start))
            runs = group.create_task(_runs(sources.store, now, start))
            alerts = group.create_task(_alerts(sources, now, start))
            jobs = group.create_task(_jobs(sources))
            audit = group.create_task(sources.store.verify_audit())
    except ExceptionGroup as failed:
        raise failed.exceptions[0] from None
    return DigestFacts(
        kind, now, start, inventory.timezone, previous, probing.result(), backups.result(), runs.result(),
        alerts.result(), jobs.result(), audit.result(),
    )  # fmt: skip


async def save_posted(sources: DigestSources, kind: str, *, at: datetime, snapshot: dict[str, Any]) -> None:
    """Remember what a posted digest showed: the next digest of its kind says what changed since."""
    await sources.store.save_digest(kind, at=at, snapshot=snapshot)


async def availability_chart(sources: DigestSources, start: datetime, end: datetime) -> bytes | None:
    """The weekly chart of availability and p95 latency from ``start`` to ``end`` (None: no samples)."""
    return await weekly_chart(await sources.store.probe_history(since=start), start, end)


def _in(start: datetime, now: datetime, moment: datetime | None) -> bool:
    return moment is not None and start < moment <= now


async def _previous(store: StateStore, kind: str) -> PreviousDigest:
    found = await store.last_digest(kind)
    if found is None:
        return PreviousDigest(None, {})
    at, snapshot = found
    return PreviousDigest(at, snapshot if isinstance(snapshot, dict) else {})


def _moment(value: object) -> datetime | None:
    """A time from stored JSON (ISO text or epoch seconds), as aware UTC; None if it is neither."""
    if isinstance(value, datetime):
        moment = value
    elif isinstance(value, int | float) and not isinstance(value, bool):
        try:
            return datetime.fromtimestamp(value, UTC)
        except (OverflowError, OSError, ValueError):
            return None
    elif isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            return None
    else:
        return None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


# -- backups ---------------------------------------------------------------------------------------


async def _cloudsql_newest(runner: BackupRunner, service: str, deadline: float) -> tuple[dict[str, BackupRecord], str]:
    """Newest good Cloud SQL backup run per instance of ``service`` (Google keeps the automated ones)."""
    try:
        async with asyncio.timeout(deadline):
            runs = await runner.cloudsql_runs(service, limit=5)
    except CommandError as exc:
        return {}, f"could not list the Cloud SQL backup runs: {exc.message}"
    except TimeoutError:
        return {}, "the Cloud SQL Admin API did not answer in time"
    newest: dict[str, BackupRecord] = {}
    for component, records in runs.items():
        good = [r for r in records if r.state is BackupState.GOOD]
        if good:
            newest[component] = max(good, key=lambda r: r.started_at)
    return newest, ""


async def _standings(inventory: Inventory, runner: BackupRunner, now: datetime) -> list[BackupStanding]:
    found: list[BackupStanding] = []
    for service in inventory.services:
        components = runner.components(service)
        if not components:
            continue
        managed: dict[str, BackupRecord] = {}
        note = ""
        if any(isinstance(spec, CloudSqlComponent) for spec in components.values()):
            managed, note = await _cloudsql_newest(runner, service, inventory.health.deadline)
        expected = runner.expected_every(service)
        for component, spec in components.items():
            candidates = [r for r in (await runner.newest_good(service, component), managed.get(component)) if r]
            newest = max(candidates, key=lambda r: r.started_at, default=None)
            overdue = newest is None or now - newest.started_at > expected
            why = note if isinstance(spec, CloudSqlComponent) else ""
            found.append(BackupStanding(service, component, newest, expected, overdue, why))
    return found


async def _backups(sources: DigestSources, now: datetime, start: datetime) -> BackupFacts | None:
    runner = sources.backups
    if runner is None:
        return None
    standings = await _standings(sources.inventory, runner, now)
    if not standings:
        return BackupFacts([], [])
    failed = [
        r
        for r in await sources.store.list_backups(states=[BackupState.FAILED], limit=FAILED_BACKUPS_READ)
        if _in(start, now, r.started_at)
    ]
    return BackupFacts(standings, failed)


# -- approvals and runs ----------------------------------------------------------------------------


def _ended_at(approval: Approval) -> datetime:
    return approval.finished_at or approval.decided_at or approval.created_at


async def _runs(store: StateStore, now: datetime, start: datetime) -> RunFacts:
    opened = await store.list_approvals(OPEN_STATES, limit=APPROVALS_READ)
    finished = [
        a for a in await store.list_approvals(FINISHED_STATES, limit=APPROVALS_READ) if _in(start, now, _ended_at(a))
    ]
    failed = sorted((a for a in finished if a.state in FAILED_STATES), key=_ended_at, reverse=True)
    pending = [a for a in opened if a.state is S.PENDING]
    overdue = [a for a in pending if a.expires_at <= now]
    return RunFacts(opened, finished, failed, pending, overdue)


# -- alerts ----------------------------------------------------------------------------------------


def _severities(sources: DigestSources) -> dict[str, Status]:
    """Each alert's severity from its rule in the inventory (ServiceDown by default is critical)."""
    return {
        rule.key(w.target.service, w.target.component): Status.CRITICAL
        if rule.severity == "critical"
        else Status.WARNING
        for w in watched(sources.inventory, frozenset(sources.probes))
        for rule in w.rules
    }


async def _alerts(sources: DigestSources, now: datetime, start: datetime) -> AlertFacts:
    stored = await sources.store.load_alerts()
    states = {key: state_from_json(alert.state, key) for key, alert in stored.items()}
    silences = {s.key: s.until for s in await sources.store.active_silences(now)}
    firing = sorted((s for s in states.values() if s.firing), key=lambda s: (s.fired_at or now, s.key))
    firing_keys = {s.key for s in firing}
    # An alert's state starts over when it resolves; the watcher keeps ``resolved_at`` for the digest.
    resolved = {
        key
        for key, alert in stored.items()
        if key not in firing_keys and _in(start, now, _moment(alert.state.get("resolved_at")))
    }
    return AlertFacts(bool(stored), firing, resolved, silences, _severities(sources))


# -- stuck jobs ------------------------------------------------------------------------------------


async def _stuck_jobs(sources: DigestSources, service: str, target: JobsTarget) -> JobsCheck:
    """Stuck jobs in one jobs table, or why they could not be counted."""
    component, spec = target.component, target.spec
    client = target.client(sources.redactor)
    try:
        async with asyncio.timeout(spec.timeout * 2 + 1):
            summary = await client.summary(limit=JOBS_LIMIT)
    except CommandError as exc:
        return JobsCheck(service, component, None, problem=exc.message)
    except TimeoutError:
        return JobsCheck(service, component, None, problem="no answer in time")
    return JobsCheck(service, component, summary.stuck_total, summary.threshold_minutes)


async def _jobs(sources: DigestSources) -> list[JobsCheck]:
    tables = [
        (service, JobsTarget(component, spec, spec.jobs))
        for service, component, spec in sources.inventory.components()
        if isinstance(spec, PostgresComponent) and spec.jobs is not None
    ]
    return list(await asyncio.gather(*(_stuck_jobs(sources, service, target) for service, target in tables)))
