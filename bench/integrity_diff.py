"""How long does `/ops integrity` take to compare N chunk ids with N vector ids, and does its memory stay flat?

A throwaway PostgreSQL cluster holds a chunk table of N bigint ids; a Qdrant collection of N points is
served over REST, and 500 orphan vectors (points without a chunk) and 500 missing vectors (chunks without
a point) are planted, scattered through the id range. The bot runs `/ops integrity bench` through the real
router (the console interface) in a child process of its own, with the real AsyncQdrantClient over HTTP
and asyncpg; the child reports its wall time and peak RSS (ru_maxrss).

The Qdrant side is NOT qdrant-client's local mode (it is not built for a million points): it is a lean
loopback REST server (another process) that answers `GET /collections/{name}` and
`POST /collections/{name}/points/scroll` in Qdrant's response format, paging the ids in id order from a
description in memory (a range and the 500 planted gaps). What is measured is the bot's side: scrolling,
parsing the pages with the client's models, the server-side cursor, and the merge.

    uv run python -m bench.integrity_diff [--sizes 100000 1000000 10000000] [--page 5000]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncpg

from bench.common import ROOT, child_env
from tests.fixtures.servers import free_port, postgres_cluster, wait_for_port

PLANTED = 500
COLLECTION = "chunks_bench"


def planted(n: int) -> tuple[list[int], list[int]]:
    """(orphans, missing): ids scattered through 1 .. n + PLANTED, disjoint."""
    step = (n + PLANTED) // PLANTED
    return [k * step + 3 for k in range(PLANTED)], [k * step + 7 for k in range(PLANTED)]


# -- the lean Qdrant REST server (its own process) ------------------------------------------------------


async def serve_qdrant(n: int, port: int) -> None:
    from aiohttp import web
    from qdrant_client import AsyncQdrantClient, models

    _, missing = planted(n)
    gaps = set(missing)  # ids Qdrant does not have; every other id in 1 .. n + PLANTED it has
    last = n + PLANTED
    local = AsyncQdrantClient(location=":memory:")
    await local.create_collection(COLLECTION, vectors_config=models.VectorParams(size=4, distance=models.Distance.DOT))
    info: dict[str, Any] = (await local.get_collection(COLLECTION)).model_dump(mode="json", exclude_none=True)
    info.update(status="green", points_count=n, indexed_vectors_count=n)

    async def collection(request: web.Request) -> web.Response:
        return web.json_response({"result": info, "status": "ok", "time": 0.0})

    async def scroll(request: web.Request) -> web.Response:
        body = await request.json()
        start = int(body.get("offset") or 1)
        limit = int(body.get("limit") or 10)
        ids: list[str] = []
        k = start
        while len(ids) < limit and k <= last:
            if k not in gaps:
                ids.append(f'{{"id":{k},"payload":null,"vector":null}}')
            k += 1
        while k <= last and k in gaps:
            k += 1
        next_offset = str(k) if k <= last else "null"
        text = f'{{"result":{{"points":[{",".join(ids)}],"next_page_offset":{next_offset}}},"status":"ok","time":0.0}}'
        return web.Response(text=text, content_type="application/json")

    app = web.Application(client_max_size=1024 * 1024)
    app.router.add_get("/collections/{name}", collection)
    app.router.add_post("/collections/{name}/points/scroll", scroll)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    print("ready", flush=True)
    await asyncio.Event().wait()


# -- the bot (its own process) ------------------------------------------------------------------------


async def run_bot(dsn: str, url: str, page: int, state_dir: str) -> None:
    from bot.console import Console
    from bot.container import build_container
    from bot.logging import configure_logging
    from bot.settings import Settings
    from services.inventory import parse_inventory
    from services.redaction import Redactor

    configure_logging("console", "WARNING", Redactor())
    text = f"""
roles: {{viewer: ["*"]}}
services:
  bench:
    components:
      db: {{type: postgres, dsn: "${{BENCH_DB}}", timeout: 10}}
      vectors: {{type: qdrant, url: "{url}", timeout: 10, collections: [{COLLECTION}]}}
    integrity:
      database: db
      qdrant: vectors
      required_tables: [chunks]
      chunks: [{{table: chunks, collection: {COLLECTION}}}]
      page_size: {page}
