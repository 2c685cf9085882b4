"""Approvals as people see them: the message with its buttons, the clicks, and /ops approvals|approve|deny|cancel."""

from __future__ import annotations

import asyncio
import contextlib
import time

import structlog
from pydantic import Field

from handlers import blocks as bk
from handlers.context import Block, Deps, OpsContext, Reply
from handlers.registry import FOLLOWUPS, CommandArgs, NoArgs, subcommand
from services.access import Risk
from services.approvals import ApprovalEngine, Decision, Refused, mention, plan_of
from services.state import Approval, ApprovalState

log = structlog.get_logger(__name__)

S = ApprovalState
APPROVE, DENY, CANCEL = "approval_approve", "approval_deny", "approval_cancel"
ACTION_IDS = (APPROVE, DENY, CANCEL)
DETAIL_LINES = 15  # plan lines shown in the message; the rest are counted
PROGRESS_EVERY = 3.0  # seconds between edits of a running approval's message

_STATE_LINE = {
    S.PENDING: ":hourglass_flowing_sand: *Waiting for approval*",
    S.APPROVED: ":white_check_mark: *Approved*",
    S.RUNNING: ":gear: *Running*",
    S.SUCCEEDED: ":large_green_circle: *Done*",
    S.FAILED: ":red_circle: *Failed*",
    S.INTERRUPTED: ":warning: *Interrupted*",
    S.DENIED: ":no_entry_sign: *Denied*",
    S.CANCELLED: ":heavy_minus_sign: *Cancelled*",
    S.EXPIRED: ":heavy_minus_sign: *Expired*",
}


def _confirm(approval: Approval) -> dict[str, object]:
    """Block Kit's confirmation dialog on Approve, restating exactly what will run."""
    return {
        "title": {"type": "plain_text", "text": "Run this now?"},
        "text": {
            "type": "mrkdwn",
            "text": bk.clip(f"*{bk.escape(approval.summary)}*\nService: `{approval.service}`", 300),
        },
        "confirm": {"type": "plain_text", "text": "Approve and run"},
        "deny": {"type": "plain_text", "text": "Back"},
        "style": "danger",
    }


def _buttons(approval: Approval) -> Block:
    return {
        "type": "actions",
        "block_id": f"approval:{approval.id}",
        "elements": [
            {
                "type": "button",
                "action_id": APPROVE,
                "text": {"type": "plain_text", "text": "Approve"},
                "style": "primary",
                "value": approval.id,
                "confirm": _confirm(approval),
            },
            {
                "type": "button",
                "action_id": DENY,
                "text": {"type": "plain_text", "text": "Deny"},
                "style": "danger",
                "value": approval.id,
            },
            {
                "type": "button",
                "action_id": CANCEL,
                "text": {"type": "plain_text", "text": "Cancel"},
                "value": approval.id,
            },
        ],
    }


def status_line(engine: ApprovalEngine, approval: Approval) -> str:
    """Where the approval stands, who moved it there and when."""
    state = _STATE_LINE[approval.state]
    by = mention(approval.decided_by)
    match approval.state:
        case S.PENDING:
            votes = "".join(f", approved by {mention(v.voter)}" for v in approval.votes)
            return f"{state}{votes} — expires {engine.when(approval.expires_at)}"
        case S.APPROVED | S.RUNNING:
            return f"{state} — approved by {by} at {engine.when(approval.decided_at)}"
        case S.SUCCEEDED | S.FAILED | S.INTERRUPTED:
            return f"{state} — approved by {by}, finished {engine.when(approval.finished_at)}"
        case S.EXPIRED:
            return f"{state} at {engine.when(approval.decided_at)} without approval"
        case _:
            return f"{state} by {by} at {engine.when(approval.decided_at)}"


