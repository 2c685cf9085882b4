"""The digest's "certificates expiring within 30 days" from its own fresh probes of loopback TLS servers
(certificates made by the tests), and the weekly digest's busiest figure per service read from the
figure sources (Cloud Monitoring's gRPC fake, moto's CloudWatch refusing nothing, a dead endpoint)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from handlers import blocks as bk
from handlers.digest import render_digest
from services.backup.runner import BackupRunner
from services.digest import gather_digest
from services.figures.base import FigureSource
from services.figures.cloud_monitoring import CPU_UTILIZATIONS, SQL_CPU, SQL_DISK_QUOTA, SQL_DISK_USED
from services.health import HealthProbe, ProbeObserver, Status, Target
from services.inventory import Inventory, parse_inventory
from services.probes import build_health_probes
from services.redaction import Redactor
from services.state import StateStore
from services.state.factory import open_state_store
from services.status import FigureDeps, build_figure_sources, close_sources
from tests.fixtures.monitoring import FakeMonitoring, linear, start_monitoring_fake
from tests.fixtures.tls import SERVER_NAME, TlsWorld

PROJECT = "demo-project"
REGION = "asia-northeast3"
GIB = 2**30
NOW = datetime.now(UTC).replace(microsecond=0)


@dataclass
class Sources:
    """What ``gather_digest`` reads: a real inventory and state store, the real probes, no backups."""

    inventory: Inventory
    store: StateStore
    probes: Mapping[str, HealthProbe]
    redactor: Redactor = field(default_factory=Redactor)
    backups: BackupRunner | None = None
    observe_probe: ProbeObserver | None = None

    def probe_for(self, target: Target) -> HealthProbe | None:
        return self.probes.get(target.type)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[StateStore]:
    opened = await open_state_store(None, default_path=tmp_path / "state.sqlite3")
    try:
        yield opened
    finally:
        await opened.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def tls_line(world: TlsWorld, name: str, endpoint: str, **extra: str) -> str:
    fields = {
        "type": "tls",
        "host": "127.0.0.1",
        "port": world.ports[endpoint],
        "server_name": SERVER_NAME,
        "ca_file": str(world.ca_file),
        "timeout": 3,
        **extra,
    }
    return f"      {name}: {json.dumps(fields)}"


def sources_for(text: str, store: StateStore, http: aiohttp.ClientSession) -> Sources:
    inventory = parse_inventory(text, "test inventory", env={}).inventory
    types = {spec.type for _, _, spec in inventory.components()}
    return Sources(inventory, store, build_health_probes(http, types=types))


def section(blocks: list[dict[str, Any]], title: str) -> str:
    """The text of the digest's section whose title starts with ``title`` (up to the next divider)."""
    text = json.dumps(blocks, ensure_ascii=False)
    start = text.index(title)
    end = text.find('"type": "divider"', start)
    return text[start : end if end != -1 else len(text)]


async def test_certificates_within_30_days_or_untrusted_are_listed_worst_first(
    tls_world: TlsWorld, store: StateStore, http: aiohttp.ClientSession
) -> None:
    text = "\n".join(
        [
            "timezone: Asia/Seoul",
            "services:",
            "  shop:",
            "    components:",
            tls_line(tls_world, "fine", "valid"),  # 200 days: not listed
            tls_line(tls_world, "soon", "expiring_15"),  # 15 days: warning, listed
            tls_line(tls_world, "month", "valid", warning_days="40"),  # 200 days, whatever its thresholds
            "  blog:",
            "    components:",
            tls_line(tls_world, "gone", "expired"),  # expired 3 days ago: critical
            tls_line(tls_world, "urgent", "expiring_5"),  # 5 days: critical
            tls_line(tls_world, "wrong", "valid", server_name="other.test"),  # 200 days but not trusted
        ]
    )
    sources = sources_for(text, store, http)

    facts = await gather_digest(sources, "daily", now=NOW)

    listed = [(c.service, c.component, c.status) for c in facts.certificates]
    assert listed == [
        ("blog", "gone", Status.CRITICAL),  # critical first, fewest days left first
        ("blog", "urgent", Status.CRITICAL),
        ("blog", "wrong", Status.CRITICAL),
        ("shop", "soon", Status.WARNING),
    ]
    wrong = facts.certificates[2]
    assert wrong.problem == "host name mismatch (not valid for other.test)" and wrong.days_left is not None
    assert facts.busiest is None  # a daily digest reads no figures

    digest = render_digest(facts)
    part = section(digest.blocks, "*Certificates expiring within 30 days*")
    lines = [line for line in part.split("\\n") if "*blog/" in line or "*shop/" in line]
    assert [line.split("*")[1] for line in lines] == ["blog/gone", "blog/urgent", "blog/wrong", "shop/soon"]
    assert "expired 3 days ago" in lines[0] and "not trusted" not in lines[0]  # expired is said once
    assert "expires in 5 days" in lines[1]
    assert "not trusted: host name mismatch (not valid for other.test)" in lines[2]
    assert "expires in 15 days" in lines[3]
    assert "shop/fine" not in part and "shop/month" not in part
    assert digest.snapshot["certificates"] == ["blog/gone", "blog/urgent", "blog/wrong", "shop/soon"]

    # The next digest says what is new and what was renewed since the one posted.
    await store.save_digest("daily", at=NOW, snapshot={**digest.snapshot, "certificates": ["shop/old", "shop/soon"]})
    later = render_digest(await gather_digest(sources, "daily", now=NOW + timedelta(hours=1)))
    change = section(later.blocks, "*Certificates expiring within 30 days*")
    assert "new: blog/gone, blog/urgent, blog/wrong; renewed or fixed: shop/old" in change


