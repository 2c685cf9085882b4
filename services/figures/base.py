"""What a figure source gives `/ops status`: measurements over a window and the window before it.

A source reads one component's figures from where they live (Cloud Monitoring, CloudWatch, docker, the
host, the watcher's /metrics scrapes) and knows nothing of thresholds or Slack: `/ops status` holds each
measurement against the component's declared thresholds and renders it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

from services.inventory import Component

__all__ = ["FigureError", "FigureSource", "Measurement", "Window"]


@dataclass(frozen=True)
class Window:
    """The window the figures cover, ending at ``end``; the trend compares with the one before it."""

    end: datetime
    length: timedelta

    @property
    def start(self) -> datetime:
        return self.end - self.length

    @property
    def previous(self) -> Window:
        return Window(self.start, self.length)


@dataclass(frozen=True)
class Measurement:
    """One figure: ``name`` is its key for thresholds and alert rules (``cpu_p95_pct``, ``error_rate_pct``,
    ``latency_p95_ms``, ``requests``, ``instances``, ``memory_p95_pct``, ``disk_used_pct``, …), ``label``
    how people read it, ``value`` over the window and ``previous`` over the window before (None: not
    known), ``unit`` one of ``%``, ``ms``, ``count``, ``bytes``, ``per_min``."""

    name: str
    label: str
    value: float | None
    unit: str
    previous: float | None = None
    note: str = ""
    """Why a value is missing or approximate, in a few words ("only in the watcher's history")."""


class FigureError(Exception):
    """A source could not read its figures; the message is one plain sentence without secrets
    ("Cloud Monitoring refused: permission denied (monitoring.timeSeries.list)")."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class FigureSource(Protocol):
    """Reads one component type's figures. Never blocks the loop; bounded by ``timeout`` seconds;
    raises FigureError (not a driver's exception) when the figures cannot be had."""

    async def measure(self, component: Component, window: Window, *, timeout: float) -> list[Measurement]: ...  # noqa: ASYNC109
