"""The `opsbot` command line, run as a real process."""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import json
import os
import re
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from bot.sample_app import SampleAppState, start_sample_app
from services.state import open_state_store
from tests.fixtures.servers import free_port
from tests.fixtures.slack import FakeSlack, sign
from tests.fixtures.wait import wait_until

ROOT = Path(__file__).parents[2]
EXAMPLE = ROOT / "examples" / "inventory.yaml"


async def opsbot(*args: str, env: dict[str, str] | None = None, stdin: bytes = b"") -> tuple[int, str, str]:
    """Run `python -m bot.cli ARGS` without blocking the event loop (sample apps live in it)."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("SLACK_", "OPSBOT_"))}
    full_env.update(env or {})
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bot.cli", *args,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env=full_env, cwd=ROOT,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(stdin), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.fixture
async def app_url() -> AsyncIterator[tuple[SampleAppState, str]]:
    state = SampleAppState()
    runner, url = await start_sample_app(state)
    yield state, url
    await runner.cleanup()


def write_inventory(tmp_path: Path, url: str) -> Path:
    path = tmp_path / "opsbot.yaml"
    path.write_text(
        f"""
roles: {{viewer: ["*"]}}
services:
  shop:
    components:
      api: {{type: http, url: "{url}", timeout: 2}}
