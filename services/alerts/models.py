"""Alert rules as the inventory declares them: pydantic models and nothing that evaluates them.

The inventory parses these; the engine in ``services.alerts.rules`` holds observations against
them. The models import no part of the engine, so the inventory does not depend on what reads it.
"""

from __future__ import annotations

import re
from datetime import timedelta
from enum import StrEnum
from typing import Annotated, ClassVar, Literal

from pydantic import BaseModel, ByteSize, ConfigDict, Field, field_validator

__all__ = [
    "AlertRule",
    "CertExpiryRule",
    "Comparison",
    "CpuRule",
    "DiskRule",
    "DownRule",
    "ErrorRateRule",
    "FigureRule",
    "LatencyRule",
    "MemoryRule",
    "ProviderIncidentRule",
    "QueueBacklogRule",
    "QueueFailureRateRule",
    "QueueRule",
    "RedisMemoryRule",
    "Severity",
    "SizeLimitRule",
]

Severity = Literal["warning", "critical"]

# The rules of services.queues.check_queue_name (not imported: that module imports the inventory).
QUEUE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


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


class CertExpiryRule(_Rule):
    """CertificateExpiry (runbook 001): a tls component's certificate is at ``at`` or worse by the
    component's own thresholds (days left, or a share of a short-lived certificate's life), or it no
    longer verifies (expired, wrong host, unknown CA: critical)."""

    kind: Literal["cert_expiry"]
    at: Severity = Field("warning", description="Fire when the certificate's status is this or worse.")
    for_minutes: float = Field(0, ge=0, le=1440, description="Minutes it must hold (a certificate does not flap).")

    title: ClassVar[str] = "CertificateExpiry"
    comparison: ClassVar[Comparison] = Comparison.AT_OR_ABOVE  # of the certificate's status against `at`


class ProviderIncidentRule(_Rule):
    """ProviderIncident (runbook 002): a provider's status page shows an active incident on the parts
    a statuspage component declares (any, if it declares none); it resolves when the incident ends."""

    kind: Literal["provider_incident"]
    for_minutes: float = Field(0, ge=0, le=1440, description="Minutes an incident must last before it is posted.")

    title: ClassVar[str] = "ProviderIncident"
    comparison: ClassVar[Comparison] = Comparison.AT_OR_ABOVE  # of the incidents that matter against one


class _FigureRule(_Rule):
    """A rule on a figure the component's figure source measures (`/ops status`): the worst reading of
    the figure this round (the fullest mount, the busiest container) against ``threshold_pct``."""

    threshold_pct: float = Field(80, gt=0, le=100)

    figure_prefix: ClassVar[str]
    subject: ClassVar[str]


class CpuRule(_FigureRule):
    """HighCpu (runbook 000: CPU > 80 %): a container's, a Cloud Run service's or an instance's CPU."""

    kind: Literal["cpu"]

    title: ClassVar[str] = "HighCpu"
    comparison: ClassVar[Comparison] = Comparison.ABOVE
    figure_prefix: ClassVar[str] = "cpu_"
    subject: ClassVar[str] = "CPU"


class MemoryRule(_FigureRule):
    """HighMemory (runbook 000: memory > 80 %): memory used against what the host or container may use."""

    kind: Literal["memory"]

    title: ClassVar[str] = "HighMemory"
    comparison: ClassVar[Comparison] = Comparison.ABOVE
    figure_prefix: ClassVar[str] = "memory_"
    subject: ClassVar[str] = "memory"


class DiskRule(_FigureRule):
    """DiskFull (runbook 001: disk ≥ 90 %): the fullest declared filesystem; at exactly 90 % it fires."""

    kind: Literal["disk"]
    threshold_pct: float = Field(90, gt=0, le=100)

    title: ClassVar[str] = "DiskFull"
    comparison: ClassVar[Comparison] = Comparison.AT_OR_ABOVE
    figure_prefix: ClassVar[str] = "disk_"
    subject: ClassVar[str] = "disk"


FigureRule = CpuRule | MemoryRule | DiskRule
"""The rule kinds fed by a component's figure source (services/figures/)."""


class _QueueRule(_Rule):
    """A rule on the Bull/BullMQ queues a redis component declares (``queues:``), runbook 001."""

    queue: str | None = Field(None, description="One queue by name; default every queue of the component.")

    @field_validator("queue")
    @classmethod
    def _queue_name(cls, value: str | None) -> str | None:
        if value is not None and not QUEUE_NAME.match(value):
            raise ValueError(
                "a queue name is letters, digits, `.`, `_` and `-` (at most 100, no wildcards, colons or slashes)"
            )
        return value


class QueueFailureRateRule(_QueueRule):
    """QueueFailureRate: failed among the jobs a queue finished in the last 15 min is above ``threshold_pct``.

    Below ``min_finished`` finished jobs a queue is not judged (two failures of three is no trend).
    """

    kind: Literal["queue_failure_rate"]
    threshold_pct: float = Field(10, gt=0, lt=100)
    min_finished: int = Field(
        20, ge=1, le=1_000_000, description="Jobs a queue must have finished in the window to be judged."
    )

    title: ClassVar[str] = "QueueFailureRate"
    comparison: ClassVar[Comparison] = Comparison.ABOVE


class QueueBacklogRule(_QueueRule):
    """QueueBacklog: a queue's oldest waiting job has waited longer than ``threshold_minutes``.

    Nothing takes its jobs (workers down or overwhelmed). A paused queue's waiting jobs are not a
    backlog: pausing is an operator's choice.
    """

    kind: Literal["queue_oldest_waiting"]
    threshold_minutes: float = Field(15, gt=0, le=10080)

    title: ClassVar[str] = "QueueBacklog"
    comparison: ClassVar[Comparison] = Comparison.ABOVE


QueueRule = QueueFailureRateRule | QueueBacklogRule
"""The rule kinds that read a redis component's queues."""

AlertRule = Annotated[
    DownRule
    | ErrorRateRule
    | LatencyRule
    | RedisMemoryRule
    | SizeLimitRule
    | QueueFailureRateRule
    | QueueBacklogRule
    | CertExpiryRule
    | ProviderIncidentRule
    | CpuRule
    | MemoryRule
    | DiskRule,
    Field(discriminator="kind"),
]
"""One alert rule of the inventory, told apart by ``kind``."""
