"""/ops migrate and /ops migrate status: the service's declared Cloud Run migration job (runbook 000's
`gcloud run jobs execute vcbl-chatbot-migrate --wait` and `gcloud run jobs executions list`)."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime

from pydantic import Field

from handlers import blocks as bk
from handlers.context import OpsContext, Reply
from handlers.registry import CommandArgs, clip_token, resolve_service, subcommand
from services.access import Risk
from services.approvals import ApprovalEngine, Outcome, Plan, Progress
from services.deploy.cloudrun_jobs import CloudRunJob, JobExecution
from services.deploy.providers import DeployProviders
from services.errors import CommandError
from services.inventory import CloudRunComponent, CloudRunJobRef, Inventory

_MARK = {
    "succeeded": ":white_check_mark:",
    "failed": ":x:",
    "cancelled": ":no_entry_sign:",
    "running": ":hourglass_flowing_sand:",
}


class MigrateArgs(CommandArgs):
    positional = ("service", "component")
    service: str = Field(max_length=64)
    component: str | None = Field(None, max_length=64)


class MigrateStatusArgs(CommandArgs):
    positional = ("service", "component")
    service: str = Field(max_length=64)
    component: str | None = Field(None, max_length=64)
    limit: int = Field(10, ge=1, le=50)


def _when(moment: datetime | None) -> str:
    return f"{moment.astimezone(UTC):%Y-%m-%d %H:%M} UTC" if moment else "?"


def execution_line(execution: JobExecution) -> str:
    """One execution: outcome, name, when, duration and task counts."""
    now = datetime.now(UTC)
    took = f"running for {execution.took(now)}" if not execution.finished else f"took {execution.took()}"
    reason = f" — {bk.escape(execution.reason[:150])}" if execution.outcome != "succeeded" and execution.reason else ""
    return (
        f"{_MARK[execution.outcome]} `{execution.name}` · {execution.outcome} · "
        f"{_when(execution.started_at or execution.created_at)} · {took} · {execution.tasks()}{reason}"
    )


def _last(execution: JobExecution | None) -> str:
    if execution is None:
        return "none"
    return f"{execution.name} {execution.outcome}"


class MigrationRuns:
    """The migration job of each service, and the code that runs an approved `migrate`."""

    def __init__(self, inventory: Inventory, providers: DeployProviders) -> None:
        self.inventory = inventory
        self.providers = providers
        self._jobs: dict[tuple[str, str], CloudRunJob] = {}

    def pick(self, service: str, component: str | None) -> tuple[str, CloudRunComponent, CloudRunJobRef]:
        """The Cloud Run component of ``service`` that declares a migration job (or the one named)."""
        found = {
            name: (spec, ref)
            for name, spec in self.inventory.services[service].components.items()
            if isinstance(spec, CloudRunComponent) and (ref := spec.migrate_job) is not None
        }
        if not found:
            raise CommandError(f"`{service}` declares no migration job (a cloudrun component with `migrate_job:`).")
        if component is None:
            if len(found) > 1:
                raise CommandError(f"`{service}` has several migration jobs: name one of {', '.join(found)}.")
            component = next(iter(found))
        if component not in found:
            known = ", ".join(f"`{name}`" for name in found)
            raise CommandError(f"`{service}` has no migration job on `{clip_token(component)}`; known: {known}.")
        spec, ref = found[component]
        return component, spec, ref

    def job(self, service: str, component: str | None) -> tuple[str, CloudRunJobRef, CloudRunJob]:
        """The client of the service's migration job, made once (on the channel the providers use)."""
        component, spec, ref = self.pick(service, component)
        key = (service, component)
        made = self._jobs.get(key)
        if made is None or made.job != ref.job:
            made = self._jobs[key] = CloudRunJob(
                ref.project or spec.project, ref.region or spec.region, ref.job,
                timeout=spec.timeout, poll_every=ref.poll_seconds, channel_factory=self.providers.cloudrun_channel,
            )  # fmt: skip
        return component, ref, made

    async def state(self, job: CloudRunJob) -> tuple[list[JobExecution], dict[str, str]]:
        """The recent executions and the facts a plan depends on: the newest one, and any running."""
        recent = await job.executions(limit=10)
        running = [execution for execution in recent if not execution.finished]
        facts = {
            "job": job.describe(),
            "newest execution": _last(recent[0] if recent else None),
            "running": ", ".join(execution.name for execution in running) or "none",
        }
        return recent, facts

    async def observe(self, plan: Plan) -> Mapping[str, str]:
        _, _, job = self.job(plan.service, str(plan.params["component"]))
        _, facts = await self.state(job)
        return facts

    async def execute(self, plan: Plan, progress: Progress) -> Outcome:
        _, ref, job = self.job(plan.service, str(plan.params["component"]))
        await progress(f"Executing {job.describe()}…")
        started = await job.start()
        await progress(f"Started execution `{started.name}`; following it (up to {ref.timeout / 60:g} min)…")
        final = await job.follow(started.name, timeout=ref.timeout, progress=progress)
        details = (
            f"tasks: {final.tasks()}",
            f"duration: {final.took()}",
            f"logs: {job.logs_link(final.name)}",
        )
        if final.outcome == "succeeded":
            return Outcome(
                f"Migration of {plan.service} succeeded: execution `{final.name}` of job {job.job} "
                f"took {final.took()}.",
                details,
            )
        reason = f": {final.reason}" if final.reason else "."
        return Outcome(
            f"Migration of {plan.service} {final.outcome}: execution `{final.name}` of job {job.job}{reason}",
            details,
            ok=False,
        )

    async def close(self) -> None:
        for job in self._jobs.values():
            await job.close()
        self._jobs.clear()


