"""Alert rules as the inventory declares them: pydantic models and nothing that evaluates them.

The inventory parses these; the engine in ``services.alerts.rules`` holds observations against
them. The models import no part of the engine, so the inventory does not depend on what reads it.
"""

from __future__ import annotations

from datetime import timedelta
from enum import StrEnum
from typing import Annotated, ClassVar, Literal

from pydantic import BaseModel, ByteSize, ConfigDict, Field

__all__ = [
    "AlertRule",
    "Comparison",
    "DownRule",
    "ErrorRateRule",
    "LatencyRule",
    "RedisMemoryRule",
    "Severity",
    "SizeLimitRule",
]

Severity = Literal["warning", "critical"]


class Comparison(StrEnum):
    """How a figure is held against its threshold; each rule kind fixes its own, after the runbooks."""

    ABOVE = ">"
    AT_OR_ABOVE = ">="

    def breached(self, value: float, threshold: float) -> bool:
        return value > threshold if self is Comparison.ABOVE else value >= threshold

    @property
    def words(self) -> str:
        return "above" if self is Comparison.ABOVE else "at or above"


class _Rule(BaseModel):
    """What every rule kind has: a name, how long a breach and a recovery must hold, a severity."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str | None = Field(
        None,
        pattern=r"^[A-Za-z][A-Za-z0-9_-]{0,63}$",
        description="Name of the alert; default the kind's, e.g. HighErrorRate. Two rules of one kind need names.",
    )
    for_minutes: float = Field(5, ge=0, le=1440, description="Minutes a breach must hold before the alert fires.")
    resolve_for_minutes: float | None = Field(
        None, ge=0, le=1440, description="Minutes a recovery must hold before the alert resolves (default for_minutes)."
    )
    severity: Severity = "warning"

    title: ClassVar[str]
    comparison: ClassVar[Comparison]

    @property
    def alert_name(self) -> str:
        return self.name or self.title

    @property
    def hold(self) -> timedelta:
        return timedelta(minutes=self.for_minutes)

    @property
    def resolve_hold(self) -> timedelta:
        return timedelta(minutes=self.for_minutes if self.resolve_for_minutes is None else self.resolve_for_minutes)

    def key(self, service: str, component: str) -> str:
        """The alert's identity in the state store and in silences: ``shop/api/HighErrorRate``."""
        return f"{service}/{component}/{self.alert_name}"


class DownRule(_Rule):
    """ServiceDown (runbook 004): the target does not answer for ``for_minutes`` (≥ 1 min)."""

    kind: Literal["down"]
    for_minutes: float = Field(1, ge=0, le=1440, description="Minutes the target must be down before the alert fires.")
    severity: Severity = "critical"

    title: ClassVar[str] = "ServiceDown"
    comparison: ClassVar[Comparison] = Comparison.AT_OR_ABOVE  # of the time down against for_minutes


class ErrorRateRule(_Rule):
    """HighErrorRate: the share of 5xx responses over a window is above ``threshold_pct`` (> 5 %)."""

    kind: Literal["error_rate"]
    threshold_pct: float = Field(5, gt=0, lt=100)
    window_seconds: float = Field(300, ge=10, le=86400, description="Window the ratio is computed over.")
    metric: str = Field("http_requests_total", min_length=1, description="Counter of requests, by status.")
    status_label: str = Field("status", min_length=1)
    match: dict[str, str] = Field(default_factory=dict, description="Only series with these label values.")

    title: ClassVar[str] = "HighErrorRate"
    comparison: ClassVar[Comparison] = Comparison.ABOVE


class LatencyRule(_Rule):
    """HighLatency (p95 > 2 s) or HighLLMLatency (p95 > 60 s of llm_latency_seconds) from a histogram."""

    kind: Literal["latency_p95"]
    threshold_seconds: float = Field(2, gt=0)
    metric: str = Field("http_request_duration_seconds", min_length=1, description="Histogram, without _bucket.")
    window_seconds: float = Field(300, ge=10, le=86400, description="Window the quantile is computed over.")
    match: dict[str, str] = Field(default_factory=dict, description="Only series with these label values.")

    title: ClassVar[str] = "HighLatency"
    comparison: ClassVar[Comparison] = Comparison.ABOVE
    quantile: ClassVar[float] = 0.95


class RedisMemoryRule(_Rule):
    """Redis memory used against ``maxmemory`` is above ``threshold_pct`` (runbook 000: memory > 80 %)."""

    kind: Literal["redis_memory"]
    threshold_pct: float = Field(80, gt=0, le=100)

    title: ClassVar[str] = "RedisMemoryHigh"
    comparison: ClassVar[Comparison] = Comparison.ABOVE


class SizeLimitRule(_Rule):
    """A disk or a database near its limit (runbook 001: disk ≥ 90 %): at exactly 90 % it fires."""

    kind: Literal["size_limit"]
    threshold_pct: float = Field(90, gt=0, le=100)
    limit: ByteSize | None = Field(
        None, description="A fixed limit such as 10GB (a database plan); default the size the probe reports."
    )
    subject: str = Field("disk", min_length=1, max_length=40, description="What is measured, for the message.")

    title: ClassVar[str] = "SizeNearLimit"
    comparison: ClassVar[Comparison] = Comparison.AT_OR_ABOVE


AlertRule = Annotated[
    DownRule | ErrorRateRule | LatencyRule | RedisMemoryRule | SizeLimitRule,
    Field(discriminator="kind"),
]
"""One alert rule of the inventory, told apart by ``kind``."""
