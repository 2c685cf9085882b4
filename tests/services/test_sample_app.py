"""The built-in sample app the demo and the probe tests rely on."""

from __future__ import annotations

import asyncio
import time

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from bot.sample_app import SampleAppState, start_sample_app
from tests.fixtures.servers import free_port
from tests.fixtures.wait import wait_until
from tests.services.conftest import SampleAppFactory


async def test_endpoints_answer_like_runbook_004(
    http_session: aiohttp.ClientSession, sample_app: SampleAppFactory
) -> None:
    _, url = await sample_app(components={"db": "healthy", "llm": "degraded"})

    async with http_session.get(url + "/healthz") as r:
        assert (r.status, await r.json()) == (200, {"status": "ok"})
    async with http_session.get(url + "/ready") as r:
        assert (r.status, await r.json()) == (200, {"status": "ready"})
    async with http_session.get(url + "/health") as r:
        assert r.status == 200
        assert await r.json() == {
            "status": "degraded",
            "components": {"db": {"status": "healthy"}, "llm": {"status": "degraded"}},
        }


async def test_metrics_count_requests_and_llm_latency(
    http_session: aiohttp.ClientSession, sample_app: SampleAppFactory
) -> None:
    _, url = await sample_app(llm_latency=0.01)
    for _ in range(3):
        async with http_session.get(url + "/healthz") as r:
            assert r.status == 200
    async with http_session.post(url + "/chat", json={"q": "shoes"}) as r:
        assert r.status == 200

    async with http_session.get(url + "/metrics") as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        text = await r.text()

    families = {f.name: f for f in text_string_to_metric_families(text)}
    requests = {
        (s.labels["method"], s.labels["endpoint"], s.labels["status"]): s.value
        for s in families["http_requests"].samples
        if s.name == "http_requests_total"
    }
    assert requests[("GET", "/healthz", "200")] == 3
    assert requests[("POST", "/chat", "200")] == 1
    assert "http_request_duration_seconds" in families
    llm_count = [s.value for s in families["llm_latency_seconds"].samples if s.name == "llm_latency_seconds_count"]
    assert llm_count == [1]


async def test_status_override_touches_health_endpoints_only(
    http_session: aiohttp.ClientSession, sample_app: SampleAppFactory
) -> None:
    state, url = await sample_app(status=503)

    for path in ("/healthz", "/ready", "/health"):
        async with http_session.get(url + path) as r:
            assert r.status == 503, path
    async with http_session.get(url + "/metrics") as r:
        assert r.status == 200
    state.status = None
    async with http_session.get(url + "/healthz") as r:
        assert r.status == 200


async def test_cold_start_is_paid_once_by_everyone_waiting(
    http_session: aiohttp.ClientSession, sample_app: SampleAppFactory
) -> None:
    state, url = await sample_app(cold_start=0.4)

    async def timed_get(path: str) -> float:
        started = time.perf_counter()
        async with http_session.get(url + path) as r:
            assert r.status == 200
        return time.perf_counter() - started

    first = await asyncio.gather(timed_get("/healthz"), timed_get("/ready"))
    again = await timed_get("/healthz")
    state.fall_asleep()
    after_sleep = await timed_get("/healthz")

    assert all(0.35 < t < 1.0 for t in first), first
    assert again < 0.2
    assert after_sleep > 0.35


async def test_a_hung_request_is_released_when_the_app_stops(http_session: aiohttp.ClientSession) -> None:
    runner, url = await start_sample_app(SampleAppState(hang=True))
    request = asyncio.create_task(http_session.get(url + "/healthz"))
    assert runner.server is not None
    server = runner.server
    await wait_until(lambda: server.connections, "the request reaches the app")
    assert not request.done()

    started = time.perf_counter()
    await runner.cleanup()

    assert time.perf_counter() - started < 1.5
    try:
        response = await request
        response.release()
    except aiohttp.ClientError:
        pass  # the connection may be closed instead of answered; either way nothing hangs


async def test_start_on_a_chosen_port(http_session: aiohttp.ClientSession) -> None:
    port = free_port()
    runner, url = await start_sample_app(SampleAppState(), port=port)
    try:
        assert url == f"http://127.0.0.1:{port}"
        async with http_session.get(url + "/healthz") as r:
            assert r.status == 200
    finally:
        await runner.cleanup()
