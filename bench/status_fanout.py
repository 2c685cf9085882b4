"""How long does one `/ops status all` take over 50 components of mixed types with one hung?

30 http components with /metrics (sample apps in other processes answering in 100, 200 or 300 ms),
8 host components (real disk, memory and a small directory walk), 5 compose projects (the tests'
fake docker, a Python script per call: ps, stats, inspect, df), 6 tls endpoints (a loopback TLS
server), and one http component that hangs with a 2 s timeout. Prints the total of one
`/ops status all` through the real router beside the slowest answering component.
Target: total <= the slowest timeout (2 s) + 0.3 s.

    uv run python -m bench.status_fanout [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography.hazmat.primitives.serialization import Encoding

from bench.common import targets
from bot.logging import configure_logging
from handlers.commands import load_registry
from handlers.context import Deps
from handlers.router import Router
from services.access import RoleResolver
from services.approvals import ApprovalEngine
from services.health import targets_for
from services.inventory import parse_inventory
from services.locks import LocalLocks
from services.redaction import Redactor
from services.state import open_state_store
from services.status import FigureDeps, build_figure_sources, collect_status
from tests.fixtures.fake_docker import FakeDocker
from tests.fixtures.tls import SERVER_NAME, TlsServer, make_ca, make_leaf

HANG_TIMEOUT = 2.0


def inventory_text(http: list[str], hung: str, tmp: Path, docker: FakeDocker, tls_port: int, ca: Path) -> str:
    lines = ["roles: {viewer: ['*']}", "health: {deadline: 30}", "services:"]
    for i, url in enumerate(http):
        if i % 10 == 0:
            lines += [f"  web{i // 10}:", "    components:"]
        lines.append(f"      app{i}: {{type: http, url: '{url}', metrics: /metrics, timeout: 5}}")
    lines += ["  hosts:", "    components:"]
    for i in range(8):
        d = tmp / f"dir{i}"
        d.mkdir()
        for f in range(200):
            (d / f"f{f}").write_bytes(b"x")
        lines.append(f"      box{i}: {{type: host, mounts: ['{tmp}'], directories: ['{d}'], timeout: 5}}")
    lines += ["  stacks:", "    components:"]
    for i in range(5):
        project = tmp / f"stack{i}"
        project.mkdir()
        lines.append(
            f"      stack{i}: {{type: compose, project_dir: '{project}', docker: '{docker.path}', timeout: 5,"
            " disks: [{service: web, path: /data}]}"
        )
    lines += ["  certs:", "    components:"]
    for i in range(6):
        lines.append(
            f"      cert{i}: {{type: tls, host: 127.0.0.1, port: {tls_port}, server_name: {SERVER_NAME},"
            f" ca_file: '{ca}', timeout: 5}}"
        )
    lines += ["  stuck:", "    components:", f"      hung: {{type: http, url: '{hung}', metrics: /metrics,"
              f" timeout: {HANG_TIMEOUT}}}"]  # fmt: skip
    return "\n".join(lines) + "\n"


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    configure_logging("console", "WARNING", Redactor())
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        docker = FakeDocker(tmp / "docker-fake")
        docker.set_df("web", "/data", used_kb=700, available_kb=300)
        ca = make_ca("bench CA")
        now = datetime.now(UTC)
        cert, key = make_leaf(ca, not_before=now - timedelta(days=1), not_after=now + timedelta(days=90))
        (tmp / "ca.pem").write_bytes(ca.cert.public_bytes(Encoding.PEM))
        server = TlsServer(cert, key, tmp, "bench")
        port = await server.start()
        async with contextlib.AsyncExitStack() as stack:
            urls: list[str] = []
            hung = ""
            for delay in (0.1, 0.2, 0.3):
                found = await stack.enter_async_context(targets(ok=10, hung=1 if delay == 0.1 else 0, delay=delay))
                urls += found["ok"]
                hung = hung or found["hung"][0]
            loaded = parse_inventory(inventory_text(urls, hung, tmp, docker, port, tmp / "ca.pem"), "bench", env={})
            every = targets_for(loaded.inventory, "all")
            kinds = sorted({t.type for t in every})
            print(f"status fan-out: {len(every)} components ({', '.join(kinds)}), 1 hung ({HANG_TIMEOUT:g} s timeout)")
            store = await open_state_store(None, default_path=tmp / "state.sqlite3")
            stack.push_async_callback(store.close)
            redactor = Redactor()
            roles = RoleResolver(loaded.inventory.roles)
            deps = Deps(
                loaded=loaded, store=store, probes={}, redactor=redactor, roles=roles,
                approvals=ApprovalEngine(store, LocalLocks(), roles, loaded.inventory.approvals, redactor),
            )  # fmt: skip
            router = Router(load_registry())
            for run in range(args.runs):
                started = time.perf_counter()
                reply = await router.dispatch(user_id="U0BENCH", channel_id="bench", text="status all", deps=deps)
                total = time.perf_counter() - started
                # Once more, to read each component's own time.
                report = await collect_status(
                    every, build_figure_sources(FigureDeps(), types=kinds), timedelta(hours=1), deadline=30,
                    redactor=redactor,
                )  # fmt: skip
                slowest: dict[str, float] = {}
                for item in report.items:
                    if item.target.component != "hung":
                        slowest[item.target.type] = max(slowest.get(item.target.type, 0.0), item.elapsed_ms)
                cut = next(i for i in report.items if i.target.component == "hung")
                verdict = "meets" if total <= HANG_TIMEOUT + 0.3 else "MISSES"
                per_type = ", ".join(f"{k} {v:.0f} ms" for k, v in sorted(slowest.items()))
                print(
                    f"run {run + 1}: /ops status all took {total * 1000:7.1f} ms "
                    f"({reply.status.label if reply.status else '?'}); slowest answering per type: {per_type}; "
                    f"hung: {cut.problem!r} at {cut.elapsed_ms:.0f} ms ({verdict} target: total <= "
                    f"{HANG_TIMEOUT + 0.3:.1f} s)"
                )
        await server.close()


if __name__ == "__main__":
    asyncio.run(main())
