"""Prometheus metrics of one bot process, on its own registry (served at ``GET /metrics``)."""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from services.errors import OUTCOMES
from services.health import Status
from services.state.spool import AuditSpool

# Commands range from a lookup to a backup of a large database.
_COMMAND_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)
# Probes are bounded by their own timeouts (seconds, not minutes).
_PROBE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """The bot's counters and histograms, registered on a private registry (never the global one)."""

    def __init__(self, *, process_metrics: bool = True) -> None:
        self.registry = CollectorRegistry()
        if process_metrics:
            ProcessCollector(registry=self.registry)
            PlatformCollector(registry=self.registry)
            GCCollector(registry=self.registry)
        self.commands_total = Counter(
            "opsbot_commands_total",
            f"Commands handled, by verb and outcome ({', '.join(OUTCOMES)}).",
            ["verb", "outcome"],
            registry=self.registry,
        )
        self.command_seconds = Histogram(
            "opsbot_command_seconds",
            "Time to run a command, by verb.",
            ["verb"],
            buckets=_COMMAND_BUCKETS,
            registry=self.registry,
        )
        self.probe_seconds = Histogram(
            "opsbot_probe_seconds",
            "Health probe latency, by component type and resulting status.",
            ["component_type", "status"],
            buckets=_PROBE_BUCKETS,
            registry=self.registry,
        )
        self.approval_events_total = Counter(
            "opsbot_approval_events_total",
            "Approval lifecycle events (requested, approved, denied, expired, started, succeeded, failed, "
            "interrupted, drift, refusals...), by event and action.",
            ["event", "action"],
            registry=self.registry,
        )
        self.slack_requests_total = Counter(
            "opsbot_slack_requests_total",
            "Requests received from Slack, by kind (command, action, event...).",
            ["kind"],
            registry=self.registry,
        )

    def observe_command(self, verb: str, outcome: str, seconds: float) -> None:
        """Count one finished command and record how long it took."""
        self.commands_total.labels(verb=verb, outcome=outcome).inc()
        self.command_seconds.labels(verb=verb).observe(seconds)

    def observe_probe(self, component_type: str, seconds: float, status: Status) -> None:
        """Record one probe; the signature is ``services.health.ProbeObserver``."""
        self.probe_seconds.labels(component_type=component_type, status=status.label).observe(seconds)

    def observe_approval(self, event: str, action: str) -> None:
        """Count one approval event; the signature is ``services.approvals.ApprovalObserver``."""
        self.approval_events_total.labels(event=event, action=action).inc()

    def count_slack_request(self, kind: str) -> None:
        """Count one request received from Slack."""
        self.slack_requests_total.labels(kind=kind).inc()

    def watch_audit_spool(self, spool: AuditSpool) -> None:
        """Expose the audit spool: events waiting for the state store, and events it had to drop."""
        pending = Gauge(
            "opsbot_audit_spool_pending",
            "Audit events kept on local disk while the state store does not answer.",
            registry=self.registry,
        )
        pending.set_function(lambda: spool.pending)
        dropped = Gauge(
            "opsbot_audit_spool_dropped",
            "Audit events lost since start-up because the spool was full (or a line was unreadable).",
            registry=self.registry,
        )
        dropped.set_function(lambda: spool.dropped)

    def render(self) -> tuple[bytes, str]:
        """The registry in Prometheus text format, and its Content-Type header value."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
