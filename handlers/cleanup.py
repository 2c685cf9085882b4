"""/ops cleanup <service> and /ops reindex <service> <collection>: runbook 001's database and file upkeep."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from pydantic import Field

from handlers import blocks as bk
from handlers.context import OpsContext, Reply
from handlers.registry import CommandArgs, clip_token, resolve_service, subcommand
from services.access import Risk
from services.approvals import Outcome, Plan, Progress
from services.cleanup import DeletionInterrupted, DocumentCleaner, DocumentScan, MongoAccess, describe_rule
from services.errors import CommandError
from services.files import FileScan, PlannedFile, RootRefused, delete_planned, root_identity, scan
from services.inventory import DocumentCleanupRule, FileCleanupRule, Inventory, MongoComponent
from services.plan_lists import PlanLists
from services.redaction import Redactor
from services.reindex import IndexRebuilder, index_facts
from services.text import human_bytes

# Documents or files one rule may delete per approval (the oldest): the lists live beside the approval
# (services/plan_lists.py), this bounds the bot's memory; the rest wait for the next request.
PLAN_LIMIT = 100_000
SAMPLE = 5  # paths or ids shown per rule in a plan


class CleanupArgs(CommandArgs):
    positional = ("service",)
    service: str = Field(max_length=64)


class ReindexArgs(CommandArgs):
    positional = ("service", "collection")
    service: str = Field(max_length=64)
    collection: str = Field(max_length=120, pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,119}$")
    component: str | None = Field(None, max_length=64)


# -- the rules of a service ----------------------------------------------------------------------


@dataclass(frozen=True)
class DocumentTarget:
    component: str
    spec: MongoComponent
    rule: DocumentCleanupRule

    def definition(self) -> str:
        return f"delete documents of {self.component}: {describe_rule(self.rule)}"


@dataclass(frozen=True)
class FileTarget:
    root_name: str
    root: Path
    rule: FileCleanupRule

    @property
    def directory(self) -> str:
        return f"{self.root}/{self.rule.path}".rstrip("/") if self.rule.path else str(self.root)

    def definition(self) -> str:
        depth = "" if self.rule.recursive else " (not below)"
        return (
            f"delete files {self.rule.match} under {self.root_name}:{self.directory}{depth} "
            f"older than {self.rule.older_than_days} days"
        )


Target = DocumentTarget | FileTarget


def cleanup_targets(inventory: Inventory, service: str) -> list[Target]:
    """The service's cleanup rules in inventory order: document rules by component, then file rules."""
    spec = inventory.services[service]
    targets: list[Target] = [
        DocumentTarget(name, component, rule)
        for name, component in spec.components.items()
        if isinstance(component, MongoComponent)
        for rule in component.cleanup
    ]
    targets += [FileTarget(r.root, spec.cleanup.roots[r.root], r) for r in spec.cleanup.files]
    return targets


def _find(inventory: Inventory, service: str, rule: str) -> Target | None:
    if service not in inventory.services:
        return None
    return next((t for t in cleanup_targets(inventory, service) if t.rule.name == rule), None)


def _when(moment: datetime | None) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d") if moment is not None else "?"


# -- /ops cleanup ----------------------------------------------------------------------------------


@dataclass
class _RulePlan:
    """One rule's part of a plan: a line for people, its params and facts (None: nothing to do)."""

    line: str
    params: dict[str, Any] | None = None
    facts: dict[str, str] | None = None
    count: int = 0
    size: int = 0


def _list_fact(ref: str, count: int) -> str:
    return f"{count} listed, list {ref}"


async def _list_now(lists: PlanLists, ref: str) -> str:
    """The plan-time fact of a saved list if it is still there and intact, else why not."""
    try:
        return _list_fact(ref, len(await lists.load(ref)))
    except CommandError as exc:
        return exc.message


def _stored_file(planned: PlannedFile) -> str:
    return json.dumps(planned.stored(), separators=(",", ":"), ensure_ascii=False)


def _files_of(stored: Sequence[str]) -> list[PlannedFile]:
    return [PlannedFile.from_stored(json.loads(item)) for item in stored]


