"""Fixtures shared by the backup tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from services.state import StateStore, open_state_store


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[StateStore]:
    """A fresh SQLite catalog for one test."""
    opened = await open_state_store(f"sqlite://{tmp_path / 'state.db'}", default_path=tmp_path / "x.db")
    try:
        yield opened
    finally:
        await opened.close()
