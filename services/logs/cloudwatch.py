"""Logs of a Lambda function from CloudWatch Logs (runbook 002): its log group, newest first.

``FilterLogEvents`` returns events oldest first, so "the newest N" comes from Logs Insights: one
``StartQuery`` over the window (``filter`` clauses for ``--errors`` and ``--grep``, then
``sort @timestamp desc | limit N``), and ``GetQueryResults`` polled until it completes, within the
caller's deadline. An older page is the same query ending at the oldest line shown. When Insights is not
allowed (no ``logs:StartQuery``), the window is streamed instead with ``FilterLogEvents`` and its
``nextToken`` (the runbook's filter pattern ``?ERROR ?Exception ?Traceback``, ``--grep`` as one quoted
term), keeping the newest N in a bounded heap.

Whatever the engine says, every line is checked again here with the same rules (``--errors``: the text
holds ERROR, Exception or Traceback, case-sensitive as CloudWatch's terms are; ``--grep``: plain
substring): an engine that ignores a filter (moto ignores both Insights filters and ``?`` terms) never
widens the answer. boto3 blocks, so each call runs on this backend's own threads, bounded by botocore's
timeouts and the caller's. Permissions: ``logs:StartQuery``, ``logs:GetQueryResults``, ``logs:StopQuery``
and (fallback) ``logs:FilterLogEvents`` on the log group. The text is returned raw (redaction is the
command's job).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import heapq
import math
import re
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import Any
from urllib.parse import quote

import boto3  # type: ignore[import-untyped]  # boto3 and botocore ship no type information
import structlog
from botocore.config import Config  # type: ignore[import-untyped]
from botocore.exceptions import (  # type: ignore[import-untyped]
    BotoCoreError,
    ClientError,
)

from services.clients import AWS_BAD_CREDENTIALS, AWS_DENIED, aws_error_code, aws_transport_problem, public_endpoint
from services.inventory import Component, LambdaComponent
from services.logs.base import LogError, LogLine, LogPage, LogQuery
from services.logs.compose import level_in_text

log = structlog.get_logger(__name__)

__all__ = ["ERROR_PATTERN", "ERROR_TERMS", "CloudWatchLogs", "filter_pattern", "insights_query"]

ERROR_TERMS = ("ERROR", "Exception", "Traceback")
ERROR_PATTERN = "?ERROR ?Exception ?Traceback"
"""Runbook 002's filter pattern for errors."""
MAX_ROUNDS = 4
"""Insights queries one page may take (more than one only when an engine ignores the filter)."""
MAX_SCAN_PAGES = 50
"""FilterLogEvents pages one fallback read may take."""
INSIGHTS_LIMIT = 10_000

_THROTTLED = {"Throttling", "ThrottlingException", "TooManyRequestsException", "LimitExceeded", "RequestLimitExceeded"}
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_DONE = {"Complete", "Failed", "Cancelled", "Timeout", "Unknown"}

ClientFactory = Callable[[LambdaComponent], Any]


