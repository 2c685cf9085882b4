"""/ops health [service|all]: probe components concurrently and report one status per line."""

from __future__ import annotations

import asyncio
from collections import Counter

from pydantic import Field

from handlers import blocks as bk
from handlers.context import Block, Deps, OpsContext, Reply
from handlers.registry import CommandArgs, resolve_service, subcommand
from services.access import Risk
from services.health import ComponentHealth, HealthReport, Status, check_health, overall
from services.health import targets_for as targets_for  # kept importable from here (bench/health_fanout.py)

# After this long without a report the caller is told the check is under way.
PROGRESS_AFTER = 2.0
UNKNOWN_EMOJI = ":grey_question:"


class HealthArgs(CommandArgs):
    positional = ("service",)
    service: str = Field("all", max_length=64)


@subcommand(
    "health",
    help="Probe every component of a service (or of all services) and report its status",
    usage="[service|all]",
    risk=Risk.READ,
    args=HealthArgs,
)
async def health(ctx: OpsContext, args: HealthArgs) -> Reply:
    inventory = ctx.deps.inventory
    scope = "all" if args.service.lower() == "all" else resolve_service(inventory, args.service)
    targets = targets_for(inventory, scope)
    check = asyncio.create_task(
        check_health(
            targets,
            ctx.deps.probe_for,
            deadline=inventory.health.deadline,
            redactor=ctx.deps.redactor,
            observe=ctx.deps.observe_probe,
            in_flight=ctx.deps.in_flight,
        )
    )
    done, _ = await asyncio.wait({check}, timeout=PROGRESS_AFTER)
    if not done:
        await ctx.tell(
            f":hourglass_flowing_sand: Checking {len(targets)} component(s) of {scope}… "
            f"the report follows within {inventory.health.deadline:g} s."
        )
    report = await check
    return render_health(report, "all services" if scope == "all" else scope)


async def service_health(deps: Deps, service: str) -> tuple[Status, list[str]]:
    """Fresh probes of one service (none shared with checks begun earlier): its status and problems."""
    report = await check_health(
        targets_for(deps.inventory, service), deps.probe_for, deadline=deps.inventory.health.deadline,
        redactor=deps.redactor, observe=deps.observe_probe,
    )  # fmt: skip
    problems = [
        f"{item.target.component}: {item.result.status.label} — {item.result.detail}"
        for item in report.items
        if item.counted and item.result.status is not Status.HEALTHY
    ]
    return report.status, problems


def _emoji(item: ComponentHealth) -> str:
    if item.unknown:
        return UNKNOWN_EMOJI
    return bk.WAKING_EMOJI if item.result.waking else bk.STATUS_EMOJI[item.result.status]


def component_line(item: ComponentHealth, *, with_service: bool = False) -> str:
    result = item.result
    name = f"{item.target.service}/{item.target.component}" if with_service else item.target.component
    line = (
        f"{_emoji(item)} *{bk.escape(name)}* ({item.target.type}) · {result.latency_ms:,.0f} ms · "
        f"{bk.escape(result.detail)}"
    )
    extra = [
        f"      ↳ {bk.STATUS_EMOJI[c.status]} {bk.escape(c.name)}" + (f": {bk.escape(c.detail)}" if c.detail else "")
        for c in result.checks
        if c.status is not Status.HEALTHY or len(result.checks) <= 6
    ]
    return "\n".join([line, *extra])


def _duration(ms: float) -> str:
    return f"{ms:,.0f} ms" if ms < 1000 else f"{ms / 1000:.1f} s"


def _counts(report: HealthReport) -> str:
    own = [item for item in report.items if not item.third_party]
    counts = Counter(item.result.status for item in own)
    parts = [f"{counts[s]} {s.label}" for s in (Status.CRITICAL, Status.WARNING, Status.HEALTHY) if counts[s]]
    services = len({item.target.service for item in report.items})
    third = [item for item in report.items if item.third_party]
    providers = ""
    if third:
        troubled = sum(1 for i in third if not i.unknown and i.result.status is not Status.HEALTHY)
        unknown = sum(1 for i in third if i.unknown)
        notes = [f"{troubled} with trouble" if troubled else "", f"{unknown} unknown" if unknown else ""]
        providers = f" · {len(third)} third part{'y' if len(third) == 1 else 'ies'}: " + (
            ", ".join(n for n in notes if n) or "all operational"
        )
    return (
        f"{len(own)} component(s) in {services} service(s): {', '.join(parts) or 'nothing probed'}{providers} · "
        f"took {_duration(report.duration_ms)}"
    )


def _third_party_line(item: ComponentHealth, *, with_service: bool = False) -> str:
    line = component_line(item, with_service=with_service)
    return line + (" · _counts in the service's status_" if item.counted else "")


def render_health(report: HealthReport, scope: str) -> Reply:
    status = report.status
    title = f"{bk.STATUS_EMOJI[status]} Health of {scope}: {status.label}"
    head = [bk.header(f"Health of {scope}: {status.label}"), bk.context(_counts(report))]
    body: list[Block] = []
    for service, items in report.by_service().items():
        worst = overall(items)
        body += bk.sections(
            (component_line(i) for i in items if not i.third_party),
            title=f"{bk.STATUS_EMOJI[worst]} *{bk.escape(service)}*",
        )
        # Providers' status pages (runbook 002) apart: not part of the service's status unless `affects`.
        third = [i for i in items if i.third_party]
        if third:
            body += bk.sections((_third_party_line(i) for i in third), title="_Third parties:_")
    if report.skipped:
        skipped = ", ".join(f"{t.service}/{t.component} ({t.type})" for t in report.skipped)
        body.append(bk.context(f"Not probed (no health check for their type): {bk.escape(skipped)}"))
    problems = [i for i in report.items if i.counted and i.result.status is not Status.HEALTHY]
    problems.sort(key=lambda i: -i.result.status)
    troubled = [i for i in report.items if not i.counted and (i.unknown or i.result.status is not Status.HEALTHY)]
    summary = head + (
        bk.sections((component_line(i, with_service=True) for i in problems), title="*Problems first:*")[:40]
        if problems
        else [bk.section("Every component answered healthy.")]
    )
    if troubled:
        lines_of_third = (_third_party_line(i, with_service=True) for i in troubled)
        summary += bk.sections(lines_of_third, title="*Third parties (not counted):*")[:5]
    lines = [title, _counts(report)]
    lines += [
        f"{i.result.status.label.upper():8} {i.target.service}/{i.target.component}: {i.result.detail}"
        for i in problems[:20]
    ]
    lines += [
        f"{'UNKNOWN' if i.unknown else i.result.status.label.upper():8} {i.target.service}/{i.target.component} "
        f"(third party, not counted): {i.result.detail}"
        for i in troubled[:10]
    ]
    return Reply("\n".join(lines), head + body, summary=summary, status=status)
