"""The watcher's queue rules against a real Redis, with jobs written by the real Bull and BullMQ libraries
and the watcher's clock moved forward (rates are over the 15 minutes before the clock, ages up to it)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import pytest
from structlog.testing import capture_logs

from services.alerts.rules import Phase, TransitionKind
from services.alerts.watch import Fired, Watcher, state_from_json
from services.inventory import parse_inventory
from services.probes import PROBED_TYPES, build_health_probes
from services.redaction import Redactor
from services.state import StateStore, open_state_store
from tests.fixtures.bull import LIBRARIES, NodeQueues, inventory_library, node_queues  # noqa: F401
from tests.fixtures.servers import free_port

_prefixes = itertools.count()
FAILURES = "vcc/redis/QueueFailureRate"
BACKLOG = "vcc/redis/QueueBacklog"


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
    store: StateStore
    seen: Recorder
    start: datetime
    now: list[datetime]

    async def at(self, minutes: float) -> list[Fired]:
        self.now[0] = self.start + timedelta(minutes=minutes)
        return await self.watcher.round()

    async def phase(self, key: str) -> Phase:
        stored = (await self.store.load_alerts())[key]
        return state_from_json(stored.state, key).phase


Make = Callable[..., Awaitable[World]]


@pytest.fixture
async def make_world(tmp_path: Path) -> AsyncIterator[Make]:
    """A watcher over one redis component with queue rules; its clock starts now, in real time, because
    the libraries stamp jobs and events with the real time."""
    store = await open_state_store(None, default_path=tmp_path / "state.db")
    async with aiohttp.ClientSession() as http:
        probes = build_health_probes(http, types=PROBED_TYPES)

        async def make(url: str, queues: str, secrets: tuple[str, ...] = ()) -> World:
            loaded = parse_inventory(
                f"""
alerts: {{interval_seconds: 60}}
services:
  vcc:
    components:
      redis:
        type: redis
        url: "{url}"
        timeout: 2
        queues: {queues}
        alerts:
          - {{kind: down, for_minutes: 0}}
          - {{kind: queue_failure_rate, threshold_pct: 10, for_minutes: 0, resolve_for_minutes: 0}}
          - {{kind: queue_oldest_waiting, threshold_minutes: 15, for_minutes: 1, resolve_for_minutes: 0}}
