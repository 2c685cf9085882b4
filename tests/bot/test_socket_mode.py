"""`opsbot serve --socket`: the real Socket Mode client against a websocket standing in for Slack's."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import parse_qsl

import aiohttp
import pytest
from aiohttp import web

from bot.sample_app import SampleAppState, start_sample_app
from bot.serve import serve
from bot.settings import Settings
from services.redaction import Redactor
from tests.fixtures.servers import free_port
from tests.fixtures.slack import FakeSlack, slash_body
from tests.fixtures.wait import wait_until


class SlackSocket:
    """Slack's side of Socket Mode: says hello, sends envelopes, collects the acks."""

    def __init__(self) -> None:
        self.connected = asyncio.Event()
        self.acks: asyncio.Queue[dict[str, object]] = asyncio.Queue()
        self._ws: web.WebSocketResponse | None = None

    async def handler(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(autoping=True)
        await ws.prepare(request)
        self._ws = ws
        await ws.send_json({"type": "hello", "num_connections": 1, "debug_info": {"host": "test"}})
        self.connected.set()
        async for message in ws:
            if message.type == aiohttp.WSMsgType.TEXT:
                await self.acks.put(json.loads(message.data))
        return ws

    async def send(self, envelope: dict[str, object]) -> None:
        assert self._ws is not None
        await self._ws.send_json(envelope)


@pytest.fixture
async def slack_socket() -> AsyncIterator[tuple[SlackSocket, str]]:
    socket = SlackSocket()
    app = web.Application()
    app.router.add_get("/link", socket.handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield socket, f"ws://127.0.0.1:{port}/link"
    await runner.cleanup()


async def test_socket_mode_serves_ops_and_ready_waits_for_the_socket(
    tmp_path: Path, fake_slack: FakeSlack, slack_socket: tuple[SlackSocket, str]
) -> None:
    socket, ws_url = slack_socket
    fake_slack.answer("apps.connections.open", url=ws_url)
    runner, app_url = await start_sample_app(SampleAppState())
    config = tmp_path / "opsbot.yaml"
    config.write_text(
        f'roles: {{viewer: ["*"]}}\nservices: {{shop: {{components: {{api: {{type: http, url: "{app_url}"}}}}}}}}\n'
    )
    port = free_port()
    settings = Settings(
        SLACK_BOT_TOKEN="xoxb-socket-test",
        SLACK_APP_TOKEN="xapp-1-socket-test-token",
        OPSBOT_SLACK_API_URL=fake_slack.base_url,
        OPSBOT_CONFIG=str(config),
        OPSBOT_STATE_DIR=str(tmp_path),
        OPSBOT_HOST="127.0.0.1",
    )  # type: ignore[call-arg]
    stop = asyncio.Event()
    task = asyncio.create_task(serve(settings, Redactor(), socket_mode=True, port=port, stop=stop))
    try:
        async with aiohttp.ClientSession() as http:
            await asyncio.wait_for(socket.connected.wait(), 15)

            async def ready() -> bool:
                async with http.get(f"http://127.0.0.1:{port}/ready") as resp:
                    return resp.status == 200

            await wait_until(ready, "/ready answers 200", timeout=15)
            async with http.post(f"http://127.0.0.1:{port}/slack/events", data="x") as resp:
                assert resp.status == 404  # in Socket Mode nothing arrives over HTTP
        [connections_open] = fake_slack.calls_to("apps.connections.open")
        assert connections_open.token == "xapp-1-socket-test-token"
        payload = dict(parse_qsl(slash_body("health all", response_url=fake_slack.response_url())))
        await socket.send(
            {"envelope_id": "env-1", "type": "slash_commands", "payload": payload, "accepts_response_payload": True}
        )
        ack = await asyncio.wait_for(socket.acks.get(), 5)
        assert ack["envelope_id"] == "env-1"
        [post] = await fake_slack.wait_for("chat.postMessage", timeout=10)
        assert "Health of all services: healthy" in post.params["text"]
    finally:
        stop.set()
        assert await asyncio.wait_for(task, 20) == 0
        await runner.cleanup()
