"""/ops jobs <service> and /ops jobs reset-stuck <service>: runbook 003's jobs table."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime

from pydantic import Field

from handlers import blocks as bk
from handlers.context import OpsContext, Reply
from handlers.registry import CommandArgs, resolve_service, subcommand
from services.access import Risk
from services.approvals import Outcome, Plan, Progress
from services.errors import CommandError
from services.inventory import Inventory, PostgresComponent
from services.jobs import Job, JobsClient, JobsTarget, job_facts
from services.redaction import Redactor

RESET_LIMIT = 1000  # jobs one approval may reset; more are left for the next request
SHOWN = 20  # stuck jobs listed in a reply


class JobsArgs(CommandArgs):
    positional = ("service", "component")
    service: str = Field(max_length=64)
    component: str | None = Field(None, max_length=64)


def jobs_component(inventory: Inventory, service: str, component: str | None) -> JobsTarget:
    """The PostgreSQL component of ``service`` that has a jobs table (or the one named)."""
    name = resolve_service(inventory, service)
    found = {
        c: JobsTarget(c, spec, spec.jobs)
        for c, spec in inventory.services[name].components.items()
        if isinstance(spec, PostgresComponent) and spec.jobs is not None
    }
    if not found:
        raise CommandError(f"`{name}` has no jobs table in the inventory (a postgres component with `jobs:`).")
    if component is None:
        if len(found) > 1:
            raise CommandError(f"`{name}` has several jobs tables; name one: {', '.join(f'`{c}`' for c in found)}.")
        return next(iter(found.values()))
    if component not in found:
        raise CommandError(
            f"`{name}` has no jobs table in a component called `{bk.escape(component[:40])}`; "
            f"known: {', '.join(f'`{c}`' for c in found)}."
        )
    return found[component]


def age(job: Job, now: datetime) -> str:
    if job.started_at is None:
        return "not started"
    minutes = int((now - job.started_at).total_seconds() // 60)
    return f"{minutes // 60} h {minutes % 60} min" if minutes >= 60 else f"{minutes} min"


def job_line(job: Job, now: datetime) -> str:
    since = job.started_at.strftime("%Y-%m-%d %H:%M UTC") if job.started_at else "?"
    return f"job `{bk.escape(job.id)}` — {bk.escape(job.status)} since {since} ({age(job, now)})"


@subcommand(
    "jobs",
    help="Jobs by status, and those stuck in processing longer than the threshold",
    usage="<service> [component]",
    risk=Risk.READ,
    args=JobsArgs,
)
async def jobs(ctx: OpsContext, args: JobsArgs) -> Reply:
    inventory = ctx.deps.inventory
    service = resolve_service(inventory, args.service)
    target = jobs_component(inventory, service, args.component)
    component, table = target.component, target.table.table
    summary = await target.client(ctx.deps.redactor).summary(limit=SHOWN)
    counts = ", ".join(f"{status} {n:,}" for status, n in sorted(summary.counts.items())) or "no jobs"
    lines = [job_line(job, summary.checked_at) for job in summary.stuck]
    if summary.stuck_total > len(lines):
        lines.append(f"… and {summary.stuck_total - len(lines):,} more")
    stuck = (
        f":warning: *{summary.stuck_total:,} stuck* in processing for over {summary.threshold_minutes} min — "
        f"`/ops jobs reset-stuck {service}` puts them back to pending (needs approval)."
        if summary.stuck_total
        else f"Nothing stuck in processing for over {summary.threshold_minutes} min."
    )
    blocks = [bk.header(f"Jobs: {service}/{component} ({table})"), bk.section(f"*By status:* {counts}")]
    blocks += [bk.section(stuck), *bk.sections(lines)]
    return Reply(f"{service} jobs: {counts}; {summary.stuck_total} stuck", blocks, ephemeral=True)


@subcommand(
    "jobs reset-stuck",
    help="Put jobs stuck in processing back to pending (runbook 003); needs approval",
    usage="<service> [component]",
    risk=Risk.DESTRUCTIVE,
    args=JobsArgs,
)
async def reset_stuck(ctx: OpsContext, args: JobsArgs) -> Reply | Plan:
    inventory = ctx.deps.inventory
    service = resolve_service(inventory, args.service)
    target = jobs_component(inventory, service, args.component)
    component, spec = target.component, target.table
    summary = await target.client(ctx.deps.redactor).summary(limit=RESET_LIMIT)
    minutes = summary.threshold_minutes
    if not summary.stuck:
        text = f"No job in `{service}/{component}` is stuck in processing for over {minutes} min: nothing to reset."
        return Reply(text, [bk.section(text)], ephemeral=True)
    count = len(summary.stuck)
    more = (
        f" (the oldest {count:,} of {summary.stuck_total:,}; ask again for the rest)"
        if summary.stuck_total > count
        else ""
    )
    return Plan(
        action="jobs reset-stuck",
        service=service,
        summary=(
            f"Reset {count:,} job(s) stuck in `{spec.processing_value}` for over {minutes} min in "
            f"{service}/{component} (`{spec.table}`) to `{spec.pending_value}`{more}"
        ),
        details=tuple(job_line(job, summary.checked_at) for job in summary.stuck),
        params={"component": component, "ids": [job.id for job in summary.stuck], "minutes": minutes},
        facts=job_facts({job.id: job for job in summary.stuck}),
    )


class ResetStuckJobs:
    """Runs an approved `jobs reset-stuck`: exactly the planned ids, still stuck, in one transaction."""

    def __init__(self, inventory: Inventory, redactor: Redactor) -> None:
        self.inventory = inventory
        self.redactor = redactor

    def _client(self, plan: Plan) -> JobsClient:
        return jobs_component(self.inventory, plan.service, str(plan.params["component"])).client(self.redactor)

    async def observe(self, plan: Plan) -> Mapping[str, str]:
        return job_facts(await self._client(plan).observe([str(i) for i in plan.params["ids"]]))

    async def execute(self, plan: Plan, progress: Progress) -> Outcome:
        ids = [str(i) for i in plan.params["ids"]]
        message = f"reset by opsbot: stuck in processing for over {plan.params.get('minutes', '?')} min"
        await progress(f"Resetting {len(ids):,} job(s)…")
        done = await self._client(plan).reset_stuck(ids, message=message)
        skipped = [i for i in ids if i not in set(done)]
        summary = f"Reset {len(done):,} of {len(ids):,} job(s) to pending."
        details = [f"reset: {', '.join(done[:200])}" + (" …" if len(done) > 200 else "")] if done else []
        if skipped:
            details.append(f"left alone (no longer stuck): {', '.join(skipped[:200])}")
        return Outcome(summary, tuple(details))
