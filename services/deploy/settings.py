"""Emergency settings (runbooks 000, 002): allow-listed environment variables of a Cloud Run service,
a Lambda alias or a Render service, read and changed one key at a time.

Only keys a component declares under ``settings:`` are read or written, each new value checked
against its declared choices or pattern; names that look like secrets are never settings, and a
variable nobody declared is never read out (it may be a secret). Every write is conditional on what
the plan saw: Cloud Run's etag, the Lambda function's and alias's RevisionIds, Render's live deploy.

- Cloud Run: the template's first container gets the new value; Cloud Run makes a new revision and
  traffic follows it, so ``/ops rollback`` (to the revision before) undoes it.
- Lambda: $LATEST gets the new value (every other variable kept), a version is published and the
  alias moved to it (changing $LATEST alone does not reach the alias); ``/ops rollback`` undoes it.
- Render: the env var API, then a redeploy of the live commit; Render's rollbacks keep the current
  settings, so the undo is setting the old value again.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import quote

import structlog
from botocore.exceptions import ClientError  # type: ignore[import-untyped]
from google.cloud import run_v2

from services.clients import aws_error_code
from services.deploy.aws_lambda import LambdaProvider
from services.deploy.base import DeployError, Progress
from services.deploy.cloudrun import CloudRunProvider
from services.deploy.render import RenderProvider
from services.errors import CommandError
from services.inventory import ENV_NAME, SECRET_NAME, Component, EnvSetting

log = structlog.get_logger(__name__)

SETTING_TYPES = frozenset({"cloudrun", "lambda", "render"})
MAX_VALUE = 200
_LATEST = run_v2.TrafficTargetAllocationType.TRAFFIC_TARGET_ALLOCATION_TYPE_LATEST
_LAMBDA_SHAPE = ("CodeSha256", "Handler", "Runtime", "MemorySize", "Timeout", "Role")
_RENDER_PAGES = 20


def is_secret(key: str) -> bool:
    """Whether a variable's name looks like a secret's (…KEY, …SECRET, …TOKEN, …PASSWORD)."""
    return SECRET_NAME.search(key) is not None


def declared(spec: Component) -> dict[str, EnvSetting]:
    """The component's allow-listed, non-secret settings (empty for a type without settings)."""
    settings: Mapping[str, EnvSetting] = getattr(spec, "settings", {}) or {}
    return {key: rule for key, rule in settings.items() if not is_secret(key)}


def split_assignment(text: str) -> tuple[str, str]:
    """``KEY=VALUE`` → (KEY, VALUE). A refusal never quotes the text: it may hold a secret."""
    key, has_value, value = text.partition("=")
    if not has_value:
        raise CommandError("Write the setting as `KEY=VALUE` (for example `DAILY_TOKEN_LIMIT=10000`).")
    if not ENV_NAME.fullmatch(key):
        raise CommandError("The part before `=` is not an environment variable name (letters, digits and _).")
    return key, value


def rule_text(rule: EnvSetting) -> str:
    """What values a setting allows, as a plan or listing shows it."""
    if rule.choices is not None:
        return "one of " + ", ".join(rule.choices)
    return f"matching {rule.pattern}"


def check_value(key: str, rule: EnvSetting, value: str) -> str:
    """The value, if the declared choices or pattern allow it (the whole value must match)."""
    if len(value) > MAX_VALUE:
        raise CommandError(f"The value for `{key}` is longer than {MAX_VALUE} characters.")
    if rule.choices is not None:
        if value not in rule.choices:
            raise CommandError(f"`{key}` must be one of {', '.join(rule.choices)}; nothing was changed.")
    elif rule.pattern is not None and re.fullmatch(rule.pattern, value) is None:
        raise CommandError(f"That value for `{key}` does not match its declared pattern `{rule.pattern}`.")
    return value


@dataclass(frozen=True)
class LiveSettings:
    """The declared keys' live values (None: not set), and what a change is conditional on."""

    values: dict[str, str | None]
    version: str  # Cloud Run: the service's etag; Lambda: the alias's version; Render: ""
    where: str  # what the values belong to, for the plan: "revision shop-00002-abc", "version 3"
    from_secret: frozenset[str] = field(default_factory=frozenset)  # set from a secret reference: never shown


