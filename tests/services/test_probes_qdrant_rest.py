"""The Qdrant probe over HTTP: the real client (``default_qdrant_client``) against the loopback Qdrant REST
server of tests/fixtures/qdrant.py — URL, ``api-key`` header, timeouts, 401/404/5xx, refused connections.

The local-mode tests in test_probes_datastores.py cover the colours and counts; these cover the wire.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable

import pytest
from qdrant_client import QdrantClient, models
from qdrant_client.http.exceptions import UnexpectedResponse

from bot.logging import configure_logging
from services.health import ProbeResult, Status, Target, check_health
from services.inventory import QdrantComponent
from services.probes.qdrant import QdrantProbe
from services.redaction import Redactor
from tests.fixtures.qdrant import FakeQdrant
from tests.fixtures.servers import free_port
from tests.fixtures.wait import wait_until_sync

# The fake serves plain HTTP on loopback, and qdrant-client rightly warns when an API key goes over
# plain HTTP; that warning is about our test set-up, not the code under test.
pytestmark = pytest.mark.filterwarnings("ignore:Api key is used with an insecure connection:UserWarning")

KEY = "qdr-Sup3rS3cret-0a1b2c3d4e"
WRONG_KEY = "qdr-Wr0ngKey-9z8y7x6w5v"
COLLECTION = "youtube_content"


@pytest.fixture
async def qdrant(fake_qdrant: FakeQdrant) -> AsyncIterator[FakeQdrant]:
    """The fake with one green collection of 3 points, seeded through a real client, and KEY required."""
    seed = fake_qdrant.client()
    try:
        await seed.create_collection(
            COLLECTION, vectors_config=models.VectorParams(size=4, distance=models.Distance.COSINE)
        )
        await seed.upsert(
            COLLECTION, points=[models.PointStruct(id=i, vector=[0.1 * i, 0.2, 0.3, 0.4]) for i in (1, 2, 3)]
        )
    finally:
        await seed.close()
    fake_qdrant.require_api_key(KEY)
    fake_qdrant.clear_requests()
    yield fake_qdrant


@pytest.fixture
def logs(capfd: pytest.CaptureFixture[str]) -> Callable[[], str]:
    """Everything logged during the test, at DEBUG, as JSON, through a redactor that knows no secret:
    a key that shows up here was logged, not masked."""
    configure_logging("json", "DEBUG", Redactor())
    capfd.readouterr()
    return lambda: "".join(capfd.readouterr())


def component(
    url: str, *, api_key: str | None = KEY, collections: list[str] | None = None, timeout: float = 3
) -> QdrantComponent:
    return QdrantComponent(
        type="qdrant", url=url, api_key=api_key, collections=collections or [COLLECTION], timeout=timeout
    )


def said(result: ProbeResult) -> str:
    """All text a result carries: detail, facts, checks."""
    return repr(result)


async def test_green_collection_is_healthy_with_its_point_count(qdrant: FakeQdrant, logs: Callable[[], str]) -> None:
    result = await QdrantProbe().probe(component(qdrant.url))

    assert result.status == Status.HEALTHY, result.detail
    assert result.detail == f"{COLLECTION} green · 3 points"
    assert result.facts == {f"status.{COLLECTION}": "green", f"points.{COLLECTION}": 3}
    # One request, to the URL's host and port, for the configured collection, with the key.
    [request] = qdrant.requests
    assert (request.method, request.path) == ("GET", f"/collections/{COLLECTION}")
    assert request.headers["host"] == f"127.0.0.1:{qdrant.port}"
    assert request.api_key == KEY
    assert KEY not in said(result) and KEY not in logs()


async def test_reported_colours_reach_the_result_over_rest(qdrant: FakeQdrant) -> None:
    qdrant.set_status(COLLECTION, "yellow")

    result = await QdrantProbe().probe(component(qdrant.url))

    assert result.status == Status.WARNING
    assert result.detail == f"{COLLECTION} yellow · 3 points"


async def test_missing_collection_is_critical_and_named(qdrant: FakeQdrant, logs: Callable[[], str]) -> None:
    result = await QdrantProbe().probe(component(qdrant.url, collections=[COLLECTION, "transcripts"]))

    assert result.status == Status.CRITICAL
    assert result.detail == f"transcripts missing · {COLLECTION} green · 3 points"
    assert result.facts["status.transcripts"] == "missing"
    assert [r.path for r in qdrant.requests] == [f"/collections/{COLLECTION}", "/collections/transcripts"]
    assert all(r.api_key == KEY for r in qdrant.requests)
    assert KEY not in said(result) and KEY not in logs()


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (500, None, "Qdrant answered 500 Internal Server Error"),
        (503, None, "Qdrant answered 503 Service Unavailable"),
        (502, "<html><body><h1>502 Bad Gateway</h1></body></html>", "Qdrant answered 502 Bad Gateway"),
    ],
    ids=["500-envelope", "503-envelope", "502-proxy-html"],
)
async def test_server_errors_are_answered_clearly(
    qdrant: FakeQdrant, logs: Callable[[], str], status: int, body: str | None, expected: str
) -> None:
    qdrant.fail(status, path="/collections/*", times=None, text=body)

    result = await QdrantProbe().probe(component(qdrant.url, collections=[COLLECTION, "transcripts"]))

    assert result.status == Status.CRITICAL
    assert result.detail == expected  # one shared reason, said once
    assert {c.name: c.detail for c in result.checks} == {
        COLLECTION: f"unreachable: {expected}",
        "transcripts": f"unreachable: {expected}",
    }
    assert "Traceback" not in said(result) and "Raw response" not in said(result)
    assert KEY not in said(result) and KEY not in logs()


async def test_a_single_failing_answer_only_affects_that_collection(qdrant: FakeQdrant) -> None:
    qdrant.fail(500, path="/collections/transcripts")

    result = await QdrantProbe().probe(component(qdrant.url, collections=[COLLECTION, "transcripts"]))

    assert (
        result.detail
        == f"transcripts unreachable: Qdrant answered 500 Internal Server Error · {COLLECTION} green · 3 points"
    )


@pytest.mark.parametrize(
    ("sent", "server_says"), [(WRONG_KEY, "Invalid API key or JWT"), (None, "Must provide an API key")]
)
async def test_a_refused_api_key_is_named_without_showing_any_key(
    qdrant: FakeQdrant, logs: Callable[[], str], sent: str | None, server_says: str
) -> None:
    result = await QdrantProbe().probe(component(qdrant.url, api_key=sent))

    assert result.status == Status.CRITICAL
    assert result.detail == "cannot log in: the API key was refused"
    [request] = qdrant.requests
    assert request.api_key == sent  # the configured key (or none) is what went over the wire
    everything = said(result) + logs()
    assert KEY not in everything and WRONG_KEY not in everything
    assert server_says not in result.detail  # the server's wording stays out of the report


async def test_a_hanging_server_is_cut_off_within_the_component_timeout(
    qdrant: FakeQdrant, logs: Callable[[], str]
) -> None:
    qdrant.hang(path="/collections/*")
    timeout = 1.5
    spec = component(qdrant.url, collections=[COLLECTION, "transcripts"], timeout=timeout)

    started = time.perf_counter()
    result = await QdrantProbe().probe(spec)
    elapsed = time.perf_counter() - started

    # Two hanging collections share the one budget (they used to take the client's timeout each).
    assert elapsed < timeout, f"the probe took {elapsed:.2f} s with a {timeout} s timeout"
    assert result.status == Status.CRITICAL
    assert result.detail == "no answer within 1.5 s"
    assert {c.name: c.detail for c in result.checks} == {
        COLLECTION: "unreachable: no answer within 1.5 s",
        "transcripts": "unreachable: no answer within 1.5 s",
    }
    # The client gives up on the first after its own whole-second timeout; the budget ends the second.
    assert [r.path for r in qdrant.requests] == [f"/collections/{COLLECTION}", "/collections/transcripts"]
    assert all(r.api_key == KEY for r in qdrant.requests)
    assert KEY not in said(result) and KEY not in logs()


async def test_a_hanging_server_in_a_health_check_reports_the_probes_own_reason(qdrant: FakeQdrant) -> None:
    qdrant.hang(path="/collections/*")
    spec = component(qdrant.url, timeout=1)

    started = time.perf_counter()
    report = await check_health(
        [Target("search", "vectors", spec)], lambda _: QdrantProbe(), deadline=10, redactor=Redactor()
    )
    elapsed = time.perf_counter() - started

    [item] = report.items
    assert elapsed < 1.0 + 0.5, f"the health check took {elapsed:.2f} s with a 1 s timeout"
    assert item.result.detail == "no answer within 1 s"
    # Checks per collection: the probe answered itself rather than being cut off by check_health.
    assert [c.name for c in item.result.checks] == [COLLECTION]


async def test_a_slow_answer_inside_the_timeout_is_healthy(qdrant: FakeQdrant) -> None:
    qdrant.hang(path="/collections/*", seconds=0.3)

    result = await QdrantProbe().probe(component(qdrant.url, timeout=3))

    assert result.status == Status.HEALTHY, result.detail
    assert result.latency_ms >= 300


async def test_nothing_listening_is_connection_refused(logs: Callable[[], str]) -> None:
    spec = component(f"http://127.0.0.1:{free_port()}", collections=["a", "b"], timeout=3)

    started = time.perf_counter()
    result = await QdrantProbe().probe(spec)

    assert time.perf_counter() - started < 3
    assert result.status == Status.CRITICAL
    assert result.detail == "connection refused"
    assert KEY not in said(result) and KEY not in logs()


async def test_every_request_carries_the_key_and_a_seeding_client_reads_the_same_data(qdrant: FakeQdrant) -> None:
    reader = qdrant.client(KEY)
    try:
        await reader.delete(COLLECTION, points_selector=models.PointIdsList(points=[2]))
        count = (await reader.count(COLLECTION, exact=True)).count
        points, next_offset = await reader.scroll(COLLECTION, limit=10, with_payload=False, with_vectors=False)
    finally:
        await reader.close()

    result = await QdrantProbe().probe(component(qdrant.url))

    assert count == 2 and [p.id for p in points] == [1, 3] and next_offset is None
    assert result.detail == f"{COLLECTION} green · 2 points"
    assert {r.api_key for r in qdrant.requests} == {KEY}


# --- the fake itself: what the integrity checker will rely on --------------------------------------------


def test_a_sync_client_pages_by_id_and_its_compatibility_check_passes(fake_qdrant: FakeQdrant) -> None:
    fake_qdrant.require_api_key(KEY)
    # check_compatibility on: the client reads GET / (open without a key) in a thread of its own.
    client = QdrantClient(url=fake_qdrant.url, headers={"api-key": KEY}, timeout=5)
    try:
        client.create_collection("docs", vectors_config=models.VectorParams(size=2, distance=models.Distance.DOT))
        client.upsert(
            "docs", points=[models.PointStruct(id=i, vector=[1.0, 0.0], payload={"n": i}) for i in (5, 1, 4, 2, 3)]
        )
        first, offset = client.scroll("docs", limit=3, with_payload=False, with_vectors=False)
        rest, end = client.scroll("docs", limit=3, offset=offset, with_payload=False, with_vectors=False)
        client.delete("docs", points_selector=models.PointIdsList(points=[1, 2]))
        left = client.count("docs", exact=True).count
        wait_until_sync(lambda: fake_qdrant.requests_to("/", "GET"), "the client checks the server version")
    finally:
        client.close()

    assert [p.id for p in first] == [1, 2, 3] and offset == 4 and first[0].payload is None
    assert [p.id for p in rest] == [4, 5] and end is None
    assert left == 3
    [root] = fake_qdrant.requests_to("/", "GET")
    assert root.api_key == KEY  # the client sends its headers there too, though Qdrant does not ask


async def test_snapshots_are_listed_empty_and_cannot_be_made(fake_qdrant: FakeQdrant) -> None:
    client = fake_qdrant.client()
    try:
        await client.create_collection("docs", vectors_config=models.VectorParams(size=2, distance=models.Distance.DOT))
        listed = await client.list_snapshots("docs")
        with pytest.raises(UnexpectedResponse) as made:
            await client.create_snapshot("docs")
        with pytest.raises(UnexpectedResponse) as missing:
            await client.list_snapshots("nope")
    finally:
        await client.close()

    assert listed == []
    assert made.value.status_code == 500
    assert made.value.structured()["status"]["error"].startswith("Service internal error: snapshots are not available")
    assert missing.value.status_code == 404
    assert missing.value.structured()["status"]["error"] == "Not found: Collection `nope` doesn't exist!"