""",
                "test",
                env={},
            )
            start = datetime.now(UTC)
            now = [start]
            seen = Recorder()
            watcher = Watcher(
                store, loaded.inventory, lambda t: probes.get(t.type), http, Redactor(secrets),
                probed_types=PROBED_TYPES, notifier=Notifier(seen), clock=lambda: now[0],
            )  # fmt: skip
            return World(watcher, store, seen, start, now)

        try:
            yield make
        finally:
            await store.close()


def spec_of(library: str) -> tuple[str, dict[str, str]]:
    prefix = f"w{next(_prefixes)}"
    return f"{{library: {inventory_library(library)}, prefix: {prefix}, names: [images]}}", {
        "library": library,
        "prefix": prefix,
        "queue": "images",
    }


def keys(fired: list[Fired]) -> list[tuple[str, TransitionKind]]:
    return sorted((f.key, f.transition.kind) for f in fired)


@pytest.mark.parametrize("library", LIBRARIES)
async def test_failures_fire_then_resolve_as_the_window_moves_on_and_a_backlog_fires_then_clears(
    library: str,
    redis_url: str,
    node_queues: NodeQueues,  # noqa: F811
    make_world: Make,
) -> None:
    queues, spec = spec_of(library)
    # 25 jobs processed by a real worker, 15 of them failed (60 %); then 3 jobs nobody takes.
    await node_queues.seed(redis_url, **spec, phases=[{"completed": 10, "failed": ["boom"] * 15}], waiting=3)
    world = await make_world(redis_url, queues)

    fired = await world.at(0)
    assert keys(fired) == [(FAILURES, TransitionKind.FIRED)]
    assert fired[0].transition.evidence == "images: 60 % of 25 jobs failed in 15 min; alerts above 10 %"
    assert await world.phase(BACKLOG) is Phase.OK  # three jobs, waiting for seconds only

    # 16 minutes on: the failures have left the window, and the same three jobs still wait.
    fired = await world.at(16)
    assert keys(fired) == [(FAILURES, TransitionKind.RESOLVED)]
    assert fired[0].transition.evidence.startswith("too few jobs finished to judge: images: 0 jobs in 15 min")
    assert fired[0].stored is not None and fired[0].stored.message_ts == f"ts-{FAILURES}"  # the message is edited
    assert await world.phase(BACKLOG) is Phase.PENDING  # a breach holds for a minute before it fires

    fired = await world.at(17)
    assert keys(fired) == [(BACKLOG, TransitionKind.FIRED)]
    assert fired[0].transition.evidence.startswith("images: the oldest of 3 waiting jobs has waited 17 min;")

    await node_queues.work(redis_url, **spec)  # a real worker takes every waiting job
    fired = await world.at(18)
    assert keys(fired) == [(BACKLOG, TransitionKind.RESOLVED)]
    assert fired[0].transition.evidence == "no jobs waiting"
    assert [f.key for f in world.seen.fired] == [FAILURES, BACKLOG]
    assert [f.key for f in world.seen.resolved] == [FAILURES, BACKLOG]


@pytest.mark.parametrize("library", LIBRARIES)
async def test_a_paused_queue_waits_on_purpose(
    library: str,
    redis_url: str,
    node_queues: NodeQueues,  # noqa: F811
    make_world: Make,
) -> None:
    queues, spec = spec_of(library)
    await node_queues.seed(redis_url, **spec, waiting=2, paused=True)
    world = await make_world(redis_url, queues)

    for minute in (0, 30, 60):
        assert await world.at(minute) == []
    stored = (await world.store.load_alerts())[BACKLOG]
    assert state_from_json(stored.state, BACKLOG).phase is Phase.OK
    assert stored.state["evidence"] == "images is paused: its 2 waiting jobs are not a stall"


async def test_queues_are_discovered_when_none_are_declared(
    redis_url: str,
    node_queues: NodeQueues,  # noqa: F811
    make_world: Make,
) -> None:
    _, spec = spec_of("bullmq6")
    await node_queues.seed(redis_url, **spec, phases=[{"completed": 1}], waiting=1)
    await node_queues.seed(redis_url, **{**spec, "queue": "mail"}, phases=[{"failed": ["smtp down"] * 20}])
    world = await make_world(redis_url, f"{{library: bullmq, prefix: {spec['prefix']}}}")

    fired = await world.at(0)
    assert keys(fired) == [(FAILURES, TransitionKind.FIRED)]
    assert fired[0].transition.evidence.startswith("mail: 100 % of 20 jobs failed in 15 min")


async def test_an_unreadable_redis_makes_queue_rules_unknown_and_the_round_goes_on(
    redis_url: str,
    node_queues: NodeQueues,  # noqa: F811
    make_world: Make,
) -> None:
    queues, spec = spec_of("bull")
    await node_queues.seed(redis_url, **spec, phases=[{"failed": ["boom"] * 20}], waiting=1)
    world = await make_world(redis_url, queues)
    assert keys(await world.at(0)) == [(FAILURES, TransitionKind.FIRED)]

    # The same alerts, but now Redis is gone (nothing listens on the port; the URL carries a password).
    secret = "s3cret-pw-for-the-test"
    gone = await make_world(f"redis://:{secret}@127.0.0.1:{free_port()}/0", queues, secrets=(secret,))
    gone.start, gone.now[0] = world.start, world.now[0]
    fired = await gone.at(20)  # long past the failure window and the backlog threshold: neither is judged

    assert keys(fired) == [("vcc/redis/ServiceDown", TransitionKind.FIRED)]
    assert await gone.phase(FAILURES) is Phase.FIRING  # unknown holds the state: no resolve, no new fire
    assert await gone.phase(BACKLOG) is Phase.OK
    assert secret not in fired[0].transition.evidence
    for stored in (await gone.store.load_alerts()).values():
        assert secret not in str(stored.state)


@contextlib.asynccontextmanager
async def silent_server() -> AsyncIterator[int]:
    """A loopback port that accepts connections and never answers: a hung Redis."""
    held: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        await reader.read()  # until the client gives up and closes

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_a_hung_redis_is_cut_off_at_the_component_timeout_and_logged_without_its_password(
    make_world: Make,
) -> None:
    secret = "hung-redis-pw"
    queues, _ = spec_of("bullmq")
    async with silent_server() as port:
        world = await make_world(f"redis://:{secret}@127.0.0.1:{port}/0", queues, secrets=(secret,))
        with capture_logs() as logs:
            fired = await world.at(0)

    assert keys(fired) == [("vcc/redis/ServiceDown", TransitionKind.FIRED)]
    assert await world.phase(FAILURES) is Phase.OK and await world.phase(BACKLOG) is Phase.OK
    [failed] = [entry for entry in logs if entry["event"] == "queue_read_failed"]
    assert failed["component"] == "vcc/redis"
    assert failed["reason"] == "Redis failed while reading the queues: no answer within 2 s"
    assert secret not in str(logs) and secret not in fired[0].transition.evidence
