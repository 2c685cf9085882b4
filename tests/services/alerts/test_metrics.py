"""5xx ratios and latency quantiles from two scrapes: the real sample app's /metrics, then edge cases."""

from __future__ import annotations

import asyncio
import re
from datetime import UTC, datetime, timedelta

import aiohttp
import pytest

from bot.sample_app import SampleAppState
from services.alerts.metrics import (
    MAX_SAMPLES,
    MAX_TEXT_BYTES,
    MetricsError,
    Scrape,
    error_ratio,
    histogram_quantile,
    latency_quantile,
    parse_metrics,
    seconds_between,
    window_scrapes,
)
from services.alerts.rules import ErrorRateRule, LatencyRule, Observation, Verdict, check
from tests.services.conftest import SampleAppFactory

T0 = datetime(2025, 3, 1, 9, 0, tzinfo=UTC)
HEALTHZ = {"endpoint": "/healthz"}


async def _scrape(session: aiohttp.ClientSession, url: str, at: datetime) -> Scrape:
    async with session.get(url + "/metrics") as r:
        assert r.status == 200
        return parse_metrics(await r.text(), at)


async def _hit(session: aiohttp.ClientSession, url: str, count: int, expect: int, path: str = "/healthz") -> None:
    async def one() -> None:
        async with session.get(url + path) as r:
            assert r.status == expect

    await asyncio.gather(*(one() for _ in range(count)))


async def _traffic(session: aiohttp.ClientSession, url: str, state: SampleAppState, *, ok: int, failing: int) -> None:
    await _hit(session, url, ok, 200)
    state.status = 500
    await _hit(session, url, failing, 500)
    state.status = None


# --- the real sample app -------------------------------------------------------------------------


async def test_exactly_5_percent_of_real_requests_is_5_percent_and_no_breach(
    http_session: aiohttp.ClientSession, sample_app: SampleAppFactory
) -> None:
    state, url = await sample_app()
    first = await _scrape(http_session, url, T0)
    await _traffic(http_session, url, state, ok=95, failing=5)
    second = await _scrape(http_session, url, T0 + timedelta(seconds=60))

    ratio = error_ratio(first, second, match=HEALTHZ)

    assert ratio is not None
    assert (ratio.errors, ratio.total, ratio.window_seconds) == (5, 100, 60)
    assert ratio.pct == 5.0
    assert ratio.evidence == "5xx 5 of 100 requests (5.0 %) over 60 s"
    rule = ErrorRateRule(kind="error_rate", match=HEALTHZ)
    condition = check(rule, Observation(reachable=True, scrapes=(first, second)))
    assert condition.verdict is Verdict.OK
    assert condition.evidence == "5xx 5 of 100 requests (5.0 %) over 60 s; alerts above 5 %"


async def test_6_of_100_real_requests_breaches_and_the_scrape_itself_is_counted(
    http_session: aiohttp.ClientSession, sample_app: SampleAppFactory
) -> None:
    state, url = await sample_app()
    await _traffic(http_session, url, state, ok=10, failing=1)  # history before the window
    first = await _scrape(http_session, url, T0)
    await _traffic(http_session, url, state, ok=94, failing=6)
    second = await _scrape(http_session, url, T0 + timedelta(minutes=5))

    on_healthz = error_ratio(first, second, match=HEALTHZ)
    everything = error_ratio(first, second)

    assert on_healthz is not None
    assert (on_healthz.errors, on_healthz.total) == (6, 100)
    # The first scrape's own GET /metrics is counted after its text was rendered: 101 in all.
    assert everything is not None
    assert (everything.errors, everything.total) == (6, 101)
    assert everything.evidence == "5xx 6 of 101 requests (5.9 %) over 5 min"
    condition = check(ErrorRateRule(kind="error_rate", match=HEALTHZ), Observation(True, scrapes=(first, second)))
    assert condition.verdict is Verdict.BREACH
    assert condition.value == 6.0


async def test_p95_of_real_requests_interpolates_inside_the_bucket(
    http_session: aiohttp.ClientSession, sample_app: SampleAppFactory
) -> None:
    state, url = await sample_app()
    first = await _scrape(http_session, url, T0)
    await _hit(http_session, url, 90, 200)  # well under 0.25 s each
    state.delay = 0.3  # the 10 slowest land in the (0.25, 0.5] bucket
    await _hit(http_session, url, 10, 200)
    state.delay = 0.0
    second = await _scrape(http_session, url, T0 + timedelta(seconds=60))

    p95 = latency_quantile(0.95, first, second, match=HEALTHZ)

    # rank 95 of 100: 5 of the 10 in (0.25, 0.5] → 0.25 + 0.25 * 5/10
    assert p95 is not None
    assert p95.seconds == pytest.approx(0.375)
    assert p95.observations == 100
    assert not p95.above_buckets
    assert p95.evidence == "p95 375 ms over 100 requests in 60 s"
    assert histogram_quantile(0.95, first, second, match=HEALTHZ) == pytest.approx(0.375)
    p50 = histogram_quantile(0.5, first, second, match=HEALTHZ)
    assert p50 is not None and p50 < 0.25
    observed = Observation(True, scrapes=(first, second))
    assert check(LatencyRule(kind="latency_p95", match=HEALTHZ), observed).verdict is Verdict.OK
    slow = check(LatencyRule(kind="latency_p95", threshold_seconds=0.3, match=HEALTHZ), observed)
    assert slow.verdict is Verdict.BREACH
    assert slow.evidence == "p95 375 ms over 100 requests in 60 s; alerts above 300 ms"


