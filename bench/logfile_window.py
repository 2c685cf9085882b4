"""The logfile backend on a 2 GB JSON log covering 30 days (made once in a temp dir, then reused).

1. `/ops logs … --errors --since 1h` as the command reads it (the shown page, then the summary's pages):
   wall time, bytes read and their share of the file (targets: < 1 s, < 1 %), and the peak RSS it added.
2. `--since 7d`, every line streamed newest first through the pages: MB/s.

    uv run python -m bench.logfile_window [--size-gb 2] [--dir /tmp/opsbot-bench-logfile]
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

from services.inventory import LogfileComponent
from services.logs.base import LogQuery
from services.logs.logfile import read_logfile

DAYS = 30
END = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)  # the log's last line; "now" for the queries
MESSAGES = (
    "GET /api/products/{n} 200 in {m} ms",
    "POST /api/cart/{n}/items 201 in {m} ms",
    "agent step {n} finished, {m} tokens",
    "cache miss for product {n} ({m} ms)",
)
ERRORS = ("llm call failed after {m} ms: upstream 502 for request {n}", "sqlite busy on order {n}, retry {m}")


def generate(path: Path, size: int) -> None:
    """A JSON-lines log of ``size`` bytes, evenly spread over 30 days up to END; 1 line in 50 an error."""
    line_len = 192  # about the average of the lines below
    lines = size // line_len
    step = DAYS * 86400 / lines
    start = END - timedelta(days=DAYS)
    tmp = path.with_suffix(".part")
    with tmp.open("w", buffering=8 * 1024 * 1024) as out:
        batch: list[str] = []
        second = -1
        stamp = ""
        for i in range(lines):
            offset = int(i * step)
            if offset != second:
                second = offset
                stamp = (start + timedelta(seconds=offset)).strftime("%Y-%m-%dT%H:%M:%S+00:00")
            if i % 50 == 0:
                level, text = "error", ERRORS[i % 2].format(n=i, m=i % 997)
            else:
                level, text = "info", MESSAGES[i % 4].format(n=i % 100_000, m=i % 313)
            batch.append(
                f'{{"timestamp": "{stamp}", "level": "{level}", "logger": "ecommerce.api", '
                f'"message": "{text}", "request_id": "{i:016x}", "path": "/srv/app"}}\n'
            )
            if len(batch) >= 100_000:
                out.write("".join(batch))
                batch.clear()
        out.write("".join(batch))
    tmp.rename(path)
    os.utime(path, (END.timestamp(), END.timestamp()))


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def command_read(spec: LogfileComponent, query: LogQuery, *, budget: float) -> tuple[float, int, int, int]:
    """What `/ops logs` reads: the page, then up to 5 summary pages of 1,000 lines; (seconds, bytes,
    lines matched, lines scanned)."""
    started = time.perf_counter()
    deadline = time.monotonic() + budget
    page, stats = read_logfile(spec, query, deadline=deadline)
    total, matched, scanned = stats.bytes_read, len(page.lines), page.scanned
    cursor, pages = page.cursor, 0
    while cursor is not None and pages < 5:
        more, stats = read_logfile(spec, replace(query, cursor=cursor, limit=1000), deadline=deadline)
        total += stats.bytes_read
        matched += len(more.lines)
        scanned += more.scanned
        cursor, pages = more.cursor, pages + 1
    return time.perf_counter() - started, total, matched, scanned


def stream(spec: LogfileComponent, query: LogQuery) -> tuple[float, int, int]:
    """Every line of the window, page after page; (seconds, bytes, lines)."""
    started = time.perf_counter()
    cursor, total, lines = None, 0, 0
    while True:
        page, stats = read_logfile(spec, replace(query, cursor=cursor, limit=1000), deadline=time.monotonic() + 600)
        total += stats.bytes_read
        lines += len(page.lines)
        cursor = page.cursor
        if cursor is None:
            return time.perf_counter() - started, total, lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size-gb", type=float, default=2.0)
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "opsbot-bench-logfile")
    parser.add_argument("--generate-only", action="store_true")
    parser.add_argument("--skip-7d", action="store_true")
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    path = args.dir / "app.log"
    size = int(args.size_gb * 1024**3)
    if args.generate_only:
        generate(path, size)
        return
    if not path.exists() or abs(path.stat().st_size - size) > size * 0.05:
        print(f"generating {args.size_gb:g} GB of JSON log in {path} (once; reused after) …", flush=True)
        started = time.perf_counter()
        # In a child, so that this process's peak RSS is the reader's alone.
        subprocess.run(
            [sys.executable, "-m", "bench.logfile_window", "--generate-only", "--size-gb", str(args.size_gb),
             "--dir", str(args.dir)],
            check=True,
        )  # fmt: skip
        print(f"  generated in {time.perf_counter() - started:.0f} s")
    size = path.stat().st_size
    spec = LogfileComponent.model_validate({"type": "logfile", "path": str(path)})
    idle = rss_mb()
    print(f"file: {size / 1024**3:.2f} GB over {DAYS} days; bench process RSS before reading: {idle:.0f} MB")

    hour = LogQuery(END - timedelta(hours=1), END + timedelta(seconds=1), errors=True, limit=50)
    for attempt in ("cold", "warm"):
        seconds, read, matched, scanned = command_read(spec, hour, budget=4.6)
        print(
            f"--errors --since 1h ({attempt} cache): {seconds * 1000:.0f} ms, read {read / 1024:,.0f} KB = "
            f"{100 * read / size:.3f} % of the file; {matched:,} errors of {scanned:,} lines scanned"
        )
    print(f"peak RSS added by the 1h reads: {rss_mb() - idle:.1f} MB")
    if not args.skip_7d:
        week = LogQuery(END - timedelta(days=7), END + timedelta(seconds=1))
        seconds, read, lines = stream(spec, week)
        print(
            f"--since 7d streamed: {lines:,} lines, {read / 1024**2:,.0f} MB in {seconds:.1f} s = "
            f"{read / 1024**2 / seconds:,.0f} MB/s ({lines / seconds:,.0f} lines/s)"
        )
        week_errors = replace(week, errors=True)
        seconds, read, lines = stream(spec, week_errors)
        print(
            f"--errors --since 7d streamed: {lines:,} lines, {read / 1024**2:,.0f} MB in {seconds:.1f} s = "
            f"{read / 1024**2 / seconds:,.0f} MB/s"
        )
        print(f"peak RSS added overall: {rss_mb() - idle:.1f} MB")


if __name__ == "__main__":
    main()
