"""Figures of Lambda functions from CloudWatch (`/ops status`): invocations, errors, throttles,
duration p95 and concurrent executions, over a window and the window before it.

One ``GetMetricData`` call per window asks for five statistics at once, with the period set to the
whole window so that each comes back as (about) one number:

- ``Invocations``, ``Errors``, ``Throttles`` (Sum) and ``Duration`` (``p95``) of the alias the inventory
  names — namespace ``AWS/Lambda``, dimensions ``FunctionName`` and ``Resource`` = ``function:alias``,
  the metrics Lambda records for invocations through that alias;
- ``ConcurrentExecutions`` (Maximum) of the whole function (dimension ``FunctionName`` only), the
  level Lambda records it at.

Lambda sends a count only when it is not zero, so a count without datapoints is 0 when the function
reported invocations in that window, and unknown (None, with a note) otherwise. boto3 blocks, so every
call runs on a small thread pool of this source's own, bounded by botocore's timeouts and the caller's.
It needs ``cloudwatch:GetMetricData`` (resource ``*``: the action has no resource-level permissions).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from types import TracebackType
from typing import Any

import boto3  # type: ignore[import-untyped]  # boto3 and botocore ship no type information
import structlog
from botocore.config import Config  # type: ignore[import-untyped]
from botocore.exceptions import (  # type: ignore[import-untyped]
    BotoCoreError,
    ClientError,
)

from services.clients import AWS_BAD_CREDENTIALS, AWS_DENIED, aws_error_code, aws_transport_problem, public_endpoint
from services.figures.base import FigureError, Measurement, Window
from services.inventory import Component, LambdaComponent

log = structlog.get_logger(__name__)

__all__ = ["NAMESPACE", "NO_DATA", "PERMISSION", "LambdaFigures"]

NAMESPACE = "AWS/Lambda"
PERMISSION = "cloudwatch:GetMetricData"
NO_DATA = "no datapoints in the window"
MAX_PAGES = 10

_THROTTLED = {"Throttling", "ThrottlingException", "TooManyRequestsException", "LimitExceeded", "RequestLimitExceeded"}

ClientFactory = Callable[[LambdaComponent], Any]


@dataclass(frozen=True)
class _Stat:
    id: str  # the query id: lower-case letters first, as GetMetricData requires
    metric: str
    stat: str
    by_alias: bool


_STATS = (
    _Stat("invocations", "Invocations", "Sum", True),
    _Stat("errors", "Errors", "Sum", True),
    _Stat("throttles", "Throttles", "Sum", True),
    _Stat("duration", "Duration", "p95", True),
    _Stat("concurrency", "ConcurrentExecutions", "Maximum", False),
)


def _minute(moment: datetime) -> datetime:
    return moment.replace(second=0, microsecond=0)


def _period(window: Window) -> int:
    """The window in seconds, rounded up to a whole minute (CloudWatch's periods are multiples of 60)."""
    return max(60, math.ceil(window.length.total_seconds() / 60) * 60)


def _queries(component: LambdaComponent, period: int) -> list[dict[str, Any]]:
    function = [{"Name": "FunctionName", "Value": component.function}]
    alias = [*function, {"Name": "Resource", "Value": f"{component.function}:{component.alias}"}]
    return [
        {
            "Id": stat.id,
            "MetricStat": {
                "Metric": {
                    "Namespace": NAMESPACE,
                    "MetricName": stat.metric,
                    "Dimensions": alias if stat.by_alias else function,
                },
                "Period": period,
                "Stat": stat.stat,
            },
            "ReturnData": True,
        }
        for stat in _STATS
    ]


def _numbers(values: object) -> list[float]:
    """The numbers of a result's Values (anything else, such as a missing statistic, is left out)."""
    if not isinstance(values, list):
        return []
    found: list[float] = []
    for value in values:
        with contextlib.suppress(TypeError, ValueError):
            number = float(value)
            if math.isfinite(number):
                found.append(number)
    return found


@dataclass(frozen=True)
class _Read:
    """One window's numbers per query id, and whether a result said it was incomplete."""

    values: dict[str, list[float]]
    partial: bool


class LambdaFigures:
    """The `lambda` figure source: CloudWatch's AWS/Lambda metrics of the alias and the function."""

    kinds = ("lambda",)

    def __init__(self, *, client_factory: ClientFactory | None = None, threads: int = 4) -> None:
        self._client_factory = client_factory
        self._clients: dict[tuple[str, str | None, float], Any] = {}
        self._made: list[Any] = []
        self._lock = asyncio.Lock()
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="cloudwatch-figures")
        self._closed = False

    async def measure(
        self,
        component: Component,
        window: Window,
        *,
        timeout: float,  # noqa: ASYNC109  # the FigureSource interface: the caller's bound, applied here
    ) -> list[Measurement]:
        """The function's figures over ``window`` and the window before it, within ``timeout`` seconds."""
        if not isinstance(component, LambdaComponent):
            raise FigureError(f"CloudWatch has no Lambda figures for a {component.type} component.")
        if self._closed:
            raise RuntimeError("the CloudWatch figure source is closed")
        if window.length < timedelta(minutes=1):
            raise FigureError("CloudWatch figures need a window of at least one minute.")
        where = f"Lambda function {component.function} (alias {component.alias})"
        try:
            async with asyncio.timeout(timeout):
                client = await self._client(component, timeout)
                current, previous = await asyncio.gather(
                    self._read(client, component, window),
                    self._read(client, component, window.previous),
                )
        except TimeoutError:
            raise FigureError(f"CloudWatch did not answer within {timeout:g} s for {where}.") from None
        except (ClientError, BotoCoreError) as exc:
            # ``from None``: botocore's text may carry endpoint URLs or request ids, never shown.
            raise self._failure(exc, component, timeout) from None
        except ValueError:
            raise FigureError(f"The CloudWatch endpoint of {where} is not a valid URL.") from None
        return _figures(current, previous)

    # --- plumbing --------------------------------------------------------------------------------

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
                            "cloudwatch", region_name=component.region, endpoint_url=endpoint, config=config
                        )

                    client = await asyncio.get_running_loop().run_in_executor(self._executor, make)
                    self._made.append(client)
                self._clients[key] = client
            return client

    async def _read(self, client: Any, component: LambdaComponent, window: Window) -> _Read:
        """One GetMetricData (and its further pages) in a thread; botocore's timeouts bound it there."""
        start, end = _minute(window.start), _minute(window.end)
        queries = _queries(component, _period(window))

        def call() -> _Read:
            values: dict[str, list[float]] = {stat.id: [] for stat in _STATS}
            partial = False
            token: str | None = None
            for _ in range(MAX_PAGES):
                arguments: dict[str, Any] = {
                    "MetricDataQueries": queries,
                    "StartTime": start,
                    "EndTime": end,
                    "ScanBy": "TimestampDescending",
                }
                if token:
                    arguments["NextToken"] = token
                answer: Mapping[str, Any] = client.get_metric_data(**arguments)
                for result in answer.get("MetricDataResults") or []:
                    if result.get("Id") in values:
                        values[str(result["Id"])] += _numbers(result.get("Values"))
                        partial = partial or result.get("StatusCode") not in (None, "Complete", "PartialData")
                token = answer.get("NextToken")
                if not token:
                    break
            return _Read(values, partial)

        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    def _failure(self, exc: BaseException, component: LambdaComponent, limit: float) -> FigureError:
        where = f"Lambda function {component.function} (alias {component.alias})"
        endpoint = public_endpoint(str(component.endpoint_url) if component.endpoint_url else None)
        service = endpoint or f"CloudWatch in {component.region}"
        log.info("cloudwatch_figures_failed", function=component.function, error=type(exc).__name__)
        if isinstance(exc, ClientError):
            code = aws_error_code(exc)
            if code in AWS_DENIED:
                return FigureError(f"CloudWatch refused: access denied ({PERMISSION}) reading {where}.")
            if code in _THROTTLED:
                return FigureError(
                    f"CloudWatch is rate-limiting the bot ({PERMISSION} quota) reading {where}; try again in a minute."
                )
            if code in AWS_BAD_CREDENTIALS:
                return FigureError(f"AWS refused the bot's credentials ({code}) reading CloudWatch for {where}.")
            return FigureError(f"CloudWatch answered {code or 'an unknown error'} reading {where}.")
        return FigureError(
            aws_transport_problem(exc, service=service, where=where, reading=f"CloudWatch for {where}", limit=limit)
        )

    async def close(self) -> None:
        """Close the clients this source made and stop its threads; only once."""
        if self._closed:
            return
        self._closed = True
        made, self._made = self._made, []
        self._clients.clear()
        for client in made:
            with contextlib.suppress(Exception):
                await asyncio.get_running_loop().run_in_executor(self._executor, client.close)
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def __aenter__(self) -> LambdaFigures:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


