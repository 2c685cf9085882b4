"""Helpers shared by the benchmarks: child processes, targets, percentiles."""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp

from tests.fixtures.slack import sign

ROOT = Path(__file__).resolve().parents[1]


@asynccontextmanager
async def targets(ok: int = 0, hung: int = 0, delay: float = 0.1) -> AsyncIterator[dict[str, list[str]]]:
    """Start bench/targets.py in its own process and yield its URLs."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.targets", "--ok", str(ok), "--hung", str(hung), "--delay", str(delay),
        stdout=asyncio.subprocess.PIPE, cwd=ROOT,
    )  # fmt: skip
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 60)
    try:
        yield json.loads(line)
    finally:
        proc.kill()
        await proc.wait()


def percentile(values: list[float], q: float) -> float:
    """q in [0, 100], nearest-rank on sorted values."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[index]


def summary(name: str, seconds: list[float]) -> str:
    ms = [s * 1000 for s in seconds]
    return (
        f"{name:<28} n={len(ms):<4} p50={percentile(ms, 50):7.1f} ms  p99={percentile(ms, 99):7.1f} ms  "
        f"max={max(ms):7.1f} ms  mean={statistics.fmean(ms):7.1f} ms"
    )


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLACK_", "OPSBOT_"))}
    env.update(extra)
    return env


async def post_signed(http: aiohttp.ClientSession, url: str, body: str, secret: str) -> float:
    """Send one Slack-signed request to ``url``/slack/events; the seconds until its HTTP 200."""
    headers = {"Content-Type": "application/x-www-form-urlencoded", **sign(secret, body)}
    started = time.perf_counter()
    async with http.post(url + "/slack/events", data=body, headers=headers) as resp:
        await resp.read()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status} from {url}")
    return time.perf_counter() - started
