"""Fixtures that run the same state-store tests on SQLite and on a real PostgreSQL."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosqlite
import asyncpg
import pytest

from services.state import StateStore, open_state_store


@dataclass(frozen=True)
class Backend:
    """Where a store lives, plus raw SQL access behind the store's back (for tampering)."""

    kind: str
    url: str
    default_path: Path

    async def open(self) -> StateStore:
        return await open_state_store(self.url, default_path=self.default_path)

    async def execute(self, *statements: str) -> None:
        if self.kind == "sqlite":
            async with aiosqlite.connect(self.url.removeprefix("sqlite://"), isolation_level=None) as conn:
                for statement in statements:
                    await conn.execute(statement)
        else:
            conn = await asyncpg.connect(self.url, timeout=10)
            try:
                for statement in statements:
                    await conn.execute(statement)
            finally:
                await conn.close()

    async def fetch(self, query: str) -> list[tuple[Any, ...]]:
        if self.kind == "sqlite":
            async with aiosqlite.connect(self.url.removeprefix("sqlite://")) as conn:
                return [tuple(row) for row in await conn.execute_fetchall(query)]
        conn = await asyncpg.connect(self.url, timeout=10)
        try:
            return [tuple(row) for row in await conn.fetch(query)]
        finally:
            await conn.close()

    async def allow_tampering(self) -> None:
        """Do what an intruder with database access could: switch off the append-only triggers."""
        if self.kind == "sqlite":
            await self.execute("DROP TRIGGER audit_events_no_update", "DROP TRIGGER audit_events_no_delete")
        else:
            await self.execute("ALTER TABLE audit_events DISABLE TRIGGER USER")


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    """A fresh, empty database of each kind (SQLite under tmp_path, PostgreSQL from pg_dsn)."""
    default_path = tmp_path / "default" / "state.db"
    if request.param == "sqlite":
        return Backend("sqlite", f"sqlite://{tmp_path / 'state' / 'opsbot.db'}", default_path)
    return Backend("postgres", request.getfixturevalue("pg_dsn"), default_path)


@pytest.fixture
async def store(backend: Backend) -> AsyncIterator[StateStore]:
    """An opened, migrated store on ``backend``."""
    opened = await backend.open()
    try:
        yield opened
    finally:
        await opened.close()
