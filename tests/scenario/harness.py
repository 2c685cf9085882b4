"""The real opsbot app served over HTTP on loopback, driven by signed Slack requests."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from bot.app import build_bolt_app
from bot.container import Container, build_container
from bot.metrics import Metrics
from bot.server import Readiness, Runtime, build_web_app
from bot.settings import Settings
from services.inventory import LoadedInventory, parse_inventory
from services.redaction import Redactor
from tests.fixtures.slack import FakeSlack, sign

SIGNING_SECRET = "test-signing-secret-5f2d9c"
BOT_TOKEN = "xoxb-test-bot-token-123456789"


@dataclass
class Answer:
    status: int
    body: str
    seconds: float


@dataclass
class Bot:
    url: str
    container: Container
    slack: FakeSlack
    http: aiohttp.ClientSession

    async def post(self, body: str, headers: dict[str, str] | None = None) -> Answer:
        started = time.perf_counter()
        hdrs = {"Content-Type": "application/x-www-form-urlencoded"}
        hdrs.update(sign(SIGNING_SECRET, body) if headers is None else headers)
        async with self.http.post(f"{self.url}/slack/events", data=body.encode(), headers=hdrs) as resp:
            return Answer(resp.status, await resp.text(), time.perf_counter() - started)

    async def command(self, text: str, user: str = "U0OPS1", channel: str = "C0OPS", **kwargs: Any) -> Answer:
        return await self.post(
            self.slack.slash_body(
                text, user_id=user, channel_id=channel, response_url=self.slack.response_url(), **kwargs
            )
        )

    async def get(self, path: str) -> tuple[int, str]:
        async with self.http.get(f"{self.url}{path}") as resp:
            return resp.status, await resp.text()


def settings_for(slack: FakeSlack, state_dir: Path, **extra: Any) -> Settings:
    values: dict[str, Any] = {
        "SLACK_BOT_TOKEN": BOT_TOKEN,
        "SLACK_SIGNING_SECRET": SIGNING_SECRET,
        "OPSBOT_SLACK_API_URL": slack.base_url,
        "OPSBOT_STATE_DIR": str(state_dir),
        "OPSBOT_CONFIG": str(state_dir / "unused.yaml"),
    }
    values.update(extra)
    return Settings(**values)


def inventory(text: str, env: dict[str, str] | None = None) -> LoadedInventory:
    return parse_inventory(text, "test inventory", env=env or {})


@contextlib.asynccontextmanager
async def running_bot(
    slack: FakeSlack, state_dir: Path, loaded: LoadedInventory, **settings: Any
) -> AsyncIterator[Bot]:
    config = settings_for(slack, state_dir, **settings)
    metrics = Metrics(process_metrics=False)
    async with build_container(config, redactor=Redactor(), inventory=loaded, metrics=metrics) as container:
        runtime = Runtime(metrics, Readiness(), build_bolt_app(container))
        runner = web.AppRunner(build_web_app(runtime), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        try:
            async with aiohttp.ClientSession() as http:
                yield Bot(f"http://127.0.0.1:{port}", container, slack, http)
        finally:
            await runner.cleanup()
