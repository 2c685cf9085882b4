"""`/ops status` in services: the window, the fan-out, thresholds, and the http, compose and tls sources
against real loopback apps, the fake docker and loopback TLS servers; the cpu rule in the watcher."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from bot.sample_app import SampleAppState, start_sample_app
from services.alerts.metrics import parse_metrics
from services.alerts.rules import TransitionKind
from services.alerts.watch import Fired, Watcher
from services.errors import CommandError
from services.figures.base import FigureError, Measurement, Window
from services.figures.compose import ComposeFigures, parse_df, parse_size, parse_stats
from services.figures.http import ONLY_IN_HISTORY, HttpFigures, ScrapeHistory, metrics_url
from services.figures.thresholds import Level
from services.health import Status, Target, targets_for
from services.inventory import Component, ComposeComponent, HttpComponent, parse_inventory
from services.probes import PROBED_TYPES
from services.redaction import Redactor
from services.state import open_state_store
from services.status import (
    FIGURE_BUILDERS,
    FigureDeps,
    TlsFigures,
    build_figure_sources,
    collect_status,
    parse_window,
)
from tests.fixtures.fake_docker import FakeDocker, fake_docker_fixture  # noqa: F401
from tests.fixtures.tls import SERVER_NAME, TlsWorld
from tests.fixtures.wait import wait_until

T0 = datetime(2026, 11, 22, 3, 0, tzinfo=UTC)
HOUR = timedelta(hours=1)


# -- the window -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "length"), [("5m", 300), ("1h", 3600), ("90min", 5400), ("7d", 604800), ("1w", 604800)]
)
def test_windows_from_five_minutes_to_seven_days(text: str, length: int) -> None:
    assert parse_window(text) == timedelta(seconds=length)


@pytest.mark.parametrize(
    ("text", "sentence"),
    [
        ("8d", "A window of 8d is longer than the 7 days `/ops status` looks back; use 7d or less."),
        ("2m", "A window of 2m is too short to measure; use 5m or more."),
        ("soon", "`--window soon` is not a length: use minutes, hours or days, like 15m, 1h or 7d."),
    ],
)
def test_a_bad_window_is_one_sentence(text: str, sentence: str) -> None:
    with pytest.raises(CommandError) as refused:
        parse_window(text)
    assert refused.value.message == sentence


# -- the fan-out --------------------------------------------------------------------------------------------


class Fixed:
    """A figure source answering with given measurements (or hanging, or failing)."""

    def __init__(self, found: list[Measurement] | None = None, *, hang: bool = False, fail: Exception | None = None):
        self.found = found or []
        self.hang = hang
        self.fail = fail
        self.started = asyncio.Event()

    async def measure(self, component: Component, window: Window, *, timeout: float) -> list[Measurement]:  # noqa: ASYNC109
        self.started.set()
        if self.hang:
            await asyncio.Event().wait()
        if self.fail is not None:
            raise self.fail
        return self.found


INVENTORY = """
services:
  shop:
    components:
      web: {type: http, url: "http://127.0.0.1:9/", metrics: /metrics, timeout: 0.3}
      box: {type: host, timeout: 2, walk_seconds: 1, thresholds: {memory_used_pct: {warning: 60, critical: 95}}}
      run: {type: cloudrun, project: my-proj, region: asia-northeast3, service: vcbl}
      db: {type: sqlite, path: /tmp/x.db}
  blog:
    components:
      site: {type: compose, project_dir: /srv/blog, timeout: 1}
