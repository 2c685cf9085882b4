"""/ops users: the app's users (runbook 000) — list them, deactivate or activate one, create an admin.

Listing is a sensitive read (per-service read permission, "users"). (De)activation changes exactly the
planned row. create-admin is done the runbook's way: the app's own Cloud Run Job, with the arguments as
execution overrides and a one-time password generated at run time, passed only in the execution's env,
shown once to the requester alone (chat.postEphemeral in the channel they asked in), and never in the
plan, the channel, the logs or the audit. The execution is deleted once it has succeeded, since its
overrides stay readable in it.
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable, Mapping
from typing import Literal

import structlog
from pydantic import Field
from slack_sdk.web.async_client import AsyncWebClient

from handlers import blocks as bk
from handlers.context import OpsContext, Reply
from handlers.registry import CommandArgs, clip_token, resolve_service, subcommand
from services.access import Risk, check_read, describe
from services.approvals import ApprovalEngine, Outcome, Plan, Progress
from services.deploy.base import DeployError
from services.deploy.cloudrun_jobs import CloudRunJob, JobOverrides
from services.deploy.providers import DeployProviders
from services.errors import CommandError, PermissionDenied
from services.inventory import CloudRunComponent, CloudRunJobRef, Inventory, PostgresComponent, Role, UsersTable
from services.redaction import Redactor
from services.users import AppUser, UsersDatabase

log = structlog.get_logger(__name__)

Whisper = Callable[[str, str, str], Awaitable[None]]
"""Show ``text`` to one user in one channel, to nobody else: (channel, user, text)."""

_STUDENT_ID = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,31}$"
FIRST_LOGIN = "it must be changed at first login (the app's create-admin job marks it so)"


class UsersArgs(CommandArgs):
    positional = ("service",)
    service: str = Field(max_length=64)
    role: str | None = Field(None, min_length=1, max_length=32)
    inactive: bool = False
    find: str | None = Field(None, min_length=1, max_length=64)
    sort: Literal["id", "tokens", "daily"] = "id"
    limit: int = Field(25, ge=1, le=100)


class UserChangeArgs(CommandArgs):
    positional = ("service", "student_id")
    service: str = Field(max_length=64)
    student_id: str = Field(pattern=_STUDENT_ID)


class CreateAdminArgs(CommandArgs):
    positional = ("service", "student_id", "name")
    service: str = Field(max_length=64)
    student_id: str = Field(pattern=_STUDENT_ID)
    name: str = Field(min_length=1, max_length=64)


def users_component(inventory: Inventory, service: str) -> tuple[str, PostgresComponent, UsersTable]:
    """The service's postgres component that declares the users table, or one plain sentence."""
    found: list[tuple[str, PostgresComponent, UsersTable]] = []
    for name, spec in inventory.services[service].components.items():
        if isinstance(spec, PostgresComponent) and spec.users is not None:
            found.append((name, spec, spec.users))
    if not found:
        raise CommandError(f"`{service}` declares no users table (a postgres component with `users:`).")
    if len(found) > 1:
        raise CommandError(f"`{service}` declares several users tables ({', '.join(f[0] for f in found)}); keep one.")
    return found[0]


def _yes(value: bool) -> str:
    return "yes" if value else "no"


def user_line(user: AppUser) -> str:
    """The user as found: id, student id, name, role, active."""
    return (
        f"id `{user.id}` · student id `{clip_token(user.student_id)}` · name {bk.escape(user.name) or '—'} · "
        f"role `{clip_token(user.role)}` · active: {_yes(user.active)}"
    )


def slack_whisper(client: AsyncWebClient) -> Whisper:
    """chat.postEphemeral: only ``user`` sees it, only in ``channel``, and Slack keeps no copy in the channel."""

    async def whisper(channel: str, user: str, text: str) -> None:
        await client.chat_postEphemeral(channel=channel, user=user, text=text, blocks=[bk.section(text)])

    return whisper


