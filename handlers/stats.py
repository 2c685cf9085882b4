"""/ops stats <service> [component]: table sizes, collection sizes and counts, Redis memory and keys."""

from __future__ import annotations

import asyncio

from pydantic import Field

from handlers import blocks as bk
from handlers.context import Block, OpsContext, Reply
from handlers.registry import CommandArgs, resolve_service, subcommand
from services.access import Risk
from services.health import Status
from services.stats import (
    CollectionStats,
    ComponentStats,
    MongoCollectionStats,
    MongoStats,
    PostgresStats,
    QdrantStats,
    RedisStats,
    ServiceStats,
    TableStats,
    VectorConfig,
    read_stats,
    stats_components,
)
from services.text import human_bytes, human_duration

# After this long without a report the caller is told the stats are being read.
PROGRESS_AFTER = 2.0


class StatsArgs(CommandArgs):
    positional = ("service", "component")
    service: str = Field(max_length=64)
    component: str | None = Field(None, max_length=64)


@subcommand(
    "stats",
    help="Sizes and counts of a service's datastores: tables, collections, vectors, Redis memory and keys",
    usage="<service> [component]",
    risk=Risk.READ,
    args=StatsArgs,
)
async def stats(ctx: OpsContext, args: StatsArgs) -> Reply:
    inventory = ctx.deps.inventory
    service = resolve_service(inventory, args.service)
    components, skipped = stats_components(service, inventory.services[service].components, args.component)
    reading = asyncio.create_task(read_stats(service, components, redactor=ctx.deps.redactor, skipped=skipped))
    try:
        done, _ = await asyncio.wait({reading}, timeout=PROGRESS_AFTER)
        if not done:
            longest = max(spec.timeout for spec in components.values())
            await ctx.tell(
                f":hourglass_flowing_sand: Reading the stats of {len(components)} component(s) of {service}… "
                f"the report follows within {longest:g} s."
            )
        report = await reading
    except BaseException:
        reading.cancel()
        raise
    return render_stats(report)


# -- rendering -----------------------------------------------------------------------------------------


def _rows(table: TableStats) -> str:
    if table.rows is None:
        return "rows unknown (never analysed)"
    return f"~{table.rows:,} row{'s' if table.rows != 1 else ''}"


def table_line(table: TableStats) -> str:
    name = table.name if table.schema == "public" else f"{table.schema}.{table.name}"
    return (
        f"`{bk.escape(name)}` {_rows(table)} · table {human_bytes(table.table_bytes)} · "
        f"indexes {human_bytes(table.index_bytes)} · total {human_bytes(table.total_bytes)}"
    )


def _postgres(title: str, data: PostgresStats) -> list[Block]:
    head = (
        f"{title} — database `{bk.escape(data.database)}` {human_bytes(data.database_bytes)} · "
        f"{data.table_count:,} table{'s' if data.table_count != 1 else ''}"
    )
    lines = [table_line(t) for t in data.tables] or ["No tables."]
    more = data.table_count - len(data.tables)
    if more > 0:
        lines.append(f"… and {more:,} more table{'s' if more != 1 else ''}, {human_bytes(data.others_bytes)} in all")
    return bk.sections(lines, title=head)


def _vector(vector: VectorConfig) -> str:
    name = f"{bk.escape(vector.name)}: " if vector.name else ""
    if vector.size is None:
        return f"{name}sparse"
    return f"{name}{vector.size}-dim {vector.distance}" + (" on disk" if vector.on_disk else "")


def collection_line(collection: CollectionStats) -> str:
    name = f"`{bk.escape(collection.name)}`"
    if collection.problem == "missing":
        return f"{bk.STATUS_EMOJI[Status.CRITICAL]} {name} missing (no such collection)"
    if collection.problem is not None:
        return f"{bk.STATUS_EMOJI[Status.CRITICAL]} {name} could not be read: {bk.escape(collection.problem)}"
    parts = [f"{bk.STATUS_EMOJI[collection.level]} {name} {collection.status}"]
    points = f"{collection.points:,} points" if collection.points is not None else "points unknown"
    if collection.indexed_vectors is not None:
        points += f" ({collection.indexed_vectors:,} vectors indexed)"
    parts.append(points)
    if collection.segments is not None:
        parts.append(f"{collection.segments:,} segment{'s' if collection.segments != 1 else ''}")
    if collection.vectors:
        parts.append("vectors " + ", ".join(_vector(v) for v in collection.vectors))
    if collection.payload_indexes:
        parts.append(f"{collection.payload_indexes} payload index{'es' if collection.payload_indexes != 1 else ''}")
    return " · ".join(parts)


def _qdrant(title: str, data: QdrantStats) -> list[Block]:
    count = len(data.collections)
    head = f"{title} — {count} collection{'s' if count != 1 else ''}"
    return bk.sections([collection_line(c) for c in data.collections], title=head)


