"""Bolt listeners for /ops, and delivery of replies to Slack within its limits."""

from __future__ import annotations

import asyncio
import itertools
import re
import time
from collections.abc import Callable
from typing import Any

import structlog
from slack_bolt.async_app import AsyncAck, AsyncApp, AsyncBoltContext, AsyncBoltRequest, AsyncRespond
from slack_bolt.response import BoltResponse
from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient

from handlers import blocks as bk
from handlers.approvals import ACTION_IDS, approval_blocks, approval_text, decide
from handlers.blocks import OutMessage, messages_for
from handlers.context import Block, Deps, Reply
from handlers.registry import CLICK_COMMANDS
from handlers.router import Router, new_request_id
from services.approvals import ApprovalEngine
from services.audit import record_event
from services.errors import CommandError
from services.state import Approval, ApprovalState

log = structlog.get_logger(__name__)

ACK_HEADSTART = 0.015  # seconds; one Bolt ack poll (10 ms) plus a little

# chat.postMessage errors after which the reply still reaches the user through response_url.
_FALLBACK_ERRORS = frozenset({"not_in_channel", "channel_not_found", "is_archived", "restricted_action"})

# Web API answers that prove Slack did nothing, so a retry cannot post twice: HTTP 500/502/503 and, in
# Slack's words, "the service is temporarily unavailable", "the POST data was missing or truncated",
# "Web API operations will be intermittently unavailable" (a workspace migrating to an org).
NOTHING_DONE_STATUSES = frozenset({500, 502, 503})
NOTHING_DONE_ERRORS = frozenset({"service_unavailable", "request_timeout", "team_added_to_org"})
# Slack's docs on these: "It's possible some aspect of the operation succeeded before the error was
# raised". Like a timeout or a 504, they may follow a message that was posted: a post is not repeated
# after them (its reply goes through response_url instead); an edit, which is safe to repeat, is.
_MAYBE_DONE_ERRORS = frozenset({"internal_error", "fatal_error"})
# Methods that would post again if repeated; edits and lookups are safe to repeat.
POSTING_METHODS = frozenset(
    {"chat.postMessage", "chat.postEphemeral", "chat.meMessage", "chat.scheduleMessage", "files.upload",
     "files.completeUploadExternal"}
)  # fmt: skip
RETRY_PAUSE = 0.25  # seconds before the first retry of a failed Slack call; doubled for each next one
EDIT_RETRY_SECONDS = 4.0  # an edit is retried in line for this long (its caller waits meanwhile)
# Then an approval message's final state (Done, Failed, Denied…) is tried again after these pauses,
# in the background: a message left saying "Running" misleads everyone who reads it.
FINAL_EDIT_RETRIES = (5.0, 15.0, 45.0, 120.0)

UNKNOWN_FORM = "opsbot has no form like this (it may be from another version of the bot), so nothing was done."


async def group_members(client: AsyncWebClient, group_id: str) -> frozenset[str]:
    """Members of a Slack user group (usergroups.users.list)."""
    response = await client.usergroups_users_list(usergroup=group_id)
    users: list[str] = response.get("users", [])
    return frozenset(users)


def slack_trouble(exc: BaseException) -> str | None:
    """Why a Web API call failed, when Slack (or the way to it) was in trouble rather than the request
    wrong: the call may be tried again (if repeating it is safe) or its message sent another way."""
    if isinstance(exc, SlackApiError):
        status = int(getattr(exc.response, "status_code", 200) or 200)
        error = str(exc.response.get("error") or "")
        if status >= 500 or status == 429:
            return f"HTTP {status}"
        return error if error in NOTHING_DONE_ERRORS | _MAYBE_DONE_ERRORS else None
    if isinstance(exc, TimeoutError):  # the HTTP client's read and connect timeouts are TimeoutErrors too
        return "timeout"
    # A connection refused, reset or dropped: an OSError, or one of the HTTP client's own errors (aiohttp's
    # ClientError family, known by its module here: handlers import no driver).
    if isinstance(exc, OSError) or any(cls.__module__.split(".")[0] == "aiohttp" for cls in type(exc).__mro__):
        return f"connection ({type(exc).__name__})"
    return None


def nothing_done(status: int, body: object) -> bool:
    """Whether a Web API answer proves Slack did nothing with the call (so repeating it is safe)."""
    if status in NOTHING_DONE_STATUSES:
        return True
    return isinstance(body, dict) and body.get("ok") is False and body.get("error") in NOTHING_DONE_ERRORS


