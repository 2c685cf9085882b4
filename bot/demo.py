"""`opsbot demo`: zero setup, no tokens. A sample app on loopback, a demo SQLite database, SQLite
state, and `/ops health all`, a verified backup and the audit log through the console."""

from __future__ import annotations

import contextlib
import sqlite3
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TextIO

from bot.console import Console
from bot.container import build_container
from bot.sample_app import SampleAppState, start_sample_app
from bot.settings import Settings
from services.inventory import LoadedInventory, parse_inventory

DEMO_INVENTORY = """\
# The demo's inventory: one app shaped like runbook 004's Ecommerce Agent.
timezone: Asia/Seoul
roles:
  viewer: ["*"]
health:
  deadline: 10
backups:
  destinations:
    local:
      type: directory
      path: {backups}
  retention:
    keep_last: 3
services:
  ecommerce-agent:
    description: FastAPI agent with SQLite (runbook 004), here the built-in sample app
    runbook: "004"
    components:
      api:
        type: http
        url: {url}
        liveness: /healthz
        readiness: /ready
        detail: /health
        metrics: /metrics
        timeout: 3
      db:
        type: sqlite
        path: {db}
"""


def create_demo_database(path: Path) -> None:
    """A small shop database in WAL mode, like the agent's."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("CREATE TABLE IF NOT EXISTS products (id INTEGER PRIMARY KEY, name TEXT, price INTEGER)")
        db.execute("CREATE TABLE IF NOT EXISTS orders (id INTEGER PRIMARY KEY, product_id INTEGER, qty INTEGER)")
        db.executemany(
            "INSERT INTO products (name, price) VALUES (?, ?)",
            [(f"product {i}", 1000 + i) for i in range(200)],
        )
        db.executemany("INSERT INTO orders (product_id, qty) VALUES (?, ?)", [(i % 200, 1 + i % 3) for i in range(500)])
        db.commit()


@contextlib.asynccontextmanager
async def demo_world(root: Path) -> AsyncIterator[LoadedInventory]:
    """Start the sample app (its LLM component degraded) and write the demo database."""
    state = SampleAppState(components={"db": "healthy", "llm": "degraded", "vector_index": "healthy"})
    runner, url = await start_sample_app(state)
    try:
        db = root / "shop.sqlite3"
        create_demo_database(db)
        text = DEMO_INVENTORY.format(url=url, db=db, backups=root / "backups")
        yield parse_inventory(text, "demo inventory", env={})
    finally:
        await runner.cleanup()


async def run_demo(
    settings: Settings, *, interactive: bool, stdin: TextIO = sys.stdin, out: TextIO = sys.stdout
) -> int:
    with tempfile.TemporaryDirectory(prefix="opsbot-demo-") as tmp:
        root = Path(tmp)
        demo_settings = settings.model_copy(update={"state_url": None, "state_dir": root})
        async with demo_world(root) as loaded, build_container(demo_settings, inventory=loaded) as container:
            out.write(
                "opsbot demo: a sample app on loopback with one degraded component, a demo SQLite database,\n"
                f"and the bot's state in {root / 'state.sqlite3'}. No Slack needed.\n"
            )
            console = Console(container, user=None, out=out)
            await console.show("/ops health all")
            await console.show("/ops backup ecommerce-agent db")
            newest = (
                await container.deps.backups.newest_good("ecommerce-agent", "db") if container.deps.backups else None
            )
            if newest is not None:
                await console.show(f"/ops backup verify {newest.id}")
            await console.show("/ops backup list ecommerce-agent")
            await console.show("/ops audit --limit 3")
            if interactive:
                out.write(
                    "\nTry `/ops help`, `/ops health ecommerce-agent`, `/ops backup list ecommerce-agent`, "
                    "`/ops audit`, or `/ops hleath`.\n"
                )
                await console.loop(stdin)
            else:
                out.write(
                    "\n(stdin is not a terminal, so the demo ends here; run `opsbot demo` in a terminal to explore.)\n"
                )
    return 0
