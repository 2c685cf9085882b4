"""/ops config and /ops config set end to end: signed Slack requests (listing, plan old → new, approval,
the change, health, the undo hint) and `opsbot run`, against the Cloud Run gRPC fake, moto's Lambda and
the Render loopback fake."""

from __future__ import annotations

import io
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from google.cloud import run_v2

from bot.console import Console
from bot.sample_app import SampleAppState, start_sample_app
from handlers.approvals import APPROVE
from services.errors import InventoryError
from services.state import Approval, ApprovalState
from tests.fixtures.cloudrun import FakeCloudRun, start_cloudrun_fake
from tests.fixtures.render import API_KEY, SERVICE, FakeRender, start_fake
from tests.fixtures.slack import Call, FakeSlack
from tests.scenario.harness import Bot, inventory, running_bot
from tests.services.deploy.test_lambda import Function
from tests.services.deploy.test_lambda import function as lambda_function  # noqa: F401

S = ApprovalState
OPERATOR, APPROVER, VIEWER = "U0OPER1", "U0APPR1", "U0VIEW1"
SECRET_VALUE = "sk-live-DoNotEchoThis0123"


def texts(call: Call) -> str:
    return str(call.params.get("text", "")) + json.dumps(call.params.get("blocks", ""), ensure_ascii=False)


def config_inventory(app_url: str, endpoint: str, function: str, render_url: str) -> str:
    return f"""
roles:
  viewer: [{VIEWER}]
  operator: [{OPERATOR}]
  approver: [{APPROVER}]
services:
  vcbl:
    components:
      api: {{type: http, url: "{app_url}", timeout: 2}}
      run:
        type: cloudrun
        project: demo-project
        region: asia-northeast3
        service: vcbl-chatbot
        settle_seconds: 0
        settings:
          DAILY_TOKEN_LIMIT: {{pattern: "[0-9]{{1,7}}", description: "tokens per user per day"}}
          LLM_MODEL: {{choices: [gpt-4o-mini, gpt-4o]}}
  worklog:
    components:
      api: {{type: http, url: "{app_url}", timeout: 2}}
      fn:
        type: lambda
        function: {function}
        region: us-east-1
        endpoint_url: "{endpoint}"
        settle_seconds: 0
        settings:
          LLM_PROVIDER: {{choices: [claude, openai, gemini]}}
      web:
        type: render
        service_id: {SERVICE}
        api_key: "${{RENDER_API_KEY}}"
        api_url: "{render_url}"
        poll_seconds: 0.02
        settle_seconds: 0
        settings:
          LLM_PROVIDER: {{choices: [claude, openai, gemini]}}
          DAILY_TOKEN_LIMIT: {{pattern: "[0-9]{{1,7}}"}}
"""


@dataclass
class World:
    bot: Bot
    slack: FakeSlack
    cloudrun: FakeCloudRun
    render: FakeRender
    function: Function

    async def ask(self, text: str, user: str = OPERATOR) -> str:
        before = len(self.slack.calls_to(f"response_url/{user}"))
        body = self.slack.slash_body(text, user_id=user, channel_id="C0OPS", response_url=self.slack.response_url(user))
        assert (await self.bot.post(body)).status == 200
        calls = await self.slack.wait_for(f"response_url/{user}", count=before + 1, timeout=20)
        return texts(calls[-1])

    async def request(self, text: str) -> Approval:
        before = len(self.slack.calls_to("chat.postMessage"))
        body = self.slack.slash_body(
            text, user_id=OPERATOR, channel_id="C0OPS", response_url=self.slack.response_url(OPERATOR)
        )
        assert (await self.bot.post(body)).status == 200
        return await self.bot.plan_posted(before)

    async def approve(self, approval: Approval) -> Approval:
        body = self.slack.block_actions_body(
            APPROVE, approval.id, user_id=APPROVER, response_url=self.slack.response_url(APPROVER)
        )
        assert (await self.bot.post(body)).status == 200
        return await self.bot.settled(approval, timeout=30)

    def cloudrun_env(self) -> dict[str, str]:
        return {e.name: e.value for e in self.cloudrun.services["vcbl-chatbot"].template.containers[0].env}

    def alias_env(self) -> dict[str, str]:
        admin = self.function.admin
        version = self.function.alias_version()
        config = admin.get_function_configuration(FunctionName=self.function.name, Qualifier=version)
        return dict(config.get("Environment", {}).get("Variables", {}))

    def writes(self) -> list[str]:
        """Every write any platform saw."""
        run = [f"cloudrun {r.method}" for r in self.cloudrun.requests if r.method == "UpdateService"]
        render = [f"render {r.method} {r.path}" for r in self.render.requests if r.method in ("PUT", "POST")]
        return run + render


