"""How fast does opsbot ack a slash command while its probes hang?

50 concurrent signed `/ops health all` requests over HTTP, in several rounds, against
`opsbot serve` (a real process) whose inventory has 20 components that never answer; the same
load against a bare Bolt app whose handler only acks (the floor). Prints p50/p99 time to HTTP 200.
Target: opsbot p99 under 100 ms and within 1.5x of the floor.

    uv run python -m bench.ack_latency [--rounds 5] [--concurrency 50]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from bench.common import ROOT, child_env, percentile, post_signed, summary, targets
from tests.fixtures.servers import free_port
from tests.fixtures.slack import FakeSlack

VERBOSE = "-v" in sys.argv
SECRET = "bench-signing-secret"
TOKEN = "xoxb-bench-token"


async def wait_ready(http: aiohttp.ClientSession, url: str, path: str = "/ready") -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            async with http.get(url + path) as resp:
                # /ready must say 200; the bare app has no such route, any answer means it listens.
                if resp.status == 200 or path == "/":
                    return
        except aiohttp.ClientConnectionError:
            pass
        await asyncio.sleep(0.1)
    raise RuntimeError(f"{url} not ready")


async def one(http: aiohttp.ClientSession, url: str, slack: FakeSlack) -> float:
    body = slack.slash_body("health all", user_id="U0BENCH", response_url=slack.response_url())
    return await post_signed(http, url, body, SECRET)


async def load(url: str, slack: FakeSlack, rounds: int, concurrency: int) -> list[float]:
    samples: list[float] = []
    connector = aiohttp.TCPConnector(limit=concurrency * 2)
    async with aiohttp.ClientSession(connector=connector) as http:
        await one(http, url, slack)  # warm-up: Bolt's auth.test, connection set-up
        for number in range(rounds):
            batch = await asyncio.gather(*(one(http, url, slack) for _ in range(concurrency)))
            if VERBOSE:
                print(f"  round {number + 1}: " + summary("", batch).strip())
            samples += batch
            await asyncio.sleep(0.2)
    return samples


async def measure(module: list[str], env: dict[str, str], port: int, slack: FakeSlack, args: argparse.Namespace,
                  ready_path: str) -> list[float]:  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        sys.executable, *module, env=env, cwd=ROOT,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:
            await wait_ready(http, url, ready_path)
        return await load(url, slack, args.rounds, args.concurrency)
    finally:
        proc.terminate()
        await proc.wait()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--hung", type=int, default=20)
    parser.add_argument("-v", action="store_true", help="print each round")
    args = parser.parse_args()
    slack = FakeSlack()
    slack.start()
    try:
        async with targets(hung=args.hung) as urls:
            with tempfile.TemporaryDirectory() as tmp:
                inventory = Path(tmp) / "opsbot.yaml"
                lines = ["roles: {viewer: ['*']}", "health: {deadline: 10}", "services:", "  stuck:", "    components:"]
                lines += [f"      c{i}: {{type: http, url: '{u}', timeout: 5}}" for i, u in enumerate(urls["hung"])]
                inventory.write_text("\n".join(lines) + "\n")
                common = {
                    "SLACK_BOT_TOKEN": TOKEN,
                    "SLACK_SIGNING_SECRET": SECRET,
                    "OPSBOT_SLACK_API_URL": slack.base_url,
                    "OPSBOT_HOST": "127.0.0.1",
                    "OPSBOT_LOG_LEVEL": "WARNING",
                }
                floor_port, bot_port = free_port(), free_port()
                floor = await measure(
                    ["-m", "bench._bare_bolt"], child_env(**common, OPSBOT_PORT=str(floor_port)),
                    floor_port, slack, args, "/",
                )  # fmt: skip
                bot_env = child_env(
                    **common, OPSBOT_PORT=str(bot_port), OPSBOT_CONFIG=str(inventory), OPSBOT_STATE_DIR=tmp
                )
                bot = await measure(["-m", "bot.cli", "serve"], bot_env, bot_port, slack, args, "/ready")
        print(f"ack latency: {args.rounds} rounds of {args.concurrency} concurrent signed `/ops health all`,")
        print(f"opsbot probing {args.hung} components that never answer (5 s timeout each)")
        print(summary("bare Bolt app (floor)", floor))
        print(summary("opsbot serve", bot))
        ratio = percentile(bot, 99) / percentile(floor, 99)
        verdict = "meets" if percentile(bot, 99) * 1000 < 100 and ratio <= 1.5 else "MISSES"
        print(f"p99 ratio opsbot/floor = {ratio:.2f}  ({verdict} target: p99 < 100 ms and <= 1.5x floor)")
    finally:
        slack.stop()


if __name__ == "__main__":
    asyncio.run(main())
