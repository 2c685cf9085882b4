"""Which backend reads a component's logs: component type → how to build its :class:`LogBackend`.

Like `/ops status`'s FIGURE_BUILDERS: one entry per component type that has logs; a type without an
entry has none, and `/ops logs` says so in one sentence without reading anything. Builders import their
backend lazily, so a bot without (say) google-cloud-logging installed still reads log files.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass

import aiohttp

from services.inventory import Component
from services.logs.base import LogBackend

__all__ = ["LOG_BACKENDS", "LogDeps", "build_log_backends", "has_logs"]


@dataclass(frozen=True)
class LogDeps:
    """What a backend may be built with: the shared HTTP session (Render), and the address of a plaintext
    gRPC Cloud Logging endpoint (an emulator or the tests' fake; None: Google's)."""

    session: aiohttp.ClientSession | None = None
    logging_endpoint: str | None = None


def _logfile(deps: LogDeps) -> LogBackend:
    from services.logs.logfile import LogfileBackend

    return LogfileBackend()


def _compose(deps: LogDeps) -> LogBackend:
    from services.logs.compose import ComposeLogs

    return ComposeLogs()


def _cloudwatch(deps: LogDeps) -> LogBackend:
    from services.logs.cloudwatch import CloudWatchLogs

    return CloudWatchLogs()


def _cloud_logging(deps: LogDeps) -> LogBackend:
    from services.logs.cloud_logging import CloudLoggingLogs, plaintext_channel

    channels = plaintext_channel(deps.logging_endpoint) if deps.logging_endpoint else None
    return CloudLoggingLogs(channel_factory=channels)


def _render(deps: LogDeps) -> LogBackend:
    from services.logs.render import RenderLogs

    return RenderLogs(deps.session)


LOG_BACKENDS: dict[str, Callable[[LogDeps], LogBackend]] = {
    "logfile": _logfile,
    "compose": _compose,
    "lambda": _cloudwatch,
    "cloudrun": _cloud_logging,
    "render": _render,
}
"""Component type → how to build its log backend (the compose, lambda, cloudrun and render entries are
added beside this one by their modules' authors)."""


def has_logs(component: Component) -> bool:
    """Whether opsbot can read this component's logs."""
    return component.type in LOG_BACKENDS


def build_log_backends(deps: LogDeps, *, types: Collection[str] | None = None) -> dict[str, LogBackend]:
    """The log backend of each component type that has one (of ``types`` only, when given); one backend
    per builder, shared by the types it serves."""
    wanted = set(LOG_BACKENDS) if types is None else set(LOG_BACKENDS) & set(types)
    built: dict[str, LogBackend] = {}
    by_builder: dict[Callable[[LogDeps], LogBackend], LogBackend] = {}
    for kind in sorted(wanted):
        builder = LOG_BACKENDS[kind]
        if builder not in by_builder:
            by_builder[builder] = builder(deps)
        built[kind] = by_builder[builder]
    return built
