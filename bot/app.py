"""The Bolt AsyncApp factory."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from slack_bolt.async_app import AsyncApp

from bot.container import Container
from handlers.slack import register


def build_bolt_app(container: Container) -> AsyncApp:
    """A Bolt app whose Web API calls go to ``OPSBOT_SLACK_API_URL`` with retries."""
    settings = container.settings
    if container.slack is None:
        raise RuntimeError("SLACK_BOT_TOKEN is not set")
    app = AsyncApp(
        client=container.slack,
        signing_secret=settings.slack_signing_secret.get_secret_value() if settings.slack_signing_secret else None,
        logger=logging.getLogger("slack_bolt"),
        # Acks go back as soon as a listener calls ack(); the work continues afterwards.
        process_before_response=False,
    )
    metrics = container.metrics

    @app.middleware
    async def count_requests(body: dict[str, Any], next: Callable[[], Awaitable[None]]) -> None:
        # Runs after Bolt has verified the signature: counts what Slack really sent.
        metrics.count_slack_request("command" if "command" in body else str(body.get("type", "other")))
        await next()

    register(app, container.router, container.deps)
    return app
