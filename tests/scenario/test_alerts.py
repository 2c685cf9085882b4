"""Alerts in Slack: the watcher posts a fired alert to the ops channel with a Silence menu, a choice
silences it as the clicker (audited), it resolves by editing that message; /ops alerts and /ops silence."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from bot.sample_app import SampleAppState, start_sample_app
from bot.serve import build_watcher
from handlers.alerts import SILENCE_PICK
from services.alerts.watch import Watcher
from tests.fixtures.slack import FakeSlack
from tests.fixtures.wait import wait_until
from tests.scenario.harness import Bot, inventory, running_bot

OPERATOR = "U0OPER1"
VIEWER = "U0VIEW1"
KEY = "shop/api/ServiceDown"


@dataclass
class World:
    bot: Bot
    slack: FakeSlack
    app: SampleAppState
    watcher: Watcher
    now: list[datetime]

    async def rounds(self, count: int, step: float = 30) -> None:
        for _ in range(count):
            await self.watcher.round()
            self.now[0] += timedelta(seconds=step)

    async def ask(self, text: str, user: str = OPERATOR) -> str:
        before = len(self.slack.calls_to(f"response_url/{user}"))
        body = self.slack.slash_body(text, user_id=user, channel_id="C0OPS", response_url=self.slack.response_url(user))
        assert (await self.bot.post(body)).status == 200
        calls = await self.slack.wait_for(f"response_url/{user}", count=before + 1, timeout=20)
        return str(calls[-1].params.get("text", "")) + json.dumps(calls[-1].params.get("blocks", ""))


@pytest.fixture
async def world(fake_slack: FakeSlack, tmp_path: Path) -> AsyncIterator[World]:
    app = SampleAppState()
    runner, url = await start_sample_app(app)
    loaded = inventory(f"""
ops_channel: C0ALERTS
roles: {{viewer: ["*"], operator: [{OPERATOR}]}}
services:
  shop:
    components:
      api: {{type: http, url: "{url}", timeout: 2}}
""")
    try:
        async with running_bot(fake_slack, tmp_path, loaded) as bot:
            watcher = build_watcher(bot.container)
            assert watcher is not None
            now = [datetime.now(UTC)]
            watcher.clock = lambda: now[0]
            yield World(bot, fake_slack, app, watcher, now)
    finally:
        await runner.cleanup()


def alert_posts(slack: FakeSlack) -> list[object]:
    return [c for c in slack.calls_to("chat.postMessage") if c.params.get("channel") == "C0ALERTS"]


async def test_a_down_alert_is_posted_once_silenced_from_its_menu_and_resolved_by_an_edit(world: World) -> None:
    world.app.status = 503
    await world.rounds(4)  # 90 s down: ServiceDown (1 min) fires once
    [post] = alert_posts(world.slack)
    blocks = post.json_param("blocks")  # type: ignore[attr-defined]
    assert "ServiceDown" in json.dumps(blocks) and KEY in json.dumps(blocks)
    menu = blocks[-1]["elements"][0]
    assert menu["action_id"] == SILENCE_PICK and [o["value"] for o in menu["options"]] == ["1h", "4h", "24h"]
    assert blocks[-1]["block_id"] == f"alert:{KEY}"
    listing = await world.ask("alerts", VIEWER)
    assert f"`{KEY}` since" in listing
    body = world.slack.block_actions_body(
        SILENCE_PICK,
        "1h",
        user_id=OPERATOR,
        response_url=world.slack.response_url(OPERATOR),
        block_id=f"alert:{KEY}",
        element="static_select",
    )
    assert (await world.bot.post(body)).status == 200
    store = world.bot.container.store
    [silence] = await wait_until(lambda: store.active_silences(datetime.now(UTC)), "the menu choice silences the alert")
    assert silence.key == KEY and silence.by == OPERATOR
    events = [e for e in await world.bot.container.store.audit_events(limit=50) if e.command == "silence"]
    assert [e.actor for e in events] == [OPERATOR]
    assert f":zzz: `{KEY}`" in await world.ask("alerts", VIEWER)
    world.app.status = None
    await world.rounds(4)
    [edit] = [c for c in world.slack.calls_to("chat.update") if "Resolved" in str(c.params.get("text"))]
    assert edit.params["channel"] == "C0ALERTS"
    assert len(alert_posts(world.slack)) == 1  # resolved by editing, not by a new post


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"silence {KEY} forever", "is not a duration"),
        (f"silence {KEY} 9d", "from 1 minute to 7 days"),
        ("silence shop/api/NoSuchAlert 1h", "There is no alert `shop/api/NoSuchAlert`"),
        ("silence ../../x 1h", "`alert`"),
        (f"unsilence {KEY}", "is not silenced"),
    ],
)
async def test_bad_silences_are_one_sentence_and_store_nothing(world: World, text: str, expected: str) -> None:
    answer = await world.ask(text)
    assert expected in answer and "Traceback" not in answer
    assert await world.bot.container.store.active_silences(datetime.now(UTC)) == []


async def test_viewers_cannot_silence(world: World) -> None:
    assert "needs the operator role" in await world.ask(f"silence {KEY} 1h", VIEWER)
