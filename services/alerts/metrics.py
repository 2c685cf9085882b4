"""An app's Prometheus /metrics read twice: 5xx ratio and latency quantiles over the window between.

The alert watcher scrapes an app on an interval and keeps a few scrapes; a rule compares the newest
with one about its window older. Counter increases follow PromQL's ``increase`` (a value that went
down means the counter was reset, so the new value is the increase) and quantiles follow PromQL's
``histogram_quantile``, so the figures match what the team's Grafana would show.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from prometheus_client.parser import text_string_to_metric_families

__all__ = [
    "MAX_SAMPLES",
    "MAX_TEXT_BYTES",
    "Labels",
    "MetricsError",
    "Quantile",
    "Ratio",
    "Scrape",
    "error_ratio",
    "histogram_quantile",
    "latency_quantile",
    "parse_metrics",
    "seconds_between",
    "window_scrapes",
]

MAX_TEXT_BYTES = 5 * 1024 * 1024
"""Larger /metrics answers are refused: no app the team runs comes close, a runaway label does."""
MAX_SAMPLES = 50_000

Labels = tuple[tuple[str, str], ...]
"""A series' labels, sorted by name, so it can key a dict."""

Instant = float | datetime
"""When a scrape was taken: a monotonic clock reading or an aware datetime (not both in one window)."""

# Sample names each family type exposes; used to tell "metric unknown" from "no series yet".
_SUFFIXES: Mapping[str, tuple[str, ...]] = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_count", "_sum"),
    "gaugehistogram": ("_bucket", "_gcount", "_gsum"),
    "summary": ("", "_count", "_sum"),
}


class MetricsError(ValueError):
    """The /metrics text cannot be used: too big, not the exposition format, or lacking the metric."""


@dataclass(frozen=True)
class Scrape:
    """One reading of an app's /metrics: every sample by name, then by its labels."""

    at: Instant
    samples: Mapping[str, Mapping[Labels, float]]
    declared: frozenset[str] = field(default_factory=frozenset)
    """Sample names the text declared (by ``# TYPE``), with or without series yet."""

    def __post_init__(self) -> None:
        if isinstance(self.at, datetime) and self.at.utcoffset() is None:
            raise ValueError("a scrape's time must be a timezone-aware datetime or a monotonic reading")

    @property
    def sample_count(self) -> int:
        return sum(len(series) for series in self.samples.values())

    def knows(self, name: str) -> bool:
        """Whether the app exposes ``name`` at all (a labelled counter has no series until first used)."""
        return name in self.samples or name in self.declared

    def value(self, name: str, match: Mapping[str, str] | None = None) -> float | None:
        """The sum of ``name`` over the series matching ``match``; None when there are none."""
        values = [v for labels, v in self.samples.get(name, {}).items() if _matches(labels, match)]
        return sum(values) if values else None


@dataclass(frozen=True)
class Ratio:
    """5xx responses among all responses over a window, with the figures behind the percentage."""

    errors: float
    total: float
    window_seconds: float

    @property
    def fraction(self) -> float:
        return self.errors / self.total

    @property
    def pct(self) -> float:
        return self.errors * 100 / self.total

    @property
    def evidence(self) -> str:
        """``5xx 12 of 200 requests (6.0 %) over 60 s``: what an alert message quotes."""
        return (
            f"5xx {_count(self.errors)} of {_count(self.total)} requests ({self.pct:.1f} %) "
            f"over {_span(self.window_seconds)}"
        )


@dataclass(frozen=True)
class Quantile:
    """A latency quantile over a window, as ``histogram_quantile`` computes it."""

    q: float
    seconds: float
    observations: float
    window_seconds: float
    above_buckets: bool = False
    """The rank fell in the +Inf bucket: ``seconds`` is the largest finite bound and the truth is larger."""

    @property
    def evidence(self) -> str:
        """``p95 487 ms over 120 requests in 60 s`` (``above 10 s`` when past the largest bucket)."""
        name = f"p{self.q * 100:g}"
        figure = f"above {_latency(self.seconds)}" if self.above_buckets else _latency(self.seconds)
        return f"{name} {figure} over {_count(self.observations)} requests in {_span(self.window_seconds)}"


