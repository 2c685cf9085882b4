"""Deploy control end to end through signed Slack requests: /ops deploys, rollback (with drift, a
failed health check and its roll-forward, the `?` menu), restart and lifecycle of a compose stack."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bot.sample_app import SampleAppState, start_sample_app
from handlers.approvals import APPROVE
from handlers.deploy import ROLL_FORWARD, ROLLBACK_PICK
from services.state import Approval, ApprovalState
from tests.fixtures.cloudrun import start_cloudrun_fake
from tests.fixtures.fake_docker import FakeDocker
from tests.fixtures.fake_docker import fake_docker_fixture as fake_docker  # noqa: F401
from tests.fixtures.servers import PostgresServer
from tests.fixtures.slack import Call, FakeSlack
from tests.scenario.harness import Bot, inventory, running_bot
from tests.scenario.test_approvals import JOBS_SQL, create_jobs_db, jobs_state
from tests.services.deploy.test_lambda import Function
from tests.services.deploy.test_lambda import function as lambda_function  # noqa: F401

OPERATOR = "U0OPER1"
APPROVER = "U0APPR1"
VIEWER = "U0VIEW1"
S = ApprovalState


def texts(call: Call) -> str:
    return str(call.params.get("text", "")) + json.dumps(call.params.get("blocks", ""))


@dataclass
class World:
    bot: Bot
    slack: FakeSlack
    app: SampleAppState

    async def ask(self, text: str, user: str = OPERATOR) -> None:
        body = self.slack.slash_body(text, user_id=user, channel_id="C0OPS", response_url=self.slack.response_url(user))
        assert (await self.bot.post(body)).status == 200

    async def answer(self, user: str = OPERATOR, count: int = 1) -> str:
        calls = await self.slack.wait_for(f"response_url/{user}", count=count, timeout=20)
        return texts(calls[-1])

    async def requested(self, before: int) -> Approval:
        return await self.bot.plan_posted(before)

    async def request(self, text: str, user: str = OPERATOR) -> Approval:
        before = len(self.slack.calls_to("chat.postMessage"))
        await self.ask(text, user)
        return await self.requested(before)

    async def click(self, action_id: str, value: str, user: str = APPROVER, **extra: Any) -> None:
        body = self.slack.block_actions_body(action_id, value, user_id=user,
                                             response_url=self.slack.response_url(user), **extra)  # fmt: skip
        assert (await self.bot.post(body)).status == 200

    async def approve(self, approval: Approval) -> Approval:
        await self.click(APPROVE, approval.id)
        return await self.bot.settled(approval, timeout=30)


def deploy_inventory(app_url: str, endpoint: str, function: str, jobs_dsn: str, docker: Path, stack: Path) -> str:
    return f"""
roles:
  viewer: [{VIEWER}]
  operator: [{OPERATOR}]
  approver: [{APPROVER}]
services:
  worklog:
    components:
      api: {{type: http, url: "{app_url}", timeout: 2}}
      fn: {{type: lambda, function: {function}, alias: live, region: us-east-1, endpoint_url: "{endpoint}",
            settle_seconds: 0}}
  pipeline:
    components:
      db: {{type: postgres, dsn: "{jobs_dsn}", jobs: {{}}}}
      stack: {{type: compose, project_dir: "{stack}", docker: "{docker}", jobs: db, grace_seconds: 0.5,
               settle_seconds: 0, services: [web, worker]}}
