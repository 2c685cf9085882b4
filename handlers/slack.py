"""Bolt listeners for /ops, and delivery of replies to Slack within its limits."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import structlog
from slack_bolt.async_app import AsyncAck, AsyncApp, AsyncBoltRequest, AsyncRespond
from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient

from handlers import blocks as bk
from handlers.approvals import ACTION_IDS, approval_blocks, approval_text, decide
from handlers.blocks import OutMessage, messages_for
from handlers.context import Block, Deps, Reply
from handlers.registry import CLICK_COMMANDS
from handlers.router import Router, new_request_id
from services.approvals import ApprovalEngine
from services.errors import CommandError
from services.state import Approval, ApprovalState

log = structlog.get_logger(__name__)

ACK_HEADSTART = 0.015  # seconds; one Bolt ack poll (10 ms) plus a little

# chat.postMessage errors after which the reply still reaches the user through response_url.
_FALLBACK_ERRORS = frozenset({"not_in_channel", "channel_not_found", "is_archived", "restricted_action"})


async def group_members(client: AsyncWebClient, group_id: str) -> frozenset[str]:
    """Members of a Slack user group (usergroups.users.list)."""
    response = await client.usergroups_users_list(usergroup=group_id)
    users: list[str] = response.get("users", [])
    return frozenset(users)


class LiveMessage:
    """The one public message a long command keeps current (a backup's progress): posted on the first
    update, edited on the next ones, and replaced by the command's reply at the end."""

    def __init__(self, client: AsyncWebClient, channel_id: str) -> None:
        self.client = client
        self.channel_id = channel_id
        self.ts: str | None = None
        self.unavailable = False

    async def __call__(self, text: str, blocks: list[Block]) -> None:
        if self.unavailable:
            return
        if self.ts is not None:
            await self.client.chat_update(channel=self.channel_id, ts=self.ts, text=text, blocks=blocks)
            return
        try:
            response = await self.client.chat_postMessage(
                channel=self.channel_id, text=text, blocks=blocks, unfurl_links=False
            )
        except SlackApiError as exc:
            if str(exc.response.get("error", "")) not in _FALLBACK_ERRORS:
                raise
            self.unavailable = True  # the final reply still arrives through response_url
            return
        self.ts = str(response["ts"])


async def deliver(
    client: AsyncWebClient, respond: AsyncRespond, channel_id: str, reply: Reply, live: LiveMessage | None = None
) -> str | None:
    """Post a reply: ephemeral ones through response_url; public ones to the channel, overflow in
    the thread (or as the final edit of the request's live message). If the bot cannot post in the
    channel, the reply goes back through response_url. Returns the ts of the channel message."""
    messages = messages_for(reply)
    if reply.ephemeral:
        for message in messages:
            await respond(text=message.text, blocks=message.blocks, response_type="ephemeral", replace_original=False)
        return None
    if live is not None and live.ts is not None:
        first, *rest = messages
        await client.chat_update(channel=channel_id, ts=live.ts, text=first.text, blocks=first.blocks)
        for message in rest:
            await client.chat_postMessage(
                channel=channel_id, text=message.text, blocks=message.blocks, thread_ts=live.ts, unfurl_links=False
            )
        await _upload(client, channel_id, live.ts, reply)
        return live.ts
    try:
        ts = await _post_threaded(client, channel_id, messages)
        await _upload(client, channel_id, ts, reply)
        return ts
    except SlackApiError as exc:
        error = str(exc.response.get("error", ""))
        if error not in _FALLBACK_ERRORS:
            raise
        log.info("post_fallback_to_response_url", error=error, channel=channel_id)
        for message in messages:
            await respond(text=message.text, blocks=message.blocks, response_type="in_channel", replace_original=False)
        return None


async def post_reply(client: AsyncWebClient, channel_id: str, reply: Reply) -> str | None:
    """Post a reply in a channel nobody typed in (a schedule's, an alert's); the ts of its message."""
    ts = await _post_threaded(client, channel_id, messages_for(reply))
    await _upload(client, channel_id, ts, reply)
    return ts


async def _upload(client: AsyncWebClient, channel_id: str, thread_ts: str | None, reply: Reply) -> None:
    """A reply's files, in its thread (files.uploadV2); a failed upload never loses the message."""
    for upload in reply.files:
        try:
            await client.files_upload_v2(
                channel=channel_id, thread_ts=thread_ts, filename=upload.filename, title=upload.title,
                content=upload.content,
            )  # fmt: skip
        except Exception:
            log.warning("file_upload_failed", filename=upload.filename, exc_info=True)


async def _post_threaded(client: AsyncWebClient, channel_id: str, messages: list[OutMessage]) -> str | None:
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
    return thread_ts


class SlackNotifier:
    """Keeps each approval's Slack message current: edits it, threads results, tells the channel."""

    def __init__(self, client: AsyncWebClient, engine: ApprovalEngine, ops_channel: str | None) -> None:
        self.client = client
        self.engine = engine
        self.ops_channel = ops_channel

    async def show(self, approval: Approval, note: str | None = None) -> None:
        if approval.message_channel is None or approval.message_ts is None:
            return
        try:
            await self.client.chat_update(
                channel=approval.message_channel,
                ts=approval.message_ts,
                text=approval_text(approval),
                blocks=approval_blocks(self.engine, approval, note),
            )
        except Exception:
            log.warning("approval_message_edit_failed", approval=approval.id, exc_info=True)

    async def finished(self, approval: Approval) -> None:
        if approval.message_channel is None or approval.message_ts is None or not approval.result:
            return
        loud = approval.state in (ApprovalState.FAILED, ApprovalState.INTERRUPTED)
        lines = [bk.escape(line) for line in approval.result.splitlines()]
        head = f"{':red_circle: ' if loud else ''}{lines[0]}"
        try:
            await self.client.chat_postMessage(
                channel=approval.message_channel,
                thread_ts=approval.message_ts,
                text=bk.clip(approval.result, bk.MAX_FALLBACK_TEXT),
                blocks=bk.sections([head, *lines[1:]])[: bk.MAX_BLOCKS],
                reply_broadcast=loud,
                unfurl_links=False,
            )
        except Exception:
            log.warning("approval_result_post_failed", approval=approval.id, exc_info=True)

    async def announce(self, channel: str | None, text: str) -> None:
        target = self.ops_channel or channel
        if not target or not re.fullmatch(r"[CG][A-Z0-9]{2,}", target):
            return
        try:
            await self.client.chat_postMessage(channel=target, text=text, blocks=[bk.section(text)])
        except Exception:
            log.warning("announce_failed", channel=target, exc_info=True)


def register(app: AsyncApp, router: Router, deps: Deps) -> None:
    """Attach opsbot's listeners to a Bolt app."""

    @app.command("/ops")
    async def ops_command(
        ack: AsyncAck, command: dict[str, Any], client: AsyncWebClient, respond: AsyncRespond
    ) -> None:
        await ack()  # Slack wants an answer within 3 s; everything slow happens after this.
        user = str(command.get("user_id", ""))
        channel_id = str(command.get("channel_id", ""))
        await serve_command(deps, router, client, respond, user, channel_id, str(command.get("text", "")))

    @app.action(re.compile("^(" + "|".join(CLICK_COMMANDS) + ")$"))
    async def command_click(
        ack: AsyncAck, body: dict[str, Any], action: dict[str, Any], client: AsyncWebClient, respond: AsyncRespond
    ) -> None:
        """A click that asks for a command (a release picked from a menu, a roll-forward): it runs as if
        the clicker had typed it, with the same role checks, plan and approval."""
        await ack()
        user = str((body.get("user") or {}).get("id", ""))
        where = body.get("channel") or {}
        channel_id = str(where.get("id") or (body.get("container") or {}).get("channel_id", ""))
        try:
            text = await CLICK_COMMANDS[str(action.get("action_id", ""))](deps, action)
        except CommandError as exc:
            await respond(text=deps.redactor.redact(exc.message), response_type="ephemeral", replace_original=False)
            return
        except Exception:
            log.exception("command_click_failed", action=str(action.get("action_id", "")))
            answer = "Sorry — that click failed; the details are in the bot's log."
            await respond(text=answer, response_type="ephemeral", replace_original=False)
            return
        await serve_command(deps, router, client, respond, user, channel_id, text)

    @app.action(re.compile("^(" + "|".join(ACTION_IDS) + ")$"))
    async def approval_click(
        ack: AsyncAck, body: dict[str, Any], action: dict[str, Any], respond: AsyncRespond, req: AsyncBoltRequest
    ) -> None:
        await ack()
        request_id = new_request_id()
        retry = ",".join(req.headers.get("x-slack-retry-num") or ()) or None
        async with deps.running.track():
            await asyncio.sleep(ACK_HEADSTART)
            await on_click(deps, body, action, respond, request_id, retry)

    @app.error
    async def on_error(error: Exception, body: dict[str, Any]) -> None:
        # Anything that escapes a listener is logged with its traceback; Slack never sees it.
        log.error("listener_error", exc_info=error, payload_type=str(body.get("type", body.get("command", ""))))


async def serve_command(
    deps: Deps,
    router: Router,
    client: AsyncWebClient,
    respond: AsyncRespond,
    user: str,
    channel_id: str,
    text: str,
) -> None:
    """Run one /ops command for a Slack user and deliver its reply (a live message while it works)."""
    request_id = new_request_id()

    async def progress(note: str) -> None:
        await respond(text=note, response_type="ephemeral", replace_original=False)

    live = LiveMessage(client, channel_id)
    async with deps.running.track():  # from the ack on, a shutdown waits for this command
        # Bolt notices the ack on its next 10 ms poll: let the 200 go out before this command's
        # work competes with it (and with the acks of a burst of other commands).
        await asyncio.sleep(ACK_HEADSTART)
        reply = await router.dispatch(
            user_id=user, channel_id=channel_id, text=text, deps=deps, request_id=request_id,
            progress=progress, live=live,
        )  # fmt: skip
        try:
            ts = await deliver(client, respond, channel_id, reply, live)
            if ts is not None and reply.approval_id is not None:
                await deps.store.attach_approval_message(reply.approval_id, channel_id, ts)
        except Exception:
            log.exception("reply_delivery_failed", request_id=request_id)


async def on_click(
    deps: Deps,
    body: dict[str, Any],
    action: dict[str, Any],
    respond: AsyncRespond,
    request_id: str,
    retry: str | None = None,
) -> None:
    """An Approve / Deny / Cancel click: the engine decides; the clicker alone hears why not."""
    verb = str(action.get("action_id", "")).removeprefix("approval_")
    approval_id = str(action.get("value", ""))[:64]
    user = str((body.get("user") or {}).get("id", ""))
    with structlog.contextvars.bound_contextvars(request_id=request_id, user=user, verb=f"click {verb}"):
        if retry:
            log.info("slack_retry_of_click", retry=retry, approval=approval_id)
        try:
            await _remember_message(deps, approval_id, body)
            decision, _ = await decide(deps, verb, approval_id, user, request_id)
            answer = decision.message
        except CommandError as exc:
            answer = deps.redactor.redact(exc.message)
        except Exception:
            log.exception("approval_click_failed", approval=approval_id)
            answer = f"Sorry — that click failed (ref {request_id}). The details are in the bot's log."
        try:
            await respond(text=answer, response_type="ephemeral", replace_original=False)
        except Exception:
            log.warning("click_answer_failed", exc_info=True)


async def _remember_message(deps: Deps, approval_id: str, body: dict[str, Any]) -> None:
    """The click names the message it came from: keep it if the post's answer was lost."""
    container = body.get("container") or {}
    channel, ts = container.get("channel_id"), container.get("message_ts")
    if not channel or not ts:
        return
    try:
        approval = await deps.approvals.get(approval_id)
    except CommandError:
        return
    if approval.message_ts is None:
        await deps.store.attach_approval_message(approval.id, str(channel), str(ts))
