"""A change from the console: the plan and its id are printed; another user approves by command."""

from __future__ import annotations

import io
import re
from pathlib import Path

import asyncpg

from bot.console import Console, exit_code
from bot.container import build_container
from bot.settings import Settings
from services.inventory import parse_inventory
from tests.fixtures.servers import PostgresServer

INVENTORY = """
roles:
  approver: [U0APPROVER]
services:
  pipeline:
    components:
      db: {type: postgres, dsn: "${PIPE_DB}", jobs: {}}
"""


async def test_console_request_then_approve_as_another_user(tmp_path: Path, postgres_server: PostgresServer) -> None:
    dsn = postgres_server.dsn(await postgres_server.create_database())
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            "CREATE TABLE jobs (id int PRIMARY KEY, status text, started_at timestamptz, error_message text);"
            "INSERT INTO jobs VALUES (7, 'processing', now() - interval '2 hours', NULL)"
        )
        loaded = parse_inventory(INVENTORY, "t", {"PIPE_DB": dsn})
        settings = Settings(OPSBOT_STATE_DIR=str(tmp_path), OPSBOT_CONFIG=str(tmp_path / "unused.yaml"))
        async with build_container(settings, inventory=loaded) as container:
            out = io.StringIO()
            admin = Console(container, None, out=out)
            reply = await admin.show("jobs reset-stuck pipeline")
            printed = out.getvalue()
            assert exit_code(reply) == 0 and reply.approval_id is not None
            match = re.search(r"An approver can run /ops approve (\w{8})", printed.replace("`", ""))
            assert match, printed
            assert "[1] Approve" not in printed  # no buttons to press in a terminal
            approval_id = match.group(1)

            refused = await admin.show(f"approve {approval_id}")  # the local admin asked: not theirs to approve
            assert exit_code(refused) == 3 and "someone else has to approve it" in refused.text

            approver = Console(container, "U0APPROVER", out=out)
            done = await approver.show(f"approve {approval_id}")
            assert exit_code(done) == 0
            assert "Reset 1 of 1 job(s) to pending." in out.getvalue()
        row = await conn.fetchrow("SELECT status, started_at FROM jobs WHERE id = 7")
        assert (row["status"], row["started_at"]) == ("pending", None)
    finally:
        await conn.close()
