"""Alert rules on cloud figures through the watcher's rounds: a `cpu` rule on a Cloud Run service and a
`disk` rule on a Cloud SQL instance, their figures read by the real google-cloud-monitoring client from the
grpc.aio fake of Cloud Monitoring, with the watcher's clock injected (the fake serves the points the test
wrote around that clock)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest

from services.alerts.rules import ErrorRateRule, TransitionKind
from services.alerts.watch import Fired, Watcher, state_from_json
from services.figures.cloud_monitoring import (
    CPU_UTILIZATIONS,
    REQUEST_COUNT,
    SQL_DISK_QUOTA,
    SQL_DISK_USED,
    CloudMonitoringFigures,
)
from services.inventory import parse_inventory
from services.redaction import Redactor
from services.state import StateStore, open_state_store
from tests.fixtures.monitoring import FakeMonitoring, linear, start_monitoring_fake

T0 = datetime(2026, 11, 22, 3, 0, tzinfo=UTC)
PROJECT = "demo-project"
REGION = "asia-northeast3"
REVISION = {"service_name": "web", "revision_name": "web-00003-xyz", "location": REGION, "project_id": PROJECT}
DATABASE = {"database_id": f"{PROJECT}:main-db", "region": REGION, "project_id": PROJECT}
GIB = 2**30
CPU_KEY = "web/run/HighCpu"
DISK_KEY = "web/db/DiskFull"


@dataclass
class Recorder:
    fired: list[Fired] = field(default_factory=list)
    resolved: list[Fired] = field(default_factory=list)

    async def fired_(self, alert: Fired) -> tuple[str, str] | None:
        self.fired.append(alert)
        return "C0OPS", f"ts-{alert.key}"

    async def resolved_(self, alert: Fired) -> None:
        self.resolved.append(alert)


class Notifier:
    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder

    async def fired(self, alert: Fired) -> tuple[str, str] | None:
        return await self.recorder.fired_(alert)

    async def resolved(self, alert: Fired) -> None:
        await self.recorder.resolved_(alert)


@dataclass
class World:
    watcher: Watcher
    fake: FakeMonitoring
    store: StateStore
    seen: Recorder
    now: list[datetime]

    async def at(self, minutes: float) -> list[Fired]:
        self.now[0] = T0 + timedelta(minutes=minutes)
        return await self.watcher.round()


INVENTORY = f"""
alerts: {{interval_seconds: 60}}
services:
  web:
    components:
      run:
        type: cloudrun
        project: {PROJECT}
        region: {REGION}
        service: web
        timeout: 5
        alerts:
          - {{kind: cpu, threshold_pct: 80, for_minutes: 0, resolve_for_minutes: 0}}
      db:
        type: cloudsql
        project: {PROJECT}
        instance: main-db
        timeout: 5
        alerts:
          - {{kind: disk, threshold_pct: 90, for_minutes: 0, resolve_for_minutes: 0}}