def posts(url: str) -> bool:
    """Whether the Web API call to ``url`` posts a message (repeating it could post twice)."""
    return url.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1] in POSTING_METHODS


async def edit_message(
    client: AsyncWebClient,
    *,
    channel: str,
    ts: str,
    text: str,
    blocks: list[Block],
    within: float | None = None,
    wanted: Callable[[], bool] = lambda: True,
) -> bool:
    """chat.update, tried again with backoff while Slack is in trouble (repeating an edit is safe, even
    after a timeout) for up to ``within`` seconds (EDIT_RETRY_SECONDS), as long as ``wanted()`` (no
    newer edit replaced it). Returns False if a newer edit did; raises the last error if Slack never
    took it."""
    deadline = time.monotonic() + (EDIT_RETRY_SECONDS if within is None else within)
    pause = RETRY_PAUSE
    while True:
        try:
            await client.chat_update(channel=channel, ts=ts, text=text, blocks=blocks)
            return True
        except Exception as exc:
            reason = slack_trouble(exc)
            if reason is None or time.monotonic() + pause > deadline:
                raise
            log.warning("slack_edit_retry", channel=channel, ts=ts, reason=reason, retry_in=pause)
        await asyncio.sleep(pause)
        pause *= 2
        if not wanted():
            return False


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
        try:
            if self.ts is not None:
                await edit_message(self.client, channel=self.channel_id, ts=self.ts, text=text, blocks=blocks)
                return
            response = await self.client.chat_postMessage(
                channel=self.channel_id, text=text, blocks=blocks, unfurl_links=False
            )
        except Exception as exc:
            reason = _fallback_reason(exc)
            if reason is None:
                raise
            # Progress is worth no lost reply: the final one is delivered on its own (deliver()).
            log.warning("live_message_failed", channel=self.channel_id, reason=reason, edit=self.ts is not None)
            if self.ts is None:
                self.unavailable = True
            return
        self.ts = str(response["ts"])


async def deliver(
    client: AsyncWebClient, respond: AsyncRespond, channel_id: str, reply: Reply, live: LiveMessage | None = None
) -> str | None:
    """Post a reply: ephemeral ones through response_url; public ones to the channel, overflow in
    the thread (or as the final edit of the request's live message). Returns the ts of the channel
    message. If the bot cannot post in the channel, or Slack's Web API fails after the client's
    retries (or times out, when posting again could post twice), what was not posted goes back
    through response_url; an approval's plan then says how to approve it without its message."""
    messages = messages_for(reply)
    if reply.ephemeral:
        for message in messages:
            await respond(text=message.text, blocks=message.blocks, response_type="ephemeral", replace_original=False)
        return None
    posted: list[str] = []  # the ts of each message Slack took, in order
    try:
        if live is not None and live.ts is not None:
            first, *rest = messages
            await edit_message(client, channel=channel_id, ts=live.ts, text=first.text, blocks=first.blocks)
            posted.append(live.ts)
            await _post_threaded(client, channel_id, rest, posted, thread_ts=live.ts)
        else:
            await _post_threaded(client, channel_id, messages, posted)
    except Exception as exc:
        reason = _fallback_reason(exc)
        if reason is None:
            raise
        log.warning(
            "post_fallback_to_response_url", reason=reason, channel=channel_id, posted=len(posted), of=len(messages)
        )
        unsent = messages[len(posted) :]
        if reply.approval_id is not None and not posted:
            unsent[0] = _with_approve_hint(unsent[0], reply.approval_id)
        for message in unsent:
            await _respond_in_channel(respond, message)
    ts = posted[0] if posted else None
    if ts is not None:
        await _upload(client, channel_id, ts, reply)
    return ts


def _fallback_reason(exc: BaseException) -> str | None:
    """Why a post failed, if its message should go through response_url instead; else None."""
    if isinstance(exc, SlackApiError) and (error := str(exc.response.get("error") or "")) in _FALLBACK_ERRORS:
        return error
    return slack_trouble(exc)


def _with_approve_hint(message: OutMessage, approval_id: str) -> OutMessage:
    """An approval's plan sent through response_url: its message's ts is unknown until someone clicks
    one of its buttons, so it also says how to approve without them."""
    hint = bk.context(
        f"The bot could not post this in the channel, so it came back as the command's reply: its buttons "
        f"work, and an approver can also run `/ops approve {approval_id}`."
    )
    if len(message.blocks) >= bk.MAX_BLOCKS:
        return message
    return OutMessage(message.text, [*message.blocks, hint], message.in_thread)


