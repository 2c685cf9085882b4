"""/ops deploys, rollback, restart, scale and lifecycle: one set of verbs over Cloud Run, Lambda,
Render and docker compose (runbooks 000, 002, 003), each change planned, approved and health-checked."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Literal, TypeVar

from pydantic import Field

from handlers import blocks as bk
from handlers.context import Block, Deps, OpsContext, Reply
from handlers.registry import CLICK_COMMANDS, FOLLOWUPS, CommandArgs, clip_token, resolve_service, subcommand
from services.access import Risk
from services.approvals import Outcome, Plan, Progress
from services.deploy.base import DeployError, Release, ReleaseProvider
from services.deploy.compose import ServiceState
from services.deploy.providers import RELEASE_TYPES, DeployProviders
from services.errors import CommandError
from services.health import Status
from services.inventory import (
    CloudRunComponent,
    Component,
    ComponentBase,
    ComposeComponent,
    Inventory,
    PostgresComponent,
)
from services.jobs import JobsClient
from services.state import Approval, ApprovalState

C = TypeVar("C", bound=ComponentBase)
HealthCheck = Callable[[str], Awaitable[tuple[Status, list[str]]]]
ROLLBACK_PICK = "rollback_pick"
ROLL_FORWARD = "roll_forward"
UNHEALTHY = "Rolled back, but"  # how a rollback whose health check failed begins its result
LISTED = 10
TARGET = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$|^\?$"
LIFECYCLE = ("pause", "unpause", "stop", "start", "safe-stop", "safe-start")


def providers_of(deps: Deps) -> DeployProviders:
    if deps.deploys is None:
        raise CommandError("Deploy control is not set up in this bot.")
    return deps.deploys


def _pick(
    inventory: Inventory, service: str, component: str | None, types: frozenset[str], what: str
) -> tuple[str, Component]:
    """The one component of ``service`` with a type in ``types`` (or the one named)."""
    found = {c: spec for c, spec in inventory.services[service].components.items() if spec.type in types}
    if not found:
        raise CommandError(f"`{service}` has no {what}.")
    if component is None:
        if len(found) > 1:
            raise CommandError(f"`{service}` has several: name one of {', '.join(f'`{c}`' for c in found)}.")
        return next(iter(found.items()))
    if component not in found:
        known = ", ".join(f"`{c}`" for c in found)
        raise CommandError(f"`{service}` has no {what} called `{clip_token(component)}`; known: {known}.")
    return component, found[component]


def typed(inventory: Inventory, service: str, component: str, kind: type[C]) -> C:
    """The component, if it is (still) of the expected type; else a clear refusal."""
    spec = inventory.services[service].components.get(component) if service in inventory.services else None
    if not isinstance(spec, kind):
        raise CommandError(f"`{service}/{component}` is no longer a component of the kind this needs.")
    return spec


def _when(moment: datetime | None) -> str:
    return f"{moment.astimezone(UTC):%Y-%m-%d %H:%M} UTC" if moment else "?"


def containers_fact(component: str, states: Sequence[ServiceState]) -> dict[str, str]:
    """A compose stack's containers and their states: what a plan saw and a run checks again."""
    return {f"containers {component}": ", ".join(sorted(f"{s.service}={s.state}" for s in states))}


def release_line(release: Release) -> str:
    live = f" *live{f' {release.traffic}%' if release.traffic is not None else ''}*" if release.live else ""
    ready = "" if release.ready else f" · not ready{f' ({release.status})' if release.status else ''}"
    mark = ":large_green_circle:" if release.live else (":white_circle:" if release.ready else ":red_circle:")
    return (
        f"{mark} `{bk.escape(release.id)}`{live} · {_when(release.created_at)} · "
        f"{bk.escape(release.description[:120])}{ready}"
    )


def live_of(releases: list[Release]) -> Release:
    live = [r for r in releases if r.live]
    if not live:
        raise DeployError("No release is live right now, so there is nothing to roll back from.")
    return max(live, key=lambda r: r.traffic or 0)


def previous_of(releases: list[Release], live: Release) -> Release:
    """The newest ready release older than the live one."""
    order = [r.id for r in releases]
    older = [r for r in releases[order.index(live.id) + 1 :] if r.ready and not r.live]
    if not older:
        raise CommandError(f"There is no ready release older than `{live.id}` to roll back to.")
    return older[0]