"""


def targets() -> list[Target]:
    return targets_for(parse_inventory(INVENTORY, "t", env={}).inventory, "all")


async def test_each_component_is_bounded_by_its_timeout_and_judged_against_its_thresholds() -> None:
    redactor = Redactor({"hunter2-pw"})
    sources: dict[str, Any] = {
        "http": Fixed(hang=True),
        "host": Fixed(
            [
                Measurement("memory_used_pct", "memory", 70.0, "%", previous=60.0),
                Measurement("disk_used_pct", "disk /", 91.0, "%"),
            ]
        ),
        "compose": Fixed(fail=RuntimeError("postgresql://app:hunter2-pw@db failed")),
    }
    report = await collect_status(targets(), sources, HOUR, deadline=10, redactor=redactor)
    by_name = {i.target.component: i for i in report.items}
    assert by_name["web"].status is None and by_name["web"].problem == "no answer within 0.3 s"
    box = by_name["box"]
    assert box.status is Status.CRITICAL
    memory, disk = box.figures
    assert (memory.level, memory.threshold) == (Level.WARNING, 60)  # its own threshold, not the default 80
    assert (disk.level, disk.threshold) == (Level.CRITICAL, 90)  # the runbook's default ≥ 90 %
    assert by_name["site"].status is None and "hunter2-pw" not in by_name["site"].problem
    assert sorted(t.component for t in report.skipped) == ["db", "run"]  # no source given for them
    assert list(report.by_service()) == ["shop", "blog"]  # the critical service first
    assert [i.target.component for i in report.by_service()["shop"]] == ["box", "web"]
    assert report.status is Status.CRITICAL


async def test_a_source_that_fails_plainly_is_one_line_marked_unknown() -> None:
    sources: dict[str, Any] = {"compose": Fixed(fail=FigureError("`docker stats` failed: permission denied."))}
    report = await collect_status(targets(), sources, HOUR, deadline=10, redactor=Redactor())
    [site] = [i for i in report.items if i.target.component == "site"]
    assert (site.status, site.problem) == (None, "`docker stats` failed: permission denied")
    assert report.status is Status.WARNING  # unknown is not healthy


async def test_the_overall_deadline_cuts_off_what_its_timeout_has_not() -> None:
    loaded = parse_inventory(
        "services:\n  s:\n    components:\n      box: {type: host, timeout: 5, walk_seconds: 1}\n", "t", env={}
    )
    hung = Fixed(hang=True)
    report = await collect_status(
        targets_for(loaded.inventory, "all"), {"host": hung}, HOUR, deadline=0.2, redactor=Redactor()
    )
    [item] = report.items
    assert hung.started.is_set() and item.problem == "cut off at the overall deadline of 0.2 s"


async def test_every_type_with_figures_has_a_source_and_the_cloud_types_are_judged_like_the_others() -> None:
    assert set(FIGURE_BUILDERS) == {"host", "http", "compose", "tls", "cloudrun", "cloudsql", "lambda"}
    sources = build_figure_sources(FigureDeps(), types={"cloudrun", "host", "postgres"})
    assert set(sources) == {"cloudrun", "host"}
    run = Fixed([Measurement("cpu_p95_pct", "CPU p95", 85.0, "%")])
    report = await collect_status(targets(), {**sources, "cloudrun": run}, HOUR, deadline=10, redactor=Redactor())
    [item] = [i for i in report.items if i.target.component == "run"]
    assert item.status is Status.WARNING and item.figures[0].threshold == 80


# -- http: one scrape under `opsbot run`, the watcher's history under serve ---------------------------------


@pytest.fixture
async def app() -> AsyncIterator[tuple[SampleAppState, str]]:
    state = SampleAppState()
    runner, url = await start_sample_app(state)
    yield state, url
    await runner.cleanup()


def http_spec(url: str, **fields: Any) -> HttpComponent:
    return HttpComponent.model_validate({"type": "http", "url": url, "metrics": "/metrics", **fields})


async def test_without_history_totals_come_from_one_scrape_and_rates_say_where_they_are(
    app: tuple[SampleAppState, str],
) -> None:
    state, url = app
    async with aiohttp.ClientSession() as http:
        for _ in range(3):
            async with http.get(f"{url}/healthz"):
                pass
        state.status = 500
        async with http.get(f"{url}/healthz"):
            pass
    found = {m.name: m for m in await HttpFigures().measure(http_spec(url), Window(T0, HOUR), timeout=5)}
    assert (found["requests_per_min"].value, found["requests_per_min"].note) == (None, ONLY_IN_HISTORY)
    assert found["requests"].value == 4
    assert found["error_rate_pct"].value == 25.0 and found["error_rate_pct"].note == "since the app started"
    assert found["latency_p95_ms"].value is not None and found["latency_p95_ms"].value > 0


async def test_an_http_component_without_metrics_or_not_answering_is_one_sentence() -> None:
    with pytest.raises(FigureError) as refused:
        await HttpFigures().measure(http_spec("http://127.0.0.1:9", metrics=None), Window(T0, HOUR), timeout=1)
    assert refused.value.message == "no `metrics:` path is declared for this component, so it has no request figures."
    with pytest.raises(FigureError) as refused:
        await HttpFigures().measure(http_spec("http://127.0.0.1:9"), Window(T0, HOUR), timeout=1)
    assert refused.value.message.startswith("The metrics could not be read: ")
    assert "Traceback" not in refused.value.message


def metrics_text(ok: int, errors: int, fast: int, slow: int) -> str:
    return f"""# TYPE http_requests_total counter
