"""Probe targets for the benchmarks, in their own process: N sample apps answering after a delay,
and M that hang. Prints one JSON line {"ok": [...urls], "hung": [...urls]} and serves until killed."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from bot.sample_app import SampleAppState, start_sample_app


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ok", type=int, default=0, help="apps that answer after --delay seconds")
    parser.add_argument("--delay", type=float, default=0.1)
    parser.add_argument("--hung", type=int, default=0, help="apps that never answer")
    args = parser.parse_args()
    runners = []
    ok, hung = [], []
    for _ in range(args.ok):
        runner, url = await start_sample_app(SampleAppState(delay=args.delay))
        runners.append(runner)
        ok.append(url)
    for _ in range(args.hung):
        runner, url = await start_sample_app(SampleAppState(hang=True))
        runners.append(runner)
        hung.append(url)
    sys.stdout.write(json.dumps({"ok": ok, "hung": hung}) + "\n")
    sys.stdout.flush()
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main())
