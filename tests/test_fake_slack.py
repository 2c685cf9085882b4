"""The fake Slack refuses what Slack refuses, through the real slack_sdk client and a response_url."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient

from tests.fixtures.slack import FakeSlack, fail_if_refused

Blocks = list[dict[str, Any]]


@pytest.fixture
async def client(fake_slack: FakeSlack) -> AsyncIterator[AsyncWebClient]:
    web = AsyncWebClient(token="xoxb-test", base_url=fake_slack.base_url)
    yield web


def section(text: str) -> dict[str, Any]:
    return {"type": "section", "text": {"type": "mrkdwn", "text": text}}


def button(text: str = "Approve", value: str = "v", action_id: str = "approve") -> dict[str, Any]:
    return {"type": "button", "text": {"type": "plain_text", "text": text}, "action_id": action_id, "value": value}


def select(options: int) -> dict[str, Any]:
    return {
        "type": "static_select",
        "action_id": "pick",
        "placeholder": {"type": "plain_text", "text": "Pick"},
        "options": [{"text": {"type": "plain_text", "text": str(i)}, "value": str(i)} for i in range(options)],
    }


def actions(*elements: dict[str, Any], block_id: str = "actions") -> dict[str, Any]:
    return {"type": "actions", "block_id": block_id, "elements": list(elements)}


async def refused(fake: FakeSlack, client: AsyncWebClient, method: str, **kwargs: Any) -> str:
    """Call ``method``; it must fail with Slack's ``ok: false``; return the error name."""
    with pytest.raises(SlackApiError) as caught:
        await client.api_call(method, json=kwargs)
    error = str(caught.value.response["error"])
    (taken,) = fake.take_refusals()
    assert taken[0] == method
    assert taken[1].error == error
    return error


async def test_a_valid_message_is_accepted(fake_slack: FakeSlack, client: AsyncWebClient) -> None:
    blocks = [
        {"type": "header", "text": {"type": "plain_text", "text": "Deploy", "emoji": True}},
        section("x" * 3000),
        {"type": "context", "elements": [{"type": "mrkdwn", "text": "ref"}]},
        {"type": "divider"},
        actions(button("x" * 75, "v" * 2000, "a" * 255), select(100), block_id="b" * 255),
    ]
    response = await client.chat_postMessage(channel="C0OPS", text="Deploy", blocks=blocks)
    assert response["ok"] is True
    assert fake_slack.take_refusals() == []


async def test_unknown_method_is_refused(fake_slack: FakeSlack, client: AsyncWebClient) -> None:
    assert await refused(fake_slack, client, "chat.postMesage", channel="C0OPS", text="hi") == "unknown_method"


@pytest.mark.parametrize(
    ("method", "kwargs", "error"),
    [
        ("chat.postMessage", {"text": "hi"}, "channel_not_found"),
        ("chat.postMessage", {"channel": "C0OPS"}, "no_text"),
        ("chat.postMessage", {"channel": "C0OPS", "blocks": [section("hi")]}, "no_text"),
        ("chat.update", {"channel": "C0OPS", "text": "hi"}, "invalid_arguments"),
        ("chat.postEphemeral", {"channel": "C0OPS", "text": "hi"}, "invalid_arguments"),
        ("views.open", {"trigger_id": "1.2.3"}, "invalid_arguments"),
        ("views.publish", {"user_id": "U1"}, "invalid_arguments"),
        ("usergroups.users.list", {}, "invalid_arguments"),
    ],
    ids=[
        "no-channel",
        "no-text",
        "blocks-without-text",
        "update-without-ts",
        "ephemeral-without-user",
        "views-open-without-view",
        "views-publish-without-view",
        "usergroup-missing",
    ],
)
async def test_missing_arguments_are_refused(
    fake_slack: FakeSlack, client: AsyncWebClient, method: str, kwargs: dict[str, Any], error: str
) -> None:
    assert await refused(fake_slack, client, method, **kwargs) == error


