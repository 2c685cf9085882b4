"""/healthz, /ready and /metrics of the aiohttp server, before and after start-up."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from bot.metrics import Metrics
from bot.server import READY_TIMEOUT, Readiness, Runtime, build_web_app
from services.errors import OUTCOMES


@pytest.fixture
async def client_for() -> AsyncIterator[object]:
    clients: list[TestClient[web.Request, web.Application]] = []

    async def make(runtime: Runtime) -> TestClient[web.Request, web.Application]:
        client = TestClient(TestServer(build_web_app(runtime)))
        await client.start_server()
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()


async def test_ready_is_503_until_started_and_while_a_check_hangs(client_for: object) -> None:
    readiness = Readiness()
    runtime = Runtime(Metrics(process_metrics=False), readiness)
    started = False

    async def startup() -> str | None:
        return None if started else "inventory and state store not loaded yet"

    async def store() -> str | None:
        await asyncio.sleep(READY_TIMEOUT * 3)
        return None

    readiness.add("startup", startup)
    client = await client_for(runtime)  # type: ignore[operator]
    resp = await client.get("/ready")
    assert resp.status == 503
    assert (await resp.json())["problems"] == {"startup": "inventory and state store not loaded yet"}
    resp = await client.post("/slack/events", data="x")
    assert resp.status == 503  # Slack retries; nothing is handled before the inventory is loaded
    assert (await client.get("/healthz")).status == 200  # alive, just not ready
    started = True
    readiness.add("state_store", store)
    resp = await client.get("/ready")
    assert resp.status == 503
    assert (await resp.json())["problems"] == {"state_store": f"no answer within {READY_TIMEOUT:g} s"}


async def test_metrics_is_prometheus_text(client_for: object) -> None:
    metrics = Metrics(process_metrics=False)
    metrics.observe_command("health", "ok", 0.2)
    client = await client_for(Runtime(metrics, Readiness()))  # type: ignore[operator]
    resp = await client.get("/metrics")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/plain")
    body = await resp.text()
    assert 'opsbot_commands_total{outcome="ok",verb="health"} 1.0' in body
    assert 'opsbot_command_seconds_bucket{le="0.25",verb="health"} 1.0' in body


def test_the_outcomes_metric_names_exactly_the_outcomes_commands_end_with() -> None:
    """opsbot_commands_total's help lists OUTCOMES, and every outcome the code gives is one of them."""
    metrics = Metrics(process_metrics=False)
    [family] = [f for f in metrics.registry.collect() if f.name == "opsbot_commands"]
    assert family.documentation.endswith(f"({', '.join(OUTCOMES)}).")
    root = Path(__file__).resolve().parents[2]
    given: set[str] = set()
    for package in ("bot", "handlers", "services"):
        for source in (root / package).rglob("*.py"):
            given.update(re.findall(r'outcome\s*=\s*"([a-z_]+)"', source.read_text()))
    assert given and given <= set(OUTCOMES), given - set(OUTCOMES)
