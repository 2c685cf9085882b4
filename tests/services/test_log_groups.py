"""Error groups (messages of one shape, counted, first/last seen, an example), the log-secret masker, and
the nginx traffic summary."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from services.logs.base import LogLine
from services.logs.groups import BoundedCounter, ErrorGroups, TrafficSummary, group_key, parse_nginx, status_matches
from services.logs.mask import mask_secrets, scrub
from services.redaction import Redactor

T0 = datetime(2026, 12, 2, 9, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("user 42 not found", "user 1337 not found"),
        ("job 3f9a2c1e failed after 3 tries", "job 0b7d44aa failed after 12 tries"),
        ("order 550e8400-e29b-41d4-a716-446655440000 stuck", "order 6ba7b810-9dad-11d1-80b4-00c04fd430c8 stuck"),
        ("timeout at 2026-12-02T09:00:01.123Z to 10.0.0.7:5432", "timeout at 2026-12-01 23:59:59 to 10.1.2.3:6379"),
        ("KeyError: 'customer_id'", "KeyError: 'order_total'"),
        ('no such table "jobs"', 'no such table "users_2024"'),
        ("pointer 0xdeadbeef freed twice", "pointer 0x7ffee4 freed twice"),
    ],
)
def test_variable_parts_are_one_group(a: str, b: str) -> None:
    assert group_key(a) == group_key(b)


@pytest.mark.parametrize(
    ("a", "b"),
    [("user 42 not found", "user 42 deleted"), ("KeyError: 'x'", "ValueError: 'x'"), ("disk full", "disk fine")],
)
def test_different_words_are_different_groups(a: str, b: str) -> None:
    assert group_key(a) != group_key(b)


def test_groups_count_first_last_and_keep_the_newest_example() -> None:
    groups = ErrorGroups()
    times = [T0 + timedelta(minutes=m) for m in (5, 1, 9, 3)]  # lines arrive newest first, or in any order
    for i, at in enumerate(times):
        groups.add(LogLine(at, "error", f"payment {100 + i} declined"))
    groups.add(LogLine(T0, "error", "disk full"))
    [payment, disk] = groups.top(5)
    assert (payment.count, payment.first_seen, payment.last_seen) == (4, T0 + timedelta(minutes=1), times[2])
    assert payment.example == "payment 102 declined" and payment.key == "payment <n> declined"
    assert disk.count == 1 and len(groups) == 2 and groups.lines == 5


def test_groups_are_bounded() -> None:
    groups = ErrorGroups(max_groups=3)
    for word in ("alpha", "beta", "gamma", "delta", "epsilon"):
        groups.add(LogLine(T0, "error", f"{word} broke"))
    assert len(groups) == 3 and groups.other == 2


@pytest.mark.parametrize(
    ("line", "secret"),
    [
        ("retrying with password=s3cret-Pw!", "s3cret-Pw!"),
        ('{"db_password": "pa55word", "user": "x"}', "pa55word"),
        ("Authorization: Bearer abcDEF123456ghiJKL", "abcDEF123456ghiJKL"),
        ("jwt eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.Zm9vYmFyYmF6 seen", "eyJzdWIiOiIxIn0"),
        ("using key AKIAABCDEFGHIJKLMNOP", "AKIAABCDEFGHIJKLMNOP"),
        ("aws_secret_access_key = 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", "wJalrXUtnFEMI"),
        ("connect mongodb://root:m0ngo-pw@mongo:27017/app", "m0ngo-pw"),
        ("GET /cb?access_token=ya29.a0AfH6SM&state=1", "ya29.a0AfH6SM"),
        ("host=db user=app password=libpq-pw sslmode=require", "libpq-pw"),
        ("openai key sk-proj-abcdefghijklmnopqrstu", "sk-proj-abcdefghijklmnopqrstu"),
        ("X-Api-Key: 0123456789abcdef", "0123456789abcdef"),
    ],
)
def test_secrets_inside_log_lines_are_masked(line: str, secret: str) -> None:
    masked = mask_secrets(line)
    assert secret not in masked and "***" in masked


def test_scrub_also_masks_the_inventorys_own_secrets() -> None:
    assert scrub(Redactor(["plain-inventory-secret"]), "boot with plain-inventory-secret ok") == "boot with *** ok"
    assert mask_secrets("request 42 served in 3 ms") == "request 42 served in 3 ms"


def test_nginx_lines_and_status_filters() -> None:
    request = parse_nginx(
        '203.0.113.9 - - [02/Dec/2026:09:00:00 +0000] "GET /wp-login.php?x=1 HTTP/1.1" 404 0 "-" "scanner/1.0"'
    )
    assert request is not None
    assert (request.ip, request.method, request.path, request.status, request.agent) == (
        "203.0.113.9", "GET", "/wp-login.php", 404, "scanner/1.0",
    )  # fmt: skip
    assert parse_nginx("not an access line") is None
    assert status_matches(404, "4xx") and status_matches(404, "404") and not status_matches(500, "4xx")


def test_traffic_summary_counts_and_bounded_counters() -> None:
    summary = TrafficSummary()
    for ip, status in [("1.1.1.1", 200), ("1.1.1.1", 404), ("2.2.2.2", 404), ("2.2.2.2", 403), ("3.3.3.3", 500)]:
        stamp = "02/Dec/2026:09:00:00 +0000"
        summary.add(LogLine(T0, None, f'{ip} - - [{stamp}] "GET /a HTTP/1.1" {status} 5 "-" "ua"'))
    summary.add(LogLine(T0, None, "garbage"))
    assert summary.requests == 5 and summary.unparsed == 1 and summary.bytes == 25
    assert dict(summary.statuses) == {"2xx": 1, "4xx": 3, "5xx": 1}
    assert summary.ips_4xx.top(1) == [("2.2.2.2", 2)]
    counter = BoundedCounter(max_keys=10)
    for i in range(1000):
        counter.add("hot" if i % 2 else f"cold-{i}")
    assert len(counter.counts) <= 10 and counter.top(1) == [("hot", 500)] and counter.dropped > 0