"""
    loaded = parse_inventory(text, "bench", {"BENCH_DB": dsn})
    settings = Settings(OPSBOT_STATE_DIR=state_dir, OPSBOT_CONFIG=str(Path(state_dir) / "unused.yaml"))
    async with build_container(settings, redactor=Redactor(loaded.secrets), inventory=loaded) as container:
        console = Console(container, None, out=io.StringIO())
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        started = time.perf_counter()
        reply = await console.execute("integrity bench")
        seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"seconds": seconds, "rss_mb": peak / 1024, "rss_before_mb": before / 1024, "text": reply.text}))


# -- the parent ---------------------------------------------------------------------------------------


async def fill(dsn: str, n: int) -> float:
    orphans, _ = planted(n)
    started = time.perf_counter()
    conn = await asyncpg.connect(dsn, timeout=30)
    try:
        await conn.execute("drop table if exists chunks")
        await conn.execute("create unlogged table chunks (id bigint not null, body text)")
        await conn.execute("insert into chunks (id) select g from generate_series(1, $1::bigint) g", n + PLANTED)
        await conn.execute("delete from chunks where id = any($1::bigint[])", orphans)
        await conn.execute("alter table chunks add primary key (id)")
        await conn.execute("vacuum analyze chunks")
        count = await conn.fetchval("select count(*) from chunks")
    finally:
        await conn.close()
    if count != n:
        raise RuntimeError(f"filled {count} chunks, wanted {n}")
    return time.perf_counter() - started


async def measure(dsn: str, n: int, page: int) -> dict[str, Any]:
    port = free_port()
    server = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.integrity_diff", "--serve-qdrant", str(n), "--port", str(port),
        stdout=asyncio.subprocess.PIPE, cwd=ROOT, env=child_env(),
    )  # fmt: skip
    try:
        assert server.stdout is not None
        await asyncio.wait_for(server.stdout.readline(), 60)
        wait_for_port(port)
        with tempfile.TemporaryDirectory() as state:
            bot = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "bench.integrity_diff", "--bot", dsn, f"http://127.0.0.1:{port}",
                "--page", str(page), "--state", state,
                stdout=asyncio.subprocess.PIPE, cwd=ROOT, env=child_env(),
            )  # fmt: skip
            out, _ = await asyncio.wait_for(bot.communicate(), 1800)
        if bot.returncode != 0:
            raise RuntimeError(f"the bot exited with {bot.returncode}")
        result: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
        return result
    finally:
        server.kill()
        await server.wait()


async def main(args: argparse.Namespace) -> None:
    print(
        "Qdrant side: a lean loopback REST server paging ids in Qdrant's scroll format (not qdrant-client local mode)"
    )
    print(f"planted: {PLANTED} orphan vectors and {PLANTED} missing vectors; page size {args.page}")
    with postgres_cluster() as server:
        dsn = server.dsn(await server.create_database())
        for n in args.sizes:
            took = await fill(dsn, n)
            result = await measure(dsn, n, args.page)
            text = result["text"]
            expected = f"{PLANTED} orphan vectors"
            if expected not in text or f"{PLANTED} missing vectors" not in text:
                raise RuntimeError(f"unexpected result for {n:,} ids:\n{text}")
            rate = n / result["seconds"] / 1e3
            print(
                f"{n:>12,} ids (filled in {took:5.1f} s): /ops integrity {result['seconds']:6.2f} s "
                f"({rate:,.0f} k ids/s a side) · peak RSS {result['rss_mb']:6.1f} MB "
                f"(after start-up {result['rss_before_mb']:.1f} MB) · 500 orphans and 500 missing found"
            )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000, 10_000_000])
    parser.add_argument("--page", type=int, default=5000)
    parser.add_argument("--serve-qdrant", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--bot", nargs=2, metavar=("DSN", "URL"), help=argparse.SUPPRESS)
    parser.add_argument("--state", help=argparse.SUPPRESS)
    parsed = parser.parse_args()
    if parsed.serve_qdrant is not None:
        asyncio.run(serve_qdrant(parsed.serve_qdrant, parsed.port))
    elif parsed.bot is not None:
        asyncio.run(run_bot(parsed.bot[0], parsed.bot[1], parsed.page, parsed.state))
    else:
        asyncio.run(main(parsed))