def approval_blocks(engine: ApprovalEngine, approval: Approval, note: str | None = None) -> list[Block]:
    """The approval's message: what will happen, who asked, the state; buttons while it is pending."""
    plan = plan_of(approval)
    title = "Approval needed" if approval.state is S.PENDING else "Approval"
    blocks: list[Block] = [
        bk.header(f"{title}: /ops {approval.action} {approval.service}"),
        bk.section(f"*{bk.escape(approval.summary)}*"),
    ]
    details = [bk.escape(line) for line in plan.details[:DETAIL_LINES]]
    if len(plan.details) > DETAIL_LINES:
        details.append(f"… and {len(plan.details) - DETAIL_LINES:,} more (all of them are in the plan that runs)")
    if details:
        blocks += bk.sections(details)
    need = approval.required_approvals
    policy = f"{need} {approval.approver_role}{'s' if need > 1 else ''}" + (
        "" if approval.self_approve else ", not the requester"
    )
    blocks.append(
        bk.context(
            f"Requested by {mention(approval.requester)} · risk: {approval.risk} · needs {policy} · "
            f"id `{approval.id}` · fingerprint `{str(approval.plan.get('fingerprint', ''))[:12]}`"
        )
    )
    blocks.append(bk.section(status_line(engine, approval)))
    if note and approval.state is S.RUNNING:
        blocks.append(bk.context(bk.escape(note)))
    if approval.result and approval.state.final:
        blocks.append(bk.section(bk.escape(approval.result.splitlines()[0])))
    if approval.state is S.PENDING:
        blocks.append(_buttons(approval))
    elif approval.state.final and (followup := FOLLOWUPS.get(approval.action)) and (extra := followup(approval)):
        blocks.append(extra)
    return blocks


def approval_text(approval: Approval) -> str:
    return f"{approval.state.value}: /ops {approval.action} {approval.service} — {approval.summary}"


def approval_reply(engine: ApprovalEngine, approval: Approval, *, interface: str) -> Reply:
    """The reply to a change request: the plan, posted where everyone can see it."""
    blocks = approval_blocks(engine, approval)
    # A schedule posts to the Slack channel, buttons and all; elsewhere there is nothing to press.
    if interface not in ("slack", "schedule"):
        blocks = [b for b in blocks if b.get("type") != "actions"]
        blocks.append(bk.context(f"An approver can run `/ops approve {approval.id}` (or `/ops deny {approval.id}`)."))
    return Reply(approval_text(approval), blocks, approval_id=approval.id)


# How a run ended, as the result's header says it; a failed or interrupted run is the command's error.
_ENDED = {S.SUCCEEDED: "Done", S.FAILED: "Failed", S.INTERRUPTED: "Interrupted"}
_RUN_FAILED = (S.FAILED, S.INTERRUPTED)


def result_reply(engine: ApprovalEngine, approval: Approval) -> Reply:
    """A finished run for the person who approved it from a command (console, /ops approve).

    A run that failed or was interrupted makes the reply an error, so the approving command is
    audited as one and `opsbot run "approve <id>"` exits 3: cron trusts the exit code, not the text."""
    blocks = approval_blocks(engine, approval)
    if ended := _ENDED.get(approval.state):
        blocks[0] = bk.header(f"{ended}: /ops {approval.action} {approval.service}")
    rest = approval.result.splitlines()[1:]
    if rest:
        blocks += bk.sections([bk.escape(line) for line in rest])
    first = approval.result.splitlines()[0] if approval.result else ""
    if approval.state.final:
        detail = f"approval {approval.id} {approval.state.value}" + (f": {first}" if first else "")
    else:  # another replica claimed the run: it ends there, and its own events say how
        detail = f"approval {approval.id} {approval.state.value} elsewhere"
    outcome = "error" if approval.state in _RUN_FAILED else "ok"
    return Reply(approval_text(approval), blocks, outcome=outcome, detail=detail)


async def run_approved(deps: Deps, approval: Approval, request_id: str) -> Approval:
    """Run an approval whose completing vote was just cast, showing its progress."""
    last_edit = 0.0

    async def progress(note: str) -> None:
        nonlocal last_edit
        if time.monotonic() - last_edit < PROGRESS_EVERY:
            return
        last_edit = time.monotonic()
        current = await deps.store.get_approval(approval.id)
        if current is not None and current.state is S.RUNNING:
            await deps.notifier.show(current, note)

    final = await deps.approvals.run(approval, request_id=request_id, progress=progress, changed=deps.notifier.show)
    if final.state.final:
        await deps.notifier.finished(final)
    return final


