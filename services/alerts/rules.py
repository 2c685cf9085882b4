"""Evaluating the inventory's alert rules: what one check of a rule finds, and the state machine of an alert.

Modelled on Prometheus alerting: a rule's breach must hold for ``for_minutes`` before the alert
fires, and (to keep a flapping target from posting again and again) a recovery must hold for
``resolve_for_minutes`` before it resolves. Everything here is pure: the watcher passes the time in.
The rules themselves are the inventory's models, in ``services.alerts.models`` (re-exported here).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from enum import StrEnum
from fractions import Fraction
from typing import Protocol, assert_never

from services.alerts.metrics import (
    MetricsError,
    Scrape,
    error_ratio,
    latency_quantile,
    seconds_between,
    window_scrapes,
)
from services.alerts.models import (
    AlertRule,
    CertExpiryRule,
    Comparison,
    CpuRule,
    DiskRule,
    DownRule,
    ErrorRateRule,
    FigureRule,
    LatencyRule,
    MemoryRule,
    ProviderIncidentRule,
    QueueBacklogRule,
    QueueFailureRateRule,
    QueueRule,
    RedisMemoryRule,
    SizeLimitRule,
)
from services.text import human_age, human_bytes

__all__ = [
    "AlertRule",
    "AlertState",
    "CertExpiryRule",
    "Comparison",
    "Condition",
    "CpuRule",
    "DiskRule",
    "DownRule",
    "ErrorRateRule",
    "FigureReading",
    "LatencyRule",
    "MemoryRule",
    "Observation",
    "Phase",
    "ProviderIncidentRule",
    "QueueBacklogRule",
    "QueueFailureRateRule",
    "QueueReading",
    "RedisMemoryRule",
    "Silence",
    "SizeLimitRule",
    "Timing",
    "Transition",
    "TransitionKind",
    "Verdict",
    "check",
    "evaluate",
]


class Verdict(StrEnum):
    """What one check of a rule found."""

    OK = "ok"
    BREACH = "breach"
    UNKNOWN = "unknown"
    """The figures could not be had (target unreachable, no second scrape yet): the alert holds its state."""


@dataclass(frozen=True)
class Condition:
    """One check of a rule: its verdict, the figure compared and a line of evidence for the message."""

    verdict: Verdict
    evidence: str
    value: float | None = None


@dataclass(frozen=True)
class QueueReading:
    """One Bull/BullMQ queue as the watcher read it this round: what the queue rules judge."""

    name: str
    paused: bool = False
    waiting: int = 0
    """Jobs in the wait list (and, paused, in the paused list)."""
    oldest_waiting_seconds: float | None = None
    finished: int = 0
    """Jobs completed or failed in the last ``window_minutes``."""
    failed: int = 0
    window_minutes: float = 15
    estimated: bool = False
    """More jobs finished in the window than were read: ``finished`` and ``failed`` are scaled up."""


@dataclass(frozen=True)
class FigureReading:
    """One figure a component's figure source measured this round (``disk_used_pct`` of ``disk /data``)."""

    name: str
    label: str
    value: float


@dataclass(frozen=True)
class Observation:
    """What the watcher saw of one component this round; each rule reads the part it needs.

    ``scrapes`` are the component's kept /metrics scrapes, oldest first, the last one taken this
    round (when this round's scrape failed, pass ``reachable=False``).
    """

    reachable: bool
    detail: str = ""
    """Why the target did not answer, or the probe's line when it did."""
    scrapes: Sequence[Scrape] = ()
    memory_used_bytes: int | None = None
    memory_max_bytes: int | None = None
    """Redis ``maxmemory``; 0 means no limit is set."""
    size_used_bytes: int | None = None
    size_limit_bytes: int | None = None
    """The limit the probe found (a disk's size); a rule's own ``limit`` wins over it."""
    cert_status: str | None = None
    """A tls component's certificate status (healthy, warning, critical) when a certificate was read."""
    cert_days_left: float | None = None
    provider_incident: str | None = None
    """A statuspage component's active incident that matters, in one line (name, impact, update, link);
    empty when there is none; None when the page could not be read (or it is no statuspage)."""
    queues: Sequence[QueueReading] | None = None
    """A redis component's queues this round (declared, else discovered); None when not read."""
    queues_problem: str = ""
    """Why the queues could not be read (Redis did not answer in time, refused the password…)."""
    figures: Sequence[FigureReading] | None = None
    """What the component's figure source measured this round; None when it was not read."""
    figures_problem: str = ""
    """Why the figures could not be read (the source's own sentence)."""