class ServiceArgs(CommandArgs):
    positional = ("service",)
    service: str = Field(max_length=64)


@subcommand(
    "deploys",
    help="Recent releases of a service (Cloud Run revisions, Lambda versions, Render deploys), the live one marked",
    usage="<service>",
    risk=Risk.READ,
    args=ServiceArgs,
)
async def deploys(ctx: OpsContext, args: ServiceArgs) -> Reply:
    inventory = ctx.deps.inventory
    service = resolve_service(inventory, args.service)
    providers = providers_of(ctx.deps)
    components = inventory.services[service].components
    found = {c: s for c, s in components.items() if s.type in RELEASE_TYPES or isinstance(s, ComposeComponent)}
    if not found:
        raise CommandError(f"`{service}` has no Cloud Run, Lambda, Render or compose component.")

    unlisted: list[str] = []

    async def section(name: str, spec: Component) -> list[str]:
        try:
            if isinstance(spec, ComposeComponent):
                states = await providers.compose(spec).ps()
                return [
                    f"{':large_green_circle:' if s.state == 'running' else ':red_circle:'} `{bk.escape(s.service)}` "
                    f"· {bk.escape(s.state)} · {bk.escape(s.status)}"
                    for s in states
                ] or ["no containers"]
            releases = await providers.releases(service, name, spec).releases(LISTED)
            return [release_line(r) for r in releases] or ["no releases"]
        except CommandError as exc:
            unlisted.append(f"{name}: {exc.message}")
            return [f":warning: {bk.escape(exc.message)}"]

    results = await asyncio.gather(*(section(n, s) for n, s in found.items()))
    blocks: list[Block] = [bk.header(f"Deploys of {service}")]
    for (name, spec), lines in zip(found.items(), results, strict=True):
        blocks += bk.sections(lines, title=f"*{bk.escape(name)}* ({spec.type})")
    blocks.append(bk.context("`/ops rollback <service>` goes back to the previous ready release (needs approval)"))
    text = f"Deploys of {service}" + (f": {len(unlisted)} component(s) could not be listed" if unlisted else "")
    # A listing that failed is the command's failure (audited as one; `opsbot run` exits 3), shown with the rest.
    return Reply(text, blocks, ephemeral=True, outcome="error" if unlisted else "ok", detail="; ".join(unlisted))


class RollbackArgs(CommandArgs):
    positional = ("service", "target", "component")
    service: str = Field(max_length=64)
    target: str | None = Field(None, max_length=100, pattern=TARGET)
    component: str | None = Field(None, max_length=64)


def _choices(service: str, component: str, candidates: list[Release]) -> Block:
    options = [
        {
            "text": {"type": "plain_text", "text": bk.clip(f"{r.id} · {_when(r.created_at)} · {r.description}", 75)},
            "value": r.id,  # Slack allows 150 characters; service and component ride in the block_id
        }
        for r in candidates[:100]
    ]
    return {
        "type": "actions",
        "block_id": f"rollback:{service}:{component}",
        "elements": [
            {
                "type": "static_select",
                "action_id": ROLLBACK_PICK,
                "placeholder": {"type": "plain_text", "text": "Roll back to…"},
                "options": options,
            }
        ],
    }


