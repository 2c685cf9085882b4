"""What a digest shows, gathered as plain data: fresh probes, the backup catalog, the approvals and
runs of the period, the alert states, stuck jobs and the audit chain, and the previous posted digest
of the same kind to compare with, each service's queues (failed jobs since that digest, the oldest
waiting job, paused queues), what its last scheduled cleanup removed, and its integrity check (runbook
003). ``handlers/digest.py`` renders it; nothing here knows of Slack.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from services.access import SCHEDULER_USER
from services.alerts.rules import AlertState
from services.alerts.watch import state_from_json, watched
from services.backup.runner import BackupRunner
from services.charts import weekly_chart
from services.cost import CostStanding, cost_standings
from services.errors import CommandError
from services.figures.base import FigureSource
from services.health import HealthProbe, HealthReport, ProbeObserver, Status, Target, check_health, targets_for
from services.integrity import IntegrityChecker, Line, integrity_target
from services.inventory import CloudSqlComponent, Inventory, PostgresComponent
from services.jobs import JobsTarget
from services.queues import QueueActivity, QueueTarget, queue_targets
from services.redaction import Redactor
from services.state import Approval, ApprovalState, BackupRecord, BackupState, StateStore
from services.status import MAX_WINDOW, FigureLine, collect_status

PERIODS: dict[str, timedelta] = {
    "daily": timedelta(hours=24),
    "weekly": timedelta(days=7),
    "monthly": timedelta(days=30),
}
APPROVALS_READ = 1000  # approvals read per digest (newest first); plenty for a small team's month
FAILED_BACKUPS_READ = 200
JOBS_LIMIT = 5  # stuck jobs fetched per jobs table: the count is what the checklist needs
INTEGRITY_DEADLINE = 60.0  # seconds one service's integrity check may take in a digest
CLEANUP_ACTIONS = ("cleanup", "queue clean")  # what a scheduled cleanup runs, by the approval's action
CERTIFICATE_DAYS = 30  # the digest lists certificates with this many days left or fewer (runbook 001)
BUSIEST_KINDS = ("weekly",)  # digests that read each service's busiest figure over their period

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
class QueueFacts:
    """One service's queues: the jobs failed since ``since``, the oldest waiting job, the paused queues;
    and, per component whose queues could not be read, why."""

    service: str
    since: datetime  # the previous digest of this kind (the period's start for the first)
    queues: list[QueueActivity]
    unread: list[tuple[str, str]] = field(default_factory=list)  # (component, why)
    more: bool = False  # a component's search for queues stopped early: more queues may exist

    @property
    def failed(self) -> int:
        return sum(q.failed for q in self.queues)

    @property
    def oldest(self) -> QueueActivity | None:
        """The queue whose oldest waiting job has waited longest (None: nothing waiting)."""
        waiting = [q for q in self.queues if q.oldest_waiting_seconds is not None]
        return max(waiting, key=lambda q: q.oldest_waiting_seconds or 0.0, default=None)

    @property
    def paused(self) -> list[str]:
        return [q.ref.name for q in self.queues if q.paused]


@dataclass(frozen=True)
class ScheduledCleanup:
    """One service's newest cleanup asked for by the scheduler in the period (``run`` None: none ran,
    though the inventory schedules one: ``schedules`` names them)."""

    service: str
    run: Approval | None
    schedules: list[str] = field(default_factory=list)


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
    queues: list[QueueFacts] = field(default_factory=list)  # services with queues, in inventory order
    cleanups: list[ScheduledCleanup] = field(default_factory=list)
    integrity: list[IntegrityStanding] = field(default_factory=list)  # services with an `integrity:` section
    certificates: list[CertificateFacts] = field(default_factory=list)  # expiring within 30 days, worst first
    busiest: BusiestFacts | None = None  # None: not read for this kind of digest, or no figure sources
    costs: list[CostStanding] = field(default_factory=list)  # services with a `cost:` section (runbook 002)

    def in_period(self, moment: datetime | None) -> bool:
        return _in(self.start, self.now, moment)


async def gather_digest(
    sources: DigestSources, kind: str, *, now: datetime, figures: Mapping[str, FigureSource] | None = None
) -> DigestFacts:
    """Probe and read everything the ``kind`` digest ending ``now`` shows (nothing is saved); with the bot's
    ``figures`` sources, a weekly digest also reads each service's busiest figure over the week."""
    if kind not in PERIODS:
        raise ValueError(f"unknown digest kind {kind!r}")
    now = now.astimezone(UTC)
    start = now - PERIODS[kind]
    inventory = sources.inventory
    previous = await _previous(sources.store, kind)
    since = previous.at or start  # failed jobs are counted since the last digest of this kind
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
            queues = group.create_task(_queues(sources, since, now))
            integrity = group.create_task(_integrity(sources))
            busiest = None
            if figures and kind in BUSIEST_KINDS:
                busiest = group.create_task(_busiest(sources, figures, now, PERIODS[kind]))
            # Cost Explorer answers are kept for the day in the bot's cost cache (one per state store).
            costs = group.create_task(cost_standings(inventory, sources.store, now=now, since=start.date()))
    except ExceptionGroup as failed:
        raise failed.exceptions[0] from None
    return DigestFacts(
        kind, now, start, inventory.timezone, previous, probing.result(), backups.result(), runs.result(),
        alerts.result(), jobs.result(), audit.result(), queues.result(),
        scheduled_cleanups(inventory, runs.result().finished), integrity.result(),
        expiring_certificates(probing.result()), busiest.result() if busiest is not None else None,
        costs=costs.result(),
    )  # fmt: skip