def check(rule: AlertRule, observation: Observation) -> Condition:
    """Hold this round's observation against the rule."""
    match rule:
        case DownRule():
            return _check_down(observation)
        case ErrorRateRule():
            return _check_error_rate(rule, observation)
        case LatencyRule():
            return _check_latency(rule, observation)
        case RedisMemoryRule():
            return _check_redis_memory(rule, observation)
        case SizeLimitRule():
            return _check_size_limit(rule, observation)
        case CertExpiryRule():
            return _check_cert_expiry(rule, observation)
        case ProviderIncidentRule():
            return _check_provider_incident(observation)
        case QueueFailureRateRule():
            return _check_queue_failure_rate(rule, observation)
        case QueueBacklogRule():
            return _check_queue_backlog(rule, observation)
        case CpuRule() | MemoryRule() | DiskRule():
            return _check_figure(rule, observation)
        case _:  # pragma: no cover - every kind is matched above
            assert_never(rule)


def _check_down(observation: Observation) -> Condition:
    """Unreachable is a breach here, and only here: other rules cannot judge what they cannot see."""
    if observation.reachable:
        return Condition(Verdict.OK, "answering")
    detail = f": {observation.detail}" if observation.detail else ""
    return Condition(Verdict.BREACH, f"not answering{detail}")


def _measured(observation: Observation, name: str, what: str) -> FigureReading | Condition | None:
    """A component without /metrics (Cloud Run, Lambda) whose figure source measured ``name`` over the
    rule's window; None when the component is judged from its scrapes instead."""
    if observation.scrapes or (observation.figures is None and not observation.figures_problem):
        return None
    if observation.figures is None:
        return Condition(Verdict.UNKNOWN, f"cannot read the {what}: {observation.figures_problem}")
    found = next((f for f in observation.figures if f.name == name), None)
    return found if found is not None else Condition(Verdict.OK, f"no {what} in the window (no requests)")


def _check_error_rate(rule: ErrorRateRule, observation: Observation) -> Condition:
    """The ratio between the newest scrape and one about ``window_seconds`` older (or, without /metrics,
    the 5xx share the figure source measured over that window)."""
    measured = _measured(observation, "error_rate_pct", "5xx rate")
    if isinstance(measured, Condition):
        return measured
    if measured is not None:
        breached = rule.comparison.breached(measured.value, rule.threshold_pct)
        evidence = f"{measured.label} {_pct(measured.value)} %; alerts {rule.comparison.words} {rule.threshold_pct:g} %"
        return Condition(Verdict.BREACH if breached else Verdict.OK, evidence, measured.value)
    pair = _scrape_pair(observation, rule.window_seconds)
    if isinstance(pair, Condition):
        return pair
    try:
        ratio = error_ratio(*pair, metric=rule.metric, status_label=rule.status_label, match=rule.match or None)
    except MetricsError as exc:
        return Condition(Verdict.UNKNOWN, str(exc))
    if ratio is None:
        return Condition(Verdict.OK, f"no requests {_window_words(pair)}", 0.0)
    # Cross-multiplied so that exactly 5 of 100 is exactly 5 %, whatever the float rounding.
    breached = rule.comparison.breached(ratio.errors * 100, rule.threshold_pct * ratio.total)
    evidence = f"{ratio.evidence}; alerts {rule.comparison.words} {rule.threshold_pct:g} %"
    return Condition(Verdict.BREACH if breached else Verdict.OK, evidence, ratio.pct)