@subcommand(
    "rollback",
    help="Go back to the previous ready release (or the one named; `?` to pick); needs approval",
    usage="<service> [target|?] [component]",
    risk=Risk.DESTRUCTIVE,
    args=RollbackArgs,
)
async def rollback(ctx: OpsContext, args: RollbackArgs) -> Reply | Plan:
    inventory = ctx.deps.inventory
    service = resolve_service(inventory, args.service)
    component, spec = _pick(inventory, service, args.component, RELEASE_TYPES, "Cloud Run, Lambda or Render component")
    provider = providers_of(ctx.deps).releases(service, component, spec)
    releases = await provider.releases(LISTED * 3)
    live = live_of(releases)
    if args.target == "?":
        candidates = [r for r in releases if r.ready and not r.live]
        if not candidates:
            raise CommandError(f"`{service}/{component}` has no other ready release to roll back to.")
        text = f"Roll `{service}/{component}` back from `{live.id}` to which release?"
        blocks = [bk.section(text), *bk.sections([release_line(r) for r in releases[:LISTED]])]
        if ctx.interface == "slack":
            blocks.append(_choices(service, component, candidates))
        else:
            blocks.append(bk.context(f"Type `/ops rollback {service} <release> {component}`."))
        return Reply(text, blocks, ephemeral=True)
    if args.target is None:
        target = previous_of(releases, live)
    else:
        target = next((r for r in releases if r.id == args.target), None)  # type: ignore[assignment]
        if target is None:
            raise CommandError(
                f"`{clip_token(args.target)}` is not a recent release of `{service}/{component}`; "
                f"`/ops deploys {service}` lists them."
            )
        if target.live:
            raise CommandError(f"`{target.id}` is already live: there is nothing to roll back.")
        if not target.ready:
            raise CommandError(f"`{target.id}` is not ready ({target.status or 'not ready'}): it cannot take traffic.")
    return Plan(
        action="rollback",
        service=service,
        summary=f"Roll back {service}/{component} ({provider.describe()}): `{live.id}` → `{target.id}`",
        details=(
            f"Now live: {release_line(live)}",
            f"Goes live: {release_line(target)}",
            f"After: wait {getattr(spec, 'settle_seconds', 0):g} s, then the health checks of {service}; "
            "if they fail, a one-click roll-forward is offered",
        ),
        params={"component": component, "target": target.id, "from": live.id},
        facts={f"live {component}": live.id, f"release {target.id}": "ready"},
    )


async def _settle_and_check(
    spec: Component, health: HealthCheck, service: str, progress: Progress
) -> tuple[Status, list[str]]:
    settle = float(getattr(spec, "settle_seconds", 0.0))
    if settle:
        await progress(f"Letting it settle for {settle:g} s before the health checks…")
        await asyncio.sleep(settle)
    await progress(f"Checking the health of {service}…")
    return await health(service)


class DeployAction:
    """What every deploy action needs: the inventory, the platform clients, the health check."""

    def __init__(self, inventory: Inventory, providers: DeployProviders, health: HealthCheck) -> None:
        self.inventory = inventory
        self.providers = providers
        self.health = health


class RollbackAction(DeployAction):
    """Runs an approved rollback: preconditions again, the switch, settle, health."""

    def _provider(self, plan: Plan) -> tuple[Component, ReleaseProvider]:
        component = str(plan.params["component"])
        spec = self.inventory.services[plan.service].components[component]
        return spec, self.providers.releases(plan.service, component, spec)

    async def observe(self, plan: Plan) -> Mapping[str, str]:
        _, provider = self._provider(plan)
        releases = await provider.releases(LISTED * 3)
        target = str(plan.params["target"])
        found = next((r for r in releases if r.id == target), None)
        live = [r.id for r in releases if r.live]
        return {
            f"live {plan.params['component']}": ", ".join(live) or "none",
            f"release {target}": "ready" if found and found.ready else "missing or not ready",
        }

    async def execute(self, plan: Plan, progress: Progress) -> Outcome:
        spec, provider = self._provider(plan)
        target, before = str(plan.params["target"]), str(plan.params["from"])
        await progress(f"Switching {plan.service} to `{target}`…")
        summary = await provider.rollback(target, expected_live=before, progress=progress)
        status, problems = await _settle_and_check(spec, self.health, plan.service, progress)
        details = (summary, f"Health of {plan.service} after: {status.label}", *problems)
        if status is Status.HEALTHY:
            return Outcome(f"Rolled back {plan.service} to `{target}`; it is healthy.", details)
        return Outcome(
            f"{UNHEALTHY} {plan.service} is {status.label.upper()} on `{target}` — look now; "
            f"the button below asks to roll forward to `{before}`.",
            details,
            ok=False,
        )


def _roll_forward_button(approval: Approval) -> Block | None:
    """Under a rollback whose health check failed: one click asks (for approval) to go back."""
    if approval.action != "rollback" or approval.state is not ApprovalState.FAILED:
        return None
    if not approval.result.startswith(UNHEALTHY):
        return None
    before = str(approval.plan.get("params", {}).get("from", ""))
    return {
        "type": "actions",
        "block_id": f"rollforward:{approval.id}",
        "elements": [
            {
                "type": "button",
                "action_id": ROLL_FORWARD,
                "text": {"type": "plain_text", "text": bk.clip(f"Roll forward to {before}", 75)},
                "style": "danger",
                "value": approval.id,
            }
        ],
    }


