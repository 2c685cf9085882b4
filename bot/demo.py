"""`opsbot demo`: zero setup, no tokens. A sample app on loopback, a demo SQLite database, SQLite
state, and through the console: `/ops health all`, a verified backup, a restore that a second demo
user approves (it runs once), and the audit log of it all."""

from __future__ import annotations

import contextlib
import sqlite3
import sys
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from bot.console import EXIT_REFUSED, Console
from bot.container import Container, build_container
from bot.sample_app import SampleAppState, start_sample_app
from bot.settings import Settings
from handlers.context import Reply
from services.inventory import LoadedInventory, parse_inventory
from services.state import ApprovalState

DEMO_INVENTORY = """\
# The demo's inventory: one app shaped like runbook 004's Ecommerce Agent.
timezone: Asia/Seoul
roles:
  viewer: ["*"]
  approver: [{approver}]
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


DEMO_APPROVER = "U0DEMOAPPROVER"  # the second demo user: an approver, not the local admin who asks


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


def count_orders(path: Path) -> int:
    with contextlib.closing(sqlite3.connect(path)) as db:
        row = db.execute("SELECT count(*) FROM orders").fetchone()
    return int(row[0])


def delete_orders(path: Path) -> int:
    """The demo's accident: every order is deleted."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        deleted = db.execute("DELETE FROM orders").rowcount
        db.commit()
    return int(deleted)


@dataclass(frozen=True)
class DemoWorld:
    """What the demo runs against: its inventory, the sample app's knobs and the shop database."""

    loaded: LoadedInventory
    app: SampleAppState
    db: Path


@contextlib.asynccontextmanager
async def demo_world(root: Path) -> AsyncIterator[DemoWorld]:
    """Start the sample app (its LLM component degraded) and write the demo database."""
    state = SampleAppState(components={"db": "healthy", "llm": "degraded", "vector_index": "healthy"})
    runner, url = await start_sample_app(state)
    try:
        db = root / "shop.sqlite3"
        create_demo_database(db)
        text = DEMO_INVENTORY.format(url=url, db=db, backups=root / "backups", approver=DEMO_APPROVER)
        yield DemoWorld(parse_inventory(text, "demo inventory", env={}), state, db)
    finally:
        await runner.cleanup()


async def approval_walk(container: Container, world: DemoWorld, backup_id: str, out: TextIO) -> list[Reply]:
    """A destructive command from the local admin, approved by the second demo user: it runs once."""
    orders = count_orders(world.db)
    lost = delete_orders(world.db)
    # A restore is judged by the service's health afterwards; the LLM the demo degraded would fail it.
    world.app.components["llm"] = "healthy"
    out.write(
        f"\nAn accident: all {lost} orders are deleted from the demo database. Putting them back is a restore,\n"
        "a destructive command: it prints its plan and runs only when someone else approves it.\n"
        "(Meanwhile the sample app's LLM recovers: a restore is judged by the health check that follows it.)\n"
    )
    admin = Console(container, user=None, out=out)
    approver = Console(container, user=DEMO_APPROVER, out=out)
    request = await admin.show(f"/ops restore ecommerce-agent {backup_id}")
    replies = [request]
    if request.approval_id is None:
        return replies
    await admin.show(f"/ops approve {request.approval_id}")  # refused: not one's own destructive request
    done = await approver.show(f"/ops approve {request.approval_id}")
    await approver.show(f"/ops approve {request.approval_id}")  # a second approval runs nothing
    replies.append(done)
    approval = await container.deps.store.get_approval(request.approval_id)
    ran = approval is not None and approval.state is ApprovalState.SUCCEEDED
    out.write(
        f"\nThe demo database has {count_orders(world.db)} of its {orders} orders"
        + (" back; the restore ran once.\n" if ran else ".\n")
    )
    return replies


async def run_demo(
    settings: Settings, *, interactive: bool, stdin: TextIO = sys.stdin, out: TextIO = sys.stdout
) -> int:
    """Run the demo; 0 when each step that should work did, else 3 (like `opsbot run`)."""
    with tempfile.TemporaryDirectory(prefix="opsbot-demo-") as tmp:
        root = Path(tmp)
        demo_settings = settings.model_copy(update={"state_url": None, "state_dir": root})
        async with demo_world(root) as world, build_container(demo_settings, inventory=world.loaded) as container:
            out.write(
                "opsbot demo: a sample app on loopback with one degraded component, a demo SQLite database,\n"
                f"and the bot's state in {root / 'state.sqlite3'}. No Slack needed.\n"
            )
            console = Console(container, user=None, out=out)
            await console.show("/ops health all")  # a warning, on purpose: the LLM is degraded
            steps = [await console.show("/ops backup ecommerce-agent db")]
            newest = (
                await container.deps.backups.newest_good("ecommerce-agent", "db") if container.deps.backups else None
            )
            if newest is not None:
                steps.append(await console.show(f"/ops backup verify {newest.id}"))
            await console.show("/ops backup list ecommerce-agent")
            if newest is not None:
                steps += await approval_walk(container, world, newest.id, out)
            await console.show("/ops audit --limit 20")  # all of it: the demo makes 14 events
            failed = newest is None or len(steps) < 4 or any(reply.outcome != "ok" for reply in steps)
            if failed:
                out.write("\nSomething in the demo did not work as it should: see the replies above.\n")
            if interactive:
                out.write(
                    "\nTry `/ops help`, `/ops health ecommerce-agent`, `/ops backup list ecommerce-agent`, "
                    "`/ops audit`, `/ops approvals`, or `/ops hleath`.\n"
                )
                await console.loop(stdin)
            else:
                out.write(
                    "\n(stdin is not a terminal, so the demo ends here; run `opsbot demo` in a terminal to explore.)\n"
                )
    return EXIT_REFUSED if failed else 0
