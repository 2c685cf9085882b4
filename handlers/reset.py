"""/ops reset soft <service> and /ops reset hard <service> [--backup-first]: runbook 003's resets.

Both are destructive and need two approvers unless the inventory's approvals.commands says otherwise.
What they empty, how, and why, is in services/reset.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import Field

from handlers import blocks as bk
from handlers.context import OpsContext, Reply
from handlers.registry import CommandArgs, resolve_service, subcommand
from services.access import Risk
from services.approvals import ApprovalEngine, Outcome, Plan, Progress
from services.backup.runner import BackupRunner
from services.errors import CommandError
from services.inventory import Inventory
from services.plan_lists import PlanLists
from services.redaction import Redactor
from services.reset import (
    CollectionTarget,
    KeyTarget,
    Mode,
    ResetScope,
    TableTarget,
    TargetCount,
    check_backups,
    collection_identities,
    files_identity,
    files_identity_now,
    key_identity,
    max_age_text,
    reset_scope,
    run_reset,
    stored_file,
    survey_collection,
    survey_database,
    survey_files,
    survey_keys,
    table_identities,
)
from services.text import ago, human_bytes

SAMPLE = 5  # files named per directory in a plan
NOTHING_LISTED = "nothing listed"


class ResetArgs(CommandArgs):
    positional = ("service",)
    service: str = Field(max_length=64)


class HardResetArgs(ResetArgs):
    backup_first: bool = False


def _action(ctx: OpsContext, mode: Mode) -> RunReset:
    action = ctx.deps.approvals.actions.get(f"reset {mode}")
    if not isinstance(action, RunReset):
        raise RuntimeError(f"the reset {mode} action is not registered with the approval engine")
    return action


# -- facts: the identities of the targets and the state of the backups ---------------------------


async def backup_facts(runner: BackupRunner | None, scope: ResetScope, take_first: bool) -> dict[str, str]:
    """A hard reset's backup facts: per backed-up component, whether a young enough verified backup exists."""
    if scope.mode != "hard":
        return {}
    if take_first:
        return {"backups": "taken and verified by the run, before it deletes anything"}
    if runner is None:
        return {"backups": "backups are not set up in this bot"}
    checks = await check_backups(runner, scope.service, scope.settings.backup_max_age)
    return {f"backup {c.component}": c.fact for c in checks}


async def identities_now(
    scope: ResetScope, files: Mapping[str, Mapping[str, Any]], lists: PlanLists, redactor: Redactor
) -> dict[str, str]:
    """Every target's identity as it is now (the same strings a plan records)."""
    found: dict[str, str] = {}
    for component, tables in scope.databases.items():
        found.update(await table_identities(component, tables, redactor))
    found.update(await collection_identities(scope.collections, redactor))
    found.update({t.label: key_identity(t) for t in scope.keys})
    for target in scope.files:
        listed = files.get(target.label)
        found[target.label] = (
            await files_identity_now(target, str(listed["ref"]), lists) if listed is not None else NOTHING_LISTED
        )
    return found


# -- the plan ------------------------------------------------------------------------------------


async def _survey(scope: ResetScope, redactor: Redactor) -> list[TargetCount]:
    """Counts of every database, collection and key pattern, read concurrently; the first problem refuses."""
    seconds = scope.settings.count_seconds
    work = [
        survey_database(component, tables, count_seconds=seconds, redactor=redactor)
        for component, tables in scope.databases.items()
    ]
    work += [_one(survey_collection(t, count_seconds=seconds, redactor=redactor)) for t in scope.collections]
    work += [_one(survey_keys(t, seconds=seconds, redactor=redactor)) for t in scope.keys]
    results = await asyncio.gather(*work, return_exceptions=True)
    counts: list[TargetCount] = []
    for result in results:
        if isinstance(result, BaseException):
            raise result
        counts += result
    order = {t.label: i for i, t in enumerate(scope.targets)}
    return sorted(counts, key=lambda c: order[c.target.label])


async def _one(work: Any) -> list[TargetCount]:
    return [await work]


def _count_line(count: TargetCount) -> str:
    target = count.target
    if isinstance(target, TableTarget):
        what = " — the job queue" if target.jobs else ""
        return f"{target.label}{what}: {count.text}"
    if isinstance(target, CollectionTarget):
        return f"{target.label}: {count.text}; its config and payload indexes are kept"
    return f"{target.label}: {count.text}"


