"""/ops cost end to end: signed Slack requests to the real app and `opsbot run`, against moto's Cost
Explorer (results queued through its static endpoint); and the rendering of a report."""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from handlers.cost import render_cost
from services.cost import Anomaly, CostReport, ServiceCost
from services.health import Status
from tests.bot.test_cli import opsbot
from tests.fixtures.aws import FAKE_SECRET_ACCESS_KEY
from tests.fixtures.slack import FakeSlack
from tests.scenario.harness import all_text, inventory, running_bot
from tests.services.test_cost import GATEWAY, LAMBDA, LOGS, period, queue_results

VIEWER = "U0VIEW1"


def cost_inventory(endpoint: str, tag: str) -> str:
    return f"""
roles:
  viewer: [{VIEWER}]
services:
  work-logging:
    runbook: "002"
    components:
      api: {{type: http, url: "http://127.0.0.1:1"}}
    cost:
      tags: {{Project: {tag}}}
      endpoint_url: "{endpoint}"
      timeout: 10
  shop:
    components:
      api: {{type: http, url: "http://127.0.0.1:1"}}
"""


def daily(today: date, spike: float = 1.0) -> dict[str, Any]:
    """Daily results from the first of last month to yesterday: $1.75 a day; yesterday ``spike`` for
    Lambda instead of $1."""
    start = (today.replace(day=1) - timedelta(days=1)).replace(day=1)
    yesterday = today - timedelta(days=1)
    results = []
    day = start
    while day < today:
        lam = spike if day == yesterday else 1.0
        results.append(period(day, day + timedelta(days=1), {LAMBDA: lam, GATEWAY: 0.5, LOGS: 0.25}))
        day += timedelta(days=1)
    return {"ResultsByTime": results, "DimensionValueAttributes": []}


async def ask(bot: Any, slack: FakeSlack, text: str) -> str:
    name = f"r{uuid.uuid4().hex[:6]}"
    body = slack.slash_body(text, user_id=VIEWER, channel_id="C0OPS", response_url=slack.response_url(name))
    assert (await bot.post(body)).status == 200
    [answer] = await slack.wait_for(f"response_url/{name}", timeout=20)
    assert answer.params.get("response_type") == "ephemeral", answer.params
    return all_text(answer)


async def test_cost_through_signed_slack_requests(moto_endpoint: str, fake_slack: FakeSlack, tmp_path: Path) -> None:
    today = datetime.now(UTC).date()
    yesterday = today - timedelta(days=1)
    tag = f"work-logging-{uuid.uuid4().hex[:8]}"
    loaded = inventory(cost_inventory(moto_endpoint, tag))
    await queue_results(moto_endpoint, [daily(today, spike=12.0)])

    async with running_bot(fake_slack, tmp_path, loaded) as bot:
        text = await ask(bot, fake_slack, "cost work-logging")
        assert "AWS cost: work-logging" in text
        if today.day > 1:
            assert "month to date (to" in text.lower()
            assert "projected" in text
        assert "AWS Lambda" in text and "Amazon API Gateway" in text
        if today.day > 1:  # yesterday is in this month: its spike is one warning line
            assert f":warning: Cost anomaly on {yesterday:%a %b} {yesterday.day}: $12.75" in text
        assert f"tag Project={tag}" in text
        assert "read now" in text

        # Asked again the same day: answered from the cache (moto has no answer queued for a new query).
        again = await ask(bot, fake_slack, "cost work-logging")
        assert "kept until midnight UTC (each query costs $0.01)" in again

        # Bad input: one plain sentence each, nothing asked of AWS.
        assert "is in the future" in await ask(bot, fake_slack, f"cost work-logging --month {today.year + 1}-01")
        assert "is not a month: write it as YYYY-MM" in await ask(bot, fake_slack, "cost work-logging --month 11/2026")
        assert "shop declares no AWS cost" in await ask(bot, fake_slack, "cost shop")
        assert "There is no service called `nope`" in await ask(bot, fake_slack, "cost nope")

    said = "\n".join(all_text(c) for c in fake_slack.calls)
    assert FAKE_SECRET_ACCESS_KEY not in said