def _check_latency(rule: LatencyRule, observation: Observation) -> Condition:
    """The p95 between the newest scrape and one about ``window_seconds`` older (or, without /metrics,
    the p95 the figure source measured over that window)."""
    measured = _measured(observation, "latency_p95_ms", "p95 latency")
    if isinstance(measured, Condition):
        return measured
    if measured is not None:
        seconds = measured.value / 1000
        breached = rule.comparison.breached(seconds, rule.threshold_seconds)
        evidence = (
            f"{measured.label} {_seconds(seconds)}; alerts {rule.comparison.words} {_seconds(rule.threshold_seconds)}"
        )
        return Condition(Verdict.BREACH if breached else Verdict.OK, evidence, seconds)
    pair = _scrape_pair(observation, rule.window_seconds)
    if isinstance(pair, Condition):
        return pair
    try:
        found = latency_quantile(rule.quantile, *pair, metric=rule.metric, match=rule.match or None)
    except MetricsError as exc:
        return Condition(Verdict.UNKNOWN, str(exc))
    if found is None:
        return Condition(Verdict.OK, f"no requests {_window_words(pair)}")
    breached = rule.comparison.breached(found.seconds, rule.threshold_seconds)
    if found.above_buckets and found.seconds >= rule.threshold_seconds:
        # The true quantile lies past the largest bucket, so past a threshold at that bound too.
        breached = True
    evidence = f"{found.evidence}; alerts {rule.comparison.words} {_seconds(rule.threshold_seconds)}"
    return Condition(Verdict.BREACH if breached else Verdict.OK, evidence, found.seconds)


def _check_redis_memory(rule: RedisMemoryRule, observation: Observation) -> Condition:
    """No ``maxmemory`` means Redis has no limit to approach: that is fine, not unknown."""
    used, limit = observation.memory_used_bytes, observation.memory_max_bytes
    if not observation.reachable or used is None or limit is None:
        return _unseen(observation, "Redis memory")
    if limit == 0:
        return Condition(Verdict.OK, f"memory {human_bytes(used)}, no maxmemory set")
    return _share(rule.comparison, rule.threshold_pct, used, limit, "memory")


def _check_size_limit(rule: SizeLimitRule, observation: Observation) -> Condition:
    """The used size against the rule's limit, or else the one the probe found."""
    used = observation.size_used_bytes
    limit = rule.limit if rule.limit is not None else observation.size_limit_bytes
    if not observation.reachable or used is None:
        return _unseen(observation, f"the {rule.subject} size")
    if not limit:
        return Condition(Verdict.UNKNOWN, f"no limit known for the {rule.subject} ({human_bytes(used)} used)")
    return _share(rule.comparison, rule.threshold_pct, used, int(limit), rule.subject)


def _check_queue_failure_rate(rule: QueueFailureRateRule, observation: Observation) -> Condition:
    """The queue with the worst share of failed among its finished jobs; too few finished is no trend."""
    readings = _queue_readings(rule, observation)
    if isinstance(readings, Condition):
        return readings
    judged = [q for q in readings if q.finished >= rule.min_finished]
    if not judged:
        busiest = max(readings, key=lambda q: q.finished)
        return Condition(
            Verdict.OK,
            f"too few jobs finished to judge: {busiest.name}: {_jobs(busiest, busiest.finished)} "
            f"in {busiest.window_minutes:g} min (judged from {rule.min_finished:,})",
        )
    # Exact fractions, so that 12 of 120 is exactly 10 % and two queues at the same share tie.
    worst = max(judged, key=lambda q: Fraction(q.failed, q.finished))
    pct = worst.failed * 100 / worst.finished

    def breached(q: QueueReading) -> bool:
        return rule.comparison.breached(q.failed * 100, rule.threshold_pct * q.finished)

    others = sum(1 for q in judged if q is not worst and breached(q))
    evidence = (
        f"{worst.name}: {_pct(pct)} % of {_jobs(worst, worst.finished)} failed in {worst.window_minutes:g} min; "
        f"alerts {rule.comparison.words} {rule.threshold_pct:g} %"
    )
    if others:
        evidence += f" ({others} more {'queue' if others == 1 else 'queues'} above it too)"
    return Condition(Verdict.BREACH if breached(worst) else Verdict.OK, evidence, pct)


