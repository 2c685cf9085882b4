"""`opsbot serve`: Slack over HTTP (default) or Socket Mode, with /healthz, /ready and /metrics."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
import sys

import structlog
from aiohttp import web
from slack_bolt.adapter.socket_mode.async_handler import AsyncSocketModeHandler

from bot.app import build_bolt_app
from bot.container import Container, build_container
from bot.metrics import Metrics
from bot.scheduler import build_scheduler
from bot.server import Readiness, ReadyCheck, Runtime, build_web_app
from bot.settings import Settings
from handlers.alerts import SlackAlerts
from handlers.approvals import sweeper
from services.alerts.watch import Watcher
from services.probes import PROBED_TYPES
from services.redaction import Redactor

log = structlog.get_logger(__name__)

# How long `serve` waits for a state database that is not up yet (compose, k8s start order).
STORE_WAIT = 60.0
# Longest a shutdown waits for commands at work (probes are bounded by the health deadline).
DRAIN_TIMEOUT = 30.0
# How often expired approvals and runs left behind by a dead process are looked for.
SWEEP_EVERY = 10.0
# How often the scheduler looks for due schedules (fire times are exact; this is the latency).
SCHEDULE_EVERY = 20.0
# Net new container objects between two young-generation collections (CPython's default is 700).
GC_YOUNG_THRESHOLD = 10_000


async def _started(runtime: Runtime) -> str | None:
    return None if runtime.bolt is not None else "inventory and state store not loaded yet"


def _store_answers(container: Container) -> ReadyCheck:
    async def check() -> str | None:
        await container.store.ping()
        return None

    return check


async def serve(
    settings: Settings,
    redactor: Redactor,
    *,
    socket_mode: bool,
    port: int | None = None,
    stop: asyncio.Event | None = None,
) -> int:
    missing = settings.require_slack(socket=socket_mode)
    if missing:
        print(f"opsbot serve needs these environment variables: {', '.join(missing)}", file=sys.stderr)
        return 2
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)

    metrics = Metrics()
    readiness = Readiness()
    runtime = Runtime(metrics, readiness)
    readiness.add("startup", lambda: _started(runtime))
    runner = web.AppRunner(build_web_app(runtime, slack_events=not socket_mode), access_log=None)
    await runner.setup()
    listen_port = port if port is not None else settings.port
    site = web.TCPSite(runner, settings.host, listen_port)
    await site.start()
    log.info("listening", host=settings.host, port=listen_port, mode="socket" if socket_mode else "http")
    bot = asyncio.create_task(_run(settings, redactor, runtime, site, stop, socket_mode))
    stopping = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({bot, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if runtime.bolt is None and not bot.done():
            bot.cancel()  # told to stop while still waiting for the state store: nothing to drain
        with contextlib.suppress(asyncio.CancelledError):
            await bot
    finally:
        stopping.cancel()
        log.info("shutting_down")
        await runner.cleanup()
    return 0


def build_watcher(container: Container) -> Watcher | None:
    """The alert watcher, posting to the ops channel (when there is one and a Slack client)."""
    inventory = container.loaded.inventory
    if not inventory.alerts.enabled:
        return None
    notifier = (
        SlackAlerts(container.slack, inventory.ops_channel)
        if container.slack is not None and inventory.ops_channel
        else None
    )
    watcher = Watcher(
        container.store, inventory, container.deps.probe_for, container.http, container.redactor,
        probed_types=PROBED_TYPES, notifier=notifier,
        claim=lambda key, ttl: container.locks.lease(key, container.deps.approvals.instance, ttl),
        figures=container.deps.figures, history=container.deps.scrape_history,
    )  # fmt: skip
    return watcher if watcher.components else None


async def _run(
    settings: Settings,
    redactor: Redactor,
    runtime: Runtime,
    site: web.TCPSite,
    stop: asyncio.Event,
    socket_mode: bool,
) -> None:
    """Build the container, serve Slack until ``stop``, then let running commands finish."""
    async with build_container(
        settings, redactor=redactor, metrics=runtime.metrics, store_wait=STORE_WAIT
    ) as container:
        runtime.readiness.add("state_store", _store_answers(container))
        bolt = build_bolt_app(container)
        # The first sweep runs before Slack is served: runs a crash left `running` are reported now.
        sweeping = asyncio.create_task(sweeper(container.deps, SWEEP_EVERY, stop), name="approval-sweeper")
        scheduler = build_scheduler(container, holder=container.deps.approvals.instance)
        scheduling = asyncio.create_task(scheduler.loop(stop, SCHEDULE_EVERY), name="scheduler") if scheduler else None
        watcher = build_watcher(container)
        watching = asyncio.create_task(watcher.loop(stop), name="watcher") if watcher else None
        # Everything built so far lives as long as the process: keep the cyclic GC from
        # rescanning it (full collections over the libraries' objects stall acks ~100 ms).
        gc.collect()
        gc.freeze()
        # Requests leave no cyclic garbage (tests/bot/test_reference_cycles.py), so young
        # collections can be rarer: at CPython's 700, the state of commands still at work (a
        # health check waits seconds for its probes) is scanned and promoted again and again, and
        # the full collections that follow pause the event loop 20-70 ms amid a burst of acks.
        gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
        if socket_mode:
            app_token = settings.slack_app_token.get_secret_value() if settings.slack_app_token else ""
            handler = AsyncSocketModeHandler(bolt, app_token, web_client=container.slack)

            async def connected() -> str | None:
                return None if await handler.client.is_connected() else "Socket Mode not connected"

            runtime.readiness.add("socket", connected)
            await handler.connect_async()  # type: ignore[no-untyped-call]
            runtime.bolt = bolt
            try:
                await stop.wait()
            finally:
                await handler.close_async()  # type: ignore[no-untyped-call]
        else:
            runtime.bolt = bolt
            await stop.wait()
        await site.stop()  # no new requests; let the ones at work finish and answer
        try:
            async with asyncio.timeout(DRAIN_TIMEOUT):
                await container.deps.running.idle()
        except TimeoutError:
            log.warning("shutdown_with_commands_running", running=container.deps.running.count)
        sweeping.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sweeping
        if scheduling is not None:
            await scheduling  # returns once stop is set and its runs have drained
        if watching is not None:
            watching.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watching
