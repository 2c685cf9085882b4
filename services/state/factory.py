"""Which store a state URL opens: the one module that knows every backend (so none imports it back)."""

from __future__ import annotations

import re
from pathlib import Path

from services.state.base import StateStore, sqlite_path_from_url
from services.state.postgres import PostgresStateStore
from services.state.sqlite import SqliteStateStore

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")


def _describe_url(url: str) -> str:
    """Name the scheme of a rejected URL without echoing anything that could hold a secret."""
    match = _SCHEME.match(url)
    return f"scheme {match.group(1)!r}" if match else "a value that is not a URL"


async def open_state_store(url: str | None, *, default_path: Path) -> StateStore:
    """SQLite at ``default_path`` (or a sqlite:/// URL), PostgreSQL for a postgres DSN; migrated."""
    if not url:
        return await SqliteStateStore.open(default_path)
    if (path := sqlite_path_from_url(url)) is not None:
        return await SqliteStateStore.open(path)
    if url.startswith(("postgresql://", "postgres://")):
        # Audit events of an outage wait beside the local state, fsynced, until the store answers.
        return await PostgresStateStore.open(url, spool_path=default_path.parent / "audit-spool.jsonl")
    raise ValueError(
        f"unsupported state store URL ({_describe_url(url)}): "
        "use sqlite:///abs/path.db, sqlite:relative.db, postgresql://… or postgres://…"
    )