# -- certificates ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class CertificateFacts:
    """A tls component whose certificate has ``CERTIFICATE_DAYS`` or fewer left, or fails verification,
    from the digest's own probe (``days_left`` None: no certificate could be read)."""

    service: str
    component: str
    status: Status
    days_left: float | None
    not_after: str  # ISO time, "" when unknown
    problem: str  # why it is not trusted, "" when it is
    detail: str


def expiring_certificates(report: HealthReport, within_days: float = CERTIFICATE_DAYS) -> list[CertificateFacts]:
    """The tls components of the report expiring within ``within_days`` or failing verification, worst first
    (by the probe's status, then the fewest days left)."""
    found: list[CertificateFacts] = []
    for item in report.items:
        if item.target.type != "tls":
            continue
        facts = item.result.facts
        days = facts.get("days_left")
        days_left = float(days) if isinstance(days, int | float) else None
        problem = facts.get("verify_error")
        untrusted = isinstance(problem, str) and bool(problem)
        if not untrusted and (days_left is None or days_left > within_days):
            continue  # unreachable is the health section's to say; a far expiry is not news
        after = facts.get("not_after")
        found.append(
            CertificateFacts(
                item.target.service, item.target.component, item.result.status, days_left,
                after if isinstance(after, str) else "", problem if isinstance(problem, str) else "",
                item.result.detail,
            )
        )  # fmt: skip
    infinite = float("inf")
    found.sort(key=lambda c: (-c.status, c.days_left if c.days_left is not None else infinite, c.service, c.component))
    return found


# -- the busiest figure of each service (weekly) ---------------------------------------------------

BUSY_PREFIXES = ("cpu_", "memory_", "disk_used_pct")  # utilisation figures in %, comparable across sources


@dataclass(frozen=True)
class Busiest:
    """A service's highest utilisation figure over the period (and over the period before, when known)."""

    service: str
    component: str
    line: FigureLine


@dataclass(frozen=True)
class BusiestFacts:
    """The busiest figure per service, the window it covers, and the components whose figures could not
    be read (``(service/component, why)``)."""

    window: timedelta
    services: list[Busiest]
    unread: list[tuple[str, str]] = field(default_factory=list)


def _busy(line: FigureLine) -> bool:
    m = line.measurement
    return m.unit == "%" and m.value is not None and m.name.startswith(BUSY_PREFIXES)


async def _busiest(
    sources: DigestSources, figures: Mapping[str, FigureSource], now: datetime, period: timedelta
) -> BusiestFacts:
    """Each service's highest CPU, memory or disk % over the period (at most the 7 days `/ops status` reads),
    from the same figure sources as `/ops status`: concurrently, each component within its own timeout
    and all within the inventory's health deadline. The certificate figure is no load: tls is left out."""
    window = min(period, MAX_WINDOW)
    inventory = sources.inventory
    targets = [t for t in targets_for(inventory, "all") if t.type != "tls" and t.type in figures]
    report = await collect_status(
        targets, figures, window, deadline=inventory.health.deadline, redactor=sources.redactor, now=now
    )
    best: dict[str, Busiest] = {}
    unread: list[tuple[str, str]] = []
    for item in report.items:
        where = f"{item.target.service}/{item.target.component}"
        if item.status is None:
            unread.append((where, item.problem))
            continue
        for line in filter(_busy, item.figures):
            held = best.get(item.target.service)
            if held is None or (line.measurement.value or 0.0) > (held.line.measurement.value or 0.0):
                best[item.target.service] = Busiest(item.target.service, item.target.component, line)
    busiest_first = sorted(best.values(), key=lambda b: (-(b.line.measurement.value or 0.0), b.service))
    return BusiestFacts(window, busiest_first, unread)


