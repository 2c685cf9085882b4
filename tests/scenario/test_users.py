"""/ops users end to end: signed Slack requests, a real PostgreSQL users table, the gRPC fake of Cloud Run
Jobs for create-admin, and a search of everything the bot wrote for the one-time password."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest

from bot.logging import configure_logging
from handlers.approvals import APPROVE
from services.state import Approval, ApprovalState
from tests.fixtures.cloudrun_jobs import FakeCloudRunJobs, start_cloudrun_jobs_fake
from tests.fixtures.servers import PostgresServer, run_sql
from tests.fixtures.slack import Call, FakeSlack
from tests.scenario.harness import Bot, inventory, running_bot

S = ApprovalState
VIEWER, READER, OPERATOR, APPROVER, ADMIN = "U0VIEW1", "U0READ1", "U0OPER1", "U0APPR1", "U0ADMN1"
JOB = "vcbl-create-admin"

SCHEMA = """
create table users (
    id serial primary key,
    student_id varchar(20) unique not null,
    name text not null,
    role text not null default 'user',
    is_active boolean not null default true,
    daily_token_usage integer not null default 0,
    total_token_usage integer not null default 0,
    password_hash text not null default 'scrypt:SeCrEtHaSh'
);
insert into users (student_id, name, role, is_active) values
    ('2024000001', 'Kim Admin', 'admin', true),
    ('2024000002', '100% real', 'user', true),
    ('2024000003', '100 real', 'user', false);
"""


def inventory_text(dsn: str, plain_dsn: str) -> str:
    return f"""
roles:
  viewer: [{VIEWER}, {READER}]
  operator: [{OPERATOR}]
  approver: [{APPROVER}]
  admin: [{ADMIN}]
  read:
    vcbl: [{READER}, {OPERATOR}]
services:
  vcbl:
    components:
      db: {{type: postgres, dsn: '{dsn}',
            users: {{create_admin_job: {{job: {JOB}, timeout: 20, poll_seconds: 0.02}}}}}}
      run: {{type: cloudrun, project: demo-project, region: asia-northeast3, service: vcbl-chatbot}}
  plain:
    components:
      db: {{type: postgres, dsn: '{plain_dsn}'}}
