"""/ops cost <service> [--month YYYY-MM]: a service's AWS cost from Cost Explorer (runbook 002)."""

from __future__ import annotations

import re
from datetime import UTC, datetime

from pydantic import Field

from handlers import blocks as bk
from handlers.context import Block, OpsContext, Reply
from handlers.registry import CommandArgs, resolve_service, subcommand
from services.access import Risk
from services.cost import (
    REGION,
    CostReport,
    anomaly_text,
    change_text,
    cost_cache_for,
    cost_settings,
    money,
    month_name,
    parse_month,
    read_costs,
    summary,
)
from services.health import Status


class CostArgs(CommandArgs):
    positional = ("service",)
    service: str = Field(max_length=64)
    month: str | None = Field(None, max_length=20, description="YYYY-MM; the current month (to date) by default")


def current_time() -> datetime:
    return datetime.now(UTC)


@subcommand(
    "cost",
    help="A service's AWS cost from Cost Explorer: month to date by AWS service, last month, projection",
    usage="<service> [--month YYYY-MM]",
    risk=Risk.READ,
    args=CostArgs,
)
async def cost(ctx: OpsContext, args: CostArgs) -> Reply:
    inventory = ctx.deps.inventory
    service = resolve_service(inventory, args.service)
    now = current_time()
    month = parse_month(args.month, now.date())
    settings = cost_settings(inventory, service)
    report = await read_costs(service, settings, month=month, now=now, cache=cost_cache_for(ctx.deps.store))
    return render_cost(report)


# -- rendering -----------------------------------------------------------------------------------------


def _name(text: str) -> str:
    # AWS service names are plain text ("Amazon Simple Storage Service"); keep Slack from reading them.
    return bk.escape(re.sub(r"[`*_~]", "", text))


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:]


def render_cost(report: CostReport) -> Reply:
    unit = report.unit
    title = f"AWS cost: {report.service} — {month_name(report.month)}" + (" to date" if report.to_date else "")
    blocks: list[Block] = [bk.header(title), bk.section(f"*{_sentence(bk.escape(summary(report)))}*")]
    lines = [summary(report)]
    if report.projection is not None and report.daily_rate is not None:
        note = (
            f"Projection: the month to date plus {money(report.daily_rate, unit)}/day (the mean of the last "
            f"7 days) for each day left."
        )
        blocks.append(bk.context(note))
    warnings = [f":warning: {anomaly_text(item, unit)}" for item in report.anomalies]
    lines += warnings
    if warnings:
        blocks += bk.sections(warnings)
    if report.top:
        first_day = report.to_date and report.through is None
        heading = (
            f"*By AWS service, {report.before_label}*"
            if first_day
            else f"*By AWS service* ({report.metric}, against {report.before_label})"
            if report.before is not None
            else f"*By AWS service* ({report.metric})"
        )
        rows = []
        for item in report.top:
            row = f"`{money(item.amount, unit)}` {_name(item.name)}"
            if item.before is not None:
                row += f" — was {money(item.before, unit)}{change_text(item.amount, item.before)}"
            rows.append(row)
        if report.others_count:
            rows.append(f"`{money(report.others, unit)}` {report.others_count} more AWS service(s)")
        blocks += bk.sections(rows, title=heading)
        lines += [f"{item.name}: {money(item.amount, unit)}" for item in report.top]
    elif report.empty:
        empty = (
            f"No cost recorded for {report.scope} in either period: check that the tag is activated as a cost "
            "allocation tag in Billing (tags count from their activation on) and that the account ids are right."
        )
        blocks.append(bk.section(bk.escape(empty)))
        lines.append(empty)
    other = "BlendedCost" if report.metric == "UnblendedCost" else "UnblendedCost"
    facts = [
        f"Cost Explorer ({REGION}), filtered by {report.scope}",
        f"{report.metric} shown; {other} {money(report.totals.get(other, 0.0), unit)} in the same period",
    ]
    if report.estimated:
        facts.append("the latest days are estimates")
    if report.truncated:
        facts.append("more pages were left unread")
    if report.read_at is not None:
        when = f"{report.read_at:%H:%M} UTC"
        facts.append(
            f"read at {when} today, kept until midnight UTC (each query costs $0.01)"
            if report.cached
            else f"read now ({when}); kept until midnight UTC, as each query costs $0.01"
        )
    blocks.append(bk.context(bk.escape(" · ".join(facts))))
    status = Status.WARNING if report.anomalies else Status.HEALTHY
    return Reply("\n".join(lines), blocks, ephemeral=True, status=status)


__all__ = ["CostArgs", "cost", "render_cost"]