@pytest.mark.parametrize(
    "blocks",
    [
        [section("x")] * 51,
        [section("x" * 3001)],
        [{"type": "header", "text": {"type": "plain_text", "text": "x" * 151}}],
        [actions(button(text="x" * 76))],
        [actions(button(value="v" * 2001))],
        [actions(button(action_id="a" * 256))],
        [actions(button(), block_id="b" * 256)],
        [actions(*[button(action_id=f"a{i}") for i in range(26)])],
        [actions(select(101))],
        [actions(select(1) | {"options": [{"text": {"type": "plain_text", "text": "x"}, "value": "v" * 151}]})],
        [{"type": "sectoin", "text": {"type": "mrkdwn", "text": "typo in the type"}}],
        [{"type": "section", "txt": {"type": "mrkdwn", "text": "typo in a field"}}],
        [{"type": "section", "text": {"type": "markdown_text", "text": "unknown text type"}}],
        [actions({"type": "buton", "action_id": "typo", "text": {"type": "plain_text", "text": "x"}})],
        [section("")],
        "not a list",
    ],
    ids=[
        "51-blocks",
        "section-3001",
        "header-151",
        "button-text-76",
        "button-value-2001",
        "action-id-256",
        "block-id-256",
        "26-elements",
        "101-options",
        "option-value-151",
        "unknown-block",
        "unknown-field",
        "unknown-text-type",
        "unknown-element",
        "empty-text",
        "not-a-list",
    ],
)
async def test_invalid_block_kit_is_refused(fake_slack: FakeSlack, client: AsyncWebClient, blocks: Any) -> None:
    error = await refused(fake_slack, client, "chat.postMessage", channel="C0OPS", text="fallback", blocks=blocks)
    assert error == "invalid_blocks"


async def test_message_text_over_40000_characters_is_refused(fake_slack: FakeSlack, client: AsyncWebClient) -> None:
    await client.chat_postMessage(channel="C0OPS", text="x" * 40_000)
    assert await refused(fake_slack, client, "chat.postMessage", channel="C0OPS", text="x" * 40_001) == "msg_too_long"


def modal(blocks: Blocks, title: str = "Confirm") -> dict[str, Any]:
    return {"type": "modal", "title": {"type": "plain_text", "text": title}, "blocks": blocks}


async def test_views_are_checked(fake_slack: FakeSlack, client: AsyncWebClient) -> None:
    await client.views_open(trigger_id="1.2.3", view=modal([section("x")] * 100))
    await client.views_publish(user_id="U1", view={"type": "home", "blocks": [section("home")]})
    assert await refused(fake_slack, client, "views.open", trigger_id="1", view=modal([section("x")] * 101)) == (
        "invalid_blocks"
    )
    assert await refused(fake_slack, client, "views.open", trigger_id="1", view=modal([section("x")], "x" * 25)) == (
        "invalid_arguments"
    )
    no_title = {"type": "modal", "blocks": [section("x")]}
    assert await refused(fake_slack, client, "views.open", trigger_id="1", view=no_title) == "invalid_arguments"
    assert await refused(fake_slack, client, "views.open", trigger_id="1", view=modal([])) == "invalid_arguments"
    assert await refused(fake_slack, client, "views.update", view=modal([section("x")])) == "invalid_arguments"


async def test_form_encoded_blocks_are_checked_too(fake_slack: FakeSlack) -> None:
    """Bolt and slack_sdk send JSON or forms; a form carries blocks as a JSON string."""
    form = {"channel": "C0OPS", "text": "hi", "blocks": json.dumps([section("x" * 3001)])}
    async with (
        aiohttp.ClientSession() as session,
        session.post(fake_slack.base_url + "chat.postMessage", data=form) as r,
    ):
        body = await r.json()
    assert body["ok"] is False and body["error"] == "invalid_blocks"
    assert "3000" in body["response_metadata"]["messages"][0]
    assert len(fake_slack.take_refusals()) == 1


async def post_response_url(fake: FakeSlack, body: dict[str, Any]) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.post(fake.response_url(), json=body) as response:
        return response.status, await response.text()


async def test_response_url_posts_are_checked(fake_slack: FakeSlack) -> None:
    assert await post_response_url(fake_slack, {"text": "ok", "blocks": [section("ok")]}) == (200, "ok")
    assert await post_response_url(fake_slack, {"delete_original": True}) == (200, "ok")
    assert await post_response_url(fake_slack, {"text": "x", "blocks": [section("x" * 3001)]}) == (
        400,
        "invalid_blocks",
    )
    assert await post_response_url(fake_slack, {"blocks": [section("no fallback")]}) == (400, "no_text")
    refusals = fake_slack.take_refusals()
    assert [(method, r.error) for method, r in refusals] == [
        ("response_url/default", "invalid_blocks"),
        ("response_url/default", "no_text"),
    ]


async def test_a_refusal_fails_the_test_that_did_not_take_it(fake_slack: FakeSlack, client: AsyncWebClient) -> None:
    with pytest.raises(SlackApiError):
        await client.chat_postMessage(channel="C0OPS", text="x", blocks=[section("")])
    with pytest.raises(pytest.fail.Exception, match="Slack would have refused 1 call"):
        fail_if_refused(fake_slack)
    fail_if_refused(fake_slack)  # taken: nothing left to fail for