def _size(value: int | None) -> str:
    return "?" if value is None else human_bytes(value)


def mongo_line(collection: MongoCollectionStats) -> str:
    name = f"`{bk.escape(collection.name)}`"
    if collection.problem is not None:
        return f"{bk.STATUS_EMOJI[Status.CRITICAL]} {name} {bk.escape(collection.problem)}"
    count = f"~{collection.count:,} documents" if collection.count is not None else "documents unknown"
    indexes = "indexes ?" if collection.index_count is None else (
        f"{collection.index_count} index{'es' if collection.index_count != 1 else ''}"
    )  # fmt: skip
    return (
        f"{name} {count} · data {_size(collection.size_bytes)} · storage {_size(collection.storage_bytes)} · "
        f"{indexes} {_size(collection.index_bytes)}"
    )


def _mongodb(title: str, data: MongoStats) -> list[Block]:
    parts = [
        f"{title} — database `{bk.escape(data.database)}`",
        f"{data.collection_count:,} collection{'s' if data.collection_count != 1 else ''}",
    ]
    if data.data_bytes is not None:
        parts.append(f"data {human_bytes(data.data_bytes)}")
    if data.storage_bytes is not None:
        parts.append(f"storage {human_bytes(data.storage_bytes)}")
    if data.index_bytes is not None:
        parts.append(f"indexes {human_bytes(data.index_bytes)}")
    lines = [mongo_line(c) for c in data.collections] or ["No collections."]
    if data.others:
        lines.append(
            f"… and {data.others:,} more collection{'s' if data.others != 1 else ''}, "
            f"{human_bytes(data.others_bytes)} in all"
        )
    if data.unread:
        lines.append(f"… and {data.unread:,} more not read (the first {data.collection_count - data.unread:,} were)")
    return bk.sections(lines, title=" · ".join(parts))


def _redis(title: str, data: RedisStats) -> list[Block]:
    memory = f"memory {human_bytes(data.used_memory)}"
    if data.peak_memory is not None:
        memory += f" (peak {human_bytes(data.peak_memory)})"
    if data.max_memory > 0:
        memory += f" of {human_bytes(data.max_memory)} ({data.used_memory / data.max_memory * 100:.0f} %)"
    else:
        memory += ", no maxmemory set"
    head = f"{title} — {memory} · {data.db_keys:,} key{'s' if data.db_keys != 1 else ''} in db {data.db}"
    if not data.prefixes:
        return [bk.section(head), bk.context("No `key_prefixes` declared for this Redis: keys per prefix not counted.")]
    bound = "" if data.complete else "at least "
    lines = [f"`{bk.escape(p.prefix)}` {bound}{p.keys:,} key{'s' if p.keys != 1 else ''}" for p in data.prefixes]
    lines.append(f"under no declared prefix: {bound}{data.other_keys:,}")
    if data.complete:
        note = f"Counted with a full SCAN ({data.scanned:,} keys seen)."
    else:
        note = (
            f":warning: {bk.escape(data.stopped or 'the SCAN stopped')} ({data.scanned:,} of {data.db_keys:,} keys "
            "seen): the counts are lower bounds."
        )
    return [*bk.sections(lines, title=head), bk.context(note)]


def component_blocks(item: ComponentStats) -> list[Block]:
    """One component: its figures, or the one line saying why it could not be read."""
    name = f"*{bk.escape(item.component)}* ({item.type})"
    if item.data is None:
        problem = bk.escape(item.problem or "no figures")
        return [bk.section(f"{bk.STATUS_EMOJI[Status.CRITICAL]} {name} could not be read: {problem}")]
    title = f"{name} · {human_duration(item.elapsed_ms)}"
    data = item.data
    if isinstance(data, PostgresStats):
        return _postgres(title, data)
    if isinstance(data, QdrantStats):
        return _qdrant(title, data)
    if isinstance(data, MongoStats):
        return _mongodb(title, data)
    return _redis(title, data)


def render_stats(report: ServiceStats) -> Reply:
    failed = report.unreadable
    read = len(report.components) - len(failed)
    counts = f"{read} of {len(report.components)} component(s) read"
    if failed:
        counts += f"; {len(failed)} could not be: " + ", ".join(c.component for c in failed)
    head = [bk.header(f"Stats: {report.service}"), bk.context(bk.escape(counts))]
    body: list[Block] = []
    for item in report.components:
        body += component_blocks(item)
    if report.skipped:
        names = ", ".join(f"{name} ({kind})" for name, kind in report.skipped)
        body.append(bk.context(f"No stats for their type: {bk.escape(names)}"))
    lines = [f"Stats of {report.service}: {counts}"]
    lines += [f"{c.component}: could not be read: {c.problem}" for c in failed]
    status = Status.WARNING if failed else Status.HEALTHY
    blocks = head + body
    return Reply("\n".join(lines), blocks, summary=blocks[: bk.MAX_BLOCKS - 1], ephemeral=True, status=status)
