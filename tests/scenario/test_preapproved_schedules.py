"""A scheduled destructive command runs unasked only when the approval policy pre-approves it for that
schedule and its plan is below the ceiling (DESIGN: pre-approved schedules); otherwise the plan is posted
for approval and nothing is deleted. Files under a real directory, the real container, the fake Slack."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from bot.scheduler import SCHEDULER_USER, build_scheduler
from services.state import ApprovalState
from tests.fixtures.slack import FakeSlack
from tests.scenario.harness import Bot, all_text, approval_id_of, inventory, running_bot

S = ApprovalState
NOW = datetime.now(UTC)
FIRE = datetime(2026, 11, 22, 18, 30, tzinfo=UTC)  # 03:30 on the 23rd in Seoul


def cleanup_inventory(root: Path, *, max_items: int, share: str = "") -> str:
    return f"""
ops_channel: C0OPSCHAN
timezone: Asia/Seoul
roles: {{approver: [U0APP1]}}
approvals:
  schedules:
    nightly-cleanup: {{command: cleanup, max_items: {max_items}{share}}}
schedules:
  - {{name: nightly-cleanup, cron: "30 3 * * *", command: "cleanup vcc"}}
  - {{name: other-cleanup, cron: "30 4 * * *", command: "cleanup vcc"}}
services:
  vcc:
    components:
      api: {{type: http, url: "http://127.0.0.1:9"}}
    cleanup:
      roots: {{tmp: "{root}"}}
      files:
        - {{name: temp-uploads, root: tmp, match: "upload_*", older_than_days: 1}}
"""


def make(path: Path, *, days: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    moment = (NOW - timedelta(days=days)).timestamp()
    os.utime(path, (moment, moment))


@dataclass
class World:
    bot: Bot
    slack: FakeSlack
    root: Path

    async def fire(self, name: str, at: datetime = FIRE) -> str:
        scheduler = build_scheduler(self.bot.container, holder="a", clock=lambda: at + timedelta(seconds=20))
        assert scheduler is not None
        [fired] = [f for f in await scheduler.tick() if f.name == name]
        return fired.outcome

    def left(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir())

    def channel_posts(self) -> list[str]:
        return [all_text(c) for c in self.slack.calls_to("chat.postMessage") if c.params.get("channel") == "C0OPSCHAN"]


@pytest.fixture
async def world(fake_slack: FakeSlack, tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[World]:
    root = tmp_path / "tmp"
    for i in range(3):
        make(root / f"upload_{i}", days=3)
    make(root / "upload_fresh", days=0)
    max_items, share = request.param
    loaded = inventory(cleanup_inventory(root, max_items=max_items, share=share))
    async with running_bot(fake_slack, tmp_path / "state", loaded) as bot:
        yield World(bot, fake_slack, root)


@pytest.mark.parametrize("world", [(5, "")], indirect=True)
async def test_below_the_ceiling_the_schedule_runs_it_unasked_and_is_audited_as_the_approver(world: World) -> None:
    outcome = await world.fire("nightly-cleanup")

    assert world.left() == ["upload_fresh"]
    assert outcome.startswith("succeeded: /ops cleanup vcc")
    [approval] = await world.bot.container.store.list_approvals(list(S))
    assert approval.state is S.SUCCEEDED and approval.decided_by == "schedule:nightly-cleanup"
    assert approval.requester == SCHEDULER_USER and approval.votes == ()
    [posted] = world.channel_posts()
    assert "Pre-approved: schedule `nightly-cleanup` may run `/ops cleanup` unasked up to 5 item(s); this plan: 3." in (
        posted
    )
    assert "approved by schedule:nightly-cleanup" in posted and "Cleaned up vcc: deleted 3 file(s) (3 B)." in posted
    assert not any(approval_id_of(c) for c in world.slack.calls_to("chat.postMessage"))  # no buttons anywhere
    events = [(e.actor, e.command, e.outcome) for e in await world.bot.container.store.audit_events(limit=20)]
    assert ("schedule:nightly-cleanup", "approval approved", "approved") in events
    assert ("opsbot", "approval succeeded", "succeeded") in events
    assert (SCHEDULER_USER, "cleanup", "ok") in events


@pytest.mark.parametrize("world", [(2, "")], indirect=True)
async def test_above_the_ceiling_the_plan_is_posted_for_approval_and_nothing_is_deleted(world: World) -> None:
    outcome = await world.fire("nightly-cleanup")

    assert world.left() == ["upload_0", "upload_1", "upload_2", "upload_fresh"]
    [approval] = await world.bot.container.store.list_approvals(list(S))
    assert approval.state is S.PENDING and approval.decided_by is None
    assert outcome.startswith("pending: /ops cleanup vcc")
    [call] = [c for c in world.slack.calls_to("chat.postMessage") if c.params.get("channel") == "C0OPSCHAN"]
    assert approval_id_of(call) == approval.id  # the buttons are there
    assert "Posted for approval: it deletes 3 item(s), above the 2 schedule `nightly-cleanup` is pre-approved for." in (
        all_text(call)
    )
    events = [(e.actor, e.command) for e in await world.bot.container.store.audit_events(limit=20)]
    assert not any(actor.startswith("schedule:") for actor, _ in events)


@pytest.mark.parametrize("world", [(5, ", max_share_pct: 50")], indirect=True)
async def test_a_share_ceiling_the_plan_cannot_measure_is_posted_for_approval(world: World) -> None:
    await world.fire("nightly-cleanup")

    [approval] = await world.bot.container.store.list_approvals(list(S))
    assert approval.state is S.PENDING
    assert "this plan cannot say what share it is" in world.channel_posts()[0]
    assert len(world.left()) == 4


@pytest.mark.parametrize("world", [(5, "")], indirect=True)
async def test_another_schedule_of_the_same_command_is_not_pre_approved(world: World) -> None:
    await world.fire("other-cleanup", FIRE + timedelta(hours=1))

    [approval] = await world.bot.container.store.list_approvals(list(S))
    assert approval.state is S.PENDING
    posted = world.channel_posts()[0]
    assert "Pre-approved" not in posted and "Posted for approval" not in posted
    assert len(world.left()) == 4
