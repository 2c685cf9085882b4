"""AWS cost from Cost Explorer (runbook 002): moto in server mode answers GetCostAndUsage from results
queued through its /moto-api/static/ce/cost-and-usage-results endpoint, shaped like AWS's own answers
(daily or monthly, grouped by SERVICE, both metrics); failures moto cannot make come from a botocore
Stubber or a loopback socket that never answers."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from typing import Any

import aiohttp
import pytest
from botocore.stub import Stubber  # type: ignore[import-untyped]

from services.cost import (
    CostCache,
    CostError,
    cost_cache_for,
    cost_settings,
    make_client,
    parse_month,
    read_costs,
)
from services.inventory import CostSettings
from tests.fixtures.aws import FAKE_SECRET_ACCESS_KEY
from tests.scenario.harness import inventory

TODAY = date(2026, 11, 16)  # month to date: Nov 1-15, against Oct 1-15
NOW = datetime(2026, 11, 16, 9, 30, tzinfo=UTC)
LAMBDA, GATEWAY, LOGS = "AWS Lambda", "Amazon API Gateway", "AmazonCloudWatch"


def settings(endpoint: str | None = None, **extra: Any) -> CostSettings:
    values: dict[str, Any] = {
        # a tag value of its own per test: moto answers a repeated query with the result it gave before
        "tags": {"Project": f"work-logging-{uuid.uuid4().hex[:8]}"},
        "accounts": ["123456789012"],
        "endpoint_url": endpoint,
        "timeout": 10,
    }
    values.update(extra)
    return CostSettings(**values)


def metrics(unblended: float) -> dict[str, Any]:
    # Blended differs from unblended under consolidated billing; 0.9 keeps the two apart in assertions.
    return {
        "BlendedCost": {"Amount": f"{unblended * 0.9:.10f}", "Unit": "USD"},
        "UnblendedCost": {"Amount": f"{unblended:.10f}", "Unit": "USD"},
    }


def period(start: date, end: date, costs: dict[str, float], estimated: bool = False) -> dict[str, Any]:
    return {
        "TimePeriod": {"Start": start.isoformat(), "End": end.isoformat()},
        "Total": {},  # grouped answers carry their figures in the groups
        "Groups": [{"Keys": [name], "Metrics": metrics(amount)} for name, amount in costs.items()],
        "Estimated": estimated,
    }


def daily_costs(day: date) -> dict[str, float]:
    """October: Lambda $0.80 a day; November: $1.00, and $10.00 on Nov 12 (a runaway loop)."""
    lam = 0.80 if day.month == 10 else 1.00
    if day == date(2026, 11, 12):
        lam = 10.00
    return {LAMBDA: lam, GATEWAY: 0.50, LOGS: 0.25}


def daily_pages(start: date, end: date) -> list[dict[str, Any]]:
    """Daily results from ``start`` to ``end`` (exclusive) in two pages, the first with a NextPageToken."""
    days = [start + timedelta(days=n) for n in range((end - start).days)]
    results = [period(d, d + timedelta(days=1), daily_costs(d), estimated=d >= end - timedelta(days=2)) for d in days]
    half = len(results) // 2
    first = {"ResultsByTime": results[:half], "DimensionValueAttributes": [], "NextPageToken": "page-2-token"}
    return [first, {"ResultsByTime": results[half:], "DimensionValueAttributes": []}]


def one_page(start: date, end: date) -> dict[str, Any]:
    """Daily results from ``start`` to ``end`` (exclusive) as one page."""
    pages = daily_pages(start, end)
    return {"ResultsByTime": pages[0]["ResultsByTime"] + pages[1]["ResultsByTime"], "DimensionValueAttributes": []}


async def queue_results(endpoint: str, results: list[dict[str, Any]]) -> None:
    """Queue answers for moto's next GetCostAndUsage requests (each new query takes the next one)."""
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{endpoint}/moto-api/static/ce/cost-and-usage-results", json={"results": results}) as resp,
    ):
        assert resp.status == 201, await resp.text()