def _figures(current: _Read, previous: _Read) -> list[Measurement]:
    def count(read: _Read, key: str) -> float | None:
        values = read.values[key]
        if values:
            return sum(values)
        return 0.0 if read.values["invocations"] else None  # counts are sent only when not zero

    def peak(read: _Read, key: str) -> float | None:
        values = read.values[key]
        return max(values) if values else None

    def rate(read: _Read) -> float | None:
        invocations, errors = count(read, "invocations"), count(read, "errors")
        return 100.0 * errors / invocations if invocations and errors is not None else None

    partial = "CloudWatch answered only part of the data" if current.partial else ""
    invocations = count(current, "invocations")
    figures = [
        ("invocations", "invocations", invocations, "count", count(previous, "invocations")),
        ("errors", "errors", count(current, "errors"), "count", count(previous, "errors")),
        ("error_rate_pct", "error rate", rate(current), "%", rate(previous)),
        ("throttles", "throttles", count(current, "throttles"), "count", count(previous, "throttles")),
        ("latency_p95_ms", "duration p95", peak(current, "duration"), "ms", peak(previous, "duration")),
        (
            "concurrent_executions",
            "concurrent executions (peak, whole function)",
            peak(current, "concurrency"),
            "count",
            peak(previous, "concurrency"),
        ),
    ]
    measurements = []
    for name, label, value, unit, before in figures:
        if value is not None:
            note = partial
        elif name == "error_rate_pct" and invocations == 0:
            note = "no invocations in the window"
        else:
            note = NO_DATA
        measurements.append(Measurement(name, label, value, unit, before, note))
    return measurements
