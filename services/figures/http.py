"""Figures of an ``http`` component with ``metrics:`` (runbook 004): request rate, 5xx ratio and p95
latency from its Prometheus histogram.

Rates need two scrapes some time apart. Under ``opsbot serve`` the alert watcher scrapes on its
interval and keeps its scrapes in a :class:`ScrapeHistory` this source reads; under ``opsbot run``
there is no history, so one scrape is read now and what exists only over a window says so, while
totals since the app started (requests, their 5xx share and p95) come from that one scrape.
The scrape itself (:func:`scrape_metrics`) is the watcher's too.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta

import aiohttp

from services.alerts.metrics import (
    MetricsError,
    Scrape,
    error_ratio,
    latency_quantile,
    parse_metrics,
    seconds_between,
)
from services.failures import network_problem
from services.figures.base import FigureError, Measurement, Window
from services.inventory import Component, HttpComponent

__all__ = ["METRICS_LIMIT", "HttpFigures", "ScrapeError", "ScrapeHistory", "metrics_url", "scrape_metrics"]

METRICS_LIMIT = 5 * 1024 * 1024  # bytes of a /metrics answer read at most
ONLY_IN_HISTORY = "only in the watcher's history"


class ScrapeError(Exception):
    """A scrape that failed, with the reason in a few plain words."""


def metrics_url(spec: HttpComponent) -> str:
    """Where the component's metrics are served; also the key of its kept scrapes."""
    return str(spec.url).rstrip("/") + (spec.metrics or "/metrics")


async def scrape_metrics(
    session: aiohttp.ClientSession,
    spec: HttpComponent,
    at: datetime,
    *,
    timeout: float,  # noqa: ASYNC109
) -> Scrape:
    """Read and parse the component's /metrics once; ScrapeError saying why when it cannot be had."""
    headers = {k: v.get_secret_value() for k, v in spec.headers.items()}
    try:
        async with session.get(
            metrics_url(spec), headers=headers, timeout=aiohttp.ClientTimeout(total=timeout)
        ) as resp:
            if resp.status != 200:
                raise ScrapeError(f"the metrics answered HTTP {resp.status}")
            text = (await resp.content.read(METRICS_LIMIT + 1)).decode("utf-8", "replace")
        return await asyncio.to_thread(parse_metrics, text, at)
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise ScrapeError(network_problem(exc) or f"the metrics could not be read ({type(exc).__name__})") from None
    except MetricsError as exc:
        raise ScrapeError(str(exc)) from None


class ScrapeHistory:
    """Scrapes kept per metrics URL, oldest first: the watcher adds one each round and drops those
    past its horizon; `/ops status` reads them. One event loop only (no locking needed)."""

    def __init__(self) -> None:
        self._kept: dict[str, deque[Scrape]] = {}
        self.fed = False
        """Whether a watcher adds to it (under `opsbot serve`); without one, rates cannot be had."""

    def add(self, url: str, scrape: Scrape, *, keep_after: datetime) -> tuple[Scrape, ...]:
        """Keep ``scrape``; forget those older than ``keep_after`` (at least two stay). All kept, oldest first."""
        kept = self._kept.setdefault(url, deque())
        kept.append(scrape)
        while len(kept) > 2 and isinstance(kept[0].at, datetime) and kept[0].at < keep_after:
            kept.popleft()
        return tuple(kept)

    def scrapes(self, url: str) -> tuple[Scrape, ...]:
        return tuple(self._kept.get(url, ()))


def _at_or_before(history: Sequence[Scrape], moment: datetime) -> Scrape | None:
    found = None
    for scrape in history:
        if isinstance(scrape.at, datetime) and scrape.at <= moment:
            found = scrape
    return found


