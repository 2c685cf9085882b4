"""Health of an HTTP app: liveness, readiness and the detail endpoint's component map.

Cold starts are told apart from outages for hosts that sleep when idle (runbook 002, Render
free tier): an instant answer is active, a slow success is "waking", no answer is down.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

from services.health import Check, ProbeResult, Status
from services.inventory import Component, HttpComponent
from services.probes._common import human_duration, network_problem, short_error, since_ms, worst

Facts = dict[str, str | int | float]

BODY_LIMIT = 256 * 1024
"""Bytes of a response body read at most; a bigger /health answer is cut and reported."""

_HEALTHY_WORDS = frozenset({"healthy", "ok", "up", "pass", "passing", "green", "ready", "available", "true"})
_WARNING_WORDS = frozenset({"degraded", "warn", "warning", "yellow", "slow"})


def status_of_word(value: object) -> Status:
    """Map a status word an app reports (``"ok"``, ``"degraded"``, ``"down"``…) to a Status."""
    if isinstance(value, bool):
        return Status.HEALTHY if value else Status.CRITICAL
    word = str(value).strip().lower()
    if word in _HEALTHY_WORDS:
        return Status.HEALTHY
    if word in _WARNING_WORDS:
        return Status.WARNING
    return Status.CRITICAL


@dataclass(frozen=True)
class _Answer:
    """One endpoint's answer, or why there was none."""

    path: str
    latency_ms: float
    status_code: int | None = None
    body: bytes = b""
    truncated: bool = False
    content_type: str = ""
    problem: str | None = None


async def _read_capped(response: aiohttp.ClientResponse, limit: int) -> tuple[bytes, bool]:
    """Read at most ``limit`` bytes of the body; say whether there was more."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_chunked(64 * 1024):
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            return b"".join(chunks)[:limit], True
    return b"".join(chunks), False


class HttpProbe:
    """Probes an :class:`HttpComponent` through a shared aiohttp session."""

    def __init__(self, session: aiohttp.ClientSession, *, body_limit: int = BODY_LIMIT) -> None:
        self._session = session
        self._body_limit = body_limit

    async def probe(self, component: Component) -> ProbeResult:
        """GET liveness, readiness and detail concurrently and sum them up in one result."""
        if not isinstance(component, HttpComponent):
            raise TypeError(f"HttpProbe cannot probe a {component.type} component")
        started = time.perf_counter()
        base = str(component.url).rstrip("/")
        headers = {name: value.get_secret_value() for name, value in component.headers.items()}
        timeout = aiohttp.ClientTimeout(total=component.timeout)
        paths = {
            kind: path
            for kind, path in (
                ("liveness", component.liveness),
                ("readiness", component.readiness),
                ("detail", component.detail),
            )
            if path is not None
        }
        if not paths:
            return ProbeResult(Status.WARNING, "no health endpoints configured", since_ms(started))
        answers = await asyncio.gather(
            *(self._get(base, path, headers, timeout, read_body=kind == "detail") for kind, path in paths.items())
        )
        by_kind = dict(zip(paths, answers, strict=True))
        return _summarise(component, by_kind, since_ms(started))

    async def _get(
        self,
        base: str,
        path: str,
        headers: Mapping[str, str],
        client_timeout: aiohttp.ClientTimeout,
        *,
        read_body: bool,
    ) -> _Answer:
        started = time.perf_counter()
        try:
            async with self._session.get(
                base + path, headers=headers, timeout=client_timeout, allow_redirects=True
            ) as response:
                body, truncated = await _read_capped(response, self._body_limit) if read_body else (b"", False)
                return _Answer(
                    path,
                    since_ms(started),
                    response.status,
                    body,
                    truncated,
                    response.headers.get("Content-Type", ""),
                )
        except TimeoutError:
            return _Answer(path, since_ms(started), problem=f"no answer within {client_timeout.total:g} s")
        except aiohttp.ClientResponseError as exc:
            return _Answer(path, since_ms(started), problem=f"bad HTTP answer ({exc.status} {exc.message})")
        except aiohttp.ServerDisconnectedError:
            return _Answer(path, since_ms(started), problem="server closed the connection without answering")
        except (aiohttp.ClientError, OSError) as exc:
            return _Answer(path, since_ms(started), problem=network_problem(exc) or short_error(exc))


def _endpoint_check(component: HttpComponent, answer: _Answer) -> Check:
    """Liveness and readiness: the status code is all that counts."""
    if answer.problem is not None:
        return Check(answer.path, Status.CRITICAL, answer.problem)
    if answer.status_code != component.expected_status:
        return Check(
            answer.path, Status.CRITICAL, f"answered {answer.status_code} (expected {component.expected_status})"
        )
    return Check(answer.path, Status.HEALTHY, f"{answer.status_code} in {human_duration(answer.latency_ms)}")


def _component_checks(components: object) -> tuple[list[Check], str | None]:
    """One Check per entry of the ``components`` map, or a problem if it isn't a map."""
    if components is None:
        return [], None
    if not isinstance(components, dict):
        return [], "`components` is not a JSON object"
    checks: list[Check] = []
    for name, value in components.items():
        if isinstance(value, dict):
            word = value.get("status", value.get("state", "unknown"))
            note = value.get("detail") or value.get("message") or value.get("error")
        else:
            word, note = value, None
        text = ("up" if word else "down") if isinstance(word, bool) else str(word)[:60]
        if note:
            text = f"{text}: {str(note)[:120]}"
        checks.append(Check(str(name)[:60], status_of_word(word), text))
    return checks, None


