"""Shared fixtures: real servers in tests/fixtures/servers.py, the fake Slack Web API in
tests/fixtures/slack.py, and a known logging set-up around every test."""

import os
from collections.abc import Iterator

import pytest

# No test may look for Google credentials on a metadata server (169.254.169.254 is not loopback):
# google-auth reads this when it is first imported.
os.environ["NO_GCE_CHECK"] = "true"
os.environ.pop("GOOGLE_APPLICATION_CREDENTIALS", None)

from bot.logging import configure_logging
from services.redaction import Redactor

pytest_plugins = [
    "tests.fixtures.servers",
    "tests.fixtures.slack",
    "tests.fixtures.aws",
    "tests.fixtures.qdrant",
    "tests.fixtures.raw_mongo",
    "tests.fixtures.tls",
]


@pytest.fixture(autouse=True)
def _baseline_logging() -> Iterator[None]:
    """Tests that configure logging (JSON, DEBUG, a redactor) must not leak it into the next."""
    configure_logging("console", "INFO", Redactor())
    yield
    configure_logging("console", "INFO", Redactor())