class HttpFigures:
    """An http component's request figures, from the watcher's history or, without one, one scrape now."""

    def __init__(
        self,
        session: aiohttp.ClientSession | None = None,
        history: ScrapeHistory | None = None,
        *,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._session = session
        self._history = history
        self._clock = clock

    async def measure(self, component: Component, window: Window, *, timeout: float) -> list[Measurement]:  # noqa: ASYNC109
        if not isinstance(component, HttpComponent):
            raise FigureError(f"http figures cannot be read of a {component.type} component")
        if component.metrics is None:
            raise FigureError("no `metrics:` path is declared for this component, so it has no request figures.")
        kept = self._history.scrapes(metrics_url(component)) if self._history is not None else ()
        if len(kept) >= 2:
            return self._from_history(kept, window)
        scrape = await self._scrape_once(component, timeout)
        return _since_start(scrape, under_watcher=self._history is not None and self._history.fed)

    async def _scrape_once(self, spec: HttpComponent, timeout: float) -> Scrape:  # noqa: ASYNC109
        now = self._clock()
        try:
            if self._session is not None:
                return await scrape_metrics(self._session, spec, now, timeout=timeout)
            async with aiohttp.ClientSession() as session:
                return await scrape_metrics(session, spec, now, timeout=timeout)
        except ScrapeError as exc:
            raise FigureError(f"The metrics could not be read: {exc}.") from None

    def _from_history(self, kept: Sequence[Scrape], window: Window) -> list[Measurement]:
        after = kept[-1]
        if not isinstance(after.at, datetime):  # the watcher times its scrapes with datetimes
            raise FigureError("The watcher's scrapes carry no time of day.")
        before = _at_or_before(kept[:-1], after.at - window.length) or kept[0]
        span = seconds_between(before, after)
        short = span < window.length.total_seconds() * 0.9
        earlier = _at_or_before(kept, before.at - window.length) if isinstance(before.at, datetime) else None
        now = _window_figures(before, after)
        then = _window_figures(earlier, before) if earlier is not None and earlier is not before else {}
        note = f"over the last {_span(span)}: the watcher keeps no older scrapes" if short else ""
        return [
            Measurement(name, label, now.get(name), unit, then.get(name), note if now.get(name) is not None else why)
            for name, label, unit, why in _RATE_FIGURES
        ]


_RATE_FIGURES = (
    ("requests_per_min", "requests", "per_min", "no requests in the window"),
    ("error_rate_pct", "5xx", "%", "no requests in the window"),
    ("latency_p95_ms", "p95", "ms", "no requests in the window"),
)


def _window_figures(before: Scrape, after: Scrape) -> dict[str, float]:
    """Request rate, 5xx share and p95 between two scrapes (the figures the app has; none of a missing one)."""
    found: dict[str, float] = {}
    minutes = seconds_between(before, after) / 60
    try:
        ratio = error_ratio(before, after)
    except MetricsError:
        ratio = None
    if ratio is not None:
        found["requests_per_min"] = ratio.total / minutes
        found["error_rate_pct"] = ratio.pct
    else:
        found["requests_per_min"] = 0.0
    try:
        p95 = latency_quantile(0.95, before, after)
    except MetricsError:
        p95 = None
    if p95 is not None:
        found["latency_p95_ms"] = p95.seconds * 1000
    return found


def _since_start(scrape: Scrape, *, under_watcher: bool) -> list[Measurement]:
    """What one scrape tells: totals since the app started; rates need the watcher's history."""
    if not isinstance(scrape.at, datetime):
        raise FigureError("The scrape carries no time of day.")
    empty = Scrape(at=scrape.at - timedelta(microseconds=1), samples={})  # "before the app started"
    rate_note = "the watcher has not kept two scrapes yet" if under_watcher else ONLY_IN_HISTORY
    out = [Measurement("requests_per_min", "requests", None, "per_min", note=rate_note)]
    try:
        ratio = error_ratio(empty, scrape)
    except MetricsError as exc:
        out.append(Measurement("requests", "requests since start", None, "count", note=str(exc)))
        ratio = None
    else:
        total = ratio.total if ratio is not None else 0.0
        out.append(Measurement("requests", "requests since start", total, "count"))
    if ratio is not None:
        out.append(Measurement("error_rate_pct", "5xx since start", ratio.pct, "%", note="since the app started"))
    try:
        p95 = latency_quantile(0.95, empty, scrape)
    except MetricsError:
        p95 = None
    if p95 is not None:
        note = "since the app started" + (" (above the largest bucket)" if p95.above_buckets else "")
        out.append(Measurement("latency_p95_ms", "p95 since start", p95.seconds * 1000, "ms", note=note))
    return out


def _span(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
