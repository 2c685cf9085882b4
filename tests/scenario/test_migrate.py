"""/ops migrate and /ops migrate status end to end: signed Slack requests (plan, approve, progress edits,
result) and `opsbot run`'s console, with the real google-cloud-run clients against the gRPC fake of
Cloud Run's Jobs, Executions and Operations APIs."""

from __future__ import annotations

import io
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest

from bot.console import Console
from handlers.approvals import APPROVE
from services.state import Approval, ApprovalState
from tests.fixtures.cloudrun_jobs import FakeCloudRunJobs, start_cloudrun_jobs_fake
from tests.fixtures.slack import Call, FakeSlack
from tests.fixtures.wait import wait_until
from tests.scenario.harness import Bot, all_text, inventory, running_bot

S = ApprovalState
OPERATOR, APPROVER, VIEWER = "U0OPER1", "U0APPR1", "U0VIEW1"
JOB = "vcbl-chatbot-migrate"
LOGS = "https://console.cloud.google.com/run/jobs/executions/details/asia-northeast3/{}/logs?project=demo-project"

INVENTORY = f"""
roles:
  viewer: [{VIEWER}]
  operator: [{OPERATOR}]
  approver: [{APPROVER}]
services:
  vcbl:
    components:
      run: {{type: cloudrun, project: demo-project, region: asia-northeast3, service: vcbl-chatbot,
             migrate_job: {{job: {JOB}, timeout: 20, poll_seconds: 0.02}}}}
  plain:
    components:
      run: {{type: cloudrun, project: demo-project, region: asia-northeast3, service: plain}}
  ghost:
    components:
      run: {{type: cloudrun, project: demo-project, region: asia-northeast3, service: ghost,
             migrate_job: ghost-migrate}}
  slow:
    components:
      run: {{type: cloudrun, project: demo-project, region: asia-northeast3, service: slow,
             migrate_job: {{job: slow-migrate, timeout: 0.3, poll_seconds: 0.05}}}}
"""


def texts(call: Call) -> str:
    return str(call.params.get("text", "")) + json.dumps(call.params.get("blocks", ""), ensure_ascii=False)


@dataclass
class World:
    bot: Bot
    slack: FakeSlack
    fake: FakeCloudRunJobs

    async def ask(self, text: str, user: str = OPERATOR) -> None:
        body = self.slack.slash_body(text, user_id=user, channel_id="C0OPS", response_url=self.slack.response_url(user))
        assert (await self.bot.post(body)).status == 200

    async def answer(self, user: str = OPERATOR) -> str:
        calls = await self.slack.wait_for(f"response_url/{user}", timeout=20)
        return texts(calls[-1])

    async def request(self, text: str) -> Approval:
        before = len(self.slack.calls_to("chat.postMessage"))
        await self.ask(text)
        return await self.bot.plan_posted(before)

    async def approve(self, approval: Approval) -> Approval:
        body = self.slack.block_actions_body(
            APPROVE, approval.id, user_id=APPROVER, response_url=self.slack.response_url(APPROVER)
        )
        assert (await self.bot.post(body)).status == 200
        return await self.bot.settled(approval, timeout=30)

    async def nothing_stored(self) -> None:
        assert await self.bot.container.store.list_approvals(list(S)) == []


@pytest.fixture
async def world(fake_slack: FakeSlack, tmp_path: Path) -> AsyncIterator[World]:
    fake = await start_cloudrun_jobs_fake(jobs=(JOB, "slow-migrate"))
    try:
        async with running_bot(fake_slack, tmp_path, inventory(INVENTORY)) as bot:
            assert bot.container.deps.deploys is not None
            bot.container.deps.deploys.cloudrun_channel = fake.channel
            yield World(bot, fake_slack, fake)
    finally:
        await fake.close()


async def test_migrate_plans_runs_after_approval_reports_progress_and_links_the_logs(world: World) -> None:
    last = world.fake.add_execution(JOB, outcome="succeeded", took=42, ago=timedelta(days=3))
    world.fake.polls_to_finish, world.fake.hang = 3, True  # held running until its progress is seen
    approval = await world.request("migrate vcbl")
    assert (
        approval.summary == f"Execute the migration job of vcbl: Cloud Run job {JOB} in asia-northeast3 (demo-project)"
    )
    details = "\n".join(approval.plan["details"])
    assert f"last execution: :white_check_mark: `{last}` · succeeded" in details and "took 42 s" in details
    assert "flask" not in details and "image: `asia-docker.pkg.dev/demo-project/apps/shop:v1`" in details
    assert approval.plan["facts"]["running"] == "none"
    assert world.fake.calls("RunJob") == []  # nothing runs before the approval

    body = world.slack.block_actions_body(
        APPROVE, approval.id, user_id=APPROVER, response_url=world.slack.response_url(APPROVER)
    )
    assert (await world.bot.post(body)).status == 200
    [new] = await wait_until(lambda: [n for n in world.fake.executions if n != last], "the job is executed")
    line = f"`{new}`: 1 running, 0 succeeded, 0 failed, 0 cancelled of 1 task(s)"

    def shown() -> list[Call]:
        return [c for c in world.slack.calls_to("chat.update") if c.params.get("ts") == approval.message_ts
                and line in all_text(c)]  # fmt: skip

    await wait_until(shown, "the task counts are shown in the approval's message", timeout=20)
    world.fake.scripts[new].hang = False  # now let it finish
    final = await world.bot.settled(approval, timeout=30)
    assert final.state is S.SUCCEEDED, final.result
    [run] = world.fake.calls("RunJob")
    assert run.name.endswith(f"/jobs/{JOB}")
    assert final.result.startswith(f"Migration of vcbl succeeded: execution `{new}` of job {JOB} took ")
    assert "tasks: 0 running, 1 succeeded, 0 failed, 0 cancelled of 1 task(s)" in final.result
    assert LOGS.format(new) in final.result