@pytest.fixture
async def world(
    fake_slack: FakeSlack,
    tmp_path: Path,
    lambda_function: Function,  # noqa: F811
    moto_endpoint: str,
) -> AsyncIterator[World]:
    cloudrun = await start_cloudrun_fake(services=("vcbl-chatbot",))
    container = cloudrun.services["vcbl-chatbot"].template.containers[0]
    container.env.append(run_v2.EnvVar(name="DAILY_TOKEN_LIMIT", value="50000"))
    container.env.append(run_v2.EnvVar(name="DB_USER", value="vcbl_user"))  # undeclared: never shown
    cloudrun.deploy("vcbl-chatbot")
    render = await start_fake()
    render.add_deploy(SERVICE, status="live")
    render.env_vars[SERVICE] = {"LLM_PROVIDER": "claude", "NOTION_API_KEY": "secret_notion_0123"}
    app, url = await start_sample_app(SampleAppState())
    try:
        text = config_inventory(url, moto_endpoint, lambda_function.name, render.url)
        loaded = inventory(text, env={"RENDER_API_KEY": API_KEY})
        async with running_bot(fake_slack, tmp_path, loaded) as bot:
            assert bot.container.deps.deploys is not None
            bot.container.deps.deploys.cloudrun_channel = cloudrun.channel
            yield World(bot, fake_slack, cloudrun, render, lambda_function)
    finally:
        await app.cleanup()
        await render.close()
        await cloudrun.close()


async def test_config_shows_declared_settings_with_live_values_and_nothing_else(world: World) -> None:
    shown = await world.ask("config vcbl", VIEWER)
    assert "`DAILY_TOKEN_LIMIT` = `50000`" in shown and "tokens per user per day" in shown
    assert "`LLM_MODEL` = not set" in shown
    assert "DB_USER" not in shown and "vcbl_user" not in shown and "APP_ENV" not in shown
    shown = await world.ask("config worklog", VIEWER)
    assert shown.count("`LLM_PROVIDER` = ") == 2 and "`claude`" in shown
    assert "BUILD" not in shown and "NOTION" not in shown and "secret_notion" not in shown


async def test_cloud_run_setting_changes_after_approval_with_a_new_revision_and_says_how_to_undo(
    world: World,
) -> None:
    before = world.cloudrun.revisions_of("vcbl-chatbot")[-1]
    approval = await world.request("config set vcbl DAILY_TOKEN_LIMIT=10000")
    assert "`50000` → `10000`" in approval.summary
    assert world.writes() == []  # nothing until approved
    final = await world.approve(approval)
    assert final.state is S.SUCCEEDED, final.result
    assert world.cloudrun_env()["DAILY_TOKEN_LIMIT"] == "10000" and world.cloudrun_env()["DB_USER"] == "vcbl_user"
    assert world.cloudrun.revisions_of("vcbl-chatbot")[-1] != before
    assert "it is healthy" in final.result and f"`/ops rollback vcbl {before} run`" in final.result


async def test_lambda_setting_moves_the_alias_to_a_new_version_and_rollback_undoes_it(world: World) -> None:
    approval = await world.request("config set worklog LLM_PROVIDER=openai fn")
    assert "not set → `openai`" in approval.summary
    final = await world.approve(approval)
    assert final.state is S.SUCCEEDED, final.result
    assert world.function.alias_version() == "4"
    assert world.alias_env() == {"BUILD": "3", "LLM_PROVIDER": "openai"}
    assert "`/ops rollback worklog 3 fn`" in final.result
    undo = await world.approve(await world.request("rollback worklog 3 fn"))
    assert undo.state is S.SUCCEEDED and world.alias_env() == {"BUILD": "3"}


async def test_render_setting_redeploys_and_offers_the_config_set_that_restores_it(world: World) -> None:
    live = world.render.live(SERVICE)
    approval = await world.request("config set worklog LLM_PROVIDER=gemini web")
    assert "`claude` → `gemini`" in approval.summary
    final = await world.approve(approval)
    assert final.state is S.SUCCEEDED, final.result
    assert world.render.env_vars[SERVICE]["LLM_PROVIDER"] == "gemini" and world.render.live(SERVICE) != live
    assert "`/ops config set worklog LLM_PROVIDER=claude web`" in final.result