class Requests:
    """Counts the GetCostAndUsage requests the bot's own clients send, with their arguments and auth."""

    def __init__(self) -> None:
        self.params: list[dict[str, Any]] = []
        self.authorizations: list[str] = []

    def factory(self, cost: CostSettings) -> Any:
        client = make_client(cost)
        client.meta.events.register("provide-client-params.ce.GetCostAndUsage", self._params)
        client.meta.events.register("before-send.ce.GetCostAndUsage", self._sent)
        return client

    def _params(self, params: dict[str, Any], **_: Any) -> None:
        self.params.append(dict(params))

    def _sent(self, request: Any, **_: Any) -> None:
        self.authorizations.append(str(request.headers.get("Authorization", "")))

    @property
    def sent(self) -> int:
        return len(self.authorizations)


@pytest.fixture
def requests(monkeypatch: pytest.MonkeyPatch) -> Iterator[Requests]:
    # The app runs in Seoul: Cost Explorer must still be asked in us-east-1.
    monkeypatch.setenv("AWS_DEFAULT_REGION", "ap-northeast-2")
    yield Requests()


async def test_month_to_date_against_last_month_with_projection_and_anomaly(
    moto_endpoint: str, requests: Requests
) -> None:
    cost = settings(moto_endpoint)
    await queue_results(moto_endpoint, daily_pages(date(2026, 10, 1), TODAY))

    report = await read_costs(
        "work-logging", cost, month=date(2026, 11, 1), now=NOW, cache=CostCache(), client_factory=requests.factory
    )

    # One query, two pages (each page is one more $0.01 request), signed for us-east-1.
    assert requests.sent == 2
    assert all("/us-east-1/ce/aws4_request" in auth for auth in requests.authorizations)
    first = requests.params[0]
    assert first["TimePeriod"] == {"Start": "2026-10-01", "End": "2026-11-16"}
    assert first["Granularity"] == "DAILY"
    assert sorted(first["Metrics"]) == ["BlendedCost", "UnblendedCost"]
    assert first["GroupBy"] == [{"Type": "DIMENSION", "Key": "SERVICE"}]
    tag = cost.tags["Project"][0]
    assert first["Filter"] == {
        "And": [
            {"Tags": {"Key": "Project", "Values": [tag], "MatchOptions": ["EQUALS"]}},
            {"Dimensions": {"Key": "LINKED_ACCOUNT", "Values": ["123456789012"]}},
        ]
    }
    assert requests.params[1]["NextPageToken"] == "page-2-token"

    # Nov 1-15: Lambda 14 x $1 + $10, API Gateway 15 x $0.50, CloudWatch 15 x $0.25.
    assert report.to_date and report.through == date(2026, 11, 15)
    assert report.total == pytest.approx(35.25)
    assert report.totals["BlendedCost"] == pytest.approx(35.25 * 0.9)
    # Oct 1-15: Lambda 15 x $0.80, the others as in November.
    assert report.before == pytest.approx(23.25)
    assert report.before_label == "same days of last month (Oct 1-15)"
    assert [(s.name, round(s.amount, 2), round(s.before or 0, 2)) for s in report.top] == [
        (LAMBDA, 24.0, 12.0),
        (GATEWAY, 7.5, 7.5),
        (LOGS, 3.75, 3.75),
    ]
    # The last 7 days (Nov 9-15): six at $1.75 and Nov 12 at $10.75 → $3.04/day for the 15 days left.
    rate = (6 * 1.75 + 10.75) / 7
    assert report.daily_rate == pytest.approx(rate)
    assert report.projection == pytest.approx(35.25 + 15 * rate)
    # Nov 12 against the mean of Nov 5-11 ($1.75): the one anomaly.
    assert [(a.day, round(a.amount, 2), round(a.mean, 2)) for a in report.anomalies] == [
        (date(2026, 11, 12), 10.75, 1.75)
    ]
    assert report.estimated  # the newest days are marked estimated by AWS
    assert not report.cached and report.read_at == NOW


