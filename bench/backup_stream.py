"""Does `/ops backup` stream? Peak memory of the bot and throughput beside a plain pg_dump | gzip.

Starts a throwaway PostgreSQL cluster, fills databases of the given sizes (default 256 MB and
1.1 GB of table data), then for each size runs, in turn:

- the baseline: ``pg_dump -Fc <db> | gzip > file`` (shell pipeline, as the runbooks do it);
- the bot as cron runs it: ``opsbot run "backup bench db"`` with gzip, then with zstd (the default).

For each run it prints the wall time, the throughput (database size on disk / seconds) and the
output size; for the bot also its peak RSS (ru_maxrss of the bot process itself, from wait4 — the
pg_dump child is a separate process) and the dump time the manifest records (without the ~3 s the
bot takes to start). Targets: peak RSS under 150 MB and flat across sizes; throughput >= 0.8x the
baseline's.

    uv run python -m bench.backup_stream [--sizes-mb 256,1100]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import asyncpg

from bench.common import ROOT, child_env
from tests.fixtures.servers import PG_BIN, PostgresServer, postgres_cluster

ROW_BYTES = 230  # about what one row of the table below takes on disk


async def fill(server: PostgresServer, size_mb: int) -> tuple[str, int]:
    """A database with about ``size_mb`` MB of table data; its DSN and its size on disk."""
    name = await server.create_database()
    dsn = server.dsn(name)
    rows = size_mb * 1024 * 1024 // ROW_BYTES
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        await conn.execute("CREATE TABLE events (id bigint, kind int, at timestamptz, body text)")
        step = 500_000
        for start in range(0, rows, step):
            await conn.execute(
                "INSERT INTO events SELECT n, n % 17, now() - n * interval '1 second',"
                " md5(n::text) || ' ' || md5((n * 31)::text) || ' ' || repeat(chr(65 + (n % 26)::int), 60)"
                " || ' ' || md5((n * 7)::text) FROM generate_series($1::bigint, $2::bigint) n",
                start + 1,
                min(rows, start + step),
            )
        await conn.execute("VACUUM ANALYZE events")
        size = int(await conn.fetchval("SELECT pg_database_size(current_database())"))
    finally:
        await conn.close()
    return dsn, size


def baseline(dsn: str, out: Path) -> float:
    pg_dump = shutil.which("pg_dump", path=str(PG_BIN)) or "pg_dump"
    started = time.perf_counter()
    subprocess.run(f"'{pg_dump}' -Fc '{dsn}' | gzip > '{out}'", shell=True, check=True)  # noqa: S602
    return time.perf_counter() - started


def run_bot(dsn: str, root: Path, codec: str) -> tuple[float, int, dict[str, object]]:
    """Wall seconds, peak RSS in bytes, and the manifest of one `opsbot run "backup bench db"`."""
    inventory = root / f"inventory-{codec}.yaml"
    backups = root / f"backups-{codec}"
    inventory.write_text(
        f"""
backups:
  destinations: {{local: {{type: directory, path: "{backups}"}}}}
  compression: {codec}
  pg_bin: "{PG_BIN}"
services:
  bench:
    components:
      db: {{type: postgres, dsn: "{dsn}", timeout: 10}}
"""
    )
    env = child_env(OPSBOT_CONFIG=str(inventory), OPSBOT_STATE_DIR=str(root / f"state-{codec}"))
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "bot.cli", "run", "backup bench db"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode() if proc.stderr else ""
    if proc.returncode != 0:
        raise SystemExit(f"opsbot run failed ({proc.returncode}):\n{err[-3000:]}")
    [manifest_file] = backups.rglob("*.manifest.json")
    manifest = json.loads(manifest_file.read_text())
    shutil.rmtree(backups)
    return wall, usage.ru_maxrss * 1024, manifest


def mb(n: float) -> str:
    return f"{n / 1024 / 1024:,.1f} MB"


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes-mb", default="256,1100")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes_mb.split(",")]
    print(f"backup_stream: databases of {sizes} MB of table data; cpu count {os.cpu_count()}")
    with postgres_cluster() as server, tempfile.TemporaryDirectory(prefix="opsbot-bench-") as tmp:
        root = Path(tmp)
        for size_mb in sizes:
            started = time.perf_counter()
            dsn, on_disk = await fill(server, size_mb)
            print(f"\n== database {mb(on_disk)} on disk (filled in {time.perf_counter() - started:.0f} s)")
            out = root / "baseline.dump.gz"
            base = baseline(dsn, out)
            print(f"pg_dump -Fc | gzip          {base:7.1f} s  {mb(on_disk / base)}/s  output {mb(out.stat().st_size)}")
            out.unlink()
            for codec in ("gzip", "zstd"):
                wall, rss, manifest = run_bot(dsn, root, codec)
                dump = float(manifest["duration_seconds"])  # type: ignore[arg-type]
                print(
                    f"opsbot run backup ({codec:4})   {wall:7.1f} s  {mb(on_disk / wall)}/s  output "
                    f"{mb(int(manifest['size']))}  (dump {dump:.1f} s, {mb(on_disk / dump)}/s)  "  # type: ignore[call-overload]
                    f"peak RSS {mb(rss)}  ratio {base / wall:.2f}x wall, {base / dump:.2f}x dump"
                )
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
