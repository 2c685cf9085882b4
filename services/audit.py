"""Writing one audit event: redacted, clipped, and never the reason a command's answer is lost."""

from __future__ import annotations

import structlog

from services.errors import AuditSpooled
from services.redaction import Redactor
from services.state import AuditRecord, StateStore

log = structlog.get_logger(__name__)

MAX_FIELD = 500  # characters kept of the arguments and of the detail


async def record_event(
    store: StateStore,
    redactor: Redactor,
    *,
    request_id: str,
    actor: str,
    command: str,
    args: str,
    channel: str,
    outcome: str,
    service: str | None = None,
    detail: str = "",
    seconds: float = 0.0,
) -> None:
    """Append one event to the audit log; a failed write is logged loudly, not raised."""
    record = AuditRecord(
        request_id=request_id,
        actor=actor,
        command=command,
        args=redactor.redact(args)[:MAX_FIELD],
        channel=channel,
        outcome=outcome,
        duration_ms=seconds * 1000,
        service=service,
        detail=redactor.redact(detail)[:MAX_FIELD],
    )
    try:
        await store.append_audit(record)
    except AuditSpooled:
        pass  # kept on local disk until the store answers; the store logged it
    except Exception:
        log.exception("audit_write_failed", command=command, outcome=outcome)