async def test_a_failed_migration_fails_the_run_with_the_task_error_and_the_logs(world: World) -> None:
    world.fake.fail_with = "alembic.util.exc.CommandError: Can't locate revision identified by 'abc123'"
    approval = await world.request("migrate vcbl")
    final = await world.approve(approval)
    assert final.state is S.FAILED
    [name] = world.fake.executions
    assert final.result.startswith(f"Migration of vcbl failed: execution `{name}` of job {JOB}: Task {name}-task0")
    assert "Can't locate revision" in final.result
    assert "0 succeeded, 1 failed" in final.result and LOGS.format(name) in final.result


async def test_a_migration_that_does_not_finish_in_time_fails_and_says_it_may_still_run(world: World) -> None:
    world.fake.hang = True
    approval = await world.request("migrate slow")
    final = await world.approve(approval)
    assert final.state is S.FAILED
    [name] = world.fake.executions
    assert final.result.startswith(f"Failed: Execution `{name}` of Cloud Run job slow-migrate did not finish within")
    assert "it may still be running" in final.result


async def test_a_migration_started_between_plan_and_approval_stops_the_run(world: World) -> None:
    approval = await world.request("migrate vcbl")
    other = world.fake.add_execution(JOB, outcome="running", ago=timedelta(seconds=5))
    final = await world.approve(approval)
    assert final.state is S.FAILED and final.result.startswith("Did not run: what the plan saw has changed")
    assert f"running: none → {other}" in final.result
    assert world.fake.calls("RunJob") == []


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("migrate nosuch", "There is no service called `nosuch`."),
        ("migrate plain", "`plain` declares no migration job (a cloudrun component with `migrate_job:`)."),
        ("migrate vcbl web", "`vcbl` has no migration job on `web`; known: `run`."),
        ("migrate ghost", "There is no Cloud Run job ghost-migrate in asia-northeast3 (demo-project)."),
        ("migrate status plain", "`plain` declares no migration job"),
    ],
)
async def test_bad_migrate_requests_are_one_sentence_and_nothing_runs(world: World, text: str, expected: str) -> None:
    await world.ask(text)
    answer = await world.answer()
    assert expected in answer and "Traceback" not in answer
    await world.nothing_stored()
    assert world.fake.calls("RunJob") == []


async def test_a_migration_already_running_is_refused_naming_it(world: World) -> None:
    running = world.fake.add_execution(JOB, outcome="running", ago=timedelta(minutes=4))
    await world.ask("migrate vcbl")
    answer = await world.answer()
    assert f"Execution `{running}` of Cloud Run job {JOB} is still running since" in answer
    assert "wait for it to finish" in answer
    await world.nothing_stored()
    assert world.fake.calls("RunJob") == []


@pytest.mark.parametrize(
    ("method", "needs"),
    [("GetJob", "run.jobs.get"), ("ListExecutions", "run.executions.list")],
)
async def test_permission_denied_names_the_permission_and_nothing_runs(world: World, method: str, needs: str) -> None:
    world.fake.denied.add(method)
    await world.ask("migrate vcbl")
    answer = await world.answer()
    assert "The bot's Google credentials may not" in answer and f"(it needs {needs})" in answer
    await world.nothing_stored()
    assert world.fake.calls("RunJob") == []


async def test_permission_to_run_denied_after_approval_fails_the_run_in_one_sentence(world: World) -> None:
    approval = await world.request("migrate vcbl")
    world.fake.denied.add("RunJob")
    final = await world.approve(approval)
    assert final.state is S.FAILED
    assert final.result == (
        f"Failed: The bot's Google credentials may not execute Cloud Run job {JOB} (it needs run.jobs.run)."
    )
    assert world.fake.executions == {}


async def test_migrate_status_lists_recent_executions_with_outcome_and_duration(world: World) -> None:
    names = [
        world.fake.add_execution(JOB, outcome=outcome, took=took, ago=timedelta(days=days))
        for days, outcome, took in [(3, "succeeded", 42), (2, "failed", 7), (1, "succeeded", 65)]
    ]
    await world.ask("migrate status vcbl", VIEWER)
    answer = await world.answer(VIEWER)
    assert "Migrations of vcbl (vcbl-chatbot-migrate): 3 recent execution(s), 2 succeeded, 1 failed" in answer
    newest, failed = answer.index(names[2]), answer.index(names[1])
    assert newest < failed < answer.index(names[0])  # newest first
    assert "succeeded · " in answer and "took 65 s" in answer and "took 7 s" in answer
    assert f"Task {names[1]}-task0 failed." in answer
    assert LOGS.format(names[2]) in answer
    assert world.fake.calls("RunJob") == []


async def test_viewers_may_look_but_not_migrate(world: World) -> None:
    await world.ask("migrate vcbl", VIEWER)
    assert "needs the operator role" in await world.answer(VIEWER)
    await world.nothing_stored()


async def test_opsbot_run_shows_migration_status_and_refuses_bad_input(world: World) -> None:
    name = world.fake.add_execution(JOB, outcome="succeeded", took=12)
    out = io.StringIO()
    console = Console(world.bot.container, None, out=out)
    assert await console.run_once("migrate status vcbl") == 0
    assert f"`{name}` · succeeded" in out.getvalue()
    assert "took 12 s" in out.getvalue()
    assert await console.run_once("migrate plain") == 3
    assert "`plain` declares no migration job (a cloudrun component with `migrate_job:`)." in out.getvalue()
    assert world.fake.calls("RunJob") == []
