"""/ops queue, queue clean and queue retry through signed Slack requests and `opsbot run`, on queues
written by the real Bull 4, BullMQ 5 and BullMQ 6 libraries."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from handlers.approvals import APPROVE
from services.state import Approval, ApprovalState
from tests.fixtures.bull import LIBRARIES, NodeQueues, inventory_library, node_queues  # noqa: F401
from tests.fixtures.slack import FakeSlack
from tests.scenario.harness import Bot, all_text, inventory, running_bot

S = ApprovalState
VIEWER, REQUESTER, APPROVER = "U0VIEW1", "U0REQ1", "U0APP1"
ROOT = Path(__file__).parents[2]
_prefixes = itertools.count()
OLD_AND_NEW = [
    {"days_ago": 10, "completed": 3, "failed": ["ComfyUI timeout", "ComfyUI timeout"]},
    {"completed": 2, "failed": ["out of memory"]},
]


def queue_inventory(library: str, prefix: str, names: str = "[images]") -> str:
    return f"""
roles:
  viewer: [{VIEWER}]
  operator: [{REQUESTER}]
  approver: [{APPROVER}]
services:
  vcc:
    components:
      redis:
        type: redis
        url: "${{VCC_REDIS}}"
        queues: {{library: {library}, prefix: {prefix}, names: {names}}}