http_requests_total{{status="200"}} {ok}
http_requests_total{{status="500"}} {errors}
# TYPE http_request_duration_seconds histogram
http_request_duration_seconds_bucket{{le="0.1"}} {fast}
http_request_duration_seconds_bucket{{le="1.0"}} {fast + slow}
http_request_duration_seconds_bucket{{le="+Inf"}} {fast + slow}
http_request_duration_seconds_count {fast + slow}
http_request_duration_seconds_sum 1
"""


async def test_with_the_watchers_history_rates_cover_the_window_and_trend_against_the_one_before() -> None:
    spec = http_spec("http://127.0.0.1:9")
    history = ScrapeHistory()
    keep = T0 - timedelta(days=1)
    history.add(metrics_url(spec), parse_metrics(metrics_text(0, 0, 0, 0), T0), keep_after=keep)
    history.add(metrics_url(spec), parse_metrics(metrics_text(570, 30, 600, 0), T0 + HOUR), keep_after=keep)
    history.add(metrics_url(spec), parse_metrics(metrics_text(1710, 90, 1200, 600), T0 + 2 * HOUR), keep_after=keep)
    found = {
        m.name: m for m in await HttpFigures(history=history).measure(spec, Window(T0 + 2 * HOUR, HOUR), timeout=1)
    }
    assert (found["requests_per_min"].value, found["requests_per_min"].previous) == (20.0, 10.0)
    assert (found["error_rate_pct"].value, found["error_rate_pct"].previous) == (5.0, 5.0)
    assert found["latency_p95_ms"].value == pytest.approx(1000 * (0.1 + 0.9 * (1140 - 600) / 600))
    assert found["latency_p95_ms"].previous == pytest.approx(95.0)
    assert found["requests_per_min"].note == ""


async def test_the_watcher_keeps_its_scrapes_where_status_reads_them(
    app: tuple[SampleAppState, str], tmp_path: Path
) -> None:
    _, url = app
    loaded = parse_inventory(
        f"""
services:
  shop:
    components:
      api:
        type: http
        url: "{url}"
        metrics: /metrics
        alerts: [{{kind: error_rate, window_seconds: 60}}]
""",
        "t",
        env={},
    )
    store = await open_state_store(None, default_path=tmp_path / "state.db")
    now = [T0]
    try:
        async with aiohttp.ClientSession() as http:
            watcher = Watcher(store, loaded.inventory, lambda t: None, http, Redactor(), probed_types=PROBED_TYPES,
                              clock=lambda: now[0])  # fmt: skip
            await watcher.round()
            async with http.get(f"{url}/healthz"):
                pass
            now[0] = T0 + timedelta(minutes=10)
            await watcher.round()
            spec = loaded.inventory.services["shop"].components["api"]
            source = HttpFigures(http, watcher.scrape_history)
            found = {m.name: m for m in await source.measure(spec, Window(now[0], HOUR), timeout=2)}
    finally:
        await store.close()
    assert found["requests_per_min"].value == pytest.approx(0.2)  # 2 requests (healthz and 1 scrape) in 10 min
    assert found["requests_per_min"].note == "over the last 10 min: the watcher keeps no older scrapes"


# -- compose: docker stats, docker inspect and df through compose exec ------------------------------------------


def test_docker_sizes_stats_and_df_parse() -> None:
    assert parse_size("512MiB") == 512 * 1024**2 and parse_size("1.5GB") == 1_500_000_000 and parse_size("n/a") is None
    [row] = parse_stats('{"Name": "a-web-1", "CPUPerc": "12.50%", "MemUsage": "256MiB / 1GiB"}').values()
    assert (row.cpu_pct, row.memory_pct) == (12.5, 25.0)
    df = "Filesystem 1024-blocks Used Available Capacity Mounted on\n/dev/sda1 1000 900 100 90% /data\n"
    assert parse_df(df) == (900 * 1024, 100 * 1024)
    with pytest.raises(FigureError):
        parse_df("df: /x: No such file or directory\n")


@pytest.fixture
def compose_spec(tmp_path: Path, fake_docker: FakeDocker) -> ComposeComponent:
    project = tmp_path / "shop"
    project.mkdir()
    return ComposeComponent.model_validate(
        {
            "type": "compose",
            "project_dir": str(project),
            "project_name": "shop",
            "docker": str(fake_docker.path),
            "disks": [{"service": "web", "path": "/data"}, {"service": "web", "path": "/gone"}],
        }
    )


async def test_compose_figures_per_container_and_disks(fake_docker: FakeDocker, compose_spec: ComposeComponent) -> None:
    fake_docker.set_stats("web", cpu_pct=91.5, used="900MiB", limit="1GiB", memory_pct=87.9, restarts=3)
    fake_docker.set_stats("worker", cpu_pct=2.0, used="100MiB", limit="1GiB", memory_pct=9.8)
    fake_docker.set_df("web", "/data", used_kb=900, available_kb=100)
    found = {m.label: m for m in await ComposeFigures().measure(compose_spec, Window(T0, HOUR), timeout=10)}
    assert found["web CPU"].value == 91.5 and found["worker CPU"].value == 2.0
    assert found["web memory"].value == pytest.approx(900 / 1024 * 100)
    assert found["web memory"].note == "900.0 MB of 1.0 GB"
    assert found["web restarts"].value == 3 and found["worker restarts"].value == 0
    assert found["disk web:/data"].value == 90.0
    assert (found["disk web:/gone"].value, found["disk web:/gone"].note) == (
        None,
        "`docker compose exec -T web df -P /gone` failed: df: /gone: No such file or directory",
    )
    calls = fake_docker.calls()
    assert ["stats", "--no-stream", "--format", "json", "shop-web-1", "shop-worker-1"] in calls
    assert ["inspect", "shop-web-1", "shop-worker-1"] in calls


async def test_a_docker_that_fails_or_hangs_is_one_sentence_or_unknown(
    fake_docker: FakeDocker, compose_spec: ComposeComponent
) -> None:
    fake_docker.fail_next(1, "permission denied while trying to connect to the Docker daemon socket\n")
    with pytest.raises(FigureError) as refused:
        await ComposeFigures().measure(compose_spec, Window(T0, HOUR), timeout=10)
    assert refused.value.message.startswith("`docker compose ps --all --format json` failed: permission denied")
    fake_docker.hang_next()
    target = Target("shop", "stack", compose_spec.model_copy(update={"timeout": 1.0}))
    report = await collect_status([target], {"compose": ComposeFigures()}, HOUR, deadline=10, redactor=Redactor())
    [item] = report.items
    assert item.status is None
    assert item.problem in (
        "no answer within 1 s",
        "`docker compose ps --all --format json` did not finish within 1 s; stopped it",
    )
    hung = fake_docker.hung()
    from tests.fixtures.fake_docker import process_gone

    await wait_until(lambda: process_gone(hung.docker) and process_gone(hung.plugin), "the hung docker is killed")


async def test_the_cpu_rule_fires_and_resolves_from_docker_stats(
    fake_docker: FakeDocker, compose_spec: ComposeComponent, tmp_path: Path
) -> None:
    text = f"""
