"""How long does one `/ops health all` take with 200 components and one hung target?

200 HTTP components each answering in 100 ms (served by another process) plus one that hangs
with a 2 s timeout. Prints the total time of one `/ops health all` through the real router
beside the slowest single probe. Target: total <= timeout + 0.3 s.

    uv run python -m bench.health_fanout [--components 200] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from bench.common import targets
from bot.container import build_container
from bot.logging import configure_logging
from bot.settings import Settings
from handlers.health import targets_for
from services.health import check_health
from services.inventory import parse_inventory
from services.redaction import Redactor

HANG_TIMEOUT = 2.0


def inventory_text(ok: list[str], hung: str) -> str:
    lines = ["roles: {viewer: ['*']}", "health: {deadline: 30}", "services:"]
    for i, url in enumerate(ok):
        if i % 20 == 0:
            lines += [f"  svc{i // 20}:", "    components:"]
        lines.append(f"      app{i}: {{type: http, url: '{url}', timeout: 5}}")
    lines += ["  stuck:", "    components:", f"      hung: {{type: http, url: '{hung}', timeout: {HANG_TIMEOUT}}}"]
    return "\n".join(lines) + "\n"


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--components", type=int, default=200)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    configure_logging("console", "WARNING", Redactor())
    async with targets(ok=args.components, hung=1, delay=0.1) as urls:
        loaded = parse_inventory(inventory_text(urls["ok"], urls["hung"][0]), "bench", env={})
        every_target = targets_for(loaded.inventory, "all")
        print(f"health fan-out: {args.components} components answering in 100 ms, 1 hung ({HANG_TIMEOUT:g} s timeout)")
        with tempfile.TemporaryDirectory() as tmp:
            settings = Settings(OPSBOT_STATE_DIR=Path(tmp))  # type: ignore[call-arg]
            async with build_container(settings, inventory=loaded) as container:
                for run in range(args.runs):
                    started = time.perf_counter()
                    reply = await container.router.dispatch(
                        user_id="U0BENCH", channel_id="bench", text="health all", deps=container.deps
                    )
                    total = time.perf_counter() - started
                    # The same fan-out once more, to read each probe's own latency.
                    report = await check_health(
                        every_target, container.deps.probe_for, deadline=30, redactor=container.redactor
                    )
                    answered = max(i.result.latency_ms for i in report.items if i.target.component != "hung")
                    cut = max(i.result.latency_ms for i in report.items)
                    verdict = "meets" if total <= HANG_TIMEOUT + 0.3 else "MISSES"
                    status = reply.status.label if reply.status else "?"
                    print(
                        f"run {run + 1}: /ops health all took {total * 1000:7.1f} ms ({status}); slowest answering "
                        f"probe {answered:6.1f} ms; hung probe cut at {cut:6.1f} ms "
                        f"({verdict} target: total <= {HANG_TIMEOUT + 0.3:.1f} s)"
                    )


if __name__ == "__main__":
    asyncio.run(main())
