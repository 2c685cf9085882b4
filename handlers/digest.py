"""/ops digest [daily|weekly|monthly] [--post]: the runbooks' periodic checklists as one message.

A digest probes every service afresh, reads the backup catalog, the approvals and runs of its
period, the alert states, the job queues, the scheduled cleanups and the audit chain
(``services.digest`` gathers all that as plain data), and this module renders it with every problem
first. Each section ends with what changed since the
previous *posted* digest of the same kind; a preview (without ``--post``) saves nothing, so it never
changes what the next posted digest compares with.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from pydantic import Field

from handlers import blocks as bk
from handlers.context import Block, Deps, OpsContext, Reply, Upload
from handlers.registry import CommandArgs, clip_token, subcommand
from services.access import Risk
from services.alerts.rules import AlertState, Phase
from services.cost import CostStanding, anomaly_text, summary
from services.digest import (
    FAILED_STATES,
    FINISHED_STATES,
    PERIODS,
    AlertFacts,
    BackupFacts,
    BackupStanding,
    Busiest,
    BusiestFacts,
    CertificateFacts,
    DigestFacts,
    IntegrityStanding,
    JobsCheck,
    PreviousDigest,
    QueueFacts,
    RunFacts,
    ScheduledCleanup,
    availability_chart,
    gather_digest,
    save_posted,
)
from services.errors import CommandError
from services.health import HealthReport, Status, overall
from services.state import Approval, ApprovalState
from services.text import ago, size

SNAPSHOT_VERSION = 1
PROGRESS_AFTER = 2.0  # seconds before the caller is told the digest is being put together
SECTION_LINES = 20  # lines listed per section; the rest are counted ("… and N more")
LINE_CHARS = 280  # one listed line at most (keeps every section within two or three blocks)
CHANGE_ITEMS = 8  # names listed per kind of change

S = ApprovalState

OK_MARK = ":white_check_mark:"
CROSS_MARK = ":x:"


def current_time() -> datetime:
    """Now, in UTC: the one place this module reads the clock (a scheduler or a test may replace it)."""
    return datetime.now(UTC)


def digest_kind(word: str) -> str:
    """``daily``, ``weekly`` or ``monthly`` from what the caller typed, or a one-sentence refusal."""
    kind = word.strip().lower()
    if kind not in PERIODS:
        raise CommandError(f"There is no `{clip_token(word)}` digest: choose daily, weekly or monthly.")
    return kind


# -- what a digest is made of ----------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """Something that needs a person. ``key`` identifies it across digests (``health:shop``)."""

    key: str
    line: str  # mrkdwn, for the message
    text: str  # plain and short, for the fallback text and the next digest's "resolved" list
    severity: Status = Status.WARNING


@dataclass
class Part:
    """One section of the digest: a title, its lines, and what changed since the last digest."""

    title: str
    lines: list[str]
    change: str
    note: str = ""
    problems: list[Problem] = field(default_factory=list)


@dataclass(frozen=True)
class CheckItem:
    """One runbook checklist item the bot checks itself: ticked or crossed, with one short reason."""

    key: str
    label: str
    ok: bool
    reason: str
    severity: Status = Status.WARNING  # of the problem a crossed item is


@dataclass(frozen=True)
class Digest:
    """A built digest: the message, and the snapshot the next digest of this kind compares with."""

    kind: str
    at: datetime
    start: datetime
    text: str
    blocks: list[Block]
    summary: list[Block]
    snapshot: dict[str, Any]
    problems: tuple[Problem, ...]
    status: Status


@dataclass
class _Context:
    """What every section renderer needs: the period, the zone, the previous snapshot."""

    kind: str
    now: datetime
    start: datetime
    zone: ZoneInfo
    previous: PreviousDigest

    def when(self, moment: datetime | None) -> str:
        if moment is None:
            return "?"
        local = moment.astimezone(self.zone)
        if local.date() == self.now.astimezone(self.zone).date():
            return local.strftime("%H:%M %Z")
        return local.strftime("%Y-%m-%d %H:%M %Z")

    def full(self, moment: datetime) -> str:
        return moment.astimezone(self.zone).strftime("%Y-%m-%d %H:%M")

    def in_period(self, moment: datetime | None) -> bool:
        return moment is not None and self.start < moment <= self.now


# -- small helpers ---------------------------------------------------------------------------------


def _line(text: str) -> str:
    return bk.clip(text, LINE_CHARS)


def _bounded(lines: Sequence[str], limit: int = SECTION_LINES, what: str = "more") -> list[str]:
    """At most ``limit`` lines, the rest counted (never dropped silently)."""
    shown = [_line(line) for line in lines[:limit]]
    if len(lines) > limit:
        shown.append(f"… and {len(lines) - limit:,} {what}")
    return shown


def _names(items: Sequence[str], limit: int = CHANGE_ITEMS, sep: str = ", ") -> str:
    shown = sep.join(items[:limit])
    return shown + (f" … and {len(items) - limit:,} more" if len(items) > limit else "")


def _changes(previous: PreviousDigest, parts: Iterable[tuple[str, Sequence[str]]]) -> str:
    """``new: shop critical; recovered: blog``, ``no change``, or ``first digest``."""
    if previous.first:
        return "first digest"
    said = [f"{label}: {_names(list(items))}" for label, items in parts if items]
    return "; ".join(said) or "no change"


def _hours(delta: timedelta) -> str:
    return f"{delta.total_seconds() / 3600:g} h"


# -- health ----------------------------------------------------------------------------------------


def _health_part(ctx: _Context, report: HealthReport) -> tuple[Part, dict[str, str]]:
    by_service = report.by_service()  # worst service first, worst component first
    # A provider's status page counts only where declared `affects: true` (as in /ops health).
    statuses = {service: overall(items).label for service, items in by_service.items()}
    lines: list[str] = []
    problems: list[Problem] = []
    healthy: list[str] = []
    for service, items in by_service.items():
        worst = overall(items)
        if worst is Status.HEALTHY:
            healthy.append(service)
            continue
        bad = [i for i in items if i.counted and i.result.status is not Status.HEALTHY]
        detail = "; ".join(
            f"{bk.escape(i.target.component)}: {i.result.status.label} — {bk.escape(i.result.detail)}" for i in bad
        )
        emoji = bk.STATUS_EMOJI[worst]
        lines.append(f"{emoji} *{bk.escape(service)}* {worst.label} — {detail}")
        first = bad[0]
        problems.append(
            Problem(
                f"health:{service}",
                _line(f"{emoji} *{bk.escape(service)}* is {worst.label}: {detail}"),
                f"{service} {worst.label} ({first.target.component}: {first.result.detail[:80]})",
                worst,
            )
        )
    lines = _bounded(lines, what="more services with problems")
    if healthy:
        lines.append(_line(f"{bk.STATUS_EMOJI[Status.HEALTHY]} healthy: {bk.escape(_names(healthy))}"))
    if not by_service:
        lines.append("Nothing was probed (no component has a health check).")
    note = ""
    if report.skipped:
        skipped = ", ".join(f"{t.service}/{t.component} ({t.type})" for t in report.skipped[:10])
        more = f" … and {len(report.skipped) - 10} more" if len(report.skipped) > 10 else ""
        note = f"Not probed (no health check for their type): {bk.escape(skipped)}{more}"
    before = {k: str(v) for k, v in ctx.previous.mapping("health").items()}
    rank = {s.label: s for s in Status}
    new, worse, better, recovered = [], [], [], []
    for service, label in statuses.items():
        was = rank.get(before.get(service, "healthy"), Status.HEALTHY)
        now = rank[label]
        if now is Status.HEALTHY and was is not Status.HEALTHY:
            recovered.append(service)
        elif was is Status.HEALTHY and now is not Status.HEALTHY:
            new.append(f"{service} {label}")
        elif now > was:
            worse.append(f"{service} {was.label} → {label}")
        elif now < was:
            better.append(f"{service} {was.label} → {label}")
    change = _changes(ctx.previous, [("new", new), ("worse", worse), ("better", better), ("recovered", recovered)])
    title = f"*Health* — {len(statuses) - len(healthy)} of {len(statuses)} service(s) not healthy"
    return Part(title, lines, change, note, problems), statuses


# -- backups ---------------------------------------------------------------------------------------


def _backup_line(ctx: _Context, item: BackupStanding) -> str:
    where = f"*{bk.escape(item.service)}/{bk.escape(item.component)}*"
    extra = f" ({bk.escape(item.note)})" if item.note else ""
    if item.newest is None:
        return f":warning: {where} — *no good backup yet*{extra}"
    record = item.newest
    age = ago(ctx.now - record.started_at)
    taken = f"{age} ({ctx.when(record.started_at)}"
    taken += f", {size(record.size)})" if record.source != "cloudsql" else ", Cloud SQL)"
    if item.overdue:
        return f":warning: {where} — *overdue*: newest good {taken}, expected every {_hours(item.expected)}{extra}"
    return f"{bk.STATUS_EMOJI[Status.HEALTHY]} {where} — newest good {taken}"


def _backups_part(ctx: _Context, backups: BackupFacts | None) -> tuple[Part, list[str], CheckItem | None]:
    previous = ctx.previous.names("backups_overdue")
    if backups is None:
        check = CheckItem("backups", "Backups on time", False, "backups are not set up in this bot")
        text = "Backups are not set up in this bot."
        return Part("*Backups*", [text], _changes(ctx.previous, [])), [], check
    standings = list(backups.standings)
    if not standings:
        text = "No component here is one opsbot backs up (postgres, mongodb, sqlite, files or cloudsql)."
        return Part("*Backups*", [text], _changes(ctx.previous, [])), [], None
    standings.sort(key=lambda s: (not s.overdue, s.newest is not None, s.service, s.component))
    overdue = [s for s in standings if s.overdue]
    names = [f"{s.service}/{s.component}" for s in overdue]
    problems = [
        Problem(
            f"backup:{s.service}/{s.component}",
            _line(_backup_line(ctx, s)),
            f"backup {s.service}/{s.component} "
            + ("missing" if s.newest is None else f"overdue ({ago(ctx.now - s.newest.started_at)})"),
        )
        for s in overdue
    ]
    lines = _bounded([_backup_line(ctx, s) for s in standings], what="more components")
    failed = backups.failed
    if failed:
        shown = _names([f"`{r.id}`" for r in failed], limit=5)
        lines.append(_line(f":red_circle: {len(failed)} backup(s) failed in this period: {shown}"))
    change = _changes(
        ctx.previous,
        [
            ("newly overdue", [n for n in names if n not in previous]),
            ("back on time", sorted(previous - set(names))),
        ],
    )
    title = f"*Backups* — {len(overdue)} of {len(standings)} component(s) overdue or missing"
    if overdue:
        reason = _names([p.text for p in problems], limit=3, sep="; ")
        check = CheckItem("backups", "Backups on time", False, reason)
    else:
        check = CheckItem(
            "backups", "Backups on time", True, f"{len(standings)} component(s) backed up within their interval"
        )
    return Part(title, lines, change, problems=problems), sorted(names), check


# -- approvals and runs ----------------------------------------------------------------------------


def _run_line(ctx: _Context, approval: Approval) -> str:
    what = f"`{approval.id}` `/ops {bk.escape(approval.action)} {bk.escape(approval.service)}`"
    if approval.state is S.PENDING:
        late = " *(past its expiry)*" if approval.expires_at <= ctx.now else ""
        return (
            f":hourglass_flowing_sand: {what} waiting for approval since {ctx.when(approval.created_at)}, "
            f"expires {ctx.when(approval.expires_at)}{late} — {bk.escape(approval.summary)}"
        )
    if approval.state in (S.APPROVED, S.RUNNING):
        return f":gear: {what} {approval.state.value} since {ctx.when(approval.started_at or approval.decided_at)}"
    result = approval.result.splitlines()[0] if approval.result else ""
    return f":red_circle: {what} *{approval.state.value}* {ctx.when(approval.finished_at)}" + (
        f": {bk.escape(result)}" if result else f" — {bk.escape(approval.summary)}"
    )


def _runs_part(ctx: _Context, runs: RunFacts) -> tuple[Part, dict[str, list[str]], CheckItem]:
    opened, finished, failed, pending, overdue = runs.opened, runs.finished, runs.failed, runs.pending, runs.overdue
    counts = {state: sum(1 for a in finished if a.state is state) for state in FINISHED_STATES}
    tally = ", ".join(f"{n} {state.value}" for state, n in counts.items() if n) or "nothing finished"
    lines = _bounded([_run_line(ctx, a) for a in failed], what="more failed runs")
    lines += _bounded([_run_line(ctx, a) for a in opened], limit=10, what="more open requests")
    if not failed and not opened:
        lines.append("No failed run in this period and nothing waiting for approval.")
    problems = [
        Problem(
            f"run:{a.id}",
            _line(_run_line(ctx, a)),
            f"run {a.id} ({a.action} {a.service}) {a.state.value}",
            Status.CRITICAL,
        )
        for a in failed
    ]
    before_failed = ctx.previous.names("runs_failed")
    before_pending = ctx.previous.names("pending")
    pending_ids = [a.id for a in pending]
    change = _changes(
        ctx.previous,
        [
            ("new failures", [f"`{a.id}` ({a.action} {a.service})" for a in failed if a.id not in before_failed]),
            ("newly pending", [f"`{i}`" for i in pending_ids if i not in before_pending]),
            ("no longer pending", [f"`{i}`" for i in sorted(before_pending - set(pending_ids))]),
        ],
    )
    title = f"*Approvals and runs* — {len(failed)} failed, {len(pending)} pending"
    note = f"Finished in this period: {tally}."
    if overdue:
        check = CheckItem(
            "approvals",
            "No request past its expiry",
            False,
            f"{len(overdue)} pending request(s) past their expiry: "
            + ", ".join(f"`{a.id}`" for a in overdue[:5])
            + " (the sweeper has not expired them)",
        )
    else:
        check = CheckItem(
            "approvals",
            "No request past its expiry",
            True,
            f"{len(pending)} pending, none past its expiry" if pending else "nothing is waiting for approval",
        )
    snapshot = {"runs_failed": sorted(a.id for a in failed), "pending": sorted(pending_ids)}
    return Part(title, lines, change, note, problems), snapshot, check


# -- alerts ----------------------------------------------------------------------------------------


def _alert_line(ctx: _Context, state: AlertState, silenced_until: datetime | None) -> str:
    line = f":rotating_light: *{bk.escape(state.key)}* firing since {ctx.when(state.fired_at or state.since)}"
    if state.phase is Phase.RESOLVING:
        line += " (recovering)"
    if state.evidence:
        line += f" — {bk.escape(state.evidence[:200])}"
    if silenced_until is not None:
        line += f" · silenced until {ctx.when(silenced_until)}"
    return line


def _alerts_part(ctx: _Context, alerts: AlertFacts) -> tuple[Part, list[str]]:
    silences, severity, firing = alerts.silenced_until, alerts.severity, alerts.firing
    firing_keys = [s.key for s in firing]
    fired_now = [s for s in firing if ctx.in_period(s.fired_at)]
    before = ctx.previous.names("alerts_firing")
    # An alert's state starts over when it resolves, so what resolved is what was firing at the last
    # digest and is not now, or whose ``resolved_at`` (kept by the watcher) falls in the period.
    resolved = (before - set(firing_keys)) | alerts.resolved_in_period
    problems = [
        Problem(
            f"alert:{s.key}",
            _line(_alert_line(ctx, s, silences.get(s.key))),
            f"alert {s.key} firing",
            severity.get(s.key, Status.WARNING),
        )
        for s in firing
    ]
    lines = _bounded([_alert_line(ctx, s, silences.get(s.key)) for s in firing], what="more firing alerts")
    if resolved:
        lines.append(_line(f"{bk.STATUS_EMOJI[Status.HEALTHY]} resolved: {bk.escape(_names(sorted(resolved)))}"))
    if not firing and not resolved:
        lines.append("No alert is firing." if alerts.any_stored else "No alert has fired yet.")
    change = _changes(
        ctx.previous,
        [("fired", [k for k in firing_keys if k not in before]), ("resolved", sorted(before - set(firing_keys)))],
    )
    title = f"*Alerts* — {len(firing)} firing ({len(fired_now)} fired in this period), {len(resolved)} resolved"
    return Part(title, lines, change, problems=problems), firing_keys


# -- queues and scheduled cleanups -----------------------------------------------------------------


def _queue_line(ctx: _Context, facts: QueueFacts) -> str:
    service = f"*{bk.escape(facts.service)}*"
    unread = "; ".join(f"{bk.escape(c)}: {bk.escape(why.rstrip('.'))}" for c, why in facts.unread)
    if not facts.queues:
        if unread:
            return f"{bk.STATUS_EMOJI[Status.WARNING]} {service} queues could not be read — {unread}"
        return f"{bk.STATUS_EMOJI[Status.HEALTHY]} {service} queues: no queue found"
    since = "in this period" if ctx.previous.at is None else "since the last digest"
    said = [f"{facts.failed:,} failed job(s) {since}" if facts.failed else f"no failed job {since}"]
    if facts.failed and len(facts.queues) > 1:
        by = sorted((q for q in facts.queues if q.failed), key=lambda q: -q.failed)
        said[0] += " (" + _names([f"{bk.escape(q.ref.name)} {q.failed:,}" for q in by], limit=3) + ")"
    oldest = facts.oldest
    if oldest is not None and oldest.oldest_waiting_seconds is not None:
        waited = ago(timedelta(seconds=oldest.oldest_waiting_seconds))
        said.append(f"oldest waiting job: `{bk.escape(oldest.ref.name)}`, added {waited}")
    else:
        said.append("nothing waiting")
    if facts.paused:
        said.append(":double_vertical_bar: paused: " + _names([f"`{bk.escape(n)}`" for n in facts.paused]))
    if unread:
        said.append(f"could not read {unread}")
    if facts.more:
        said.append("more queues may exist (the search for them stopped early)")
    bad = facts.failed or facts.paused or facts.unread
    return f"{bk.STATUS_EMOJI[Status.WARNING if bad else Status.HEALTHY]} {service} queues: " + " · ".join(said)


def _cleanup_line(ctx: _Context, item: ScheduledCleanup) -> str:
    service = f"*{bk.escape(item.service)}*"
    run = item.run
    if run is None:
        names = ", ".join(f"`{bk.escape(n)}`" for n in item.schedules)
        return f":grey_question: {service}: no scheduled cleanup ran in this period (schedule {names})"
    if run.state is S.SUCCEEDED:
        emoji = bk.STATUS_EMOJI[Status.HEALTHY]
    else:
        emoji = bk.STATUS_EMOJI[Status.CRITICAL if run.state in FAILED_STATES else Status.WARNING]
    result = next((line.strip() for line in run.result.splitlines() if line.strip()), "")
    ended = run.finished_at or run.decided_at or run.created_at
    what = f"`{run.id}` `/ops {bk.escape(run.action)} {bk.escape(run.service)}` *{run.state.value}* {ctx.when(ended)}"
    return f"{emoji} {service} last scheduled cleanup: {what}" + (
        f": {bk.escape(result)}" if result else f" — {bk.escape(run.summary)}"
    )


def _queues_part(
    ctx: _Context, queues: Sequence[QueueFacts], cleanups: Sequence[ScheduledCleanup]
) -> tuple[Part | None, list[str]]:
    """The queue line of each service with queues and the last scheduled cleanup of each service that
    has one (None: nothing to say); and the paused queues, for the next digest."""
    if not queues and not cleanups:
        return None, []
    lines = _bounded([_queue_line(ctx, q) for q in queues], what="more services with queues")
    lines += _bounded([_cleanup_line(ctx, c) for c in cleanups], limit=10, what="more scheduled cleanups")
    paused = [f"{q.service}/{name}" for q in queues for name in q.paused]
    unread = {q.service for q in queues if q.unread}  # a queue that could not be read has not resumed
    before = ctx.previous.names("queues_paused")
    change = _changes(
        ctx.previous,
        [
            ("newly paused", [p for p in paused if p not in before]),
            ("resumed", sorted(p for p in before - set(paused) if p.split("/")[0] not in unread)),
        ],
    )
    title = "*Queues and scheduled cleanups*"
    if queues:
        failed = sum(q.failed for q in queues)
        since = "in this period" if ctx.previous.at is None else "since the last digest"
        title += f" — {failed:,} failed job(s) {since}, {len(paused)} paused queue(s)"
    return Part(title, lines, change), paused


# -- integrity -------------------------------------------------------------------------------------


def _integrity_part(ctx: _Context, standings: Sequence[IntegrityStanding]) -> Part | None:
    """One line per service with an integrity check (runbook 003); a warning or worse is a problem."""
    if not standings:
        return None
    lines: list[str] = []
    problems: list[Problem] = []
    for item in standings:
        emoji, service = bk.STATUS_EMOJI[item.status], bk.escape(item.service)
        if not item.problems:
            lines.append(f"{emoji} *{service}* integrity healthy")
            continue
        first = item.problems[0]
        more = f" (and {len(item.problems) - 1} more)" if len(item.problems) > 1 else ""
        said = f"{bk.escape(first.name)}: {bk.escape(first.detail)}{more}"
        lines.append(f"{emoji} *{service}* integrity {item.status.label} — {said}")
        problems.append(
            Problem(
                f"integrity:{item.service}",
                _line(f"{emoji} *{service}* integrity is {item.status.label}: {said}"),
                f"{item.service} integrity {item.status.label} ({first.name}: {first.detail[:80]})",
                item.status,
            )
        )
    before = {
        key.removeprefix("integrity:") for key, _ in ctx.previous.pairs("problems") if key.startswith("integrity:")
    }
    now = {p.key.removeprefix("integrity:") for p in problems}
    change = _changes(ctx.previous, [("new", sorted(now - before)), ("cleared", sorted(before - now))])
    note = "`/ops integrity <service>` for every line; `/ops integrity fix <service>` for orphans and stale jobs"
    return Part("*Integrity*", _bounded(lines, what="more services"), change, note, problems)


# -- AWS cost (runbook 002) -----------------------------------------------------------------------


def _costs_part(standings: Sequence[CostStanding]) -> Part | None:
    """One line per service with a `cost:` section: its month to date, last month's same days and the
    projection; a day over 2x its trailing 7-day mean in the period is a warning (a problem)."""
    if not standings:
        return None
    lines: list[str] = []
    problems: list[Problem] = []
    for item in standings:
        service = bk.escape(item.service)
        if item.report is None:
            lines.append(f"{bk.STATUS_EMOJI[Status.WARNING]} *{service}* AWS cost could not be read — "
                         f"{bk.escape(item.problem)}")  # fmt: skip
            continue
        emoji = bk.STATUS_EMOJI[Status.WARNING if item.anomalies else Status.HEALTHY]
        lines.append(f"{emoji} *{service}* AWS cost: {bk.escape(summary(item.report))}")
        for anomaly in item.anomalies:
            said = anomaly_text(anomaly, item.report.unit)
            lines.append(f"    :warning: {bk.escape(said)}")
            key = f"cost:{item.service}:{anomaly.day.isoformat()}"
            problems.append(Problem(key, _line(f":warning: *{service}* {bk.escape(said)}"), f"{item.service} {said}"))
    note = "`/ops cost <service>` for the breakdown by AWS service (Cost Explorer, read once a day)"
    return Part("*AWS cost*", _bounded(lines, what="more services"), "", note, problems)


# -- certificates and the busiest figures ----------------------------------------------------------


def _days_words(days: float) -> str:
    shown = f"{days:.0f}" if abs(days) >= 2 else f"{days:.1f}"
    return f"{shown} day" + ("" if shown == "1" else "s")


def _certificate_line(item: CertificateFacts) -> str:
    where = f"*{bk.escape(item.service)}/{bk.escape(item.component)}*"
    date = f" ({item.not_after[:10]})" if item.not_after else ""
    if item.days_left is None:
        said = "no certificate could be read"
    elif item.days_left <= 0:
        said = f"expired {_days_words(-item.days_left)} ago{date}"
    else:
        said = f"expires in {_days_words(item.days_left)}{date}"
    if item.problem and item.problem != "expired":  # an expired one is already said so
        said += f" · not trusted: {bk.escape(item.problem)}"
    return f"{bk.STATUS_EMOJI[item.status]} {where} — {said}"


def _certificates_part(ctx: _Context, certificates: Sequence[CertificateFacts]) -> tuple[Part | None, list[str]]:
    """A line per certificate expiring within 30 days or failing verification, worst first (None: none);
    and their names, for the next digest. Their health is already a problem in the health section."""
    names = [f"{c.service}/{c.component}" for c in certificates]
    before = ctx.previous.names("certificates")
    if not certificates:
        return None, names
    lines = _bounded([_certificate_line(c) for c in certificates], what="more certificates")
    new = [n for n in names if n not in before]
    change = _changes(ctx.previous, [("new", new), ("renewed or fixed", sorted(before - set(names)))])
    return Part("*Certificates expiring within 30 days*", lines, change), names


def _busiest_line(item: Busiest) -> str:
    m = item.line.measurement
    what = f"{bk.escape(item.component)} {bk.escape(m.label)} {m.value or 0.0:.1f} %"
    text = f"{bk.STATUS_EMOJI[item.line.status]} *{bk.escape(item.service)}* busiest: {what}"
    if m.previous is not None:
        text += f" (the period before: {m.previous:.1f} %)"
    return text


def _busiest_part(busiest: BusiestFacts | None) -> Part | None:
    """The highest CPU, memory or disk % of each service over the week (None: not read for this digest)."""
    if busiest is None:
        return None
    lines = _bounded([_busiest_line(b) for b in busiest.services], what="more services")
    if not lines:
        lines.append("No CPU, memory or disk figure could be read for any service.")
    note = ""
    if busiest.unread:
        shown = "; ".join(f"{where}: {why}" for where, why in busiest.unread[:5])
        more = f" … and {len(busiest.unread) - 5} more" if len(busiest.unread) > 5 else ""
        note = bk.escape(f"Figures not read: {shown}{more}")
    days = busiest.window.total_seconds() / 86400
    title = f"*Busiest figure per service* — highest CPU, memory or disk % over the last {days:g} days"
    return Part(title, lines, "the figures of this period only", note)


# -- the checklist ---------------------------------------------------------------------------------


def _jobs_line(check: JobsCheck) -> str:
    where = f"{check.service}/{check.component}"
    if check.stuck is None:
        return f"{where}: could not check ({check.problem.rstrip('.')})"
    if check.stuck:
        return f"{where}: {check.stuck:,} stuck over {check.threshold_minutes} min"
    return f"{where}: none stuck over {check.threshold_minutes} min"


def _jobs_check(checks: Sequence[JobsCheck]) -> CheckItem | None:
    if not checks:
        return None
    bad = [_jobs_line(c) for c in checks if c.stuck != 0]
    if bad:
        more = f" … and {len(bad) - 3} more" if len(bad) > 3 else ""
        return CheckItem("jobs", "No jobs stuck in processing", False, "; ".join(bad[:3]) + more)
    reason = _jobs_line(checks[0]) if len(checks) == 1 else f"{len(checks)} jobs tables checked, none stuck"
    return CheckItem("jobs", "No jobs stuck in processing", True, reason)


def _audit_check(broken: int | None) -> CheckItem:
    if broken is None:
        return CheckItem("audit", "Audit chain intact", True, "every event links to the one before")
    reason = f"the hash chain breaks at event #{broken}"
    return CheckItem("audit", "Audit chain intact", False, reason, Status.CRITICAL)


def _health_check(statuses: Mapping[str, str]) -> CheckItem:
    bad = [f"{s} {label}" for s, label in statuses.items() if label != Status.HEALTHY.label]
    if bad:
        return CheckItem(
            "health", "Every service healthy", False, f"{len(bad)} of {len(statuses)} not healthy: {_names(bad)}"
        )
    return CheckItem("health", "Every service healthy", True, f"all {len(statuses)} service(s) answered healthy")


def _checklist_part(ctx: _Context, items: Sequence[CheckItem], covered: set[str]) -> Part:
    lines = [_line(f"{OK_MARK if item.ok else CROSS_MARK} *{item.label}* — {bk.escape(item.reason)}") for item in items]
    before = {k: bool(v) for k, v in ctx.previous.mapping("checklist").items()}
    crossed = [i.label for i in items if not i.ok and before.get(i.key, True)]
    ticked = [i.label for i in items if i.ok and before.get(i.key) is False]
    change = _changes(ctx.previous, [("now crossed", crossed), ("now ticked", ticked)])
    problems = [
        Problem(
            f"check:{i.key}",
            _line(f"{CROSS_MARK} *{i.label}* — {bk.escape(i.reason)}"),
            f"{i.label}: {i.reason}",
            i.severity,
        )
        for i in items
        if not i.ok and i.key not in covered
    ]
    done = sum(1 for i in items if i.ok)
    return Part(f"*Checklist* — {done} of {len(items)} ticked", lines, change, problems=problems)


# -- putting it together ---------------------------------------------------------------------------


def _problems_part(ctx: _Context, problems: Sequence[Problem]) -> Part:
    before = ctx.previous.pairs("problems")
    known = {key for key, _ in before}
    keys = {p.key for p in problems}
    change = _changes(
        ctx.previous,
        [
            ("new", [p.text for p in problems if p.key not in known]),
            ("resolved", [text for key, text in before if key not in keys]),
        ],
    )
    if not problems:
        text = f"{OK_MARK} *No problems*: every service healthy, backups on time, no failed run, no alert firing."
        return Part("", [text], change)
    title = f":rotating_light: *{len(problems)} problem(s), worst first:*"
    return Part(title, _bounded([p.line for p in problems], limit=25, what="more problems"), change)


def _part_blocks(ctx: _Context, part: Part) -> list[Block]:
    blocks = bk.sections(part.lines, title=part.title or None)
    if part.note:
        blocks.append(bk.context(part.note))
    since = "" if ctx.previous.at is None else f" ({ctx.when(ctx.previous.at)})"
    blocks.append(bk.context(f"_Since the last digest{since}:_ {bk.escape(part.change)}"))
    return blocks


async def build_digest(deps: Deps, kind: str, *, now: datetime) -> Digest:
    """Probe, read and compare: the digest of the ``kind`` period ending ``now`` (nothing is saved)."""
    return render_digest(await gather_digest(deps, digest_kind(kind), now=now, figures=deps.figures))


def render_digest(facts: DigestFacts) -> Digest:
    """The message of a gathered digest, and the snapshot the next digest of its kind compares with."""
    kind, now = facts.kind, facts.now
    ctx = _Context(kind, now, facts.start, ZoneInfo(facts.timezone), facts.previous)
    health_part, statuses = _health_part(ctx, facts.health)
    backups_part, overdue, backups_check = _backups_part(ctx, facts.backups)
    runs_part, runs_snapshot, approvals_check = _runs_part(ctx, facts.runs)
    alerts_part, firing = _alerts_part(ctx, facts.alerts)
    queues_part, paused = _queues_part(ctx, facts.queues, facts.cleanups)
    integrity_part = _integrity_part(ctx, facts.integrity)
    costs_part = _costs_part(facts.costs)
    certificates_part, certificates = _certificates_part(ctx, facts.certificates)
    busiest_part = _busiest_part(facts.busiest)
    checks = [_health_check(statuses)]
    jobs_check, audit_check = _jobs_check(facts.jobs), _audit_check(facts.audit_broken_at)
    checks += [c for c in (backups_check, jobs_check, approvals_check, audit_check) if c is not None]
    covered = {"health", "backups"} if facts.backups is not None else {"health"}
    checklist_part = _checklist_part(ctx, checks, covered)
    found = [
        *health_part.problems,
        *backups_part.problems,
        *runs_part.problems,
        *alerts_part.problems,
        *(integrity_part.problems if integrity_part is not None else []),
        *(costs_part.problems if costs_part is not None else []),
        *checklist_part.problems,
    ]
    problems = sorted(found, key=lambda p: -p.severity)  # stable: within a severity, in section order
    problems_part = _problems_part(ctx, problems)
    status = max((p.severity for p in problems), default=Status.HEALTHY)

    title = f"{kind.capitalize()} digest · {now.astimezone(ctx.zone):%Y-%m-%d}"
    period = f"{ctx.full(ctx.start)} → {ctx.full(now)}"
    last = "first digest of this kind" if ctx.previous.at is None else f"last posted {ctx.when(ctx.previous.at)}"
    head = [
        bk.header(title),
        bk.context(f"Period: {period} ({facts.timezone}) · {len(statuses)} service(s) probed · {last}"),
    ]
    top = _part_blocks(ctx, problems_part)
    blocks = [*head, *top]
    parts = [
        health_part, certificates_part, busiest_part, backups_part, runs_part, alerts_part, queues_part,
        integrity_part, costs_part, checklist_part,
    ]  # fmt: skip
    for part in (p for p in parts if p is not None):
        blocks += [bk.divider(), *_part_blocks(ctx, part)]
    summary = [*head, *top]
    said = _names([p.text for p in problems], limit=10, sep="; ")
    text = f"{title}: " + (f"{len(problems)} problem(s) — {said}" if problems else "no problems")
    snapshot: dict[str, Any] = {
        "version": SNAPSHOT_VERSION,
        "kind": kind,
        "period_start": ctx.start.isoformat(),
        "health": statuses,
        "backups_overdue": overdue,
        **runs_snapshot,
        "alerts_firing": firing,
        "queues_paused": paused,
        "certificates": certificates,
        "checklist": {c.key: c.ok for c in checks},
        "problems": [[p.key, p.text] for p in problems],  # a list: the order survives the JSON
    }
    return Digest(kind, now, ctx.start, bk.clip(text, bk.MAX_FALLBACK_TEXT), blocks, summary, snapshot,
                  tuple(problems), status)  # fmt: skip


def digest_reply(digest: Digest, *, post: bool, by: str | None = None) -> Reply:
    """The digest as a reply: to the channel when posted, else to the caller alone."""
    if post:
        footer = f"Posted by <@{by}>" if by else "Posted on schedule"
    else:
        footer = f"Preview: only you see this · `/ops digest {digest.kind} --post` posts it to the channel"
    blocks = [*digest.blocks, bk.context(footer)]
    return Reply(digest.text, blocks, summary=digest.summary, ephemeral=not post, status=digest.status)


class DigestArgs(CommandArgs):
    positional = ("kind",)
    kind: str = Field("daily", max_length=32)
    post: bool = False


@subcommand(
    "digest",
    help="The daily, weekly or monthly digest now: problems first, then health, backups, runs, alerts, checklist",
    usage="[daily|weekly|monthly] [--post]",
    risk=Risk.OPERATE,
    args=DigestArgs,
)
async def digest(ctx: OpsContext, args: DigestArgs) -> Reply:
    kind = digest_kind(args.kind)
    building = asyncio.create_task(build_digest(ctx.deps, kind, now=current_time()))
    try:
        done, _ = await asyncio.wait({building}, timeout=PROGRESS_AFTER)
        if not done:
            await ctx.tell(f":hourglass_flowing_sand: Putting the {kind} digest together (probing every service)…")
        found = await building
    finally:
        if not building.done():
            building.cancel()
    reply = digest_reply(found, post=args.post, by=ctx.user_id)
    if args.post:
        # Saved only when posted: a preview must not change what the next posted digest compares with.
        await save_posted(ctx.deps, kind, at=found.at, snapshot=found.snapshot)
        if kind == "weekly":
            chart = await availability_chart(ctx.deps, found.start, found.at)
            if chart is not None:
                title = f"Availability and p95 latency, {found.start:%Y-%m-%d} to {found.at:%Y-%m-%d}"
                reply.files.append(Upload(f"opsbot-weekly-{found.at:%Y%m%d}.png", title, chart))
    return reply