async def test_a_change_under_the_plan_stops_the_run(world: World) -> None:
    approval = await world.request("config set vcbl DAILY_TOKEN_LIMIT=10000")
    world.cloudrun.deploy("vcbl-chatbot", image="asia-docker.pkg.dev/demo-project/apps/shop:v2")  # new etag
    final = await world.approve(approval)
    assert final.state is S.FAILED and final.result.startswith("Did not run: what the plan saw has changed")
    assert "version run" in final.result
    assert world.cloudrun.calls("UpdateService") == [] and world.cloudrun_env()["DAILY_TOKEN_LIMIT"] == "50000"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("config set vcbl FLASK_ENV=debug", "`FLASK_ENV` is not a setting opsbot may change on `vcbl` (allowed: "),
        (f"config set vcbl OPENAI_API_KEY={SECRET_VALUE}", "`OPENAI_API_KEY` looks like a secret: opsbot never"),
        (f"config set worklog NOTION_API_KEY={SECRET_VALUE} web", "`NOTION_API_KEY` looks like a secret"),
        (f"config set vcbl SESSION_SECRET={SECRET_VALUE}", "`SESSION_SECRET` looks like a secret"),
        ("config set vcbl DAILY_TOKEN_LIMIT=lots", "does not match its declared pattern `[0-9]{1,7}`"),
        ("config set vcbl LLM_MODEL=gpt-5", "`LLM_MODEL` must be one of gpt-4o-mini, gpt-4o; nothing was changed."),
        ("config set nosuch DAILY_TOKEN_LIMIT=1", "There is no service called `nosuch`"),
        ("config set worklog LLM_PROVIDER=openai db", "has no Cloud Run, Lambda or Render component called `db`"),
        ("config set worklog LLM_PROVIDER=openai", "is a setting of several components of `worklog`: name one"),
        (f"config set vcbl {SECRET_VALUE}", "Write the setting as `KEY=VALUE`"),
        ("config set vcbl DAILY_TOKEN_LIMIT=50000", "is already `50000`: nothing to change."),
        ("config nosuch", "There is no service called `nosuch`"),
    ],
)
async def test_bad_requests_are_one_sentence_nothing_runs_and_no_value_is_echoed(
    world: World, text: str, expected: str
) -> None:
    shown = await world.ask(text)
    assert expected in shown
    assert SECRET_VALUE not in shown
    assert await world.bot.container.store.list_approvals(list(S)) == []
    assert world.writes() == []


async def test_viewers_may_look_but_not_change(world: World) -> None:
    shown = await world.ask("config set vcbl DAILY_TOKEN_LIMIT=10000", VIEWER)
    assert "needs the operator role" in shown
    assert await world.bot.container.store.list_approvals(list(S)) == []


async def test_opsbot_run_shows_settings_and_refuses_a_secret(world: World) -> None:
    out = io.StringIO()
    console = Console(world.bot.container, None, out=out)
    assert await console.run_once("config vcbl") == 0
    assert "DAILY_TOKEN_LIMIT" in out.getvalue() and "50000" in out.getvalue()
    assert await console.run_once(f"config set vcbl OPENAI_API_KEY={SECRET_VALUE}") == 3
    answer = out.getvalue().rsplit(f"OPENAI_API_KEY={SECRET_VALUE}\n", 1)[1]  # after the echoed command line
    assert "looks like a secret" in answer and SECRET_VALUE not in answer
    assert world.writes() == []


async def test_a_secret_typed_by_mistake_stays_out_of_the_audit(world: World) -> None:
    await world.ask(f"config set vcbl OPENAI_API_KEY={SECRET_VALUE}")
    events = await world.bot.container.store.audit_events(limit=20)
    assert events and SECRET_VALUE not in json.dumps([str(e) for e in events])


@pytest.mark.parametrize(
    ("settings", "problem"),
    [
        ("{OPENAI_API_KEY: {pattern: '.*'}}", "looks like a secret"),
        ("{DB_PASSWORD: {choices: [a]}}", "looks like a secret"),
        ("{LIMIT: {pattern: '[0-9'}}", "not a regular expression"),
        ("{LIMIT: {pattern: '[0-9]+', choices: ['1']}}", "exactly one of `choices` or `pattern`"),
        ("{LIMIT: {description: no rule}}", "exactly one of `choices` or `pattern`"),
        ("{'9LIMIT': {pattern: '[0-9]+'}}", "is not an environment variable name"),
    ],
)
def test_config_check_refuses_bad_settings(settings: str, problem: str) -> None:
    text = f"""
services:
  vcbl:
    components:
      run: {{type: cloudrun, project: demo-project, region: asia-northeast3, service: vcbl, settings: {settings}}}
"""
    with pytest.raises(InventoryError) as caught:
        inventory(text)
    (line,) = caught.value.problems
    assert problem in line and line.startswith("services.vcbl.components.run.settings")
