"""Bolt listeners for /ops, and delivery of replies to Slack within its limits."""

from __future__ import annotations

import asyncio
from typing import Any

import structlog
from slack_bolt.async_app import AsyncAck, AsyncApp, AsyncRespond
from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient

from handlers.blocks import OutMessage, messages_for
from handlers.context import Deps, Reply
from handlers.router import Router, new_request_id

log = structlog.get_logger(__name__)

ACK_HEADSTART = 0.015  # seconds; one Bolt ack poll (10 ms) plus a little

# chat.postMessage errors after which the reply still reaches the user through response_url.
_FALLBACK_ERRORS = frozenset({"not_in_channel", "channel_not_found", "is_archived", "restricted_action"})


async def group_members(client: AsyncWebClient, group_id: str) -> frozenset[str]:
    """Members of a Slack user group (usergroups.users.list)."""
    response = await client.usergroups_users_list(usergroup=group_id)
    users: list[str] = response.get("users", [])
    return frozenset(users)


async def deliver(client: AsyncWebClient, respond: AsyncRespond, channel_id: str, reply: Reply) -> None:
    """Post a reply: ephemeral ones through response_url; public ones to the channel, overflow in
    the thread. If the bot cannot post in the channel, the reply goes back through response_url."""
    messages = messages_for(reply)
    if reply.ephemeral:
        for message in messages:
            await respond(text=message.text, blocks=message.blocks, response_type="ephemeral", replace_original=False)
        return
    try:
        await _post_threaded(client, channel_id, messages)
    except SlackApiError as exc:
        error = str(exc.response.get("error", ""))
        if error not in _FALLBACK_ERRORS:
            raise
        log.info("post_fallback_to_response_url", error=error, channel=channel_id)
        for message in messages:
            await respond(text=message.text, blocks=message.blocks, response_type="in_channel", replace_original=False)


async def _post_threaded(client: AsyncWebClient, channel_id: str, messages: list[OutMessage]) -> None:
    thread_ts: str | None = None
    for message in messages:
        response = await client.chat_postMessage(
            channel=channel_id,
            text=message.text,
            blocks=message.blocks,
            thread_ts=thread_ts if message.in_thread else None,
            unfurl_links=False,
        )
        if thread_ts is None:
            thread_ts = str(response["ts"])


def register(app: AsyncApp, router: Router, deps: Deps) -> None:
    """Attach opsbot's listeners to a Bolt app."""

    @app.command("/ops")
    async def ops_command(
        ack: AsyncAck, command: dict[str, Any], client: AsyncWebClient, respond: AsyncRespond
    ) -> None:
        await ack()  # Slack wants an answer within 3 s; everything slow happens after this.
        request_id = new_request_id()
        channel_id = str(command.get("channel_id", ""))

        async def progress(text: str) -> None:
            await respond(text=text, response_type="ephemeral", replace_original=False)

        async with deps.running.track():  # from the ack on, a shutdown waits for this command
            # Bolt notices the ack on its next 10 ms poll: let the 200 go out before this command's
            # work competes with it (and with the acks of a burst of other commands).
            await asyncio.sleep(ACK_HEADSTART)
            reply = await router.dispatch(
                user_id=str(command.get("user_id", "")),
                channel_id=channel_id,
                text=str(command.get("text", "")),
                deps=deps,
                request_id=request_id,
                progress=progress,
            )
            try:
                await deliver(client, respond, channel_id, reply)
            except Exception:
                log.exception("reply_delivery_failed", request_id=request_id)

    @app.error
    async def on_error(error: Exception, body: dict[str, Any]) -> None:
        # Anything that escapes a listener is logged with its traceback; Slack never sees it.
        log.error("listener_error", exc_info=error, payload_type=str(body.get("type", body.get("command", ""))))
