"""Rule boundaries after the runbooks, and the alert state machine: `for`, flapping, resolve, silences."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta

import pytest
from pydantic import TypeAdapter, ValidationError

from services.alerts.metrics import Scrape, parse_metrics
from services.alerts.rules import (
    AlertRule,
    AlertState,
    Condition,
    DownRule,
    ErrorRateRule,
    LatencyRule,
    Observation,
    Phase,
    RedisMemoryRule,
    Silence,
    SizeLimitRule,
    Transition,
    TransitionKind,
    Verdict,
    check,
    evaluate,
)

T0 = datetime(2025, 3, 1, 9, 0, tzinfo=UTC)
RULES: TypeAdapter[AlertRule] = TypeAdapter(AlertRule)
BREACH = Condition(Verdict.BREACH, "not answering: connection refused")
OK = Condition(Verdict.OK, "answering")
UNKNOWN = Condition(Verdict.UNKNOWN, "waiting for a second scrape of the metrics")
KEY = "shop/api/ServiceDown"


def _at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


# --- rule models ---------------------------------------------------------------------------------


def test_rule_kinds_load_from_inventory_data_with_the_runbook_defaults() -> None:
    down = RULES.validate_python({"kind": "down"})
    errors = RULES.validate_python({"kind": "error_rate", "match": {"endpoint": "/api"}})
    llm = RULES.validate_python(
        {"kind": "latency_p95", "name": "HighLLMLatency", "metric": "llm_latency_seconds", "threshold_seconds": 60}
    )
    redis = RULES.validate_python({"kind": "redis_memory"})
    disk = RULES.validate_python({"kind": "size_limit", "limit": "10GB", "subject": "database"})

    assert isinstance(down, DownRule)
    assert (down.for_minutes, down.severity, down.hold, down.resolve_hold) == (
        1,
        "critical",
        timedelta(minutes=1),
        timedelta(minutes=1),
    )
    assert isinstance(errors, ErrorRateRule)
    assert (errors.threshold_pct, errors.window_seconds, errors.severity) == (5, 300, "warning")
    assert isinstance(llm, LatencyRule)
    assert llm.key("shop", "api") == "shop/api/HighLLMLatency"
    assert isinstance(redis, RedisMemoryRule) and redis.threshold_pct == 80
    assert isinstance(disk, SizeLimitRule)
    assert (disk.threshold_pct, disk.limit) == (90, 10_000_000_000)
    assert down.key("shop", "api") == "shop/api/ServiceDown"
    assert RULES.validate_python({"kind": "down", "resolve_for_minutes": 3}).resolve_hold == timedelta(minutes=3)


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        ({"kind": "down", "for_minute": 1}, "for_minute"),
        ({"kind": "teapot"}, "kind"),
        ({"kind": "error_rate", "threshold_pct": 0}, "threshold_pct"),
        ({"kind": "latency_p95", "threshold_seconds": -1}, "threshold_seconds"),
        ({"kind": "redis_memory", "threshold_pct": 101}, "threshold_pct"),
        ({"kind": "size_limit", "limit": "lots"}, "limit"),
        ({"kind": "down", "name": "has space"}, "name"),
        ({"kind": "down", "for_minutes": -1}, "for_minutes"),
    ],
)
def test_bad_rules_are_refused_with_the_field_named(data: dict[str, object], problem: str) -> None:
    with pytest.raises(ValidationError, match=problem):
        RULES.validate_python(data)


def test_rules_are_frozen() -> None:
    rule = ErrorRateRule(kind="error_rate")
    with pytest.raises(ValidationError, match="frozen"):
        rule.threshold_pct = 1  # type: ignore[misc]


# --- boundaries ----------------------------------------------------------------------------------


def _requests(errors: float, total: float) -> tuple[Scrape, Scrape]:
    text = '# TYPE http_requests_total counter\nhttp_requests_total{{status="200"}} {ok}\n'
    before = parse_metrics(text.format(ok=0), _at(0))
    after = parse_metrics(text.format(ok=total - errors) + f'http_requests_total{{status="500"}} {errors}\n', _at(300))
    return before, after


@pytest.mark.parametrize(
    ("errors", "total", "verdict"),
    [
        (5, 100, Verdict.OK),  # exactly 5 %: "> 5 %" does not breach
        (7, 140, Verdict.OK),  # exactly 5 % again, with a float quotient that is not exact
        (3, 60, Verdict.OK),
        (6, 100, Verdict.BREACH),
        (5001, 100_000, Verdict.BREACH),  # 5.001 %
        (0, 100, Verdict.OK),
    ],
)
def test_error_rate_breaches_only_above_5_percent(errors: int, total: int, verdict: Verdict) -> None:
    condition = check(ErrorRateRule(kind="error_rate"), Observation(True, scrapes=_requests(errors, total)))

    assert condition.verdict is verdict
    assert condition.value == pytest.approx(errors * 100 / total)


def _latency(buckets: dict[str, float]) -> tuple[Scrape, Scrape]:
    def text(scale: float) -> str:
        lines = [f'http_request_duration_seconds_bucket{{le="{le}"}} {n * scale}' for le, n in buckets.items()]
        return "# TYPE http_request_duration_seconds histogram\n" + "\n".join(lines) + "\n"

    return parse_metrics(text(0), _at(0)), parse_metrics(text(1), _at(300))


@pytest.mark.parametrize(
    ("buckets", "p95", "verdict"),
    [
        ({"1": 0, "2": 95, "3": 100, "+Inf": 100}, 2.0, Verdict.OK),  # p95 exactly 2 s: "> 2 s" does not breach
        ({"1": 0, "2": 94, "3": 100, "+Inf": 100}, 2 + 1 / 6, Verdict.BREACH),
        ({"1": 0, "2": 94, "+Inf": 100}, 2.0, Verdict.BREACH),  # past the largest bucket, which is 2 s
        ({"0.5": 0, "1": 94, "+Inf": 100}, 1.0, Verdict.OK),  # past 1 s only: cannot say it is past 2 s
        ({"1": 100, "+Inf": 100}, 0.95, Verdict.OK),
    ],
)
def test_latency_breaches_only_above_2_seconds(buckets: dict[str, float], p95: float, verdict: Verdict) -> None:
    condition = check(LatencyRule(kind="latency_p95"), Observation(True, scrapes=_latency(buckets)))

    assert condition.verdict is verdict
    assert condition.value == pytest.approx(p95)


@pytest.mark.parametrize(
    ("used", "limit", "verdict"),
    [(800, 1000, Verdict.OK), (801, 1000, Verdict.BREACH), (799, 1000, Verdict.OK), (1000, 1000, Verdict.BREACH)],
)
def test_redis_memory_breaches_only_above_80_percent(used: int, limit: int, verdict: Verdict) -> None:
    condition = check(
        RedisMemoryRule(kind="redis_memory"),
        Observation(True, memory_used_bytes=used * 1_048_576, memory_max_bytes=limit * 1_048_576),
    )

    assert condition.verdict is verdict


def test_redis_memory_evidence_and_no_maxmemory() -> None:
    rule = RedisMemoryRule(kind="redis_memory")

    full = check(rule, Observation(True, memory_used_bytes=850 * 1_048_576, memory_max_bytes=1024 * 1_048_576))
    unlimited = check(rule, Observation(True, memory_used_bytes=5 * 1_048_576, memory_max_bytes=0))
    unreported = check(rule, Observation(True, memory_used_bytes=5 * 1_048_576))

    assert full.evidence == "memory 850.0 MB of 1.0 GB (83.0 %); alerts above 80 %"
    assert (unlimited.verdict, unlimited.evidence) == (Verdict.OK, "memory 5.0 MB, no maxmemory set")
    assert (unreported.verdict, unreported.evidence) == (Verdict.UNKNOWN, "Redis memory not reported")


@pytest.mark.parametrize(
    ("used", "verdict"),
    [(90, Verdict.BREACH), (89, Verdict.OK), (95, Verdict.BREACH), (100, Verdict.BREACH)],
)
def test_disk_breaches_at_exactly_90_percent(used: int, verdict: Verdict) -> None:
    condition = check(
        SizeLimitRule(kind="size_limit"), Observation(True, size_used_bytes=used * 10**9, size_limit_bytes=100 * 10**9)
    )

    assert condition.verdict is verdict


def test_size_just_under_90_percent_is_ok_and_a_fixed_limit_wins() -> None:
    rule = SizeLimitRule.model_validate({"kind": "size_limit", "limit": "1000MiB", "subject": "database"})
    limit = 1000 * 1_048_576

    under = check(rule, Observation(True, size_used_bytes=limit * 9 // 10 - 1, size_limit_bytes=10 * limit))
    at = check(rule, Observation(True, size_used_bytes=limit * 9 // 10, size_limit_bytes=10 * limit))
    no_limit = check(SizeLimitRule(kind="size_limit"), Observation(True, size_used_bytes=5))

    assert under.verdict is Verdict.OK
    assert at.verdict is Verdict.BREACH
    assert at.evidence == "database 900.0 MB of 1000.0 MB (90.0 %); alerts at or above 90 %"
    assert (no_limit.verdict, no_limit.evidence) == (Verdict.UNKNOWN, "no limit known for the disk (5 B used)")


def test_unreachable_breaches_down_rules_only() -> None:
    unreachable = Observation(False, detail="connection refused")
    reachable = Observation(True)

    assert check(DownRule(kind="down"), unreachable) == Condition(Verdict.BREACH, "not answering: connection refused")
    assert check(DownRule(kind="down"), reachable).verdict is Verdict.OK
    others = [
        ErrorRateRule(kind="error_rate"),
        LatencyRule(kind="latency_p95"),
        RedisMemoryRule(kind="redis_memory"),
        SizeLimitRule(kind="size_limit"),
    ]
    for rule in others:
        condition = check(rule, unreachable)
        assert condition.verdict is Verdict.UNKNOWN, rule.alert_name
        assert "connection refused" in condition.evidence


def test_metrics_rules_wait_for_two_scrapes_and_name_a_missing_metric() -> None:
    one = Observation(True, scrapes=_requests(1, 10)[1:])
    rule = ErrorRateRule(kind="error_rate", metric="nope_total")

    assert check(ErrorRateRule(kind="error_rate"), one) == UNKNOWN
    missing = check(rule, Observation(True, scrapes=_requests(1, 10)))
    assert (missing.verdict, missing.evidence) == (Verdict.UNKNOWN, "the app's metrics have no nope_total")


# --- the state machine ---------------------------------------------------------------------------


def _run(
    conditions: Iterable[tuple[float, Condition]],
    *,
    rule: DownRule | None = None,
    silences: Sequence[Silence] = (),
    state: AlertState | None = None,
) -> tuple[AlertState, list[Transition]]:
    """Feed ``(seconds after T0, condition)`` checks through ``evaluate``; collect the transitions."""
    rule = rule or DownRule(kind="down")
    state = state or AlertState(KEY)
    transitions = []
    for seconds, condition in conditions:
        state, transition = evaluate(state, condition, _at(seconds), rule=rule, silences=silences)
        if transition is not None:
            transitions.append(transition)
    return state, transitions


def test_a_breach_fires_once_it_has_held_for_its_duration() -> None:
    state, transitions = _run([(0, BREACH), (30, BREACH)])
    assert (state.phase, transitions) == (Phase.PENDING, [])

    state, transitions = _run([(60, BREACH), (90, BREACH), (120, BREACH)], state=state)

    assert state.phase is Phase.FIRING
    assert len(transitions) == 1
    fired = transitions[0]
    assert (fired.kind, fired.key, fired.at, fired.since) == (TransitionKind.FIRED, KEY, _at(60), _at(0))
    assert (fired.evidence, fired.silenced) == ("not answering: connection refused", False)


def test_an_ok_while_pending_starts_the_wait_again() -> None:
    state, transitions = _run([(0, BREACH), (50, OK), (60, BREACH), (110, BREACH)])
    assert (state.phase, state.since, transitions) == (Phase.PENDING, _at(60), [])

    _, transitions = _run([(120, BREACH)], state=state)
    assert [t.at for t in transitions] == [_at(120)]


def test_for_zero_fires_on_the_first_breach() -> None:
    _, transitions = _run([(0, BREACH)], rule=DownRule(kind="down", for_minutes=0))
    assert [t.kind for t in transitions] == [TransitionKind.FIRED]


def test_a_flapping_target_faster_than_for_never_fires() -> None:
    checks = [(i * 30, BREACH if i % 2 == 0 else OK) for i in range(40)]  # 20 minutes of up/down every 30 s

    state, transitions = _run(checks)

    assert transitions == []
    assert state.phase is Phase.OK


def test_a_flapping_target_that_keeps_failing_gives_one_alert_not_ten() -> None:
    checks: list[tuple[float, Condition]] = [(0, BREACH), (30, BREACH), (60, BREACH)]
    for cycle in range(10):  # up for 30 s, down for 90 s, ten times
        start = 90 + cycle * 120
        checks += [(start, OK), (start + 30, BREACH), (start + 60, BREACH), (start + 90, BREACH)]

    state, transitions = _run(checks)
    _, without_resolve_hold = _run(checks, rule=DownRule(kind="down", resolve_for_minutes=0))

    assert [t.kind for t in transitions] == [TransitionKind.FIRED]
    assert state.phase is Phase.FIRING
    # What resolve_for prevents: each 30 s recovery would resolve it, each outage fire it again.
    assert [t.kind for t in without_resolve_hold].count(TransitionKind.FIRED) == 11


def test_resolve_waits_for_the_recovery_to_hold_and_carries_the_episode() -> None:
    firing, _ = _run([(0, BREACH), (60, BREACH)])
    resolving, transitions = _run([(120, OK), (150, OK)], state=firing)
    assert (resolving.phase, resolving.firing, transitions) == (Phase.RESOLVING, True, [])

    state, transitions = _run([(180, OK)], state=resolving)

    assert state == AlertState(KEY, evidence="answering")
    assert len(transitions) == 1
    resolved = transitions[0]
    assert (resolved.kind, resolved.at, resolved.since, resolved.fired_at) == (
        TransitionKind.RESOLVED,
        _at(180),
        _at(0),
        _at(60),
    )
    assert (resolved.announced, resolved.silenced, resolved.evidence) == (True, False, "answering")


def test_a_breach_while_resolving_keeps_it_firing_without_a_new_alert() -> None:
    state, transitions = _run([(0, BREACH), (60, BREACH), (90, OK), (120, BREACH), (150, OK), (180, OK), (210, OK)])

    assert [(t.kind, t.at) for t in transitions] == [
        (TransitionKind.FIRED, _at(60)),
        (TransitionKind.RESOLVED, _at(210)),
    ]
    assert state.phase is Phase.OK


def test_unknown_holds_the_state_where_it_is() -> None:
    pending, _ = _run([(0, BREACH)])
    held, transitions = _run([(30, UNKNOWN), (45, UNKNOWN)], state=pending)
    assert (held, transitions) == (pending, [])

    firing, transitions = _run([(60, BREACH)], state=held)
    assert [t.kind for t in transitions] == [TransitionKind.FIRED]

    still, transitions = _run([(600, UNKNOWN), (6000, UNKNOWN)], state=firing)
    assert (still, transitions) == (firing, [])


def test_a_silenced_alert_changes_state_but_posts_nothing() -> None:
    silence = Silence(KEY, until=_at(3600), by="U0OPERATOR", reason="deploying")

    state, transitions = _run([(0, BREACH), (60, BREACH), (90, BREACH)], silences=[silence])

    assert state.phase is Phase.FIRING
    assert len(transitions) == 1
    assert (transitions[0].silenced, transitions[0].silence) == (True, silence)
    assert not state.announced

    state, transitions = _run([(120, OK), (180, OK)], state=state, silences=[silence])
    assert state.phase is Phase.OK
    assert [(t.kind, t.silenced, t.announced) for t in transitions] == [(TransitionKind.RESOLVED, True, False)]


def test_a_silence_that_expires_while_still_failing_fires_again() -> None:
    silence = Silence(KEY, until=_at(300), by="U0OPERATOR")

    state, transitions = _run([(0, BREACH), (60, BREACH), (240, BREACH)], silences=[silence])
    assert [t.silenced for t in transitions] == [True]

    # At the silence's end exactly, it no longer covers the alert.
    state, transitions = _run([(300, BREACH), (330, BREACH), (360, BREACH)], state=state, silences=[silence])

    assert len(transitions) == 1
    again = transitions[0]
    assert (again.kind, again.at, again.silenced, again.after_silence) == (TransitionKind.FIRED, _at(300), False, True)
    assert again.since == _at(0)
    assert state.announced and not state.muted


def test_silencing_an_announced_alert_then_expiry_tells_the_channel_again() -> None:
    silence = Silence(KEY, until=_at(600), by="U0OPERATOR")
    announced, transitions = _run([(0, BREACH), (60, BREACH)])
    assert [t.silenced for t in transitions] == [False]

    state, transitions = _run(
        [(120, BREACH), (300, OK), (330, BREACH), (590, BREACH), (600, BREACH), (630, BREACH)],
        state=announced,
        silences=[silence],
    )

    assert [(t.kind, t.at, t.after_silence) for t in transitions] == [(TransitionKind.FIRED, _at(600), True)]
    assert (state.phase, state.fired_at, state.muted) == (Phase.FIRING, _at(60), False)


def test_a_resolve_under_silence_is_silenced_but_the_message_can_still_be_edited() -> None:
    silence = Silence(KEY, until=_at(3600), by="U0OPERATOR")
    announced, _ = _run([(0, BREACH), (60, BREACH)])

    state, transitions = _run([(120, OK), (180, OK)], state=announced, silences=[silence])

    assert state.phase is Phase.OK
    assert [(t.kind, t.silenced, t.announced) for t in transitions] == [(TransitionKind.RESOLVED, True, True)]


def test_a_silence_of_another_alert_does_not_apply() -> None:
    other = Silence("shop/db/ServiceDown", until=_at(3600), by="U0OPERATOR")

    _, transitions = _run([(0, BREACH), (60, BREACH)], silences=[other])

    assert [t.silenced for t in transitions] == [False]


def test_times_must_be_timezone_aware() -> None:
    naive = datetime(2025, 3, 1, 9, 0)
    with pytest.raises(ValueError, match="timezone-aware"):
        evaluate(AlertState(KEY), BREACH, naive, rule=DownRule(kind="down"))
    with pytest.raises(ValueError, match="timezone-aware"):
        Silence(KEY, until=naive, by="U0OPERATOR")
