"""Health results and the concurrent fan-out of probes under one deadline."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Protocol

from services.failures import network_problem, short_error
from services.inventory import Component, Inventory, StatuspageComponent
from services.redaction import Redactor


class Status(IntEnum):
    """Overall states of runbook 003; larger is worse, so the worst of many is ``max``."""

    HEALTHY = 0
    WARNING = 1
    CRITICAL = 2

    @property
    def label(self) -> str:
        return self.name.lower()


@dataclass(frozen=True)
class Check:
    """One named sub-check inside a probe (an endpoint, or a component of an app's /health)."""

    name: str
    status: Status
    detail: str = ""


@dataclass(frozen=True)
class ProbeResult:
    """What one probe found. ``detail`` is a short human line; ``facts`` are the figures behind it."""

    status: Status
    detail: str
    latency_ms: float = 0.0
    facts: dict[str, str | int | float] = field(default_factory=dict)
    checks: tuple[Check, ...] = ()
    waking: bool = False


class HealthProbe(Protocol):
    """An adapter's health capability. Must not raise for an unhealthy target: return CRITICAL."""

    async def probe(self, component: Component) -> ProbeResult: ...


@dataclass(frozen=True)
class Target:
    service: str
    component: str
    spec: Component

    @property
    def type(self) -> str:
        return self.spec.type


def targets_for(inventory: Inventory, service: str) -> list[Target]:
    """Every component of ``service`` (of every service for ``all``), as probe targets."""
    return [Target(s, c, spec) for s, c, spec in inventory.components() if service == "all" or s == service]


@dataclass(frozen=True)
class ComponentHealth:
    target: Target
    result: ProbeResult

    @property
    def third_party(self) -> bool:
        """A provider's status page (runbook 002): shown apart, under "third parties"."""
        return isinstance(self.target.spec, StatuspageComponent)

    @property
    def unknown(self) -> bool:
        """A provider's page that gave nothing readable (or a probe cut off before it said what it read)."""
        return self.third_party and self.result.facts.get("provider_status", "unknown") == "unknown"

    @property
    def counted(self) -> bool:
        """Whether it counts in its service's overall status: every component of ours does; a third party
        only when declared ``affects: true``, and not while its page cannot be read."""
        spec = self.target.spec
        return not isinstance(spec, StatuspageComponent) or (spec.affects and not self.unknown)


def overall(items: Iterable[ComponentHealth]) -> Status:
    """The worst status among the items that count (see :attr:`ComponentHealth.counted`)."""
    return max((item.result.status for item in items if item.counted), default=Status.HEALTHY)


@dataclass(frozen=True)
class HealthReport:
    items: tuple[ComponentHealth, ...]
    duration_ms: float
    skipped: tuple[Target, ...] = ()

    @property
    def status(self) -> Status:
        return overall(self.items)

    def by_service(self) -> dict[str, list[ComponentHealth]]:
        """Items grouped by service, worst service first, components worst first within each."""
        groups: dict[str, list[ComponentHealth]] = {}
        for item in self.items:
            groups.setdefault(item.target.service, []).append(item)
        for members in groups.values():
            members.sort(key=lambda i: -i.result.status)
        return dict(sorted(groups.items(), key=lambda kv: -overall(kv[1])))


ProbeObserver = Callable[[str, float, Status], None]


async def _run_one(
    target: Target, probe: HealthProbe, redactor: Redactor, observe: ProbeObserver | None
) -> ProbeResult:
    result = await _probe_once(target, probe, redactor)
    if observe is not None:
        observe(target.type, result.latency_ms / 1000, result.status)
    return result


async def _probe_once(target: Target, probe: HealthProbe, redactor: Redactor) -> ProbeResult:
    started = time.perf_counter()
    try:
        async with asyncio.timeout(target.spec.timeout):
            result = await probe.probe(target.spec)
    except TimeoutError:
        elapsed = (time.perf_counter() - started) * 1000
        return ProbeResult(Status.CRITICAL, f"no answer within {target.spec.timeout:g} s", elapsed)
    except Exception as exc:  # a broken adapter must not take the whole report down
        elapsed = (time.perf_counter() - started) * 1000
        return ProbeResult(Status.CRITICAL, network_problem(exc) or short_error(exc, redactor, 300), elapsed)
    if not result.latency_ms:
        result = ProbeResult(
            result.status,
            result.detail,
            (time.perf_counter() - started) * 1000,
            result.facts,
            result.checks,
            result.waking,
        )
    return ProbeResult(
        result.status,
        redactor.redact(result.detail),
        result.latency_ms,
        redactor.redact_value(result.facts),
        tuple(Check(c.name, c.status, redactor.redact(c.detail)) for c in result.checks),
        result.waking,
    )


class InFlightProbes:
    """Shares a probe that is already running between concurrent health checks.

    When ten people type `/ops health all` during an incident, each component is probed once,
    not ten times: a struggling service is not hammered by its own monitoring, and the bot's
    event loop stays free to ack. A probe is shared only while it runs; the next check probes
    afresh. Each probe is bounded by its own timeout, so a shared one never outlives that.
    """

    def __init__(self) -> None:
        self._running: dict[tuple[str, str], asyncio.Task[ProbeResult]] = {}

    def start(
        self, target: Target, probe: HealthProbe, redactor: Redactor, observe: ProbeObserver | None
    ) -> asyncio.Task[ProbeResult]:
        key = (target.service, target.component)
        task = self._running.get(key)
        if task is None:
            task = asyncio.create_task(
                _run_one(target, probe, redactor, observe), name=f"probe:{target.service}/{target.component}"
            )
            self._running[key] = task
            task.add_done_callback(lambda done: self._forget(key, done))
        return task

    def _forget(self, key: tuple[str, str], done: asyncio.Task[ProbeResult]) -> None:
        if self._running.get(key) is done:
            del self._running[key]


async def check_health(
    targets: Sequence[Target],
    probes: Callable[[Target], HealthProbe | None],
    *,
    deadline: float,
    redactor: Redactor,
    observe: ProbeObserver | None = None,
    in_flight: InFlightProbes | None = None,
) -> HealthReport:
    """Probe every target concurrently; each has its own timeout and all share one deadline."""
    started = time.perf_counter()
    runnable: list[tuple[Target, HealthProbe]] = []
    skipped: list[Target] = []
    for target in targets:
        probe = probes(target)
        if probe is None:
            skipped.append(target)
        else:
            runnable.append((target, probe))
    shared = in_flight or InFlightProbes()
    tasks = [shared.start(t, p, redactor, observe) for t, p in runnable]
    cut: set[asyncio.Task[ProbeResult]] = set()
    if tasks:
        # Waited on, not shielded (a shield per probe and check is ~30 objects the event loop keeps
        # for as long as the probe runs): this check's deadline leaves a shared probe running for
        # the other checks waiting on it, and every probe ends at its own timeout anyway.
        _, cut = await asyncio.wait(tasks, timeout=deadline)
        if in_flight is None:  # probes of this check alone: stop them
            for task in cut:
                task.cancel()
            await asyncio.gather(*cut, return_exceptions=True)
    items: list[ComponentHealth] = []
    for (target, _), task in zip(runnable, tasks, strict=True):
        if task in cut or task.cancelled():
            waited = (time.perf_counter() - started) * 1000
            result = ProbeResult(Status.CRITICAL, f"cut off at the overall deadline of {deadline:g} s", waited)
        else:
            result = task.result()
        items.append(ComponentHealth(target, result))
    return HealthReport(tuple(items), (time.perf_counter() - started) * 1000, tuple(skipped))