class UserRuns:
    """The code behind `users deactivate`, `users activate` and `users create-admin`, for the engine."""

    def __init__(
        self, inventory: Inventory, redactor: Redactor, providers: DeployProviders, whisper: Whisper | None
    ) -> None:
        self.inventory = inventory
        self.redactor = redactor
        self.providers = providers
        self.whisper = whisper
        self._jobs: dict[str, CloudRunJob] = {}

    def database(self, service: str) -> UsersDatabase:
        _, spec, _ = users_component(self.inventory, service)
        return UsersDatabase(service, spec, self.redactor)

    def admin_job(self, service: str) -> tuple[UsersTable, CloudRunJobRef, CloudRunJob]:
        """The app's create-admin job, on the service's cloudrun component (its client made once)."""
        _, _, table = users_component(self.inventory, service)
        ref = table.create_admin_job
        if ref is None:
            raise CommandError(f"`{service}` declares no create-admin job (`users.create_admin_job:`).")
        run = next(
            (c for c in self.inventory.services[service].components.values() if isinstance(c, CloudRunComponent)),
            None,
        )
        if run is None:
            raise CommandError(f"`{service}` has no cloudrun component to run its create-admin job on.")
        made = self._jobs.get(service)
        if made is None or made.job != ref.job:
            made = self._jobs[service] = CloudRunJob(
                ref.project or run.project, ref.region or run.region, ref.job,
                timeout=run.timeout, poll_every=ref.poll_seconds, channel_factory=self.providers.cloudrun_channel,
            )  # fmt: skip
        return table, ref, made

    # --- the engine's Action ---------------------------------------------------------------------

    async def observe(self, plan: Plan) -> Mapping[str, str]:
        db = self.database(plan.service)
        if plan.action == "users create-admin":
            student_id = str(plan.params["student_id"])
            user = await db.find(student_id)
            return {f"student id {student_id}": "no user" if user is None else f"user {user.id}"}
        now = await db.by_id(str(plan.params["user_id"]))
        return {} if now is None else now.facts()

    async def execute(self, plan: Plan, progress: Progress) -> Outcome:
        if plan.action == "users create-admin":
            return await self._create_admin(plan, progress)
        target = bool(plan.params["active"])
        planned = AppUser(
            id=str(plan.params["user_id"]),
            student_id=str(plan.params["student_id"]),
            name="",
            role="",
            active=not target,
        )
        db = self.database(plan.service)
        done = await db.set_active(planned, target)
        verb = "Activated" if target else "Deactivated"
        return Outcome(
            f"{verb} user {done.student_id} (id {done.id}) of {plan.service}: "
            f"`{db.table.active_column}` is now {str(done.active).lower()}."
        )

    async def _create_admin(self, plan: Plan, progress: Progress) -> Outcome:
        student_id, name = str(plan.params["student_id"]), str(plan.params["name"])
        requester, channel = str(plan.params["requester"]), str(plan.params["channel"])
        if self.whisper is None:
            raise CommandError("There is no Slack connection to show the one-time password on; nothing was run.")
        table, ref, job = self.admin_job(plan.service)
        password = secrets.token_urlsafe(18)
        self.redactor.add([password])  # before anything could carry it anywhere
        args = tuple(arg.format(student_id=student_id, name=name) for arg in table.create_admin_args)
        overrides = JobOverrides(args=args, env={table.password_env: password})
        await progress(f"Executing {job.describe()} (the one-time password only in its env `{table.password_env}`)…")
        started = await job.start(overrides=overrides, refuse_running=False)
        kept = (
            f"Execution `{started.name}` was not deleted, so its logs stay readable; it still holds the one-time "
            f"password in its overrides: delete it once read (`gcloud run jobs executions delete {started.name} "
            f"--region={job.region}`)."
        )
        try:
            final = await job.follow(started.name, timeout=ref.timeout, progress=progress)
        except DeployError as exc:
            raise CommandError(f"{exc.message} {kept} No password was shown.") from None
        if final.outcome != "succeeded":
            reason = f": {final.reason}" if final.reason else "."
            return Outcome(
                f"Creating admin {student_id} of {plan.service} {final.outcome}: execution `{final.name}` of job "
                f"{job.job}{reason}",
                (kept, "No password was shown.", f"tasks: {final.tasks()}", f"logs: {job.logs_link(final.name)}"),
                ok=False,
            )
        problems: list[str] = []
        try:
            await job.delete_execution(final.name)
            deleted = f"execution `{final.name}` of job {job.job} succeeded and was deleted"
        except DeployError as exc:
            deleted = f"execution `{final.name}` of job {job.job} succeeded but was NOT deleted"
            problems.append(f"{exc.message} It still holds the one-time password in its overrides: delete it now.")
        text = (
            f":key: One-time password for the new admin {student_id} of {plan.service}: `{password}`\n"
            f"Only you see this, only this once; {FIRST_LOGIN}."
        )
        try:
            await self.whisper(channel, requester, text)
            shown = f"the one-time password was shown once to <@{requester}> alone; {FIRST_LOGIN}"
        except Exception as exc:
            log.warning("one_time_password_not_shown", service=plan.service, error=type(exc).__name__)
            shown = "the one-time password could NOT be shown to the requester"
            problems.append("Nobody knows the new admin's password: have it reset by the app (or deactivate the user).")
        return Outcome(
            f"Created admin {student_id} of {plan.service}: {deleted}; {shown}.",
            (*problems, f"tasks: {final.tasks()}", f"duration: {final.took()}"),
            ok=not problems,
        )

    async def close(self) -> None:
        for job in self._jobs.values():
            await job.close()
        self._jobs.clear()


