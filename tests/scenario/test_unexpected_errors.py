"""No traceback ever reaches Slack, tested through Slack: an unexpected exception in a slash command,
a button click, a menu choice and a form submission (signed requests to the real Bolt app) leaves
the user with "failed (ref …)" and nothing else; the reference finds the traceback in the JSON log;
the audit log records the failure; and nothing escapes Bolt's error handler.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import quote_plus

import pytest

import handlers.router
import handlers.slack
from bot.logging import configure_logging
from handlers.alerts import SILENCE_PICK
from handlers.approvals import APPROVE
from handlers.deploy import ROLLBACK_PICK
from handlers.registry import CLICK_COMMANDS
from handlers.router import Router
from handlers.slack import UNKNOWN_FORM, failed_text
from services.approvals import ApprovalEngine
from services.redaction import Redactor
from services.state import AuditEvent
from tests.fixtures.slack import APP_ID, BOT_ID, TEAM_DOMAIN, TEAM_ID, FakeSlack
from tests.fixtures.slack_checks import check_view
from tests.fixtures.wait import wait_until
from tests.scenario.harness import Answer, Bot, inventory, running_bot

BOOM = "kaboom-7f3a9c the flux capacitor melted"  # the exception's message: the log may say it, Slack never
REF = re.compile(r"failed \(ref ([0-9a-f]{12})\)")
USER = "U0CLICK1"
FORM_VIEW_ID = "V0FORM0001"
# Error-level log events that are the bot's own account of a failure; anything else at error level
# (Bolt's default handler, "Task exception was never retrieved", aiohttp's "Error handling request")
# would mean something escaped.
REPORTED = {"listener_error", "command_failed"}

INVENTORY = """
roles:
  viewer: ["*"]
  approver: [U0CLICK1]
services:
  shop:
    components:
      api: {type: http, url: "http://127.0.0.1:9", timeout: 1}
"""


def boom(*_args: Any, **_kwargs: Any) -> NoReturn:
    raise RuntimeError(BOOM)


async def aboom(*_args: Any, **_kwargs: Any) -> NoReturn:
    raise RuntimeError(BOOM)


@pytest.fixture
async def bot(fake_slack: FakeSlack, tmp_path: Path) -> AsyncIterator[Bot]:
    """The bot, logging JSON to stderr (the conftest puts the console format back afterwards)."""
    configure_logging("json", "INFO", Redactor())
    async with running_bot(fake_slack, tmp_path, inventory(INVENTORY)) as running:
        yield running


def form_body(user: str = USER, callback_id: str = "deploy_form", view_id: str = FORM_VIEW_ID) -> str:
    """A ``view_submission`` body as Slack sends it when a modal's Submit is pressed."""
    view = {
        "id": view_id,
        "team_id": TEAM_ID,
        "type": "modal",
        "callback_id": callback_id,
        "private_metadata": "",
        "title": {"type": "plain_text", "text": "Deploy"},
        "submit": {"type": "plain_text", "text": "Go"},
        "blocks": [
            {
                "type": "input",
                "block_id": "service",
                "label": {"type": "plain_text", "text": "Service"},
                "element": {"type": "plain_text_input", "action_id": "value"},
            }
        ],
        "state": {"values": {"service": {"value": {"type": "plain_text_input", "value": "shop"}}}},
        "hash": "1700000000.abcdef12",
        "previous_view_id": None,
        "root_view_id": view_id,
        "app_id": APP_ID,
        "external_id": "",
        "app_installed_team_id": TEAM_ID,
        "bot_id": BOT_ID,
    }
    payload = {
        "type": "view_submission",
        "team": {"id": TEAM_ID, "domain": TEAM_DOMAIN},
        "user": {"id": user, "username": user.lower(), "name": user.lower(), "team_id": TEAM_ID},
        "api_app_id": APP_ID,
        "token": "fake-verification-token",
        "trigger_id": f"1700000000.{TEAM_ID}.0123456789abcdef",
        "view": view,
        "response_urls": [],
        "is_enterprise_install": False,
        "enterprise": None,
    }
    return "payload=" + quote_plus(json.dumps(payload, separators=(",", ":")))


def click_body(bot: Bot, action_id: str = APPROVE, value: str = "k3xm9q2p", **kwargs: Any) -> str:
    kwargs.setdefault("block_id", f"approval:{value}")
    return bot.slack.block_actions_body(action_id, value, user_id=USER, response_url=bot.slack.response_url(), **kwargs)