async def _plan_documents(target: DocumentTarget, redactor: Redactor, now: datetime, lists: PlanLists) -> _RulePlan:
    rule = target.rule
    found: DocumentScan = await DocumentCleaner(MongoAccess(target.spec, redactor)).scan(
        rule, now=now, limit=PLAN_LIMIT
    )
    where = f"{target.component}/{rule.collection}"
    if not found.ids:
        return _RulePlan(f"{rule.name}: nothing — no document of {describe_rule(rule)}")
    more = (
        f" (the oldest {len(found.ids):,} of {found.total:,}; ask again for the rest)"
        if found.total > len(found.ids)
        else ""
    )
    line = (
        f"{rule.name}: delete {len(found.ids):,} document(s) of {where} — {describe_rule(rule)}{more}; "
        f"created {_when(found.oldest)} … {_when(found.newest)}"
    )
    saved = await lists.save(found.ids)
    params = {
        "rule": rule.name,
        "kind": "documents",
        "component": target.component,
        "collection": rule.collection,
        "cutoff": found.cutoff.isoformat(),
        "ids_ref": saved.ref,
        "count": saved.count,
        "total": found.total,
    }
    facts = {f"rule {rule.name}": target.definition(), f"rule {rule.name} plan": _list_fact(saved.ref, saved.count)}
    return _RulePlan(line, params, facts, count=saved.count)


async def _plan_files(target: FileTarget, now: datetime, lists: PlanLists) -> _RulePlan:
    rule = target.rule
    try:
        found: FileScan = await asyncio.to_thread(
            scan,
            target.root,
            under=rule.path,
            match=rule.match,
            older_than=now - timedelta(days=rule.older_than_days),
            recursive=rule.recursive,
            limit=PLAN_LIMIT,
        )
    except RootRefused as exc:
        return _RulePlan(f"{rule.name}: skipped — {exc.message}")
    skipped = found.left_alone(SAMPLE)
    if not found.files:
        return _RulePlan(f"{rule.name}: nothing — no file {rule.match} older than {rule.older_than_days} days "
                         f"in {target.directory}{skipped}")  # fmt: skip
    size = found.size
    line = (
        f"{rule.name}: delete {len(found.files):,} file(s), {human_bytes(size)}, {rule.match} older than "
        f"{rule.older_than_days} days in {target.directory}{found.more()}: {found.sample(SAMPLE)}{skipped}"
    )
    saved = await lists.save([_stored_file(f) for f in found.files])
    params = {
        "rule": rule.name,
        "kind": "files",
        "root": found.root,
        "root_id": found.root_id,
        "files_ref": saved.ref,
        "count": saved.count,
        "total": found.total,
    }
    facts = {
        f"rule {rule.name}": target.definition(),
        f"rule {rule.name} root": f"{found.root} ({found.root_id})",
        f"rule {rule.name} plan": _list_fact(saved.ref, saved.count),
    }
    return _RulePlan(line, params, facts, count=len(found.files), size=size)


def _runs(ctx: OpsContext) -> RunCleanup:
    runs = ctx.deps.approvals.actions.get("cleanup")
    if not isinstance(runs, RunCleanup):
        raise RuntimeError("the cleanup action is not registered with the approval engine")
    return runs


@subcommand(
    "cleanup",
    help="Delete old documents and files by the service's cleanup rules (runbook 001); needs approval",
    usage="<service>",
    risk=Risk.DESTRUCTIVE,
    args=CleanupArgs,
)
async def cleanup(ctx: OpsContext, args: CleanupArgs) -> Reply | Plan:
    inventory = ctx.deps.inventory
    service = resolve_service(inventory, args.service)
    targets = cleanup_targets(inventory, service)
    if not targets:
        raise CommandError(
            f"`{service}` has no cleanup rules in the inventory "
            "(`cleanup:` on a mongodb component, or `cleanup.files`)."
        )
    now = datetime.now(UTC)
    lists = _runs(ctx).lists
    parts = [
        await (
            _plan_documents(t, ctx.deps.redactor, now, lists)
            if isinstance(t, DocumentTarget)
            else _plan_files(t, now, lists)
        )
        for t in targets
    ]
    planned = [p for p in parts if p.params is not None]
    if not planned:
        text = f"Nothing to clean up in `{service}`: no rule selects anything now."
        return Reply(text, [bk.section(text), *bk.sections([bk.escape(p.line) for p in parts])], ephemeral=True)
    documents = sum(p.count for p in planned if p.params and p.params["kind"] == "documents")
    files = sum(p.count for p in planned if p.params and p.params["kind"] == "files")
    what = [f"{documents:,} document(s)"] if documents else []
    if files:
        what.append(f"{files:,} file(s) ({human_bytes(sum(p.size for p in planned))})")
    facts: dict[str, str] = {}
    for part in planned:
        facts.update(part.facts or {})
    return Plan(
        action="cleanup",
        service=service,
        summary=f"Delete {' and '.join(what)} from {service} by {len(planned)} cleanup rule(s)",
        details=tuple(p.line for p in parts),
        params={"rules": [p.params for p in planned]},
        facts=facts,
        count=documents + files,
    )