async def test_a_second_read_the_same_day_makes_no_request(moto_endpoint: str, requests: Requests) -> None:
    cost = settings(moto_endpoint)
    cache = CostCache()
    await queue_results(moto_endpoint, [one_page(date(2026, 10, 1), TODAY)])

    first = await read_costs(
        "svc", cost, month=date(2026, 11, 1), now=NOW, cache=cache, client_factory=requests.factory
    )
    later = NOW + timedelta(hours=5)
    again = await read_costs(
        "svc", cost, month=date(2026, 11, 1), now=later, cache=cache, client_factory=requests.factory
    )

    assert requests.sent == 1, "the second read the same day asked Cost Explorer again"
    assert again.cached and not first.cached
    assert again.read_at == NOW
    assert again.total == pytest.approx(first.total)

    # The next UTC day is a new query (its dates move on), read once more.
    await queue_results(moto_endpoint, [one_page(date(2026, 10, 1), TODAY + timedelta(days=1))])
    tomorrow = await read_costs(
        "svc", cost, month=date(2026, 11, 1), now=NOW + timedelta(days=1), cache=cache, client_factory=requests.factory
    )
    assert requests.sent == 2
    assert not tomorrow.cached
    assert len(cache) == 1  # yesterday's answer is dropped, not kept beside today's


async def test_two_reads_at_once_pay_for_one_request(moto_endpoint: str, requests: Requests) -> None:
    cost = settings(moto_endpoint)
    cache = CostCache()
    await queue_results(moto_endpoint, [one_page(date(2026, 10, 1), TODAY)])

    reports = await asyncio.gather(
        *(
            read_costs("svc", cost, month=date(2026, 11, 1), now=NOW, cache=cache, client_factory=requests.factory)
            for _ in range(3)
        )
    )

    assert requests.sent == 1
    assert sorted(r.cached for r in reports) == [False, True, True]


def test_the_cache_is_bounded() -> None:
    cache = CostCache(size=3)
    for n in range(5):
        cache.put(f"query-{n}", TODAY, NOW, [])
    assert len(cache) == 3
    assert cache.get("query-0", TODAY) is None
    assert cache.get("query-4", TODAY) is not None


async def test_a_past_month_is_its_total_by_service_against_the_month_before(
    moto_endpoint: str, requests: Requests
) -> None:
    cost = settings(moto_endpoint, top=2)
    september = {LAMBDA: 20.0, GATEWAY: 14.0, LOGS: 6.0, "Amazon Simple Storage Service": 0.4}
    october = {LAMBDA: 24.8, GATEWAY: 15.5, LOGS: 7.75, "Amazon Simple Storage Service": 0.45}
    await queue_results(
        moto_endpoint,
        [
            {
                "ResultsByTime": [
                    period(date(2026, 9, 1), date(2026, 10, 1), september),
                    period(date(2026, 10, 1), date(2026, 11, 1), october),
                ],
                "DimensionValueAttributes": [],
            }
        ],
    )

    report = await read_costs(
        "svc", cost, month=date(2026, 10, 1), now=NOW, cache=CostCache(), client_factory=requests.factory
    )

    assert requests.params[0]["Granularity"] == "MONTHLY"
    assert requests.params[0]["TimePeriod"] == {"Start": "2026-09-01", "End": "2026-11-01"}
    assert not report.to_date and report.projection is None and not report.anomalies
    assert report.total == pytest.approx(48.5)
    assert report.before == pytest.approx(40.4)
    assert report.before_label == "September 2026"
    assert [(s.name, s.amount, s.before) for s in report.top] == [(LAMBDA, 24.8, 20.0), (GATEWAY, 15.5, 14.0)]
    assert report.others == pytest.approx(8.2) and report.others_count == 2