def _runs(ctx: OpsContext) -> UserRuns:
    runs = ctx.deps.approvals.actions.get("users create-admin")
    if not isinstance(runs, UserRuns):
        raise RuntimeError("the users actions are not registered with the approval engine")
    return runs


@subcommand(
    "users",
    help="The app's users (declared columns only): filter by role, inactive, or a search",
    usage="<service> [--role admin] [--inactive] [--find TEXT] [--sort id|tokens|daily] [--limit 25]",
    risk=Risk.READ,
    args=UsersArgs,
)
async def users(ctx: OpsContext, args: UsersArgs) -> Reply:
    service = resolve_service(ctx.deps.inventory, args.service)
    users_component(ctx.deps.inventory, service)  # "declares no users table" before "may not read"
    await check_read(ctx.deps.roles, ctx.user_id, service, ctx.roles, "users")
    db = _runs(ctx).database(service)
    found = await db.list(role=args.role, inactive=args.inactive, find=args.find, sort=args.sort, limit=args.limit)
    filters = [
        f"role `{clip_token(args.role)}`" if args.role else "",
        "inactive only" if args.inactive else "",
        f"matching `{clip_token(args.find)}`" if args.find else "",
    ]
    which = ", ".join(f for f in filters if f)
    text = (
        f"Users of {service}: {len(found.rows)} of {found.total:,}"
        + (f" ({which})" if which else "")
        + f", by {found.sort}"
    )
    if not found.rows:
        lines = ["No user matches."]
    else:
        lines = [" · ".join(f"*{bk.escape(c)}*" for c in found.columns)]
        lines += [" · ".join(bk.escape(v) or "—" for v in row) for row in found.rows]
    blocks = [bk.header(f"Users: {service}"), bk.context(bk.escape(text)), *bk.sections(lines)]
    return Reply(text, blocks, ephemeral=True)