class RunCleanup:
    """Runs an approved cleanup: per rule, exactly the planned documents and files, nothing else."""

    def __init__(self, inventory: Inventory, redactor: Redactor, lists: PlanLists) -> None:
        self.inventory = inventory
        self.redactor = redactor
        self.lists = lists

    async def observe(self, plan: Plan) -> Mapping[str, str]:
        facts: dict[str, str] = {}
        for params in plan.params.get("rules", []):
            name = str(params["rule"])
            target = _find(self.inventory, plan.service, name)
            if isinstance(target, DocumentTarget) and params["kind"] == "documents":
                facts[f"rule {name}"] = target.definition()
                facts[f"rule {name} plan"] = await _list_now(self.lists, str(params["ids_ref"]))
            elif isinstance(target, FileTarget) and params["kind"] == "files":
                facts[f"rule {name}"] = target.definition()
                try:
                    root, root_id = await asyncio.to_thread(root_identity, target.root)
                    facts[f"rule {name} root"] = f"{root} ({root_id})"
                except RootRefused as exc:
                    facts[f"rule {name} root"] = f"refused: {exc.message}"
                facts[f"rule {name} plan"] = await _list_now(self.lists, str(params["files_ref"]))
            else:
                facts[f"rule {name}"] = "no longer in the inventory"
        return facts

    async def execute(self, plan: Plan, progress: Progress) -> Outcome:
        rules = list(plan.params.get("rules", []))
        lines: list[str] = []
        documents = files = freed = 0
        for index, params in enumerate(rules):
            name = str(params["rule"])
            target = _find(self.inventory, plan.service, name)
            await progress(f"Rule {index + 1} of {len(rules)}: {name}…")
            try:
                if isinstance(target, DocumentTarget):
                    deleted = await self._documents(target, params, progress)
                    documents += deleted
                    planned = int(params["count"])
                    gone = (
                        f"; {planned - deleted:,} no longer matched or were already gone" if deleted < planned else ""
                    )
                    lines.append(
                        f"{name}: deleted {deleted:,} of {planned:,} planned document(s) "
                        f"from {target.component}/{target.rule.collection}{gone}"
                    )
                elif isinstance(target, FileTarget):
                    line, count, size = await self._files(target, params)
                    lines.append(line)
                    files += count
                    freed += size
            except DeletionInterrupted as exc:
                rest = [str(r["rule"]) for r in rules[index + 1 :]]
                raise CommandError(
                    "\n".join(
                        [
                            f"cleanup of {plan.service} stopped at rule {name}: {exc.message}.",
                            *[f"done before it — {line}" for line in lines],
                            f"not started: {', '.join(rest)}" if rest else "no rule was left to start.",
                        ]
                    )
                ) from None
        kinds = {r["kind"] for r in rules}
        what = " and ".join(
            ([f"{documents:,} document(s)"] if "documents" in kinds else [])
            + ([f"{files:,} file(s) ({human_bytes(freed)})"] if "files" in kinds else [])
        )
        return Outcome(f"Cleaned up {plan.service}: deleted {what}.", tuple(lines))

    async def _documents(self, target: DocumentTarget, params: Mapping[str, Any], progress: Progress) -> int:
        ids = await self.lists.load(str(params["ids_ref"]))
        cutoff = datetime.fromisoformat(str(params["cutoff"]))

        async def step(deleted: int) -> None:
            await progress(f"{target.rule.name}: {deleted:,} of {len(ids):,} document(s) deleted…")

        cleaner = DocumentCleaner(MongoAccess(target.spec, self.redactor))
        return await cleaner.delete(target.rule, ids, cutoff, progress=step)

    async def _files(self, target: FileTarget, params: Mapping[str, Any]) -> tuple[str, int, int]:
        """One file rule run: its line, how many files were deleted and how many bytes freed."""
        name = target.rule.name
        planned = _files_of(await self.lists.load(str(params["files_ref"])))
        try:
            done = await asyncio.to_thread(delete_planned, target.root, str(params["root_id"]), planned)
        except RootRefused as exc:
            return f"{name}: skipped, nothing deleted — {exc.message}", 0, 0
        line = (
            f"{name}: deleted {len(done.deleted):,} of {len(planned):,} planned file(s) "
            f"({human_bytes(done.freed)}) in {target.directory}"
        )
        if done.skipped:
            shown = "; ".join(done.skipped[:20]) + (" …" if len(done.skipped) > 20 else "")
            line += f"; kept {len(done.skipped):,}: {shown}"
        return line, len(done.deleted), done.freed