async def test_the_first_day_of_a_month_shows_last_month_whole(moto_endpoint: str, requests: Requests) -> None:
    cost = settings(moto_endpoint)
    first_day = date(2026, 11, 1)
    await queue_results(moto_endpoint, [one_page(date(2026, 10, 1), first_day)])
    report = await read_costs(
        "svc",
        cost,
        month=first_day,
        now=datetime(2026, 11, 1, 8, tzinfo=UTC),
        cache=CostCache(),
        client_factory=requests.factory,
    )
    assert requests.params[0]["TimePeriod"] == {"Start": "2026-10-01", "End": "2026-11-01"}
    assert report.through is None and report.total == 0
    assert report.before_label == "October 2026 in all"
    assert report.before is not None and report.before > 0
    # No day of November yet: the projection is the last 7 days' mean ($1.55) for all 30 days.
    assert report.projection == pytest.approx(30 * 1.55)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-13", "'2026-13' is not a month: write it as YYYY-MM, e.g. 2026-11."),
        ("november", "'november' is not a month: write it as YYYY-MM, e.g. 2026-11."),
        ("2026-1", "'2026-1' is not a month"),
        ("2026-12", "2026-12 is in the future: the latest month with costs is 2026-11."),
        ("2023-08", "2023-08 is more than 38 months ago: Cost Explorer keeps no costs that old."),
    ],
)
def test_a_bad_month_is_one_sentence(text: str, expected: str) -> None:
    with pytest.raises(CostError) as caught:
        parse_month(text, TODAY)
    assert caught.value.message.startswith(expected), caught.value.message


def test_good_months() -> None:
    assert parse_month(None, TODAY) == date(2026, 11, 1)
    assert parse_month("2026-11", TODAY) == date(2026, 11, 1)
    assert parse_month("2023-09", TODAY) == date(2023, 9, 1)


@pytest.fixture
def stubbed() -> Iterator[tuple[Any, Stubber]]:
    client = make_client(settings("http://127.0.0.1:9"))  # never reached: the Stubber answers
    with Stubber(client) as stubber:
        yield client, stubber


@pytest.mark.parametrize(
    ("code", "status", "expected"),
    [
        ("AccessDeniedException", 400, "Cost Explorer refused: access denied (ce:GetCostAndUsage) reading the AWS"),
        ("LimitExceededException", 429, "Cost Explorer is rate-limiting the bot (ce:GetCostAndUsage quota)"),
        ("DataUnavailableException", 400, "Cost Explorer has no data yet for the AWS costs of svc"),
        ("UnrecognizedClientException", 400, "AWS refused the bot's credentials (UnrecognizedClientException)"),
    ],
)
async def test_api_errors_are_one_plain_sentence(
    stubbed: tuple[Any, Stubber], code: str, status: int, expected: str
) -> None:
    client, stubber = stubbed
    stubber.add_client_error(
        "get_cost_and_usage",
        service_error_code=code,
        service_message=f"User arn:aws:iam::123456789012:user/bot key {FAKE_SECRET_ACCESS_KEY}",
        http_status_code=status,
    )
    cache = CostCache()
    with pytest.raises(CostError) as caught:
        await read_costs(
            "svc", settings(), month=date(2026, 11, 1), now=NOW, cache=cache, client_factory=lambda _: client
        )

    assert caught.value.message.startswith(expected), caught.value.message
    assert FAKE_SECRET_ACCESS_KEY not in caught.value.message and "arn:aws" not in caught.value.message
    assert len(cache) == 0  # a failure is not cached: the next try asks again
    stubber.assert_no_pending_responses()


async def test_throttling_is_retried_before_giving_up() -> None:
    """A LimitExceededException answer is retried by botocore; one that persists is one sentence."""
    answered: list[int] = []

    def factory(cost: CostSettings) -> Any:
        client = make_client(cost)

        def throttle(**_: Any) -> Any:
            from botocore.awsrequest import AWSResponse  # type: ignore[import-untyped]

            answered.append(1)
            body = b'{"__type":"LimitExceededException","Message":"Rate exceeded"}'
            return AWSResponse("http://x", 400, {"Content-Type": "application/x-amz-json-1.1"}, _Raw(body))

        client.meta.events.register("before-send.ce.GetCostAndUsage", throttle)
        return client

    with pytest.raises(CostError, match=r"rate-limiting the bot \(ce:GetCostAndUsage quota\).*try again in a minute"):
        await read_costs(
            "svc",
            settings("http://127.0.0.1:9"),
            month=date(2026, 11, 1),
            now=NOW,
            cache=CostCache(),
            client_factory=factory,
        )
    assert len(answered) == 3  # botocore's standard mode: the first try and two retries