async def _change_plan(ctx: OpsContext, args: UserChangeArgs, active: bool) -> Plan:
    service = resolve_service(ctx.deps.inventory, args.service)
    users_component(ctx.deps.inventory, service)
    await check_read(ctx.deps.roles, ctx.user_id, service, ctx.roles, "users")
    db = _runs(ctx).database(service)
    user = await db.find(args.student_id)
    if user is None:
        raise CommandError(
            f"`{service}` has no user with student id `{clip_token(args.student_id)}`; nothing was done."
        )
    word = "active" if active else "inactive"
    if user.active == active:
        raise CommandError(
            f"User `{clip_token(user.student_id)}` (id {user.id}) of `{service}` is already {word}; nothing to do."
        )
    verb = "Activate" if active else "Deactivate"
    column = db.table.active_column
    return Plan(
        action=f"users {'activate' if active else 'deactivate'}",
        service=service,
        summary=f"{verb} user {user.student_id} (id {user.id}) of {service}",
        details=(
            f"as found: {user_line(user)}",
            f"sets `{column}` = {str(active).lower()} on exactly this row, and only if it is still as planned "
            f"(same id and student id, `{column}` still {str(user.active).lower()})",
        ),
        params={"user_id": user.id, "student_id": user.student_id, "active": active},
        facts=user.facts(),
        count=1,
    )


@subcommand(
    "users deactivate",
    help="Deactivate one user of the app by student id; needs approval",
    usage="<service> <student-id>",
    risk=Risk.CHANGE,
    args=UserChangeArgs,
)
async def users_deactivate(ctx: OpsContext, args: UserChangeArgs) -> Plan:
    return await _change_plan(ctx, args, active=False)


@subcommand(
    "users activate",
    help="Activate one user of the app again by student id; needs approval",
    usage="<service> <student-id>",
    risk=Risk.CHANGE,
    args=UserChangeArgs,
)
async def users_activate(ctx: OpsContext, args: UserChangeArgs) -> Plan:
    return await _change_plan(ctx, args, active=True)


@subcommand(
    "users create-admin",
    help="Create an admin with the app's own Cloud Run job; a one-time password is shown to you alone; admin only",
    usage='<service> <student-id> "<name>"',
    risk=Risk.CHANGE,
    args=CreateAdminArgs,
)
async def users_create_admin(ctx: OpsContext, args: CreateAdminArgs) -> Plan:
    if Role.ADMIN not in ctx.roles:
        raise PermissionDenied(f"`/ops users create-admin` needs the admin role; you are {describe(ctx.roles)}.")
    service = resolve_service(ctx.deps.inventory, args.service)
    runs = _runs(ctx)
    table, ref, job = runs.admin_job(service)
    if ctx.interface != "slack" or runs.whisper is None:
        raise CommandError(
            "`/ops users create-admin` shows its one-time password only in Slack, to the requester alone; "
            "ask for it from Slack."
        )
    existing = await runs.database(service).find(args.student_id)
    if existing is not None:
        raise CommandError(
            f"`{service}` already has a user with student id `{clip_token(args.student_id)}` (id {existing.id}); "
            "nothing was done."
        )
    await job.check()
    shown_args = " ".join(arg.format(student_id=args.student_id, name=args.name) for arg in table.create_admin_args)
    return Plan(
        action="users create-admin",
        service=service,
        summary=f"Create admin {args.student_id} of {service} with Cloud Run job {job.job}",
        details=(
            f"executes {job.describe()} with args `{clip_token(shown_args, 120)}` (as execution overrides)",
            f"a one-time password is generated when the run starts and passed only in the execution's env "
            f"`{table.password_env}`; it is shown once to the requester alone (ephemeral), and {FIRST_LOGIN}",
            "the execution is deleted once it succeeds (its overrides would keep the password readable); "
            f"followed for up to {ref.timeout / 60:g} min",
        ),
        params={
            "student_id": args.student_id,
            "name": args.name,
            "requester": ctx.user_id,
            "channel": ctx.channel_id,
        },
        facts={f"student id {args.student_id}": "no user"},
        count=1,
    )


def register_users_actions(
    engine: ApprovalEngine,
    inventory: Inventory,
    redactor: Redactor,
    providers: DeployProviders,
    slack: AsyncWebClient | None,
) -> UserRuns:
    """The code behind the `users` changes, for the approval engine; the caller closes it."""
    runs = UserRuns(inventory, redactor, providers, slack_whisper(slack) if slack is not None else None)
    for verb in ("users deactivate", "users activate", "users create-admin"):
        engine.register(verb, runs)
    return runs
