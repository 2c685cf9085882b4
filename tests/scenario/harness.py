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
from handlers.approvals import status_line
from services.inventory import LoadedInventory, parse_inventory
from services.redaction import Redactor
from services.state import Approval
from tests.fixtures.slack import Call, FakeSlack, sign
from tests.fixtures.wait import wait_until

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

    async def approval_posted(self, approval_id: str, timeout: float = 20) -> Approval:  # noqa: ASYNC109
        """The approval once its message is posted and its ts remembered (just after the post)."""
        store = self.container.store

        async def attached() -> Approval | None:
            approval = await store.get_approval(approval_id)
            return approval if approval is not None and approval.message_ts else None

        return await wait_until(attached, f"the message of approval {approval_id} is attached", timeout=timeout)

    async def plan_posted(self, before: int, timeout: float = 20) -> Approval:  # noqa: ASYNC109
        """The approval whose plan (with its buttons) is the first posted after the first ``before``
        posts; other posts in between (a finished run's details in its thread) are passed over."""

        def plans() -> list[str]:
            return [i for c in self.slack.calls_to("chat.postMessage")[before:] if (i := approval_id_of(c))]

        [approval_id, *_] = await wait_until(plans, "a plan is posted with its buttons", timeout=timeout)
        return await self.approval_posted(approval_id, timeout)

    async def settled(self, approval: Approval, timeout: float = 20) -> Approval:  # noqa: ASYNC109
        """The approval once it reached a final state and its message was edited to say so."""
        store = self.container.store

        async def final() -> Approval | None:
            current = await store.get_approval(approval.id)
            return current if current is not None and current.state.final else None

        current = await wait_until(final, f"approval {approval.id} finishes", timeout=timeout)
        line = status_line(self.container.deps.approvals, current)

        def edited() -> list[Call]:
            return [c for c in self.slack.calls_to("chat.update")
                    if c.params.get("ts") == current.message_ts and line in all_text(c)]  # fmt: skip

        await wait_until(edited, f"the message of approval {approval.id} says {line!r}", timeout=timeout)
        return current


def approval_id_of(call: Call) -> str | None:
    """The approval id on the buttons of a posted plan, or None for any other message."""
    for block in call.json_param("blocks") or []:
        if str(block.get("block_id", "")).startswith("approval:"):
            return str(block["elements"][0]["value"])
    return None


def all_text(call: Call) -> str:
    """The fallback text and every text in the blocks of a recorded Slack call, one per line."""
    found = [str(call.params.get("text", ""))]

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            if isinstance(value.get("text"), str):
                found.append(value["text"])
            for item in value.values():
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)

    walk(call.json_param("blocks"))
    return "\n".join(found)


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
