"""Small pieces the health probes share: figures for humans and errors as plain sentences."""

from __future__ import annotations

import time
from collections.abc import Iterable

from services.failures import network_problem, short_error
from services.health import Status
from services.inventory import secrets_in
from services.redaction import Redactor
from services.text import human_bytes, human_duration


def worst(statuses: Iterable[Status]) -> Status:
    """The worst of several statuses; HEALTHY when there are none."""
    return max(statuses, default=Status.HEALTHY)


def since_ms(started: float) -> float:
    """Milliseconds elapsed since ``started`` (a ``time.perf_counter()`` reading)."""
    return (time.perf_counter() - started) * 1000


def connect_budget(timeout: float) -> float:
    """Seconds to give a connection attempt: a little less than the probe's whole timeout, so
    a failure is reported with its own reason rather than cut off as a bare timeout."""
    return max(timeout * 0.8, timeout - 1.0)


def plural(count: int, noun: str) -> str:
    """``plural(1, "connection")`` → ``"1 connection"``; ``plural(3, …)`` → ``"3 connections"``."""
    return f"{count:,} {noun}" if count == 1 else f"{count:,} {noun}s"


def scrubber(*secret_values: str) -> Redactor:
    """A redactor for the connection strings a probe was given (whole value and URL password)."""
    secrets: set[str] = set()
    for value in secret_values:
        secrets |= secrets_in(value)
    return Redactor(secrets)


__all__ = [
    "connect_budget",
    "human_bytes",
    "human_duration",
    "network_problem",
    "plural",
    "scrubber",
    "short_error",
    "since_ms",
    "worst",
]
