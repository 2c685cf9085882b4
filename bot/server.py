"""The aiohttp server: POST /slack/events, GET /healthz, /ready and /metrics."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web
from slack_bolt.adapter.aiohttp import to_aiohttp_response, to_bolt_request
from slack_bolt.async_app import AsyncApp

from bot.metrics import Metrics

READY_TIMEOUT = 2.0

ReadyCheck = Callable[[], Awaitable[str | None]]


class Readiness:
    """Collects the conditions /ready waits for; each returns None when fine or a reason."""

    def __init__(self) -> None:
        self._checks: list[tuple[str, ReadyCheck]] = []

    def add(self, name: str, check: ReadyCheck) -> None:
        self._checks.append((name, check))

    async def problems(self) -> dict[str, str]:
        async def run(check: ReadyCheck) -> str | None:
            try:
                async with asyncio.timeout(READY_TIMEOUT):
                    return await check()
            except TimeoutError:
                return f"no answer within {READY_TIMEOUT:g} s"
            except Exception as exc:
                return type(exc).__name__

        results = await asyncio.gather(*(run(check) for _, check in self._checks))
        return {name: reason for (name, _), reason in zip(self._checks, results, strict=True) if reason}


@dataclass
class Runtime:
    """What the web server serves; the Bolt app arrives once the inventory and state are ready."""

    metrics: Metrics
    readiness: Readiness
    bolt: AsyncApp | None = None


def build_web_app(runtime: Runtime, *, slack_events: bool = True) -> web.Application:
    app = web.Application(client_max_size=1024 * 1024)

    async def events(request: web.Request) -> web.Response:
        if runtime.bolt is None:
            return web.json_response({"error": "opsbot is starting"}, status=503)
        return await to_aiohttp_response(await runtime.bolt.async_dispatch(await to_bolt_request(request)))

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def ready(_: web.Request) -> web.Response:
        problems = await runtime.readiness.problems()
        if problems:
            return web.json_response({"status": "not ready", "problems": problems}, status=503)
        return web.json_response({"status": "ready"})

    async def metrics(_: web.Request) -> web.Response:
        body, content_type = runtime.metrics.render()
        return web.Response(body=body, headers={"Content-Type": content_type})

    if slack_events:
        app.router.add_post("/slack/events", events)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/ready", ready)
    app.router.add_get("/metrics", metrics)
    return app
