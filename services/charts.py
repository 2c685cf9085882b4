"""The weekly digest's chart: availability and p95 probe latency per service per day, as a PNG.

matplotlib is imported on first use (it takes a second) and draws with the Agg backend, in a worker
thread so the event loop keeps answering Slack while it renders.
"""

from __future__ import annotations

import asyncio
import io
from collections import defaultdict
from collections.abc import Sequence
from datetime import date, datetime, timedelta

from services.state import ProbeSample

MAX_SERVICES = 12  # lines per panel; more would be unreadable


def daily_series(
    samples: Sequence[ProbeSample], start: datetime, end: datetime
) -> tuple[list[date], dict[str, list[float | None]], dict[str, list[float | None]]]:
    """Per service and day: availability (% of probe rounds not critical) and p95 latency (ms)."""
    days = [(start + timedelta(days=n)).date() for n in range((end - start).days + 1)]
    index = {day: n for n, day in enumerate(days)}
    by: dict[str, dict[date, list[ProbeSample]]] = defaultdict(lambda: defaultdict(list))
    for sample in samples:
        day = sample.at.date()
        if day in index:
            by[sample.service][day].append(sample)
    availability: dict[str, list[float | None]] = {}
    p95: dict[str, list[float | None]] = {}
    for service in sorted(by)[:MAX_SERVICES]:
        availability[service], p95[service] = [], []
        for day in days:
            found = by[service].get(day, [])
            if not found:
                availability[service].append(None)
                p95[service].append(None)
                continue
            up = sum(1 for s in found if s.status < 2)
            availability[service].append(100.0 * up / len(found))
            latencies = sorted(s.latency_ms for s in found)
            p95[service].append(latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))])
    return days, availability, p95


def _render(days: list[date], availability: dict[str, list[float | None]], p95: dict[str, list[float | None]]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 5.5), dpi=100)
    up_axes, latency_axes = figure.subplots(2, 1, sharex=True)
    for service in availability:
        up_axes.plot(days, [v if v is not None else float("nan") for v in availability[service]], marker="o",
                     label=service)  # fmt: skip
        latency_axes.plot(days, [v if v is not None else float("nan") for v in p95[service]], marker="o",
                          label=service)  # fmt: skip
    up_axes.set_ylabel("availability %")
    up_axes.set_ylim(0, 105)
    up_axes.grid(alpha=0.3)
    up_axes.legend(loc="lower left", fontsize="small", ncol=3)
    latency_axes.set_ylabel("p95 probe latency (ms)")
    latency_axes.grid(alpha=0.3)
    figure.autofmt_xdate()
    figure.suptitle("Availability and p95 latency per service, by day (UTC)")
    out = io.BytesIO()
    figure.savefig(out, format="png")
    return out.getvalue()


async def weekly_chart(samples: Sequence[ProbeSample], start: datetime, end: datetime) -> bytes | None:
    """The chart as PNG bytes, or None when there is no probe history to draw."""
    days, availability, p95 = daily_series(samples, start, end)
    if not availability:
        return None
    return await asyncio.to_thread(_render, days, availability, p95)