def _quoted(text: str) -> str:
    """``text`` as one double-quoted term of a filter pattern: backslashes and quotes escaped."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def filter_pattern(query: LogQuery) -> str:
    """The FilterLogEvents pattern: the runbook's ``?`` terms for errors, or the grep text as one quoted
    term (with both, the grep term, the narrower; errors are then checked here)."""
    if query.grep is not None:
        return _quoted(query.grep)
    return ERROR_PATTERN if query.errors else ""


def _regex(text: str) -> str:
    """``text`` as an Insights regex literal matching it exactly: every non-alphanumeric character escaped."""
    return "/" + "".join(c if c.isalnum() or c == " " else "\\" + c for c in text) + "/"


def insights_query(query: LogQuery, limit: int) -> str:
    """The Logs Insights query of the newest ``limit`` matching events."""
    parts = ["fields @timestamp, @message, @logStream"]
    if query.errors:
        parts.append("filter @message like /ERROR|Exception|Traceback/")
    if query.grep is not None:
        parts.append(f"filter @message like {_regex(query.grep)}")
    parts += ["sort @timestamp desc", f"limit {limit}"]
    return " | ".join(parts)


def _matches(query: LogQuery, text: str) -> bool:
    if query.errors and not any(term in text for term in ERROR_TERMS):
        return False
    return query.grep is None or query.grep in text


def _ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def _at(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


def _insights_time(value: str) -> int | None:
    """An Insights ``@timestamp`` ("2025-03-01 09:00:00.123", UTC; moto: epoch ms) in epoch ms."""
    if value.isdigit():
        return int(value)
    try:
        return _ms(datetime.strptime(value, "%Y-%m-%d %H:%M:%S.%f").replace(tzinfo=UTC))
    except ValueError:
        return None


@dataclass(frozen=True)
class _Event:
    ms: int
    text: str
    stream: str

    def line(self) -> LogLine:
        text = self.text.rstrip("\n")
        return LogLine(at=_at(self.ms), level=level_in_text(text), text=text, source=self.stream)


def _read_cursor(cursor: str) -> tuple[int, int]:
    boundary, _, skip = cursor.partition(":")
    if not boundary.isdigit() or not skip.isdigit():
        raise LogError("That page of CloudWatch logs is no longer valid; run the command again.")
    return int(boundary), int(skip)


class CloudWatchLogs:
    """The `lambda` log backend: the function's CloudWatch log group."""

    def __init__(self, *, client_factory: ClientFactory | None = None, threads: int = 4) -> None:
        self._client_factory = client_factory
        self._clients: dict[tuple[str, str | None, float], Any] = {}
        self._made: list[Any] = []
        self._lock = asyncio.Lock()
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="cloudwatch-logs")
        self._closed = False

    async def read(
        self,
        component: Component,
        query: LogQuery,
        *,
        timeout: float,  # noqa: ASYNC109  # the LogBackend interface: the caller's bound, applied here
    ) -> LogPage:
        """The newest ``query.limit`` matching events of the window (or of its part before the cursor)."""
        if not isinstance(component, LambdaComponent):
            raise LogError(f"CloudWatch Logs has no logs for a {component.type} component.")
        if self._closed:
            raise RuntimeError("the CloudWatch log backend is closed")
        if query.grep is not None and (not query.grep or _CONTROL.search(query.grep)):
            raise LogError("The text to look for must be plain text on one line.")
        group = component.log_group or f"/aws/lambda/{component.function}"
        boundary, skip = (_ms(query.until) - 1, 0) if query.cursor is None else _read_cursor(query.cursor)
        boundary = min(boundary, _ms(query.until) - 1)
        console = self._console_url(component, group, query)
        if boundary < _ms(query.since):
            return LogPage(lines=[], scanned=0, console_url=console)
        call_limit = max(1.0, timeout * 0.8)
        deadline = asyncio.get_running_loop().time() + timeout * 0.9
        try:
            async with asyncio.timeout(timeout):
                client = await self._client(component, call_limit)
                try:
                    page = await self._insights(client, group, query, boundary, skip, deadline)
                except ClientError as exc:
                    if aws_error_code(exc) not in AWS_DENIED:
                        raise
                    log.info("cloudwatch_logs_insights_denied", group=group)
                    page = await self._scan(client, group, query, boundary, skip, deadline)
                    page.note = "Logs Insights is not allowed (logs:StartQuery): read the window with FilterLogEvents."
        except TimeoutError:
            raise LogError(f"CloudWatch Logs did not answer within {timeout:g} s for log group {group}.") from None
        except (ClientError, BotoCoreError) as exc:
            # ``from None``: botocore's text may carry endpoint URLs or request ids, never shown.
            raise self._failure(exc, component, group, call_limit) from None
        except ValueError:
            raise LogError(f"The CloudWatch Logs endpoint of log group {group} is not a valid URL.") from None
        return LogPage(lines=page.lines, scanned=page.scanned, cursor=page.cursor, note=page.note, console_url=console)

    # --- Logs Insights --------------------------------------------------------------------------

    async def _insights(
        self, client: Any, group: str, query: LogQuery, boundary: int, skip: int, deadline: float
    ) -> _Page:
        since = _ms(query.since)
        collected: list[_Event] = []
        scanned = 0
        more = False
        note = ""
        round_boundary, round_skip, extra = boundary, skip, 0
        for _ in range(MAX_ROUNDS):
            want = query.limit - len(collected)
            size = min(INSIGHTS_LIMIT, want + round_skip + extra)
            rows, complete = await self._run_query(client, group, query, since, round_boundary, size, deadline)
            scanned += len(rows)
            fresh: list[_Event] = []
            at_edge = 0
            for event in rows:
                if not since <= event.ms <= round_boundary or not _matches(query, event.text):
                    continue
                if event.ms == round_boundary:
                    at_edge += 1
                    if at_edge <= round_skip:
                        continue
                fresh.append(event)
            collected += fresh[:want]
            if not complete:
                note = "Logs Insights had not finished by the deadline: newer lines may be missing."
                more = True
                break
            if len(fresh) > want or (len(collected) == query.limit and len(rows) == size):
                more = True
                break
            if len(rows) < size or not rows:
                break  # the whole (rest of the) window was returned
            # A full answer with too few matches: the engine ignored the filter. Go on from its oldest row.
            oldest = rows[-1].ms
            if oldest == round_boundary and size == INSIGHTS_LIMIT:
                note = f"Over {INSIGHTS_LIMIT} events share one millisecond; older lines were not read."
                break
            if oldest == round_boundary:
                extra = size  # every row was at the edge: ask for more rows there
                continue
            round_skip, extra = sum(1 for event in collected if event.ms == oldest), 0
            round_boundary = oldest
        else:
            more = True
            note = note or f"Stopped after {MAX_ROUNDS} Logs Insights queries; older lines may match too."
        cursor = None
        if more and collected:
            oldest = collected[-1].ms
            shown = sum(1 for event in collected if event.ms == oldest)
            cursor = f"{oldest}:{shown + (round_skip if oldest == round_boundary else 0)}"
        elif more:
            cursor = f"{round_boundary}:{round_skip}"
        return _Page([event.line() for event in collected], scanned, cursor, note)

    async def _run_query(
        self, client: Any, group: str, query: LogQuery, since: int, until: int, size: int, deadline: float
    ) -> tuple[list[_Event], bool]:
        """One Insights query over ``[since, until]`` (ms; Insights takes whole seconds, so the edges are
        widened and cut here); its rows newest first, and whether it completed before ``deadline``."""
        text = insights_query(query, size)
        loop = asyncio.get_running_loop()

        def start() -> str:
            answer = client.start_query(
                logGroupName=group,
                startTime=since // 1000,
                endTime=math.ceil((until + 1) / 1000),
                queryString=text,
                limit=size,
            )
            return str(answer["queryId"])

        query_id = await loop.run_in_executor(self._executor, start)
        pause = 0.1
        while True:
            answer: Mapping[str, Any] = await loop.run_in_executor(
                self._executor, lambda: client.get_query_results(queryId=query_id)
            )
            status = str(answer.get("status") or "")
            if status in _DONE:
                break
            if loop.time() + pause >= deadline:
                with contextlib.suppress(ClientError, BotoCoreError):
                    await loop.run_in_executor(self._executor, lambda: client.stop_query(queryId=query_id))
                return _rows(answer), False
            await asyncio.sleep(pause)
            pause = min(pause * 2, 1.0)
        if status != "Complete":
            raise LogError(f"The Logs Insights query on log group {group} ended {status.lower()}.")
        return _rows(answer), True

    # --- FilterLogEvents (no Insights) ---------------------------------------------------------

    async def _scan(self, client: Any, group: str, query: LogQuery, boundary: int, skip: int, deadline: float) -> _Page:
        """The window streamed oldest first with FilterLogEvents and nextToken; the newest matches kept."""
        since = _ms(query.since)
        pattern = filter_pattern(query)
        loop = asyncio.get_running_loop()
        newest: list[tuple[int, int, _Event]] = []
        edge: list[_Event] = []  # matches at the cursor's own millisecond, oldest first
        order = 0
        scanned = 0
        dropped = 0
        token: str | None = None
        note = ""
        for _ in range(MAX_SCAN_PAGES):
            if loop.time() >= deadline:
                note = "Stopped reading at the deadline: the newest lines may be missing."
                break
            arguments: dict[str, Any] = {"logGroupName": group, "startTime": since, "endTime": boundary}
            if pattern:
                arguments["filterPattern"] = pattern
            if token:
                arguments["nextToken"] = token
            answer: Mapping[str, Any] = await loop.run_in_executor(
                self._executor, functools.partial(client.filter_log_events, **arguments)
            )
            for item in answer.get("events") or []:
                event = _Event(
                    int(item.get("timestamp") or 0),
                    str(item.get("message") or ""),
                    str(item.get("logStreamName") or ""),
                )
                if not since <= event.ms <= boundary:
                    continue
                scanned += 1
                if not _matches(query, event.text):
                    continue
                if query.cursor is not None and event.ms == boundary:
                    edge.append(event)
                    continue
                order += 1
                if len(newest) < query.limit:
                    heapq.heappush(newest, (event.ms, order, event))
                else:
                    heapq.heappushpop(newest, (event.ms, order, event))
                    dropped += 1
            token = answer.get("nextToken")
            if not token:
                break
        else:
            note = f"Stopped after {MAX_SCAN_PAGES} pages of FilterLogEvents: the newest lines may be missing."
        for event in edge[: max(len(edge) - skip, 0)]:
            order += 1
            if len(newest) < query.limit:
                heapq.heappush(newest, (event.ms, order, event))
            else:
                heapq.heappushpop(newest, (event.ms, order, event))
                dropped += 1
        ordered = [event for _, _, event in sorted(newest, key=lambda item: item[:2], reverse=True)]
        cursor = None
        if dropped and ordered:
            oldest = ordered[-1].ms
            shown = sum(1 for event in ordered if event.ms == oldest)
            cursor = f"{oldest}:{shown + (skip if oldest == boundary else 0)}"
        return _Page([event.line() for event in ordered], scanned, cursor, note)

    # --- plumbing --------------------------------------------------------------------------------

    def _console_url(self, component: LambdaComponent, group: str, query: LogQuery) -> str | None:
        if component.endpoint_url is not None:
            return None  # not AWS's console

        def twice(text: str) -> str:
            return quote(quote(text, safe=""), safe="").replace("%", "$")

        region = component.region
        events = (
            f"$3FfilterPattern$3D{twice(filter_pattern(query))}$26start$3D{_ms(query.since)}$26end$3D{_ms(query.until)}"
        )
        return (
            f"https://{region}.console.aws.amazon.com/cloudwatch/home?region={region}"
            f"#logsV2:log-groups/log-group/{twice(group)}/log-events{events}"
        )

    async def _client(self, component: LambdaComponent, limit: float) -> Any:
        endpoint = str(component.endpoint_url) if component.endpoint_url is not None else None
        key = (component.region, endpoint, limit)
        async with self._lock:
            client = self._clients.get(key)
            if client is None:
                if self._client_factory is not None:
                    client = self._client_factory(component)
                else:

                    def make() -> Any:
                        config = Config(
                            connect_timeout=limit,
                            read_timeout=limit,
                            retries={"max_attempts": 2, "mode": "standard"},
                        )
                        # A session of its own: boto3's default session is not safe to share between threads.
                        session = boto3.session.Session()
                        return session.client(
                            "logs", region_name=component.region, endpoint_url=endpoint, config=config
                        )

                    client = await asyncio.get_running_loop().run_in_executor(self._executor, make)
                    self._made.append(client)
                self._clients[key] = client
            return client

    def _failure(self, exc: BaseException, component: LambdaComponent, group: str, limit: float) -> LogError:
        where = f"log group {group}"
        endpoint = public_endpoint(str(component.endpoint_url) if component.endpoint_url else None)
        service = endpoint or f"CloudWatch Logs in {component.region}"
        log.info("cloudwatch_logs_failed", group=group, error=type(exc).__name__)
        if isinstance(exc, ClientError):
            code = aws_error_code(exc)
            if code in AWS_DENIED:
                return LogError(
                    f"CloudWatch Logs refused: access denied (logs:StartQuery, logs:FilterLogEvents) reading {where}."
                )
            if code == "ResourceNotFoundException":
                return LogError(f"CloudWatch Logs has no {where} in {component.region} (has the function run yet?).")
            if code in _THROTTLED:
                return LogError(f"CloudWatch Logs is rate-limiting the bot reading {where}; try again in a minute.")
            if code in AWS_BAD_CREDENTIALS:
                return LogError(f"AWS refused the bot's credentials ({code}) reading CloudWatch Logs {where}.")
            if code == "InvalidParameterException":
                return LogError(f"CloudWatch Logs refused the query on {where} as invalid.")
            return LogError(f"CloudWatch Logs answered {code or 'an unknown error'} reading {where}.")
        return LogError(
            aws_transport_problem(exc, service=service, where=where, reading=f"CloudWatch Logs {where}", limit=limit)
        )

    async def close(self) -> None:
        """Close the clients this backend made and stop its threads; only once."""
        if self._closed:
            return
        self._closed = True
        made, self._made = self._made, []
        self._clients.clear()
        for client in made:
            with contextlib.suppress(Exception):
                await asyncio.get_running_loop().run_in_executor(self._executor, client.close)
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def __aenter__(self) -> CloudWatchLogs:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


@dataclass
class _Page:
    lines: list[LogLine]
    scanned: int
    cursor: str | None
    note: str


def _rows(answer: Mapping[str, Any]) -> list[_Event]:
    """GetQueryResults' rows (lists of {field, value}) as events, newest first."""
    events: list[_Event] = []
    for row in answer.get("results") or []:
        fields = {str(cell.get("field")): str(cell.get("value") or "") for cell in row if isinstance(cell, Mapping)}
        ms = _insights_time(fields.get("@timestamp", ""))
        if ms is None:
            continue
        events.append(_Event(ms, fields.get("@message", ""), fields.get("@logStream", "")))
    events.sort(key=lambda event: event.ms, reverse=True)
    return events