async def told(bot: Bot) -> str:
    """The one thing the user was told, through response_url (its blocks, if any, say no more)."""
    [call] = await bot.slack.wait_for("response_url/default", timeout=10)
    assert call.params["response_type"] == "ephemeral"
    text = str(call.params["text"])
    for block in call.json_param("blocks") or []:
        assert block["text"]["text"].removeprefix(":warning: ") == text
    return text


def ref_in(text: str) -> str:
    found = REF.search(text)
    assert found, f"no 'failed (ref …)' in {text!r}"
    return found[1]


def log_lines(capsys: pytest.CaptureFixture[str]) -> list[dict[str, Any]]:
    lines = []
    for line in capsys.readouterr().err.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            lines.append(record)
    return lines


async def audited(bot: Bot, ref: str) -> AuditEvent:
    async def found() -> list[AuditEvent]:
        return [e for e in await bot.container.store.audit_events(limit=100) if e.request_id == ref]

    [event] = await wait_until(found, f"the failure {ref} is audited")
    return event


async def assert_failed_cleanly(
    bot: Bot, capsys: pytest.CaptureFixture[str], ref: str, *, command: str, answer: Answer | None = None
) -> AuditEvent:
    """The failure ``ref``: audited as an error; its traceback in the log under the ref; neither the
    error nor a traceback in anything Slack received; nothing escaped the error handler."""
    event = await audited(bot, ref)
    assert (event.command, event.outcome, event.detail) == (command, "error", f"failed (ref {ref})")
    sent = [c.raw.decode(errors="replace") + json.dumps(c.params, default=str) for c in bot.slack.calls]
    if answer is not None:
        sent.append(answer.body)
    for text in sent:
        assert "kaboom" not in text and "Traceback" not in text and "RuntimeError" not in text, text
    assert "kaboom" not in event.detail + event.args

    lines = log_lines(capsys)
    traced = [r for r in lines if r.get("request_id") == ref and "Traceback" in str(r.get("exception", ""))]
    assert traced, f"no log line with ref {ref} carries the traceback"
    assert f"RuntimeError: {BOOM}" in traced[0]["exception"]
    escaped = [r for r in lines if r.get("level") in ("error", "critical") and r.get("event") not in REPORTED]
    assert escaped == []
    return event


