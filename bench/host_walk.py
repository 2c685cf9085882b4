"""How long does the `host` directory-size walk take over 200,000 files, and does it stop at its deadline?

Makes a tree of N empty files (in 200-file directories) in a temp dir, then walks it three ways:
whole (no deadline), with a deadline of 0.2 s, and with an entry cap, each as `/ops status` runs it
(in a thread). Prints the time of each and what the walk said.

    uv run python -m bench.host_walk [--files 200000] [--deadline 0.2]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from services.figures.base import Window
from services.figures.host import HostFigures, walk_size
from services.inventory import HostComponent


def make_tree(root: Path, files: int, per_dir: int = 200) -> None:
    for d in range(-(-files // per_dir)):
        sub = root / f"d{d:05d}"
        sub.mkdir()
        for f in range(min(per_dir, files - d * per_dir)):
            os.close(os.open(sub / f"f{f}", os.O_CREAT | os.O_WRONLY, 0o644))


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", type=int, default=200_000)
    parser.add_argument("--deadline", type=float, default=0.2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "uploads"
        root.mkdir()
        started = time.perf_counter()
        make_tree(root, args.files)
        print(f"host walk: made {args.files:,} files in {time.perf_counter() - started:.1f} s")
        for label, deadline, cap in (
            ("whole walk", float("inf"), 100_000_000),
            (f"deadline {args.deadline:g} s", args.deadline, 100_000_000),
            ("cap 50,000 entries", float("inf"), 50_000),
        ):
            began = time.monotonic()
            found = await asyncio.to_thread(walk_size, root, deadline=began + deadline, max_entries=cap)
            took = time.monotonic() - began
            verdict = "complete" if found.complete else f"stopped ({found.stopped})"
            late = f", {(took - deadline) * 1000:+.0f} ms past the deadline" if deadline != float("inf") else ""
            print(f"{label:>20}: {took * 1000:8.1f} ms, {found.entries:>9,} entries, {verdict}{late}")
        spec = HostComponent(type="host", mounts=[root], directories=[root], walk_seconds=args.deadline, timeout=5)  # type: ignore[call-arg]
        began = time.monotonic()
        figures = await HostFigures().measure(spec, Window(datetime.now(UTC), timedelta(hours=1)), timeout=5)
        took = time.monotonic() - began
        size = next(f for f in figures if f.name == "dir_bytes")
        print(f"{'as /ops status':>20}: {took * 1000:8.1f} ms, says: {size.note}")


if __name__ == "__main__":
    asyncio.run(main())