async def test_cost_with_opsbot_run(moto_endpoint: str, tmp_path: Path) -> None:
    today = datetime.now(UTC).date()
    tag = f"work-logging-{uuid.uuid4().hex[:8]}"
    config = tmp_path / "opsbot.yaml"
    config.write_text(cost_inventory(moto_endpoint, tag).replace(f"viewer: [{VIEWER}]", 'viewer: ["*"]'))
    await queue_results(moto_endpoint, [daily(today)])
    env = {"OPSBOT_CONFIG": str(config), "OPSBOT_STATE_DIR": str(tmp_path / "state")}

    code, out, err = await opsbot("run", "cost work-logging", env=env)

    assert code == 0, out + err
    assert "AWS cost: work-logging" in out and "AWS Lambda" in out
    assert FAKE_SECRET_ACCESS_KEY not in out + err

    code, out, err = await opsbot("run", "cost work-logging --month 2020-01", env=env)
    assert code != 0
    assert "more than 38 months ago" in out + err
    assert "Traceback" not in out + err


def report(**extra: Any) -> CostReport:
    values: dict[str, Any] = {
        "service": "work-logging",
        "scope": "tag Project=work-logging",
        "metric": "UnblendedCost",
        "unit": "USD",
        "month": date(2026, 11, 1),
        "to_date": True,
        "through": date(2026, 11, 15),
        "total": 35.25,
        "totals": {"UnblendedCost": 35.25, "BlendedCost": 31.73},
        "before": 23.25,
        "before_label": "same days of last month (Oct 1-15)",
        "top": [ServiceCost(LAMBDA, 24.0, 12.0), ServiceCost(GATEWAY, 7.5, 7.5)],
        "others": 3.75,
        "others_count": 1,
        "projection": 80.79,
        "daily_rate": 3.04,
        "anomalies": [Anomaly(date(2026, 11, 12), 10.75, 1.75)],
        "read_at": datetime(2026, 11, 16, 9, 30, tzinfo=UTC),
    }
    values.update(extra)
    return CostReport(**values)


def test_render_month_to_date() -> None:
    reply = render_cost(report())
    text = "\n".join(str(b) for b in reply.blocks)
    assert "Month to date (to Nov 15) $35.25 · same days of last month (Oct 1-15) $23.25 (+52 %)" in text
    assert "projected $80.79 by month end" in text
    assert ":warning: Cost anomaly on Thu Nov 12: $10.75, 6.1x the mean of the 7 days before ($1.75/day)" in text
    assert "`$24.00` AWS Lambda — was $12.00 (+100 %)" in text
    assert "`$3.75` 1 more AWS service(s)" in text
    assert "BlendedCost $31.73" in text
    assert reply.ephemeral and reply.status is Status.WARNING


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({"top": [], "others": 0.0, "others_count": 0, "total": 0.0, "before": 0.0, "anomalies": []},
         "No cost recorded for tag Project=work-logging in either period"),
        ({"to_date": False, "projection": None, "before_label": "October 2026", "month": date(2026, 11, 1)},
         "November 2026 $35.25 · October 2026 $23.25 (+52 %)"),
        ({"through": None, "total": 0.0, "projection": 46.5, "before": 48.05, "before_label": "October 2026 in all"},
         "No full day of November 2026 yet · October 2026 in all: $48.05"),
    ],
)  # fmt: skip
def test_render_variants(extra: dict[str, Any], expected: str) -> None:
    text = "\n".join(str(b) for b in render_cost(report(**extra)).blocks)
    assert expected in text


async def test_the_daily_digest_has_a_cost_line_per_service_and_warns_of_an_anomaly(
    moto_endpoint: str, fake_slack: FakeSlack, tmp_path: Path
) -> None:
    from handlers.digest import build_digest

    now = datetime.now(UTC)
    today = now.date()
    tag = f"work-logging-{uuid.uuid4().hex[:8]}"
    text = cost_inventory(moto_endpoint, tag) + (
        "    cost: {accounts: ['123456789012'], endpoint_url: 'http://127.0.0.1:1', timeout: 5}\n"
    )  # shop's Cost Explorer is unreachable: its line says so, the digest goes on
    await queue_results(moto_endpoint, [daily(today, spike=12.0)])

    async with running_bot(fake_slack, tmp_path, inventory(text)) as bot:
        digest = await build_digest(bot.container.deps, "daily", now=now)

    said = "\n".join(str(b) for b in digest.blocks)
    assert "*AWS cost*" in said
    assert "*work-logging* AWS cost: " in said
    assert "*shop* AWS cost could not be read — Could not connect to http://127.0.0.1:1" in said
    yesterday = today - timedelta(days=1)
    if today.day > 1:  # yesterday is in this month: the anomaly is a warning and a problem
        assert "month to date (to" in said and "projected" in said
        expected = f"Cost anomaly on {yesterday:%a %b} {yesterday.day}: $12.75"
        assert any(p.key == f"cost:work-logging:{yesterday.isoformat()}" for p in digest.problems)
        assert expected in digest.text