# -- /ops reindex ----------------------------------------------------------------------------------


def mongo_component(inventory: Inventory, service: str, component: str | None) -> tuple[str, MongoComponent]:
    """The MongoDB component of ``service`` (or the one named)."""
    found = {n: c for n, c in inventory.services[service].components.items() if isinstance(c, MongoComponent)}
    if not found:
        raise CommandError(f"`{service}` has no MongoDB component in the inventory.")
    if component is None:
        if len(found) > 1:
            raise CommandError(f"`{service}` has several MongoDB components; name one with `--component`: "
                               f"{', '.join(f'`{c}`' for c in found)}.")  # fmt: skip
        return next(iter(found.items()))
    if component not in found:
        raise CommandError(
            f"`{service}` has no MongoDB component called `{clip_token(component)}`; "
            f"known: {', '.join(f'`{c}`' for c in found)}."
        )
    return component, found[component]


@subcommand(
    "reindex",
    help="Rebuild a MongoDB collection's indexes: drop and re-create each from its spec; needs approval",
    usage="<service> <collection> [--component name]",
    risk=Risk.CHANGE,
    args=ReindexArgs,
)
async def reindex(ctx: OpsContext, args: ReindexArgs) -> Reply | Plan:
    inventory = ctx.deps.inventory
    service = resolve_service(inventory, args.service)
    component, spec = mongo_component(inventory, service, args.component)
    specs = await IndexRebuilder(MongoAccess(spec, ctx.deps.redactor)).indexes(args.collection)
    rebuilt = [s.name for s in specs if s.rebuildable]
    if not rebuilt:
        text = f"`{bk.escape(args.collection)}` has only the `_id_` index: nothing to rebuild."
        return Reply(text, [bk.section(text)], ephemeral=True)
    return Plan(
        action="reindex",
        service=service,
        summary=(
            f"Rebuild {len(rebuilt)} index(es) of `{args.collection}` in {service}/{component} "
            f"(MongoDB {spec.database}): drop and re-create each from its spec, one at a time; `_id_` is kept"
        ),
        details=tuple(f"before: {s.describe()}" for s in specs),
        params={"component": component, "collection": args.collection, "indexes": rebuilt},
        facts=index_facts(specs),
    )


class RunReindex:
    """Runs an approved reindex: the planned indexes, each dropped and re-created from its spec."""

    def __init__(self, inventory: Inventory, redactor: Redactor) -> None:
        self.inventory = inventory
        self.redactor = redactor

    def _rebuilder(self, plan: Plan) -> IndexRebuilder:
        _, spec = mongo_component(self.inventory, plan.service, str(plan.params["component"]))
        return IndexRebuilder(MongoAccess(spec, self.redactor))

    async def observe(self, plan: Plan) -> Mapping[str, str]:
        return await self._rebuilder(plan).observe(str(plan.params["collection"]))

    async def execute(self, plan: Plan, progress: Progress) -> Outcome:
        collection = str(plan.params["collection"])
        names = [str(n) for n in plan.params["indexes"]]
        rebuilt = await self._rebuilder(plan).rebuild(collection, names, progress)
        details = [f"before: {s.describe()}" for s in rebuilt.before]
        details += [f"after: {s.describe()}" for s in rebuilt.after]
        differ = rebuilt.differences()
        details += [f"not the same after the rebuild — {line}" for line in differ]
        summary = f"Rebuilt {len(names)} index(es) of `{collection}`" + (
            "." if not differ else f"; {len(differ)} differ from before (see below)."
        )
        return Outcome(summary, tuple(details), ok=not differ)