def parse_metrics(text: str, at: Instant) -> Scrape:
    """Read Prometheus text exposition into a :class:`Scrape` taken at ``at``.

    Keeps every sample except the ``_created`` timestamps prometheus-client adds. Refuses text over
    :data:`MAX_TEXT_BYTES` or with more than :data:`MAX_SAMPLES` samples, duplicate series and
    buckets without ``le``, each with a :class:`MetricsError` that says which.
    """
    # Characters never outnumber bytes: only text near the limit needs encoding to be measured.
    size = len(text) if len(text) > MAX_TEXT_BYTES else len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_TEXT_BYTES:
        raise MetricsError(
            f"the metrics text is {size / 1048576:.1f} MB, over the {MAX_TEXT_BYTES // 1048576} MB limit"
        )
    samples: dict[str, dict[Labels, float]] = {}
    declared: set[str] = set()
    parents: set[str] = set()
    count = 0
    try:
        for family in text_string_to_metric_families(text):
            suffixes = _SUFFIXES.get(family.type)
            if suffixes is not None:
                parents.add(family.name)
                declared.update(family.name + suffix for suffix in suffixes)
            elif family.type != "unknown":
                declared.add(family.name)
            for sample in family.samples:
                # prometheus-client adds a `<name>_created` gauge next to each counter and histogram.
                if sample.name.endswith("_created") and sample.name.removesuffix("_created") in parents:
                    continue
                count += 1
                if count > MAX_SAMPLES:
                    raise MetricsError(f"the metrics text has more than {MAX_SAMPLES:,} samples")
                if sample.name.endswith("_bucket") and "le" not in sample.labels:
                    raise MetricsError(f"{sample.name} has a bucket without an `le` label")
                labels: Labels = tuple(sorted(sample.labels.items()))
                series = samples.setdefault(sample.name, {})
                if labels in series:
                    raise MetricsError(f"{sample.name}{_show(labels)} appears twice")
                series[labels] = float(sample.value)
    except MetricsError:
        raise
    except (ValueError, IndexError, KeyError, TypeError) as exc:
        # The parser reports a bad line with whatever its string handling raised.
        raise MetricsError(f"not Prometheus text format ({type(exc).__name__}: {exc})") from None
    return Scrape(at=at, samples=samples, declared=frozenset(declared))


def window_scrapes(history: Sequence[Scrape], window_seconds: float) -> tuple[Scrape, Scrape] | None:
    """The newest scrape and the one opening a window of at least ``window_seconds`` before it.

    ``history`` is oldest first. While the watcher has not yet kept a scrape that old, the oldest
    one it has opens a shorter window (the evidence says how long); None with fewer than two.
    """
    if len(history) < 2:
        return None
    after = history[-1]
    earlier = history[:-1]
    for before in reversed(earlier):
        if seconds_between(before, after) >= window_seconds:
            return before, after
    return earlier[0], after


def error_ratio(
    before: Scrape,
    after: Scrape,
    *,
    metric: str = "http_requests_total",
    status_label: str = "status",
    match: Mapping[str, str] | None = None,
) -> Ratio | None:
    """5xx increase over all increase of ``metric`` between two scrapes; None when no requests came.

    ``match`` keeps only series with those label values (e.g. ``{"endpoint": "/api"}``). Status
    label values of three characters starting with 5 count as errors (``500``, ``503``, ``5xx``).
    """
    window = seconds_between(before, after)
    increases = _increases(before, after, metric, match)
    if not increases:
        return None
    if all(_label(labels, status_label) is None for labels in increases):
        raise MetricsError(f"{metric} has no {status_label!r} label")
    total = sum(increases.values())
    errors = sum(v for labels, v in increases.items() if _is_5xx(_label(labels, status_label)))
    if total <= 0:
        return None
    return Ratio(errors=errors, total=total, window_seconds=window)


def latency_quantile(
    q: float,
    before: Scrape,
    after: Scrape,
    *,
    metric: str = "http_request_duration_seconds",
    match: Mapping[str, str] | None = None,
) -> Quantile | None:
    """The ``q`` quantile of histogram ``metric`` over the window, with evidence; None without observations."""
    if not 0 <= q <= 1:
        raise ValueError(f"a quantile must be between 0 and 1, not {q}")
    window = seconds_between(before, after)
    increases = _increases(before, after, metric + "_bucket", match)
    if not increases:
        return None
    per_bound: dict[float, float] = {}
    for labels, increase in increases.items():
        le = _label(labels, "le")
        try:
            bound = float(le or "")
        except ValueError:
            raise MetricsError(f"{metric}_bucket has a bucket with le={le!r}, not a number") from None
        per_bound[bound] = per_bound.get(bound, 0.0) + increase  # sum over every label set but le
    return _bucket_quantile(q, per_bound, metric, window)


