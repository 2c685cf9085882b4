"""Health probes, one module per component type, and the table that picks one by type.

Each probe module is imported only when the inventory has a component of its type: the Qdrant
and MongoDB clients take seconds to import, which `opsbot run` from cron should not pay for
components it does not have. (`serve` builds its probes at start-up, so no import ever happens
while requests are being answered.)
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import TYPE_CHECKING

import aiohttp

from services.health import HealthProbe

if TYPE_CHECKING:
    from services.probes.qdrant import QdrantClientFactory

__all__ = ["PROBED_TYPES", "build_health_probes"]

PROBED_TYPES = frozenset({"http", "postgres", "redis", "mongodb", "qdrant", "sqlite", "tls", "statuspage", "host"})


def _http(session: aiohttp.ClientSession, qdrant_factory: QdrantClientFactory | None) -> HealthProbe:
    from services.probes.http import HttpProbe

    return HttpProbe(session)


def _postgres(session: aiohttp.ClientSession, qdrant_factory: QdrantClientFactory | None) -> HealthProbe:
    from services.probes.postgres import PostgresProbe

    return PostgresProbe()


def _redis(session: aiohttp.ClientSession, qdrant_factory: QdrantClientFactory | None) -> HealthProbe:
    from services.probes.redis import RedisProbe

    return RedisProbe()


def _mongodb(session: aiohttp.ClientSession, qdrant_factory: QdrantClientFactory | None) -> HealthProbe:
    from services.probes.mongodb import MongoProbe

    return MongoProbe()


def _qdrant(session: aiohttp.ClientSession, qdrant_factory: QdrantClientFactory | None) -> HealthProbe:
    from services.probes.qdrant import QdrantProbe

    return QdrantProbe(qdrant_factory)


def _sqlite(session: aiohttp.ClientSession, qdrant_factory: QdrantClientFactory | None) -> HealthProbe:
    from services.probes.sqlite import SqliteProbe

    return SqliteProbe()


def _tls(session: aiohttp.ClientSession, qdrant_factory: QdrantClientFactory | None) -> HealthProbe:
    from services.probes.tls import TlsProbe

    return TlsProbe()


def _host(session: aiohttp.ClientSession, qdrant_factory: QdrantClientFactory | None) -> HealthProbe:
    from services.probes.host import HostProbe

    return HostProbe()


def _statuspage(session: aiohttp.ClientSession, qdrant_factory: QdrantClientFactory | None) -> HealthProbe:
    from services.probes.statuspage import StatuspageProbe

    # One per process, so its per-page cache is shared by /ops health, the watcher and the digest.
    return StatuspageProbe(session)


_BUILDERS: dict[str, Callable[[aiohttp.ClientSession, QdrantClientFactory | None], HealthProbe]] = {
    "http": _http,
    "postgres": _postgres,
    "redis": _redis,
    "mongodb": _mongodb,
    "qdrant": _qdrant,
    "sqlite": _sqlite,
    "tls": _tls,
    "host": _host,
    "statuspage": _statuspage,
}


def build_health_probes(
    session: aiohttp.ClientSession,
    *,
    qdrant_factory: QdrantClientFactory | None = None,
    types: Collection[str] | None = None,
) -> dict[str, HealthProbe]:
    """The health probe of each component type that has one (of ``types`` only, when given)."""
    wanted = PROBED_TYPES if types is None else PROBED_TYPES & set(types)
    return {kind: _BUILDERS[kind](session, qdrant_factory) for kind in sorted(wanted)}
