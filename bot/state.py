"""Opening the state store from the settings, with a bounded wait while its database comes up.

Kept apart from the container so that `opsbot audit` starts without importing every client.
"""

from __future__ import annotations

import asyncio
import time
from urllib.parse import urlsplit

import structlog

from bot.settings import Settings
from services.errors import StartupError
from services.failures import network_problem, short_error
from services.redaction import Redactor
from services.state import StateStore, open_state_store

log = structlog.get_logger(__name__)


def _store_location(settings: Settings) -> str:
    """Where the state lives, for messages: never the DSN's credentials."""
    if settings.state_url is None:
        return f"SQLite {settings.sqlite_path}"
    url = settings.state_url.get_secret_value()
    try:
        parts = urlsplit(url)
        return f"{parts.scheme} {parts.hostname or 'localhost'}:{parts.port or 5432}{parts.path}"
    except ValueError:
        return "OPSBOT_STATE_URL"


async def open_store(settings: Settings, redactor: Redactor, *, wait: float = 0.0) -> StateStore:
    """Open (and migrate) the state store, retrying for up to ``wait`` seconds while it is down."""
    url = settings.state_url.get_secret_value() if settings.state_url else None
    deadline = time.monotonic() + wait
    delay = 0.5
    while True:
        try:
            return await open_state_store(url, default_path=settings.sqlite_path)
        except ValueError as exc:  # a URL we cannot use: waiting will not help
            raise StartupError(f"OPSBOT_STATE_URL: {redactor.redact(str(exc))}") from None
        except Exception as exc:
            reason = network_problem(exc) or short_error(exc, redactor)
            if time.monotonic() + delay > deadline:
                raise StartupError(f"cannot open the state store ({_store_location(settings)}): {reason}") from None
            log.warning("state_store_unavailable", location=_store_location(settings), reason=reason, retry_in=delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
