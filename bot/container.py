"""The one place that builds every client, inside an AsyncExitStack, into a typed container."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import structlog
from slack_sdk.http_retry.async_handler import AsyncRetryHandler
from slack_sdk.http_retry.builtin_async_handlers import AsyncRateLimitErrorRetryHandler
from slack_sdk.http_retry.builtin_interval_calculators import BackoffRetryIntervalCalculator
from slack_sdk.http_retry.request import HttpRequest
from slack_sdk.http_retry.response import HttpResponse
from slack_sdk.http_retry.state import RetryState
from slack_sdk.web.async_client import AsyncWebClient

from bot.metrics import Metrics
from bot.settings import Settings
from bot.state import open_store
from handlers.backup import RestoreBackup
from handlers.cleanup import RunCleanup, RunReindex
from handlers.commands import load_registry, policy_problems
from handlers.config import register_config_actions
from handlers.context import Deps
from handlers.deploy import register_actions
from handlers.health import service_health
from handlers.integrity import register_integrity_actions
from handlers.jobs import ResetStuckJobs
from handlers.migrate import register_migrate_actions
from handlers.queue import register_queue_actions
from handlers.registry import Registry
from handlers.reset import register_reset_actions
from handlers.router import Router
from handlers.slack import RETRY_PAUSE, SlackNotifier, group_members, nothing_done, posts
from handlers.users import register_users_actions
from services.access import RoleResolver
from services.approvals import ApprovalEngine
from services.backup.runner import BackupRunner
from services.clients import close_each
from services.deploy.providers import DeployProviders
from services.errors import InventoryError
from services.inventory import LoadedInventory, load_inventory
from services.locks import ServiceLocks, open_locks
from services.logs.registry import LogDeps, build_log_backends
from services.plan_lists import PlanLists
from services.probes import build_health_probes
from services.redaction import Redactor
from services.state import StateStore
from services.status import FigureDeps, build_figure_sources, close_sources

log = structlog.get_logger(__name__)

SLACK_TIMEOUT = 10  # seconds, per Web API call
# Retries of a Web API call that failed doing nothing (a 5xx, connection refused), after about
# RETRY_PAUSE, then twice that, each plus up to 1 s of jitter: at most ~2.8 s of waiting, well within a
# reply's time (response_url, the fallback, stays valid for 30 minutes).
SLACK_RETRIES = 2


@dataclass
class Container:
    settings: Settings
    loaded: LoadedInventory
    store: StateStore
    http: aiohttp.ClientSession
    redactor: Redactor
    metrics: Metrics
    slack: AsyncWebClient | None
    locks: ServiceLocks
    deps: Deps
    router: Router


class NothingDoneRetryHandler(AsyncRetryHandler):
    """Retries a Web API call whose failure proves Slack did nothing: HTTP 500/502/503, an ``ok: false``
    saying so, a connection never made. A dropped connection may come after Slack did it: only a call
    that posts nothing (an edit, a lookup) is retried then. A timeout never is here (a post may have
    landed): handlers/slack.py decides what to do about it."""

    async def _can_retry_async(
        self,
        *,
        state: RetryState,
        request: HttpRequest,
        response: HttpResponse | None = None,
        error: Exception | None = None,
    ) -> bool:
        if error is not None:
            if isinstance(error, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError):
                return True  # Slack never saw the request
            dropped = isinstance(error, aiohttp.ServerDisconnectedError | aiohttp.ClientOSError)
            return dropped and not posts(request.url)
        return response is not None and nothing_done(response.status_code, response.body)


def slack_client(settings: Settings, session: aiohttp.ClientSession) -> AsyncWebClient | None:
    """The Web API client, retrying on 429 and on failures that prove Slack did nothing (5xx, an
    ``ok: false`` that says so, connection refused); None without a bot token. A timeout is not retried
    here: a post may have landed (handlers/slack.py sends the reply through response_url instead).

    It reuses one aiohttp session (kept-alive connections) whose timeout bounds every call;
    without one, slack_sdk would open a new session for each call."""
    if settings.slack_bot_token is None:
        return None
    return AsyncWebClient(
        token=settings.slack_bot_token.get_secret_value(),
        base_url=settings.slack_api_url,
        session=session,
        timeout=SLACK_TIMEOUT,
        retry_handlers=[
            AsyncRateLimitErrorRetryHandler(max_retry_count=3),
            NothingDoneRetryHandler(
                max_retry_count=SLACK_RETRIES, interval_calculator=BackoffRetryIntervalCalculator(RETRY_PAUSE)
            ),
        ],
    )


def _check_approval_commands(registry: Registry, engine: ApprovalEngine, loaded: LoadedInventory) -> None:
    """Every approval-gated command has the code that runs it; the policy names only real commands."""
    missing = {c.verb for c in registry if c.risk.needs_approval} - set(engine.actions)
    if missing:
        raise RuntimeError(f"commands needing approval have no action registered: {sorted(missing)}")
    if problems := policy_problems(loaded.inventory):
        raise InventoryError(loaded.source, problems)


@contextlib.asynccontextmanager
async def build_container(
    settings: Settings,
    *,
    redactor: Redactor | None = None,
    inventory: LoadedInventory | None = None,
    metrics: Metrics | None = None,
    store_wait: float = 0.0,
) -> AsyncIterator[Container]:
    """Load the inventory, open the state store and HTTP session; close them all on exit."""
    redactor = redactor or Redactor()
    redactor.add(settings.secret_values())
    loaded = inventory or load_inventory(settings.config)
    redactor.add(loaded.secrets)
    metrics = metrics or Metrics()
    async with contextlib.AsyncExitStack() as stack:
        store = await open_store(settings, redactor, wait=store_wait)
        stack.push_async_callback(store.close)
        if (spool := getattr(store, "spool", None)) is not None:
            metrics.watch_audit_spool(spool)
        http = await stack.enter_async_context(
            aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=60, connect=10),
                connector=aiohttp.TCPConnector(limit=200, limit_per_host=20),
            )
        )
        slack_session = await stack.enter_async_context(
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=SLACK_TIMEOUT, connect=5))
        )
        slack = slack_client(settings, slack_session)
        roles = RoleResolver(
            loaded.inventory.roles,
            (lambda group: group_members(slack, group)) if slack is not None else None,
        )
        locks = await open_locks(settings.redis_url.get_secret_value() if settings.redis_url else None)
        # Closed after the store's and sessions' callbacks are queued, so it runs first: runs have
        # drained by then, and a clean exit hands its Redis locks back at once.
        stack.push_async_callback(locks.close)
        engine = ApprovalEngine(
            store,
            locks,
            roles,
            loaded.inventory.approvals,
            redactor,
            timezone=loaded.inventory.timezone,
            observe=metrics.observe_approval,
        )
        # Relative backup directories are relative to the inventory file (or, for an inventory
        # given in memory, to the state directory).
        base_dir = Path(settings.config).parent if inventory is None else Path(settings.state_dir)
        backups = BackupRunner(store, loaded.inventory, locks, redactor, base_dir=base_dir, http=http)
        stack.push_async_callback(backups.close)
        deploys = DeployProviders(http)
        stack.push_async_callback(deploys.close)
        engine.register("jobs reset-stuck", ResetStuckJobs(loaded.inventory, redactor))
        cleanup_lists = PlanLists(Path(settings.state_dir) / "plan-lists")  # the queue verbs' directory too
        engine.register("cleanup", RunCleanup(loaded.inventory, redactor, cleanup_lists))
        engine.register("reindex", RunReindex(loaded.inventory, redactor))
        register_queue_actions(engine, loaded.inventory, redactor, PlanLists(Path(settings.state_dir) / "plan-lists"))
        register_integrity_actions(engine, loaded.inventory, redactor, cleanup_lists)
        migrations = register_migrate_actions(engine, loaded.inventory, deploys)
        stack.push_async_callback(migrations.close)
        user_runs = register_users_actions(engine, loaded.inventory, redactor, deploys, slack)
        stack.push_async_callback(user_runs.close)
        register_reset_actions(engine, loaded.inventory, redactor, cleanup_lists, backups)
        deps = Deps(
            loaded=loaded,
            store=store,
            probes=build_health_probes(http, types={spec.type for _, _, spec in loaded.inventory.components()}),
            redactor=redactor,
            roles=roles,
            approvals=engine,
            backups=backups,
            deploys=deploys,
            observe_probe=metrics.observe_probe,
            observe_command=metrics.observe_command,
        )
        deps.figures = build_figure_sources(
            FigureDeps(session=http, history=deps.scrape_history, monitoring_endpoint=settings.monitoring_endpoint),
            types={spec.type for _, _, spec in loaded.inventory.components()},
        )
        stack.push_async_callback(close_sources, deps.figures)
        deps.logs = build_log_backends(
            LogDeps(session=http), types={spec.type for _, _, spec in loaded.inventory.components()}
        )
        stack.push_async_callback(close_each, deps.logs.values(), what="log_backend")
        engine.register("restore", RestoreBackup(backups, lambda service: service_health(deps, service)))
        register_actions(engine, loaded.inventory, deploys, lambda service: service_health(deps, service), redactor)
        register_config_actions(engine, loaded.inventory, deploys, lambda service: service_health(deps, service))
        registry = load_registry()
        _check_approval_commands(registry, engine, loaded)
        if slack is not None:
            notifier = deps.notifier = SlackNotifier(slack, engine, loaded.inventory.ops_channel)
            stack.push_async_callback(notifier.close)  # before the Slack session closes
        router = Router(registry)
        log.info(
            "container_ready",
            inventory=loaded.source,
            services=len(loaded.inventory.services),
            state=store.kind,
            locks=locks.kind,
        )
        yield Container(settings, loaded, store, http, redactor, metrics, slack, locks, deps, router)
