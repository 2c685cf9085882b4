"""Queue rules (runbook 001's Bull queues): QueueFailureRate and QueueBacklog, their models, their
checks against readings, and where the inventory accepts them."""

from __future__ import annotations

import pytest
from pydantic import TypeAdapter, ValidationError

from services.alerts.models import QUEUE_NAME
from services.alerts.rules import (
    AlertRule,
    Observation,
    QueueBacklogRule,
    QueueFailureRateRule,
    QueueReading,
    Verdict,
    check,
)
from services.errors import InventoryError
from services.inventory import parse_inventory
from services.queues import QUEUE_NAME as CLIENT_QUEUE_NAME

RULES: TypeAdapter[AlertRule] = TypeAdapter(AlertRule)
FAILURES = QueueFailureRateRule(kind="queue_failure_rate")
BACKLOG = QueueBacklogRule(kind="queue_oldest_waiting")


def seen(*queues: QueueReading) -> Observation:
    return Observation(True, queues=queues)


# --- models ----------------------------------------------------------------------------------------


def test_queue_rules_load_with_their_defaults_and_titles() -> None:
    failures = RULES.validate_python({"kind": "queue_failure_rate"})
    backlog = RULES.validate_python({"kind": "queue_oldest_waiting", "queue": "images", "for_minutes": 0})

    assert isinstance(failures, QueueFailureRateRule)
    assert (failures.threshold_pct, failures.min_finished, failures.queue) == (10, 20, None)
    assert failures.key("vcc", "redis") == "vcc/redis/QueueFailureRate"
    assert isinstance(backlog, QueueBacklogRule)
    assert (backlog.threshold_minutes, backlog.queue) == (15, "images")
    assert backlog.key("vcc", "redis") == "vcc/redis/QueueBacklog"


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        ({"kind": "queue_failure_rate", "threshold_pct": 0}, "threshold_pct"),
        ({"kind": "queue_failure_rate", "threshold_pct": 100}, "threshold_pct"),
        ({"kind": "queue_failure_rate", "min_finished": 0}, "min_finished"),
        ({"kind": "queue_oldest_waiting", "threshold_minutes": 0}, "threshold_minutes"),
        ({"kind": "queue_oldest_waiting", "queue": "bull:*"}, "a queue name is letters, digits"),
        ({"kind": "queue_failure_rate", "queue": "a/b"}, "a queue name is letters, digits"),
        ({"kind": "queue_failure_rate", "queue": ""}, "a queue name is letters, digits"),
        ({"kind": "queue_oldest_waiting", "queues": "images"}, "queues"),
    ],
)
def test_bad_queue_rules_are_refused_with_the_field_named(data: dict[str, object], problem: str) -> None:
    with pytest.raises(ValidationError, match=problem):
        RULES.validate_python(data)


def test_a_rule_accepts_exactly_the_queue_names_the_queue_client_does() -> None:
    assert QUEUE_NAME.pattern == CLIENT_QUEUE_NAME.pattern


# --- QueueFailureRate --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("failed", "finished", "verdict"),
    [
        (12, 120, Verdict.OK),  # exactly 10 %: "above 10 %" does not breach
        (3, 30, Verdict.OK),  # exactly 10 % again
        (13, 120, Verdict.BREACH),
        (0, 500, Verdict.OK),
        (20, 20, Verdict.BREACH),  # exactly the minimum of finished jobs is judged
    ],
)
def test_failure_rate_breaches_only_above_the_threshold(failed: int, finished: int, verdict: Verdict) -> None:
    condition = check(FAILURES, seen(QueueReading("images", finished=finished, failed=failed)))

    assert condition.verdict is verdict
    assert condition.value == pytest.approx(failed * 100 / finished)


def test_failure_rate_evidence_names_the_worst_queue_and_its_figure() -> None:
    condition = check(
        FAILURES,
        seen(
            QueueReading("mail", finished=400, failed=20),  # 5 %
            QueueReading("images", finished=120, failed=41),  # 34.2 %
            QueueReading("thumbs", finished=50, failed=6),  # 12 %: above too
        ),
    )

    assert condition.verdict is Verdict.BREACH
    assert condition.evidence == (
        "images: 34.2 % of 120 jobs failed in 15 min; alerts above 10 % (1 more queue above it too)"
    )