def _check_queue_backlog(rule: QueueBacklogRule, observation: Observation) -> Condition:
    """The oldest job waiting in any queue that is not paused (a paused queue waits on purpose)."""
    readings = _queue_readings(rule, observation)
    if isinstance(readings, Condition):
        return readings
    paused = [q for q in readings if q.paused and q.waiting]
    paused_note = _paused_words(paused)
    aged = [q for q in readings if not q.paused and q.oldest_waiting_seconds is not None]
    if not aged:
        unaged = [q for q in readings if not q.paused and q.waiting]
        if unaged:
            # The oldest job was taken between two reads, or its hash has no timestamp: judge next round.
            return Condition(Verdict.UNKNOWN, f"{unaged[0].name}: the age of the oldest waiting job is not known")
        return Condition(Verdict.OK, paused_note or "no jobs waiting", 0.0)
    worst = max(aged, key=lambda q: q.oldest_waiting_seconds or 0.0)
    seconds = worst.oldest_waiting_seconds or 0.0
    breached = rule.comparison.breached(seconds, rule.threshold_minutes * 60)
    evidence = (
        f"{worst.name}: the oldest of {worst.waiting:,} waiting jobs has waited {human_age(seconds)}; "
        f"alerts {rule.comparison.words} {rule.threshold_minutes:g} min"
    )
    if paused_note:
        evidence += f" ({paused_note})"
    return Condition(Verdict.BREACH if breached else Verdict.OK, evidence, seconds / 60)


def _queue_readings(rule: QueueRule, observation: Observation) -> list[QueueReading] | Condition:
    """The queues the rule judges: the one it names, or all; unknown when Redis could not be read."""
    if observation.queues is None:
        why = f": {observation.queues_problem}" if observation.queues_problem else ""
        return Condition(Verdict.UNKNOWN, f"cannot read the queues{why}")
    if rule.queue is None:
        return list(observation.queues) or Condition(Verdict.OK, "no queues found in this Redis")
    named = [q for q in observation.queues if q.name == rule.queue]
    return named or Condition(Verdict.UNKNOWN, f"there is no queue {rule.queue} in this Redis")


def _paused_words(paused: Sequence[QueueReading]) -> str:
    if not paused:
        return ""
    if len(paused) == 1:
        q = paused[0]
        return f"{q.name} is paused: its {q.waiting:,} waiting {'job is' if q.waiting == 1 else 'jobs are'} not a stall"
    names = ", ".join(q.name for q in paused)
    return f"{names} are paused: their {sum(q.waiting for q in paused):,} waiting jobs are not a stall"


def _jobs(q: QueueReading, n: int) -> str:
    return f"{'about ' if q.estimated else ''}{n:,} {'job' if n == 1 else 'jobs'}"


def _pct(value: float) -> str:
    return f"{value:.1f}".removesuffix(".0")


_CERT_RANK = {"healthy": 0, "warning": 1, "critical": 2}


def _check_cert_expiry(rule: CertExpiryRule, observation: Observation) -> Condition:
    """The probe judged the certificate by the component's thresholds; the rule holds that status against ``at``."""
    rank = _CERT_RANK.get(observation.cert_status or "")
    if rank is None:
        return _unseen(observation, "the certificate")
    breached = rank >= _CERT_RANK[rule.at]
    evidence = f"{observation.detail}; alerts at {rule.at} or worse"
    return Condition(Verdict.BREACH if breached else Verdict.OK, evidence, observation.cert_days_left)


def _check_provider_incident(observation: Observation) -> Condition:
    """An incident on the provider's page is the breach; an unreadable page holds the alert where it is."""
    if observation.provider_incident is None:
        why = f": {observation.detail}" if observation.detail else ""
        return Condition(Verdict.UNKNOWN, f"cannot read the status page{why}")
    if observation.provider_incident:
        return Condition(Verdict.BREACH, observation.provider_incident, 1)
    evidence = f"no active incident ({observation.detail})" if observation.detail else "no active incident"
    return Condition(Verdict.OK, evidence, 0)