FOLLOWUPS["rollback"] = _roll_forward_button


async def roll_forward_command(deps: Deps, action: Mapping[str, Any]) -> str:
    """The command a Roll-forward click asks for: a new rollback to the release before."""
    approval = await deps.approvals.get(str(action.get("value", ""))[:64])
    if _roll_forward_button(approval) is None:
        raise CommandError("That rollback did not fail its health check, so there is nothing to roll forward.")
    params = approval.plan.get("params", {})
    return f"rollback {approval.service} {params.get('from', '')} {params.get('component', '')}"


async def pick_command(deps: Deps, action: Mapping[str, Any]) -> str:
    """The command a choice in the `/ops rollback <service> ?` menu asks for (the menu's block_id
    names the service and component, the option's value the release)."""
    block = str(action.get("block_id", ""))[:300]
    value = str((action.get("selected_option") or {}).get("value", ""))[:300]
    name = r"[a-z0-9][a-z0-9_-]{0,62}"
    where = re.fullmatch(rf"rollback:({name}):({name})", block)
    if where is None or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", value):
        raise CommandError("That choice is not a release opsbot offered.")
    return f"rollback {where[1]} {value} {where[2]}"


# --- restart and scale -----------------------------------------------------------------------


class RestartArgs(CommandArgs):
    positional = ("service", "component", "compose_service")
    service: str = Field(max_length=64)
    component: str | None = Field(None, max_length=64)
    compose_service: str | None = Field(None, max_length=64, pattern=r"^[a-zA-Z0-9][a-zA-Z0-9_.-]*$")


RESTARTABLE = frozenset({"cloudrun", "render", "compose"})


@subcommand(
    "restart",
    help="Restart a service: a new Cloud Run revision, a Render redeploy, or compose restart; needs approval",
    usage="<service> [component] [compose-service]",
    risk=Risk.CHANGE,
    args=RestartArgs,
)
async def restart(ctx: OpsContext, args: RestartArgs) -> Plan:
    inventory = ctx.deps.inventory
    service = resolve_service(inventory, args.service)
    component, spec = _pick(inventory, service, args.component, RESTARTABLE, "Cloud Run, Render or compose component")
    providers = providers_of(ctx.deps)
    if isinstance(spec, ComposeComponent):
        project = providers.compose(spec)
        states = await project.ps()
        which = args.compose_service or "all services"
        return Plan(
            action="restart",
            service=service,
            summary=f"Restart {which} of {service}/{component} (docker compose in {spec.project_dir})",
            details=tuple(f"{s.service}: {s.state} ({s.status})" for s in states),
            params={"component": component, "compose_service": args.compose_service},
            facts=containers_fact(component, states),
        )
    if args.compose_service is not None:
        raise CommandError(f"`{component}` is not a compose project: it has no services to name.")
    provider = providers.releases(service, component, spec)
    live = live_of(await provider.releases(LISTED))
    return Plan(
        action="restart",
        service=service,
        summary=f"Restart {service}/{component} ({provider.describe()}) on the same spec as `{live.id}`",
        details=(f"Now live: {release_line(live)}", f"After: the health checks of {service}"),
        params={"component": component, "from": live.id},
        facts={f"live {component}": live.id},
    )


class RestartAction(DeployAction):
    """Runs an approved restart: a new revision, a redeploy or compose restart; then health."""

    async def observe(self, plan: Plan) -> Mapping[str, str]:
        component = str(plan.params["component"])
        spec = self.inventory.services[plan.service].components[component]
        if isinstance(spec, ComposeComponent):
            states = await self.providers.compose(spec).ps()
            return containers_fact(component, states)
        releases = await self.providers.releases(plan.service, component, spec).releases(LISTED)
        return {f"live {component}": ", ".join(r.id for r in releases if r.live) or "none"}

    async def execute(self, plan: Plan, progress: Progress) -> Outcome:
        component = str(plan.params["component"])
        spec = self.inventory.services[plan.service].components[component]
        if isinstance(spec, ComposeComponent):
            name = plan.params.get("compose_service")
            summary = await self.providers.compose(spec).restart(str(name) if name else None, progress=progress)
        else:
            summary = await self.providers.releases(plan.service, component, spec).restart(progress=progress)
        return await _health_outcome(spec, self.health, plan.service, progress, summary, f"Restarted {plan.service}")


