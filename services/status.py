"""`/ops status`: how hard each component is working, concurrently, against declared thresholds.

A figure source per component type (services/figures/) measures a component over a window and the
window before it; this module fans the sources out like `/ops health` does (each bounded by its
component's timeout, all by one deadline), holds every figure against the component's thresholds
(``thresholds:`` in the inventory, else the runbooks' defaults), and returns plain data for the
handler to render. Sources are registered by type in :data:`FIGURE_BUILDERS`; a component of a type
without figures is left out and counted.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import aiohttp
import structlog

from services.clients import close_each
from services.errors import CommandError
from services.failures import short_error
from services.figures.base import FigureError, FigureSource, Measurement, Window
from services.figures.http import ScrapeHistory
from services.figures.thresholds import FigureThreshold, Level, judge
from services.health import Status, Target
from services.inventory import Component, TlsComponent
from services.redaction import Redactor

__all__ = [
    "FIGURE_BUILDERS",
    "MAX_WINDOW",
    "MIN_WINDOW",
    "ComponentStatus",
    "FigureDeps",
    "FigureLine",
    "StatusReport",
    "TlsFigures",
    "build_figure_sources",
    "close_sources",
    "collect_status",
    "parse_window",
]

log = structlog.get_logger(__name__)

MIN_WINDOW = timedelta(minutes=5)
MAX_WINDOW = timedelta(days=7)

_WINDOW = re.compile(r"^([0-9]{1,6})\s*(m|min|h|d|w)$", re.IGNORECASE)
_UNIT = {"m": 60, "min": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_window(text: str) -> timedelta:
    """``"15m"``, ``"1h"``, ``"7d"`` → the window; CommandError with one sentence for anything else."""
    found = _WINDOW.match(text.strip())
    if found is None:
        raise CommandError(f"`--window {text[:20]}` is not a length: use minutes, hours or days, like 15m, 1h or 7d.")
    window = timedelta(seconds=int(found.group(1)) * _UNIT[found.group(2).lower()])
    if window > MAX_WINDOW:
        raise CommandError(
            f"A window of {text.strip()} is longer than the 7 days `/ops status` looks back; use 7d or less."
        )
    if window < MIN_WINDOW:
        raise CommandError(f"A window of {text.strip()} is too short to measure; use 5m or more.")
    return window


# -- the registry of figure sources by component type ---------------------------------------------------


@dataclass(frozen=True)
class FigureDeps:
    """What a figure source may be built with: the shared HTTP session, the watcher's scrapes, and the
    address of a plaintext gRPC Cloud Monitoring endpoint (an emulator or the tests' fake; None: Google's)."""

    session: aiohttp.ClientSession | None = None
    history: ScrapeHistory | None = None
    monitoring_endpoint: str | None = None


def _host(deps: FigureDeps) -> FigureSource:
    from services.figures.host import HostFigures

    return HostFigures()


def _http(deps: FigureDeps) -> FigureSource:
    from services.figures.http import HttpFigures

    return HttpFigures(deps.session, deps.history)


def _compose(deps: FigureDeps) -> FigureSource:
    from services.figures.compose import ComposeFigures

    return ComposeFigures()


def _tls(deps: FigureDeps) -> FigureSource:
    return TlsFigures()


def _cloud_monitoring(deps: FigureDeps) -> FigureSource:
    from services.figures.cloud_monitoring import CloudMonitoringFigures, plaintext_channel

    endpoint = deps.monitoring_endpoint
    return CloudMonitoringFigures(channel_factory=plaintext_channel(endpoint) if endpoint else None)


def _cloudwatch(deps: FigureDeps) -> FigureSource:
    from services.figures.cloudwatch import LambdaFigures

    return LambdaFigures()


FIGURE_BUILDERS: dict[str, Callable[[FigureDeps], FigureSource]] = {
    "host": _host,
    "http": _http,
    "compose": _compose,
    "tls": _tls,
    "cloudrun": _cloud_monitoring,
    "cloudsql": _cloud_monitoring,
    "lambda": _cloudwatch,
}
"""Component type → how to build its figure source."""


async def close_sources(sources: Mapping[str, FigureSource]) -> None:
    """Close the sources that hold clients or threads, each once (one may serve several types)."""
    await close_each(sources.values(), what="figure_source")


def build_figure_sources(deps: FigureDeps, *, types: Collection[str] | None = None) -> dict[str, FigureSource]:
    """The figure source of each component type that has one (of ``types`` only, when given)."""
    wanted = set(FIGURE_BUILDERS) if types is None else set(FIGURE_BUILDERS) & set(types)
    built: dict[str, FigureSource] = {}
    by_builder: dict[Callable[[FigureDeps], FigureSource], FigureSource] = {}
    for kind in sorted(wanted):
        builder = FIGURE_BUILDERS[kind]
        # One source per builder: cloudrun and cloudsql share one Cloud Monitoring source and its clients.
        if builder not in by_builder:
            by_builder[builder] = builder(deps)
        built[kind] = by_builder[builder]
    return built


class TlsFigures:
    """A tls component's days left as a figure, from the tls probe's handshake."""

    async def measure(self, component: Component, window: Window, *, timeout: float) -> list[Measurement]:  # noqa: ASYNC109
        from services.probes.tls import TlsProbe

        if not isinstance(component, TlsComponent):
            raise FigureError(f"certificate figures cannot be read of a {component.type} component")
        result = await TlsProbe().probe(component)
        days = result.facts.get("days_left")
        if not isinstance(days, int | float):
            raise FigureError(f"No certificate could be read: {result.detail}.")
        problem = result.facts.get("verify_error")
        note = f"not trusted: {problem}" if isinstance(problem, str) else ""
        return [Measurement("cert_days_left", "certificate", float(days), "days", note=note)]


# -- the report -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FigureLine:
    """One measurement and its status against the component's thresholds."""

    measurement: Measurement
    level: Level
    threshold: float | None = None

    @property
    def status(self) -> Status:
        return Status(int(self.level))


