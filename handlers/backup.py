"""/ops backup, /ops backup list, /ops backup verify and /ops restore (every runbook's backup section)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime

from pydantic import Field

from handlers import blocks as bk
from handlers.context import Block, OpsContext, Reply
from handlers.registry import CommandArgs, clip_token, resolve_service, subcommand
from services.access import Risk
from services.approvals import Outcome, Plan, Progress
from services.backup.base import BackupError
from services.backup.runner import BackupProgress, BackupRunner
from services.errors import CommandError
from services.health import Status
from services.state import BackupRecord, BackupState
from services.text import ago, size

LISTED = 15  # backups shown by /ops backup list
BACKUP_ID = r"^[a-z0-9][a-z0-9_-]{0,127}$"

HealthCheck = Callable[[str], Awaitable[tuple[Status, list[str]]]]


def seconds(value: float | None) -> str:
    if value is None:
        return "?"
    return f"{value:.1f} s" if value < 120 else f"{value / 60:.1f} min"


def runner_of(ctx: OpsContext) -> BackupRunner:
    if ctx.deps.backups is None:
        raise CommandError("Backups are not set up in this bot.")
    return ctx.deps.backups


def _targets(runner: BackupRunner, service: str, component: str | None) -> list[str]:
    """The components of ``service`` that ``/ops backup`` covers, or a clear refusal."""
    found = runner.components(service)
    if not found:
        raise CommandError(
            f"`{service}` has nothing opsbot can back up (a postgres, mongodb, sqlite, files or cloudsql component)."
        )
    if component is None:
        return list(found)
    if component not in found:
        known = ", ".join(f"`{c}`" for c in found)
        raise CommandError(f"`{service}` has no component `{clip_token(component)}` to back up; known: {known}.")
    return [component]


def _done_line(record: BackupRecord) -> str:
    if record.source == "cloudsql":
        run = (record.manifest or {}).get("cloudsql", {}).get("backup_run", "?")
        return (
            f":white_check_mark: *{bk.escape(record.component)}* — Cloud SQL backup run {run} in "
            f"{seconds(record.duration)} ({bk.escape(record.location)})\n      id `{record.id}`"
        )
    return (
        f":white_check_mark: *{bk.escape(record.component)}* — {size(record.size)} in {seconds(record.duration)} "
        f"→ `{bk.escape(record.location)}`\n      id `{record.id}` · sha256 `{record.sha256}`"
    )


class BackupArgs(CommandArgs):
    positional = ("service", "component")
    service: str = Field(max_length=64)
    component: str | None = Field(None, max_length=64)


@subcommand(
    "backup",
    help="Back up a service's databases and files now, to its backup destination (streamed, checksummed)",
    usage="<service> [component]",
    risk=Risk.OPERATE,
    args=BackupArgs,
)
async def backup(ctx: OpsContext, args: BackupArgs) -> Reply:
    runner = runner_of(ctx)
    service = resolve_service(ctx.deps.inventory, args.service)
    components = _targets(runner, service, args.component)
    lines: dict[str, str] = {c: f":hourglass: *{bk.escape(c)}* — waiting" for c in components}
    title = f"Backup of {service}"

    def blocks(status: str) -> list[Block]:
        return [bk.header(title), *bk.sections(lines.values()), bk.context(status)]

    async def progress(update: BackupProgress) -> None:
        lines[update.component] = (
            f":hourglass_flowing_sand: *{bk.escape(update.component)}* — {size(update.raw_bytes)} read "
            f"in {seconds(update.elapsed)}"
        )
        note = f"{title}: {update.component} {size(update.raw_bytes)} read in {seconds(update.elapsed)}"
        await ctx.show(note, blocks(f"Requested by <@{ctx.user_id}> · running"))

    await ctx.show(f"{title}: starting ({', '.join(components)})", blocks(f"Requested by <@{ctx.user_id}> · starting"))
    done: list[BackupRecord] = []
    failed: list[str] = []
    for component in components:
        lines[component] = f":hourglass_flowing_sand: *{bk.escape(component)}* — starting"
        try:
            record = await runner.backup(
                service, component, trigger="manual", requested_by=ctx.user_id, progress=progress
            )
        except CommandError as exc:
            failed.append(component)
            lines[component] = f":red_circle: *{bk.escape(component)}* — {bk.escape(exc.message)}"
            continue
        done.append(record)
        lines[component] = _done_line(record)
    ok = not failed
    summary = f"{len(done)} backup(s) done" + (f", {len(failed)} failed: {', '.join(failed)}" if failed else "")
    emoji = ":white_check_mark:" if ok else ":rotating_light:"
    reply = Reply(
        f"{emoji} {title}: {summary}",
        blocks(f"Requested by <@{ctx.user_id}> · {summary}"),
        outcome="ok" if ok else "error",
        detail=", ".join([f"{r.id} good" for r in done] + [f"{c} failed" for c in failed]),
    )
    return reply


class ListArgs(CommandArgs):
    positional = ("service",)
    service: str = Field(max_length=64)


def _record_line(record: BackupRecord, now: datetime) -> str:
    when = f"{record.started_at:%Y-%m-%d %H:%M} UTC ({ago(now - record.started_at)})"
    base = f"`{record.id}` · {bk.escape(record.component)} · {when}"
    if record.state is BackupState.GOOD:
        checked = ""
        if record.verify_result:
            mark = ":white_check_mark:" if record.verify_result.startswith("ok") else ":x:"
            checked = f" · verified {mark}"
        extra = f" · {record.trigger}" if record.trigger != "manual" else ""
        return f":large_green_circle: {base} · {size(record.size)}{extra}{checked}"
    if record.state is BackupState.RUNNING:
        return f":hourglass_flowing_sand: {base} · running"
    return f":red_circle: {base} · failed: {bk.escape(record.error[:200])}"


@subcommand(
    "backup list",
    help="A service's backups, newest first, with age and size; warns when the newest is overdue",
    usage="<service>",
    risk=Risk.READ,
    args=ListArgs,
)
async def backup_list(ctx: OpsContext, args: ListArgs) -> Reply:
    runner = runner_of(ctx)
    service = resolve_service(ctx.deps.inventory, args.service)
    components = runner.components(service)
    if not components:
        raise CommandError(f"`{service}` has nothing opsbot backs up.")
    await runner.sweep(service=service)  # a backup whose process died shows as failed, not running forever
    records = [r for r in await runner.listing(service, limit=100) if r.state is not BackupState.DELETED]
    managed: list[BackupRecord] = []
    for instance_runs in (await runner.cloudsql_runs(service)).values():
        managed += instance_runs
    now = runner.clock()
    expected = runner.expected_every(service)
    warnings: list[str] = []
    for component in components:
        newest = max(
            (r for r in records + managed if r.component == component and r.state is BackupState.GOOD),
            key=lambda r: r.started_at,
            default=None,
        )
        if newest is None:
            warnings.append(f":warning: *{bk.escape(component)}* has no good backup yet.")
        elif now - newest.started_at > expected:
            warnings.append(
                f":warning: *{bk.escape(component)}*: the newest good backup is {ago(now - newest.started_at)}, "
                f"older than the expected {expected.total_seconds() / 3600:g} h."
            )
    lines = [_record_line(r, now) for r in records[:LISTED]]
    if len(records) > LISTED:
        lines.append(f"… and {len(records) - LISTED} older")
    if managed:
        lines.append("*Cloud SQL backup runs* (restore one with `/ops restore " + service + " <run id>`):")
        lines += [_record_line(r, now) for r in managed[:LISTED]]
    destination = runner.destination_name(service)
    blocks = (
        [bk.header(f"Backups of {service}"), *bk.sections(warnings)]
        if warnings
        else [bk.header(f"Backups of {service}")]
    )
    blocks += bk.sections(lines or ["No backups yet."])
    blocks.append(bk.context(f"Destination: {destination} · `/ops backup verify <id>` re-checks one"))
    text = f"Backups of {service}: {len(records)}" + (f"; {len(warnings)} warning(s)" if warnings else "")
    return Reply(text, blocks, ephemeral=True, status=Status.WARNING if warnings else Status.HEALTHY)


class VerifyArgs(CommandArgs):
    positional = ("backup_id",)
    backup_id: str = Field(max_length=128, pattern=BACKUP_ID)


@subcommand(
    "backup verify",
    help="Re-read a backup: its sha256, its manifest, and its content (it parses, counts match)",
    usage="<backup-id>",
    risk=Risk.OPERATE,
    args=VerifyArgs,
)
async def backup_verify(ctx: OpsContext, args: VerifyArgs) -> Reply:
    runner = runner_of(ctx)
    found = await runner.get(args.backup_id)  # an unknown id is one refusal, with no progress line before it
    if found.state is not BackupState.GOOD:
        raise CommandError(f"Backup `{found.id}` is {found.state.value}, not good: there is nothing to verify.")
    await ctx.tell(f":hourglass_flowing_sand: Re-reading backup `{found.id}`…")
    result = await runner.verify(found.id)
    record = result.record
    if result.ok:
        text = f":white_check_mark: Backup `{record.id}` is good: {result.summary}"
        return Reply(text, [bk.section(bk.escape(text))], ephemeral=True, detail=result.summary)
    text = f":rotating_light: Backup `{record.id}` ({record.service}/{record.component}) FAILED verification: "
    text += result.summary
    blocks = [bk.section(bk.escape(text)), bk.context(f"Checked by <@{ctx.user_id}> · {record.location}")]
    return Reply(text, blocks, outcome="error", detail=result.summary)


class RestoreArgs(CommandArgs):
    positional = ("service", "backup_id", "component")
    service: str = Field(max_length=64)
    backup_id: str = Field(max_length=128, pattern=BACKUP_ID)
    component: str | None = Field(None, max_length=64)


def restore_facts(record: BackupRecord) -> dict[str, str]:
    if record.source == "cloudsql":
        return {f"backup {record.id}": f"{record.state.value} {(record.manifest or {}).get('cloudsql', {})}"}
    return {f"backup {record.id}": f"{record.state.value} sha256 {record.sha256}"}


@subcommand(
    "restore",
    help="Overwrite a component's data from a backup (a safety backup is taken first); needs approval",
    usage="<service> <backup-id> [component]",
    risk=Risk.DESTRUCTIVE,
    args=RestoreArgs,
)
async def restore(ctx: OpsContext, args: RestoreArgs) -> Reply | Plan:
    runner = runner_of(ctx)
    service = resolve_service(ctx.deps.inventory, args.service)
    record = await runner.find(service, args.backup_id, args.component)
    if record.service != service:
        raise CommandError(f"Backup `{record.id}` belongs to `{record.service}`, not `{service}`: nothing was planned.")
    if args.component is not None and args.component != record.component:
        raise CommandError(
            f"Backup `{record.id}` is of `{record.component}`, not `{clip_token(args.component)}`: nothing was planned."
        )
    if record.state is not BackupState.GOOD:
        raise CommandError(f"Backup `{record.id}` is {record.state.value}, not good: it cannot be restored.")
    spec = runner.components(service).get(record.component)
    if spec is None or spec.type != record.source:
        raise CommandError(f"`{service}/{record.component}` is no longer a {record.source} component.")
    target = runner.describe(spec)
    now = runner.clock()
    verified = f"last verified {record.verify_result}" if record.verify_result else "not verified since it was taken"
    return Plan(
        action="restore",
        service=service,
        summary=(
            f"Restore {service}/{record.component} from backup `{record.id}` taken {ago(now - record.started_at)} "
            f"({size(record.size)}): its current data is overwritten"
        ),
        details=(
            f"Overwrites: {target}",
            f"Backup: `{record.id}` taken {record.started_at:%Y-%m-%d %H:%M} UTC ({ago(now - record.started_at)}), "
            f"{size(record.size)}, sha256 {record.sha256}, {verified}"
            if record.source != "cloudsql"
            else f"Backup: Cloud SQL backup run `{record.id}` taken {record.started_at:%Y-%m-%d %H:%M} UTC",
            "First: a safety backup of the current data "
            + (
                "(an on-demand Cloud SQL backup)"
                if record.source == "cloudsql"
                else f"to `{runner.destination_name(service)}`"
            ),
            f"After: the checksum is checked before restoring, then the health checks of {service} run",
        ),
        params={"backup_id": record.id, "component": record.component},
        facts=restore_facts(record),
    )


class RestoreBackup:
    """Runs an approved restore: safety backup, checksum, restore, health check."""

    def __init__(self, runner: BackupRunner, health: HealthCheck) -> None:
        self.runner = runner
        self.health = health

    async def observe(self, plan: Plan) -> Mapping[str, str]:
        backup_id = str(plan.params["backup_id"])
        try:
            record = await self.runner.find(plan.service, backup_id, str(plan.params["component"]))
        except CommandError:
            return {f"backup {backup_id}": "gone"}
        return restore_facts(record)

    async def execute(self, plan: Plan, progress: Progress) -> Outcome:
        record = await self.runner.find(plan.service, str(plan.params["backup_id"]), str(plan.params["component"]))
        service, component = record.service, record.component

        async def backup_progress(update: BackupProgress) -> None:
            await progress(f"Safety backup of {service}/{component}: {size(update.raw_bytes)} read…")

        await progress(f"Taking a safety backup of {service}/{component}…")
        try:
            safety = await self.runner.backup(
                service, component, trigger="safety", requested_by=f"restore {record.id}", progress=backup_progress
            )
        except CommandError as exc:
            raise CommandError(f"The safety backup failed, so nothing was restored: {exc.message}") from None
        await progress(f"Restoring {service}/{component} from `{record.id}`…")
        try:
            restored = await self.runner.restore(record)
        except BackupError as exc:
            raise BackupError(f"{exc.message} The safety backup is `{safety.id}`.") from None
        await progress(f"Restored; checking the health of {service}…")
        status, problems = await self.health(service)
        details = (
            f"Restored: {restored}",
            f"Safety backup of the data before: `{safety.id}` ({size(safety.size)}) at {safety.location}",
            f"Health of {service} after: {status.label}",
            *problems,
        )
        if status is Status.HEALTHY:
            return Outcome(f"Restored {service}/{component} from `{record.id}`; {service} is healthy.", details)
        return Outcome(
            f"Restored {service}/{component} from `{record.id}`, but {service} is {status.label} afterwards — "
            f"look now (`/ops health {service}`); the data from before is in `{safety.id}`.",
            details,
            ok=False,
        )