async def _health_outcome(
    spec: Component, health: HealthCheck, service: str, progress: Progress, summary: str, done: str
) -> Outcome:
    status, problems = await _settle_and_check(spec, health, service, progress)
    details = (summary, f"Health of {service} after: {status.label}", *problems)
    if status is Status.HEALTHY:
        return Outcome(f"{done}; it is healthy.", details)
    return Outcome(f"{done}, but it is {status.label.upper()} afterwards — look now.", details, ok=False)


def scaling_text(current: tuple[int, int | None, str | None, str | None]) -> str:
    """min/max instances, CPU and memory as a plan shows them (unset: Cloud Run's default)."""
    low, high, cpu, memory = current
    top = high if high is not None else "default"
    return f"min {low}, max {top}, cpu {cpu or 'default'}, memory {memory or 'default'}"


class ScaleArgs(CommandArgs):
    positional = ("service", "min_instances", "max_instances", "component")
    service: str = Field(max_length=64)
    min_instances: int = Field(ge=0, le=1000)
    max_instances: int = Field(ge=1, le=1000)
    component: str | None = Field(None, max_length=64)
    cpu: str | None = Field(None, pattern=r"^[0-9]+(\.[0-9]+)?m?$", max_length=8)
    memory: str | None = Field(None, pattern=r"^[0-9]+(Mi|Gi)$", max_length=8)


@subcommand(
    "scale",
    help="Set a Cloud Run service's min/max instances (and --cpu/--memory); needs approval",
    usage="<service> <min> <max> [component] [--cpu 1] [--memory 512Mi]",
    risk=Risk.CHANGE,
    args=ScaleArgs,
)
async def scale(ctx: OpsContext, args: ScaleArgs) -> Plan:
    inventory = ctx.deps.inventory
    service = resolve_service(inventory, args.service)
    if args.min_instances > args.max_instances:
        raise CommandError(f"min ({args.min_instances}) must not be above max ({args.max_instances}).")
    component, spec = _pick(inventory, service, args.component, frozenset({"cloudrun"}), "Cloud Run component")
    provider: Any = providers_of(ctx.deps).releases(service, component, spec)
    current = await provider.scaling()
    now = scaling_text(current)
    wanted = scaling_text((args.min_instances, args.max_instances, args.cpu or current[2], args.memory or current[3]))
    if now == wanted:
        raise CommandError(f"`{service}/{component}` already runs with {now}: nothing to change.")
    return Plan(
        action="scale",
        service=service,
        summary=f"Scale {service}/{component} ({provider.describe()}): {now} → {wanted}",
        details=(f"Now: {now}", f"After: {wanted}"),
        params={
            "component": component,
            "min": args.min_instances,
            "max": args.max_instances,
            "cpu": args.cpu,
            "memory": args.memory,
        },
        facts={f"scaling {component}": now},
    )


class ScaleAction(DeployAction):
    """Runs an approved scale of a Cloud Run service; then health."""

    def _provider(self, plan: Plan) -> tuple[CloudRunComponent, Any]:
        component = str(plan.params["component"])
        spec = typed(self.inventory, plan.service, component, CloudRunComponent)
        return spec, self.providers.releases(plan.service, component, spec)

    async def observe(self, plan: Plan) -> Mapping[str, str]:
        _, provider = self._provider(plan)
        return {f"scaling {plan.params['component']}": scaling_text(await provider.scaling())}

    async def execute(self, plan: Plan, progress: Progress) -> Outcome:
        spec, provider = self._provider(plan)
        p = plan.params
        summary = await provider.scale(
            int(p["min"]), int(p["max"]), cpu=p.get("cpu"), memory=p.get("memory"), progress=progress
        )
        return await _health_outcome(spec, self.health, plan.service, progress, summary, f"Scaled {plan.service}")


# --- compose lifecycle -----------------------------------------------------------------------


class LifecycleArgs(CommandArgs):
    positional = ("service", "step", "component")
    service: str = Field(max_length=64)
    step: Literal["pause", "unpause", "stop", "start", "safe-stop", "safe-start"]
    component: str | None = Field(None, max_length=64)