def histogram_quantile(
    q: float,
    before: Scrape,
    after: Scrape,
    *,
    metric: str = "http_request_duration_seconds",
    match: Mapping[str, str] | None = None,
) -> float | None:
    """PromQL's ``histogram_quantile(q, sum by (le) (increase(metric_bucket[window])))``, in seconds."""
    found = latency_quantile(q, before, after, metric=metric, match=match)
    return None if found is None else found.seconds


def _bucket_quantile(q: float, per_bound: Mapping[float, float], metric: str, window: float) -> Quantile | None:
    """PromQL's bucketQuantile (promql/quantile.go) on cumulative bucket counts keyed by upper bound."""
    bounds = sorted(per_bound)
    if not bounds or not math.isinf(bounds[-1]):
        raise MetricsError(f"{metric} has no +Inf bucket")
    if len(bounds) < 2:
        raise MetricsError(f"{metric} has no finite buckets")
    counts: list[float] = []
    highest = 0.0
    for bound in bounds:
        # Scrapes of buckets are not atomic; PromQL makes cumulative counts monotonic the same way.
        highest = max(highest, per_bound[bound])
        counts.append(highest)
    observations = counts[-1]
    if observations <= 0:
        return None
    rank = q * observations
    b = next(i for i, c in enumerate(counts) if c >= rank)
    if b == len(bounds) - 1:
        return Quantile(q, bounds[-2], observations, window, above_buckets=True)
    if b == 0 and bounds[0] <= 0:
        return Quantile(q, bounds[0], observations, window)
    start, end, in_bucket = 0.0, bounds[b], counts[b]
    if b > 0:
        start = bounds[b - 1]
        in_bucket -= counts[b - 1]
        rank -= counts[b - 1]
    seconds = start if in_bucket <= 0 else start + (end - start) * (rank / in_bucket)
    return Quantile(q, seconds, observations, window)


def _increases(before: Scrape, after: Scrape, name: str, match: Mapping[str, str] | None) -> dict[Labels, float]:
    """Per-series increase of counter ``name``, like PromQL's ``increase`` from two points."""
    if not after.knows(name):
        raise MetricsError(f"the app's metrics have no {name}")
    earlier = before.samples.get(name, {})
    increases: dict[Labels, float] = {}
    for labels, value in after.samples.get(name, {}).items():
        if not _matches(labels, match):
            continue
        old = earlier.get(labels)
        if old is None:
            # Client libraries create a labelled series on first use: it was 0 before the window.
            increases[labels] = value
        elif value < old:
            increases[labels] = value  # counter reset (the app restarted): it counted from 0 again
        else:
            increases[labels] = value - old
    return increases


def seconds_between(before: Scrape, after: Scrape) -> float:
    """Seconds from ``before`` to ``after``; refuses mixed clocks and an ``after`` that is not later."""
    if isinstance(before.at, datetime) and isinstance(after.at, datetime):
        seconds = (after.at - before.at).total_seconds()
    elif not isinstance(before.at, datetime) and not isinstance(after.at, datetime):
        seconds = after.at - before.at
    else:
        raise TypeError("both scrapes must be timed the same way (monotonic readings or datetimes)")
    if seconds <= 0:
        raise ValueError("the later scrape must be taken after the earlier one")
    return seconds


def _matches(labels: Labels, match: Mapping[str, str] | None) -> bool:
    if not match:
        return True
    have = dict(labels)
    return all(have.get(name) == value for name, value in match.items())


def _label(labels: Labels, name: str) -> str | None:
    return next((value for key, value in labels if key == name), None)


def _is_5xx(status: str | None) -> bool:
    return status is not None and len(status) == 3 and status.startswith("5")


def _show(labels: Labels) -> str:
    return "{" + ",".join(f'{k}="{v}"' for k, v in labels) + "}" if labels else ""


def _count(value: float) -> str:
    return f"{int(value):,}" if float(value).is_integer() else f"{value:,.4g}"


def _span(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def _latency(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.3g} s"
