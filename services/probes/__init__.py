"""Health probes, one module per component type, and the table that picks one by type."""

from __future__ import annotations

import aiohttp

from services.health import HealthProbe
from services.probes.http import HttpProbe
from services.probes.mongodb import MongoProbe
from services.probes.postgres import PostgresProbe
from services.probes.qdrant import QdrantClientFactory, QdrantProbe
from services.probes.redis import RedisProbe
from services.probes.sqlite import SqliteProbe

__all__ = [
    "HttpProbe",
    "MongoProbe",
    "PostgresProbe",
    "QdrantClientFactory",
    "QdrantProbe",
    "RedisProbe",
    "SqliteProbe",
    "build_health_probes",
]


def build_health_probes(
    session: aiohttp.ClientSession, *, qdrant_factory: QdrantClientFactory | None = None
) -> dict[str, HealthProbe]:
    """The health probe of every component type that has one, keyed by the inventory ``type``."""
    return {
        "http": HttpProbe(session),
        "postgres": PostgresProbe(),
        "redis": RedisProbe(),
        "mongodb": MongoProbe(),
        "qdrant": QdrantProbe(qdrant_factory),
        "sqlite": SqliteProbe(),
    }
