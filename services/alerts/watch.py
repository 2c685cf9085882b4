"""The watcher: probes the components with alert rules on an interval, scrapes /metrics where a rule
needs it, evaluates every rule, keeps the state in the state store, and tells a notifier what fired
or resolved. It knows nothing of Slack.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import aiohttp
import structlog

from services.alerts.metrics import MetricsError, Scrape, parse_metrics
from services.alerts.rules import (
    AlertRule,
    AlertState,
    DownRule,
    ErrorRateRule,
    LatencyRule,
    Observation,
    Phase,
    Silence,
    Transition,
    TransitionKind,
    check,
    evaluate,
)
from services.failures import network_problem, short_error
from services.health import HealthProbe, ProbeResult, Status, Target
from services.inventory import HttpComponent, Inventory
from services.redaction import Redactor
from services.state import ProbeSample, StateStore, StoredAlert

log = structlog.get_logger(__name__)

METRICS_LIMIT = 5 * 1024 * 1024  # bytes of a /metrics answer read at most
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


def watched(inventory: Inventory, probed_types: frozenset[str]) -> list[Watched]:
    """Every component with rules: its own, or ServiceDown by default for the types that are probed."""
    found: list[Watched] = []
    default = inventory.alerts.down_by_default
    for service, component, spec in inventory.components():
        rules: tuple[AlertRule, ...] = tuple(spec.alerts)
        if not rules and default and spec.type in probed_types:
            rules = (DownRule(kind="down"),)
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
        self._scrapes: dict[tuple[str, str], deque[Scrape]] = {}

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
        probe = self.probe_for(w.target)
        if probe is None:
            result = ProbeResult(Status.HEALTHY, "not probed")
        else:
            try:
                async with asyncio.timeout(w.target.spec.timeout + 1):
                    result = await probe.probe(w.target.spec)
            except TimeoutError:
                result = ProbeResult(Status.CRITICAL, f"no answer within {w.target.spec.timeout:g} s")
            except Exception as exc:
                result = ProbeResult(Status.CRITICAL, network_problem(exc) or short_error(exc, self.redactor))
        reachable = result.status is not Status.CRITICAL
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
        )

    async def _scrape(self, w: Watched, now: datetime) -> Sequence[Scrape]:
        spec = w.target.spec
        if not isinstance(spec, HttpComponent) or spec.metrics is None:
            return ()
        kept = self._scrapes.setdefault((w.target.service, w.target.component), deque())
        url = str(spec.url).rstrip("/") + spec.metrics
        headers = {k: v.get_secret_value() for k, v in spec.headers.items()}
        try:
            async with self.http.get(url, headers=headers, timeout=aiohttp.ClientTimeout(total=spec.timeout)) as resp:
                if resp.status != 200:
                    return tuple(kept)
                text = (await resp.content.read(METRICS_LIMIT + 1)).decode("utf-8", "replace")
            scrape = await asyncio.to_thread(parse_metrics, text, now)
        except (aiohttp.ClientError, TimeoutError, MetricsError, UnicodeError) as exc:
            log.info("metrics_scrape_failed", component=f"{w.target.service}/{w.target.component}",
                     reason=network_problem(exc) or short_error(exc, self.redactor))  # fmt: skip
            return tuple(kept)
        kept.append(scrape)
        window = max((getattr(rule, "window_seconds", 0) for rule in w.rules), default=0)
        horizon = now - timedelta(seconds=window + 2 * self.inventory.alerts.interval_seconds)
        while len(kept) > 2 and isinstance(kept[0].at, datetime) and kept[0].at < horizon:
            kept.popleft()
        return tuple(kept)

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


def _int(value: object) -> int | None:
    return int(value) if isinstance(value, int | float) else None