"""


@dataclass
class World:
    bot: Bot
    slack: FakeSlack
    url: str
    spec: dict[str, str]
    node: NodeQueues

    async def ask(self, text: str, user: str = REQUESTER) -> str:
        """The one ephemeral answer to a command."""
        name = f"r{len(self.slack.calls)}"
        body = self.slack.slash_body(text, user_id=user, channel_id="C0OPS", response_url=self.slack.response_url(name))
        assert (await self.bot.post(body)).status == 200
        [answer] = await self.slack.wait_for(f"response_url/{name}", timeout=20)
        assert answer.params.get("response_type") == "ephemeral", answer.params
        return all_text(answer)

    async def request(self, text: str) -> Approval:
        before = len(self.slack.calls_to("chat.postMessage"))
        assert (await self.bot.command(text, user=REQUESTER)).status == 200
        posts = await self.slack.wait_for("chat.postMessage", count=before + 1, timeout=20)
        return await self.bot.approval_posted(posts[-1].params["blocks"][-1]["elements"][0]["value"])

    async def approve(self, approval: Approval) -> Approval:
        body = self.slack.block_actions_body(
            APPROVE, approval.id, user_id=APPROVER, response_url=self.slack.response_url(APPROVER)
        )
        assert (await self.bot.post(body)).status == 200
        return await self.bot.settled(approval)

    async def read(self) -> dict[str, object]:
        return await self.node.read(self.url, **self.spec)


@contextlib.asynccontextmanager
async def open_world(
    fake_slack: FakeSlack, tmp_path: Path, redis_url: str, node: NodeQueues, library: str, **seed: object
) -> AsyncIterator[World]:
    spec = {"library": library, "prefix": f"s{next(_prefixes)}", "queue": "images"}
    if seed:
        await node.seed(redis_url, **spec, **seed)
    loaded = inventory(queue_inventory(inventory_library(library), spec["prefix"]), env={"VCC_REDIS": redis_url})
    async with running_bot(fake_slack, tmp_path, loaded) as bot:
        yield World(bot, fake_slack, redis_url, spec, node)


@pytest.fixture(params=LIBRARIES)
async def world(
    request: pytest.FixtureRequest,
    fake_slack: FakeSlack,
    tmp_path: Path,
    redis_url: str,
    node_queues: NodeQueues,  # noqa: F811
) -> AsyncIterator[World]:
    async with open_world(
        fake_slack, tmp_path, redis_url, node_queues, request.param, phases=OLD_AND_NEW, waiting=2, delayed=1
    ) as w:
        yield w


async def test_queue_shows_counts_health_and_failure_reasons(world: World) -> None:
    text = await world.ask("queue vcc", user=VIEWER)
    seen = await world.read()
    counts = seen["counts"]
    assert isinstance(counts, dict)
    assert f"completed {counts['completed']}" in text and f"failed {counts['failed']}" in text
    assert f"delayed {counts['delayed']}" in text and "waiting 2" in text
    assert "oldest waiting job:" in text and "finished" in text
    assert "ComfyUI timeout (2)" in text and "out of memory (1)" in text
    assert f"*images* ({inventory_library(world.spec['library'])}" in text
    one = await world.ask("queue vcc images", user=VIEWER)
    assert "*images*" in one and "ComfyUI timeout (2)" in one


async def test_clean_plans_exact_ids_and_after_approval_the_library_reads_the_rest(world: World) -> None:
    before = await world.read()
    approval = await world.request("queue clean vcc images completed --older-than 7d")
    [post] = world.slack.calls_to("chat.postMessage")
    shown = all_text(post)
    assert "Remove 3 completed job(s) finished before" in shown and "from queue `images` in vcc/redis" in shown
    assert approval.plan["params"]["count"] == 3 and "ids" not in approval.plan["params"]
    assert approval.state is S.PENDING

    final = await world.approve(approval)
    assert final.state is S.SUCCEEDED, final.result
    assert final.result.startswith("Removed 3 of 3 planned completed job(s) of `images`.")
    after = await world.read()
    ids_before, ids_after = before["ids"], after["ids"]
    assert isinstance(ids_before, dict) and isinstance(ids_after, dict)
    removed = set(ids_before["completed"]) - set(ids_after["completed"])
    assert len(removed) == 3 and len(ids_after["completed"]) == 2
    assert {k: v for k, v in ids_after.items() if k != "completed"} == {
        k: v for k, v in ids_before.items() if k != "completed"
    }
    thread = [c for c in world.slack.calls_to("chat.postMessage") if c.params.get("thread_ts") == final.message_ts]
    assert thread and "Removed 3 of 3" in all_text(thread[-1])


async def test_retry_moves_failed_jobs_back_to_waiting_after_approval(world: World) -> None:
    before = await world.read()
    approval = await world.request("queue retry vcc images")
    assert "Move 3 failed job(s) of queue `images` in vcc/redis back to waiting" in approval.summary
    final = await world.approve(approval)
    assert final.state is S.SUCCEEDED, final.result
    assert final.result.startswith("Retried 3 of 3 planned failed job(s)")
    after = await world.read()
    ids = after["ids"]
    assert isinstance(ids, dict) and ids["failed"] == [] and len(ids["waiting"]) == 5
    # A worker of the real library takes them: the retried jobs fail again, the two waiting ones complete.
    await world.node.work(world.url, **world.spec)
    again = await world.read()
    ids_before, ids_again, counts = before["ids"], again["ids"], again["counts"]
    assert isinstance(ids_before, dict) and isinstance(ids_again, dict) and isinstance(counts, dict)
    assert sorted(ids_again["failed"]) == sorted(ids_before["failed"]) and len(ids_before["failed"]) == 3
    assert sorted(ids_again["completed"]) == sorted(ids_before["completed"] + ids_before["waiting"])
    assert counts["waiting"] == 0 and counts["delayed"] == 1


@pytest.mark.parametrize("library", LIBRARIES)
async def test_a_paused_queue_is_shown_paused_and_retried_where_the_library_keeps_its_jobs(
    fake_slack: FakeSlack,
    tmp_path: Path,
    redis_url: str,
    node_queues: NodeQueues,  # noqa: F811
    library: str,
) -> None:
    seed: dict[str, object] = {"phases": [{"failed": ["boom"]}], "waiting": 2, "paused": True}
    async with open_world(fake_slack, tmp_path, redis_url, node_queues, library, **seed) as world:
        text = await world.ask("queue vcc", user=VIEWER)
        seen = await world.read()
        counts = seen["counts"]
        assert isinstance(counts, dict) and seen["paused"] is True
        assert (
            "*paused*" in text and f"waiting {counts['waiting']} ·" in text and f"paused {counts['paused']} ·" in text
        )
        # BullMQ 6 keeps a paused queue's jobs in `wait` (the `meta` flag says paused); Bull and BullMQ 5 in `paused`.
        holds = "waiting" if library == "bullmq6" else "paused"
        assert counts[holds] == 2 and counts["waiting"] + counts["paused"] == 2

        final = await world.approve(await world.request("queue retry vcc images"))
        assert final.state is S.SUCCEEDED and final.result.startswith("Retried 1 of 1"), final.result
        after = await world.read()
        after_counts, after_ids = after["counts"], after["ids"]
        assert isinstance(after_counts, dict) and isinstance(after_ids, dict) and after["paused"] is True
        assert after_counts[holds] == 3 and after_counts["failed"] == 0

        await world.node.resume(world.url, **world.spec)
        await world.node.work(world.url, **world.spec)
        done = await world.read()
        done_ids = done["ids"]
        assert isinstance(done_ids, dict) and done["paused"] is False
        assert len(done_ids["failed"]) == 1 and len(done_ids["completed"]) == 2 and done_ids["waiting"] == []


async def test_a_plan_whose_list_changed_does_not_run(world: World) -> None:
    approval = await world.request("queue clean vcc images failed")
    ref = approval.plan["params"]["ids_ref"]  # the list lives in the state directory, named by its hash
    state_dir = Path(world.bot.container.settings.state_dir)
    [path] = await asyncio.to_thread(lambda: list(state_dir.rglob(f"{ref}.*")))
    await asyncio.to_thread(path.unlink)
    final = await world.approve(approval)
    assert final.state is S.FAILED and final.result.startswith("Did not run: what the plan saw has changed")
    ids = (await world.read())["ids"]
    assert isinstance(ids, dict) and len(ids["failed"]) == 3


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("queue nosuch", "There is no service called `nosuch`"),
        ("queue vcc nope", "`vcc` has no queue `nope`; its declared queues are `images`."),
        ("queue vcc 'im*'", "`im*` is not a queue name"),
        ("queue clean vcc ../etc completed", "`../etc` is not a queue name"),
        ("queue clean vcc images completed --older-than 0d", "`--older-than` must be between 1 minute and 365 days."),
        ("queue clean vcc images completed --older-than 400d", "`--older-than` must be between"),
        ("queue clean vcc images completed --older-than soon", "`--older-than` is a number of minutes"),
        ("queue clean vcc images waiting", "`state`: input should be 'completed' or 'failed'"),
        ("queue retry vcc 'a:b'", "`a:b` is not a queue name"),
    ],
)
async def test_bad_input_is_one_sentence_and_nothing_runs(
    fake_slack: FakeSlack,
    tmp_path: Path,
    redis_url: str,
    node_queues: NodeQueues,  # noqa: F811
    text: str,
    expected: str,
) -> None:
    async with open_world(fake_slack, tmp_path, redis_url, node_queues, "bull") as world:
        first, *_ = (await world.ask(text)).splitlines()  # the fallback text, then the one section
        assert expected in first and "Usage" not in first.split(expected)[0], first
        assert fake_slack.calls_to("chat.postMessage") == []
        assert await world.bot.container.store.list_approvals(list(S)) == []


async def test_an_empty_plan_says_so_and_asks_nothing(
    fake_slack: FakeSlack,
    tmp_path: Path,
    redis_url: str,
    node_queues: NodeQueues,  # noqa: F811
) -> None:
    async with open_world(fake_slack, tmp_path, redis_url, node_queues, "bullmq", waiting=1) as world:
        assert (await world.ask("queue clean vcc images failed")).startswith(
            "No failed job in `images`: nothing to clean."
        )
        assert (await world.ask("queue retry vcc images")).startswith("No failed job in `images`: nothing to retry.")
        assert fake_slack.calls_to("chat.postMessage") == []
        assert await world.bot.container.store.list_approvals(list(S)) == []


async def test_opsbot_run_shows_the_queue(tmp_path: Path, redis_url: str, node_queues: NodeQueues) -> None:  # noqa: F811
    prefix = f"s{next(_prefixes)}"
    await node_queues.seed(redis_url, library="bull", prefix=prefix, queue="images", phases=[{"failed": ["boom"]}])
    config = tmp_path / "opsbot.yaml"
    config.write_text(queue_inventory("bull", prefix))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLACK_", "OPSBOT_"))}
    env |= {"OPSBOT_CONFIG": str(config), "OPSBOT_STATE_DIR": str(tmp_path / "state"), "VCC_REDIS": redis_url}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bot.cli", "run", "queue vcc",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env, cwd=ROOT,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    text = out.decode()
    assert "images (bull, prefix" in text and "failed 1" in text and "boom (1)" in text