def test_too_few_finished_jobs_are_ok_and_say_so() -> None:
    condition = check(FAILURES, seen(QueueReading("images", finished=19, failed=19), QueueReading("mail")))

    assert condition.verdict is Verdict.OK
    assert condition.evidence == "too few jobs finished to judge: images: 19 jobs in 15 min (judged from 20)"


def test_a_queue_with_too_few_jobs_does_not_hide_a_busy_one_that_fails() -> None:
    rule = QueueFailureRateRule(kind="queue_failure_rate", min_finished=5)
    condition = check(
        rule, seen(QueueReading("tiny", finished=4, failed=4), QueueReading("big", finished=10, failed=2))
    )

    assert condition.verdict is Verdict.BREACH and condition.evidence.startswith("big: 20 % of 10 jobs failed")


def test_a_capped_read_says_about() -> None:
    condition = check(FAILURES, seen(QueueReading("images", finished=4500, failed=900, estimated=True)))
    assert condition.verdict is Verdict.BREACH
    assert condition.evidence.startswith("images: 20 % of about 4,500 jobs failed in 15 min")


def test_a_named_queue_is_judged_alone() -> None:
    rule = QueueFailureRateRule(kind="queue_failure_rate", queue="mail")
    readings = seen(QueueReading("images", finished=100, failed=90), QueueReading("mail", finished=100, failed=1))

    condition = check(rule, readings)

    assert condition.verdict is Verdict.OK and condition.evidence.startswith("mail: 1 % of 100 jobs")


@pytest.mark.parametrize("rule", [FAILURES, BACKLOG], ids=["failure_rate", "backlog"])
def test_unread_queues_are_unknown_never_a_breach(rule: AlertRule) -> None:
    condition = check(
        rule, Observation(False, detail="connection refused", queues_problem="Redis failed: connection refused")
    )
    assert condition.verdict is Verdict.UNKNOWN
    assert condition.evidence == "cannot read the queues: Redis failed: connection refused"


@pytest.mark.parametrize("kind", ["queue_failure_rate", "queue_oldest_waiting"])
def test_a_named_queue_missing_from_redis_is_unknown(kind: str) -> None:
    rule = RULES.validate_python({"kind": kind, "queue": "mail"})
    condition = check(rule, seen(QueueReading("images", finished=100, failed=90, waiting=5)))
    assert condition.verdict is Verdict.UNKNOWN and condition.evidence == "there is no queue mail in this Redis"


@pytest.mark.parametrize("rule", [FAILURES, BACKLOG], ids=["failure_rate", "backlog"])
def test_a_redis_without_queues_is_ok(rule: AlertRule) -> None:
    condition = check(rule, seen())
    assert condition.verdict is Verdict.OK and condition.evidence == "no queues found in this Redis"


# --- QueueBacklog ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "verdict"),
    [
        (15 * 60, Verdict.OK),  # exactly 15 min: "above 15 min" does not breach
        (15 * 60 + 1, Verdict.BREACH),
        (30, Verdict.OK),
    ],
)
def test_backlog_breaches_only_above_the_threshold(seconds: float, verdict: Verdict) -> None:
    condition = check(BACKLOG, seen(QueueReading("images", waiting=7, oldest_waiting_seconds=seconds)))

    assert condition.verdict is verdict
    assert condition.value == pytest.approx(seconds / 60)


def test_backlog_evidence_names_the_queue_waiting_longest() -> None:
    condition = check(
        BACKLOG,
        seen(
            QueueReading("mail", waiting=2, oldest_waiting_seconds=40),
            QueueReading("images", waiting=7, oldest_waiting_seconds=42 * 60 + 5),
        ),
    )
    assert condition.verdict is Verdict.BREACH
    assert condition.evidence == "images: the oldest of 7 waiting jobs has waited 42 min; alerts above 15 min"


def test_a_paused_queue_is_not_a_stall() -> None:
    paused = QueueReading("images", paused=True, waiting=3, oldest_waiting_seconds=5 * 3600)

    alone = check(BACKLOG, seen(paused))
    beside = check(BACKLOG, seen(paused, QueueReading("mail", waiting=1, oldest_waiting_seconds=61)))

    assert alone.verdict is Verdict.OK
    assert alone.evidence == "images is paused: its 3 waiting jobs are not a stall"
    assert beside.verdict is Verdict.OK
    assert beside.evidence == (
        "mail: the oldest of 1 waiting jobs has waited 1 min; alerts above 15 min "
        "(images is paused: its 3 waiting jobs are not a stall)"
    )


