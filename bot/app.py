"""The Bolt AsyncApp factory."""

from __future__ import annotations

import logging

from slack_bolt.async_app import AsyncApp

from bot.bolt_app import OpsBoltApp, SlackRequestCounter
from bot.container import Container
from handlers.slack import register


def build_bolt_app(container: Container) -> AsyncApp:
    """A Bolt app whose Web API calls go to ``OPSBOT_SLACK_API_URL`` with retries."""
    settings = container.settings
    if container.slack is None:
        raise RuntimeError("SLACK_BOT_TOKEN is not set")
    app = OpsBoltApp(
        acks=container.deps.acks,  # a command's work waits until no ack is pending
        session=container.slack.session,  # replies through response_url reuse its connections
        client=container.slack,
        signing_secret=settings.slack_signing_secret.get_secret_value() if settings.slack_signing_secret else None,
        logger=logging.getLogger("slack_bolt"),
        # Acks go back as soon as a listener calls ack(); the work continues afterwards.
        process_before_response=False,
    )
    app.use(SlackRequestCounter(container.metrics))
    register(app, container.router, container.deps)
    return app
