"""The watcher against a real sample app and a real state store, with a controllable clock."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import pytest

from bot.sample_app import SampleAppState, start_sample_app
from services.alerts.rules import TransitionKind
from services.alerts.watch import Fired, Watcher, state_from_json
from services.health import Target
from services.inventory import parse_inventory
from services.locks import LocalLocks
from services.probes import PROBED_TYPES, build_health_probes
from services.redaction import Redactor
from services.state import StateStore, open_state_store

T0 = datetime(2026, 11, 22, 3, 0, tzinfo=UTC)


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
    app: SampleAppState
    url: str
    store: StateStore
    http: aiohttp.ClientSession
    seen: Recorder
    now: list[datetime]

    async def at(self, seconds: float) -> list[Fired]:
        self.now[0] = T0 + timedelta(seconds=seconds)
        return await self.watcher.round()


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    app = SampleAppState()
    runner, url = await start_sample_app(app)
    store = await open_state_store(None, default_path=tmp_path / "state.db")
    loaded = parse_inventory(
        f"""
alerts: {{interval_seconds: 20}}
services:
  shop:
    components:
      api:
        type: http
        url: "{url}"
        metrics: /metrics
        timeout: 2
        alerts:
          - {{kind: down, for_minutes: 1}}
          - {{kind: error_rate, threshold_pct: 5, window_seconds: 60, for_minutes: 0, resolve_for_minutes: 0,
              match: {{endpoint: /healthz}}}}
""",
        "test",
        env={},
    )
    now = [T0]
    seen = Recorder()
    async with aiohttp.ClientSession() as http:
        probes = build_health_probes(http, types=PROBED_TYPES)
        watcher = Watcher(
            store, loaded.inventory, lambda t: probes.get(t.type), http, Redactor(), probed_types=PROBED_TYPES,
            notifier=Notifier(seen), clock=lambda: now[0],
        )  # fmt: skip
        try:
            yield World(watcher, app, url, store, http, seen, now)
        finally:
            await store.close()
            await runner.cleanup()


def down_alerts(fired: list[Fired]) -> list[Fired]:
    return [f for f in fired if f.key == "shop/api/ServiceDown"]


async def test_a_flapping_target_fires_once_and_the_resolve_edits_that_message(world: World) -> None:
    second = 0
    for _ in range(10):  # down and up on alternate rounds, 20 s apart: never down for a whole minute
        world.app.status = 503 if (second // 20) % 2 == 0 else None
        await world.at(second)
        second += 20
    assert down_alerts(world.seen.fired) == []
    world.app.status = 503
    for _ in range(5):
        await world.at(second)
        second += 20
    [fired] = down_alerts(world.seen.fired)
    assert fired.transition.kind is TransitionKind.FIRED and fired.rule.alert_name == "ServiceDown"
    stored = (await world.store.load_alerts())["shop/api/ServiceDown"]
    assert (stored.message_channel, stored.message_ts) == ("C0OPS", "ts-shop/api/ServiceDown")
    assert state_from_json(stored.state, stored.key).firing
    world.app.status = None
    for _ in range(5):
        await world.at(second)
        second += 20
    [resolved] = down_alerts(world.seen.resolved)
    kept = (await world.store.load_alerts())["shop/api/ServiceDown"].state
    assert kept["phase"] == "ok" and kept["resolved_at"] == resolved.transition.at.isoformat()
    assert kept["last_fired_at"] == fired.transition.at.isoformat()  # the digest can still tell it happened
    assert (
        resolved.stored is not None and resolved.stored.message_ts == "ts-shop/api/ServiceDown"
    )  # the fired message is edited
    assert len(down_alerts(world.seen.fired)) == 1
    history = await world.store.probe_history(since=T0)
    assert len(history) == 20 and {h.status for h in history} == {0, 2}


async def test_a_silence_suppresses_the_post_and_its_end_announces_what_is_still_broken(world: World) -> None:
    await world.store.add_silence(
        "shop/api/ServiceDown", until=T0 + timedelta(minutes=3), by="U0OPS", reason="deploying", at=T0
    )
    world.app.status = 503
    for second in range(0, 180, 20):
        await world.at(second)
    assert down_alerts(world.seen.fired) == []  # firing, but silenced
    state = (await world.store.load_alerts())["shop/api/ServiceDown"]
    assert state_from_json(state.state, state.key).firing
    await world.at(200)  # the silence has ended and it is still down
    [fired] = down_alerts(world.seen.fired)
    assert fired.transition.after_silence


async def test_error_rate_from_two_real_scrapes_fires_above_five_percent(world: World) -> None:
    await world.at(0)  # the first scrape
    async with aiohttp.ClientSession() as client:
        for n in range(100):
            world.app.status = 500 if n < 6 else None
            async with client.get(f"{world.url}/healthz") as resp:
                await resp.read()
    world.app.status = None
    fired = await world.at(20)
    [rate] = [f for f in fired if f.key == "shop/api/HighErrorRate"]
    assert "6 of 101" in rate.transition.evidence  # our 100, and the watcher's own probe
    assert down_alerts(fired) == []


def test_targets_are_what_the_inventory_says() -> None:
    loaded = parse_inventory(
        "services: {s: {components: {db: {type: sqlite, path: /tmp/x.db}, run: {type: cloudrun, project: "
        "demo-project, region: asia-northeast3, service: shop}}}}",
        "t",
        env={},
    )
    from services.alerts.watch import watched

    found = watched(loaded.inventory, PROBED_TYPES)
    assert [(w.target.component, [r.alert_name for r in w.rules]) for w in found] == [("db", ["ServiceDown"])]
    assert isinstance(found[0].target, Target)


async def test_two_replicas_sharing_locks_do_each_round_once(world: World) -> None:
    locks = LocalLocks()
    replicas = [
        Watcher(
            world.store,
            world.watcher.inventory,
            world.watcher.probe_for,
            world.http,
            Redactor(),
            probed_types=PROBED_TYPES,
            clock=lambda: world.now[0],
            claim=lambda key, ttl, name=name: locks.lease(key, name, ttl),
        )
        for name in ("a", "b")
    ]
    world.now[0] = T0 + timedelta(seconds=5)
    first = [await w.tick() for w in replicas]
    assert [r is None for r in first] == [False, True]
    world.now[0] = T0 + timedelta(seconds=25)  # the next 20 s round
    second = [await w.tick() for w in replicas]
    assert sum(r is not None for r in second) == 1
    history = await world.store.probe_history(since=T0)
    assert len(history) == 2  # one probe result per round, not one per replica
