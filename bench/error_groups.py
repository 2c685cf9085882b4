"""Error grouping: 1,000,000 error lines of 50 distinct shapes (numbers, ids, hex, timestamps, IPs and quoted
values varying in every line): lines/s, memory added, and every shape found exactly once.

    uv run python -m bench.error_groups [--lines 1000000]
"""

from __future__ import annotations

import argparse
import random
import resource
import time
import tracemalloc
from datetime import UTC, datetime, timedelta

from services.logs.base import LogLine
from services.logs.groups import ErrorGroups

VERBS = ("failed", "timed out", "was refused", "crashed", "stalled", "was rejected", "overflowed", "hung", "retried",
         "was dropped")  # fmt: skip
NOUNS = ("payment", "checkout", "index build", "llm call", "order sync")
TEMPLATES = (
    "{noun} {verb} for user {n} after {ms} ms",
    "{noun} {verb}: job {hex} at {ts} from {ip}",
    "{noun} {verb} on key '{q}' (request {uuid})",
    '{noun} {verb} with status {n} in shard "{q}"',
    "{noun} {verb}; pointer 0x{hex} retry {n}",
)


def shapes() -> list[str]:
    """50 shapes: 10 verbs x 5 nouns, each with one of the templates."""
    return [TEMPLATES[(i + j) % len(TEMPLATES)].replace("{noun}", noun).replace("{verb}", verb)
            for i, verb in enumerate(VERBS) for j, noun in enumerate(NOUNS)]  # fmt: skip


def lines(count: int, seed: int = 7) -> list[LogLine]:
    rng = random.Random(seed)
    all_shapes = shapes()
    start = datetime(2026, 12, 1, tzinfo=UTC)
    out: list[LogLine] = []
    for i in range(count):
        template = all_shapes[i % len(all_shapes)]
        text = template.format(
            n=rng.randrange(10**6), ms=rng.randrange(10**5), hex=f"{rng.getrandbits(40):010x}",
            ts=(start + timedelta(seconds=i)).isoformat(), ip=f"10.{i % 256}.{(i >> 8) % 256}.{rng.randrange(256)}",
            q=f"k{rng.randrange(10**6)}", uuid=f"{rng.getrandbits(128):032x}",
        )  # fmt: skip
        uuid = text.split("request ")[-1].rstrip(")") if "request " in text else ""
        if len(uuid) == 32:  # as a real uuid, with dashes
            text = text.replace(uuid, f"{uuid[:8]}-{uuid[8:12]}-{uuid[12:16]}-{uuid[16:20]}-{uuid[20:]}")
        out.append(LogLine(start + timedelta(seconds=i), "error", text))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lines", type=int, default=1_000_000)
    args = parser.parse_args()
    print(f"making {args.lines:,} lines of {len(shapes())} shapes …", flush=True)
    made = lines(args.lines)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    groups = ErrorGroups()
    started = time.perf_counter()
    groups.extend(made)
    seconds = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"grouped {args.lines:,} lines in {seconds:.2f} s = {args.lines / seconds:,.0f} lines/s")
    print(f"peak RSS added while grouping: {after - before:.1f} MB")
    tracemalloc.start()
    sample = ErrorGroups()
    sample.extend(made[:100_000])
    current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(f"memory held by the groups (100,000 lines, tracemalloc): {current / 1024:.0f} KB, peak {peak / 1024:.0f} KB")
    found = groups.top(1000)
    counts = {g.count for g in found}
    ok = len(found) == len(shapes()) and counts == {args.lines // len(shapes())} and groups.other == 0
    print(f"groups found: {len(found)} (expected {len(shapes())}); counts per group: {sorted(counts)}; "
          f"every shape exactly once: {'yes' if ok else 'NO'}")  # fmt: skip
    if not ok:
        for g in found[:60]:
            print(f"  {g.count:>8} {g.key}")
        raise SystemExit(1)


if __name__ == "__main__":
    main()
