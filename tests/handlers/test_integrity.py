"""/ops integrity through the real router and registry (roles, refusals, audit, Block Kit), and through
`opsbot run` in a child process (exit code follows the status), on real PostgreSQL and the Qdrant REST fake."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from qdrant_client import models

from handlers.commands import load_registry
from handlers.context import Deps, Reply
from handlers.router import Router
from services.access import RoleResolver
from services.approvals import ApprovalEngine
from services.inventory import parse_inventory
from services.locks import LocalLocks
from services.redaction import Redactor
from services.state import StateStore, open_state_store
from tests.fixtures.qdrant import FakeQdrant
from tests.fixtures.servers import PostgresServer
from tests.fixtures.slack_checks import check_blocks

pytestmark = pytest.mark.filterwarnings("ignore:Api key is used with an insecure connection:UserWarning")

ROOT = Path(__file__).resolve().parents[2]
PASSWORD = "Pg-handler-S3cret-31"
KEY = "qdr-handler-K3y-9a8b7c"


def inventory_text(qdrant_url: str) -> str:
    return f"""
roles:
  viewer: [U0VIEWER]
services:
  yt:
    components:
      db:
        type: postgres
        dsn: ${{YT_DB}}
        jobs: {{table: jobs}}
      vectors:
        type: qdrant
        url: {qdrant_url}
        api_key: ${{YT_QDRANT_KEY}}
        collections: [youtube_content]
    integrity:
      database: db
      qdrant: vectors
      required_tables: [chunks, jobs]
      chunks: [{{table: chunks, collection: youtube_content}}]
  shop:
    components:
      db: {{type: postgres, dsn: "${{YT_DB}}"}}
"""


@pytest.fixture
async def world(postgres_server: PostgresServer, fake_qdrant: FakeQdrant) -> tuple[str, dict[str, str]]:
    """Chunks 1..20 without 4; points 1..20 without 9, plus 99 (orphans 4 and 99, missing 9); a job stuck for
    2 days."""
    dsn = await postgres_server.database_with(
        "create table chunks (id integer primary key)",
        "insert into chunks select g from generate_series(1, 20) g where g <> 4",
        "create table jobs (id integer primary key, status text, started_at timestamptz, error_message text)",
        "insert into jobs values (1, 'processing', now() - interval '2 days', null)",
        password=PASSWORD,
    )
    client = fake_qdrant.client()
    try:
        await client.create_collection(
            "youtube_content", vectors_config=models.VectorParams(size=2, distance=models.Distance.DOT)
        )
        ids = [i for i in range(1, 21) if i != 9] + [99]
        await client.upsert("youtube_content", points=[models.PointStruct(id=i, vector=[1.0, 0.0]) for i in ids])
    finally:
        await client.close()
    fake_qdrant.require_api_key(KEY)
    fake_qdrant.clear_requests()
    return inventory_text(fake_qdrant.url), {"YT_DB": dsn, "YT_QDRANT_KEY": KEY}


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[StateStore]:
    store = await open_state_store(None, default_path=tmp_path / "state.sqlite3")
    yield store
    await store.close()


async def ask(world: tuple[str, dict[str, str]], store: StateStore, text: str, user: str = "U0VIEWER") -> Reply:
    loaded = parse_inventory(world[0], "t", world[1])
    redactor = Redactor(loaded.secrets)
    roles = RoleResolver(loaded.inventory.roles)
    deps = Deps(
        loaded=loaded,
        store=store,
        probes={},
        redactor=redactor,
        roles=roles,
        approvals=ApprovalEngine(store, LocalLocks(), roles, loaded.inventory.approvals, redactor),
    )
    return await Router(load_registry()).dispatch(
        user_id=user, channel_id="C0OPS", text=text, deps=deps, request_id="req-int"
    )


async def test_a_viewer_gets_one_line_per_check_and_the_run_is_audited(
    world: tuple[str, dict[str, str]], store: StateStore
) -> None:
    reply = await ask(world, store, "integrity yt")
    assert reply.outcome == "ok" and reply.status is not None and reply.status.label == "warning"
    assert check_blocks(reply.blocks, 50) is None
    text = str(reply.blocks)
    assert "Integrity of yt: warning" in text
    assert "19 chunks, 20 vectors: 2 orphan vectors (e.g. `4`, `99`); 1 missing vector (e.g. chunks `9`)" in text
    assert "1 job in `processing` for over 1 day: `1`" in text
    assert PASSWORD not in reply.text + text and KEY not in reply.text + text
    [event] = await store.audit_events()
    assert (event.command, event.service, event.outcome, event.detail) == ("integrity", "yt", "ok", "status warning")


async def test_an_unknown_service_is_one_sentence_and_nothing_runs(
    world: tuple[str, dict[str, str]], store: StateStore, fake_qdrant: FakeQdrant
) -> None:
    reply = await ask(world, store, "integrity yy")
    assert reply.outcome == "rejected"
    assert reply.text == "There is no service called `yy`. Did you mean `yt`? Known services: `shop`, `yt`."
    assert fake_qdrant.requests == []


async def test_a_service_without_an_integrity_section_is_one_sentence(
    world: tuple[str, dict[str, str]], store: StateStore, fake_qdrant: FakeQdrant
) -> None:
    reply = await ask(world, store, "integrity shop")
    assert reply.outcome == "rejected"
    assert reply.text == (
        "`shop` declares no integrity check in the inventory "
        "(an `integrity:` section naming its database, tables and collections)."
    )
    assert fake_qdrant.requests == []


async def test_a_missing_service_argument_says_the_usage(world: tuple[str, dict[str, str]], store: StateStore) -> None:
    reply = await ask(world, store, "integrity")
    assert reply.text == "Missing `service`. Usage: `/ops integrity <service>`"


async def test_opsbot_run_prints_the_lines_and_exits_with_the_status(
    world: tuple[str, dict[str, str]], tmp_path: Path
) -> None:
    config = tmp_path / "opsbot.yaml"
    config.write_text(world[0].replace("viewer: [U0VIEWER]", 'viewer: ["*"]'))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLACK_", "OPSBOT_"))}
    env.update(world[1], OPSBOT_CONFIG=str(config), OPSBOT_STATE_DIR=str(tmp_path / "state"))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bot.cli", "run", "integrity yt",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env, cwd=ROOT,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    said = out.decode() + err.decode()
    assert proc.returncode == 1, said
    assert "Integrity of yt: warning" in said
    assert "🟡 chunks chunks ↔ vectors youtube_content — 19 chunks, 20 vectors: 2 orphan vectors" in said
    assert "🟢 tables — all 2 present: chunks, jobs" in said
    assert PASSWORD not in said and KEY not in said
