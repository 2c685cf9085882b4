"""/ops api end to end: signed Slack requests to the real app and `opsbot run`, against a loopback fake
of the app's admin API; the reply passes the fake Slack's Block Kit checks; the JWT and the admin
credentials appear in no Slack call, log line or audit event."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from bot.logging import configure_logging
from handlers.admin_api import cell, render_table
from handlers.blocks import messages_for
from services.admin_api import AdminTable
from services.redaction import Redactor
from tests.bot.test_cli import opsbot
from tests.fixtures.admin_app import (
    ADMIN_ENV,
    ADMIN_PASSWORD,
    ADMIN_USER,
    FakeAdminApp,
    admin_api_yaml,
    serve_admin_app,
)
from tests.fixtures.slack import FakeSlack
from tests.fixtures.slack_checks import check_message
from tests.scenario.harness import all_text, inventory, running_bot

VIEWER = "U0VIEW1"


@pytest.fixture
async def fake() -> AsyncIterator[FakeAdminApp]:
    async with serve_admin_app() as app:
        yield app


def api_inventory(url: str, viewer: str = VIEWER) -> str:
    return f"""
roles:
  viewer: [{viewer}]
services:
  vcbl:
    components:{admin_api_yaml(url)}
"""


async def ask(bot: Any, slack: FakeSlack, text: str, user: str = VIEWER) -> str:
    name = f"r{uuid.uuid4().hex[:6]}"
    body = slack.slash_body(text, user_id=user, channel_id="C0OPS", response_url=slack.response_url(name))
    assert (await bot.post(body)).status == 200
    [answer] = await slack.wait_for(f"response_url/{name}", timeout=20)
    assert answer.params.get("response_type") == "ephemeral", answer.params
    return all_text(answer)


async def test_api_through_signed_slack_requests(
    fake: FakeAdminApp, fake_slack: FakeSlack, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging("json", "DEBUG", Redactor())
    capsys.readouterr()
    loaded = inventory(api_inventory(fake.url), ADMIN_ENV)
    async with running_bot(fake_slack, tmp_path, loaded) as bot:
        text = await ask(bot, fake_slack, "api vcbl videos")
        assert "Admin API: vcbl videos" in text
        assert "Lecture 20" in text and "Lecture 21" not in text
        assert "115 more not shown" in text and "20 of 135 shown" in text

        text = await ask(bot, fake_slack, "api vcbl prompts --limit 1")
        assert "기본 프롬프트" in text and "channel" not in text
        assert "1 more not shown" in text

        text = await ask(bot, fake_slack, "api vcbl prompts")
        assert "&lt;!channel&gt; &amp; co" in text and "<!channel>" not in text
        assert fake.logins == 1  # one login for the three reads

        for command, expected in (
            ("api vcbl videos --limit 0", "`--limit`: input should be greater than or equal to 1."),
            ("api vcbl videos --limit 101", "`--limit`: input should be less than or equal to 100."),
            ("api vcbl videos --limit many", "`--limit`: input should be a valid integer"),
            ("api vcbl users", "`vcbl`'s admin API has no endpoint `users`; it has `prompts`, `videos`."),
            ("api vcbl ../etc", "`endpoint`: `../etc` is not a valid endpoint."),
            ("api nowhere videos", "There is no service called `nowhere`."),
            ("api vcbl", "Missing `endpoint`."),
        ):
            assert expected in await ask(bot, fake_slack, command), command

        fake.mode = "401_always"
        text = await ask(bot, fake_slack, "api vcbl videos")
        assert "The admin credentials were refused by `vcbl/app`" in text
        fake.mode = "500"
        assert "answered HTTP 500" in await ask(bot, fake_slack, "api vcbl videos")

        events = await bot.container.store.audit_events(limit=200)
        assert any("api" in repr(e) for e in events)
        audit = "\n".join(repr(e) for e in events)

    said = "\n".join(all_text(c) + repr(c.params) for c in fake_slack.calls)
    captured = capsys.readouterr()
    everything = said + audit + captured.out + captured.err
    assert len(fake.issued) >= 2
    for secret in (ADMIN_USER, ADMIN_PASSWORD, *fake.issued):
        assert secret not in everything


async def test_api_with_opsbot_run(fake: FakeAdminApp, tmp_path: Path) -> None:
    config = tmp_path / "opsbot.yaml"
    config.write_text(api_inventory(fake.url, viewer='"*"'))
    env = {"OPSBOT_CONFIG": str(config), "OPSBOT_STATE_DIR": str(tmp_path / "state"), **ADMIN_ENV}

    code, out, err = await opsbot("run", "api vcbl videos --limit 3", env=env)
    assert code == 0, out + err
    assert "Admin API: vcbl videos" in out and "Lecture 3" in out and "Lecture 4" not in out
    assert "132 more not shown" in out

    fake.mode = "403"
    code, out, err = await opsbot("run", "api vcbl videos", env=env)
    assert code != 0
    assert "The admin credentials were refused by `vcbl/app`" in out + err
    assert "Traceback" not in out + err
    for secret in (ADMIN_USER, ADMIN_PASSWORD, *fake.issued):
        assert secret not in out + err


def test_the_table_stays_within_slacks_limits() -> None:
    long = "w" * 500
    table = AdminTable(
        service="vcbl", component="app", endpoint="prompts", path="/api/admin/prompts",
        columns=("id", "name", "text", "meta"),
        rows=[(i, f"<b>{i}</b> & `x`", long + "\n" + long, {"tags": ["a"] * 50}) for i in range(100)],
        count=100, total=5000, logged_in=False,
    )  # fmt: skip
    reply = render_table(table)
    [message] = messages_for(reply)  # one message: no continuation in a thread
    assert check_message({"channel": "C0OPS", "text": message.text, "blocks": message.blocks}) is None
    assert len(reply.blocks) <= 50
    texts = [
        block.get("text", {}).get("text", "") or block.get("elements", [{}])[0].get("text", "")
        for block in reply.blocks
    ]
    assert all(len(text) <= 3000 for text in texts)
    rendered = "\n".join(texts)
    assert "&lt;b&gt;0&lt;/b&gt; &amp; 'x'" in rendered and "<b>" not in rendered
    assert "4900 more not shown" in rendered
    assert cell(long) == "w" * 39 + "…" and cell(None) == "—" and cell(False) == "no"
    assert cell("a\nb\tc\u202e") == "a b c"
