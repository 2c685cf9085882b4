"""/ops integrity <service>: runbook 003's data check (``make check-data``), one line per check; and
/ops integrity fix <service>: its ``check-data-fix`` (orphan vectors deleted, stale jobs reset), with approval."""

from __future__ import annotations

from collections.abc import Mapping

from pydantic import Field

from handlers import blocks as bk
from handlers.context import Block, OpsContext, Reply
from handlers.registry import CommandArgs, resolve_service, subcommand
from services.access import Risk
from services.approvals import ApprovalEngine, Outcome, Plan, Progress
from services.integrity import (
    SAMPLE,
    IntegrityChecker,
    IntegrityReport,
    IntegrityTarget,
    QdrantFactory,
    integrity_target,
    minutes_text,
)
from services.integrity_fix import IntegrityFixer, outcome_lines
from services.inventory import Inventory
from services.plan_lists import PlanLists
from services.redaction import Redactor


class IntegrityArgs(CommandArgs):
    positional = ("service",)
    service: str = Field(max_length=64)


def render_integrity(report: IntegrityReport) -> Reply:
    """The report as Block Kit: the overall status, then each check with its emoji and figures."""
    status = report.status
    title = f"Integrity of {report.service}: {status.label}"
    lines = [
        f"{bk.STATUS_EMOJI[line.status]} *{bk.escape(line.name)}* — {bk.escape(line.detail)}" for line in report.lines
    ]
    blocks: list[Block] = [bk.header(title), *bk.sections(lines)]
    notes = [f"took {report.seconds:,.1f} s"]
    if any(diff.orphans.count for diff in report.diffs) or (report.stale is not None and report.stale.total):
        notes.append(
            "orphan vectors and stale jobs are what `/ops integrity fix` would remove or reset (with approval)"
        )
    blocks.append(bk.context(" · ".join(notes)))
    text = "\n".join(
        [f"{bk.STATUS_EMOJI[status]} {title}"]
        + [f"{line.status.label.upper():8} {line.name}: {line.detail}" for line in report.lines]
    )
    return Reply(text, blocks, status=status)


@subcommand(
    "integrity",
    help="Runbook 003's data check: database, tables, collections, chunk ids against vector ids, stale jobs",
    usage="<service>",
    risk=Risk.READ,
    args=IntegrityArgs,
)
async def integrity(ctx: OpsContext, args: IntegrityArgs) -> Reply:
    service = resolve_service(ctx.deps.inventory, args.service)
    target = integrity_target(ctx.deps.inventory, service)
    await ctx.tell(f"Checking the integrity of `{service}` (comparing every chunk id with every vector id)…")
    report = await IntegrityChecker(ctx.deps.redactor).check(target)
    return render_integrity(report)


# -- /ops integrity fix ----------------------------------------------------------------------------


def _fix_action(ctx: OpsContext) -> IntegrityFixAction:
    action = ctx.deps.approvals.actions.get("integrity fix")
    if not isinstance(action, IntegrityFixAction):
        raise RuntimeError("the integrity fix action is not registered with the approval engine")
    return action


def _pending(target: IntegrityTarget) -> str:
    return target.jobs.jobs.pending_value if target.jobs is not None and target.jobs.jobs is not None else "pending"


def _ids(sample: tuple[str, ...], count: int, n: int = SAMPLE) -> str:
    return ", ".join(f"`{i}`" for i in sample[:n]) + (" …" if count > n else "")


@subcommand(
    "integrity fix",
    help="Runbook 003's check-data-fix: delete the orphan vectors and reset the stale jobs the check finds; "
    "needs approval",
    usage="<service>",
    risk=Risk.DESTRUCTIVE,
    args=IntegrityArgs,
)
async def integrity_fix(ctx: OpsContext, args: IntegrityArgs) -> Reply | Plan:
    service = resolve_service(ctx.deps.inventory, args.service)
    target = integrity_target(ctx.deps.inventory, service)
    await ctx.tell(f"Checking the integrity of `{service}` to plan the fix…")
    planned = await _fix_action(ctx).fixer.plan(target)
    missing = [
        f"{d.missing.count:,} chunk(s) of `{d.table}` have no vector in `{d.collection}`: not fixed here "
        "(they need re-indexing)"
        for d in planned.missing
    ]
    if planned.empty:
        over = minutes_text(target.settings.stale_after_minutes)
        text = f"Nothing to fix in `{service}`: no orphan vector, and no job in processing for over {over}."
        return Reply(text, [bk.section(text), *[bk.context(bk.escape(m)) for m in missing]], ephemeral=True)
    parts: list[str] = []
    details: list[str] = []
    for o in planned.orphans:
        parts.append(f"delete {o.saved.count:,} orphan vector(s) from `{o.collection}`")
        details.append(
            f"orphan vectors of `{o.collection}` ({o.saved.count:,} of its {o.points:,} points; in Qdrant, no chunk "
            f"in `{o.table}`): {_ids(o.saved.sample, o.saved.count)} — the full list is kept beside this approval "
            f"(sha256 {o.saved.ref[:16]}…)"
        )
    jobs = planned.jobs
    pending = _pending(target)
    if jobs is not None:
        shown = jobs.saved.count
        more = f" (the oldest {shown:,} of {jobs.total:,}; ask again for the rest)" if jobs.total > shown else ""
        over = minutes_text(jobs.minutes)
        parts.append(f"reset {shown:,} job(s) in processing for over {over} to `{pending}`{more}")
        details.append(f"stale jobs of `{jobs.component}/{jobs.table}`: {_ids(jobs.saved.sample, jobs.saved.count)}")
    details.append(
        "first a snapshot of each collection where the server takes one; then only planned vectors that are "
        "still orphans are deleted (in batches, by id) and only planned jobs still stale are reset; then the "
        "check runs again"
    )
    details += missing
    return Plan(
        action="integrity fix",
        service=service,
        summary=f"In {service}: " + " and ".join(parts),
        details=tuple(details),
        params=planned.params(),
        facts=dict(planned.facts),
        count=planned.count,
        total=planned.total,
    )


class IntegrityFixAction:
    """Runs an approved `integrity fix`: the planned lists, what is still orphan or stale, then the check."""

    def __init__(self, inventory: Inventory, redactor: Redactor, lists: PlanLists, fixer: IntegrityFixer) -> None:
        self.inventory = inventory
        self.redactor = redactor
        self.lists = lists
        self.fixer = fixer

    async def observe(self, plan: Plan) -> Mapping[str, str]:
        target = integrity_target(self.inventory, plan.service)
        return await self.fixer.observe(target, plan.params)

    async def execute(self, plan: Plan, progress: Progress) -> Outcome:
        target = integrity_target(self.inventory, plan.service)
        run = await self.fixer.run(target, plan.params, progress)
        pending = (
            target.jobs.jobs.pending_value if target.jobs is not None and target.jobs.jobs is not None else "pending"
        )
        summary, details = outcome_lines(run, pending)
        return Outcome(summary, tuple(details))


def register_integrity_actions(
    engine: ApprovalEngine,
    inventory: Inventory,
    redactor: Redactor,
    lists: PlanLists,
    *,
    qdrant_factory: QdrantFactory | None = None,
) -> None:
    """The code behind `integrity fix`, for the approval engine."""
    fixer = IntegrityFixer(redactor, lists, qdrant_factory=qdrant_factory)
    engine.register("integrity fix", IntegrityFixAction(inventory, redactor, lists, fixer))
