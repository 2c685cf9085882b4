"""The figures `/ops status` knows by name, their default thresholds (after the runbooks), and the
inventory's per-component ``thresholds:`` model that overrides them.

Imports nothing of the inventory, so the inventory can validate ``thresholds:`` with it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import IntEnum

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["FIGURES", "FigureKind", "FigureThreshold", "Level", "check_thresholds", "judge"]


class Level(IntEnum):
    """A figure's status against its thresholds; ordered like services.health.Status."""

    HEALTHY = 0
    WARNING = 1
    CRITICAL = 2


@dataclass(frozen=True)
class FigureKind:
    """A figure by name: its unit, which way is worse, its default thresholds and the range a threshold may take."""

    unit: str
    warning: float | None = None
    critical: float | None = None
    lower_is_worse: bool = False
    at_or_above: bool = False
    """``disk ≥ 90 %`` (runbook 001) rather than ``CPU > 80 %`` (runbook 000)."""
    highest: float | None = None

    def breached(self, value: float, threshold: float) -> bool:
        if self.lower_is_worse:
            return value <= threshold
        return value >= threshold if self.at_or_above else value > threshold


_PCT = FigureKind("%", highest=100)
_RUNBOOK_000 = FigureKind("%", warning=80, highest=100)  # CPU, memory > 80 %
_MS = FigureKind("ms")
_COUNT = FigureKind("count")

FIGURES: Mapping[str, FigureKind] = {
    # CPU and memory (runbook 000: > 80 %); container CPU may pass 100 % on several cores.
    "cpu_pct": FigureKind("%", warning=80, highest=6400),
    "cpu_p95_pct": _RUNBOOK_000,
    "memory_used_pct": _RUNBOOK_000,
    "memory_p95_pct": _RUNBOOK_000,
    "memory_used_bytes": FigureKind("bytes"),
    # Disk (runbook 001): ≥ 80 % warning, ≥ 90 % critical.
    "disk_used_pct": FigureKind("%", warning=80, critical=90, at_or_above=True, highest=100),
    "disk_used_bytes": FigureKind("bytes"),
    "dir_bytes": FigureKind("bytes"),
    "dir_files": _COUNT,
    # Requests (runbooks 000 and 004): error rate > 5 %, response time > 1 s.
    "error_rate_pct": FigureKind("%", warning=5, highest=100),
    "latency_p50_ms": _MS,
    "latency_p95_ms": FigureKind("ms", warning=1000),
    "latency_p99_ms": _MS,
    "requests": _COUNT,
    "requests_per_min": FigureKind("per_min"),
    "instances": _COUNT,
    "connections": _COUNT,
    "restarts": _COUNT,
    # Lambda (runbook 002).
    "invocations": _COUNT,
    "errors": _COUNT,
    "throttles": _COUNT,
    "duration_p95_ms": _MS,
    "concurrent_executions": _COUNT,
    # Certificates (runbook 001): the tls component's own warning_days / critical_days apply first.
    "cert_days_left": FigureKind("days", warning=21, critical=7, lower_is_worse=True, highest=3650),
    "share_pct": _PCT,
}
"""Every figure name a threshold may name. Sources may report others; those get no status."""


class FigureThreshold(BaseModel):
    """A component's own thresholds for one figure (either may be left out: that level never applies)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    warning: float | None = Field(None, description="At or past this the figure is a warning.")
    critical: float | None = Field(None, description="At or past this the figure is critical.")

    @model_validator(mode="after")
    def _some_level(self) -> FigureThreshold:
        if self.warning is None and self.critical is None:
            raise ValueError("give a warning or a critical value (or both)")
        for value in (self.warning, self.critical):
            if value is not None and not math.isfinite(value):
                raise ValueError("a threshold must be a finite number")
        return self


def check_thresholds(thresholds: Mapping[str, FigureThreshold]) -> None:
    """Refuse, with one sentence, a figure name opsbot does not know or a value out of its range."""
    for name, threshold in thresholds.items():
        kind = FIGURES.get(name)
        if kind is None:
            known = ", ".join(sorted(FIGURES))
            raise ValueError(f"{name[:60]!r} is not a figure opsbot knows (known figures: {known})")
        unit = "" if kind.unit in ("count", "bytes") else f" {kind.unit}"
        for level, value in (("warning", threshold.warning), ("critical", threshold.critical)):
            if value is None:
                continue
            if value < 0 or (kind.highest is not None and value > kind.highest):
                top = f"{kind.highest:g}{unit}" if kind.highest is not None else "no limit"
                raise ValueError(f"{name}: the {level} threshold {value:g}{unit} is out of range (0 to {top})")
        if threshold.warning is not None and threshold.critical is not None:
            low, high = threshold.critical, threshold.warning
            if not kind.lower_is_worse:
                low, high = high, low
            if low > high:
                way = "below" if kind.lower_is_worse else "above"
                raise ValueError(f"{name}: the critical threshold must be {way} the warning one")


def judge(
    name: str, value: float | None, own: Mapping[str, FigureThreshold] | None = None
) -> tuple[Level, float | None]:
    """The level of ``value`` against the component's own thresholds for ``name``, else the defaults;
    and the threshold it crossed (None when healthy or the figure has no thresholds)."""
    kind = FIGURES.get(name)
    if kind is None or value is None:
        return Level.HEALTHY, None
    chosen = (own or {}).get(name)
    warning, critical = (chosen.warning, chosen.critical) if chosen is not None else (kind.warning, kind.critical)
    if critical is not None and kind.breached(value, critical):
        return Level.CRITICAL, critical
    if warning is not None and kind.breached(value, warning):
        return Level.WARNING, warning
    return Level.HEALTHY, None