def _total(counts: Sequence[TargetCount], noun: str, kind: type) -> str | None:
    mine = [c for c in counts if isinstance(c.target, kind)]
    if not mine:
        return None
    number = sum(c.number or 0 for c in mine)
    inexact = [c for c in mine if not c.exact]
    prefix = ("at least " if kind is KeyTarget else "about ") if inexact else ""
    label = {TableTarget: "table(s)", CollectionTarget: "collection(s)", KeyTarget: "key pattern(s)"}[kind]
    return f"{len(mine)} {label} ({prefix}{number:,} {noun})"


async def plan_reset(ctx: OpsContext, service_name: str, mode: Mode, take_first: bool) -> Reply | Plan:
    inventory = ctx.deps.inventory
    redactor = ctx.deps.redactor
    service = resolve_service(inventory, service_name)
    scope = reset_scope(inventory, service, mode)
    action = _action(ctx, mode)
    runner = ctx.deps.backups
    if mode == "hard" and runner is None:
        raise CommandError(
            "Backups are not set up in this bot, so a hard reset can neither check nor take one; nothing was planned."
        )
    counts = await _survey(scope, redactor)
    lines = [_count_line(c) for c in counts]
    facts = {c.target.label: c.identity for c in counts}
    files_params: dict[str, dict[str, Any]] = {}
    file_count = file_bytes = 0
    for target in scope.files:
        found = await asyncio.to_thread(survey_files, target)
        facts[target.label] = NOTHING_LISTED
        if found.refused is not None:
            lines.append(f"{target.label}: skipped, nothing there will be deleted — {found.refused}")
            continue
        skipped = found.left_alone(SAMPLE)
        if not found.files:
            lines.append(f"{target.label}: no file{skipped}")
            continue
        saved = await action.lists.save([stored_file(f) for f in found.files])
        size = found.size
        lines.append(
            f"{target.label}: {len(found.files):,} file(s), {human_bytes(size)}{found.more()}: "
            f"{found.sample(SAMPLE)}{skipped}"
        )
        files_params[target.label] = {"ref": saved.ref, "root_id": found.root_id, "count": saved.count}
        facts[target.label] = files_identity(found.root_id, saved.ref, saved.count)
        file_count += saved.count
        file_bytes += size
    if all(c.empty for c in counts) and not file_count:
        text = f"Nothing to reset in `{service}`: every target of a {mode} reset is empty now."
        return Reply(text, [bk.section(text), *bk.sections([bk.escape(line) for line in lines])], ephemeral=True)
    if mode == "hard" and not take_first and runner is not None:
        checks = await check_backups(runner, service, scope.settings.backup_max_age)
        problems = [c.problem for c in checks if c.problem is not None]
        if problems:
            raise CommandError(
                f"Hard reset of `{service}` refused: {'; '.join(problems)} — it needs a good, verified backup of each "
                f"younger than {max_age_text(scope.settings.backup_max_age)}. Take them with `/ops backup {service}` "
                f"and `/ops backup verify <id>`, or ask with `--backup-first`; nothing was planned."
            )
    facts.update(await backup_facts(runner, scope, take_first))
    details = [*lines, *_how(scope), *(await _safety(scope, runner, take_first))]
    parts = [
        p
        for p in (
            _total(counts, "rows", TableTarget),
            _total(counts, "points", CollectionTarget),
            _total(counts, "keys", KeyTarget),
            f"{len(files_params)} directory(ies) ({file_count:,} files, {human_bytes(file_bytes)})"
            if files_params
            else None,
        )
        if p is not None
    ]
    keep = f"; keeps {', '.join(scope.keep)}" if scope.keep else ""
    first = " after backing up and verifying first" if take_first else ""
    return Plan(
        action=f"reset {mode}",
        service=service,
        summary=f"{mode.capitalize()} reset of {service}{first}: empty {', '.join(parts)}{keep}",
        details=tuple(details),
        params={
            "backup_first": take_first,
            "files": files_params,
            "counts": {c.target.label: c.number for c in counts},
        },
        facts=facts,
        count=sum(c.number or 0 for c in counts) + file_count,
    )


def _how(scope: ResetScope) -> list[str]:
    how = [
        "How: tables with DELETE in the order above, one transaction per database (all of a database or none); "
        "collections point by point (never re-created); Redis keys with SCAN + UNLINK; files exactly as listed, "
        "each only if unchanged. What the targets hold when the run starts is deleted: the counts are from now."
    ]
    if scope.keep:
        how.append(f"Kept: {', '.join(scope.keep)}.")
    return how