def _check_figure(rule: FigureRule, observation: Observation) -> Condition:
    """The worst reading of the rule's figure (``cpu_*``, ``memory_*``, ``disk_*`` in %) this round."""
    if observation.figures is None:
        why = f": {observation.figures_problem}" if observation.figures_problem else ""
        return Condition(Verdict.UNKNOWN, f"cannot read the {rule.subject} figures{why}")
    readings = [f for f in observation.figures if f.name.startswith(rule.figure_prefix) and f.name.endswith("_pct")]
    if not readings:
        return Condition(Verdict.UNKNOWN, f"no {rule.subject} figure was reported")
    worst = max(readings, key=lambda f: f.value)
    breached = rule.comparison.breached(worst.value, rule.threshold_pct)
    others = sum(1 for f in readings if f is not worst and rule.comparison.breached(f.value, rule.threshold_pct))
    evidence = f"{worst.label} {_pct(worst.value)} %; alerts {rule.comparison.words} {rule.threshold_pct:g} %"
    if others:
        evidence += f" ({others} more {'reading' if others == 1 else 'readings'} past it too)"
    return Condition(Verdict.BREACH if breached else Verdict.OK, evidence, worst.value)


def _scrape_pair(observation: Observation, window_seconds: float) -> tuple[Scrape, Scrape] | Condition:
    if not observation.reachable:
        return _unseen(observation, "the metrics")
    pair = window_scrapes(observation.scrapes, window_seconds)
    if pair is None:
        return Condition(Verdict.UNKNOWN, "waiting for a second scrape of the metrics")
    return pair


def _window_words(pair: tuple[Scrape, Scrape]) -> str:
    seconds = seconds_between(*pair)
    return f"over {seconds:.0f} s" if seconds < 120 else f"over {seconds / 60:.0f} min"


def _unseen(observation: Observation, what: str) -> Condition:
    why = f": {observation.detail}" if observation.detail and not observation.reachable else ""
    if not observation.reachable:
        return Condition(Verdict.UNKNOWN, f"cannot read {what}, the target is not answering{why}")
    return Condition(Verdict.UNKNOWN, f"{what} not reported")


def _share(comparison: Comparison, threshold_pct: float, used: int, limit: int, subject: str) -> Condition:
    pct = used * 100 / limit
    breached = comparison.breached(used * 100, threshold_pct * limit)
    share = f"{human_bytes(used)} of {human_bytes(limit)} ({pct:.1f} %)"
    evidence = f"{subject} {share}; alerts {comparison.words} {threshold_pct:g} %"
    return Condition(Verdict.BREACH if breached else Verdict.OK, evidence, pct)


def _seconds(value: float) -> str:
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:g} s"


# --- the alert state machine ---------------------------------------------------------------------


class Phase(StrEnum):
    """Where an alert stands. RESOLVING is still firing: the recovery has not held long enough."""

    OK = "ok"
    PENDING = "pending"
    FIRING = "firing"
    RESOLVING = "resolving"


class TransitionKind(StrEnum):
    FIRED = "fired"
    RESOLVED = "resolved"


@dataclass(frozen=True)
class Silence:
    """An operator's silence of one alert until a time; it never stops the state from changing."""

    alert_key: str
    until: datetime
    by: str
    reason: str = ""

    def __post_init__(self) -> None:
        _require_aware(self.until, "a silence's end")

    def covers(self, key: str, now: datetime) -> bool:
        return key == self.alert_key and now < self.until


@dataclass(frozen=True)
class AlertState:
    """One alert's state between evaluations; kept in the state store by the watcher."""

    key: str
    phase: Phase = Phase.OK
    since: datetime | None = None
    """When the current breach was first seen (pending, firing and resolving)."""
    ok_since: datetime | None = None
    """When the recovery was first seen (resolving only)."""
    fired_at: datetime | None = None
    announced: bool = False
    """A fired transition that was not silenced went out for this episode (a message exists)."""
    muted: bool = False
    """A silence covered this firing alert since the channel last heard of it."""
    evidence: str = ""
    """The evidence of the last check that was not unknown."""

    @property
    def firing(self) -> bool:
        return self.phase in (Phase.FIRING, Phase.RESOLVING)