async def _respond_in_channel(respond: AsyncRespond, message: OutMessage) -> None:
    answer = await respond(text=message.text, blocks=message.blocks, response_type="in_channel", replace_original=False)
    if answer.status_code != 200:  # the webhook client answers instead of raising
        log.error("response_url_post_failed", status=answer.status_code, body=str(answer.body)[:200])


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


async def _post_threaded(
    client: AsyncWebClient,
    channel_id: str,
    messages: list[OutMessage],
    posted: list[str] | None = None,
    thread_ts: str | None = None,
) -> str | None:
    """Post ``messages`` in order, ``in_thread`` ones under the first (or under ``thread_ts``); the ts
    of each one Slack took is appended to ``posted``. Returns the thread's ts."""
    for message in messages:
        response = await client.chat_postMessage(
            channel=channel_id,
            text=message.text,
            blocks=message.blocks,
            thread_ts=thread_ts if message.in_thread else None,
            unfurl_links=False,
        )
        ts = str(response["ts"])
        if posted is not None:
            posted.append(ts)
        if thread_ts is None:
            thread_ts = ts
    return thread_ts


class SlackNotifier:
    """Keeps each approval's Slack message current: edits it, threads results, tells the channel."""

    def __init__(self, client: AsyncWebClient, engine: ApprovalEngine, ops_channel: str | None) -> None:
        self.client = client
        self.engine = engine
        self.ops_channel = ops_channel
        self._edits = itertools.count(1)
        self._latest: dict[str, int] = {}  # approval id -> its newest edit (an older one stops retrying)
        self._later: dict[str, asyncio.Task[None]] = {}  # final states tried again in the background

    async def show(self, approval: Approval, note: str | None = None) -> None:
        """Edit the approval's message to say where it stands, retried while Slack is in trouble; a
        final state Slack still refuses is tried again in the background, and logged if it never lands.
        (A plan sent through response_url has no known message until one of its buttons is clicked.)"""
        if approval.message_channel is None or approval.message_ts is None:
            return
        edit = self._latest[approval.id] = next(self._edits)
        if (superseded := self._later.pop(approval.id, None)) is not None:
            superseded.cancel()
        fields: dict[str, Any] = {"channel": approval.message_channel, "ts": approval.message_ts}
        try:
            fields |= {"text": approval_text(approval), "blocks": approval_blocks(self.engine, approval, note)}
            await edit_message(self.client, **fields, wanted=lambda: self._latest.get(approval.id) == edit)
        except Exception as exc:
            state = approval.state.value
            if not approval.state.final or slack_trouble(exc) is None:
                log.warning("approval_message_edit_failed", approval=approval.id, state=state, exc_info=True)
                return
            log.error(
                "approval_message_edit_failed", approval=approval.id, state=state, retry_in=FINAL_EDIT_RETRIES[0],
                exc_info=True,
            )  # fmt: skip
            self._later[approval.id] = asyncio.create_task(self._edit_later(approval, fields, edit))
        finally:
            if self._latest.get(approval.id) == edit and approval.id not in self._later:
                del self._latest[approval.id]

    async def _edit_later(self, approval: Approval, fields: dict[str, Any], edit: int) -> None:
        """The final state's edit again, after each of FINAL_EDIT_RETRIES, until Slack takes it."""
        state = approval.state.value
        try:
            for pause in FINAL_EDIT_RETRIES:
                await asyncio.sleep(pause)
                try:
                    await self.client.chat_update(**fields)
                except Exception as exc:
                    reason = slack_trouble(exc)
                    log.warning("approval_message_edit_failed", approval=approval.id, state=state, reason=reason)
                    if reason is None:
                        break
                    continue
                log.info("approval_message_edited_late", approval=approval.id, state=state)
                return
            log.error("approval_final_edit_lost", approval=approval.id, state=state, ts=fields["ts"])
        finally:
            if self._later.get(approval.id) is asyncio.current_task():
                del self._later[approval.id]
            if self._latest.get(approval.id) == edit:
                del self._latest[approval.id]

    async def close(self) -> None:
        """Stop the background edits; each final state Slack never took is logged as lost."""
        pending = list(self._later.items())
        for approval_id, task in pending:
            task.cancel()
            log.error("approval_final_edit_lost", approval=approval_id, reason="the bot is stopping")
        await asyncio.gather(*(task for _, task in pending), return_exceptions=True)

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
        ack: AsyncAck,
        command: dict[str, Any],
        client: AsyncWebClient,
        respond: AsyncRespond,
        context: AsyncBoltContext,
    ) -> None:
        await ack()  # Slack wants an answer within 3 s; everything slow happens after this.
        request_id = context["request_id"] = new_request_id()  # on_error's ref, if this fails
        user = str(command.get("user_id", ""))
        channel_id = str(command.get("channel_id", ""))
        text = str(command.get("text", ""))
        await serve_command(deps, router, client, respond, user, channel_id, text, request_id=request_id)

    @app.action(re.compile("^(" + "|".join(CLICK_COMMANDS) + ")$"))
    async def command_click(
        ack: AsyncAck,
        body: dict[str, Any],
        action: dict[str, Any],
        client: AsyncWebClient,
        respond: AsyncRespond,
        context: AsyncBoltContext,
    ) -> None:
        """A click that asks for a command (a release picked from a menu, a roll-forward): it runs as if
        the clicker had typed it, with the same role checks, plan and approval."""
        await ack()
        request_id = context["request_id"] = new_request_id()
        user = str((body.get("user") or {}).get("id", ""))
        where = body.get("channel") or {}
        channel_id = str(where.get("id") or (body.get("container") or {}).get("channel_id", ""))
        try:
            text = await CLICK_COMMANDS[str(action.get("action_id", ""))](deps, action)
        except CommandError as exc:
            await respond(text=deps.redactor.redact(exc.message), response_type="ephemeral", replace_original=False)
            return
        # Anything else goes to on_error: logged with the ref, audited, "failed (ref …)" to the clicker.
        await serve_command(deps, router, client, respond, user, channel_id, text, request_id=request_id)

    @app.action(re.compile("^(" + "|".join(ACTION_IDS) + ")$"))
    async def approval_click(
        ack: AsyncAck,
        body: dict[str, Any],
        action: dict[str, Any],
        respond: AsyncRespond,
        req: AsyncBoltRequest,
        context: AsyncBoltContext,
    ) -> None:
        await ack()
        request_id = context["request_id"] = new_request_id()
        retry = ",".join(req.headers.get("x-slack-retry-num") or ()) or None
        async with deps.running.track():
            await deps.acks.settled()  # acks first (handlers/context.py PendingAcks)
            await on_click(deps, body, action, respond, request_id, retry)

    @app.view(re.compile(".*"))
    async def form_submitted(ack: AsyncAck, body: dict[str, Any], context: AsyncBoltContext) -> None:
        """opsbot opens no modals: a form submitted to it (one from another version of the bot) is
        answered in the modal itself, audited, and nothing runs."""
        await ack(response_action="update", view=notice_view(UNKNOWN_FORM))
        request_id = context["request_id"] = new_request_id()
        await refuse_form(deps, body, request_id)

    @app.error
    async def on_error(
        error: Exception,
        body: dict[str, Any],
        context: AsyncBoltContext,
        client: AsyncWebClient,
        respond: AsyncRespond | None,
        resp: BoltResponse | None,
    ) -> BoltResponse | None:
        """Bolt's one error handler, for listeners and middleware alike: see :func:`report_failure`."""
        return await report_failure(deps, error, body, context, client, respond, resp)