"""


@contextlib.asynccontextmanager
async def open_world(
    fake_slack: FakeSlack, tmp_path: Path, function: Function, moto_endpoint: str, jobs_dsn: str, docker: FakeDocker
) -> AsyncIterator[World]:
    state = SampleAppState()
    runner, url = await start_sample_app(state)
    stack = tmp_path / "stack"
    stack.mkdir()
    try:
        loaded = inventory(deploy_inventory(url, moto_endpoint, function.name, jobs_dsn, docker.path, stack))
        async with running_bot(fake_slack, tmp_path, loaded) as bot:
            yield World(bot, fake_slack, state)
    finally:
        await runner.cleanup()


@pytest.fixture
async def world(
    fake_slack: FakeSlack,
    tmp_path: Path,
    lambda_function: Function,  # noqa: F811
    moto_endpoint: str,
    postgres_server: PostgresServer,
    fake_docker: FakeDocker,  # noqa: F811
) -> AsyncIterator[World]:
    jobs_dsn = await create_jobs_db(postgres_server, JOBS_SQL)
    async with open_world(fake_slack, tmp_path, lambda_function, moto_endpoint, jobs_dsn, fake_docker) as opened:
        opened.function = lambda_function  # type: ignore[attr-defined]
        opened.jobs_dsn = jobs_dsn  # type: ignore[attr-defined]
        opened.docker = fake_docker  # type: ignore[attr-defined]
        yield opened


def function_of(world: World) -> Function:
    return world.function  # type: ignore[attr-defined,no-any-return]


async def test_deploys_lists_versions_with_the_live_one_and_the_compose_stack(world: World) -> None:
    await world.ask("deploys worklog", VIEWER)
    shown = await world.answer(VIEWER)
    assert "`3`" in shown and "*live" in shown and "`1`" in shown
    await world.ask("deploys pipeline", VIEWER)
    shown = await world.answer(VIEWER, count=2)
    assert "`web`" in shown and "running" in shown and "`worker`" in shown


async def test_rollback_goes_to_the_previous_version_after_approval_and_checks_health(world: World) -> None:
    approval = await world.request("rollback worklog")
    assert approval.summary.endswith("`3` → `2`")
    assert approval.plan["params"] == {"component": "fn", "target": "2", "from": "3"}
    assert function_of(world).alias_version() == "3"  # nothing yet
    final = await world.approve(approval)
    assert final.state is S.SUCCEEDED, final.result
    assert function_of(world).alias_version() == "2"
    assert "it is healthy" in final.result and "now points at version 2 (was 3)" in final.result


async def test_someone_deploying_between_plan_and_approval_stops_the_rollback(world: World) -> None:
    approval = await world.request("rollback worklog 1")
    function_of(world).admin.update_alias(FunctionName=function_of(world).name, Name="live", FunctionVersion="2")
    final = await world.approve(approval)
    assert final.state is S.FAILED and final.result.startswith("Did not run: what the plan saw has changed")
    assert "live fn: 3 → 2" in final.result
    assert function_of(world).alias_version() == "2"  # untouched by the bot


async def test_a_failed_health_check_is_loud_and_offers_an_approval_gated_roll_forward(world: World) -> None:
    approval = await world.request("rollback worklog 2")
    world.app.status = 503  # the app breaks on the old version
    final = await world.approve(approval)
    assert final.state is S.FAILED and final.result.startswith("Rolled back, but worklog is CRITICAL")
    assert function_of(world).alias_version() == "2"
    edits = world.slack.calls_to("chat.update")
    button = [b for b in edits[-1].json_param("blocks") if b.get("block_id", "").startswith("rollforward:")]
    assert button and button[0]["elements"][0]["value"] == approval.id
    world.app.status = None
    before = len(world.slack.calls_to("chat.postMessage"))
    await world.click(ROLL_FORWARD, approval.id, user=OPERATOR)
    forward = await world.requested(before)
    assert forward.state is S.PENDING and forward.plan["params"]["target"] == "3"  # its own approval
    assert function_of(world).alias_version() == "2"
    done = await world.approve(forward)
    assert done.state is S.SUCCEEDED and function_of(world).alias_version() == "3"


async def test_the_question_mark_offers_a_menu_and_a_choice_becomes_a_request(world: World) -> None:
    await world.ask("rollback worklog ?")
    calls = await world.slack.wait_for(f"response_url/{OPERATOR}", timeout=20)
    blocks = calls[-1].json_param("blocks")
    menu = blocks[-1]["elements"][0]
    assert menu["action_id"] == ROLLBACK_PICK
    values = [o["value"] for o in menu["options"]]
    assert values == ["2", "1"]  # ready, not live, newest first
    assert blocks[-1]["block_id"] == "rollback:worklog:fn"
    before = len(world.slack.calls_to("chat.postMessage"))
    body = world.slack.block_actions_body(
        ROLLBACK_PICK,
        "1",
        user_id=OPERATOR,
        response_url=world.slack.response_url(OPERATOR),
        block_id=blocks[-1]["block_id"],
        element="static_select",
    )
    await world.bot.post(body)
    approval = await world.requested(before)
    assert approval.plan["params"]["target"] == "1" and approval.requester == OPERATOR


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("rollback worklog 9", "`9` is not a recent release of `worklog/fn`"),
        ("rollback worklog 3", "`3` is already live"),
        ("rollback worklog 1;reboot", "`target`"),
        ("rollback pipeline", "`pipeline` has no Cloud Run, Lambda or Render component"),
        ("restart worklog", "`worklog` has no Cloud Run, Render or compose component"),
        ("restart pipeline stack 'web;id'", "`compose_service`"),
        ("scale worklog 3 1", "min (3) must not be above max (1)"),
        ("lifecycle pipeline explode", "`step`"),
    ],
)
async def test_bad_deploy_requests_are_one_sentence_and_store_nothing(world: World, text: str, expected: str) -> None:
    await world.ask(text)
    answer = await world.answer()
    assert expected in answer and "Traceback" not in answer
    assert await world.bot.container.store.list_approvals(list(ApprovalState)) == []
    assert function_of(world).alias_version() == "3"


async def test_viewers_may_look_but_not_ask_for_a_rollback(world: World) -> None:
    await world.ask("rollback worklog", VIEWER)
    assert "needs the operator role" in await world.answer(VIEWER)
    assert await world.bot.container.store.list_approvals(list(ApprovalState)) == []


async def test_restart_of_one_compose_service_runs_exactly_that_command(world: World) -> None:
    docker: FakeDocker = world.docker  # type: ignore[attr-defined]
    approval = await world.request("restart pipeline stack worker")
    assert "Restart worker of pipeline/stack" in approval.summary
    assert "restart" not in docker.commands()
    final = await world.approve(approval)
    assert final.state is S.SUCCEEDED, final.result
    [restart] = [argv for argv in docker.calls() if "restart" in argv]
    assert restart[-2:] == ["restart", "worker"]


async def test_safe_stop_resets_in_flight_jobs_then_stops_the_stack(world: World) -> None:
    docker: FakeDocker = world.docker  # type: ignore[attr-defined]
    approval = await world.request("lifecycle pipeline safe-stop")
    assert "safe-stop pipeline/stack" in approval.summary and "jobs table of `db`" in approval.summary
    final = await world.approve(approval)
    assert final.state is S.SUCCEEDED, final.result
    assert docker.states() == {"web": "exited", "worker": "exited"}
    jobs = await jobs_state(world.jobs_dsn)  # type: ignore[attr-defined]
    assert all(status != "processing" for status, _, _ in jobs.values())  # every in-flight job is pending again


async def test_a_failing_docker_fails_the_run_with_its_own_words(world: World) -> None:
    docker: FakeDocker = world.docker  # type: ignore[attr-defined]
    approval = await world.request("lifecycle pipeline stop")
    docker.pass_next()  # the run's own ps (the drift check) answers as usual
    docker.fail_next(1, "Error response from daemon: cannot stop container: permission denied")
    final = await world.approve(approval)
    assert final.state is S.FAILED and "permission denied" in final.result
    assert docker.states() == {"web": "running", "worker": "running"}


async def test_cloud_run_scale_and_a_rollback_through_the_real_client(fake_slack: FakeSlack, tmp_path: Path) -> None:
    fake = await start_cloudrun_fake(services=("shop",))
    app, url = await start_sample_app(SampleAppState())
    try:
        first = fake.revisions_of("shop")[-1]
        second = fake.deploy("shop", image="asia-docker.pkg.dev/demo-project/apps/shop:v2")
        loaded = inventory(f"""