async def test_llm_p95_from_the_real_llm_histogram(
    http_session: aiohttp.ClientSession, sample_app: SampleAppFactory
) -> None:
    _, url = await sample_app(llm_latency=0.05)
    first = await _scrape(http_session, url, T0)

    async def chat() -> None:
        async with http_session.post(url + "/chat", json={"q": "shoes"}) as r:
            assert r.status == 200

    await asyncio.gather(*(chat() for _ in range(8)))
    second = await _scrape(http_session, url, T0 + timedelta(seconds=60))

    # The app observes exactly 0.05 s each: all 8 in the first bucket (0, 0.1] → 0.1 * 0.95.
    assert histogram_quantile(0.95, first, second, metric="llm_latency_seconds") == pytest.approx(0.095)
    rule = LatencyRule(kind="latency_p95", name="HighLLMLatency", metric="llm_latency_seconds", threshold_seconds=60)
    condition = check(rule, Observation(True, scrapes=(first, second)))
    assert condition.verdict is Verdict.OK
    assert condition.evidence == "p95 95 ms over 8 requests in 60 s; alerts above 60 s"


async def test_a_quiet_window_on_the_real_app_has_no_ratio_and_no_quantile(
    http_session: aiohttp.ClientSession, sample_app: SampleAppFactory
) -> None:
    state, url = await sample_app()
    await _traffic(http_session, url, state, ok=3, failing=2)
    first = await _scrape(http_session, url, T0)
    second = await _scrape(http_session, url, T0 + timedelta(seconds=30))

    assert error_ratio(first, second, match=HEALTHZ) is None
    assert histogram_quantile(0.95, first, second, match=HEALTHZ) is None
    condition = check(ErrorRateRule(kind="error_rate", match=HEALTHZ), Observation(True, scrapes=(first, second)))
    assert (condition.verdict, condition.evidence) == (Verdict.OK, "no requests over 30 s")


async def test_a_fresh_app_declares_its_metrics_before_any_series(
    http_session: aiohttp.ClientSession, sample_app: SampleAppFactory
) -> None:
    _, url = await sample_app()
    async with http_session.get(url + "/metrics") as r:
        fresh = parse_metrics(await r.text(), 1.0)

    assert "http_requests_total" not in fresh.samples
    assert fresh.knows("http_requests_total")
    assert fresh.knows("http_request_duration_seconds_bucket")
    assert not fresh.knows("http_requests_created")
    assert not any(name.endswith("_created") for name in fresh.samples)


# --- hand-written exposition text ----------------------------------------------------------------


def _requests(at: datetime | float, **series: float) -> Scrape:
    """``ok=90, err=10`` → http_requests_total with status 200 / 500 on /api."""
    lines = ["# TYPE http_requests_total counter"]
    statuses = {"ok": "200", "err": "500", "unavailable": "503", "missing": "404"}
    for key, value in series.items():
        lines.append(f'http_requests_total{{endpoint="/api",status="{statuses[key]}"}} {value}')
    return parse_metrics("\n".join(lines) + "\n", at)


def _histogram(buckets: dict[str, float], labels: str = "") -> str:
    """Bucket lines of histogram ``lat``: ``{"0.1": 20, "+Inf": 30}``."""
    sep = "," if labels else ""
    lines = [f'lat_bucket{{{labels}{sep}le="{le}"}} {count}' for le, count in buckets.items()]
    return "\n".join(lines) + "\n"


def _hist_scrape(at: datetime | float, *parts: str) -> Scrape:
    return parse_metrics("# TYPE lat histogram\n" + "".join(parts), at)


def test_a_counter_reset_counts_the_new_value_as_the_increase() -> None:
    before = _requests(T0, ok=1000, err=100)
    after = _requests(T0 + timedelta(seconds=60), ok=28, err=2)  # the app restarted in between

    ratio = error_ratio(before, after)

    assert ratio is not None
    assert (ratio.errors, ratio.total) == (2, 30)


