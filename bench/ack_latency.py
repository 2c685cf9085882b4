"""How fast does opsbot ack a slash command while its probes hang, against a bare Bolt app?

Bursts of concurrent signed `/ops health all` requests over HTTP against `opsbot serve` (a real
process) whose inventory has 20 components that never answer, and the same bursts against a bare
Bolt app whose handler only acks (the floor), interleaved: each round is a block of bursts on
one side and then on the other (the order alternating), and a block on opsbot ends once the bot
has finished its commands, so every block starts with its server at rest. Within a block the
bursts come 0.2 s apart: the work one burst starts competes with the next burst's acks.

The client is a process of its own, pinned to a core of its own where the machine has two or more
(the servers, the fake Slack and the targets share the others): plain sockets and one selector,
requests signed before their burst, time to the last byte of each HTTP 200.

Prints the pooled p50/p99 of each side, each round's p99 ratio, and their median.
Target: opsbot's pooled p99 under 100 ms and at most 1.3x the floor.

    uv run python -m bench.ack_latency [--rounds 10] [--bursts 5] [--concurrency 50]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from bench.common import ROOT, child_env, percentile, summary, targets
from tests.fixtures.servers import free_port
from tests.fixtures.slack import FakeSlack

SECRET = "bench-signing-secret"
TOKEN = "xoxb-bench-token"
TARGET_P99_MS = 100.0
TARGET_RATIO = 1.3


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


def cores() -> tuple[set[int] | None, int | None]:
    """The cores for everything but the client, and the client's own core (None: no pinning)."""
    available = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if len(available) < 2:
        return None, None
    return set(available[:-1]), available[-1]


async def start(module: list[str], env: dict[str, str]) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, *module, env=env, cwd=ROOT,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip


async def run_client(plan: dict[str, object]) -> list[dict[str, list[float]]]:
    client = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench._ack_client", cwd=ROOT,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, _ = await client.communicate(json.dumps(plan).encode())
    if client.returncode != 0:
        raise RuntimeError(f"the load client failed (exit {client.returncode})")
    rounds: list[dict[str, list[float]]] = json.loads(out)["rounds"]
    return rounds


def report(args: argparse.Namespace, rounds: list[dict[str, list[float]]], pinned: bool) -> None:
    bot = [s for r in rounds for s in r["opsbot"]]
    floor = [s for r in rounds for s in r["floor"]]
    ratios = [percentile(r["opsbot"], 99) / percentile(r["floor"], 99) for r in rounds]
    print(f"ack latency: {args.rounds} interleaved rounds of {args.bursts} bursts x {args.concurrency} concurrent "
          f"signed `/ops health all` a side,")  # fmt: skip
    print(
        f"opsbot probing {args.hung} components that never answer (5 s timeout each); "
        + ("client pinned to its own core" if pinned else "client NOT pinned (fewer than 2 cores)")
    )
    for number, (r, ratio) in enumerate(zip(rounds, ratios, strict=True), start=1):
        print(f"  round {number:2d}: opsbot p50 {percentile(r['opsbot'], 50) * 1000:6.1f} p99 "
              f"{percentile(r['opsbot'], 99) * 1000:6.1f} ms | floor p50 {percentile(r['floor'], 50) * 1000:6.1f} "
              f"p99 {percentile(r['floor'], 99) * 1000:6.1f} ms | p99 ratio {ratio:4.2f}")  # fmt: skip
    print(summary("bare Bolt app (floor)", floor))
    print(summary("opsbot serve", bot))
    pooled = percentile(bot, 99) / percentile(floor, 99)
    median = statistics.median(ratios)
    p99_ms = percentile(bot, 99) * 1000
    verdict = "meets" if p99_ms < TARGET_P99_MS and pooled <= TARGET_RATIO and median <= TARGET_RATIO else "MISSES"
    print(f"p99 ratio opsbot/floor: pooled {pooled:.2f}, median of rounds {median:.2f} "
          f"(rounds {min(ratios):.2f}-{max(ratios):.2f})")  # fmt: skip
    print(f"{verdict} target: pooled p99 < {TARGET_P99_MS:g} ms and <= {TARGET_RATIO:g}x the floor")


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--bursts", type=int, default=5, help="bursts per side in each round")
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--pause", type=float, default=0.2, help="seconds between bursts")
    parser.add_argument("--hung", type=int, default=20)
    args = parser.parse_args()
    servers_cores, client_core = cores()
    if servers_cores is not None:
        os.sched_setaffinity(0, servers_cores)  # inherited by the fake Slack, the targets and the servers
    slack = FakeSlack()
    slack.start()
    procs: list[asyncio.subprocess.Process] = []
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
                procs.append(await start(["-m", "bench._bare_bolt"], child_env(**common, OPSBOT_PORT=str(floor_port))))
                bot_env = child_env(
                    **common, OPSBOT_PORT=str(bot_port), OPSBOT_CONFIG=str(inventory), OPSBOT_STATE_DIR=tmp
                )
                procs.append(await start(["-m", "bot.cli", "serve"], bot_env))
                async with aiohttp.ClientSession() as http:
                    await wait_ready(http, f"http://127.0.0.1:{floor_port}", "/")
                    await wait_ready(http, f"http://127.0.0.1:{bot_port}", "/ready")
                plan = {
                    "ports": {"opsbot": bot_port, "floor": floor_port},
                    "rounds": args.rounds, "bursts": args.bursts, "concurrency": args.concurrency,
                    "pause": args.pause, "text": "health all", "secret": SECRET,
                    "response_url": slack.response_url(), "core": client_core,
                }  # fmt: skip
                rounds = await run_client(plan)
        report(args, rounds, client_core is not None)
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.terminate()
                await proc.wait()
        slack.stop()


if __name__ == "__main__":
    asyncio.run(main())