@dataclass(frozen=True)
class ComponentStatus:
    """One component's figures; ``status`` None when they could not be had (``problem`` says why)."""

    target: Target
    status: Status | None
    figures: tuple[FigureLine, ...] = ()
    problem: str = ""
    elapsed_ms: float = 0.0

    @property
    def rank(self) -> int:
        """Worst first: critical, warning, unknown, healthy."""
        if self.status is None:
            return 1
        return {Status.CRITICAL: 3, Status.WARNING: 2, Status.HEALTHY: 0}[self.status]


@dataclass(frozen=True)
class StatusReport:
    window: Window
    items: tuple[ComponentStatus, ...]
    duration_ms: float
    skipped: tuple[Target, ...] = field(default_factory=tuple)

    @property
    def status(self) -> Status:
        """The worst known status; a component whose figures could not be read counts as a warning."""
        return max((Status.WARNING if item.status is None else item.status for item in self.items),
                   default=Status.HEALTHY)  # fmt: skip

    def by_service(self) -> dict[str, list[ComponentStatus]]:
        """Items grouped by service, worst service first, components worst first within each."""
        groups: dict[str, list[ComponentStatus]] = {}
        for item in self.items:
            groups.setdefault(item.target.service, []).append(item)
        for members in groups.values():
            members.sort(key=lambda i: -i.rank)
        return dict(sorted(groups.items(), key=lambda kv: -max(i.rank for i in kv[1])))


def thresholds_of(spec: Component) -> dict[str, FigureThreshold]:
    """The component's own thresholds; a tls component's warning_days / critical_days count as its own."""
    own = dict(spec.thresholds)
    if isinstance(spec, TlsComponent) and "cert_days_left" not in own:
        own["cert_days_left"] = FigureThreshold(warning=spec.warning_days, critical=spec.critical_days)
    return own


def assess(target: Target, found: Sequence[Measurement], redactor: Redactor, elapsed_ms: float) -> ComponentStatus:
    """Hold each measurement against the component's thresholds; the component is its worst figure."""
    own = thresholds_of(target.spec)
    lines: list[FigureLine] = []
    for m in found:
        m = Measurement(m.name, redactor.redact(m.label), m.value, m.unit, m.previous, redactor.redact(m.note))
        level, crossed = judge(m.name, m.value, own)
        lines.append(FigureLine(m, level, crossed))
    worst = max((line.status for line in lines), default=Status.HEALTHY)
    return ComponentStatus(target, worst, tuple(lines), elapsed_ms=elapsed_ms)


async def _measure_one(target: Target, source: FigureSource, window: Window, redactor: Redactor) -> ComponentStatus:
    started = time.perf_counter()
    timeout = target.spec.timeout
    try:
        async with asyncio.timeout(timeout):
            found = await source.measure(target.spec, window, timeout=timeout)
    except TimeoutError:
        problem = f"no answer within {timeout:g} s"
    except FigureError as exc:
        problem = exc.message
    except Exception as exc:  # a broken source must not take the whole report down
        log.warning("figures_failed", component=f"{target.service}/{target.component}", exc_info=True)
        problem = short_error(exc, redactor, 300)
    else:
        return assess(target, found, redactor, (time.perf_counter() - started) * 1000)
    elapsed = (time.perf_counter() - started) * 1000
    return ComponentStatus(target, None, problem=redactor.redact(problem).rstrip("."), elapsed_ms=elapsed)


async def collect_status(
    targets: Sequence[Target],
    sources: Mapping[str, FigureSource],
    window: timedelta,
    *,
    deadline: float,
    redactor: Redactor,
    now: datetime | None = None,
) -> StatusReport:
    """Measure every target concurrently; each has its own timeout and all share one deadline."""
    started = time.perf_counter()
    span = Window(now or datetime.now(UTC), window)
    items: dict[int, ComponentStatus] = {}
    tasks: dict[int, asyncio.Task[ComponentStatus]] = {}
    skipped: list[Target] = []
    for index, target in enumerate(targets):
        source = sources.get(target.type)
        if source is not None:
            tasks[index] = asyncio.create_task(
                _measure_one(target, source, span, redactor), name=f"figures:{target.service}/{target.component}"
            )
        else:
            skipped.append(target)
    cut: set[asyncio.Task[ComponentStatus]] = set()
    if tasks:
        try:
            _, cut = await asyncio.wait(tasks.values(), timeout=deadline)
        finally:
            for task in tasks.values():
                task.cancel()
        await asyncio.gather(*cut, return_exceptions=True)
    for index, task in tasks.items():
        if task in cut or task.cancelled():
            target = targets[index]
            items[index] = ComponentStatus(
                target, None, problem=f"cut off at the overall deadline of {deadline:g} s", elapsed_ms=deadline * 1000
            )
        else:
            items[index] = task.result()
    ordered = tuple(items[i] for i in sorted(items))
    return StatusReport(span, ordered, (time.perf_counter() - started) * 1000, tuple(skipped))