"""


def texts(call: Call) -> str:
    return str(call.params.get("text", "")) + json.dumps(call.params.get("blocks", ""), ensure_ascii=False)


@dataclass
class World:
    bot: Bot
    slack: FakeSlack
    fake: FakeCloudRunJobs
    dsn: str
    state_dir: Path

    async def ask(self, text: str, user: str) -> str:
        before = len(self.slack.calls_to(f"response_url/{user}"))
        body = self.slack.slash_body(text, user_id=user, channel_id="C0OPS", response_url=self.slack.response_url(user))
        assert (await self.bot.post(body)).status == 200
        calls = await self.slack.wait_for(f"response_url/{user}", count=before + 1, timeout=20)
        return texts(calls[-1])

    async def request(self, text: str, user: str) -> Approval:
        before = len(self.slack.calls_to("chat.postMessage"))
        body = self.slack.slash_body(text, user_id=user, channel_id="C0OPS", response_url=self.slack.response_url(user))
        assert (await self.bot.post(body)).status == 200
        return await self.bot.plan_posted(before)

    async def approve(self, approval: Approval) -> Approval:
        body = self.slack.block_actions_body(
            APPROVE, approval.id, user_id=APPROVER, response_url=self.slack.response_url(APPROVER)
        )
        assert (await self.bot.post(body)).status == 200
        return await self.bot.settled(approval, timeout=30)

    async def approvals(self) -> list[Approval]:
        return await self.bot.container.store.list_approvals(list(S))

    async def active(self, student_id: str) -> bool:
        conn = await asyncpg.connect(self.dsn)
        try:
            return bool(await conn.fetchval("select is_active from users where student_id = $1", student_id))
        finally:
            await conn.close()


@pytest.fixture
async def world(fake_slack: FakeSlack, tmp_path: Path, postgres_server: PostgresServer) -> AsyncIterator[World]:
    dsn = await postgres_server.database_with(SCHEMA)
    plain = await postgres_server.database_with("select 1")
    fake = await start_cloudrun_jobs_fake(jobs=(JOB,))
    try:
        async with running_bot(fake_slack, tmp_path, inventory(inventory_text(dsn, plain))) as bot:
            assert bot.container.deps.deploys is not None
            bot.container.deps.deploys.cloudrun_channel = fake.channel
            yield World(bot, fake_slack, fake, dsn, tmp_path)
    finally:
        await fake.close()


async def test_list_with_filters_escapes_find_and_never_shows_the_hash(world: World) -> None:
    answer = await world.ask("users vcbl --find %", READER)
    assert "Users of vcbl: 1 of 1 (matching `%`), by id" in answer
    assert "100% real" in answer and "100 real" not in answer.replace("100% real", "")
    assert "SeCrEtHaSh" not in answer and "password_hash" not in answer
    inactive = await world.ask("users vcbl --inactive", OPERATOR)
    assert "Users of vcbl: 1 of 1 (inactive only)" in inactive and "100 real" in inactive
    admins = await world.ask("users vcbl --role admin", ADMIN)
    assert "Users of vcbl: 1 of 1 (role `admin`)" in admins and "Kim Admin" in admins
    [first] = [c for c in world.slack.calls_to(f"response_url/{READER}")]
    assert first.params.get("response_type") == "ephemeral"  # names go to the asker alone


@pytest.mark.parametrize(
    ("text", "user", "expected"),
    [
        ("users vcbl", VIEWER, "Reading the users of `vcbl` is not given to you in the inventory's roles.read; "
                               "you are a viewer."),
        ("users plain", OPERATOR, "`plain` declares no users table (a postgres component with `users:`)."),
        ("users nosuch", READER, "There is no service called `nosuch`."),
        ("users deactivate vcbl 2099999999", OPERATOR, "`vcbl` has no user with student id `2099999999`; "
                                                        "nothing was done."),
        ("users deactivate vcbl 2024000003", OPERATOR, "User `2024000003` (id 3) of `vcbl` is already inactive; "
                                                        "nothing to do."),
        ("users activate vcbl 2024000002", OPERATOR, "User `2024000002` (id 2) of `vcbl` is already active; "
                                                      "nothing to do."),
        ("users deactivate plain 2024000002", OPERATOR, "`plain` declares no users table"),
        ("users deactivate vcbl 2024000002", READER, "`/ops users deactivate` needs the operator role"),
        ("users create-admin vcbl 2024000009 Lee", OPERATOR, "`/ops users create-admin` needs the admin role; "
                                                              "you are an operator."),
        ("users create-admin vcbl 2024000001 Kim", ADMIN, "`vcbl` already has a user with student id `2024000001` "
                                                          "(id 1); nothing was done."),
        ("users create-admin plain 2024000009 Lee", ADMIN, "`plain` declares no users table"),
    ],
)  # fmt: skip
async def test_bad_requests_are_one_sentence_and_nothing_runs(
    world: World, text: str, user: str, expected: str
) -> None:
    answer = await world.ask(text, user)
    assert expected in answer and "Traceback" not in answer
    assert await world.approvals() == []
    assert world.fake.calls("RunJob") == []
    assert await world.active("2024000002") and not await world.active("2024000003")


async def test_deactivate_then_activate_change_exactly_that_row_after_approval(world: World) -> None:
    approval = await world.request("users deactivate vcbl 2024000002", OPERATOR)
    assert approval.summary == "Deactivate user 2024000002 (id 2) of vcbl"
    details = "\n".join(approval.plan["details"])
    assert "as found: id `2` · student id `2024000002` · name 100% real · role `user` · active: yes" in details
    assert await world.active("2024000002")  # nothing before the approval
    final = await world.approve(approval)
    assert final.state is S.SUCCEEDED, final.result
    assert final.result == "Deactivated user 2024000002 (id 2) of vcbl: `is_active` is now false."
    assert not await world.active("2024000002") and await world.active("2024000001")

    again = await world.request("users activate vcbl 2024000002", OPERATOR)
    assert (await world.approve(again)).state is S.SUCCEEDED
    assert await world.active("2024000002") and not await world.active("2024000003")


async def test_a_user_changed_after_the_plan_is_not_touched(world: World) -> None:
    approval = await world.request("users deactivate vcbl 2024000002", OPERATOR)
    await run_sql(world.dsn, "update users set role = 'admin' where id = 2")
    final = await world.approve(approval)
    assert final.state is S.FAILED
    assert final.result.startswith("Did not run: what the plan saw has changed since it was approved.")
    assert "user 2: student id 2024000002, role user, active true → student id 2024000002, role admin" in final.result
    assert await world.active("2024000002")


async def test_create_admin_password_only_in_the_execution_env_and_one_ephemeral_message(
    world: World, capfd: pytest.CaptureFixture[str]
) -> None:
    configure_logging("json", "DEBUG", world.bot.container.redactor)
    capfd.readouterr()
    approval = await world.request('users create-admin vcbl 2024000010 "Park Ji"', ADMIN)
    assert approval.summary == f"Create admin 2024000010 of vcbl with Cloud Run job {JOB}"
    assert world.fake.calls("RunJob") == []
    final = await world.approve(approval)
    assert final.state is S.SUCCEEDED, final.result

    [run] = world.fake.calls("RunJob")
    [override] = run.overrides.container_overrides
    assert list(override.args) == ["create-admin", "2024000010", "Park Ji"]
    [env] = override.env
    assert env.name == "ADMIN_PASSWORD"
    password = env.value
    assert len(password) >= 20
    assert world.fake.executions == {}  # deleted after it succeeded: its overrides are gone with it
    assert len(world.fake.calls("DeleteExecution")) == 1

    holding = [c for c in world.slack.calls if password in json.dumps(c.params, ensure_ascii=False)]
    assert [(c.method, c.params.get("user"), c.params.get("channel")) for c in holding] == [
        ("chat.postEphemeral", ADMIN, "C0OPS")
    ]
    assert "must be changed at first login" in holding[0].params["text"]
    assert re.search(r"one-time password was shown once to <@U0ADMN1> alone", final.result)
    assert "must be changed at first login" in final.result

    stored = repr(await world.approvals())  # every field of every approval row, the result included
    assert "2024000010" in stored and password not in stored
    events = repr(await world.bot.container.store.audit_events(limit=200))
    assert "approval succeeded" in events and password not in events
    on_disk = [p for p in world.state_dir.rglob("*") if p.is_file()]
    assert on_disk and all(password.encode() not in p.read_bytes() for p in on_disk)
    logged = capfd.readouterr().err
    assert "cloudrun_job_started" in logged and "cloudrun_execution_deleted" in logged
    assert password not in logged


async def test_a_failed_create_admin_execution_is_kept_and_shows_no_password(world: World) -> None:
    world.fake.fail_with = "IntegrityError: duplicate key value violates unique constraint"
    approval = await world.request("users create-admin vcbl 2024000011 Lee", ADMIN)
    final = await world.approve(approval)
    assert final.state is S.FAILED
    [name] = world.fake.executions
    assert final.result.startswith(f"Creating admin 2024000011 of vcbl failed: execution `{name}` of job {JOB}")
    assert f"Execution `{name}` was not deleted" in final.result and "No password was shown." in final.result
    assert world.fake.calls("DeleteExecution") == []
    assert world.slack.calls_to("chat.postEphemeral") == []


async def test_create_admin_is_refused_outside_slack(world: World) -> None:
    reply = await world.bot.container.router.dispatch(
        user_id=ADMIN, channel_id="console", text="users create-admin vcbl 2024000012 Lee",
        deps=world.bot.container.deps, request_id="r-console", interface="console",
    )  # fmt: skip
    assert "shows its one-time password only in Slack" in reply.text
    assert await world.approvals() == [] and world.fake.calls("RunJob") == []


async def test_a_password_slack_would_not_show_fails_the_run_saying_so(world: World) -> None:
    world.slack.fail("chat.postEphemeral", "user_not_in_channel")
    approval = await world.request("users create-admin vcbl 2024000013 Lee", ADMIN)
    final = await world.approve(approval)
    assert final.state is S.FAILED
    assert "the one-time password could NOT be shown to the requester" in final.result
    assert "Nobody knows the new admin's password" in final.result
    assert world.fake.executions == {}  # the execution holding it is deleted all the same
    [refused] = world.slack.calls_to("chat.postEphemeral")
    password = refused.params["text"].split("`")[1]
    assert password not in final.result and len(password) >= 20