@dataclass(frozen=True)
class Change:
    """What a write did, and what the release before it was (for the undo hint)."""

    summary: str
    before: str  # Cloud Run: the revision serving before; Lambda: the version before; Render: ""
    after: str


class SettingsStore(Protocol):
    """Reads and writes the environment variables of one component."""

    kind: str

    async def read(self, keys: Iterable[str]) -> LiveSettings:
        """The live values of ``keys`` (only those)."""
        ...

    async def write(self, key: str, value: str, *, planned: LiveSettings, progress: Progress) -> Change:
        """Set ``key`` to ``value`` if the component is still as ``planned``; wait until it serves."""
        ...


class CloudRunSettings:
    """The env of a Cloud Run service's revision template (its first container: the one serving)."""

    kind = "cloudrun"

    def __init__(self, provider: CloudRunProvider) -> None:
        self.provider = provider

    async def read(self, keys: Iterable[str]) -> LiveSettings:
        service = await self.provider._get_service()
        env = _container_env(service)
        wanted = list(keys)
        sourced = frozenset(k for k in wanted if k in env and "value_source" in env[k])
        values = {k: (env[k].value if k in env and k not in sourced else None) for k in wanted}
        revision = service.latest_ready_revision.rsplit("/", 1)[-1]
        return LiveSettings(values, service.etag, f"revision {revision}" if revision else "the template", sourced)

    async def write(self, key: str, value: str, *, planned: LiveSettings, progress: Progress) -> Change:
        provider = self.provider
        name = provider.service
        service = await provider._get_service()
        if service.etag != planned.version:
            raise DeployError(
                f"Cloud Run service {name} changed since the plan (its etag is not the one the plan read); "
                "nothing was changed, plan again."
            )
        live = provider._template_is_live(service, "settings change")
        if not service.template.containers:
            raise DeployError(f"Cloud Run service {name} has no container in its template.")
        container = service.template.containers[0]
        found = next((env for env in container.env if env.name == key), None)
        if found is not None and "value_source" in found:
            raise DeployError(
                f"`{key}` of Cloud Run service {name} comes from a secret; opsbot changes plain values only."
            )
        if found is None:
            container.env.append(run_v2.EnvVar(name=key, value=value))
        else:
            found.value = value
        service.template.revision = ""  # let Cloud Run name the new revision
        service.traffic = [run_v2.TrafficTarget(type_=_LATEST, percent=100)]
        await progress(f"Creating a new revision of {name} with `{key}` changed…")
        # The service carries the etag read at plan time: a change by anyone since makes Cloud Run refuse.
        result = await provider._update(service, ["template", "traffic"], what="settings change", progress=progress)
        new = provider._new_revision(result, live, "settings change")
        log.info("cloudrun_setting_changed", service=name, key=key, revision=new, was=live)
        return Change(f"Cloud Run service {name}: new revision {new} with `{key}` changed serves 100 % of traffic "
                      f"(was {live})", live, new)  # fmt: skip


def _container_env(service: run_v2.Service) -> dict[str, Any]:
    if not service.template.containers:
        return {}
    return {env.name: env for env in service.template.containers[0].env}


class _Drifted(Exception):
    """AWS refused a write for a stale RevisionId (raised inside the executor)."""