"""
    )
    return path


async def test_config_check_good_file_summarises() -> None:
    env = {
        "VCBL_DB_URL": "postgresql://u:p@h/d",
        "VCC_MONGO_URI": "mongodb://h",
        "RENDER_API_KEY": "k",
        "YT_DB_URL": "postgresql://h/y",
    }
    code, out, err = await opsbot("config", "check", str(EXAMPLE), env=env)
    assert code == 0, err
    assert "OK" in out and "5 service(s)" in out


async def test_config_check_bad_file_lists_every_problem(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "services:\n  shop:\n    components:\n      db: {type: postgres, dsn: '${NOPE}'}\n      x: {type: q}\n"
    )
    code, out, err = await opsbot("config", "check", str(bad))
    assert code == 1
    assert "2 problem(s)" in err
    assert "services.shop.components.db.dsn: missing env var NOPE" in err
    assert "services.shop.components.x:" in err
    assert "Traceback" not in err + out


async def test_config_schema_is_json_schema() -> None:
    code, out, _ = await opsbot("config", "schema")
    assert code == 0
    schema = json.loads(out)
    assert "services" in schema["properties"]
    assert (ROOT / "examples" / "inventory.schema.json").read_text().strip() == out.strip()


async def test_run_exit_codes_follow_health(tmp_path: Path, app_url: tuple[SampleAppState, str]) -> None:
    state, url = app_url
    env = {"OPSBOT_CONFIG": str(write_inventory(tmp_path, url)), "OPSBOT_STATE_DIR": str(tmp_path / "state")}
    code, out, err = await opsbot("run", "health all", env=env)
    assert code == 0, out + err
    assert "Health of all services: healthy" in out
    store = await open_state_store(None, default_path=tmp_path / "state" / "state.sqlite3")
    try:
        [event] = await store.audit_events()
    finally:
        await store.close()
    assert event.actor == f"local:{getpass.getuser()}" and event.channel == "console"
    state.components = {"db": "healthy", "llm": "degraded"}
    code, out, _ = await opsbot("run", "health all", env=env)
    assert code == 1 and "warning" in out
    state.status = 500
    code, out, _ = await opsbot("run", "health shop", env=env)
    assert code == 2 and "critical" in out
    code, out, _ = await opsbot("run", "hleath", env=env)
    assert code == 3 and "Did you mean `/ops health`?" in out


async def test_run_with_a_broken_inventory_lists_problems(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("services: {}\n")
    code, out, err = await opsbot("run", "health all", env={"OPSBOT_CONFIG": str(bad)})
    assert code == 1
    assert "services: Dictionary should have at least 1 item" in err
    assert "Traceback" not in err + out


async def test_serve_without_tokens_names_what_is_missing() -> None:
    code, _, err = await opsbot("serve")
    assert code == 2
    assert "SLACK_BOT_TOKEN" in err and "SLACK_SIGNING_SECRET" in err
    code, _, err = await opsbot("serve", "--socket", env={"SLACK_BOT_TOKEN": "xoxb-1"})
    assert code == 2 and "SLACK_APP_TOKEN" in err and "SLACK_BOT_TOKEN" not in err


async def test_demo_runs_health_and_exits_without_a_terminal() -> None:
    code, out, err = await opsbot("demo")
    assert code == 0, out + err
    assert "Health of all services: warning" in out
    assert "llm: degraded" in out
    assert "1 backup(s) done" in out and "is good: sha256 matches" in out  # backed up, verified
    assert "integrity_check ok: 2 tables, 700 rows" in out
    assert "Traceback" not in err

    # The approval walk: the plan is printed, the requester may not approve it, the second demo user does.
    plan = out[out.index("> /ops restore ecommerce-agent ") :]
    assert plan.splitlines()[1] == "Approval needed: /ops restore ecommerce-agent", plan
    assert "Overwrites: SQLite database" in plan and "First: a safety backup" in plan
    [approval_id] = set(re.findall(r"An approver can run `/ops approve (\w{8})`", plan))
    assert f"> /ops approve {approval_id}\n⚠️  You asked for this, so someone else has to approve it." in out
    approved = out[out.index(f"> /ops approve {approval_id}   (as U0DEMOAPPROVER)") :]
    assert approved.splitlines()[1] == "Done: /ops restore ecommerce-agent", approved
    assert "Done — approved by <@U0DEMOAPPROVER>" in approved and "ecommerce-agent is healthy" in approved
    assert "This already ran (succeeded)" in approved  # approving again runs nothing
    assert "The demo database has 500 of its 500 orders back; the restore ran once." in out

    # The audit shows the request and the approval, and exactly one run.
    audit = out[out.index("> /ops audit") :]
    assert "Audit: last 14 event(s)" in audit and "backup verify" in audit  # every command was audited
    events = [line for line in audit.splitlines() if approval_id in line]
    requested = [e for e in events if "approval requested" in e]
    assert len(requested) == 1 and f"local:{getpass.getuser()} approval requested" in requested[0]
    assert [e for e in events if "approval approved" in e and "<@U0DEMOAPPROVER>" in e and "→ approved" in e]
    assert [e for e in events if "approval approve refused" in e and "self-approval" in e]
    assert sum("approval started" in e for e in events) == 1  # ran once
    assert sum("approval succeeded" in e for e in events) == 1


async def test_console_reads_commands_as_a_chosen_user(tmp_path: Path, app_url: tuple[SampleAppState, str]) -> None:
    _, url = app_url
    path = tmp_path / "opsbot.yaml"
    path.write_text(
        f'roles: {{viewer: [U0VIEWER]}}\nservices: {{shop: {{components: {{api: {{type: http, url: "{url}"}}}}}}}}\n'
    )
    env = {"OPSBOT_CONFIG": str(path), "OPSBOT_STATE_DIR": str(tmp_path / "state")}
    code, out, _ = await opsbot("console", "--as", "U0VIEWER", env=env, stdin=b"/ops help\nhealth shop\nquit\n")
    assert code == 0
    assert "/ops health [service|all]" in out
    assert "Health of shop: healthy" in out
    code, out, _ = await opsbot("console", "--as", "U0STRANGER", env=env, stdin=b"health shop\n")
    assert "needs the viewer role; you are not in any opsbot role" in out


async def until_ok(url: str) -> None:
    """Poll ``url`` until it answers 200 (20 s at most)."""
    async with aiohttp.ClientSession() as http:

        async def ok() -> bool:
            try:
                async with http.get(url) as resp:
                    return resp.status == 200
            except aiohttp.ClientConnectionError:
                return False

        await wait_until(ok, f"{url} answers 200", timeout=20)


@contextlib.asynccontextmanager
async def serving(env: dict[str, str], port: int) -> AsyncIterator[tuple[asyncio.subprocess.Process, str]]:
    """`opsbot serve` as a real process, yielded once /ready answers 200; killed if still running after."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bot.cli", "serve", env={**os.environ, **env}, cwd=ROOT,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        await until_ok(f"{base}/ready")
        yield proc, base
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def post_signed(base: str, secret: str, body: str) -> int:
    headers = {"Content-Type": "application/x-www-form-urlencoded", **sign(secret, body)}
    async with aiohttp.ClientSession() as http, http.post(f"{base}/slack/events", data=body, headers=headers) as resp:
        return resp.status


