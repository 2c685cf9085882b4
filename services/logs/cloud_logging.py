"""Logs of a Cloud Run service from Cloud Logging (runbook 000): the entries of its revisions.

One ``entries.list`` (``LoggingServiceV2.ListLogEntries``, google-cloud-logging's async client over gRPC)
with a filter on the resource (``cloud_run_revision``, the service's name and region), the window,
``severity >= ERROR`` for ``--errors`` and the grep text as a quoted substring of the payload, ordered
``timestamp desc`` so the first page holds the newest entries. Cloud Logging's own page token is the
cursor. ``entries.list`` is limited to 60 calls a minute per project, so a page takes at most
``MAX_CALLS`` calls (Cloud Logging may answer a short page with a token while it is still searching)
and nothing here ever polls it. Permission: ``logging.logEntries.list`` on the project (role Logs
Viewer; ``roles/logging.privateLogViewer`` for data-access audit logs, not read here). The text is
returned raw (redaction is the command's job).
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable
from datetime import UTC, datetime
from types import TracebackType
from typing import Any
from urllib.parse import quote

import grpc
import structlog
from google.api_core import exceptions as api_exceptions

from services.failures import network_problem
from services.inventory import CloudRunComponent, Component
from services.logs.base import Level, LogError, LogLine, LogPage, LogQuery

log = structlog.get_logger(__name__)

__all__ = ["MAX_CALLS", "PERMISSION", "CloudLoggingLogs", "entries_filter", "plaintext_channel"]

PERMISSION = "logging.logEntries.list"
MAX_CALLS = 3
"""ListLogEntries calls one page may take (the API allows 60 a minute per project)."""
SCOPE = "https://www.googleapis.com/auth/logging.read"
RESOURCE_TYPE = "cloud_run_revision"

ChannelFactory = Callable[[], grpc.aio.Channel]

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# LogSeverity numbers (google/logging/type/log_severity.proto) to our levels.
_LEVELS: list[tuple[int, Level]] = [(600, "critical"), (500, "error"), (400, "warning"), (200, "info"), (100, "debug")]
_FIELDS_KEPT = 12


def plaintext_channel(address: str) -> ChannelFactory:
    """Channels to a plaintext gRPC Cloud Logging API at ``host:port`` (an emulator, the tests' fake): no
    TLS and no credentials, so nothing secret ever travels to it."""

    def channel() -> grpc.aio.Channel:
        return grpc.aio.insecure_channel(address)

    return channel


def _quote(text: str) -> str:
    """A string literal of the Logging query language: backslashes and double quotes escaped."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _stamp(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def entries_filter(component: CloudRunComponent, query: LogQuery) -> str:
    """The Logging query of the service's entries in the window (clauses on separate lines are ANDed)."""
    clauses = [
        f"resource.type = {_quote(RESOURCE_TYPE)}",
        f"resource.labels.service_name = {_quote(component.service)}",
        f"resource.labels.location = {_quote(component.region)}",
        f"timestamp >= {_quote(_stamp(query.since))}",
        f"timestamp < {_quote(_stamp(query.until))}",
    ]
    if query.errors:
        clauses.append("severity >= ERROR")
    if query.grep is not None:
        text = _quote(query.grep)
        clauses.append(f"(textPayload : {text} OR jsonPayload.message : {text})")
    return "\n".join(clauses)


def _level(severity: int) -> Level | None:
    return next((level for floor, level in _LEVELS if severity >= floor), None)


def _line(entry: Any) -> LogLine:
    """A LogEntry as a line: the text payload, or a JSON payload's message (its other fields kept)."""
    fields: dict[str, str] = {}
    if entry.text_payload:
        text = str(entry.text_payload)
    elif entry.json_payload:
        payload = dict(entry.json_payload)
        text = str(payload.pop("message", "") or payload.pop("msg", "") or "")
        for key, value in list(payload.items())[:_FIELDS_KEPT]:
            fields[str(key)] = value if isinstance(value, str) else json.dumps(_plain(value), default=str)
        if not text:
            text = json.dumps(_plain(dict(entry.json_payload)), default=str)[:2000]
    else:
        text = ""
    if entry.http_request and entry.http_request.request_url and not text:
        request = entry.http_request
        text = f"{request.request_method} {request.request_url} {request.status}"
    at = entry.timestamp if isinstance(entry.timestamp, datetime) else None
    source = str(entry.resource.labels.get("revision_name", "")) if entry.resource else ""
    return LogLine(
        at=at.astimezone(UTC) if at is not None else None,
        level=_level(int(entry.severity)),
        text=text.rstrip("\n"),
        source=source,
        fields=fields,
    )


def _plain(value: Any) -> Any:
    """proto-plus maps and lists as plain dicts and lists, for json.dumps."""
    if hasattr(value, "items"):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple) or (hasattr(value, "__iter__") and not isinstance(value, str | bytes)):
        return [_plain(v) for v in value]
    return value


def console_url(component: CloudRunComponent, query: LogQuery) -> str:
    """Logs Explorer with the same query and window."""
    text = quote(entries_filter(component, query), safe="")
    window = quote(f"{_stamp(query.since)}/{_stamp(query.until)}", safe="")
    return (
        f"https://console.cloud.google.com/logs/query;query={text};timeRange={window}"
        f"?project={quote(component.project, safe='')}"
    )