class LambdaSettings:
    """The Environment of the version a Lambda alias points at; changed via $LATEST, publish, alias."""

    kind = "lambda"

    def __init__(self, provider: LambdaProvider, *, poll_every: float = 1.0, update_timeout: float = 120.0) -> None:
        self.provider = provider
        self.poll_every = poll_every
        self.update_timeout = update_timeout

    async def _configuration(self, qualifier: str | None) -> dict[str, Any]:
        p = self.provider
        options: dict[str, Any] = {"FunctionName": p.function}
        if qualifier:
            options["Qualifier"] = qualifier
        what = f"read the configuration of version {qualifier}" if qualifier else "read the configuration"
        return dict(await p._run(what, lambda c: c.get_function_configuration(**options)))

    async def read(self, keys: Iterable[str]) -> LiveSettings:
        alias = await self.provider._get_alias()
        version = str(alias.get("FunctionVersion", ""))
        variables = _variables(await self._configuration(version))
        return LiveSettings({k: variables.get(k) for k in keys}, version, f"version {version}")

    async def write(self, key: str, value: str, *, planned: LiveSettings, progress: Progress) -> Change:
        p = self.provider
        name, alias_name = p.function.rsplit(":", 1)[-1], p.alias
        alias = await p._get_alias()
        serving = str(alias.get("FunctionVersion", ""))
        if serving != planned.version:
            raise DeployError(
                f"The alias {alias_name} of {name} now points at version {serving}, not {planned.version} as "
                "planned; nothing was changed."
            )
        routing = (alias.get("RoutingConfig") or {}).get("AdditionalVersionWeights") or {}
        if routing:
            raise DeployError(f"The alias {alias_name} of {name} splits traffic between versions; settle it first.")
        current, latest = await self._configuration(serving), await self._configuration(None)
        if _shape(current) != _shape(latest):
            raise DeployError(
                f"$LATEST of {name} differs from version {serving} that alias {alias_name} serves (unpublished "
                "changes); publishing it would ship them too, so nothing was changed."
            )
        if str(latest.get("LastUpdateStatus") or "Successful") != "Successful":
            raise DeployError(f"Another update of {name} is in progress; try again when it has finished.")
        variables = {**_variables(latest), key: value}
        function_revision = str(latest.get("RevisionId") or "")
        alias_revision = str(alias.get("RevisionId") or "")

        def guarded(call: Any, **options: Any) -> dict[str, Any]:
            try:
                return dict(call(**options))
            except ClientError as exc:
                if aws_error_code(exc) == "PreconditionFailedException":
                    raise _Drifted from None
                raise

        await progress(f"Setting `{key}` on $LATEST of {name} (every other variable kept)…")
        options: dict[str, Any] = {"FunctionName": p.function, "Environment": {"Variables": variables}}
        if function_revision:
            options["RevisionId"] = function_revision
        try:
            updated = await p._run(
                "update the configuration", lambda c: guarded(c.update_function_configuration, **options)
            )
        except _Drifted:
            raise DeployError(
                f"{name} was changed by someone else meanwhile; nothing was changed, plan again."
            ) from None
        updated = await self._until_updated(updated)
        await progress(f"Publishing a version of {name} with the change…")
        publish: dict[str, Any] = {"FunctionName": p.function, "Description": f"opsbot: {key} changed"}
        if updated.get("RevisionId"):
            publish["RevisionId"] = str(updated["RevisionId"])
        try:
            published = await p._run("publish a version", lambda c: guarded(c.publish_version, **publish))
        except _Drifted:
            raise DeployError(
                f"{name} was changed by someone else while publishing; $LATEST has the new `{key}`, the alias "
                f"{alias_name} still serves version {serving}."
            ) from None
        new = str(published.get("Version", ""))
        if not new or new == serving:
            raise DeployError(f"AWS published no new version of {name}; the alias {alias_name} was not moved.")
        await progress(f"Moving alias {alias_name} of {name} to version {new} (was {serving})…")
        move: dict[str, Any] = {"FunctionName": p.function, "Name": alias_name, "FunctionVersion": new}
        if alias_revision:
            move["RevisionId"] = alias_revision
        try:
            moved = await p._run(f"move the alias {alias_name}", lambda c: guarded(c.update_alias, **move))
        except _Drifted:
            raise DeployError(
                f"The alias {alias_name} of {name} was moved by someone else meanwhile; version {new} has the new "
                f"`{key}` but is not serving."
            ) from None
        if str(moved.get("FunctionVersion", "")) != new:
            raise DeployError(f"AWS kept the alias {alias_name} of {name} off version {new}.")
        log.info("lambda_setting_changed", function=name, key=key, version=new, was=serving)
        return Change(
            f"Lambda {name}: version {new} with `{key}` changed is published; alias {alias_name} points at it "
            f"(was {serving})",
            serving,
            new,
        )

    async def _until_updated(self, config: dict[str, Any]) -> dict[str, Any]:
        """Poll $LATEST until its update has finished (Successful), failed, or the timeout passed."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.update_timeout
        name = self.provider.function.rsplit(":", 1)[-1]
        while True:
            status = str(config.get("LastUpdateStatus") or "Successful")
            if status == "Successful":
                return config
            if status == "Failed":
                reason = " ".join(str(config.get("LastUpdateStatusReason") or "").split())[:200]
                raise DeployError(f"AWS failed to update {name}" + (f": {reason}" if reason else "") + ".")
            if loop.time() + self.poll_every > deadline:
                raise DeployError(
                    f"The configuration update of {name} did not finish within {self.update_timeout:g} s."
                )
            await asyncio.sleep(self.poll_every)
            config = await self._configuration(None)


def _variables(config: Mapping[str, Any]) -> dict[str, str]:
    environment = config.get("Environment") or {}
    variables = environment.get("Variables") if isinstance(environment, Mapping) else None
    return {str(k): str(v) for k, v in (variables or {}).items()}


def _shape(config: Mapping[str, Any]) -> tuple[Any, ...]:
    """What publishing $LATEST would ship: code, runtime settings, variables, layers."""
    layers = tuple(sorted(str(layer.get("Arn", "")) for layer in config.get("Layers") or []))
    return (*(config.get(name) for name in _LAMBDA_SHAPE), tuple(sorted(_variables(config).items())), layers)


class RenderSettings:
    """A Render service's environment variables (``/services/{id}/env-vars``), then a redeploy."""

    kind = "render"

    def __init__(self, provider: RenderProvider) -> None:
        self.provider = provider

    async def _all(self) -> dict[str, str]:
        p = self.provider
        found: dict[str, str] = {}
        cursor = ""
        for _ in range(_RENDER_PAGES):
            params = {"limit": "100", **({"cursor": cursor} if cursor else {})}
            payload = await p._call(
                "GET",
                f"/services/{p.service_id}/env-vars",
                params=params,
                what="read the environment variables",
                not_found=f"Render has no service {p.service_id} (or the API key cannot see it).",
            )
            if not isinstance(payload, list):
                raise DeployError("Render's API answered the env var list with something that is not a list.")
            for entry in payload:
                item = entry.get("envVar") if isinstance(entry, Mapping) else None
                if isinstance(item, Mapping) and isinstance(item.get("key"), str):
                    found[item["key"]] = str(item.get("value") or "")
            last = payload[-1] if payload else None
            cursor = str(last.get("cursor") or "") if isinstance(last, Mapping) else ""
            if len(payload) < 100 or not cursor:
                break
        return found

    async def read(self, keys: Iterable[str]) -> LiveSettings:
        variables = await self._all()  # held here only: undeclared keys are dropped at once
        return LiveSettings({k: variables.get(k) for k in keys}, "", f"Render service {self.provider.service_id}")

    async def write(self, key: str, value: str, *, planned: LiveSettings, progress: Progress) -> Change:
        p = self.provider
        now = (await self.read([key])).values[key]
        if now != planned.values.get(key):
            raise DeployError(f"`{key}` of Render service {p.service_id} changed since the plan; nothing was changed.")
        await p._check_settled(None)  # no deploy under way: ours must be the one that goes live
        await progress(f"Setting `{key}` on Render service {p.service_id}…")
        await p._call(
            "PUT",
            f"/services/{p.service_id}/env-vars/{quote(key, safe='')}",
            body={"value": value},
            what=f"set {key}",
            not_found=f"Render has no service {p.service_id} (or the API key cannot see it).",
        )
        summary = await p.restart(progress=progress)
        log.info("render_setting_changed", service=p.service_id, key=key)
        return Change(f"Render service {p.service_id}: `{key}` set; {summary}", "", "")


def settings_store(provider: object) -> SettingsStore:
    """The settings reader/writer over a component's release provider."""
    if isinstance(provider, CloudRunProvider):
        return CloudRunSettings(provider)
    if isinstance(provider, LambdaProvider):
        return LambdaSettings(provider)
    if isinstance(provider, RenderProvider):
        return RenderSettings(provider)
    raise TypeError(f"{type(provider).__name__} has no settings")
