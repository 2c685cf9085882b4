"""HTTP health probe against real sample apps on loopback, and the fan-out through check_health."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from services.health import Status, Target, check_health
from services.inventory import HttpComponent, RedisComponent, SqliteComponent
from services.probes import build_health_probes
from services.probes.http import HttpProbe
from services.redaction import Redactor
from tests.fixtures.servers import free_port
from tests.services.conftest import SampleAppFactory


def http(url: str, **fields: Any) -> HttpComponent:
    return HttpComponent.model_validate({"type": "http", "url": url, **fields})


async def test_healthy_app_is_healthy_with_one_check_per_endpoint_and_component(
    http_session: aiohttp.ClientSession, sample_app: SampleAppFactory
) -> None:
    _, url = await sample_app()

    result = await HttpProbe(http_session).probe(http(url))

    assert result.status == Status.HEALTHY
    assert result.detail.startswith("OK in ")
    assert "db healthy" in result.detail and "llm healthy" in result.detail
    assert [c.name for c in result.checks] == ["/healthz", "/ready", "/health", "db", "llm"]
    assert all(c.status == Status.HEALTHY for c in result.checks)
    assert result.facts["liveness_status_code"] == 200
    assert result.facts["components"] == 2
    assert result.latency_ms > 0
    assert not result.waking


async def test_500_everywhere_is_critical(http_session: aiohttp.ClientSession, sample_app: SampleAppFactory) -> None:
    _, url = await sample_app(status=500)

    result = await HttpProbe(http_session).probe(http(url))

    assert result.status == Status.CRITICAL
    checks = {c.name: c for c in result.checks}
    assert checks["/healthz"].status == Status.CRITICAL
    assert checks["/healthz"].detail == "answered 500 (expected 200)"
    assert checks["/ready"].status == Status.CRITICAL
    assert result.detail == "all endpoints answered 500 (expected 200)"


async def test_not_ready_is_critical_and_named(
    http_session: aiohttp.ClientSession, sample_app: SampleAppFactory
) -> None:
    _, url = await sample_app(ready=False)

    result = await HttpProbe(http_session).probe(http(url))

    assert result.status == Status.CRITICAL
    assert result.detail == "/ready answered 503 (expected 200)"


async def test_expected_status_is_configurable(
    http_session: aiohttp.ClientSession, sample_app: SampleAppFactory
) -> None:
    _, url = await sample_app(status=202)

    result = await HttpProbe(http_session).probe(http(url, expected_status=202))

    assert result.status == Status.HEALTHY, result.detail


async def test_degraded_component_is_a_warning(
    http_session: aiohttp.ClientSession, sample_app: SampleAppFactory
) -> None:
    _, url = await sample_app(components={"db": "healthy", "llm": "degraded"})

    result = await HttpProbe(http_session).probe(http(url))

    assert result.status == Status.WARNING
    checks = {c.name: c for c in result.checks}
    assert checks["llm"].status == Status.WARNING
    assert checks["db"].status == Status.HEALTHY
    assert result.detail == "llm degraded"
    assert result.facts["reported_status"] == "degraded"


async def test_unhealthy_component_is_critical_even_behind_a_503(
    http_session: aiohttp.ClientSession, sample_app: SampleAppFactory
) -> None:
    _, url = await sample_app(components={"db": "unhealthy", "cache": "ok"})

    result = await HttpProbe(http_session).probe(http(url))

    assert result.status == Status.CRITICAL
    checks = {c.name: c for c in result.checks}
    assert checks["db"].status == Status.CRITICAL
    assert checks["cache"].status == Status.HEALTHY
    assert checks["/health"].detail == "answered 503 (expected 200)"
    assert result.detail == "/health answered 503 (expected 200); db unhealthy"


@pytest.mark.parametrize(
    ("word", "expected"),
    [
        ("healthy", Status.HEALTHY),
        ("OK", Status.HEALTHY),
        ("up", Status.HEALTHY),
        ("pass", Status.HEALTHY),
        ("degraded", Status.WARNING),
        ("warn", Status.WARNING),
        ("Warning", Status.WARNING),
        ("error", Status.CRITICAL),
        ("down", Status.CRITICAL),
        ("", Status.CRITICAL),
    ],
)
async def test_component_words_map_to_statuses(
    http_session: aiohttp.ClientSession, sample_app: SampleAppFactory, word: str, expected: Status
) -> None:
    _, url = await sample_app(health_body='{"components": {"x": "%s"}}' % word)  # noqa: UP031

    result = await HttpProbe(http_session).probe(http(url, liveness=None, readiness=None))

    assert {c.name: c.status for c in result.checks}["x"] == expected


async def test_plain_and_nested_component_entries_are_both_read(
    http_session: aiohttp.ClientSession, sample_app: SampleAppFactory
) -> None:
    body = '{"status": "ok", "components": {"db": "ok", "llm": {"status": "error", "message": "quota exceeded"}}}'
    _, url = await sample_app(health_body=body)

    result = await HttpProbe(http_session).probe(http(url))

    checks = {c.name: c for c in result.checks}
    assert checks["db"].status == Status.HEALTHY
    assert checks["llm"].status == Status.CRITICAL
    assert checks["llm"].detail == "error: quota exceeded"
    assert result.status == Status.CRITICAL
    assert "llm error: quota exceeded" in result.detail


async def test_slow_app_is_a_warning_that_says_how_slow(
    http_session: aiohttp.ClientSession, sample_app: SampleAppFactory
) -> None:
    _, url = await sample_app(delay=0.3)

    result = await HttpProbe(http_session).probe(http(url, slow_ms=100))

    assert result.status == Status.WARNING
    assert result.detail.startswith("slow (3")  # "slow (300 ms)" or a little more
    assert not result.waking
    assert all(c.detail.startswith("slow (") for c in result.checks if c.name.startswith("/"))


async def test_sleeping_host_that_answers_slowly_is_waking_then_healthy(
    http_session: aiohttp.ClientSession, sample_app: SampleAppFactory
) -> None:
    _, url = await sample_app(cold_start=1.2)
    component = http(url, sleeps=True, slow_ms=500, timeout=10)
    probe = HttpProbe(http_session)

    first = await probe.probe(component)
    second = await probe.probe(component)

    assert first.status == Status.WARNING
    assert first.waking
    assert first.detail.startswith("waking from sleep (answered in 1.")
    assert first.detail.endswith(" s)")
    assert second.status == Status.HEALTHY
    assert not second.waking


async def test_cold_start_without_sleeps_is_only_slow(
    http_session: aiohttp.ClientSession, sample_app: SampleAppFactory
) -> None:
    _, url = await sample_app(cold_start=0.6)

    result = await HttpProbe(http_session).probe(http(url, slow_ms=300))

    assert result.status == Status.WARNING
    assert not result.waking
    assert result.detail.startswith("slow (")


async def test_sleeping_host_that_never_answers_is_down_not_waking(
    http_session: aiohttp.ClientSession, sample_app: SampleAppFactory
) -> None:
    _, url = await sample_app(hang=True)
    target = Target("worklog", "api", http(url, sleeps=True, timeout=0.5))

    report = await check_health([target], lambda _: HttpProbe(http_session), deadline=5, redactor=Redactor())

    result = report.items[0].result
    assert result.status == Status.CRITICAL
    assert not result.waking
    assert result.detail == "no answer within 0.5 s"


async def test_connection_refused_is_critical_and_said_once(http_session: aiohttp.ClientSession) -> None:
    url = f"http://127.0.0.1:{free_port()}"

    result = await HttpProbe(http_session).probe(http(url))

    assert result.status == Status.CRITICAL
    assert result.detail == "connection refused"
    assert all(c.detail == "connection refused" for c in result.checks)


async def test_unknown_host_is_critical(http_session: aiohttp.ClientSession) -> None:
    # .invalid never resolves (RFC 6761), so no packet leaves the machine.
    result = await HttpProbe(http_session).probe(http("http://opsbot-test.invalid", timeout=3))

    assert result.status == Status.CRITICAL
    assert result.detail in {"host name not found", "timed out"}


@pytest.mark.parametrize(
    ("body", "content_type", "expected"),
    [
        ('{"status": "ok", ', "application/json", "/health answered malformed JSON"),
        ("<html>Bad gateway</html>", "text/html", "/health answered text/html, not JSON"),
        ("", "application/json", "/health answered an empty body, not JSON"),
        ("[1, 2, 3]", "application/json", "/health answered JSON that is not an object"),
        ('{"components": ["db"]}', "application/json", "/health `components` is not a JSON object"),
    ],
)
async def test_broken_detail_endpoint_is_a_warning_not_a_crash(
    http_session: aiohttp.ClientSession, sample_app: SampleAppFactory, body: str, content_type: str, expected: str
) -> None:
    _, url = await sample_app(health_body=body, health_content_type=content_type)

    result = await HttpProbe(http_session).probe(http(url))

    assert result.status == Status.WARNING
    assert result.detail == expected
    assert {c.name: c.status for c in result.checks}["/healthz"] == Status.HEALTHY


async def test_oversized_detail_answer_is_cut_and_reported(
    http_session: aiohttp.ClientSession, sample_app: SampleAppFactory
) -> None:
    _, url = await sample_app(health_body='{"status": "ok", "pad": "' + "x" * 10_000 + '"}')

    result = await HttpProbe(http_session, body_limit=2048).probe(http(url))

    assert result.status == Status.WARNING
    assert result.detail == "/health answer is over 2 KiB, not read"


async def test_configured_headers_are_sent_and_never_shown(
    http_session: aiohttp.ClientSession, sample_app: SampleAppFactory
) -> None:
    token = "s3cret-probe-token"
    _, url = await sample_app(token=token)
    probe = HttpProbe(http_session)

    without = await probe.probe(http(url))
    with_token = await probe.probe(http(url, headers={"Authorization": f"Bearer {token}"}))

    assert without.status == Status.CRITICAL
    assert without.detail == "all endpoints answered 401 (expected 200)"
    assert with_token.status == Status.HEALTHY, with_token.detail
    assert token not in repr(with_token) and token not in repr(without)


async def test_missing_detail_endpoint_is_a_warning(
    http_session: aiohttp.ClientSession, sample_app: SampleAppFactory
) -> None:
    _, url = await sample_app()

    result = await HttpProbe(http_session).probe(http(url, detail="/status"))

    assert result.status == Status.WARNING
    assert result.detail == "/status answered 404 (expected 200)"


async def test_unexplained_bad_overall_status_is_shown(
    http_session: aiohttp.ClientSession, sample_app: SampleAppFactory
) -> None:
    _, url = await sample_app(health_body='{"status": "degraded"}')

    result = await HttpProbe(http_session).probe(http(url))

    assert result.status == Status.WARNING
    assert result.detail == "/health reports degraded"


async def test_skipped_endpoints_are_not_requested(
    http_session: aiohttp.ClientSession, sample_app: SampleAppFactory
) -> None:
    _, url = await sample_app(ready=False)

    result = await HttpProbe(http_session).probe(http(url, readiness=None, detail=None))

    assert result.status == Status.HEALTHY
    assert [c.name for c in result.checks] == ["/healthz"]


async def test_base_url_with_a_trailing_slash_works(
    http_session: aiohttp.ClientSession, sample_app: SampleAppFactory
) -> None:
    _, url = await sample_app()

    result = await HttpProbe(http_session).probe(http(url + "/"))

    assert result.status == Status.HEALTHY


async def test_wrong_component_type_is_refused(http_session: aiohttp.ClientSession, tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="cannot probe a sqlite"):
        await HttpProbe(http_session).probe(SqliteComponent(type="sqlite", path=tmp_path / "x.db"))


async def test_build_health_probes_covers_every_probed_type(http_session: aiohttp.ClientSession) -> None:
    probes = build_health_probes(http_session)

    assert set(probes) == {"http", "postgres", "redis", "mongodb", "qdrant", "sqlite", "tls", "statuspage", "host"}
    assert set(build_health_probes(http_session, types={"http", "sqlite", "cloudrun"})) == {"http", "sqlite"}


async def test_fan_out_waits_no_longer_than_the_hung_components_timeout(
    http_session: aiohttp.ClientSession, sample_app: SampleAppFactory, redis_url: str, tmp_path: Path
) -> None:
    _, healthy_url = await sample_app()
    _, hung_url = await sample_app(hang=True)
    _, slow_url = await sample_app(delay=0.2)
    db = tmp_path / "shop.db"
    with sqlite3.connect(db) as conn:
        conn.execute("create table orders (id integer primary key)")
    conn.close()
    hung_timeout = 1.0
    targets = [
        Target("shop", "web", http(healthy_url)),
        Target("shop", "hung", http(hung_url, timeout=hung_timeout)),
        Target("shop", "slow", http(slow_url)),
        Target("shop", "db", SqliteComponent(type="sqlite", path=db)),
        Target("queue", "redis", RedisComponent.model_validate({"type": "redis", "url": redis_url})),
    ]
    probes = build_health_probes(http_session)
    seen: list[tuple[str, Status]] = []

    started = time.perf_counter()
    report = await check_health(
        targets,
        lambda t: probes.get(t.type),
        deadline=10,
        redactor=Redactor(),
        observe=lambda kind, _seconds, status: seen.append((kind, status)),
    )
    elapsed = time.perf_counter() - started

    results = {item.target.component: item.result for item in report.items}
    assert results["hung"].status == Status.CRITICAL
    assert results["hung"].detail == f"no answer within {hung_timeout:g} s"
    for name in ("web", "slow", "db", "redis"):
        assert results[name].status == Status.HEALTHY, (name, results[name].detail)
    assert report.status == Status.CRITICAL
    assert hung_timeout <= elapsed < hung_timeout + 0.75, elapsed
    assert len(seen) == len(targets)
