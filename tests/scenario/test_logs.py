"""/ops logs end to end: signed slash commands and a Next page click through the real app, replies checked
by the fake Slack (Block Kit, sizes, files.uploadV2); planted secrets never reach Slack."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from handlers.logs import NEXT_PAGE
from tests.fixtures.slack import Call, FakeSlack
from tests.scenario.harness import Bot, all_text, inventory, running_bot

READER, VIEWER = "U0READER1", "U0VIEW1"
SECRETS = ("Planted-Pw-0042", "AKIAPLANTEDKEY000042", "dsnPlanted42")


def line(at: datetime, level: str, message: str) -> str:
    return json.dumps({"timestamp": at.isoformat(), "level": level, "message": message}) + "\n"


@pytest.fixture
async def bot(fake_slack: FakeSlack, tmp_path: Path) -> AsyncIterator[Bot]:
    logs = tmp_path / "log"
    logs.mkdir()
    now = datetime.now(UTC)
    lines = [line(now - timedelta(seconds=900 - i), "info", f"request {i} " + "z" * 120) for i in range(700)]
    lines += [
        line(now - timedelta(seconds=60), "error", f"login failed password={SECRETS[0]}"),
        line(now - timedelta(seconds=50), "error", f"s3 upload with {SECRETS[1]} denied"),
        line(now - timedelta(seconds=40), "error", f"db postgres://app:{SECRETS[2]}@db/app refused"),
    ]
    (logs / "app.log").write_text("".join(lines))
    loaded = inventory(f"""
roles:
  viewer: [{READER}, {VIEWER}]
  read: {{shop: [{READER}]}}
services:
  shop:
    components:
      app: {{type: logfile, path: "{logs}/app.log"}}
""")
    async with running_bot(fake_slack, tmp_path, loaded) as running:
        yield running


def posted(slack: FakeSlack) -> list[Call]:
    return slack.calls_to("chat.postMessage") + slack.calls_to("chat.update")


async def test_logs_through_slack_with_next_page_and_a_file(bot: Bot, fake_slack: FakeSlack) -> None:
    answer = await bot.command("logs shop app --limit 1000", user=READER)
    assert answer.status == 200 and answer.seconds < 3
    [message] = await fake_slack.wait_for("chat.postMessage", timeout=20)
    text = all_text(message)
    assert "Logs of shop/app" in text and "703 matched" in text and "password=***" in text
    await fake_slack.wait_for("files.completeUploadExternal", timeout=20)
    [upload] = [c for c in fake_slack.calls if c.method.startswith("upload/")]
    assert b"request 0 " in upload.raw and b"password=***" in upload.raw
    for secret in SECRETS:
        assert all(secret not in json.dumps(c.params) for c in fake_slack.calls), secret
        assert secret.encode() not in upload.raw
    assert not [b for b in message.json_param("blocks") if b.get("type") == "actions"]  # one page held it all

    # The small page first, then Next page clicked: the older lines, posted again as the clicker.
    before = len(fake_slack.calls_to("chat.postMessage"))
    small = await bot.command("logs shop app --limit 2", user=READER)
    assert small.status == 200
    calls = await fake_slack.wait_for("chat.postMessage", count=before + 1, timeout=20)
    blocks = calls[-1].json_param("blocks")
    [actions] = [b for b in blocks if b.get("type") == "actions"]
    value = actions["elements"][0]["value"]
    first = all_text(calls[-1])
    assert "db postgres://app:***@db/app refused" in first and "s3 upload with *** denied" in first
    url = fake_slack.response_url(READER)
    body = fake_slack.block_actions_body(NEXT_PAGE, value, user_id=READER, block_id="logs_next", response_url=url)
    assert (await bot.post(body)).status == 200
    calls = await fake_slack.wait_for("chat.postMessage", count=before + 2, timeout=20)
    second = all_text(calls[-1])
    assert "login failed password=***" in second and "request 699 " in second
    assert "s3 upload" not in second


async def test_a_viewer_without_read_permission_is_refused_in_one_sentence(bot: Bot, fake_slack: FakeSlack) -> None:
    assert (await bot.command("logs shop", user=VIEWER)).status == 200
    [reply] = await fake_slack.wait_for("response_url/default", timeout=20)
    assert "Reading the logs of `shop` is not given to you" in str(reply.params.get("text"))
    assert fake_slack.calls_to("chat.postMessage") == []
