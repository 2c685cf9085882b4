"""One structlog pipeline for the bot's own logs and the stdlib loggers of its libraries, redacted, on stderr."""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from services.redaction import Redactor

_REQUEST_KEYS = ("request_id", "user", "verb")
_CHATTY_LIBRARIES = ("aiosqlite", "botocore", "boto3", "s3transfer", "urllib3", "hpack", "grpc")
# Values the renderers print natively; anything else is rendered with repr() first so a secret
# hiding in an object's repr is redacted too.
_PLAIN = (str, int, float, bool, type(None))


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is at emit time (so pytest's capture sees it)."""

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, _value: TextIO) -> None:
        pass


class _Redact:
    """Processor: every value of the event dict through the Redactor, tracebacks included."""

    def __init__(self, redactor: Redactor) -> None:
        self._redactor = redactor

    def __call__(self, _logger: WrappedLogger, _name: str, event_dict: EventDict) -> EventDict:
        return {key: self._redactor.redact_value(_renderable(value)) for key, value in event_dict.items()}


class _Extras:
    """Processor: a stdlib record's ``extra=`` fields, without what another handler's formatter cached on it."""

    def __init__(self) -> None:
        self._adder = structlog.stdlib.ExtraAdder()

    def __call__(self, logger: WrappedLogger, name: str, event_dict: EventDict) -> EventDict:
        event_dict = self._adder(logger, name, event_dict)
        # logging.Formatter.format() sets record.message/asctime (pytest's handler does, for one);
        # neither is a real extra (logging forbids both as extra keys).
        event_dict.pop("message", None)
        event_dict.pop("asctime", None)
        return event_dict


def _renderable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _renderable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_renderable(v) for v in value]
    if isinstance(value, _PLAIN):
        return value
    return repr(value)


def configure_logging(fmt: str, level: str, redactor: Redactor) -> None:
    """Route structlog and stdlib logging through one redacting renderer (``json`` or ``console``) to stderr.

    Safe to call again: it replaces its own handler on the root logger instead of adding another.
    """
    if fmt not in ("json", "console"):
        raise ValueError(f"log format must be 'json' or 'console', not {fmt!r}")
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}")

    timestamper = structlog.processors.TimeStamper(fmt="iso", utc=True)
    # Runs for records from plain stdlib loggers (slack_bolt, aiohttp.access, asyncio...).
    foreign_pre_chain: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        _Extras(),
        timestamper,
    ]
    renderer: Processor
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(
            colors=sys.stderr.isatty(),
            exception_formatter=structlog.dev.plain_traceback,
        )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=foreign_pre_chain,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            # Tracebacks become text before redaction, so secrets in exception messages are masked.
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            _Redact(redactor),
            renderer,
        ],
    )

    handler = _StderrHandler()
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _StderrHandler)]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(numeric)
    # At DEBUG these libraries log every statement or HTTP hop, drowning the bot's own lines.
    for noisy in _CHATTY_LIBRARIES:
        logging.getLogger(noisy).setLevel(max(numeric, logging.INFO))

    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.stdlib.filter_by_level,
            structlog.stdlib.add_log_level,
            structlog.stdlib.add_logger_name,
            structlog.stdlib.PositionalArgumentsFormatter(),
            timestamper,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        # Not cached: a later configure_logging() must reach loggers that were already used.
        cache_logger_on_first_use=False,
    )


def bind_request(request_id: str, user: str | None = None, verb: str | None = None) -> None:
    """Attach the request's id, user and verb to every log line of the current task."""
    values = {"request_id": request_id, "user": user, "verb": verb}
    structlog.contextvars.bind_contextvars(**{k: v for k, v in values.items() if v is not None})


def clear_request() -> None:
    """Forget what :func:`bind_request` bound (other context variables are kept)."""
    structlog.contextvars.unbind_contextvars(*_REQUEST_KEYS)
