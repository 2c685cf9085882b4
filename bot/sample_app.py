"""A built-in sample app shaped like runbook 004's service, for the demo and the tests.

It serves ``/healthz``, ``/health`` (JSON with a ``components`` map), ``/ready``, ``/metrics``
(Prometheus text) and ``POST /chat`` (a pretend LLM call). Knobs in :class:`SampleAppState` make
it fail, slow down, hang or sleep like a Render free-tier instance; change them while it runs.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

_HEALTHY = frozenset({"healthy", "ok", "up", "pass"})
_DEGRADED = frozenset({"degraded", "warn", "warning"})
_HEALTH_PATHS = frozenset({"/healthz", "/health", "/ready"})


@dataclass
class SampleAppState:
    """Knobs of a running sample app; every request reads them afresh."""

    status: int | None = None
    """Answer every health endpoint (/healthz, /health, /ready) with this status code."""
    delay: float = 0.0
    """Seconds every request waits before answering."""
    hang: bool = False
    """Never answer (until the app shuts down)."""
    cold_start: float = 0.0
    """Seconds the first request after start (or after :meth:`fall_asleep`) waits while the app wakes."""
    components: dict[str, str] = field(default_factory=lambda: {"db": "healthy", "llm": "healthy"})
    """Status of each component reported by /health, e.g. ``{"db": "healthy", "llm": "degraded"}``."""
    ready: bool = True
    """/ready answers 503 when false."""
    health_body: str | None = None
    """Raw text served by /health instead of JSON (to play a broken app)."""
    health_content_type: str = "application/json"
    """Content type of ``health_body``."""
    token: str | None = None
    """When set, health endpoints answer 401 unless sent ``Authorization: Bearer <token>``."""
    llm_latency: float = 0.05
    """Seconds a POST /chat pretends the LLM took."""
    asleep: bool = True
    """Whether the next request must wake the app first; only matters with ``cold_start``."""

    def fall_asleep(self) -> None:
        """Make the next request pay the cold start again (Render idles out after 15 minutes)."""
        self.asleep = True


@dataclass
class _Runtime:
    """Per-app machinery the knobs don't show: metrics, the wake-up in progress, shutdown."""

    registry: CollectorRegistry
    requests: Counter
    duration: Histogram
    llm_latency: Histogram
    closing: asyncio.Event
    waking: asyncio.Task[None] | None = None


STATE_KEY = web.AppKey("sample_state", SampleAppState)
_RUNTIME_KEY = web.AppKey("sample_runtime", _Runtime)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _new_runtime() -> _Runtime:
    registry = CollectorRegistry()
    return _Runtime(
        registry=registry,
        requests=Counter(
            "http_requests_total",
            "HTTP requests handled",
            ["method", "endpoint", "status"],
            registry=registry,
        ),
        duration=Histogram(
            "http_request_duration_seconds",
            "Time spent answering HTTP requests",
            ["method", "endpoint"],
            registry=registry,
        ),
        llm_latency=Histogram(
            "llm_latency_seconds",
            "Time the LLM took to answer",
            buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120),
            registry=registry,
        ),
        closing=asyncio.Event(),
    )


async def _wake(state: SampleAppState, runtime: _Runtime) -> None:
    """Every request that arrives while the app sleeps waits for the same wake-up."""
    if not state.asleep or state.cold_start <= 0:
        state.asleep = False
        return
    if runtime.waking is None or runtime.waking.done():

        async def wake_up() -> None:
            await asyncio.sleep(state.cold_start)
            state.asleep = False

        runtime.waking = asyncio.create_task(wake_up())
    await asyncio.shield(runtime.waking)


@web.middleware
async def _knobs_and_metrics(request: web.Request, handler: Handler) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    runtime = request.app[_RUNTIME_KEY]
    started = time.perf_counter()
    endpoint = request.match_info.route.resource.canonical if request.match_info.route.resource else "unmatched"
    status = 500
    try:
        await _wake(state, runtime)
        if state.hang:
            await runtime.closing.wait()
            raise web.HTTPServiceUnavailable(text="shutting down")
        if state.delay > 0:
            await asyncio.sleep(state.delay)
        if (
            state.token is not None
            and request.path in _HEALTH_PATHS
            and not hmac.compare_digest(request.headers.get("Authorization", ""), f"Bearer {state.token}")
        ):
            raise web.HTTPUnauthorized(text="missing or wrong bearer token")
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        runtime.requests.labels(request.method, endpoint, str(status)).inc()
        runtime.duration.labels(request.method, endpoint).observe(time.perf_counter() - started)


def _overall(components: dict[str, str]) -> str:
    words = {value.lower() for value in components.values()}
    if words - _HEALTHY - _DEGRADED:
        return "unhealthy"
    return "degraded" if words & _DEGRADED else "healthy"


def _forced(state: SampleAppState, request: web.Request) -> int | None:
    return state.status if state.status is not None and request.path in _HEALTH_PATHS else None


async def _healthz(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    return web.json_response({"status": "ok"}, status=_forced(state, request) or 200)


async def _ready(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    body = {"status": "ready" if state.ready else "not ready"}
    return web.json_response(body, status=_forced(state, request) or (200 if state.ready else 503))


async def _health(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    forced = _forced(state, request)
    if state.health_body is not None:
        return web.Response(text=state.health_body, status=forced or 200, content_type=state.health_content_type)
    overall = _overall(state.components)
    body = {
        "status": overall,
        "components": {name: {"status": value} for name, value in state.components.items()},
    }
    return web.json_response(body, status=forced or (503 if overall == "unhealthy" else 200))


async def _metrics(request: web.Request) -> web.Response:
    runtime = request.app[_RUNTIME_KEY]
    response = web.Response(body=generate_latest(runtime.registry))
    response.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return response


async def _chat(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    runtime = request.app[_RUNTIME_KEY]
    await asyncio.sleep(state.llm_latency)
    runtime.llm_latency.observe(state.llm_latency)
    return web.json_response({"answer": "Here are three pairs of running shoes under $100."})


async def _release_hung_requests(app: web.Application) -> None:
    runtime = app[_RUNTIME_KEY]
    runtime.closing.set()
    if runtime.waking is not None and not runtime.waking.done():
        runtime.waking.cancel()


def create_sample_app(state: SampleAppState) -> web.Application:
    """The sample app, reading its knobs from ``state``."""
    app = web.Application(middlewares=[_knobs_and_metrics])
    app[STATE_KEY] = state
    app[_RUNTIME_KEY] = _new_runtime()
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/health", _health)
    app.router.add_get("/ready", _ready)
    app.router.add_get("/metrics", _metrics)
    app.router.add_post("/chat", _chat)
    app.on_shutdown.append(_release_hung_requests)
    return app


async def start_sample_app(state: SampleAppState, host: str = "127.0.0.1", port: int = 0) -> tuple[web.AppRunner, str]:
    """Serve a sample app on ``host:port`` (0 picks a free port); return its runner and base URL.

    Stop it with ``await runner.cleanup()``; requests left hanging are released then.
    """
    runner = web.AppRunner(create_sample_app(state), access_log=None, shutdown_timeout=2.0, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    addresses = runner.addresses
    if not addresses:
        await runner.cleanup()
        raise RuntimeError(f"sample app did not bind to {host}:{port}")
    bound_port = int(addresses[0][1])
    return runner, f"http://{host}:{bound_port}"
