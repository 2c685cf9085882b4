"""Exceptions turned into plain phrases for people: "connection refused", not a traceback."""

from __future__ import annotations

import errno
import socket
import ssl
from collections.abc import Iterable

from services.redaction import Redactor


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


def mongo_problem(exc: BaseException, timeout: float, scrub: Redactor, outer: Redactor | None = None) -> str:
    """Why a MongoDB call failed, as a phrase without the URI's password (``scrub`` knows it)."""
    from pymongo.errors import ConfigurationError, ConnectionFailure, OperationFailure

    if isinstance(exc, ConfigurationError | ValueError | TypeError):
        return f"the MongoDB URI is not valid ({type(exc).__name__})"  # its text may hold the password
    if isinstance(exc, OperationFailure) and exc.code in (13, 18):
        return "authentication failed" if exc.code == 18 else "not authorised"
    if isinstance(exc, ConnectionFailure):
        found = network_problem(exc)
        return found if found and found != "timed out" else f"no server answered within {timeout:g} s"
    text = short_error(exc, scrub)
    return outer.redact(text) if outer is not None else text