async def stop(proc: asyncio.subprocess.Process) -> str:
    proc.send_signal(signal.SIGTERM)
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    return err.decode()


def serve_env(tmp_path: Path, url: str, fake_slack: FakeSlack, secret: str, port: int) -> dict[str, str]:
    return {
        "SLACK_BOT_TOKEN": "xoxb-serve-test-token",
        "SLACK_SIGNING_SECRET": secret,
        "OPSBOT_SLACK_API_URL": fake_slack.base_url,
        "OPSBOT_CONFIG": str(write_inventory(tmp_path, url)),
        "OPSBOT_STATE_DIR": str(tmp_path / "state"),
        "OPSBOT_PORT": str(port),
        "OPSBOT_HOST": "127.0.0.1",
        "OPSBOT_LOG_FORMAT": "json",
    }


async def test_serve_answers_slack_over_http_and_stops_on_sigterm(
    tmp_path: Path, app_url: tuple[SampleAppState, str], fake_slack: FakeSlack
) -> None:
    _, url = app_url
    port, secret = free_port(), "signing-secret-for-serve"
    async with serving(serve_env(tmp_path, url, fake_slack, secret, port), port) as (proc, base):
        async with aiohttp.ClientSession() as http, http.get(f"{base}/healthz") as resp:
            assert resp.status == 200
        body = fake_slack.slash_body("health all", user_id="U0ANY", response_url=fake_slack.response_url())
        assert await post_signed(base, secret, body) == 200
        [post] = await fake_slack.wait_for("chat.postMessage", timeout=10)
        assert "Health of all services" in post.params["text"]
        async with aiohttp.ClientSession() as http, http.get(f"{base}/metrics") as resp:
            assert 'opsbot_commands_total{outcome="ok",verb="health"} 1.0' in await resp.text()
        err = await stop(proc)
    assert proc.returncode == 0, err[-2000:]
    assert "xoxb-serve-test-token" not in err
    lines = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert any(line.get("event") == "command_finished" and line.get("request_id") for line in lines)


async def test_sigterm_lets_a_running_command_finish_and_answer(
    tmp_path: Path, app_url: tuple[SampleAppState, str], fake_slack: FakeSlack
) -> None:
    state, url = app_url
    state.delay = 1.5  # the probe is still at work when the bot is told to stop
    port, secret = free_port(), "signing-secret-for-drain"
    async with serving(serve_env(tmp_path, url, fake_slack, secret, port), port) as (proc, base):
        body = fake_slack.slash_body("health all", user_id="U0ANY", response_url=fake_slack.response_url())
        assert await post_signed(base, secret, body) == 200
        err = await stop(proc)
    assert proc.returncode == 0, err[-2000:]
    [post] = fake_slack.calls_to("chat.postMessage")
    assert "Health of all services: healthy" in post.params["text"]
    store = await open_state_store(None, default_path=tmp_path / "state" / "state.sqlite3")
    try:
        [event] = await store.audit_events()
    finally:
        await store.close()
    assert (event.command, event.outcome) == ("health", "ok")