def test_a_series_born_in_the_window_counts_from_zero_and_one_gone_counts_nothing() -> None:
    before = _requests(T0, ok=50, missing=7)
    after = _requests(T0 + timedelta(seconds=60), ok=90, unavailable=10)

    ratio = error_ratio(before, after)

    assert ratio is not None
    assert (ratio.errors, ratio.total) == (10, 50)
    assert ratio.fraction == 0.2


def test_label_matching_keeps_only_matching_series() -> None:
    text = (
        "# TYPE http_requests_total counter\n"
        'http_requests_total{{endpoint="/api",status="200"}} {a}\n'
        'http_requests_total{{endpoint="/api",status="502"}} {b}\n'
        'http_requests_total{{endpoint="/admin",status="500"}} {c}\n'
    )
    before = parse_metrics(text.format(a=0, b=0, c=0), 10.0)
    after = parse_metrics(text.format(a=40, b=10, c=50), 70.0)

    api = error_ratio(before, after, match={"endpoint": "/api"})
    admin = error_ratio(before, after, match={"endpoint": "/admin"})
    everything = error_ratio(before, after)

    assert api is not None and (api.errors, api.total) == (10, 50)
    assert admin is not None and (admin.errors, admin.total) == (50, 50)
    assert everything is not None and (everything.errors, everything.total) == (60, 100)
    assert error_ratio(before, after, match={"endpoint": "/nowhere"}) is None
    assert api.window_seconds == 60.0


def test_other_status_labels_and_fractional_counts() -> None:
    text = '# TYPE reqs_total counter\nreqs_total{{code="200"}} {a}\nreqs_total{{code="5xx"}} {b}\n'
    before = parse_metrics(text.format(a=0, b=0), T0)
    after = parse_metrics(text.format(a=2.5, b=0.5), T0 + timedelta(seconds=90))

    ratio = error_ratio(before, after, metric="reqs_total", status_label="code")

    assert ratio is not None
    assert ratio.evidence == "5xx 0.5 of 3 requests (16.7 %) over 90 s"
    with pytest.raises(MetricsError, match="no 'status' label"):
        error_ratio(before, after, metric="reqs_total")


def test_an_empty_window_has_no_ratio_but_an_unknown_metric_is_an_error() -> None:
    same = _requests(T0, ok=10, err=1)
    later = _requests(T0 + timedelta(seconds=60), ok=10, err=1)
    declared_only = parse_metrics("# TYPE http_requests_total counter\n", T0 + timedelta(seconds=120))

    assert error_ratio(same, later) is None
    assert error_ratio(same, declared_only) is None
    with pytest.raises(MetricsError, match="no requests_served_total"):
        error_ratio(same, later, metric="requests_served_total")
    with pytest.raises(MetricsError, match="no http_request_duration_seconds_bucket"):
        histogram_quantile(0.95, same, later)


def test_quantiles_follow_promql_interpolation() -> None:
    before = _hist_scrape(T0, _histogram({"0.1": 0, "0.5": 0, "1": 0, "+Inf": 0}))
    # 20 ≤ 0.1 s, 60 in (0.1, 0.5], 20 in (0.5, 1]
    after = _hist_scrape(T0 + timedelta(seconds=60), _histogram({"0.1": 20, "0.5": 80, "1": 100, "+Inf": 100}))

    assert histogram_quantile(0.5, before, after, metric="lat") == pytest.approx(0.1 + 0.4 * 30 / 60)
    assert histogram_quantile(0.1, before, after, metric="lat") == pytest.approx(0.05)  # first bucket starts at 0
    assert histogram_quantile(0.8, before, after, metric="lat") == pytest.approx(0.5)  # rank on a bucket's edge
    assert histogram_quantile(0.95, before, after, metric="lat") == pytest.approx(0.5 + 0.5 * 15 / 20)
    assert histogram_quantile(1.0, before, after, metric="lat") == pytest.approx(1.0)
    with pytest.raises(ValueError, match="between 0 and 1"):
        histogram_quantile(1.5, before, after, metric="lat")


def test_the_inf_bucket_answers_the_highest_finite_bound() -> None:
    before = _hist_scrape(1.0, _histogram({"0.5": 10, "1": 10, "+Inf": 10}))
    after = _hist_scrape(61.0, _histogram({"0.5": 12, "1": 13, "+Inf": 30}))

    found = latency_quantile(0.95, before, after, metric="lat")

    assert found is not None
    assert (found.seconds, found.above_buckets, found.observations) == (1.0, True, 20)
    assert found.evidence == "p95 above 1 s over 20 requests in 60 s"
    assert histogram_quantile(0.1, before, after, metric="lat") == pytest.approx(0.5 * 2 / 2)


