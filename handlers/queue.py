"""/ops queue, /ops queue clean and /ops queue retry: Bull and BullMQ queues on Redis (runbook 001)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from pydantic import Field

from handlers import blocks as bk
from handlers.context import OpsContext, Reply
from handlers.registry import CommandArgs, clip_token, resolve_service, subcommand
from services.access import Risk
from services.approvals import ApprovalEngine, Outcome, Plan, Progress
from services.errors import CommandError
from services.inventory import Inventory
from services.plan_lists import PlanList, PlanLists
from services.queues import (
    QUEUE_NAME,
    BatchResult,
    QueueRef,
    QueueStatus,
    QueueTarget,
    check_queue_name,
    parse_age,
)
from services.queues import queue_targets as targets_of
from services.redaction import Redactor
from services.text import human_age

MAX_PLAN = 1_000_000  # job ids one approval may clean or retry; more are left for the next request
SAMPLE = 10  # ids shown in a plan


class QueueArgs(CommandArgs):
    positional = ("service", "queue")
    service: str = Field(max_length=64)
    queue: str | None = Field(None, max_length=100)


class CleanArgs(CommandArgs):
    positional = ("service", "queue", "state")
    service: str = Field(max_length=64)
    queue: str = Field(max_length=100)
    state: Literal["completed", "failed"]
    older_than: str | None = Field(None, max_length=20)


class RetryArgs(CommandArgs):
    positional = ("service", "queue")
    service: str = Field(max_length=64)
    queue: str = Field(max_length=100)


def queue_targets(inventory: Inventory, service: str) -> list[QueueTarget]:
    """The Redis components of ``service`` that declare queues."""
    name = resolve_service(inventory, service)
    found = targets_of(inventory, name)
    if not found:
        raise CommandError(f"`{name}` has no queues in the inventory (a redis component with `queues:`).")
    return found


def _queue_name(text: str) -> str:
    if not QUEUE_NAME.match(text):
        raise CommandError(
            f"`{clip_token(text)}` is not a queue name: letters, digits, `.`, `_` and `-` only "
            "(no wildcards, colons or slashes)."
        )
    return check_queue_name(text)


async def find_queue(inventory: Inventory, service: str, name: str, redactor: Redactor) -> tuple[QueueTarget, QueueRef]:
    """The component and queue called ``name`` in ``service``, or one sentence saying why not."""
    name = _queue_name(name)
    targets = queue_targets(inventory, service)
    declared = [t for t in targets if name in t.settings.names]
    if declared:
        target = declared[0]
        return target, target.client(redactor).ref(name)
    problems: list[str] = []
    for target in targets:
        if target.settings.names:
            continue
        try:
            return target, await target.client(redactor).find(name)
        except CommandError as exc:
            problems.append(exc.message)
    known = sorted({n for t in targets for n in t.settings.names})
    service = resolve_service(inventory, service)
    if known:
        listed = ", ".join(f"`{n}`" for n in known)
        raise CommandError(f"`{service}` has no queue `{name}`; its declared queues are {listed}.")
    raise CommandError(problems[0] if problems else f"`{service}` has no queue `{name}`.")


def status_lines(status: QueueStatus) -> list[str]:
    """One queue as a few lines of mrkdwn."""
    ref = status.ref
    paused = " — :double_vertical_bar: *paused*" if status.paused else ""
    counts = " · ".join(f"{state} {n:,}" for state, n in status.counts.items())
    lines = [f"*{ref.name}* ({ref.library}, prefix `{ref.prefix}`){paused}", counts]
    oldest = (
        f"oldest waiting job: {human_age(status.oldest_waiting_seconds)}"
        if status.oldest_waiting_seconds is not None
        else "nothing waiting"
    )
    over = "the newest 1,000 events" if status.rate_capped else "15 min"
    rate = f"finished {status.finished_per_minute:.1f}/min (failed {status.failed_per_minute:.1f}/min) over {over}"
    lines.append(f"{oldest} · {rate}")
    if status.reasons:
        shown = ", ".join(f"{bk.escape(reason)} ({n})" for reason, n in status.reasons)
        lines.append(f"top failures (newest {status.reasons_sampled} failed): {shown}")
    return lines


@subcommand(
    "queue",
    help="Bull/BullMQ queues: counts by state, paused, oldest waiting job, rate, top failure reasons",
    usage="<service> [queue]",
    risk=Risk.READ,
    args=QueueArgs,
)
async def queue(ctx: OpsContext, args: QueueArgs) -> Reply:
    inventory, redactor = ctx.deps.inventory, ctx.deps.redactor
    service = resolve_service(inventory, args.service)
    statuses: list[QueueStatus] = []
    notes: list[str] = []
    if args.queue is not None:
        target, ref = await find_queue(inventory, service, args.queue, redactor)
        statuses = await target.client(redactor).status([ref])
    else:
        for target in queue_targets(inventory, service):
            client = target.client(redactor)
            refs, more = await client.queues()
            if more:
                notes.append(f"{target.component}: the search for queues stopped early; name a queue to see it.")
            if not refs:
                notes.append(f"{target.component}: no queue found under the prefix `{target.settings.prefix}`.")
            statuses += await client.status(refs)
    lines: list[str] = []
    for status in statuses:
        lines += [*status_lines(status), ""]
    failed = sum(s.counts.get("failed", 0) for s in statuses)
    waiting = sum(s.counts.get("waiting", 0) + s.counts.get("paused", 0) for s in statuses)
    text = f"{service} queues: {len(statuses)} queue(s), {waiting:,} waiting, {failed:,} failed"
    blocks = [bk.header(f"Queues: {service}"), *bk.sections(lines or ["No queues."])]
    blocks += [bk.context(bk.escape(n)) for n in notes[:5]]
    return Reply(text, blocks, ephemeral=True)


def _runs(ctx: OpsContext) -> QueueRuns:
    runs = ctx.deps.approvals.actions.get("queue clean")
    if not isinstance(runs, QueueRuns):
        raise RuntimeError("the queue actions are not registered with the approval engine")
    return runs


def _when(ms: float) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M UTC")


def _queue_fact(ref: QueueRef) -> str:
    return f"{ref.library} queue {ref.prefix}:{ref.name}"


@dataclass(frozen=True)
class _Planned:
    """The jobs a clean or retry would touch: where, how many, and their saved id list."""

    service: str
    target: QueueTarget
    ref: QueueRef
    saved: PlanList
    more: str  # " (the oldest N of M; ask again for the rest)" when the plan is capped
    sample: str


async def _plan_jobs(
    ctx: OpsContext, service_name: str, queue: str, state: Literal["completed", "failed"], cutoff_ms: float
) -> tuple[_Planned | None, str]:
    """Find the queue and list its ``state`` jobs finished before ``cutoff_ms``; save the ids beside
    the coming approval. ``None`` (and the queue's name) when there is none."""
    inventory, redactor = ctx.deps.inventory, ctx.deps.redactor
    service = resolve_service(inventory, service_name)
    _queue_name(queue)
    target, ref = await find_queue(inventory, service, queue, redactor)
    client = target.client(redactor)
    await client.check_library(ref)
    ids, total = await client.finished_ids(ref, state, cutoff_ms=cutoff_ms, limit=MAX_PLAN)
    if not ids:
        return None, ref.name
    saved = await _runs(ctx).lists.save(ids)
    more = f" (the oldest {len(ids):,} of {total:,}; ask again for the rest)" if total > len(ids) else ""
    sample = ", ".join(saved.sample[:SAMPLE]) + (" …" if saved.count > SAMPLE else "")
    return _Planned(service, target, ref, saved, more, sample), ref.name


@subcommand(
    "queue clean",
    help="Remove completed or failed jobs of a queue (all, or finished before --older-than); needs approval",
    usage="<service> <queue> completed|failed [--older-than 7d]",
    risk=Risk.DESTRUCTIVE,
    args=CleanArgs,
)
async def queue_clean(ctx: OpsContext, args: CleanArgs) -> Reply | Plan:
    age_ms = parse_age(args.older_than) if args.older_than is not None else None
    cutoff = time.time() * 1000 - age_ms if age_ms is not None else float("inf")
    when = f" finished before {_when(cutoff)}" if age_ms is not None else ""
    planned, name = await _plan_jobs(ctx, args.service, args.queue, args.state, cutoff)
    if planned is None:
        text = f"No {args.state} job in `{name}`{when}: nothing to clean."
        return Reply(text, [bk.section(text)], ephemeral=True)
    service, target, ref, saved, more, sample = (
        planned.service,
        planned.target,
        planned.ref,
        planned.saved,
        planned.more,
        planned.sample,
    )
    return Plan(
        action="queue clean",
        service=service,
        summary=(
            f"Remove {saved.count:,} {args.state} job(s){when} from queue `{ref.name}` "
            f"in {service}/{target.component}{more}"
        ),
        details=(
            f"job ids: {sample}",
            f"removed as {ref.library} removes a job: the job hash, its logs"
            + (", its dependency keys and its parent link" if ref.library == "bullmq" else ", its limiter entry")
            + f"; only jobs still {args.state}{when}, in batches of 500, each all or nothing",
            f"the full list of {saved.count:,} ids is kept beside this approval (sha256 {saved.ref[:16]}…)",
        ),
        params={
            "component": target.component,
            "queue": ref.name,
            "state": args.state,
            "cutoff_ms": None if age_ms is None else int(cutoff),
            "ids_ref": saved.ref,
            "count": saved.count,
        },
        facts={"queue": _queue_fact(ref), f"{args.state} ids": saved.ref},
        count=saved.count,
    )


@subcommand(
    "queue retry",
    help="Move a queue's failed jobs back to waiting, as the library's retryJobs does; needs approval",
    usage="<service> <queue>",
    risk=Risk.CHANGE,
    args=RetryArgs,
)
async def queue_retry(ctx: OpsContext, args: RetryArgs) -> Reply | Plan:
    planned, name = await _plan_jobs(ctx, args.service, args.queue, "failed", float("inf"))
    if planned is None:
        text = f"No failed job in `{name}`: nothing to retry."
        return Reply(text, [bk.section(text)], ephemeral=True)
    service, target, ref, saved, more, sample = (
        planned.service,
        planned.target,
        planned.ref,
        planned.saved,
        planned.more,
        planned.sample,
    )
    return Plan(
        action="queue retry",
        service=service,
        summary=(
            f"Move {saved.count:,} failed job(s) of queue `{ref.name}` in {service}/{target.component} "
            f"back to waiting{more}"
        ),
        details=(
            f"job ids: {sample}",
            f"as {ref.library}'s retryJobs does: finishedOn, processedOn and failedReason cleared, "
            "the job pushed to wait (BullMQ 5 and Bull: to paused while the queue is paused); only jobs still failed",
        ),
        params={"component": target.component, "queue": ref.name, "ids_ref": saved.ref, "count": saved.count},
        facts={"queue": _queue_fact(ref), "failed ids": saved.ref},
        count=saved.count,
    )


class QueueRuns:
    """Runs approved `queue clean` and `queue retry` plans: exactly the planned ids, batch by batch."""

    def __init__(self, inventory: Inventory, redactor: Redactor, lists: PlanLists) -> None:
        self.inventory = inventory
        self.redactor = redactor
        self.lists = lists

    def _target(self, plan: Plan) -> tuple[QueueTarget, QueueRef]:
        component = str(plan.params["component"])
        for target in queue_targets(self.inventory, plan.service):
            if target.component == component:
                return target, target.client(self.redactor).ref(str(plan.params["queue"]))
        raise CommandError(f"`{plan.service}` has no queue component `{component}` any more.")

    async def observe(self, plan: Plan) -> Mapping[str, str]:
        target, ref = self._target(plan)
        library = await target.client(self.redactor).written_by(ref)
        ref_now = QueueRef(library, ref.prefix, ref.name)
        state = "failed" if plan.action == "queue retry" else str(plan.params["state"])
        listed = str(plan.params["ids_ref"])
        try:
            await self.lists.load(listed)
            list_fact = listed
        except CommandError as exc:
            list_fact = exc.message
        return {"queue": _queue_fact(ref_now), f"{state} ids": list_fact}

    async def execute(self, plan: Plan, progress: Progress) -> Outcome:
        target, ref = self._target(plan)
        client = target.client(self.redactor)
        ids = await self.lists.load(str(plan.params["ids_ref"]))
        retry = plan.action == "queue retry"
        verb = "Retried" if retry else "Removed"
        last = 0.0

        async def report(handled: int, total: int) -> None:
            nonlocal last
            if time.monotonic() - last >= 2 or handled == total:
                last = time.monotonic()
                await progress(f"{handled:,} of {total:,} job(s) handled…")

        await progress(f"{'Retrying' if retry else 'Removing'} {len(ids):,} job(s) of `{ref.name}`…")
        if retry:
            result = await client.retry(ref, ids, progress=report)
            state = "failed"
        else:
            state = str(plan.params["state"])
            cutoff = plan.params.get("cutoff_ms")
            result = await client.remove(
                ref, "completed" if state == "completed" else "failed", ids,
                cutoff_ms=float(cutoff) if cutoff is not None else float("inf"), progress=report,
            )  # fmt: skip
        return Outcome(
            f"{verb} {len(result.done):,} of {len(ids):,} planned {state} job(s) of `{ref.name}`.",
            tuple(self._details(result, state, retry)),
        )

    @staticmethod
    def _details(result: BatchResult, state: str, retry: bool) -> list[str]:
        lines: list[str] = []
        if result.done:
            head = ", ".join(result.done[:50]) + (" …" if len(result.done) > 50 else "")
            lines.append(f"{'moved to waiting' if retry else 'removed'}: {head}")
        if result.skipped:
            head = ", ".join(result.skipped[:50]) + (" …" if len(result.skipped) > 50 else "")
            lines.append(f"left alone ({len(result.skipped):,}, no longer {state} or gone): {head}")
        return lines


def register_queue_actions(engine: ApprovalEngine, inventory: Inventory, redactor: Redactor, lists: PlanLists) -> None:
    """The code behind `queue clean` and `queue retry`, for the approval engine."""
    runs = QueueRuns(inventory, redactor, lists)
    engine.register("queue clean", runs)
    engine.register("queue retry", runs)
