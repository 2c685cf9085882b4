"""/ops status <service|all> [--window 1h]: each component's current figures, trend and status."""

from __future__ import annotations

import asyncio
from collections import Counter

from pydantic import Field

from handlers import blocks as bk
from handlers.context import Block, OpsContext, Reply
from handlers.registry import CommandArgs, resolve_service, subcommand
from services.access import Risk
from services.figures.base import Measurement
from services.figures.thresholds import FIGURES, Level
from services.health import Status, targets_for
from services.status import (
    ComponentStatus,
    FigureDeps,
    FigureLine,
    StatusReport,
    build_figure_sources,
    close_sources,
    collect_status,
    parse_window,
)
from services.text import human_bytes

# After this long without a report the caller is told the figures are being read.
PROGRESS_AFTER = 2.0
UNKNOWN_EMOJI = ":white_circle:"


class StatusArgs(CommandArgs):
    positional = ("service",)
    service: str = Field("all", max_length=64)
    window: str = Field("1h", max_length=20)


@subcommand(
    "status",
    help="Current figures of each component (CPU, memory, disk, requests, errors, latency) against thresholds",
    usage="<service|all> [--window 1h]",
    risk=Risk.READ,
    args=StatusArgs,
)
async def status(ctx: OpsContext, args: StatusArgs) -> Reply:
    window = parse_window(args.window)
    inventory = ctx.deps.inventory
    scope = "all" if args.service.lower() == "all" else resolve_service(inventory, args.service)
    targets = targets_for(inventory, scope)
    # The bot's own sources (built once, with the watcher's scrapes); made for this request only without.
    owned = not ctx.deps.figures
    sources = ctx.deps.figures or build_figure_sources(
        FigureDeps(history=ctx.deps.scrape_history), types={t.type for t in targets}
    )
    reading = asyncio.create_task(
        collect_status(targets, sources, window, deadline=inventory.health.deadline, redactor=ctx.deps.redactor)
    )
    try:
        done, _ = await asyncio.wait({reading}, timeout=PROGRESS_AFTER)
        if not done:
            await ctx.tell(
                f":hourglass_flowing_sand: Reading the figures of {len(targets)} component(s) of {scope}… "
                f"the report follows within {inventory.health.deadline:g} s."
            )
        report = await reading
    except BaseException:
        reading.cancel()
        raise
    finally:
        if owned:
            await close_sources(sources)
    return render_status(report, "all services" if scope == "all" else scope, args.window.strip())


# -- rendering -----------------------------------------------------------------------------------------


def _number(value: float, unit: str) -> str:
    if unit == "%":
        return f"{value:.1f} %"
    if unit == "ms":
        return f"{value:,.0f} ms" if value < 1000 else f"{value / 1000:.2f} s"
    if unit == "bytes":
        return human_bytes(value)
    if unit == "per_min":
        return f"{value:,.1f}/min"
    if unit == "days":
        return f"{value:,.0f} days" if abs(value) >= 2 else f"{value:.1f} days"
    return f"{value:,.0f}" if float(value).is_integer() else f"{value:,.2f}"


def trend(m: Measurement) -> str:
    """``↑ 3.2 pts`` against the previous window; "" when the previous window is not known."""
    if m.value is None or m.previous is None:
        return ""
    change = m.value - m.previous
    if abs(change) < 1e-9 or (m.previous and abs(change / m.previous) < 0.005):
        return "→ same as before"
    arrow = "↑" if change > 0 else "↓"
    size = f"{abs(change):.1f} pts" if m.unit == "%" else _number(abs(change), m.unit)
    return f"{arrow} {size}"


def figure_text(line: FigureLine) -> str:
    m = line.measurement
    if m.value is None:
        return f"{bk.escape(m.label)} unknown" + (f" ({bk.escape(m.note)})" if m.note else "")
    text = f"{bk.escape(m.label)} {_number(m.value, m.unit)}"
    if line.level is not Level.HEALTHY and line.threshold is not None:
        kind = FIGURES.get(m.name)
        sign = "≤" if kind and kind.lower_is_worse else "≥" if kind and kind.at_or_above else ">"
        text = f"*{text}* ({line.level.name.lower()} {sign} {_number(line.threshold, m.unit)})"
    if arrow := trend(m):
        text += f" {arrow}"
    if m.note:
        text += f" _({bk.escape(m.note)})_"
    return text


def _emoji(item: ComponentStatus) -> str:
    if item.status is None:
        return UNKNOWN_EMOJI
    return bk.STATUS_EMOJI[item.status]


def component_line(item: ComponentStatus, *, with_service: bool = False) -> str:
    target = item.target
    name = f"{target.service}/{target.component}" if with_service else target.component
    head = f"{_emoji(item)} *{bk.escape(name)}* ({target.type})"
    if item.status is None:
        return f"{head} · unknown: {bk.escape(item.problem)}"
    if not item.figures:
        return f"{head} · nothing to measure"
    # Worst figures first, so a long line still starts with what matters.
    ordered = sorted(item.figures, key=lambda f: -int(f.level))
    return f"{head} · " + " · ".join(figure_text(f) for f in ordered)


def _plain_status(item: ComponentStatus) -> str:
    if item.status is None:
        return "UNKNOWN"
    return item.status.label.upper()


def _counts(report: StatusReport) -> str:
    counts = Counter(_plain_status(i).lower() for i in report.items)
    order = ("critical", "warning", "unknown", "healthy", "n/a")
    parts = [f"{counts[k]} {k if k != 'n/a' else 'without figures yet'}" for k in order if counts[k]]
    took = report.duration_ms
    duration = f"{took:,.0f} ms" if took < 1000 else f"{took / 1000:.1f} s"
    return f"{len(report.items)} component(s): {', '.join(parts) or 'nothing measured'} · took {duration}"


def render_status(report: StatusReport, scope: str, window: str) -> Reply:
    status = report.status
    title = f"Status of {scope} over the last {window}: {status.label}"
    head = [bk.header(title), bk.context(_counts(report) + " · trends against the window before")]
    body: list[Block] = []
    for service, items in report.by_service().items():
        known = [i.status for i in items if i.status is not None]
        worst = max(known, default=Status.HEALTHY)
        emoji = bk.STATUS_EMOJI[worst] if known else UNKNOWN_EMOJI
        body += bk.sections((component_line(i) for i in items), title=f"{emoji} *{bk.escape(service)}*")
        body.append(bk.divider())
    if report.skipped:
        skipped = ", ".join(f"{t.service}/{t.component} ({t.type})" for t in report.skipped)
        body.append(bk.context(f"No figures for their type: {bk.escape(skipped)}"))
    problems = [i for i in report.items if i.rank >= 1]
    problems.sort(key=lambda i: -i.rank)
    summary = head + (
        bk.sections((component_line(i, with_service=True) for i in problems), title="*Problems first:*")[:40]
        if problems
        else [bk.section("Every figure is within its thresholds.")]
    )
    lines = [f"{bk.STATUS_EMOJI[status]} {title}", _counts(report)]
    lines += [
        f"{_plain_status(i):8} {i.target.service}/{i.target.component}: "
        + (i.problem or "; ".join(bk.plain(figure_text(f)) for f in i.figures if f.level is not Level.HEALTHY))
        for i in problems[:20]
    ]
    return Reply("\n".join(lines), head + body, summary=summary, status=status)
