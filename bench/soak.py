"""Does `opsbot serve` keep its memory flat under a long load?

Rounds of signed slash commands (a mix of `/ops help`, an unknown verb, `/ops health` over a few
answering components and a command with a bad argument) at a fixed concurrency against one real
`opsbot serve` process with a fake Slack; after each round, once every command is answered, the
bot's RSS (from /proc) and how many objects its cyclic garbage collector freed during the round
(``python_gc_objects_collected_total`` on /metrics). Target: RSS growth after the first round
under 5 MB over 30,000 commands, with the collector left to itself.

    uv run python -m bench.soak [--rounds 11] [--per-round 3000] [--concurrency 16]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import re
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from bench.ack_latency import wait_ready
from bench.common import ROOT, child_env, post_signed, targets
from tests.fixtures.servers import free_port
from tests.fixtures.slack import FakeSlack

SECRET = "bench-signing-secret"
TOKEN = "xoxb-bench-token"
# One of each kind of answer: ephemeral help, ephemeral refusal, public report, ephemeral bad argument.
MIX = ("help", "frobnicate now", "health shop", "approve")
TARGET_MB = 5.0
SETTLE_TIMEOUT = 120.0

_SAMPLE = re.compile(r"^(?P<name>[a-z_]+)(?:\{[^}]*\})? (?P<value>\S+)$", re.MULTILINE)


def rss_mb(pid: int) -> float:
    """Resident set size of a process, from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


async def metric_sum(http: aiohttp.ClientSession, url: str, name: str) -> float:
    """The sum over all label sets of one metric on the bot's /metrics."""
    async with http.get(url + "/metrics") as resp:
        text = await resp.text()
    return sum(float(m["value"]) for m in _SAMPLE.finditer(text) if m["name"] == name)


def answers(slack: FakeSlack) -> int:
    """Replies the fake Slack received: response_url posts and channel messages."""
    return sum(1 for c in slack.calls if c.method.startswith("response_url/") or c.method == "chat.postMessage")


async def settle(http: aiohttp.ClientSession, url: str, slack: FakeSlack, expected: int) -> None:
    """Wait until every command sent so far is counted and its reply has reached the fake Slack."""
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while time.monotonic() < deadline:
        done = await metric_sum(http, url, "opsbot_commands_total")
        if done >= expected and answers(slack) >= expected:
            return
        await asyncio.sleep(0.2)
    raise RuntimeError(f"the bot did not answer {expected} commands within {SETTLE_TIMEOUT:g} s")


async def round_of(http: aiohttp.ClientSession, url: str, slack: FakeSlack, count: int, args: argparse.Namespace,
                   mix: tuple[str, ...]) -> int:  # fmt: skip
    """Send ``count`` commands from ``args.concurrency`` workers, never more than ``args.backlog``
    of them acked but not yet finished by the bot (a bot slower than its acks would otherwise
    pile up work, and RSS would measure the pile, not what is kept). Returns the largest backlog."""
    texts = itertools.islice(itertools.cycle(mix), count)
    base = await metric_sum(http, url, "opsbot_commands_total")
    sent = done = peak = 0
    progressed = asyncio.Condition()

    async def follow() -> None:
        nonlocal done
        while True:
            done = int(await metric_sum(http, url, "opsbot_commands_total") - base)
            async with progressed:
                progressed.notify_all()
            await asyncio.sleep(0.05)

    def room() -> bool:
        return sent - done < args.backlog

    async def worker() -> None:
        nonlocal sent, peak
        for text in texts:  # the workers share one iterator: ``count`` commands in all
            async with progressed:
                await progressed.wait_for(room)
            sent += 1
            peak = max(peak, sent - done)
            body = slack.slash_body(text, user_id="U0SOAK", response_url=slack.response_url())
            await post_signed(http, url, body, SECRET)

    following = asyncio.create_task(follow())
    try:
        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    finally:
        following.cancel()
    return peak