def _detail_checks(component: HttpComponent, answer: _Answer) -> tuple[Check, list[Check], Facts]:
    """The detail endpoint: its own Check, one per component it reports, and facts."""
    facts: Facts = {}
    if answer.problem is not None:
        return Check(answer.path, Status.CRITICAL, answer.problem), [], facts
    code = answer.status_code or 0
    if code == component.expected_status:
        own, notes = Status.HEALTHY, []
    else:
        # Many apps answer 503 with the same JSON when a component is down: still read it.
        own, notes = (
            (Status.CRITICAL if code >= 500 else Status.WARNING),
            [f"answered {code} (expected {component.expected_status})"],
        )
    if answer.truncated:
        notes.append(f"answer is over {len(answer.body) // 1024} KiB, not read")
        return Check(answer.path, max(own, Status.WARNING), _join(*notes)), [], facts
    try:
        payload: Any = json.loads(answer.body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        media = answer.content_type.split(";")[0].strip() or "no content type"
        if own > Status.HEALTHY:
            pass  # an error page: its status code says enough
        elif not answer.body.strip():
            notes.append("answered an empty body, not JSON")
        elif "json" in media:
            notes.append("answered malformed JSON")
        else:
            notes.append(f"answered {media}, not JSON")
        return Check(answer.path, max(own, Status.WARNING), _join(*notes)), [], facts
    if not isinstance(payload, dict):
        notes.append("answered JSON that is not an object")
        return Check(answer.path, max(own, Status.WARNING), _join(*notes)), [], facts
    checks, problem = _component_checks(payload.get("components"))
    if "status" in payload:
        reported = payload["status"]
        facts["reported_status"] = str(reported)[:60]
        explained = any(check.status >= status_of_word(reported) for check in checks)
        if status_of_word(reported) > Status.HEALTHY and not explained:
            # A bad overall status that no component accounts for belongs to the endpoint itself.
            own = max(own, status_of_word(reported))
            notes.append(f"reports {str(reported)[:60]}")
    if problem is not None:
        own = max(own, Status.WARNING)
        notes.append(problem)
    facts["components"] = len(checks)
    if own == Status.HEALTHY:
        notes.append(f"{code} in {human_duration(answer.latency_ms)}")
    return Check(answer.path, own, _join(*notes)), checks, facts


def _join(*parts: str) -> str:
    return ", ".join(part for part in parts if part)


def _summarise(component: HttpComponent, answers: dict[str, _Answer], elapsed_ms: float) -> ProbeResult:
    endpoint_checks: list[Check] = []
    component_checks: list[Check] = []
    facts: Facts = {}
    slow_ms: list[float] = []
    slow_paths: set[str] = set()
    for kind, answer in answers.items():
        facts[f"{kind}_ms"] = round(answer.latency_ms, 1)
        if answer.status_code is not None:
            facts[f"{kind}_status_code"] = answer.status_code
        if kind == "detail":
            check, reported, detail_facts = _detail_checks(component, answer)
            component_checks.extend(reported)
            facts.update(detail_facts)
        else:
            check = _endpoint_check(component, answer)
        if check.status == Status.HEALTHY and answer.latency_ms > component.slow_ms:
            check = Check(check.name, Status.WARNING, f"slow ({human_duration(answer.latency_ms)})")
            slow_ms.append(answer.latency_ms)
            slow_paths.add(check.name)
        endpoint_checks.append(check)
    checks = (*endpoint_checks, *component_checks)
    status = worst(check.status for check in checks)
    component_problems = [f"{c.name} {c.detail}" for c in component_checks if c.status > Status.HEALTHY]

    if component.sleeps and slow_ms and status < Status.CRITICAL:
        # A sleeping host answers its first request only once it has booted: a cold start,
        # not an outage (runbook 002: instant = active, 20-30 s = waking, none = down).
        waking = f"waking from sleep (answered in {human_duration(max(slow_ms))})"
        return ProbeResult(Status.WARNING, _join(waking, *component_problems), elapsed_ms, facts, checks, waking=True)

    if status == Status.HEALTHY:
        slowest = max(answer.latency_ms for answer in answers.values())
        parts = [f"OK in {human_duration(slowest)}"]
        if component_checks:
            parts.append(", ".join(f"{c.name} {c.detail}" for c in component_checks))
        return ProbeResult(status, " · ".join(parts), elapsed_ms, facts, checks)

    failed = [c for c in endpoint_checks if c.status > Status.HEALTHY and c.name not in slow_paths]
    failed.sort(key=lambda c: -c.status)
    distinct = {c.detail for c in failed}
    if len(failed) == len(endpoint_checks) and len(distinct) == 1:
        # The same failure from every endpoint is said once: "connection refused".
        only = distinct.pop()
        problems = [f"all endpoints {only}" if only.startswith("answered ") else only]
    else:
        problems = [f"{c.name} {c.detail}" for c in failed]
    problems.extend(component_problems)
    if slow_ms:
        problems.append(f"slow ({human_duration(max(slow_ms))})")
    return ProbeResult(status, "; ".join(problems), elapsed_ms, facts, checks)
