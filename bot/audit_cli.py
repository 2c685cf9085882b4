"""`opsbot audit verify|export`: check the audit log's hash chain, or stream it out as JSON lines."""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TextIO

import structlog

from bot.settings import Settings
from bot.state import open_store
from services.errors import StartupError
from services.failures import network_problem, short_error
from services.redaction import Redactor
from services.state import AuditEvent, StateStore
from services.state.base import sqlite_path_from_url

log = structlog.get_logger(__name__)

# The order of the keys on every exported line.
EXPORT_FIELDS = (
    "seq",
    "ts",
    "request_id",
    "actor",
    "command",
    "args",
    "channel",
    "outcome",
    "duration_ms",
    "service",
    "detail",
    "prev_hash",
    "hash",
)


class OutputError(Exception):
    """The export file cannot be written: one sentence for stderr."""


async def run_audit(
    action: str, settings: Settings, redactor: Redactor, *, output: Path | None = None, since_seq: int = 0
) -> int:
    """Open the state store and run ``verify`` or ``export``; the exit code of the command."""
    _require_existing_sqlite(settings)
    store = await open_store(settings, redactor)
    try:
        if action == "verify":
            return await verify(store, redactor)
        return await export(store, redactor, output=output, since_seq=since_seq)
    finally:
        await store.close()


def _require_existing_sqlite(settings: Settings) -> None:
    """Refuse to check a SQLite file that is not there: opening it would create an empty, "intact" log."""
    url = settings.state_url.get_secret_value() if settings.state_url else None
    try:
        path = sqlite_path_from_url(url) if url else settings.sqlite_path
    except ValueError:
        return  # open_store says what is wrong with the URL
    if path is not None and not path.is_file():
        raise StartupError(f"no state store at {path}: set OPSBOT_STATE_DIR or OPSBOT_STATE_URL to the bot's state")


async def verify(store: StateStore, redactor: Redactor) -> int:
    """Check the hash chain: 0 and a summary on stdout if intact, else 1 and the first broken event on stderr."""
    try:
        # Read before verifying: the snapshot verified then reaches at least this event.
        newest = await store.audit_events(limit=1)
        broken = await store.verify_audit()
    except Exception as exc:
        log.debug("audit_verify_failed", exc_info=True)
        reason = network_problem(exc) or short_error(exc, redactor)
        print(f"opsbot: cannot read the audit log to verify it: {reason}", file=sys.stderr)
        return 1
    if broken is not None:
        hint = (
            f"audit log BROKEN at event #{broken}: the hash chain does not hold there.\n"
            f"  An event was edited, removed or inserted at or before #{broken}"
            " (an edit whose hash was recomputed breaks a later link, not its own).\n"
            "  Keep the database as it is and compare it with an earlier `opsbot audit export`."
        )
        print(hint, file=sys.stderr)
        return 1
    if not newest:
        print("audit log intact: 0 events")
    else:
        print(f"audit log intact: {newest[0].seq:,} events, head {newest[0].hash[:8]}…")
    return 0


def export_line(event: AuditEvent) -> str:
    """One event as a line of JSON; ``ts`` is the exact ISO 8601 UTC text that was hashed."""
    values = {name: getattr(event, name) for name in EXPORT_FIELDS}
    values["ts"] = event.ts.isoformat() if event.ts is not None else None
    return json.dumps(values, ensure_ascii=False) + "\n"


async def events_after(store: StateStore, since_seq: int = 0) -> AsyncIterator[AuditEvent]:
    """Events after ``since_seq``, oldest first, streamed from the store in batches."""
    # The store reads from the start of the log; skipping here keeps memory flat all the same.
    async for event in store.iter_audit():
        if event.seq > since_seq:
            yield event


async def export(store: StateStore, redactor: Redactor, *, output: Path | None, since_seq: int = 0) -> int:
    """Stream the log as JSON lines to stdout, or atomically into ``output``; the exit code."""
    count, first, last = 0, 0, 0
    try:
        with contextlib.ExitStack() as stack:
            out = _utf8_stdout() if output is None else stack.enter_context(atomic_output(output))
            async for event in events_after(store, since_seq):
                out.write(export_line(event))
                count, first, last = count + 1, first or event.seq, event.seq
            out.flush()
    except OutputError as exc:
        print(f"opsbot: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # The reader went away (`| head`): stop quietly, and keep Python's exit-time flush from complaining.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as exc:
        log.debug("audit_export_failed", exc_info=True)
        reason = network_problem(exc) or short_error(exc, redactor)
        outcome = f"{output} was not written" if output is not None else "the output is incomplete"
        print(f"opsbot: audit export failed after {count:,} event(s): {reason}; {outcome}", file=sys.stderr)
        return 1
    if output is not None:
        span = f" (#{first}-#{last})" if count else ""
        print(f"exported {count:,} audit event(s){span} to {output}", file=sys.stderr)
    return 0


def _utf8_stdout() -> TextIO:
    # Exported text is UTF-8 whatever the locale says (ensure_ascii=False keeps names readable).
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(encoding="utf-8")
    return sys.stdout


@contextlib.contextmanager
def atomic_output(target: Path) -> Iterator[TextIO]:
    """A UTF-8 file that appears at ``target``, complete, only when the block succeeds.

    Written to a temporary file in the same directory (owner-only, as ``mkstemp`` makes it),
    synced, then renamed over ``target``; on any failure the temporary file is removed and
    ``target`` is left as it was.
    """
    try:
        fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".partial")
    except OSError as exc:
        raise OutputError(f"cannot write {target}: {exc.strerror or exc}") from None
    partial = Path(name)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        try:
            os.replace(partial, target)
        except OSError as exc:
            raise OutputError(f"cannot replace {target}: {exc.strerror or exc}") from None
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