async def soak(args: argparse.Namespace, bot_command: list[str]) -> list[float]:
    slack = FakeSlack()
    slack.start()
    try:
        async with targets(ok=3, delay=0.01) as urls:
            with tempfile.TemporaryDirectory() as tmp:
                inventory = Path(tmp) / "opsbot.yaml"
                lines = ["roles: {viewer: ['*']}", "services:", "  shop:", "    components:"]
                lines += [f"      c{i}: {{type: http, url: '{u}', timeout: 2}}" for i, u in enumerate(urls["ok"])]
                inventory.write_text("\n".join(lines) + "\n")
                port = free_port()
                env = child_env(
                    SLACK_BOT_TOKEN=TOKEN, SLACK_SIGNING_SECRET=SECRET, OPSBOT_SLACK_API_URL=slack.base_url,
                    OPSBOT_HOST="127.0.0.1", OPSBOT_PORT=str(port), OPSBOT_LOG_LEVEL="WARNING",
                    OPSBOT_CONFIG=str(inventory), OPSBOT_STATE_DIR=tmp,
                )  # fmt: skip
                proc = await asyncio.create_subprocess_exec(
                    sys.executable, *bot_command, env=env, cwd=ROOT,
                    stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
                )  # fmt: skip
                url = f"http://127.0.0.1:{port}"
                try:
                    return await _rounds(url, proc.pid, slack, args)
                finally:
                    proc.terminate()
                    await proc.wait()
    finally:
        slack.stop()


async def _rounds(url: str, pid: int, slack: FakeSlack, args: argparse.Namespace) -> list[float]:
    mix = tuple(args.mix.split(",")) if args.mix else MIX
    # Slack's own requests may each come on a new connection: --new-connections does the same.
    connector = aiohttp.TCPConnector(limit=args.concurrency * 2, force_close=args.new_connections)
    async with aiohttp.ClientSession(connector=connector) as http:
        await wait_ready(http, url)
        sent = 0
        print(f"soak: {args.rounds} rounds of {args.per_round} signed commands at {args.concurrency} concurrent")
        extra = "; a new connection per request" if args.new_connections else ""
        print(f"mix: {', '.join(f'/ops {t}' for t in mix)}{extra}")
        print(f"start: RSS {rss_mb(pid):6.1f} MB")
        sizes: list[float] = []
        freed_before = await metric_sum(http, url, "python_gc_objects_collected_total")
        for number in range(1, args.rounds + 1):
            slack.reset()  # the fake keeps every call; its memory is not the bot's, but keep it small
            started = time.perf_counter()
            peak = await round_of(http, url, slack, args.per_round, args, mix)
            sent += args.per_round
            await settle(http, url, slack, args.per_round)
            elapsed = time.perf_counter() - started
            await asyncio.sleep(args.settle)  # let the bot's last replies and timers finish
            size = rss_mb(pid)
            freed = await metric_sum(http, url, "python_gc_objects_collected_total")
            growth = f"{size - sizes[0]:+6.1f} MB since round 1" if sizes else ""
            print(
                f"round {number:2d}: RSS {size:6.1f} MB  {growth:<24}  {args.per_round / elapsed:5.0f} commands/s  "
                f"gc freed {freed - freed_before:7.0f} objects  backlog <= {peak}"
            )
            freed_before = freed
            sizes.append(size)
            slack.take_refusals()
        if len(sizes) > 1:
            growth = sizes[-1] - sizes[0]
            commands = args.per_round * (len(sizes) - 1)
            verdict = "meets" if growth < TARGET_MB else "MISSES"
            print(
                f"growth after round 1: {growth:+.1f} MB over {commands} commands "
                f"({verdict} target: < {TARGET_MB:g} MB over 30,000)"
            )
        return sizes


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--per-round", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--backlog", type=int, default=64, help="most commands acked but not finished at once")
    parser.add_argument("--settle", type=float, default=1.0, help="seconds to wait after a round before reading RSS")
    parser.add_argument("--new-connections", action="store_true", help="one TCP connection per request")
    parser.add_argument("--mix", default="", help="comma-separated /ops texts (default: help, unknown, health, bad)")
    args = parser.parse_args()
    await soak(args, ["-m", "bot.cli", "serve"])


if __name__ == "__main__":
    asyncio.run(main())