async def serve_command(
    deps: Deps,
    router: Router,
    client: AsyncWebClient,
    respond: AsyncRespond,
    user: str,
    channel_id: str,
    text: str,
    *,
    request_id: str | None = None,
) -> None:
    """Run one /ops command for a Slack user and deliver its reply (a live message while it works)."""
    request_id = request_id or new_request_id()

    async def progress(note: str) -> None:
        await respond(text=note, response_type="ephemeral", replace_original=False)

    live = LiveMessage(client, channel_id)
    async with deps.running.track():  # from the ack on, a shutdown waits for this command
        # Bolt notices the ack on its next 10 ms poll: let this 200, and those of a burst of other
        # requests, go out before this command's work competes with them.
        await deps.acks.settled()
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
        # Anything else reaches on_error (logged, audited, "failed (ref …)" with this request's id).
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


def failed_text(ref: str) -> str:
    """What a user hears about an unexpected failure: the reference, never the error."""
    return f"Sorry — that failed (ref {ref}). The details are in the bot's log."


def notice_view(text: str) -> dict[str, Any]:
    """A modal that only says ``text`` (a form opsbot does not know, a failure)."""
    return {
        "type": "modal",
        "title": {"type": "plain_text", "text": "opsbot"},
        "close": {"type": "plain_text", "text": "Close"},
        "blocks": [bk.section(text)],
    }


