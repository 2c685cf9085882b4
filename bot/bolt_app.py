"""opsbot's Bolt app: acks before work, and replies over kept-alive connections.

Acks first: every request is counted in ``PendingAcks`` until its answer is ready, and a command's
work waits until no ack is pending (handlers/slack.py), so that the acks of a burst of commands do
not queue behind the work of the first ones. The bare Bolt app of bench/ack_latency.py is the floor.

Pooled ``respond()``: Bolt's ``AsyncRespond`` builds a new ``AsyncWebhookClient`` without a session
for every call, and slack_sdk then opens (and closes) a new aiohttp session and TCP (in production,
TLS) connection per reply. Besides the handshake, each closed connection leaves a reference cycle
behind on Python 3.11 (``_SelectorSocketTransport._read_ready_cb`` is a bound method of the
transport itself: CPython gh-100348, fixed in 3.12), so every ephemeral reply left garbage that only
the cyclic collector could free.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import aiohttp
from slack_bolt.async_app import AsyncApp, AsyncBoltRequest
from slack_bolt.context.respond.async_respond import AsyncRespond
from slack_bolt.context.respond.internals import _build_message
from slack_bolt.middleware.async_middleware import AsyncMiddleware
from slack_bolt.response import BoltResponse
from slack_sdk.models.attachments import Attachment
from slack_sdk.models.blocks import Block
from slack_sdk.webhook import WebhookResponse
from slack_sdk.webhook.async_client import AsyncWebhookClient

from bot.metrics import Metrics
from handlers.context import PendingAcks


class PooledRespond(AsyncRespond):
    """Bolt's ``respond()`` with one difference: it posts through a long-lived aiohttp session.
    The body is built by Bolt's own ``_build_message``, so it is exactly what Bolt would send."""

    def __init__(self, *, response_url: str | None, session: aiohttp.ClientSession, **kwargs: Any) -> None:
        super().__init__(response_url=response_url, **kwargs)
        self.session = session

    async def __call__(
        self,
        text: str | dict[str, Any] = "",
        blocks: Sequence[dict[str, Any] | Block] | None = None,
        attachments: Sequence[dict[str, Any] | Attachment] | None = None,
        response_type: str | None = None,
        replace_original: bool | None = None,
        delete_original: bool | None = None,
        unfurl_links: bool | None = None,
        unfurl_media: bool | None = None,
        thread_ts: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> WebhookResponse:
        if self.response_url is None:
            raise ValueError("respond is unsupported here as there is no response_url")
        client = AsyncWebhookClient(url=self.response_url, session=self.session, proxy=self.proxy, ssl=self.ssl)
        if isinstance(text, dict):
            return await client.send_dict(_build_message(**text))
        message = _build_message(
            text=text, blocks=blocks, attachments=attachments, response_type=response_type,
            replace_original=replace_original, delete_original=delete_original, unfurl_links=unfurl_links,
            unfurl_media=unfurl_media, thread_ts=thread_ts, metadata=metadata,
        )  # fmt: skip
        return await client.send_dict(message)


class OpsBoltApp(AsyncApp):
    """Bolt's AsyncApp with two changes on the ack path, made where each request is dispatched (a
    global middleware cannot count a request: Bolt's ``next()`` does not wrap the rest of the chain).

    - Acks first: each request is counted in ``acks`` until its answer is ready; a command's work
      waits until none is pending (handlers/slack.py).
    - Pooled ``respond``: listeners and the error handler get a :class:`PooledRespond` posting
      through ``session``.
    """

    def __init__(self, *, acks: PendingAcks, session: aiohttp.ClientSession | None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.acks = acks
        self.session = session

    async def async_dispatch(self, req: AsyncBoltRequest) -> BoltResponse:
        context = req.context
        if self.session is not None and context.response_url is not None:
            context["respond"] = PooledRespond(
                response_url=context.response_url, session=self.session, proxy=self.client.proxy, ssl=self.client.ssl
            )
        # With process_before_response=False, dispatch returns once Bolt has seen the listener's ack.
        with self.acks.answering():
            return await super().async_dispatch(req)


class SlackRequestCounter(AsyncMiddleware):
    """Counts each request that passed Bolt's own middleware (its signature verified): what Slack
    really sent, by kind. A class, not a function: for a function Bolt builds every listener
    argument it knows of (say, respond, the body's parts...) on every request, before the ack."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    async def async_process(
        self, *, req: AsyncBoltRequest, resp: BoltResponse, next: Callable[[], Awaitable[BoltResponse]]
    ) -> BoltResponse | None:
        body = req.body
        self.metrics.count_slack_request("command" if "command" in body else str(body.get("type", "other")))
        return await next()