def _jobs_client(deps_inventory: Inventory, service: str, spec: ComposeComponent, redactor: Any) -> JobsClient | None:
    if spec.jobs is None:
        return None
    db = typed(deps_inventory, service, spec.jobs, PostgresComponent)
    if db.jobs is None:
        raise CommandError(f"`{service}/{spec.jobs}` has no jobs table in the inventory.")
    return JobsClient(db.dsn.get_secret_value(), db.jobs, timeout=db.timeout, redactor=redactor)


_STEP_SAYS = {
    "pause": "Pause every container (processes frozen, nothing served)",
    "unpause": "Unpause every container",
    "stop": "Stop every container (nothing served until start)",
    "start": "Start every container",
    "safe-stop": "Wait up to {grace:g} s for in-flight jobs, put the rest back to pending, then stop",
    "safe-start": "Start, then put jobs stuck in processing for over an hour back to pending",
}


@subcommand(
    "lifecycle",
    help="pause, unpause, stop, start, safe-stop or safe-start a docker compose stack (runbook 003); needs approval",
    usage="<service> pause|unpause|stop|start|safe-stop|safe-start [component]",
    risk=Risk.DESTRUCTIVE,
    args=LifecycleArgs,
)
async def lifecycle(ctx: OpsContext, args: LifecycleArgs) -> Plan:
    inventory = ctx.deps.inventory
    service = resolve_service(inventory, args.service)
    component, _ = _pick(inventory, service, args.component, frozenset({"compose"}), "compose component")
    spec = typed(inventory, service, component, ComposeComponent)
    states = await providers_of(ctx.deps).compose(spec).ps()
    says = _STEP_SAYS[args.step].format(grace=spec.grace_seconds)
    jobs = f" (jobs table of `{spec.jobs}`)" if spec.jobs and args.step.startswith("safe") else ""
    return Plan(
        action="lifecycle",
        service=service,
        summary=f"{args.step} {service}/{component}: {says}{jobs}",
        details=tuple(f"{s.service}: {s.state} ({s.status})" for s in states),
        params={"component": component, "step": args.step},
        facts=containers_fact(component, states),
    )


class LifecycleAction(DeployAction):
    """Runs an approved pause/stop/start/safe-stop/safe-start of a compose stack."""

    def __init__(self, inventory: Inventory, providers: DeployProviders, health: HealthCheck, redactor: Any) -> None:
        super().__init__(inventory, providers, health)
        self.redactor = redactor

    def _spec(self, plan: Plan) -> ComposeComponent:
        return typed(self.inventory, plan.service, str(plan.params["component"]), ComposeComponent)

    async def observe(self, plan: Plan) -> Mapping[str, str]:
        states = await self.providers.compose(self._spec(plan)).ps()
        return containers_fact(str(plan.params["component"]), states)

    async def execute(self, plan: Plan, progress: Progress) -> Outcome:
        spec = self._spec(plan)
        project = self.providers.compose(spec)
        step = str(plan.params["step"])
        jobs = _jobs_client(self.inventory, plan.service, spec, self.redactor)
        if step == "safe-stop":
            summary = await project.safe_stop(jobs, grace=spec.grace_seconds, progress=progress)
        elif step == "safe-start":
            summary = await project.safe_start(jobs, progress=progress)
        else:
            summary = await getattr(project, step)(progress=progress)
        if step in ("stop", "pause", "safe-stop"):
            return Outcome(f"{step} {plan.service}: done.", (summary,))
        return await _health_outcome(spec, self.health, plan.service, progress, summary, f"{step} {plan.service}")


def register_actions(
    engine: Any, inventory: Inventory, providers: DeployProviders, health: HealthCheck, redactor: Any
) -> None:
    """The approval engine's code for each deploy command."""
    engine.register("rollback", RollbackAction(inventory, providers, health))
    engine.register("restart", RestartAction(inventory, providers, health))
    engine.register("scale", ScaleAction(inventory, providers, health))
    engine.register("lifecycle", LifecycleAction(inventory, providers, health, redactor))


CLICK_COMMANDS[ROLLBACK_PICK] = pick_command
CLICK_COMMANDS[ROLL_FORWARD] = roll_forward_command
