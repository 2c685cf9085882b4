"""The floor for bench/ack_latency.py: a bare Bolt AsyncApp on aiohttp whose /ops handler only acks."""

from __future__ import annotations

import os

from aiohttp import web
from slack_bolt.adapter.aiohttp import to_aiohttp_response, to_bolt_request
from slack_bolt.async_app import AsyncApp
from slack_sdk.web.async_client import AsyncWebClient


def main() -> None:
    client = AsyncWebClient(token=os.environ["SLACK_BOT_TOKEN"], base_url=os.environ["OPSBOT_SLACK_API_URL"])
    app = AsyncApp(client=client, signing_secret=os.environ["SLACK_SIGNING_SECRET"])

    @app.command("/ops")
    async def ops(ack):  # type: ignore[no-untyped-def]
        await ack()

    async def events(request: web.Request) -> web.Response:
        return await to_aiohttp_response(await app.async_dispatch(await to_bolt_request(request)))

    web_app = web.Application()
    web_app.router.add_post("/slack/events", events)
    web.run_app(web_app, host="127.0.0.1", port=int(os.environ["OPSBOT_PORT"]), print=None, access_log=None)


if __name__ == "__main__":
    main()
