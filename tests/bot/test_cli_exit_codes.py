"""Exit codes a cron wrapper can trust, each through `opsbot run` as a real process: an approved run that
fails, or is stopped by SIGTERM, exits 3 and is audited as an error; one that succeeds exits 0; a
`deploys` whose listing failed exits 3; and the demo exits 3 when a step that should work did not."""

from __future__ import annotations

import asyncio
import io
import os
import re
import signal
import sqlite3
import sys
from pathlib import Path

import asyncpg
import pytest

from services.state import ApprovalState, open_state_store
from tests.bot.test_cli import ROOT, opsbot
from tests.fixtures.fake_docker import FakeDocker, fake_docker_fixture  # noqa: F401
from tests.fixtures.servers import PostgresServer
from tests.fixtures.wait import wait_until

APPROVER = "U0APPROVER"


def shop(tmp_path: Path) -> dict[str, str]:
    """An inventory with one SQLite database backed up to a directory, and the env to run opsbot on it."""
    db = tmp_path / "shop.sqlite3"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE orders (id INTEGER PRIMARY KEY, qty INTEGER)")
        conn.executemany("INSERT INTO orders (qty) VALUES (?)", [(i,) for i in range(50)])
    conn.close()
    inventory = tmp_path / "opsbot.yaml"
    inventory.write_text(
        f"""
roles: {{viewer: ["*"], approver: [{APPROVER}]}}
backups:
  destinations:
    local: {{type: directory, path: {tmp_path / "backups"}}}
services:
  shop:
    components:
      db: {{type: sqlite, path: {db}}}
"""
    )
    return {"OPSBOT_CONFIG": str(inventory), "OPSBOT_STATE_DIR": str(tmp_path / "state")}


async def backed_up(env: dict[str, str]) -> str:
    code, out, err = await opsbot("run", "backup shop db", env=env)
    assert code == 0, out + err
    match = re.search(r"\bid `(shop-db-[0-9a-z-]+)`", out)
    assert match, out
    return match.group(1)


async def requested(env: dict[str, str], text: str) -> str:
    """Request a change as the local admin; the plan is printed with the id to approve."""
    code, out, err = await opsbot("run", text, env=env)
    assert code == 0, out + err  # a request waiting for approval is not a failure
    match = re.search(r"/ops approve (\w{8})", out.replace("`", ""))
    assert match, out
    return match.group(1)


async def audit_of(tmp_path: Path, approval_id: str) -> tuple[list[tuple[str, str, str]], ApprovalState]:
    """(command, actor, outcome) of every audit event naming the approval, oldest first; and its state."""
    store = await open_state_store(None, default_path=tmp_path / "state" / "state.sqlite3")
    try:
        events = await store.audit_events(limit=100)
        approval = await store.get_approval(approval_id)
    finally:
        await store.close()
    assert approval is not None
    return [(e.command, e.actor, e.outcome) for e in reversed(events) if approval_id in e.args], approval.state


async def test_an_approved_run_that_fails_exits_3_and_is_audited_as_an_error(tmp_path: Path) -> None:
    env = shop(tmp_path)
    backup_id = await backed_up(env)
    [dump] = (tmp_path / "backups").rglob(f"{backup_id}*[!n]")  # the object, not its .manifest.json
    dump.write_bytes(dump.read_bytes() + b"tampered")  # its sha256 no longer matches the catalog
    approval_id = await requested(env, f"restore shop {backup_id}")

    code, out, err = await opsbot("run", "--as", APPROVER, f"approve {approval_id}", env=env)
    assert code == 3, out + err
    shown = out.strip().splitlines()
    assert shown[1] == "Failed: /ops restore shop", out  # the console says how it ended, first
    assert "does not match its checksum" in out and "it was not restored" in out, out  # and why
    assert "Traceback" not in err
    audit, state = await audit_of(tmp_path, approval_id)
    assert ("approval approved", APPROVER, "approved") in audit
    assert ("approval failed", "opsbot", "failed") in audit
    assert ("approve", APPROVER, "error") in audit  # the command itself, not "ok"
    assert state is ApprovalState.FAILED


async def test_an_approved_run_that_succeeds_exits_0(tmp_path: Path) -> None:
    env = shop(tmp_path)
    backup_id = await backed_up(env)
    approval_id = await requested(env, f"restore shop {backup_id}")

    code, out, err = await opsbot("run", "--as", APPROVER, f"approve {approval_id}", env=env)
    assert code == 0, out + err
    shown = out.strip().splitlines()
    assert shown[1] == "Done: /ops restore shop", out
    assert f"Restored shop/db from {backup_id}" in out.replace("`", ""), out
    audit, state = await audit_of(tmp_path, approval_id)
    assert ("approval succeeded", "opsbot", "succeeded") in audit
    assert ("approve", APPROVER, "ok") in audit
    assert state is ApprovalState.SUCCEEDED


