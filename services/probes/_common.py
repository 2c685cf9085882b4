"""Small pieces the health probes share: figures for humans and errors as plain sentences."""

from __future__ import annotations

import errno
import socket
import ssl
import time
from collections.abc import Iterable

from services.health import Status
from services.inventory import secrets_in
from services.redaction import Redactor


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


def human_bytes(size: float) -> str:
    """``7864320`` → ``"7.5 MB"`` (binary multiples, short names)."""
    if size < 1024:
        return f"{int(size)} B"
    for unit in ("KB", "MB", "GB", "TB"):
        size /= 1024
        if size < 1024 or unit == "TB":
            return f"{size:.1f} {unit}"
    raise AssertionError("unreachable")  # pragma: no cover


def human_duration(ms: float) -> str:
    """``2300`` → ``"2.3 s"``, ``45.2`` → ``"45 ms"``."""
    return f"{ms / 1000:.1f} s" if ms >= 1000 else f"{ms:.0f} ms"


def plural(count: int, noun: str) -> str:
    """``plural(1, "connection")`` → ``"1 connection"``; ``plural(3, …)`` → ``"3 connections"``."""
    return f"{count:,} {noun}" if count == 1 else f"{count:,} {noun}s"


def scrubber(*secret_values: str) -> Redactor:
    """A redactor for the connection strings a probe was given (whole value and URL password)."""
    secrets: set[str] = set()
    for value in secret_values:
        secrets |= secrets_in(value)
    return Redactor(secrets)


def _chain(exc: BaseException) -> Iterable[BaseException]:
    """The exception, what caused it, and (for exception groups) what is inside it."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        current = todo.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        if isinstance(current, BaseExceptionGroup):
            todo.extend(current.exceptions)
        for linked in (current.__cause__, current.__context__):
            if linked is not None:
                todo.append(linked)


def network_problem(exc: BaseException) -> str | None:
    """A plain phrase for a network failure anywhere in the exception chain, else None."""
    found = list(_chain(exc))
    for item in found:
        if isinstance(item, ConnectionRefusedError) or (isinstance(item, OSError) and item.errno == errno.ECONNREFUSED):
            return "connection refused"
    for item in found:
        if isinstance(item, socket.gaierror):
            return "host name not found"
        if isinstance(item, ssl.SSLCertVerificationError):
            return "TLS certificate not trusted"
        if isinstance(item, ssl.SSLError):
            return "TLS handshake failed"
        if isinstance(item, ConnectionResetError):
            return "connection reset by the server"
        if isinstance(item, OSError) and item.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
            return "host unreachable"
        if isinstance(item, TimeoutError):
            return "timed out"
    text = " ".join(str(item) for item in found).lower()
    if "connection refused" in text or "connect call failed" in text:
        return "connection refused"
    if "name or service not known" in text or "nodename nor servname" in text:
        return "host name not found"
    return None


def short_error(exc: BaseException, redactor: Redactor | None = None, limit: int = 160) -> str:
    """``"ExceptionName: first line of the message"``, cut to ``limit`` and with secrets masked."""
    lines = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    if redactor is not None:
        text = redactor.redact(text)
    return text if len(text) <= limit else text[: limit - 1] + "…"