async def test_a_failing_command_listener_answers_with_a_ref_only(
    bot: Bot, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(Router, "dispatch", aboom)  # escapes the /ops listener: only on_error is left
    answer = await bot.command("health shop", user=USER)
    assert answer.status == 200 and answer.body == ""  # acked before the work, as always
    text = await told(bot)
    ref = ref_in(text)
    assert text == failed_text(ref)
    event = await assert_failed_cleanly(bot, capsys, ref, command="/ops")
    assert (event.actor, event.args, event.channel) == (USER, "health shop", "C0OPS")


async def test_a_command_failing_inside_answers_with_a_ref_only(
    bot: Bot, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The router's own catch (this already held before the error handler was fixed)."""
    monkeypatch.setattr(handlers.router, "help_reply", boom)
    await bot.command("help", user=USER)
    text = await told(bot)
    ref = ref_in(text)
    assert text == f"Sorry — `/ops help` failed (ref {ref}). The details are in the bot's log."
    await assert_failed_cleanly(bot, capsys, ref, command="help")


async def test_a_failing_approve_click_answers_with_a_ref_only(
    bot: Bot, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ApprovalEngine, "approve", aboom)
    answer = await bot.post(click_body(bot, APPROVE, "k3xm9q2p"))
    assert answer.status == 200 and answer.body == ""
    text = await told(bot)
    ref = ref_in(text)
    assert text == failed_text(ref)
    event = await assert_failed_cleanly(bot, capsys, ref, command=f"click {APPROVE}")
    assert (event.actor, event.args) == (USER, "approval:k3xm9q2p k3xm9q2p")


@pytest.mark.parametrize(
    ("action_id", "block_id", "choice"),
    [(ROLLBACK_PICK, "rollback:shop:api", "rev-00041"), (SILENCE_PICK, "alert:shop/api/ServiceDown", "1h")],
    ids=["rollback_pick", "alert_silence"],
)
async def test_a_failing_menu_choice_answers_with_a_ref_only(
    bot: Bot,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    action_id: str,
    block_id: str,
    choice: str,
) -> None:
    monkeypatch.setitem(CLICK_COMMANDS, action_id, aboom)  # what turns the choice into a command
    answer = await bot.post(click_body(bot, action_id, choice, block_id=block_id, element="static_select"))
    assert answer.status == 200 and answer.body == ""
    text = await told(bot)
    ref = ref_in(text)
    assert text == failed_text(ref)
    event = await assert_failed_cleanly(bot, capsys, ref, command=f"click {action_id}")
    assert event.args == f"{block_id} {choice}"


async def test_a_submitted_form_is_answered_in_the_modal_and_nothing_runs(
    bot: Bot, capsys: pytest.CaptureFixture[str]
) -> None:
    """opsbot opens no modals, so a form that reaches it (one from another version of the bot) is
    answered by its own listener: the modal says so, and the audit records it."""
    answer = await bot.post(form_body())
    assert answer.status == 200
    reply = json.loads(answer.body)
    assert reply["response_action"] == "update" and check_view(reply["view"]) is None
    assert UNKNOWN_FORM in json.dumps(reply["view"])

    async def found() -> list[AuditEvent]:
        return [e for e in await bot.container.store.audit_events() if e.command == "form deploy_form"]

    [event] = await wait_until(found, "the form is audited")
    assert (event.actor, event.outcome) == (USER, "rejected")
    assert bot.slack.calls_to("views.update") == [] and bot.slack.calls_to("chat.postMessage") == []
    assert not [r for r in log_lines(capsys) if r.get("level") in ("error", "critical")]


async def test_a_failing_form_submission_answers_with_a_ref_only(
    bot: Bot, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(handlers.slack, "refuse_form", aboom)  # after the ack: the modal is edited
    answer = await bot.post(form_body())
    assert answer.status == 200
    [update] = await bot.slack.wait_for("views.update", timeout=10)
    assert update.params["view_id"] == FORM_VIEW_ID
    shown = json.dumps(update.json_param("view"), ensure_ascii=False)
    ref = ref_in(shown)
    assert failed_text(ref) in shown
    await assert_failed_cleanly(bot, capsys, ref, command="form deploy_form", answer=answer)


@pytest.mark.parametrize("kind", ["command", "click", "form"])
async def test_a_failure_before_the_ack_is_answered_in_the_ack(
    bot: Bot, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """A global middleware fails (Bolt's 500 is what Slack would get): the answer to Slack's request
    carries "failed (ref …)" instead, where Slack shows one (a command's reply, the modal)."""
    monkeypatch.setattr(bot.container.metrics, "count_slack_request", boom)
    body = {
        "command": bot.slack.slash_body("health shop", user_id=USER),
        "click": click_body(bot),
        "form": form_body(),
    }[kind]
    answer = await bot.post(body)
    assert answer.status == 200
    if kind == "command":
        reply = json.loads(answer.body)
        assert reply["response_type"] == "ephemeral"
        ref = ref_in(reply["text"])
        assert reply["text"] == failed_text(ref)
        command = "/ops"
    elif kind == "click":
        assert answer.body == ""
        text = await told(bot)
        ref = ref_in(text)
        assert text == failed_text(ref)
        command = f"click {APPROVE}"
    else:
        reply = json.loads(answer.body)
        assert reply["response_action"] == "update" and check_view(reply["view"]) is None
        ref = ref_in(json.dumps(reply["view"]))
        assert failed_text(ref) in json.dumps(reply["view"], ensure_ascii=False)
        command = "form deploy_form"
    await assert_failed_cleanly(bot, capsys, ref, command=command, answer=answer)


async def test_nothing_escapes_the_error_handler_even_when_it_fails_itself(
    bot: Bot, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(Router, "dispatch", aboom)
    monkeypatch.setattr(handlers.slack, "record_event", aboom)  # the handler's own audit write fails
    await bot.command("health shop", user=USER)
    text = await told(bot)
    ref = ref_in(text)
    assert text == failed_text(ref)
    lines = await wait_until(
        lambda: [r for r in log_lines(capsys) if r.get("event") == "error_handler_failed"] or None,
        "the error handler logs its own failure",
    )
    assert lines[0]["request_id"] == ref and BOOM in lines[0]["exception"]
    assert "kaboom" not in json.dumps([c.params for c in bot.slack.calls], default=str)
