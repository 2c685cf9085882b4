"""Fixtures for the services tests: an HTTP client session and sample apps on loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest

from bot.sample_app import SampleAppState, start_sample_app

SampleAppFactory = Callable[..., Awaitable[tuple[SampleAppState, str]]]


@pytest.fixture
async def http_session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def sample_app() -> AsyncIterator[SampleAppFactory]:
    """Start sample apps with the given knobs: ``state, url = await sample_app(delay=0.3)``."""
    runners = []

    async def start(**knobs: object) -> tuple[SampleAppState, str]:
        state = SampleAppState(**knobs)  # type: ignore[arg-type]
        runner, url = await start_sample_app(state)
        runners.append(runner)
        return state, url

    yield start
    for runner in runners:
        await runner.cleanup()