async def test_serve_waits_for_a_state_database_that_is_not_up_and_stops_when_told(
    tmp_path: Path, fake_slack: FakeSlack
) -> None:
    port, closed = free_port(), free_port()
    env = serve_env(tmp_path, "http://127.0.0.1:9", fake_slack, "s", port)
    env["OPSBOT_STATE_URL"] = f"postgresql://opsbot:db-Pa55-word@127.0.0.1:{closed}/opsbot"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bot.cli", "serve", env={**os.environ, **env}, cwd=ROOT,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    lines: list[str] = []

    async def read_stderr() -> None:
        assert proc.stderr is not None
        async for raw in proc.stderr:
            lines.append(raw.decode())

    reader = asyncio.create_task(read_stderr())
    base = f"http://127.0.0.1:{port}"
    await until_ok(f"{base}/healthz")
    await wait_until(
        lambda: sum('"state_store_unavailable"' in line for line in lines) >= 2, "serve retries the state store twice"
    )
    async with aiohttp.ClientSession() as http, http.get(f"{base}/ready") as resp:
        assert resp.status == 503
        assert (await resp.json())["problems"] == {"startup": "inventory and state store not loaded yet"}
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    await asyncio.wait_for(asyncio.gather(proc.wait(), reader), 30)
    err = "".join(lines)
    assert proc.returncode == 0 and time.monotonic() - started < 5
    warnings = [json.loads(line) for line in err.splitlines() if '"state_store_unavailable"' in line]
    assert warnings and warnings[0]["reason"] == "connection refused"
    assert f"127.0.0.1:{closed}/opsbot" in warnings[0]["location"]
    assert "db-Pa55-word" not in err and "Traceback" not in err


async def test_run_with_an_unreachable_state_store_says_so_in_one_line(tmp_path: Path) -> None:
    env = {
        "OPSBOT_CONFIG": str(write_inventory(tmp_path, "http://127.0.0.1:9")),
        "OPSBOT_STATE_URL": f"postgresql://opsbot:db-Pa55-word@127.0.0.1:{free_port()}/opsbot",
    }
    code, out, err = await opsbot("run", "health all", env=env)
    assert code == 1
    assert err.strip().startswith("opsbot: cannot open the state store (postgresql 127.0.0.1:")
    assert err.strip().endswith(": connection refused")
    assert "db-Pa55-word" not in err + out and "Traceback" not in err
    env["OPSBOT_STATE_URL"] = "mysql://opsbot:db-Pa55-word@db/opsbot"
    code, _, err = await opsbot("run", "health all", env=env)
    assert code == 1 and "unsupported state store URL" in err and "db-Pa55-word" not in err