def test_buckets_are_summed_over_label_sets_reset_per_series_and_made_monotonic() -> None:
    before = _hist_scrape(
        0.0,
        _histogram({"1": 100, "2": 100, "+Inf": 100}, 'endpoint="/a"'),
        _histogram({"1": 0, "2": 0, "+Inf": 0}, 'endpoint="/b"'),
    )
    after = _hist_scrape(
        60.0,
        _histogram({"1": 10, "2": 10, "+Inf": 10}, 'endpoint="/a"'),  # reset: 10 new, all ≤ 1
        # Not atomic: le=2 read before le=1 moved on; PromQL lifts it to the running maximum.
        _histogram({"1": 10, "2": 9, "+Inf": 10}, 'endpoint="/b"'),
    )

    assert histogram_quantile(0.5, before, after, metric="lat") == pytest.approx(0.5)
    assert histogram_quantile(0.5, before, after, metric="lat", match={"endpoint": "/b"}) == pytest.approx(0.5)
    assert latency_quantile(0.95, before, after, metric="lat", match={"endpoint": "/a"}) is not None


def test_histograms_without_inf_or_with_a_bad_bound_are_refused() -> None:
    no_inf = _hist_scrape(0.0, _histogram({"1": 1, "2": 2}))
    no_inf_later = _hist_scrape(9.0, _histogram({"1": 3, "2": 4}))
    only_inf = _hist_scrape(0.0, _histogram({"+Inf": 0}))
    only_inf_later = _hist_scrape(9.0, _histogram({"+Inf": 4}))
    bad = _hist_scrape(0.0, _histogram({"fast": 1, "+Inf": 2}))
    bad_later = _hist_scrape(9.0, _histogram({"fast": 2, "+Inf": 4}))

    with pytest.raises(MetricsError, match=r"no \+Inf bucket"):
        histogram_quantile(0.9, no_inf, no_inf_later, metric="lat")
    with pytest.raises(MetricsError, match="no finite buckets"):
        histogram_quantile(0.9, only_inf, only_inf_later, metric="lat")
    with pytest.raises(MetricsError, match="le='fast'"):
        histogram_quantile(0.9, bad, bad_later, metric="lat")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("http_requests_total{status= 1\n", "not Prometheus text format"),
        ("http_requests_total banana\n", "not Prometheus text format"),
        ('up{job="a"} 1\nup{job="a"} 1\n', 'up{job="a"} appears twice'),
        ("# TYPE lat histogram\nlat_bucket 3\n", "bucket without an `le` label"),
    ],
)
def test_malformed_text_is_refused_with_a_reason(text: str, message: str) -> None:
    with pytest.raises(MetricsError, match=re.escape(message)):
        parse_metrics(text, T0)


def test_oversized_text_and_too_many_samples_are_refused() -> None:
    with pytest.raises(MetricsError, match="over the 5 MB limit"):
        parse_metrics("# " + "x" * MAX_TEXT_BYTES + "\n", T0)
    many = "".join(f'g{{i="{i}"}} 1\n' for i in range(MAX_SAMPLES + 1))
    with pytest.raises(MetricsError, match="more than 50,000 samples"):
        parse_metrics(many, T0)
    assert parse_metrics("".join(f'g{{i="{i}"}} 1\n' for i in range(1000)), T0).sample_count == 1000


def test_gauges_and_untyped_samples_are_kept() -> None:
    scrape = parse_metrics(
        '# TYPE process_resident_memory_bytes gauge\nprocess_resident_memory_bytes 4.5e+07\nup{job="x"} 1\n', T0
    )

    assert scrape.value("process_resident_memory_bytes") == 45_000_000
    assert scrape.value("up", {"job": "x"}) == 1
    assert scrape.value("up", {"job": "y"}) is None


def test_times_must_be_aware_of_one_kind_and_move_forward() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        parse_metrics("up 1\n", datetime(2025, 3, 1, 9, 0))  # naive
    monotonic = parse_metrics("up 1\n", 5.0)
    aware = parse_metrics("up 1\n", T0)
    with pytest.raises(TypeError, match="same way"):
        seconds_between(monotonic, aware)
    with pytest.raises(ValueError, match="after the earlier one"):
        seconds_between(aware, aware)


def test_the_window_opens_at_the_newest_scrape_old_enough() -> None:
    history = [parse_metrics("up 1\n", T0 + timedelta(seconds=s)) for s in (0, 60, 120, 180, 240, 300, 360)]

    assert window_scrapes(history[:1], 300) is None
    assert window_scrapes(history, 300) == (history[1], history[-1])
    assert window_scrapes(history, 60) == (history[-2], history[-1])
    # Not enough history yet: the oldest scrape opens a shorter window.
    assert window_scrapes(history[:3], 300) == (history[0], history[2])