class _Raw:
    def __init__(self, body: bytes) -> None:
        self._body = body

    def stream(self, **_: Any) -> Iterator[bytes]:
        yield self._body


async def test_a_hanging_endpoint_is_cut_off_at_the_timeout() -> None:
    accepted: list[asyncio.StreamWriter] = []

    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)  # keep the connection open and say nothing

    server = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    loop = asyncio.get_running_loop()
    try:
        started = loop.time()
        with pytest.raises(CostError) as caught:
            await read_costs(
                "svc",
                settings(f"http://127.0.0.1:{port}", timeout=0.5),
                month=date(2026, 11, 1),
                now=NOW,
                cache=CostCache(),
            )
        assert loop.time() - started < 2.5
        assert caught.value.message == (
            f"http://127.0.0.1:{port} did not answer within 0.5 s reading the AWS costs of svc."
        )
        assert accepted, "the bot never connected: the timeout was not what stopped it"
    finally:
        for writer in accepted:
            writer.close()
        server.close()
        await server.wait_closed()


def test_the_client_is_always_in_us_east_1(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    client = make_client(settings())
    try:
        # boto3 names Cost Explorer's region "aws-global"; requests are signed for us-east-1 (asserted above).
        assert client.meta.region_name in ("us-east-1", "aws-global")
        assert client.meta.endpoint_url == "https://ce.us-east-1.amazonaws.com"
    finally:
        client.close()


INVENTORY = """
roles: {viewer: ["*"]}
services:
  shop:
    components: {api: {type: http, url: "http://127.0.0.1:1"}}
  work-logging:
    components: {api: {type: http, url: "http://127.0.0.1:1"}}
    cost: {tags: {Project: work-logging}}
"""


def test_a_service_without_a_cost_section_is_one_sentence() -> None:
    loaded = inventory(INVENTORY)
    assert cost_settings(loaded.inventory, "work-logging").tags == {"Project": ["work-logging"]}
    with pytest.raises(CostError) as caught:
        cost_settings(loaded.inventory, "shop")
    assert caught.value.message == (
        "shop declares no AWS cost: add a `cost:` section with its cost allocation `tags` or linked `accounts` to "
        "the inventory (services with one: work-logging)."
    )


@pytest.mark.parametrize(
    ("section", "problem"),
    [
        ("{}", "declare `tags` and/or `accounts`"),
        ("{accounts: ['12345']}", "services.shop.cost.accounts.0"),
        ("{tags: {Project: []}}", "tag 'Project' needs at least one value"),
        ("{tags: {Project: x}, metric: AmortizedCost}", "services.shop.cost.metric"),
        ("{tags: {Project: x}, region: eu-west-1}", "services.shop.cost.region"),
    ],
)
def test_a_bad_cost_section_is_refused_by_path(section: str, problem: str) -> None:
    from services.errors import InventoryError

    text = f"""
roles: {{viewer: ["*"]}}
services:
  shop:
    components: {{api: {{type: http, url: "http://127.0.0.1:1"}}}}
    cost: {section}
"""
    with pytest.raises(InventoryError) as caught:
        inventory(text)
    assert any(problem in line for line in caught.value.problems), caught.value.problems


def test_one_cache_per_bot() -> None:
    class Store:
        pass

    one, other = Store(), Store()
    assert cost_cache_for(one) is cost_cache_for(one)
    assert cost_cache_for(one) is not cost_cache_for(other)


def test_one_expression_is_not_wrapped_in_and() -> None:
    from services.cost import cost_filter

    assert cost_filter(CostSettings(accounts=["123456789012"])) == {
        "Dimensions": {"Key": "LINKED_ACCOUNT", "Values": ["123456789012"]}
    }
    assert cost_filter(CostSettings(tags={"Project": ["a", "b"]})) == {
        "Tags": {"Key": "Project", "Values": ["a", "b"], "MatchOptions": ["EQUALS"]}
    }
