"""The watcher: probes the components with alert rules on an interval, scrapes /metrics and reads the
Bull/BullMQ queues where a rule needs it, evaluates every rule, keeps the state in the state store, and
tells a notifier what fired or resolved. It knows nothing of Slack.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import aiohttp
import structlog

from services.alerts.metrics import Scrape
from services.alerts.models import CpuRule, DiskRule, FigureRule, MemoryRule
from services.alerts.rules import (
    AlertRule,
    AlertState,
    CertExpiryRule,
    DownRule,
    ErrorRateRule,
    FigureReading,
    LatencyRule,
    Observation,
    Phase,
    ProviderIncidentRule,
    QueueBacklogRule,
    QueueFailureRateRule,
    QueueReading,
    Silence,
    Transition,
    TransitionKind,
    check,
    evaluate,
)
from services.errors import CommandError
from services.failures import network_problem, short_error
from services.figures.base import FigureError, FigureSource, Window
from services.figures.http import ScrapeError, ScrapeHistory, metrics_url, scrape_metrics
from services.health import HealthProbe, ProbeResult, Status, Target
from services.inventory import HttpComponent, Inventory, RedisComponent
from services.queues import RATE_WINDOW_MS, QueueStatus, QueueTarget
from services.redaction import Redactor
from services.state import ProbeSample, StateStore, StoredAlert

log = structlog.get_logger(__name__)

STATUS_HISTORY_SECONDS = 3600  # scrapes kept at least this long, for `/ops status` request rates
_HISTORY_KEYS = ("resolved_at", "last_fired_at", "last_resolved_at")


@dataclass(frozen=True)
class Watched:
    """One component and the rules the watcher holds it to."""

    target: Target
    rules: tuple[AlertRule, ...]

    @property
    def scrapes_metrics(self) -> bool:
        return (
            isinstance(self.target.spec, HttpComponent)
            and self.target.spec.metrics is not None
            and any(isinstance(rule, ErrorRateRule | LatencyRule) for rule in self.rules)
        )

    @property
    def reads_figures(self) -> bool:
        """cpu, memory and disk rules; and error rate and latency where there is no /metrics to scrape
        (Cloud Run and Lambda: their figure sources measure both)."""
        return any(isinstance(rule, CpuRule | MemoryRule | DiskRule) for rule in self.rules) or (
            not isinstance(self.target.spec, HttpComponent)
            and any(isinstance(rule, ErrorRateRule | LatencyRule) for rule in self.rules)
        )

    @property
    def reads_queues(self) -> bool:
        return (
            isinstance(self.target.spec, RedisComponent)
            and self.target.spec.queues is not None
            and any(isinstance(rule, QueueFailureRateRule | QueueBacklogRule) for rule in self.rules)
        )


def watched(inventory: Inventory, probed_types: frozenset[str]) -> list[Watched]:
    """Every component with rules: its own, or ServiceDown by default for the types that are probed
    (and CertificateExpiry too for a tls component: its certificate is what it is watched for; a statuspage
    component gets ProviderIncident alone: a provider's page that does not answer is no outage of ours)."""
    found: list[Watched] = []
    default = inventory.alerts.down_by_default
    for service, component, spec in inventory.components():
        rules: tuple[AlertRule, ...] = tuple(spec.alerts)
        if not rules and default and spec.type == "statuspage":
            rules = (ProviderIncidentRule(kind="provider_incident"),)
        elif not rules and default and spec.type == "host":
            rules = (DiskRule(kind="disk"),)  # the bot's own host is up while it runs: its disk is what fills
        elif not rules and default and spec.type in probed_types:
            rules = (DownRule(kind="down"),)
            if spec.type == "tls":
                rules += (CertExpiryRule(kind="cert_expiry"),)
        if rules:
            found.append(Watched(Target(service, component, spec), rules))
    return found


def state_to_json(state: AlertState) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in fields(state):
        value = getattr(state, item.name)
        out[item.name] = (
            value.isoformat() if isinstance(value, datetime) else str(value) if item.name == "phase" else value
        )
    return out


def state_from_json(data: Mapping[str, Any], key: str) -> AlertState:
    """An alert's state as stored; anything unreadable starts over (ok) rather than failing the round."""
    try:

        def when(name: str) -> datetime | None:
            value = data.get(name)
            return datetime.fromisoformat(value) if value else None

        return AlertState(
            key=key,
            phase=Phase(str(data.get("phase", "ok"))),
            since=when("since"),
            ok_since=when("ok_since"),
            fired_at=when("fired_at"),
            announced=bool(data.get("announced", False)),
            muted=bool(data.get("muted", False)),
            evidence=str(data.get("evidence", "")),
        )
    except (ValueError, TypeError):
        log.warning("alert_state_unreadable", alert=key)
        return AlertState(key=key)


@dataclass(frozen=True)
class Fired:
    """What the notifier is given: the alert, its rule and component, and the transition."""

    key: str
    service: str
    component: str
    rule: AlertRule
    transition: Transition
    stored: StoredAlert | None  # with the message of an earlier fired transition, when there is one


class AlertNotifier(Protocol):
    async def fired(self, alert: Fired) -> tuple[str, str] | None:
        """Post a fired alert; the (channel, ts) of its message, to edit when it resolves."""

    async def resolved(self, alert: Fired) -> None:
        """Edit (or post) the message of an alert that resolved."""


class NoNotifier:
    async def fired(self, alert: Fired) -> tuple[str, str] | None:
        return None

    async def resolved(self, alert: Fired) -> None:
        return None


Clock = Callable[[], datetime]


def utcnow() -> datetime:
    return datetime.now(UTC)


class Watcher:
    """One round at a time: probe, scrape, evaluate, store, notify."""

    def __init__(
        self,
        store: StateStore,
        inventory: Inventory,
        probe_for: Callable[[Target], HealthProbe | None],
        http: aiohttp.ClientSession,
        redactor: Redactor,
        *,
        probed_types: frozenset[str],
        notifier: AlertNotifier | None = None,
        clock: Clock = utcnow,
        claim: Callable[[str, float], Awaitable[bool]] | None = None,
        figures: Mapping[str, FigureSource] | None = None,
        history: ScrapeHistory | None = None,
    ) -> None:
        self.store = store
        self.inventory = inventory
        self.probe_for = probe_for
        self.http = http
        self.redactor = redactor
        self.notifier: AlertNotifier = notifier or NoNotifier()
        self.clock = clock
        self.components = watched(inventory, probed_types)
        self.claim = claim  # (key, ttl) -> True for the one replica that does a round
        self.scrape_history = history if history is not None else ScrapeHistory()
        self.scrape_history.fed = True
        """The kept /metrics scrapes, by URL: `/ops status` reads request rates from them under serve."""
        if figures is None:
            from services.status import FigureDeps, build_figure_sources

            types = {w.target.type for w in self.components if w.reads_figures}
            figures = build_figure_sources(FigureDeps(session=http, history=self.scrape_history), types=types)
        self.figures = figures

    async def round(self) -> list[Fired]:
        """Probe every watched component once and act on what changed."""
        now = self.clock()
        results = await asyncio.gather(*(self._observe(w, now) for w in self.components))
        keep_after = now - timedelta(days=self.inventory.alerts.history_days)
        samples = [
            ProbeSample(w.target.service, w.target.component, now, int(result.status), result.latency_ms)
            for w, (result, _) in zip(self.components, results, strict=True)
        ]
        if samples:
            await self.store.record_probes(samples, keep_after=keep_after)
        stored = await self.store.load_alerts()
        silences = [Silence(s.key, s.until, s.by, s.reason) for s in await self.store.active_silences(now)]
        out: list[Fired] = []
        for w, (_, observation) in zip(self.components, results, strict=True):
            for rule in w.rules:
                key = rule.key(w.target.service, w.target.component)
                before = stored.get(key)
                state = state_from_json(before.state, key) if before else AlertState(key=key)
                state, transition = evaluate(state, check(rule, observation), now, rule=rule, silences=silences)
                # The state machine starts over on resolve; the digest still wants to know it happened.
                kept = {k: v for k, v in (before.state if before else {}).items() if k in _HISTORY_KEYS}
                if transition is not None:
                    kept[f"last_{transition.kind.value}_at"] = now.isoformat()
                    if transition.kind is TransitionKind.RESOLVED:
                        kept["resolved_at"] = now.isoformat()
                record = StoredAlert(key, w.target.service, {**state_to_json(state), **kept}, now)
                if transition is not None:
                    fired = Fired(key, w.target.service, w.target.component, rule, transition, before)
                    record = await self._tell(fired, record)
                    out.append(fired)
                await self.store.save_alert(record)
        return out

    async def _tell(self, fired: Fired, record: StoredAlert) -> StoredAlert:
        """Post or edit the alert's message; a Slack failure never loses the state change."""
        if fired.transition.silenced and fired.transition.kind is TransitionKind.FIRED:
            return record
        try:
            if fired.transition.kind is TransitionKind.FIRED:
                where = await self.notifier.fired(fired)
                if where is not None:
                    return replace(record, message_channel=where[0], message_ts=where[1])
            else:
                await self.notifier.resolved(fired)
        except Exception:
            log.warning("alert_notify_failed", alert=fired.key, exc_info=True)
        return record

    async def _observe(self, w: Watched, now: datetime) -> tuple[ProbeResult, Observation]:
        queues: tuple[QueueReading, ...] | None = None
        queues_problem = ""
        if w.reads_queues:
            result, (queues, queues_problem) = await asyncio.gather(self._probe(w), self._read_queues(w, now))
        else:
            result = await self._probe(w)
        figures, figures_problem = await self._read_figures(w, now) if w.reads_figures else (None, "")
        cert_status = result.facts.get("cert_status")
        # A served certificate, even a bad one, is an answer: CertificateExpiry judges it, not ServiceDown.
        reachable = result.status is not Status.CRITICAL or isinstance(cert_status, str)
        scrapes: Sequence[Scrape] = ()
        if w.scrapes_metrics and reachable:
            scrapes = await self._scrape(w, now)
        facts = result.facts
        return result, Observation(
            reachable=reachable,
            detail=self.redactor.redact(result.detail),
            scrapes=scrapes,
            memory_used_bytes=_int(facts.get("used_memory_bytes")),
            memory_max_bytes=_int(facts.get("maxmemory_bytes")),
            size_used_bytes=_int(facts.get("size_bytes")),
            queues=queues,
            queues_problem=queues_problem,
            figures=figures,
            figures_problem=figures_problem,
            cert_status=cert_status if isinstance(cert_status, str) else None,
            cert_days_left=_float(facts.get("days_left")),
            provider_incident=_provider_incident(facts),
        )

    async def _probe(self, w: Watched) -> ProbeResult:
        probe = self.probe_for(w.target)
        if probe is None:
            return ProbeResult(Status.HEALTHY, "not probed")
        try:
            async with asyncio.timeout(w.target.spec.timeout + 1):
                return await probe.probe(w.target.spec)
        except TimeoutError:
            return ProbeResult(Status.CRITICAL, f"no answer within {w.target.spec.timeout:g} s")
        except Exception as exc:
            return ProbeResult(Status.CRITICAL, network_problem(exc) or short_error(exc, self.redactor))

    async def _read_queues(self, w: Watched, now: datetime) -> tuple[tuple[QueueReading, ...] | None, str]:
        """The queues the rules judge (declared, else discovered), or None and why; it never raises, so an
        unreadable Redis makes the queue rules unknown (reachability is the down rule's to judge)."""
        spec = w.target.spec
        if not isinstance(spec, RedisComponent) or spec.queues is None:
            return None, ""
        client = QueueTarget(w.target.component, spec, spec.queues).client(self.redactor)
        named = {r.queue for r in w.rules if isinstance(r, QueueFailureRateRule | QueueBacklogRule) and r.queue}
        try:
            async with asyncio.timeout(spec.timeout + 1):
                refs, more = await client.queues()
                if more:  # the bounded scan stopped early: a queue a rule names may lie beyond it
                    refs += [client.ref(name) for name in sorted(named - {ref.name for ref in refs})]
                statuses = await client.status(refs, now_ms=int(now.timestamp() * 1000))
        except TimeoutError:
            problem = f"no answer within {spec.timeout:g} s"
        except CommandError as exc:
            problem = exc.message.rstrip(".")
        except Exception as exc:  # a bug or an odd reply must not end the round for every component
            log.warning("queue_read_error", component=f"{w.target.service}/{w.target.component}", exc_info=True)
            problem = short_error(exc, self.redactor)
        else:
            return tuple(_reading(status) for status in statuses), ""
        problem = self.redactor.redact(problem)
        log.info("queue_read_failed", component=f"{w.target.service}/{w.target.component}", reason=problem)
        return None, problem

    async def _scrape(self, w: Watched, now: datetime) -> Sequence[Scrape]:
        spec = w.target.spec
        if not isinstance(spec, HttpComponent) or spec.metrics is None:
            return ()
        url = metrics_url(spec)
        try:
            scrape = await scrape_metrics(self.http, spec, now, timeout=spec.timeout)
        except ScrapeError as exc:
            log.info("metrics_scrape_failed", component=f"{w.target.service}/{w.target.component}",
                     reason=self.redactor.redact(str(exc)))  # fmt: skip
            return self.scrape_history.scrapes(url)
        window = max((getattr(rule, "window_seconds", 0) for rule in w.rules), default=0)
        keep = max(window, STATUS_HISTORY_SECONDS) + 2 * self.inventory.alerts.interval_seconds
        horizon = now - timedelta(seconds=keep)
        return self.scrape_history.add(url, scrape, keep_after=horizon)

    async def _read_figures(self, w: Watched, now: datetime) -> tuple[tuple[FigureReading, ...] | None, str]:
        """What the component's figure source measures now (for the cpu, memory and disk rules), or None
        and why; never raises, so a source that fails makes those rules unknown, not the round fail."""
        spec = w.target.spec
        source = self.figures.get(spec.type)
        if source is None:
            return None, f"opsbot reads no figures of {spec.type} components yet"
        minutes = [r.for_minutes for r in w.rules if isinstance(r, FigureRule)]
        minutes += [r.window_seconds / 60 for r in w.rules if isinstance(r, ErrorRateRule | LatencyRule)]
        window = Window(now, timedelta(minutes=max(minutes, default=5) or 5))
        try:
            async with asyncio.timeout(spec.timeout + 1):
                found = await source.measure(spec, window, timeout=spec.timeout)
        except TimeoutError:
            problem = f"no answer within {spec.timeout:g} s"
        except FigureError as exc:
            problem = exc.message.rstrip(".")
        except Exception as exc:  # a broken source must not end the round for every component
            log.warning("figures_read_error", component=f"{w.target.service}/{w.target.component}", exc_info=True)
            problem = short_error(exc, self.redactor)
        else:
            return tuple(FigureReading(m.name, m.label, m.value) for m in found if m.value is not None), ""
        return None, self.redactor.redact(problem)

    async def tick(self) -> list[Fired] | None:
        """One round, if this replica takes the round's lease (None when another replica does it)."""
        every = self.inventory.alerts.interval_seconds
        key = f"alerts-round:{int(self.clock().timestamp() // every)}"
        if self.claim is not None and not await self.claim(key, every):
            return None
        return await self.round()

    async def loop(self, stop: asyncio.Event, on_round: Callable[[list[Fired]], Awaitable[None]] | None = None) -> None:
        """A round now, then every ``interval_seconds`` until ``stop``; a failed round is logged and retried."""
        every = self.inventory.alerts.interval_seconds
        while not stop.is_set():
            try:
                fired = await self.tick()
                if fired is not None and on_round is not None:
                    await on_round(fired)
            except Exception:
                log.exception("watch_round_failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), every)


def _reading(status: QueueStatus) -> QueueReading:
    """What the queue rules need of a queue's status: counts over the rate window rather than rates."""
    minutes = RATE_WINDOW_MS / 60_000
    return QueueReading(
        name=status.ref.name,
        paused=status.paused,
        waiting=status.counts.get("waiting", 0) + status.counts.get("paused", 0),
        oldest_waiting_seconds=status.oldest_waiting_seconds,
        finished=round(status.finished_per_minute * minutes),
        failed=round(status.failed_per_minute * minutes),
        window_minutes=minutes,
        estimated=status.rate_capped,
    )


def _provider_incident(facts: Mapping[str, object]) -> str | None:
    """A statuspage probe's active incident line, "" when there is none, None when the page was not read."""
    status = facts.get("provider_status")
    if not isinstance(status, str) or status == "unknown":
        return None
    line = facts.get("incident_line")
    return line if isinstance(line, str) else ""


def _int(value: object) -> int | None:
    return int(value) if isinstance(value, int | float) else None


def _float(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) else None
