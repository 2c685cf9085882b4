"""Shared fixtures: real servers in tests/fixtures/servers.py, the fake Slack Web API in
tests/fixtures/slack.py, and a known logging set-up around every test."""

from collections.abc import Iterator

import pytest

from bot.logging import configure_logging
from services.redaction import Redactor

pytest_plugins = [
    "tests.fixtures.servers",
    "tests.fixtures.slack",
    "tests.fixtures.aws",
    "tests.fixtures.qdrant",
    "tests.fixtures.raw_mongo",
]


@pytest.fixture(autouse=True)
def _baseline_logging() -> Iterator[None]:
    """Tests that configure logging (JSON, DEBUG, a redactor) must not leak it into the next."""
    configure_logging("console", "INFO", Redactor())
    yield
    configure_logging("console", "INFO", Redactor())