async def refuse_form(deps: Deps, body: dict[str, Any], request_id: str) -> None:
    """Audit a submitted form opsbot does not know; nothing runs."""
    actor, command, _, channel = _described(body)
    log.warning("unknown_form_submitted", request_id=request_id, user=actor, form=command)
    await record_event(
        deps.store, deps.redactor, request_id=request_id, actor=actor, command=command, args="", channel=channel,
        outcome="rejected", detail="opsbot has no form like this; nothing was done",
    )  # fmt: skip


async def report_failure(
    deps: Deps,
    error: Exception,
    body: dict[str, Any],
    context: AsyncBoltContext,
    client: AsyncWebClient,
    respond: AsyncRespond | None,
    resp: BoltResponse | None,
) -> BoltResponse | None:
    """Whatever a listener or middleware let escape: logged with its traceback under a reference,
    audited as an error, and the user is told "failed (ref …)" and nothing else — in the answer to
    Slack's request if it is still open (``resp``), else through response_url or the modal. Never
    raises: an error here would escape Bolt as an unretrieved task exception."""
    ref = str(context.get("request_id") or new_request_id())
    try:
        if resp is None:
            # Acked already, but Bolt notices an ack on its next 10 ms poll, and once this handler
            # returns it resets the ack it has not seen yet: Slack would get a 404 after 3 s instead.
            # Let the poll see it first.
            await asyncio.sleep(ACK_HEADSTART)
        actor, command, args, channel = _described(body)
        log.error("listener_error", request_id=ref, user=actor, command=command, exc_info=error)
        text = failed_text(ref)
        answer: BoltResponse | None = None
        try:
            if resp is not None and "command" in body:  # a slash command not yet acked: the answer says it
                answer = BoltResponse(status=200, body={"response_type": "ephemeral", "text": text})
            elif body.get("type") == "view_submission":
                if resp is not None:
                    answer = BoltResponse(status=200, body={"response_action": "update", "view": notice_view(text)})
                elif view_id := str((body.get("view") or {}).get("id") or ""):
                    await client.views_update(view_id=view_id, view=notice_view(text))
            else:
                answer = BoltResponse(status=200, body="") if resp is not None else None
                if respond is not None:
                    await respond(text=text, response_type="ephemeral", replace_original=False)
        except Exception:
            log.warning("failure_notice_failed", request_id=ref, exc_info=True)
        await record_event(
            deps.store, deps.redactor, request_id=ref, actor=actor, command=command, args=args, channel=channel,
            outcome="error", detail=f"failed (ref {ref})",
        )  # fmt: skip
        return answer
    except Exception:
        log.exception("error_handler_failed", request_id=ref)
        return None


def _described(body: dict[str, Any]) -> tuple[str, str, str, str]:
    """Who sent a Slack request, what it asked for, its arguments and channel: for the audit."""
    if "command" in body:  # a slash command (a form body)
        text = str(body.get("text", ""))
        return str(body.get("user_id", "")), str(body.get("command", ""))[:40], text, str(body.get("channel_id", ""))
    kind = str(body.get("type", "request"))[:40]
    user = body.get("user") or {}
    where = body.get("channel") or body.get("container") or {}
    actor = str(user.get("id", "")) if isinstance(user, dict) else ""
    channel = str(where.get("id") or where.get("channel_id") or "") if isinstance(where, dict) else ""
    if kind == "block_actions":
        actions = body.get("actions") or [{}]
        action = actions[0] if isinstance(actions, list) and isinstance(actions[0], dict) else {}
        chosen = action.get("value") or (action.get("selected_option") or {}).get("value") or ""
        args = f"{action.get('block_id', '')} {chosen}".strip()
        return actor, f"click {str(action.get('action_id', ''))[:60]}", args, channel
    if kind == "view_submission":
        view = body.get("view") or {}
        callback = str(view.get("callback_id", "")) if isinstance(view, dict) else ""
        return actor, f"form {callback[:60]}".strip(), "", channel
    return actor, kind, "", channel