async def test_deploys_that_cannot_be_listed_exit_3(tmp_path: Path, fake_docker: FakeDocker) -> None:
    project = tmp_path / "shop"
    project.mkdir()
    (project / "compose.yaml").write_text("services: {}\n")
    inventory = tmp_path / "opsbot.yaml"
    inventory.write_text(
        f"""
services:
  shop:
    components:
      stack: {{type: compose, project_dir: {project}, project_name: shop, docker: {fake_docker.path}}}
"""
    )
    env = {"OPSBOT_CONFIG": str(inventory), "OPSBOT_STATE_DIR": str(tmp_path / "state")}
    code, out, err = await opsbot("run", "deploys shop", env=env)
    assert code == 0, out + err
    assert "web · running" in out.replace("`", ""), out

    fake_docker.fail_next(1, "Cannot connect to the Docker daemon at unix:///var/run/docker.sock.")
    code, out, err = await opsbot("run", "deploys shop", env=env)
    assert code == 3, out + err
    assert "Cannot connect to the Docker daemon" in out, out
    store = await open_state_store(None, default_path=tmp_path / "state" / "state.sqlite3")
    try:
        events = await store.audit_events(limit=10)
    finally:
        await store.close()
    assert [(e.command, e.outcome) for e in reversed(events)] == [("deploys", "ok"), ("deploys", "error")]
    assert "stack: " in events[0].detail and "Docker daemon" in events[0].detail


async def test_the_demo_exits_3_when_a_step_that_should_work_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bot import demo
    from bot.settings import Settings

    monkeypatch.setattr(demo, "create_demo_database", lambda path: path.write_bytes(b"not a database"))
    out = io.StringIO()
    settings = Settings(OPSBOT_STATE_DIR=str(tmp_path), OPSBOT_CONFIG=str(tmp_path / "unused.yaml"))
    assert await demo.run_demo(settings, interactive=False, out=out) == 3
    assert "Something in the demo did not work as it should" in out.getvalue()


async def test_an_approved_run_stopped_by_sigterm_ends_interrupted_and_exits_3(
    tmp_path: Path, postgres_server: PostgresServer
) -> None:
    dsn = postgres_server.dsn(await postgres_server.create_database())
    inventory = tmp_path / "opsbot.yaml"
    inventory.write_text(
        f"""
roles: {{approver: [{APPROVER}]}}
health: {{deadline: 60}}
services:
  pipeline:
    components:
      db: {{type: postgres, dsn: "${{PIPE_DB}}", jobs: {{}}, timeout: 60}}
"""
    )
    env = {"OPSBOT_CONFIG": str(inventory), "OPSBOT_STATE_DIR": str(tmp_path / "state"), "PIPE_DB": dsn}
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            "CREATE TABLE jobs (id int PRIMARY KEY, status text, started_at timestamptz, error_message text);"
            "INSERT INTO jobs VALUES (7, 'processing', now() - interval '2 hours', NULL)"
        )
        approval_id = await requested(env, "jobs reset-stuck pipeline")
        async with conn.transaction():
            await conn.execute("SELECT 1 FROM jobs WHERE id = 7 FOR UPDATE")  # the reset will wait for this row
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "bot.cli", "run", "--as", APPROVER, f"approve {approval_id}",
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=ROOT,
                env={**{k: v for k, v in os.environ.items() if not k.startswith(("SLACK_", "OPSBOT_"))}, **env},
            )  # fmt: skip
            watch = await asyncpg.connect(dsn)  # outside the transaction: pg_stat_activity is a snapshot in one

            async def reset_waits() -> bool:
                if proc.returncode is not None:
                    raise AssertionError(f"opsbot exited {proc.returncode} before the reset was blocked")
                return bool(
                    await watch.fetchval(
                        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'opsbot' "
                        "AND wait_event_type = 'Lock' AND query ILIKE 'update%'"
                    )
                )

            try:
                await wait_until(reset_waits, "the approved reset waits for the locked row", timeout=30)
                proc.send_signal(signal.SIGTERM)
                out, err = await asyncio.wait_for(proc.communicate(), 30)
            finally:
                await watch.close()
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
        assert proc.returncode == 3, out.decode() + err.decode()
        assert f"opsbot: interrupted: `/ops approve {approval_id}` did not finish" in err.decode()
        assert "Traceback" not in err.decode()
        row = await conn.fetchrow("SELECT status FROM jobs WHERE id = 7")
        assert row["status"] == "processing"  # the reset's transaction never committed
    finally:
        await conn.close()
    audit, state = await audit_of(tmp_path, approval_id)
    assert ("approval started", "opsbot", "running") in audit
    assert ("approval interrupted", "opsbot", "interrupted") in audit
    assert state is ApprovalState.INTERRUPTED