roles: {{operator: [{OPERATOR}], approver: [{APPROVER}]}}
services:
  shop:
    components:
      api: {{type: http, url: "{url}", timeout: 2}}
      run: {{type: cloudrun, project: demo-project, region: asia-northeast3, service: shop, settle_seconds: 0}}
""")
        async with running_bot(fake_slack, tmp_path, loaded) as bot:
            assert bot.container.deps.deploys is not None
            bot.container.deps.deploys.cloudrun_channel = fake.channel
            world = World(bot, fake_slack, SampleAppState())
            approval = await world.request("scale shop 1 20 --memory 1Gi")
            assert "min 0, max 10" in approval.summary and "min 1, max 20" in approval.summary
            final = await world.approve(approval)
            assert final.state is S.SUCCEEDED, final.result
            live = fake.revisions_of("shop")[-1]  # scaling made a new revision from the same spec
            assert live not in (first, second)
            approval = await world.request("rollback shop")
            assert approval.plan["params"] == {"component": "run", "target": second, "from": live}
            approval = await world.request(f"rollback shop {first}")
            assert approval.plan["params"]["target"] == first
            final = await world.approve(approval)
            assert final.state is S.SUCCEEDED, final.result
            assert fake.shares("shop") == {first: 100}
            assert second in fake.revisions_of("shop")
    finally:
        await app.cleanup()
        await fake.close()