@dataclass(frozen=True)
class IntegrityStanding:
    """One service's integrity check (runbook 003), run for the digest within a bounded deadline."""

    service: str
    status: Status
    problems: tuple[Line, ...]  # the lines that are not healthy, in the check's order


async def _integrity(sources: DigestSources) -> list[IntegrityStanding]:
    """The integrity check of every service that declares one, concurrently, each cut to INTEGRITY_DEADLINE."""
    inventory = sources.inventory
    checker = IntegrityChecker(sources.redactor)

    async def one(service: str) -> IntegrityStanding:
        try:
            target = integrity_target(inventory, service)
        except CommandError as exc:
            return IntegrityStanding(service, Status.CRITICAL, (Line("integrity", Status.CRITICAL, exc.message),))
        deadline = min(target.settings.deadline_seconds, INTEGRITY_DEADLINE)
        bounded = replace(target, settings=target.settings.model_copy(update={"deadline_seconds": deadline}))
        report = await checker.check(bounded)
        return IntegrityStanding(
            service, report.status, tuple(line for line in report.lines if line.status is not Status.HEALTHY)
        )

    names = [name for name, spec in inventory.services.items() if spec.integrity is not None]
    return list(await asyncio.gather(*(one(name) for name in names)))


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


# -- queues ----------------------------------------------------------------------------------------


def _ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


async def _component_queues(
    sources: DigestSources, target: QueueTarget, since: datetime, now: datetime
) -> tuple[list[QueueActivity], str, bool]:
    """One component's queues (found, then read in one round trip), or why they could not be read."""
    client = target.client(sources.redactor)
    timeout = target.spec.timeout
    try:
        # The read is bounded by the timeout itself; a search for undeclared queues gets as long again.
        async with asyncio.timeout(timeout * 2 + 1):
            refs, more = await client.queues()
            return await client.activity(refs, since_ms=_ms(since), now_ms=_ms(now)), "", more
    except CommandError as exc:
        return [], exc.message, False
    except TimeoutError:
        return [], f"no answer within {timeout * 2 + 1:g} s", False


async def _service_queues(sources: DigestSources, service: str, targets: Sequence[QueueTarget],
                          since: datetime, now: datetime) -> QueueFacts:  # fmt: skip
    read = await asyncio.gather(*(_component_queues(sources, t, since, now) for t in targets))
    queues = [q for found, _, _ in read for q in found]
    unread = [(t.component, problem) for t, (_, problem, _) in zip(targets, read, strict=True) if problem]
    return QueueFacts(service, since, queues, unread, any(more for _, _, more in read))


async def _queues(sources: DigestSources, since: datetime, now: datetime) -> list[QueueFacts]:
    """Every service with queue-holding Redis components, read concurrently; a Redis that does not
    answer gives its reason, never an exception."""
    inventory = sources.inventory
    services = [(name, targets) for name in inventory.services if (targets := queue_targets(inventory, name))]
    return list(
        await asyncio.gather(*(_service_queues(sources, name, targets, since, now) for name, targets in services))
    )


# -- scheduled cleanups ----------------------------------------------------------------------------


def cleanup_schedules(inventory: Inventory) -> dict[str, list[str]]:
    """Service -> the enabled schedules that run ``cleanup <service>`` or ``queue clean <service> …``."""
    found: dict[str, list[str]] = {}
    for spec in inventory.schedules:
        words = spec.command.lower().split()
        if words[:1] == ["/ops"]:
            words = words[1:]
        if words[:1] == ["cleanup"]:
            named = words[1:2]
        elif words[:2] == ["queue", "clean"]:
            named = words[2:3]
        else:
            continue
        if spec.enabled and named and named[0] in inventory.services:
            found.setdefault(named[0], []).append(spec.name)
    return found


def scheduled_cleanups(inventory: Inventory, finished: Sequence[Approval]) -> list[ScheduledCleanup]:
    """Per service, the newest cleanup (``cleanup`` or ``queue clean``) the scheduler asked for among the
    period's finished approvals; a service whose cleanup schedule ran none gets ``run`` None."""
    newest: dict[str, Approval] = {}
    for approval in sorted(finished, key=_ended_at):
        if approval.action in CLEANUP_ACTIONS and approval.requester == SCHEDULER_USER:
            newest[approval.service] = approval
    declared = cleanup_schedules(inventory)
    order = {name: i for i, name in enumerate(inventory.services)}
    services = sorted(set(newest) | set(declared), key=lambda s: (order.get(s, len(order)), s))
    return [ScheduledCleanup(s, newest.get(s), declared.get(s, [])) for s in services]
