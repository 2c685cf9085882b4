"""Logs of a Render service (runbook 002) through Render's public REST API: ``GET /v1/logs``.

One request a page: ``ownerId`` (the workspace, from the inventory's ``owner_id``), ``resource`` (the
service id), ``startTime``/``endTime``, ``direction=backward`` (newest first), ``limit``, ``level`` (each
error level, repeated: Render ORs them) for ``--errors``. ``--grep`` is matched here, always, as plain
text; it is also sent as ``text`` only when made of letters, digits and spaces (Render documents that
filter as taking "wildcards and regex", nothing more precise). Each page is sorted newest first here
too (its order is not documented). Render pages with ``hasMore`` and
``nextStartTime``/``nextEndTime``; the cursor carries those and the ids of the lines shown at the page's
oldest instant (Render's next window includes that instant, and they must not repeat). The API key goes
only in the Authorization header, through the bot's shared HTTP session; it is never in a URL, a message
or a log line. The text is returned raw (redaction is the command's job).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import structlog

from services.clients import read_json
from services.failures import network_problem
from services.inventory import Component, RenderComponent
from services.logs.base import Level, LogError, LogLine, LogPage, LogQuery
from services.logs.compose import level_in_text
from services.redaction import Redactor

log = structlog.get_logger(__name__)

__all__ = ["MAX_LIMIT", "RenderLogs", "console_url"]

MAX_LIMIT = 100
"""Render's largest ``limit`` for /v1/logs: a bigger page is cut to it (the cursor goes on)."""
MAX_RETRY_AFTER = 2.0
"""A 429 whose Retry-After is at most this many seconds is waited out once, within the deadline."""

_LOOPBACK = {"127.0.0.1", "localhost", "::1"}
_API_KEY = re.compile(r"[\x21-\x7e]{8,512}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_LEVELS: dict[str, Level] = {
    "emergency": "critical",
    "alert": "critical",
    "critical": "critical",
    "fatal": "critical",
    "error": "error",
    "warning": "warning",
    "warn": "warning",
    "notice": "info",
    "info": "info",
    "debug": "debug",
}
_ERROR_LEVELS = ("error", "critical", "fatal", "alert", "emergency")
# Render documents only that its `text` filter supports "wildcards and regex": text made of these
# characters means the same under any of those readings; anything else is matched here alone.
_PLAIN_TEXT = re.compile(r"[A-Za-z0-9 ]{1,200}")