class CloudLoggingLogs:
    """The `cloudrun` log backend: Cloud Logging entries of the service's revisions."""

    def __init__(self, *, channel_factory: ChannelFactory | None = None) -> None:
        self._channel_factory = channel_factory
        self._client: Any = None
        self._lock = asyncio.Lock()

    async def read(
        self,
        component: Component,
        query: LogQuery,
        *,
        timeout: float,  # noqa: ASYNC109  # the LogBackend interface: the caller's bound, applied here
    ) -> LogPage:
        """The newest ``query.limit`` matching entries of the window (or the page after the cursor)."""
        if not isinstance(component, CloudRunComponent):
            raise LogError(f"Cloud Logging has no logs for a {component.type} component.")
        if query.grep is not None and (not query.grep or _CONTROL.search(query.grep)):
            raise LogError("The text to look for must be plain text on one line.")
        from google.cloud.logging_v2.types import ListLogEntriesRequest

        where = f"Cloud Run service {component.service} ({component.project})"
        link = console_url(component, query)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        lines: list[LogLine] = []
        token = query.cursor or ""
        note = ""
        try:
            async with asyncio.timeout(timeout):
                client = await self._made(where, timeout)
                for call in range(MAX_CALLS):
                    request = ListLogEntriesRequest(
                        resource_names=[f"projects/{component.project}"],
                        filter=entries_filter(component, query),
                        order_by="timestamp desc",
                        page_size=query.limit - len(lines),
                        page_token=token,
                    )
                    left = max(0.1, deadline - loop.time())
                    try:
                        pager = await client.list_log_entries(request=request, timeout=left, retry=None)
                    except api_exceptions.GoogleAPIError as exc:
                        if call and lines:  # keep what the first calls found
                            note = (
                                f"Cloud Logging stopped answering part-way ({_reason(exc)}): "
                                "older lines may be missing."
                            )
                            break
                        raise
                    lines += [_line(entry) for entry in pager.entries][: query.limit - len(lines)]
                    token = str(pager.next_page_token or "")
                    if not token or len(lines) >= query.limit:
                        break
        except TimeoutError:
            if not lines:
                raise LogError(f"Cloud Logging did not answer within {timeout:g} s for {where}.") from None
            note = f"Cloud Logging did not finish within {timeout:g} s: older lines may be missing."
        except api_exceptions.GoogleAPIError as exc:
            raise self._failure(exc, component, where, bool(query.cursor)) from None
        return LogPage(lines=lines, scanned=len(lines), cursor=token or None, note=note, console_url=link)

    async def _made(self, where: str, limit: float) -> Any:
        from google.cloud.logging_v2.services.logging_service_v2 import LoggingServiceV2AsyncClient
        from google.cloud.logging_v2.services.logging_service_v2.transports import (
            LoggingServiceV2GrpcAsyncIOTransport,
        )

        async with self._lock:
            if self._client is None:
                if self._channel_factory is not None:
                    transport = LoggingServiceV2GrpcAsyncIOTransport(channel=self._channel_factory())
                    self._client = LoggingServiceV2AsyncClient(transport=transport)
                else:
                    self._client = LoggingServiceV2AsyncClient(credentials=await _credentials(where, limit))
            return self._client

    def _failure(
        self, exc: api_exceptions.GoogleAPIError, component: CloudRunComponent, where: str, paging: bool
    ) -> LogError:
        log.warning("cloud_logging_failed", service=component.service, error=type(exc).__name__)
        project = component.project
        if isinstance(exc, api_exceptions.PermissionDenied):
            return LogError(
                f"Cloud Logging refused: permission denied ({PERMISSION} on project {project}, role Logs Viewer) "
                f"reading {where}."
            )
        if isinstance(exc, api_exceptions.Unauthenticated):
            return LogError(f"Cloud Logging refused the bot's Google credentials (not authenticated) for {where}.")
        if isinstance(exc, api_exceptions.ResourceExhausted):
            return LogError(
                f"Cloud Logging's quota of 60 reads a minute for project {project} is used up; try again in a minute."
            )
        if isinstance(exc, api_exceptions.InvalidArgument) and paging:
            return LogError("That page of Cloud Logging entries is no longer valid; run the command again.")
        if isinstance(exc, api_exceptions.InvalidArgument):
            return LogError(f"Cloud Logging refused the query for {where} as invalid.")
        if isinstance(exc, api_exceptions.DeadlineExceeded):
            return LogError(f"Cloud Logging did not answer in time for {where}.")
        if isinstance(exc, api_exceptions.NotFound):
            return LogError(f"Cloud Logging knows no project {project} (or the bot may not see it).")
        return LogError(f"Could not read Cloud Logging for {where} ({_reason(exc)}); try again later.")

    async def close(self) -> None:
        """Close the client's channel (made again if used afterwards)."""
        async with self._lock:
            client, self._client = self._client, None
        if client is not None:
            await client.transport.close()

    async def __aenter__(self) -> CloudLoggingLogs:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


def _reason(exc: BaseException) -> str:
    if isinstance(exc, api_exceptions.ServiceUnavailable | api_exceptions.RetryError):
        return network_problem(exc) or "unavailable"
    status = getattr(exc, "grpc_status_code", None)
    if isinstance(status, grpc.StatusCode):
        return str(status.name)
    return type(exc).__name__


async def _credentials(where: str, limit: float) -> Any:
    """Application Default Credentials, looked up in a thread (google-auth blocks); its messages may quote
    credential files, so only the kind of failure is told."""
    import google.auth
    import google.auth.exceptions

    try:
        credentials, _ = await asyncio.wait_for(asyncio.to_thread(google.auth.default, scopes=[SCOPE]), limit)
    except google.auth.exceptions.GoogleAuthError as exc:
        log.warning("google_credentials_failed", source="cloud_logging", error=type(exc).__name__)
        raise LogError(
            f"The bot has no usable Google credentials to read Cloud Logging for {where} ({type(exc).__name__})."
        ) from None
    return credentials