"""


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    fake = await start_monitoring_fake(project=PROJECT)
    store = await open_state_store(None, default_path=tmp_path / "state.db")
    loaded = parse_inventory(INVENTORY, "test", env={})
    now = [T0]
    seen = Recorder()
    figures = CloudMonitoringFigures(channel_factory=fake.channel)
    sources = {"cloudrun": figures, "cloudsql": figures}
    try:
        async with aiohttp.ClientSession() as http:
            watcher = Watcher(
                store, loaded.inventory, lambda target: None, http, Redactor(), probed_types=frozenset(),
                notifier=Notifier(seen), clock=lambda: now[0], figures=sources,
            )  # fmt: skip
            assert {w.target.component for w in watcher.components if w.reads_figures} == {"run", "db"}
            yield World(watcher, fake, store, seen, now)
    finally:
        await figures.close()
        await store.close()
        await fake.close()


def cpu(fraction_bucket: int, samples: int = 10) -> Any:
    """A CPU utilization histogram with every sample in [0.1·(bucket-1), 0.1·bucket)."""
    counts = [0] * 12
    counts[fraction_bucket] = samples
    return linear(counts, offset=0.0, width=0.1)


def cpu_minutes(start_minute: int, end_minute: int, bucket: int) -> list[tuple[datetime, Any]]:
    """One histogram a minute, ending 30 s before each minute from ``start_minute`` to ``end_minute`` after T0."""
    return [(T0 + timedelta(minutes=m, seconds=-30), cpu(bucket)) for m in range(start_minute + 1, end_minute + 1)]


async def test_a_cpu_rule_on_cloud_run_fires_above_80_and_resolves_below(world: World) -> None:
    # Minutes -5..0: samples in [0.9, 1.0) (p95 99.5 %); minutes 5..10: in [0.3, 0.4) (p95 39.5 %).
    world.fake.add(CPU_UTILIZATIONS, REVISION, cpu_minutes(-5, 0, 10))
    world.fake.add(CPU_UTILIZATIONS, REVISION, cpu_minutes(5, 10, 4))

    fired = [f for f in await world.at(0) if f.key == CPU_KEY]

    [alert] = fired
    assert alert.transition.kind is TransitionKind.FIRED and alert.rule.alert_name == "HighCpu"
    assert alert.transition.evidence == "CPU p95 99.5 %; alerts above 80 %"
    stored = (await world.store.load_alerts())[CPU_KEY]
    assert state_from_json(stored.state, CPU_KEY).firing and stored.message_ts == f"ts-{CPU_KEY}"
    # The watcher read the last five minutes (for_minutes 0: the default window) of this service only.
    [request] = [r for r in world.fake.calls(CPU_UTILIZATIONS) if r.interval.end_time == T0]
    assert request.interval.start_time == T0 - timedelta(minutes=5)
    assert 'resource.labels.service_name = "web"' in request.filter

    [resolved] = [f for f in await world.at(10) if f.key == CPU_KEY]
    assert [f.key for f in world.seen.resolved] == [CPU_KEY]
    assert resolved.transition.kind is TransitionKind.RESOLVED
    assert resolved.stored is not None and resolved.stored.message_ts == f"ts-{CPU_KEY}"  # the message is edited
    kept = (await world.store.load_alerts())[CPU_KEY].state
    assert kept["phase"] == "ok" and kept["resolved_at"] == (T0 + timedelta(minutes=10)).isoformat()
    assert len([f for f in world.seen.fired if f.key == CPU_KEY]) == 1


async def test_a_disk_rule_on_cloud_sql_fires_at_90_and_resolves(world: World) -> None:
    full = [T0 + timedelta(minutes=m, seconds=-30) for m in range(-4, 1)]
    grown = [T0 + timedelta(minutes=m, seconds=-30) for m in range(6, 11)]
    world.fake.add(SQL_DISK_USED, DATABASE, [(end, 9 * GIB) for end in full] + [(end, 9 * GIB) for end in grown])
    world.fake.add(SQL_DISK_QUOTA, DATABASE, [(end, 10 * GIB) for end in full] + [(end, 20 * GIB) for end in grown])

    [alert] = [f for f in await world.at(0) if f.key == DISK_KEY]
    assert alert.transition.kind is TransitionKind.FIRED
    assert alert.transition.evidence.startswith("disk used 90 %")  # exactly 90 % fires (runbook 001: ≥ 90 %)

    await world.at(10)  # the disk was grown to 20 GiB: 45 %
    [resolved] = [f for f in world.seen.resolved if f.key == DISK_KEY]
    assert resolved.transition.kind is TransitionKind.RESOLVED and "45 %" in resolved.transition.evidence


async def test_a_monitoring_failure_holds_the_alert_rather_than_resolving_it(world: World) -> None:
    world.fake.add(CPU_UTILIZATIONS, REVISION, cpu_minutes(-5, 0, 10))
    [alert] = [f for f in await world.at(0) if f.key == CPU_KEY]
    assert alert.transition.kind is TransitionKind.FIRED

    world.fake.fail_next = [(grpc.StatusCode.PERMISSION_DENIED, "denied")] * 40
    assert [f for f in await world.at(1) if f.key == CPU_KEY] == []  # unknown: neither resolved nor fired again

    assert world.seen.resolved == []
    stored = (await world.store.load_alerts())[CPU_KEY]
    assert state_from_json(stored.state, CPU_KEY).firing


def test_an_error_rate_rule_is_accepted_on_cloud_run() -> None:
    """The inventory takes `error_rate` on a cloudrun component (it is a rule kind like the others)."""
    loaded = parse_inventory(
        INVENTORY.replace(
            "{kind: cpu, threshold_pct: 80, for_minutes: 0, resolve_for_minutes: 0}",
            "{kind: error_rate, threshold_pct: 5, for_minutes: 0, resolve_for_minutes: 0}",
        ),
        "test",
        env={},
    )
    [rule] = loaded.inventory.services["web"].components["run"].alerts
    assert isinstance(rule, ErrorRateRule)


async def test_an_error_rate_rule_on_cloud_run_fires_from_cloud_monitoring(tmp_path: Path) -> None:
    fake = await start_monitoring_fake(project=PROJECT)
    store = await open_state_store(None, default_path=tmp_path / "state.db")
    loaded = parse_inventory(
        INVENTORY.replace(
            "{kind: cpu, threshold_pct: 80, for_minutes: 0, resolve_for_minutes: 0}",
            "{kind: error_rate, threshold_pct: 5, for_minutes: 0, resolve_for_minutes: 0}",
        ),
        "test",
        env={},
    )
    figures = CloudMonitoringFigures(channel_factory=fake.channel)
    ends = [T0 + timedelta(minutes=m, seconds=-30) for m in range(-4, 1)]
    fake.add(REQUEST_COUNT, REVISION, [(end, 80) for end in ends], labels={"response_code_class": "2xx"})
    fake.add(REQUEST_COUNT, REVISION, [(end, 20) for end in ends], labels={"response_code_class": "5xx"})  # 20 %
    try:
        async with aiohttp.ClientSession() as http:
            watcher = Watcher(
                store, loaded.inventory, lambda target: None, http, Redactor(), probed_types=frozenset(),
                clock=lambda: T0, figures={"cloudrun": figures, "cloudsql": figures},
            )  # fmt: skip
            fired = await watcher.round()
        [alert] = [f for f in fired if f.transition.kind is TransitionKind.FIRED]
        assert alert.key == "web/run/HighErrorRate"
        assert alert.transition.evidence == "5xx rate 20 %; alerts above 5 %", alert.transition.evidence
    finally:
        await figures.close()
        await store.close()
        await fake.close()