@dataclass(frozen=True)
class Transition:
    """The alert fired or resolved: what the watcher tells the channel, unless ``silenced``.

    A silenced ``fired`` posts nothing; a later unsilenced ``fired`` of the same episode has
    ``after_silence`` set (the channel learns it is still broken). On ``resolved``, ``announced``
    says whether a fired message exists to be edited (an edit pings nobody, silenced or not).
    """

    kind: TransitionKind
    key: str
    at: datetime
    evidence: str
    since: datetime
    """When the breach began."""
    silenced: bool = False
    silence: Silence | None = None
    after_silence: bool = False
    announced: bool = False
    fired_at: datetime | None = None


class Timing(Protocol):
    """How long a breach and a recovery must hold; every rule kind has both."""

    @property
    def hold(self) -> timedelta: ...

    @property
    def resolve_hold(self) -> timedelta: ...


def evaluate(
    state: AlertState,
    condition: Condition,
    now: datetime,
    *,
    rule: Timing,
    silences: Iterable[Silence] = (),
) -> tuple[AlertState, Transition | None]:
    """Advance ``state`` by one check of its rule at ``now``; return the new state and what changed.

    A breach must hold for ``rule.hold`` (seen at the start and still at the end, no OK between)
    before ``fired``; once firing, an OK must hold for ``rule.resolve_hold`` before ``resolved``.
    So a target flapping faster than either fires at most once. UNKNOWN leaves the state as it is.
    """
    _require_aware(now, "now")
    silence = next((s for s in silences if s.covers(state.key, now)), None)
    if condition.verdict is Verdict.UNKNOWN:
        return state, None
    if condition.verdict is Verdict.BREACH:
        return _on_breach(state, condition.evidence, now, rule.hold, silence)
    return _on_ok(state, condition.evidence, now, rule.resolve_hold, silence)


def _on_breach(
    state: AlertState, evidence: str, now: datetime, hold: timedelta, silence: Silence | None
) -> tuple[AlertState, Transition | None]:
    if state.firing:
        state = replace(state, phase=Phase.FIRING, ok_since=None, evidence=evidence)
        if silence is not None:
            return replace(state, muted=True), None
        if state.announced and not state.muted:
            return state, None
        # Fired under a silence that has now ended, and it is still broken: say so.
        state = replace(state, announced=True, muted=False)
        return state, _transition(TransitionKind.FIRED, state, now, None, after_silence=True)
    if state.phase is Phase.OK or state.since is None:
        state = AlertState(key=state.key, phase=Phase.PENDING, since=now, evidence=evidence)
    else:
        state = replace(state, evidence=evidence)
    if now - (state.since or now) < hold:
        return state, None
    state = replace(state, phase=Phase.FIRING, fired_at=now, announced=silence is None, muted=silence is not None)
    return state, _transition(TransitionKind.FIRED, state, now, silence)


def _on_ok(
    state: AlertState, evidence: str, now: datetime, resolve_hold: timedelta, silence: Silence | None
) -> tuple[AlertState, Transition | None]:
    if not state.firing:
        # A pending breach that did not hold is forgotten without a word.
        return AlertState(key=state.key, evidence=evidence), None
    ok_since = now if state.phase is Phase.FIRING or state.ok_since is None else state.ok_since
    state = replace(state, phase=Phase.RESOLVING, ok_since=ok_since, evidence=evidence)
    if silence is not None:
        state = replace(state, muted=True)
    if now - ok_since < resolve_hold:
        return state, None
    transition = _transition(TransitionKind.RESOLVED, state, now, silence)
    return AlertState(key=state.key, evidence=evidence), transition


def _transition(
    kind: TransitionKind, state: AlertState, now: datetime, silence: Silence | None, *, after_silence: bool = False
) -> Transition:
    return Transition(
        kind=kind,
        key=state.key,
        at=now,
        evidence=state.evidence,
        since=state.since or now,
        silenced=silence is not None,
        silence=silence,
        after_silence=after_silence,
        announced=state.announced,
        fired_at=state.fired_at,
    )


def _require_aware(moment: datetime, what: str) -> None:
    if moment.utcoffset() is None:
        raise ValueError(f"{what} must be a timezone-aware datetime")