def _stamp(moment: datetime) -> str:
    # Microseconds, as Render's own timestamps: a coarser cursor would skip lines of the same millisecond.
    return moment.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _time(value: object) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed.astimezone(UTC) if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def _encode(start: str, end: str, seen: list[str]) -> str:
    raw = json.dumps({"s": start, "e": end, "seen": seen}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode(cursor: str) -> tuple[datetime, datetime, set[str]]:
    try:
        data = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        start, end = _time(data["s"]), _time(data["e"])
        seen = {str(item) for item in data.get("seen", [])}
    except (ValueError, KeyError, TypeError, binascii.Error):
        start = end = None
        seen = set()
    if start is None or end is None:
        raise LogError("That page of Render logs is no longer valid; run the command again.")
    return start, end, seen


def _labels(entry: Mapping[str, Any]) -> dict[str, str]:
    labels = entry.get("labels")
    if not isinstance(labels, list):
        return {}
    return {
        str(item.get("name")): str(item.get("value") or "")
        for item in labels
        if isinstance(item, Mapping) and item.get("name")
    }


def _line(entry: Mapping[str, Any]) -> LogLine:
    labels = _labels(entry)
    text = str(entry.get("message") or "").rstrip("\n")
    level = _LEVELS.get(labels.get("level", "").lower()) or level_in_text(text)
    fields = {key: value for key, value in labels.items() if key not in ("level", "resource", "instance")}
    return LogLine(
        at=_time(entry.get("timestamp")), level=level, text=text, source=labels.get("instance", ""), fields=fields
    )


def console_url(component: RenderComponent) -> str | None:
    """The service's logs in Render's dashboard (None when the API is not Render's own)."""
    if urlsplit(str(component.api_url)).hostname != "api.render.com":
        return None
    return f"https://dashboard.render.com/web/{component.service_id}/logs"


class RenderLogs:
    """The `render` log backend: Render's /v1/logs for the service, with its API key."""

    def __init__(self, session: aiohttp.ClientSession | None) -> None:
        self._session = session

    async def read(
        self,
        component: Component,
        query: LogQuery,
        *,
        timeout: float,  # noqa: ASYNC109  # the LogBackend interface: the caller's bound, applied here
    ) -> LogPage:
        """The newest ``query.limit`` (at most 100) matching lines of the window, or the page after the cursor."""
        if not isinstance(component, RenderComponent):
            raise LogError(f"Render has no logs for a {component.type} component.")
        service = component.service_id
        if self._session is None:
            raise LogError("The bot has no HTTP session to reach Render's log API.")
        if component.owner_id is None:
            raise LogError(
                f"Render service {service} has no owner_id in the inventory (the tea-… or usr-… id of its "
                "workspace): Render's log API needs it."
            )
        if query.grep is not None and (not query.grep or _CONTROL.search(query.grep)):
            raise LogError("The text to look for must be plain text on one line.")
        api_key = component.api_key.get_secret_value()
        if not _API_KEY.fullmatch(api_key):
            raise LogError(f"The Render API key for service {service} is empty or has spaces or odd characters.")
        api_url = str(component.api_url).rstrip("/")
        parts = urlsplit(api_url)
        secure = parts.scheme == "https" or (parts.scheme == "http" and parts.hostname in _LOOPBACK)
        if not secure or not parts.hostname or parts.query or parts.fragment or parts.username:
            raise LogError("The Render API URL must be https:// (plain http only on loopback, for tests).")

        start, end, seen = query.since, query.until, set[str]()
        if query.cursor is not None:
            start, end, seen = _decode(query.cursor)
            start, end = max(start, query.since), min(end, query.until)
        limit = min(query.limit, MAX_LIMIT)
        params: list[tuple[str, str]] = [
            ("ownerId", component.owner_id),
            ("resource", service),
            ("startTime", _stamp(start)),
            ("endTime", _stamp(end)),
            ("direction", "backward"),
            ("limit", str(min(limit + len(seen), MAX_LIMIT))),
        ]
        if query.errors:
            params += [("level", level) for level in _ERROR_LEVELS]  # a repeated filter is OR'd
        if query.grep is not None and _PLAIN_TEXT.fullmatch(query.grep):
            params.append(("text", query.grep))
        payload = await self._get(api_url + "/logs", params, api_key, service, timeout)
        if not isinstance(payload, Mapping) or not isinstance(payload.get("logs"), list):
            raise LogError(f"Render's log API answered something other than a page of logs for service {service}.")
        entries = [entry for entry in payload["logs"] if isinstance(entry, Mapping)]
        candidates: list[tuple[LogLine, str]] = []
        for entry in entries:
            line, entry_id = _line(entry), str(entry.get("id") or "")
            # Render's window includes its end: the query's own end is cut here, and lines already shown skipped.
            if entry_id in seen or (line.at is not None and not query.since <= line.at < query.until):
                continue
            if query.grep is not None and query.grep not in line.text:  # Render's reading of `text` aside
                continue
            candidates.append((line, entry_id))
        # Newest first whatever order the page came in (Render does not document it).
        candidates.sort(key=lambda item: item[0].at or datetime.min.replace(tzinfo=UTC), reverse=True)
        shown = candidates[:limit]
        lines = [line for line, _ in shown]
        more = bool(payload.get("hasMore")) or len(candidates) > limit
        cursor = None
        oldest = lines[-1].at if lines else None
        if more and oldest is not None:
            at_oldest = [entry_id for line, entry_id in shown if line.at == oldest]
            carried = sorted(seen) if oldest == end else []
            cursor = _encode(_stamp(start), _stamp(oldest), (carried + at_oldest)[-MAX_LIMIT // 2 :])
        elif more:
            next_start, next_end = payload.get("nextStartTime"), payload.get("nextEndTime")
            if isinstance(next_start, str) and isinstance(next_end, str):
                cursor = _encode(next_start, next_end, sorted(seen))
        note = f"Render pages hold at most {MAX_LIMIT} lines." if query.limit > MAX_LIMIT else ""
        console = console_url(component)
        return LogPage(lines=lines, scanned=len(entries), cursor=cursor, note=note, console_url=console)

    async def _get(self, url: str, params: list[tuple[str, str]], api_key: str, service: str, budget: float) -> object:
        """One GET; a 429 with a short Retry-After is waited out once within the deadline."""
        if self._session is None:  # pragma: no cover - checked by read()
            raise LogError("The bot has no HTTP session to reach Render's log API.")
        headers = {"Authorization": f"Bearer {api_key}", "Accept": "application/json"}
        redactor = Redactor([api_key])
        loop = asyncio.get_running_loop()
        deadline = loop.time() + budget
        for attempt in (1, 2):
            left = deadline - loop.time()
            try:
                async with self._session.get(
                    url,
                    params=params,
                    headers=headers,
                    timeout=aiohttp.ClientTimeout(total=max(left, 0.05)),
                    allow_redirects=False,  # a redirect must not carry the key anywhere else
                ) as response:
                    status = response.status
                    retry_after = response.headers.get("Retry-After", "")
                    kind = response.content_type
                    payload = await read_json(
                        response, lambda mib: LogError(f"Render's log API answered more than {mib} MiB.")
                    )
            except TimeoutError:
                raise LogError(f"Render's log API did not answer within {budget:g} s for service {service}.") from None
            except (aiohttp.ClientError, OSError) as exc:
                reason = network_problem(exc) or type(exc).__name__
                raise LogError(f"Could not reach Render's log API for service {service} ({reason}).") from None
            if status == 429:
                wait = _seconds(retry_after)
                if attempt == 1 and wait is not None and wait <= MAX_RETRY_AFTER and loop.time() + wait < deadline:
                    log.info("render_logs_retry", service=service, wait=wait)
                    await asyncio.sleep(wait)
                    continue
                after = f" (Retry-After {wait:g} s)" if wait is not None else ""
                raise LogError(f"Render is rate-limiting the bot's log reads{after}; try again in a minute.")
            if status < 300:
                if payload is None:
                    raise LogError(
                        f"Render's log API answered {kind or 'something'} instead of JSON for service {service}."
                    )
                return payload
            raise _http_error(status, payload, redactor, service)
        raise AssertionError("unreachable")  # pragma: no cover


def _seconds(value: str) -> float | None:
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if seconds >= 0 else None


def _http_error(status: int, payload: object, redactor: Redactor, service: str) -> LogError:
    log.info("render_logs_refused", service=service, status=status)
    if status in (401, 403):
        return LogError(f"Render refused the API key for service {service}.")
    if status == 404:
        return LogError(f"Render knows no such owner or service for {service}; check owner_id in the inventory.")
    if status >= 500:
        return LogError(f"Render's log API failed ({status}) for service {service}; try again later.")
    message = ""
    if isinstance(payload, Mapping) and payload.get("message"):
        message = redactor.redact(" ".join(str(payload["message"]).split()))[:200]
    detail = f": {message}" if message else ""
    return LogError(f"Render refused the log query for service {service} ({status}){detail}.")