async def _safety(scope: ResetScope, runner: BackupRunner | None, take_first: bool) -> list[str]:
    """What can be restored afterwards and from where, and what cannot (said plainly)."""
    service = scope.service
    lost: list[str] = []
    if scope.keys:
        lost.append("Redis keys (a cache: the app rebuilds it)")
    if scope.files:
        lost.append("temp files")
    lines: list[str] = []
    if scope.mode == "soft":
        if scope.databases:
            lost.insert(0, f"table rows, except from a backup (`/ops backup list {service}`)")
        if scope.collections:
            lost.append("vectors (a soft reset takes no snapshot: they are rebuilt by re-indexing)")
    else:
        components = list(runner.components(service)) if runner is not None else []
        if take_first:
            lines.append(
                "Backups: the run first backs up and verifies "
                + (", ".join(f"`{c}`" for c in components) or "nothing (opsbot backs up no component of it)")
                + "; if one fails, nothing is deleted."
            )
        elif runner is not None:
            now = runner.clock()
            if not components:
                lines.append(f"Backups: opsbot backs up no component of {service}; nothing of it can be restored.")
            for check in await check_backups(runner, service, scope.settings.backup_max_age):
                if check.record is not None:
                    lines.append(
                        f"Backup of {check.component}: `{check.record.id}` taken {ago(now - check.record.started_at)}, "
                        "verified — restore with `/ops restore`."
                    )
        if scope.collections:
            strict = (
                "if one cannot be made, nothing is deleted"
                if scope.settings.require_snapshot
                else "where the server cannot make one, the reset goes on and those vectors can only be rebuilt by "
                "re-indexing"
            )
            lines.append(f"Qdrant: a snapshot of each collection is taken first; {strict}.")
    if lost:
        lines.append("Cannot be restored afterwards: " + "; ".join(lost) + ".")
    return lines


@subcommand(
    "reset soft",
    help="Empty what the service's reset section declares, keeping what it keeps (runbook 003); needs two approvals",
    usage="<service>",
    risk=Risk.DESTRUCTIVE,
    args=ResetArgs,
)
async def reset_soft(ctx: OpsContext, args: ResetArgs) -> Reply | Plan:
    return await plan_reset(ctx, args.service, "soft", False)


@subcommand(
    "reset hard",
    help="Empty everything the reset section declares; needs fresh verified backups (or --backup-first) "
    "and two approvals",
    usage="<service> [--backup-first]",
    risk=Risk.DESTRUCTIVE,
    args=HardResetArgs,
)
async def reset_hard(ctx: OpsContext, args: HardResetArgs) -> Reply | Plan:
    return await plan_reset(ctx, args.service, "hard", args.backup_first)


# -- the run -------------------------------------------------------------------------------------


class RunReset:
    """Runs an approved reset: identities checked (drift), then the run of services/reset.py."""

    def __init__(
        self, mode: Mode, inventory: Inventory, redactor: Redactor, lists: PlanLists, backups: BackupRunner | None
    ) -> None:
        self.mode: Mode = mode
        self.inventory = inventory
        self.redactor = redactor
        self.lists = lists
        self.backups = backups

    def _scope(self, plan: Plan) -> ResetScope:
        if plan.service not in self.inventory.services:
            raise CommandError(f"`{plan.service}` is no longer in the inventory; nothing was deleted.")
        return reset_scope(self.inventory, plan.service, self.mode)

    async def observe(self, plan: Plan) -> Mapping[str, str]:
        try:
            scope = self._scope(plan)
        except CommandError as exc:
            return {"reset": exc.message}
        files = dict(plan.params.get("files", {}))
        facts = await identities_now(scope, files, self.lists, self.redactor)
        facts.update(await backup_facts(self.backups, scope, bool(plan.params.get("backup_first"))))
        return facts

    async def execute(self, plan: Plan, progress: Progress) -> Outcome:
        scope = self._scope(plan)
        ledger = await run_reset(
            scope,
            identities=plan.facts,
            files=dict(plan.params.get("files", {})),
            lists=self.lists,
            runner=self.backups,
            take_backups=bool(plan.params.get("backup_first")),
            requested_by=f"reset {self.mode} {plan.service}",
            redactor=self.redactor,
            progress=progress,
        )
        counted = len(ledger.done)
        keep = f"; kept {', '.join(scope.keep)}" if scope.keep else ""
        summary = f"{self.mode.capitalize()} reset of {plan.service} done: {counted} target(s) emptied{keep}."
        return Outcome(summary, (*ledger.done, *ledger.notes))


def register_reset_actions(
    engine: ApprovalEngine, inventory: Inventory, redactor: Redactor, lists: PlanLists, backups: BackupRunner | None
) -> None:
    """The code behind `/ops reset soft` and `/ops reset hard`."""
    engine.register("reset soft", RunReset("soft", inventory, redactor, lists, backups))
    engine.register("reset hard", RunReset("hard", inventory, redactor, lists, backups))