async def decide(deps: Deps, verb: str, approval_id: str, user: str, request_id: str) -> tuple[Decision, Approval]:
    """Approve, deny or cancel; show the change; run if this was the completing vote."""
    engine = deps.approvals
    act = {"approve": engine.approve, "deny": engine.deny, "cancel": engine.cancel}[verb]
    try:
        decision = await act(approval_id, user, request_id=request_id)
    except Refused as exc:
        if exc.changed is not None:
            await deps.notifier.show(exc.changed)
        raise
    await deps.notifier.show(decision.approval)
    final = decision.approval
    if decision.start_run:
        final = await run_approved(deps, decision.approval, request_id)
    return decision, final


async def sweep(deps: Deps) -> None:
    """Expire what waited too long and end runs whose process is gone; edit their messages."""
    for approval in await deps.approvals.expire_due():
        await deps.notifier.show(approval)
    for approval in await deps.approvals.recover():
        await deps.notifier.show(approval)
        await deps.notifier.finished(approval)
        await deps.notifier.announce(
            approval.channel,
            f":warning: `/ops {approval.action} {approval.service}` (approval `{approval.id}`) "
            f"{'was interrupted' if approval.state is S.INTERRUPTED else 'never started'}: "
            f"{approval.result.splitlines()[0] if approval.result else ''}",
        )
    if deps.backups is not None:
        for record in await deps.backups.sweep():
            await deps.notifier.announce(
                None,
                f":warning: Backup `{record.id}` of {record.service}/{record.component} was interrupted "
                "(the bot stopped while writing it); it is marked failed and is not restorable.",
            )


async def sweeper(deps: Deps, every: float, stop: asyncio.Event) -> None:
    """Sweep now, then every ``every`` seconds until ``stop``; a failed sweep is logged and retried."""
    while not stop.is_set():
        try:
            await sweep(deps)
        except Exception:
            log.exception("approval_sweep_failed")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every)


class IdArgs(CommandArgs):
    positional = ("approval_id",)
    approval_id: str = Field(max_length=64)


@subcommand("approvals", help="Pending requests you may approve or cancel", risk=Risk.READ, args=NoArgs)
async def approvals(ctx: OpsContext, args: NoArgs) -> Reply:
    engine = ctx.deps.approvals
    found = await engine.actionable(ctx.user_id)
    if not found:
        text = "Nothing is waiting for you: no pending request you may approve or cancel."
        return Reply(text, [bk.section(text)], ephemeral=True)
    lines = [
        f"`{a.id}` {'*approve or deny*' if may else '_yours: cancel_'} · `/ops {a.action} {a.service}` — "
        f"{bk.escape(a.summary)} · by {mention(a.requester)}, expires {engine.when(a.expires_at)}"
        for a, may in found
    ]
    blocks = [bk.header(f"{len(found)} pending request(s)"), *bk.sections(lines)]
    blocks.append(bk.context("Use the buttons on each request, or `/ops approve|deny|cancel <id>`."))
    return Reply(f"{len(found)} pending request(s)", blocks, ephemeral=True)


async def _decide_command(ctx: OpsContext, verb: str, approval_id: str) -> Reply:
    decision, final = await decide(ctx.deps, verb, approval_id.strip().lower(), ctx.user_id, ctx.request_id)
    if decision.start_run:
        reply = result_reply(ctx.deps.approvals, final)
        reply.ephemeral = ctx.interface == "slack"  # the channel sees the edited request message
        return reply
    return Reply(decision.message, [bk.section(decision.message)], ephemeral=True)


@subcommand("approve", help="Approve a pending request (same as its Approve button)", usage="<id>",
            risk=Risk.READ, args=IdArgs)  # fmt: skip
async def approve(ctx: OpsContext, args: IdArgs) -> Reply:
    return await _decide_command(ctx, "approve", args.approval_id)


@subcommand("deny", help="Deny a pending request", usage="<id>", risk=Risk.READ, args=IdArgs)
async def deny(ctx: OpsContext, args: IdArgs) -> Reply:
    return await _decide_command(ctx, "deny", args.approval_id)


@subcommand("cancel", help="Cancel a request you made", usage="<id>", risk=Risk.READ, args=IdArgs)
async def cancel(ctx: OpsContext, args: IdArgs) -> Reply:
    return await _decide_command(ctx, "cancel", args.approval_id)