def _runs(ctx: OpsContext) -> MigrationRuns:
    runs = ctx.deps.approvals.actions.get("migrate")
    if not isinstance(runs, MigrationRuns):
        raise RuntimeError("the migrate action is not registered with the approval engine")
    return runs


@subcommand(
    "migrate",
    help="Execute the service's declared Cloud Run migration job and follow it; needs approval",
    usage="<service> [component]",
    risk=Risk.CHANGE,
    args=MigrateArgs,
)
async def migrate(ctx: OpsContext, args: MigrateArgs) -> Plan:
    service = resolve_service(ctx.deps.inventory, args.service)
    component, ref, job = _runs(ctx).job(service, args.component)
    image = await job.check()
    recent, facts = await _runs(ctx).state(job)
    running = [execution for execution in recent if not execution.finished]
    if running:
        raise CommandError(job.already_running(running[0]))
    last = f"last execution: {execution_line(recent[0])}" if recent else "last execution: none (never executed)"
    return Plan(
        action="migrate",
        service=service,
        summary=f"Execute the migration job of {service}: {job.describe()}",
        details=(
            last,
            f"image: `{bk.escape(image)}`" if image else "image: ?",
            f"as `gcloud run jobs execute {job.job} --region={job.region} --wait`; followed for up to "
            f"{ref.timeout / 60:g} min, then left running if it has not finished",
        ),
        params={"component": component, "job": ref.job},
        facts=facts,
    )


@subcommand(
    "migrate status",
    help="Recent executions of the service's migration job, with outcome and duration",
    usage="<service> [component] [--limit 10]",
    risk=Risk.READ,
    args=MigrateStatusArgs,
)
async def migrate_status(ctx: OpsContext, args: MigrateStatusArgs) -> Reply:
    service = resolve_service(ctx.deps.inventory, args.service)
    _, _, job = _runs(ctx).job(service, args.component)
    recent = await job.executions(limit=args.limit)
    lines = [execution_line(execution) for execution in recent] or [f"No executions of job {job.job} yet."]
    counts = {outcome: sum(e.outcome == outcome for e in recent) for outcome in _MARK}
    shown = ", ".join(f"{n} {outcome}" for outcome, n in counts.items() if n)
    text = f"Migrations of {service} ({job.job}): {len(recent)} recent execution(s)" + (f", {shown}" if shown else "")
    blocks = [bk.header(f"Migrations: {service}"), bk.context(bk.escape(job.describe())), *bk.sections(lines)]
    if recent:
        blocks.append(bk.context(f"Newest execution's logs: {job.logs_link(recent[0].name)}"))
    return Reply(text, blocks, ephemeral=True)


def register_migrate_actions(engine: ApprovalEngine, inventory: Inventory, providers: DeployProviders) -> MigrationRuns:
    """The code behind `migrate`, for the approval engine; the caller closes it."""
    runs = MigrationRuns(inventory, providers)
    engine.register("migrate", runs)
    return runs