def test_an_empty_queue_is_ok_and_an_unknown_age_is_unknown() -> None:
    empty = check(BACKLOG, seen(QueueReading("images")))
    unaged = check(BACKLOG, seen(QueueReading("images", waiting=4)))

    assert (empty.verdict, empty.evidence) == (Verdict.OK, "no jobs waiting")
    assert unaged.verdict is Verdict.UNKNOWN
    assert unaged.evidence == "images: the age of the oldest waiting job is not known"


# --- where the inventory accepts them ----------------------------------------------------------------


def problems_of(text: str) -> list[str]:
    with pytest.raises(InventoryError) as caught:
        parse_inventory(text, "test.yaml", {})
    return caught.value.problems


def test_queue_rules_load_on_a_redis_that_declares_queues() -> None:
    loaded = parse_inventory(
        """
services:
  vcc:
    components:
      redis:
        type: redis
        url: redis://127.0.0.1:6379/0
        queues: {library: bull, names: [images, mail]}
        alerts:
          - {kind: queue_failure_rate, threshold_pct: 20}
          - {kind: queue_oldest_waiting, queue: images}
          - {kind: queue_oldest_waiting, name: MailBacklog, queue: mail, threshold_minutes: 60}
""",
        "test.yaml",
        {},
    )
    rules = loaded.inventory.services["vcc"].components["redis"].alerts
    assert [r.key("vcc", "redis") for r in rules] == [
        "vcc/redis/QueueFailureRate",
        "vcc/redis/QueueBacklog",
        "vcc/redis/MailBacklog",
    ]


@pytest.mark.parametrize(
    ("component", "problem"),
    [
        (
            "{type: http, url: 'https://vcc.example.com', alerts: [{kind: queue_failure_rate}]}",
            "services.vcc.components.c.alerts.0: a queue_failure_rate rule reads Bull/BullMQ queues, so it belongs "
            "on a redis component with `queues:`, not on a http component",
        ),
        (
            "{type: redis, url: 'redis://h:6379/0', alerts: [{kind: down}, {kind: queue_oldest_waiting}]}",
            "services.vcc.components.c.alerts.1: a queue_oldest_waiting rule needs `queues:` on this redis "
            "component (the library and prefix of its queues)",
        ),
        (
            "{type: redis, url: 'redis://h:6379/0', queues: {library: bullmq, names: [images, mail]}, "
            "alerts: [{kind: queue_oldest_waiting, queue: thumbs}]}",
            "services.vcc.components.c.alerts.0.queue: 'thumbs' is not one of the declared queues: images, mail",
        ),
        (
            "{type: redis, url: 'redis://h:6379/0', queues: {library: bull}, "
            "alerts: [{kind: queue_oldest_waiting, queue: images}, {kind: queue_oldest_waiting, queue: mail}]}",
            "services.vcc.components.c.alerts.1.name: an earlier rule of this component is already called "
            "'QueueBacklog'; give each rule its own `name`",
        ),
    ],
    ids=["not-redis", "no-queues", "undeclared-queue", "same-name"],
)
def test_queue_rules_where_they_cannot_work_are_refused_in_one_sentence(component: str, problem: str) -> None:
    assert problems_of(f"services: {{vcc: {{components: {{c: {component}}}}}}}") == [problem]


def test_a_named_queue_on_a_discovering_redis_is_accepted() -> None:
    loaded = parse_inventory(
        "services: {vcc: {components: {c: {type: redis, url: 'redis://h:6379/0', queues: {library: bull}, "
        "alerts: [{kind: queue_failure_rate, queue: anything-here}]}}}}",
        "test.yaml",
        {},
    )
    [rule] = loaded.inventory.services["vcc"].components["c"].alerts
    assert isinstance(rule, QueueFailureRateRule) and rule.queue == "anything-here"


def test_a_bad_queue_name_in_the_inventory_is_one_plain_sentence() -> None:
    [problem] = problems_of(
        "services: {vcc: {components: {c: {type: redis, url: 'redis://h:6379/0', queues: {library: bull}, "
        "alerts: [{kind: queue_failure_rate, queue: 'bull:*'}]}}}}"
    )
    assert problem == (
        "services.vcc.components.c.alerts.0.queue: a queue name is letters, digits, `.`, `_` "
        "and `-` (at most 100, no wildcards, colons or slashes)"
    )