async def test_no_certificate_section_when_none_is_near_expiry(
    tls_world: TlsWorld, store: StateStore, http: aiohttp.ClientSession
) -> None:
    text = "\n".join(["services:", "  shop:", "    components:", tls_line(tls_world, "fine", "valid")])

    facts = await gather_digest(sources_for(text, store, http), "daily", now=NOW)

    assert facts.certificates == []
    rendered = json.dumps(render_digest(facts).blocks, ensure_ascii=False)
    assert "Certificates expiring" not in rendered
    assert "*Health*" in rendered  # the rest of the digest is there


# --- the busiest figure per service, weekly ---------------------------------------------------------------


@pytest.fixture
async def monitoring() -> AsyncIterator[FakeMonitoring]:
    fake = await start_monitoring_fake(project=PROJECT)
    yield fake
    await fake.close()


def over_the_week(step: timedelta = timedelta(hours=6)) -> list[datetime]:
    count = int(timedelta(days=7) / step)
    return [NOW - step * k - timedelta(seconds=30) for k in range(count)]


def cpu_histogram(bucket: int, count: int) -> Any:
    counts = [0] * 12
    counts[bucket] = count
    return linear(counts, offset=0.0, width=0.1)


async def test_the_weekly_digest_shows_the_busiest_figure_of_each_service(
    store: StateStore, http: aiohttp.ClientSession, monitoring: FakeMonitoring
) -> None:
    text = f"""
services:
  shop:
    components:
      run: {{type: cloudrun, project: {PROJECT}, region: {REGION}, service: web, timeout: 5}}
      db: {{type: cloudsql, project: {PROJECT}, instance: main-db, timeout: 5}}
  blog:
    components:
      run: {{type: cloudrun, project: {PROJECT}, region: {REGION}, service: blog, timeout: 5}}
      fn: {{type: lambda, function: gone, region: us-east-1, endpoint_url: "http://127.0.0.1:9", timeout: 2}}
"""
    sources = sources_for(text, store, http)
    web = {"service_name": "web", "revision_name": "web-1", "location": REGION, "project_id": PROJECT}
    blog = {"service_name": "blog", "revision_name": "blog-1", "location": REGION, "project_id": PROJECT}
    database = {"database_id": f"{PROJECT}:main-db", "region": REGION, "project_id": PROJECT}
    week = over_the_week()
    # shop: CPU p95 of Cloud Run 39.5 %, Cloud SQL CPU at 60 %, disk 5 of 10 GiB (50 %): the SQL CPU is busiest.
    monitoring.add(CPU_UTILIZATIONS, web, [(end, cpu_histogram(4, 10)) for end in week])
    monitoring.add(SQL_CPU, database, [(end, 0.6) for end in week])
    monitoring.add(SQL_DISK_USED, database, [(end, 5 * GIB) for end in week])
    monitoring.add(SQL_DISK_QUOTA, database, [(end, 10 * GIB) for end in week])
    # blog: CPU samples all in [0.8, 0.9): p95 89.5 %, past the runbook's 80 %.
    monitoring.add(CPU_UTILIZATIONS, blog, [(end, cpu_histogram(9, 10)) for end in week])
    figures: Mapping[str, FigureSource] = build_figure_sources_on(monitoring)
    try:
        facts = await gather_digest(sources, "weekly", now=NOW, figures=figures)
    finally:
        await close_sources(figures)

    assert facts.busiest is not None and facts.busiest.window == timedelta(days=7)
    found = [(b.service, b.component, b.line.measurement.name) for b in facts.busiest.services]
    assert found == [("blog", "run", "cpu_p95_pct"), ("shop", "db", "cpu_p95_pct")]  # busiest first
    assert [b.line.measurement.value for b in facts.busiest.services] == pytest.approx([89.5, 60.0])
    [(where, why)] = facts.busiest.unread
    assert where == "blog/fn" and "Lambda function gone" in why  # no credentials, or nothing listening
    # The queries covered the week, aggregated by Cloud Monitoring (one window, or steps of ~1/100 of it).
    asked = monitoring.calls(CPU_UTILIZATIONS)
    assert any(r.interval.start_time == NOW - timedelta(days=7) and r.interval.end_time == NOW for r in asked)
    assert all(r.aggregation.alignment_period.total_seconds() == 7 * 86400 for r in asked)
    sql_steps = {r.aggregation.alignment_period.total_seconds() for r in monitoring.calls(SQL_CPU)}
    assert sql_steps == {101 * 60.0}  # 7 days / 100, in whole minutes

    part = section(render_digest(facts).blocks, "*Busiest figure per service*")
    assert "over the last 7 days" in part
    assert part.index("*blog* busiest: run CPU p95 89.5 %") < part.index("*shop* busiest: db CPU p95 60.0 %")
    assert f"{bk.STATUS_EMOJI[Status.WARNING]} *blog* busiest" in part  # past 80 %: a warning
    assert f"{bk.STATUS_EMOJI[Status.HEALTHY]} *shop* busiest" in part
    assert "Figures not read: blog/fn" in part


def build_figure_sources_on(fake: FakeMonitoring) -> dict[str, FigureSource]:
    """The bot's figure sources, with Cloud Monitoring reached at the fake (as OPSBOT_MONITORING_ENDPOINT does)."""
    return build_figure_sources(FigureDeps(monitoring_endpoint=fake.address))