async def test_serve_with_a_broken_inventory_lists_problems_and_exits(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("services:\n  s:\n    components:\n      d: {type: postgres, dsn: '${MISSING_DSN}'}\n")
    env = {
        "SLACK_BOT_TOKEN": "xoxb-1",
        "SLACK_SIGNING_SECRET": "s",
        "OPSBOT_CONFIG": str(bad),
        "OPSBOT_PORT": str(free_port()),
        "OPSBOT_HOST": "127.0.0.1",
        "OPSBOT_STATE_DIR": str(tmp_path),
    }
    code, _, err = await opsbot("serve", env=env)
    assert code == 1
    assert "services.s.components.d.dsn: missing env var MISSING_DSN" in err
    assert "Traceback" not in err


def test_config_check_refuses_an_approval_rule_for_an_unknown_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from bot.cli import config_check

    path = tmp_path / "policy.yaml"
    path.write_text(
        'approvals:\n  commands:\n    "jobs reset": {critical: true}\n'
        "services:\n  shop:\n    components:\n      db: {type: sqlite, path: /tmp/x.db}\n"
    )
    assert config_check(path) == 1
    err = capsys.readouterr().err
    assert "approvals.commands.jobs reset: not a command that needs approval (those are: " in err
    listed = err.split("(those are: ", 1)[1].split(")", 1)[0].split(", ")
    assert listed == sorted(listed)
    assert {"jobs reset-stuck", "lifecycle", "restart", "restore", "rollback", "scale"} <= set(listed)


def test_config_check_refuses_a_schedule_whose_command_is_not_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from bot.cli import config_check

    path = tmp_path / "schedules.yaml"
    path.write_text(
        "schedules:\n"
        '  - {name: nightly, cron: "0 2 * * *", command: "hleath all"}\n'
        '  - {name: nightly, cron: "61 2 * * *", command: "health all"}\n'
        "services:\n  shop:\n    components:\n      db: {type: sqlite, path: /tmp/x.db}\n"
    )
    assert config_check(path) == 1
    err = capsys.readouterr().err
    assert "schedules.1.cron" in err and "minute '61' is out of range" in err
    path.write_text(
        "schedules:\n"
        '  - {name: nightly, cron: "0 2 * * *", command: "hleath all"}\n'
        '  - {name: nightly, every_minutes: 14, command: "health all"}\n'
        "services:\n  shop:\n    components:\n      db: {type: sqlite, path: /tmp/x.db}\n"
    )
    assert config_check(path) == 1
    err = capsys.readouterr().err
    assert "schedules.1.name: 'nightly' is used by an earlier schedule" in err
    path.write_text(path.read_text().replace("{name: nightly, every", "{name: keepalive, every"))
    assert config_check(path) == 1
    assert "schedules.0.command: `/ops hleath all` is not an opsbot command" in capsys.readouterr().err


def test_config_check_refuses_pre_approvals_that_do_not_fit_their_schedule(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from bot.cli import config_check

    path = tmp_path / "pre.yaml"
    body = (
        "schedules:\n"
        '  - {name: nightly, cron: "0 2 * * *", command: "cleanup shop"}\n'
        '  - {name: checks, cron: "0 3 * * *", command: "health all"}\n'
        "services:\n  shop:\n    components:\n      db: {type: sqlite, path: /tmp/x.db}\n"
    )
    path.write_text("approvals:\n  schedules:\n    nightlly: {command: cleanup, max_items: 10}\n" + body)
    assert config_check(path) == 1
    err = capsys.readouterr().err
    assert (
        "approvals.schedules names no schedule of this inventory: nightlly (the schedules are: checks, nightly)" in err
    )
    path.write_text(
        "approvals:\n  schedules:\n"
        "    nightly: {command: queue clean, max_items: 10}\n"
        "    checks: {command: health, max_items: 10}\n" + body
    )
    assert config_check(path) == 1
    err = capsys.readouterr().err
    assert "approvals.schedules.nightly.command: schedule `nightly` runs `/ops cleanup`, not `/ops queue clean`" in err
    assert "approvals.schedules.checks.command: `health` is not a command that needs approval" in err
    path.write_text("approvals:\n  schedules:\n    nightly: {command: cleanup, max_items: 0}\n" + body)
    assert config_check(path) == 1
    assert "approvals.schedules.nightly.max_items" in capsys.readouterr().err
    path.write_text("approvals:\n  schedules:\n    nightly: {command: cleanup,  max_items: 10}\n" + body)
    assert config_check(path) == 0


@pytest.mark.parametrize("name", ["list", "verify", "clean", "retry", "fix", "status", "set", "health", "all"])
def test_config_check_refuses_a_service_named_like_a_command_word(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from bot.cli import config_check

    path = tmp_path / "words.yaml"
    path.write_text(f"services:\n  {name}:\n    components:\n      db: {{type: sqlite, path: /tmp/x.db}}\n")
    assert config_check(path) == 1
    assert f"services.{name}: `{name}` is a command word (`/ops … {name}` would be ambiguous)" in (
        capsys.readouterr().err
    )


def test_every_word_of_every_verb_is_reserved() -> None:
    from handlers.commands import load_registry, reserved_words

    words = {word for command in load_registry() for word in command.verb.split()}
    assert {"list", "verify", "clean", "retry", "reset-stuck"} <= words <= reserved_words()