services:
  shop:
    components:
      stack:
        type: compose
        project_dir: "{compose_spec.project_dir}"
        project_name: shop
        docker: "{fake_docker.path}"
        alerts: [{{kind: cpu, threshold_pct: 80, for_minutes: 0, resolve_for_minutes: 0}}]
"""
    loaded = parse_inventory(text, "t", env={})
    store = await open_state_store(None, default_path=tmp_path / "state.db")
    fired: list[Fired] = []
    now = [T0]

    class Notes:
        async def fired(self, alert: Fired) -> tuple[str, str] | None:
            fired.append(alert)
            return None

        async def resolved(self, alert: Fired) -> None:
            fired.append(alert)

    try:
        async with aiohttp.ClientSession() as http:
            watcher = Watcher(store, loaded.inventory, lambda t: None, http, Redactor(), probed_types=PROBED_TYPES,
                              notifier=Notes(), clock=lambda: now[0])  # fmt: skip
            fake_docker.set_stats("web", cpu_pct=95.0, used="1MiB", limit="1GiB", memory_pct=0.1)
            [up] = await watcher.round()
            assert up.transition.kind is TransitionKind.FIRED and up.key == "shop/stack/HighCpu"
            assert up.transition.evidence == "web CPU 95 %; alerts above 80 %"
            fake_docker.set_stats("web", cpu_pct=10.0, used="1MiB", limit="1GiB", memory_pct=0.1)
            now[0] = T0 + timedelta(minutes=1)
            [down] = await watcher.round()
            assert down.transition.kind is TransitionKind.RESOLVED
    finally:
        await store.close()
    assert [f.transition.kind for f in fired] == [TransitionKind.FIRED, TransitionKind.RESOLVED]


# -- tls -----------------------------------------------------------------------------------------------------


async def test_days_left_of_a_certificate_is_a_figure_judged_by_the_components_days(tls_world: TlsWorld) -> None:
    loaded = parse_inventory(
        f"""
services:
  site:
    components:
      cert: {{type: tls, host: 127.0.0.1, port: {tls_world.ports["expiring_15"]}, server_name: {SERVER_NAME},
              ca_file: "{tls_world.ca_file}", warning_days: 30, critical_days: 10}}
      soon: {{type: tls, host: 127.0.0.1, port: {tls_world.ports["expiring_5"]}, server_name: {SERVER_NAME},
              ca_file: "{tls_world.ca_file}"}}
      silent: {{type: tls, host: 127.0.0.1, port: {tls_world.ports["silent"]}, timeout: 0.5}}
""",
        "t",
        env={},
    )
    report = await collect_status(
        targets_for(loaded.inventory, "all"), {"tls": TlsFigures()}, HOUR, deadline=10, redactor=Redactor()
    )
    cert, soon, silent = report.items
    assert cert.status is Status.WARNING and cert.figures[0].threshold == 30  # its warning_days, not 21
    assert 14 < (cert.figures[0].measurement.value or 0) <= 15
    assert soon.status is Status.CRITICAL
    assert silent.status is None and silent.problem
