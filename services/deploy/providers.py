"""Which component types have releases or a compose project, and the provider object for each."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import aiohttp

from services.deploy.base import ReleaseProvider
from services.inventory import CloudRunComponent, Component, ComposeComponent, LambdaComponent, RenderComponent

if TYPE_CHECKING:
    from services.deploy.compose import ComposeProject

RELEASE_TYPES = frozenset({"cloudrun", "lambda", "render"})


class DeployProviders:
    """Builds (once per component) and closes the clients that talk to each platform.

    ``cloudrun_channel`` makes Cloud Run clients on a given gRPC channel instead of Google's
    endpoint with default credentials (the tests' fake)."""

    def __init__(self, http: aiohttp.ClientSession, *, cloudrun_channel: Callable[[], Any] | None = None) -> None:
        self.http = http
        self.cloudrun_channel = cloudrun_channel
        self._made: dict[tuple[str, str], ReleaseProvider] = {}

    def releases(self, service: str, component: str, spec: Component) -> ReleaseProvider:
        """The release provider of one cloudrun / lambda / render component."""
        key = (service, component)
        if key not in self._made:
            self._made[key] = self._build(spec)
        return self._made[key]

    def _build(self, spec: Component) -> ReleaseProvider:
        if isinstance(spec, CloudRunComponent):
            from services.deploy.cloudrun import CloudRunProvider

            return CloudRunProvider(
                spec.project, spec.region, spec.service, timeout=spec.timeout,
                operation_timeout=spec.operation_timeout, channel_factory=self.cloudrun_channel,
            )  # fmt: skip
        if isinstance(spec, LambdaComponent):
            from services.deploy.aws_lambda import LambdaProvider

            endpoint = str(spec.endpoint_url).rstrip("/") if spec.endpoint_url else None
            return LambdaProvider(spec.function, spec.alias, spec.region, endpoint_url=endpoint, timeout=spec.timeout)
        if isinstance(spec, RenderComponent):
            from services.deploy.render import RenderProvider

            return RenderProvider(
                self.http, spec.service_id, spec.api_key.get_secret_value(), api_url=str(spec.api_url).rstrip("/"),
                timeout=spec.timeout, poll_every=spec.poll_seconds, deploy_timeout=spec.operation_timeout,
            )  # fmt: skip
        raise TypeError(f"{spec.type} components have no releases")

    def compose(self, spec: ComposeComponent) -> ComposeProject:
        from services.deploy.compose import ComposeProject

        return ComposeProject(
            spec.project_dir, project_name=spec.project_name, services=spec.services, docker=spec.docker,
            timeout=spec.operation_timeout,
        )  # fmt: skip

    async def close(self) -> None:
        for provider in self._made.values():
            close = getattr(provider, "close", None)
            if close is not None:
                with contextlib.suppress(Exception):
                    await close()
        self._made.clear()
