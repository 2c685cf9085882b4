"""/ops config and /ops config set: the allow-listed settings of a service's Cloud Run, Lambda and Render
components (runbooks 000 and 002: lower DAILY_TOKEN_LIMIT, switch LLM_PROVIDER), changed with approval."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from pydantic import Field

from handlers import blocks as bk
from handlers.context import Block, OpsContext, Reply
from handlers.registry import CommandArgs, clip_token, resolve_service, subcommand
from services.access import Risk
from services.approvals import Outcome, Plan, Progress
from services.deploy.providers import DeployProviders
from services.deploy.settings import (
    SETTING_TYPES,
    LiveSettings,
    SettingsStore,
    check_value,
    declared,
    is_secret,
    rule_text,
    settings_store,
    split_assignment,
)
from services.errors import CommandError
from services.health import Status
from services.inventory import Component, Inventory

HealthCheck = Callable[[str], Awaitable[tuple[Status, list[str]]]]
NOT_SET = "not set"
_HOW = {
    "cloudrun": "Cloud Run makes a new revision with the change; traffic follows it",
    "lambda": "$LATEST gets the change (every other variable kept), a version is published, the alias moves to it",
    "render": "Render's env var API, then a redeploy of the live commit",
}


def _deploys(ctx: OpsContext) -> DeployProviders:
    if ctx.deps.deploys is None:
        raise CommandError("Deploy control is not set up in this bot.")
    return ctx.deps.deploys


def _components(inventory: Inventory, service: str) -> dict[str, Component]:
    found = {c: s for c, s in inventory.services[service].components.items() if s.type in SETTING_TYPES}
    if not found:
        raise CommandError(f"`{service}` has no Cloud Run, Lambda or Render component, so it has no settings.")
    return found


def _shown(view: LiveSettings, key: str) -> str:
    if key in view.from_secret:
        return "from a secret (not shown)"
    value = view.values.get(key)
    return NOT_SET if value is None else f"`{bk.escape(value)}`"


class ConfigArgs(CommandArgs):
    positional = ("service",)
    service: str = Field(max_length=64)


@subcommand(
    "config",
    help="The declared (non-secret) settings of a service's Cloud Run, Lambda and Render components, live values",
    usage="<service>",
    risk=Risk.READ,
    args=ConfigArgs,
)
async def config(ctx: OpsContext, args: ConfigArgs) -> Reply:
    inventory = ctx.deps.inventory
    service = resolve_service(inventory, args.service)
    components = _components(inventory, service)
    providers = _deploys(ctx)
    failed: list[str] = []

    async def section(name: str, spec: Component) -> list[str]:
        rules = declared(spec)
        if not rules:
            return ["no settings declared (`settings:` in the inventory lists the ones opsbot may show and change)"]
        try:
            view = await settings_store(providers.releases(service, name, spec)).read(rules)
        except CommandError as exc:
            failed.append(f"{name}: {exc.message}")
            return [f":warning: {bk.escape(exc.message)}"]
        lines = [f"_live on {bk.escape(view.where)}_"]
        for key, rule in rules.items():
            note = f" — {bk.escape(rule.description)}" if rule.description else ""
            lines.append(f"`{key}` = {_shown(view, key)} · {bk.escape(rule_text(rule))}{note}")
        return lines

    results = await asyncio.gather(*(section(n, s) for n, s in components.items()))
    blocks: list[Block] = [bk.header(f"Settings of {service}")]
    for (name, spec), lines in zip(components.items(), results, strict=True):
        blocks += bk.sections(lines, title=f"*{bk.escape(name)}* ({spec.type})")
    blocks.append(bk.context(f"`/ops config set {service} KEY=VALUE [component]` changes one (needs approval)"))
    text = f"Settings of {service}" + (f": {len(failed)} component(s) could not be read" if failed else "")
    return Reply(text, blocks, ephemeral=True, outcome="error" if failed else "ok", detail="; ".join(failed))


class ConfigSetArgs(CommandArgs):
    positional = ("service", "assignment", "component")
    service: str = Field(max_length=64)
    assignment: str = Field(max_length=300)  # no pattern: a refusal must never quote it (it may be a secret)
    component: str | None = Field(None, max_length=64)


def _pick(inventory: Inventory, service: str, key: str, component: str | None) -> tuple[str, Component]:
    """The component whose allow-list has ``key`` (the one named, or the only one)."""
    components = _components(inventory, service)
    if component is not None:
        if component not in components:
            known = ", ".join(f"`{c}`" for c in components)
            raise CommandError(
                f"`{service}` has no Cloud Run, Lambda or Render component called `{clip_token(component)}`; "
                f"known: {known}."
            )
        components = {component: components[component]}
    having = {c: s for c, s in components.items() if key in declared(s)}
    if not having:
        allowed = sorted({k for s in components.values() for k in declared(s)})
        listed = ", ".join(f"`{k}`" for k in allowed) if allowed else "none are declared"
        where = f"`{service}/{component}`" if component else f"`{service}`"
        raise CommandError(f"`{key}` is not a setting opsbot may change on {where} (allowed: {listed}).")
    if len(having) > 1:
        raise CommandError(f"`{key}` is a setting of several components of `{service}`: name one of "
                           f"{', '.join(f'`{c}`' for c in having)}.")  # fmt: skip
    return next(iter(having.items()))


@subcommand(
    "config set",
    help="Change one allow-listed setting (env var) of a Cloud Run, Lambda or Render component; needs approval",
    usage="<service> KEY=VALUE [component]",
    risk=Risk.CHANGE,
    args=ConfigSetArgs,
)
async def config_set(ctx: OpsContext, args: ConfigSetArgs) -> Plan:
    inventory = ctx.deps.inventory
    service = resolve_service(inventory, args.service)
    key, value = split_assignment(args.assignment)
    if is_secret(key):
        raise CommandError(f"`{key}` looks like a secret: opsbot never shows or changes secrets; nothing was changed.")
    component, spec = _pick(inventory, service, key, args.component)
    rule = declared(spec)[key]
    check_value(key, rule, value)
    provider = _deploys(ctx).releases(service, component, spec)
    view = await settings_store(provider).read([key])
    if key in view.from_secret:
        raise CommandError(f"`{key}` of `{service}/{component}` comes from a secret; opsbot changes plain values only.")
    old = view.values.get(key)
    if old == value:
        raise CommandError(f"`{key}` of `{service}/{component}` is already `{bk.escape(value)}`: nothing to change.")
    shown_old = NOT_SET if old is None else f"`{bk.escape(old)}`"
    facts = {f"{key} {component}": NOT_SET if old is None else old}
    if view.version:
        facts[f"version {component}"] = view.version
    return Plan(
        action="config set",
        service=service,
        summary=f"Set `{key}` of {service}/{component} ({provider.describe()}): {shown_old} → `{bk.escape(value)}`",
        details=(
            f"Now, on {view.where}: `{key}` = {shown_old}",
            f"Allowed: {rule_text(rule)}",
            f"How: {_HOW[spec.type]}",
            f"After: wait {getattr(spec, 'settle_seconds', 0):g} s, then the health checks of {service}",
        ),
        params={"component": component, "key": key, "value": value, "old": old, "version": view.version},
        facts=facts,
    )


def _undo(plan: Plan, kind: str, before: str) -> str:
    p = plan.params
    component, key, old = str(p["component"]), str(p["key"]), p.get("old")
    if kind in ("cloudrun", "lambda") and before:
        return f"To undo: `/ops rollback {plan.service} {before} {component}`."
    if old is None:
        return f"To undo: `{key}` was not set before; remove it in the Render dashboard."
    return f"To undo: `/ops config set {plan.service} {key}={old} {component}` (Render's rollbacks keep settings)."


class ConfigSetAction:
    """Runs an approved settings change: the conditional write, settle, health; says how to undo."""

    def __init__(self, inventory: Inventory, providers: DeployProviders, health: HealthCheck) -> None:
        self.inventory = inventory
        self.providers = providers
        self.health = health

    def _store(self, plan: Plan) -> tuple[Component, SettingsStore]:
        component = str(plan.params["component"])
        spec = self.inventory.services[plan.service].components.get(component)
        if spec is None or spec.type not in SETTING_TYPES or str(plan.params["key"]) not in declared(spec):
            raise CommandError(f"`{plan.service}/{component}` no longer allows this setting; nothing was changed.")
        return spec, settings_store(self.providers.releases(plan.service, component, spec))

    async def observe(self, plan: Plan) -> Mapping[str, str]:
        _, store = self._store(plan)
        component, key = str(plan.params["component"]), str(plan.params["key"])
        view = await store.read([key])
        now = view.values.get(key)
        facts = {f"{key} {component}": NOT_SET if now is None else now}
        if view.version:
            facts[f"version {component}"] = view.version
        return facts

    async def execute(self, plan: Plan, progress: Progress) -> Outcome:
        spec, store = self._store(plan)
        p = plan.params
        key, value, old = str(p["key"]), str(p["value"]), p.get("old")
        check_value(key, declared(spec)[key], value)  # the allow-list may have changed since the plan
        planned = LiveSettings({key: None if old is None else str(old)}, str(p.get("version") or ""), "")
        change = await store.write(key, value, planned=planned, progress=progress)
        undo = _undo(plan, spec.type, change.before)
        settle = float(getattr(spec, "settle_seconds", 0.0))
        if settle:
            await progress(f"Letting it settle for {settle:g} s before the health checks…")
            await asyncio.sleep(settle)
        await progress(f"Checking the health of {plan.service}…")
        status, problems = await self.health(plan.service)
        details = (change.summary, f"Health of {plan.service} after: {status.label}", *problems, undo)
        done = f"Set `{key}` of {plan.service}/{p['component']} to `{bk.escape(value)}`"
        if status is Status.HEALTHY:
            return Outcome(f"{done}; it is healthy. {undo}", details)
        return Outcome(f"{done}, but it is {status.label.upper()} afterwards — look now. {undo}", details, ok=False)


def register_config_actions(engine: Any, inventory: Inventory, providers: DeployProviders, health: HealthCheck) -> None:
    """The approval engine's code for `/ops config set`."""
    engine.register("config set", ConfigSetAction(inventory, providers, health))
