"""Cloud Run releases (runbook 000) through the real google-cloud-run async clients, against a
grpc.aio fake of the Services, Revisions and Operations APIs on loopback."""

from __future__ import annotations

import gc
import time
import warnings
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest
from google.cloud import run_v2

from services.deploy.base import DeployError
from services.deploy.cloudrun import RESTARTED_AT, CloudRunProvider, Scaling
from tests.fixtures.cloudrun import FakeCloudRun, start_cloudrun_fake
from tests.fixtures.servers import free_port

BY_REVISION = run_v2.TrafficTargetAllocationType.TRAFFIC_TARGET_ALLOCATION_TYPE_REVISION
LATEST = run_v2.TrafficTargetAllocationType.TRAFFIC_TARGET_ALLOCATION_TYPE_LATEST
IMAGE = "asia-docker.pkg.dev/demo-project/apps/shop"


class Notes:
    """A progress callback that keeps what it was told."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    async def __call__(self, line: str) -> None:
        self.lines.append(line)


@pytest.fixture
async def fake() -> AsyncIterator[FakeCloudRun]:
    server = await start_cloudrun_fake(services=("shop", "other"))
    yield server
    await server.close()


@pytest.fixture
async def provider(fake: FakeCloudRun) -> AsyncIterator[Callable[..., CloudRunProvider]]:
    """Make providers for the fake; all are closed after the test."""
    made: list[CloudRunProvider] = []

    def make(service: str = "shop", **options: Any) -> CloudRunProvider:
        options.setdefault("timeout", 5.0)
        options.setdefault("poll_every", 0.02)
        options.setdefault("channel_factory", fake.channel)
        made.append(CloudRunProvider(fake.project, fake.region, service, **options))
        return made[-1]

    yield make
    for item in made:
        await item.close()


def three_revisions(fake: FakeCloudRun) -> tuple[str, str, str]:
    """shop: v1 (from the fixture), v2, v3 (live)."""
    first = fake.revisions_of("shop")[0]
    second = fake.deploy("shop", image=f"{IMAGE}:v2")
    third = fake.deploy("shop", image=f"{IMAGE}:v3")
    return first, second, third


# --- releases -------------------------------------------------------------------------------------


async def test_releases_show_traffic_shares_readiness_and_images(
    fake: FakeCloudRun, provider: Callable[..., CloudRunProvider]
) -> None:
    first, second, _ = three_revisions(fake)
    broken = fake.deploy("shop", image=f"{IMAGE}:v4", ready=False, message="Container failed to start on port 8080.")
    fifth = fake.deploy("shop", image=f"{IMAGE}:v5")
    fake.route("shop", {fifth: 90, second: 10})
    fake.page_size_cap = 2  # five revisions: the client must follow three pages

    releases = await provider().releases(limit=10)

    assert [release.id for release in releases] == [fifth, broken, fake.revisions_of("shop")[2], second, first]
    newest, failed = releases[0], releases[1]
    assert (newest.live, newest.ready, newest.traffic, newest.status) == (True, True, 90, "ready")
    assert newest.description == f"{IMAGE}:v5"
    assert newest.created_at is not None and newest.created_at.tzinfo is not None
    assert newest.created_at > releases[-1].created_at  # type: ignore[operator]
    assert (failed.live, failed.ready, failed.traffic) == (False, False, 0)
    assert failed.status == "failed: Container failed to start on port 8080."
    assert [(r.id, r.traffic) for r in releases if r.live] == [(fifth, 90), (second, 10)]
    pages = fake.calls("ListRevisions")
    assert len(pages) == 3
    assert {page.parent for page in pages} == {fake.service_path("shop")}
    assert [page.page_token for page in pages] == ["", "2", "4"]
    (get,) = fake.calls("GetService")
    assert get.name == "projects/demo-project/locations/asia-northeast3/services/shop"


async def test_releases_keep_the_live_revision_when_it_is_older_than_the_limit(
    fake: FakeCloudRun, provider: Callable[..., CloudRunProvider]
) -> None:
    first, _, third = three_revisions(fake)
    fake.route("shop", {first: 100})

    releases = await provider().releases(limit=2)

    assert [release.id for release in releases] == [third, first]
    assert [release.live for release in releases] == [False, True]


async def test_live_is_the_revision_with_the_largest_share(
    fake: FakeCloudRun, provider: Callable[..., CloudRunProvider]
) -> None:
    first, second, third = three_revisions(fake)
    shop = provider()
    assert await shop.live() == third
    fake.route("shop", {first: 30, second: 70})
    assert await shop.live() == second


async def test_releases_of_a_missing_service_are_a_plain_error(provider: Callable[..., CloudRunProvider]) -> None:
    with pytest.raises(DeployError) as caught:
        await provider("ghost").releases()
    assert str(caught.value) == "There is no Cloud Run service ghost in asia-northeast3 (demo-project)."


# --- rollback -------------------------------------------------------------------------------------


async def test_rollback_routes_all_traffic_after_the_long_running_operation(
    fake: FakeCloudRun, provider: Callable[..., CloudRunProvider]
) -> None:
    _, second, third = three_revisions(fake)
    fake.polls_to_done = 3
    notes = Notes()

    summary = await provider().rollback(second, expected_live=third, progress=notes)

    assert summary == f"Cloud Run service shop now sends 100 % of traffic to {second} (was {third})"
    assert fake.shares("shop") == {second: 100}
    assert len(fake.calls("GetOperation")) == 3  # polled until done, not taken as done at once
    (update,) = fake.calls("UpdateService")
    assert list(update.update_mask.paths) == ["traffic"]
    assert [(t.type_, t.revision, t.percent) for t in update.service.traffic] == [(BY_REVISION, second, 100)]
    assert update.service.etag  # the etag read goes back, so a concurrent change is refused
    (revision,) = fake.calls("GetRevision")
    assert revision.name == fake.revision_path("shop", second)
    assert notes.lines[0].startswith(f"Routing 100 % of shop's traffic to {second}")
    assert notes.lines[-1].startswith("Cloud Run finished the traffic change")
    # No new revision: a rollback only moves traffic.
    assert len(fake.revisions_of("shop")) == 3


async def test_rollback_keeps_tagged_revisions_at_zero_percent(
    fake: FakeCloudRun, provider: Callable[..., CloudRunProvider]
) -> None:
    first, second, third = three_revisions(fake)
    shop = fake.services["shop"]
    shop.traffic = [
        run_v2.TrafficTarget(type_=LATEST, percent=100),
        run_v2.TrafficTarget(type_=BY_REVISION, revision=first, tag="legacy", percent=0),
        run_v2.TrafficTarget(type_=BY_REVISION, revision=second, tag="stable", percent=0),
    ]

    await provider().rollback(second, expected_live=third, progress=Notes())

    (update,) = fake.calls("UpdateService")
    assert [(t.type_, t.revision, t.percent, t.tag) for t in update.service.traffic] == [
        (BY_REVISION, second, 100, "stable"),
        (BY_REVISION, first, 0, "legacy"),
    ]
    assert fake.shares("shop") == {second: 100, first: 0}


async def test_rollback_to_the_revision_already_serving_changes_nothing(
    fake: FakeCloudRun, provider: Callable[..., CloudRunProvider]
) -> None:
    _, _, third = three_revisions(fake)
    summary = await provider().rollback(third, expected_live=third, progress=Notes())
    assert "already sends 100 % of traffic" in summary
    assert fake.calls("UpdateService") == []


async def test_rollback_refuses_an_unknown_revision(
    fake: FakeCloudRun, provider: Callable[..., CloudRunProvider]
) -> None:
    _, _, third = three_revisions(fake)
    with pytest.raises(DeployError) as caught:
        await provider().rollback("shop-00042-zzz", expected_live=third, progress=Notes())
    assert str(caught.value) == "There is no revision `shop-00042-zzz` of service shop."
    assert len(fake.calls("GetRevision")) == 1
    assert fake.calls("UpdateService") == []


async def test_rollback_refuses_a_revision_of_another_service(
    fake: FakeCloudRun, provider: Callable[..., CloudRunProvider]
) -> None:
    _, _, third = three_revisions(fake)
    other = fake.revisions_of("other")[0]
    with pytest.raises(DeployError, match="is not a revision of Cloud Run service shop"):
        await provider().rollback(other, expected_live=third, progress=Notes())
    assert fake.requests == []  # refused on its name alone

    # "shop-api-…" passes the name check, but Cloud Run says whose revision it is.
    fake.add_foreign_revision("shop-api-00001-abc", service="shop-api")
    with pytest.raises(DeployError) as caught:
        await provider().rollback("shop-api-00001-abc", expected_live=third, progress=Notes())
    assert str(caught.value) == "Revision `shop-api-00001-abc` belongs to Cloud Run service shop-api, not shop."
    assert fake.calls("UpdateService") == []


async def test_rollback_refuses_a_revision_that_is_not_ready(
    fake: FakeCloudRun, provider: Callable[..., CloudRunProvider]
) -> None:
    _, _, third = three_revisions(fake)
    broken = fake.deploy("shop", image=f"{IMAGE}:bad", ready=False, message="Container failed to start.")
    with pytest.raises(DeployError) as caught:
        await provider().rollback(broken, expected_live=third, progress=Notes())
    assert "is not ready (failed: Container failed to start.)" in str(caught.value)
    assert fake.calls("UpdateService") == []
    assert fake.shares("shop") == {third: 100}


@pytest.mark.parametrize(
    "target",
    [
        "rev; rm -rf /",
        "shop-1; rm -rf /",
        "../x",
        "shop-../x",
        "shop-00001-abc/../../other",
        "Shop-00001-ABC",
        "SHOP-00001-abc",
        "shop-" + "a" * 95,
        "",
        "shop-00001-abc\n",
        "shop-00001-abc-",
        "shop-$(id)",
    ],
)
async def test_rollback_refuses_names_that_are_not_revision_names(
    fake: FakeCloudRun, provider: Callable[..., CloudRunProvider], target: str
) -> None:
    with pytest.raises(DeployError, match="not a"):
        await provider().rollback(target, expected_live="shop-00001-abc", progress=Notes())
    assert fake.requests == []  # no call of any kind was made


async def test_rollback_refuses_when_the_live_revision_changed_since_the_plan(
    fake: FakeCloudRun, provider: Callable[..., CloudRunProvider]
) -> None:
    first, second, third = three_revisions(fake)
    fourth = fake.deploy("shop", image=f"{IMAGE}:v4")  # someone deployed after the plan was made

    with pytest.raises(DeployError) as caught:
        await provider().rollback(second, expected_live=third, progress=Notes())

    assert str(caught.value) == (
        f"Cloud Run service shop changed since the plan: live is now {fourth}, the plan saw {third}."
    )
    assert fake.calls("UpdateService") == []
    assert fake.shares("shop") == {fourth: 100}
    assert first not in fake.shares("shop")


async def test_a_change_between_reading_and_writing_is_refused(
    fake: FakeCloudRun, provider: Callable[..., CloudRunProvider]
) -> None:
    _, second, third = three_revisions(fake)
    fake.fail_next.append(("UpdateService", grpc.StatusCode.ABORTED, "etag mismatch"))
    with pytest.raises(DeployError) as caught:
        await provider().rollback(second, expected_live=third, progress=Notes())
    assert str(caught.value) == "Cloud Run service shop was changed by someone else meanwhile; plan again."
    assert fake.shares("shop") == {third: 100}


# --- restart and scale ----------------------------------------------------------------------------


async def test_restart_creates_a_new_revision_with_the_same_spec(
    fake: FakeCloudRun, provider: Callable[..., CloudRunProvider]
) -> None:
    _, _, third = three_revisions(fake)
    fake.polls_to_done = 2
    notes = Notes()

    summary = await provider().restart(progress=notes)

    fourth = fake.revisions_of("shop")[-1]
    assert fourth != third and fourth.startswith("shop-00004-")
    assert summary == (
        f"Cloud Run service shop restarted: new revision {fourth} (same spec as {third}) serves 100 % of traffic"
    )
    assert fake.shares("shop") == {fourth: 100}
    old, new = fake.revisions[third], fake.revisions[fourth]
    assert new.containers[0].image == old.containers[0].image == f"{IMAGE}:v3"
    assert run_v2.Container.pb(new.containers[0]) == run_v2.Container.pb(old.containers[0])
    assert run_v2.RevisionScaling.pb(new.scaling) == run_v2.RevisionScaling.pb(old.scaling)
    assert RESTARTED_AT in new.annotations and RESTARTED_AT not in old.annotations
    (update,) = fake.calls("UpdateService")
    assert list(update.update_mask.paths) == ["template", "traffic"]
    assert update.service.template.revision == ""
    assert [(t.type_, t.percent) for t in update.service.traffic] == [(LATEST, 100)]
    assert len(fake.calls("GetOperation")) == 2
    assert notes.lines[-1].startswith("Cloud Run finished the restart")


async def test_restart_of_a_service_whose_template_names_its_revision(
    fake: FakeCloudRun, provider: Callable[..., CloudRunProvider]
) -> None:
    _, _, third = three_revisions(fake)
    # Deployed with a chosen revision name: sending that name back with a changed template is a
    # 409 "Revision named … with different configuration already exists" in Cloud Run.
    fake.services["shop"].template.revision = third
    await provider().restart(progress=Notes())
    fourth = fake.revisions_of("shop")[-1]
    assert fourth.startswith("shop-00004-")
    assert fake.shares("shop") == {fourth: 100}


async def test_restart_after_a_rollback_is_refused(
    fake: FakeCloudRun, provider: Callable[..., CloudRunProvider]
) -> None:
    _, second, third = three_revisions(fake)
    fake.route("shop", {second: 100})  # rolled back: the template is still v3's
    with pytest.raises(DeployError) as caught:
        await provider().restart(progress=Notes())
    assert f"would deploy {third}'s spec" in str(caught.value)
    assert fake.calls("UpdateService") == []


async def test_restart_with_split_traffic_is_refused(
    fake: FakeCloudRun, provider: Callable[..., CloudRunProvider]
) -> None:
    _, second, third = three_revisions(fake)
    fake.route("shop", {third: 90, second: 10})
    with pytest.raises(DeployError, match=f"is split \\({third} 90 %, {second} 10 %\\)"):
        await provider().restart(progress=Notes())
    assert fake.calls("UpdateService") == []


async def test_scale_sets_min_max_cpu_and_memory(fake: FakeCloudRun, provider: Callable[..., CloudRunProvider]) -> None:
    _, _, third = three_revisions(fake)
    shop = provider()
    assert await shop.scaling() == Scaling(min_instances=0, max_instances=10, cpu="1", memory="512Mi")

    summary = await shop.scale(2, 20, cpu="2", memory="1Gi", progress=Notes())

    fourth = fake.revisions_of("shop")[-1]
    assert summary == (
        "Cloud Run service shop scaled: min 0 → 2, max 10 → 20, cpu 1 → 2, memory 512Mi → 1Gi; "
        f"new revision {fourth} serves 100 % of traffic"
    )
    assert await shop.scaling() == Scaling(2, 20, "2", "1Gi")
    new = fake.revisions[fourth]
    assert (new.scaling.min_instance_count, new.scaling.max_instance_count) == (2, 20)
    assert dict(new.containers[0].resources.limits) == {"cpu": "2", "memory": "1Gi"}
    assert new.containers[0].resources.cpu_idle is True
    assert new.containers[0].image == fake.revisions[third].containers[0].image
    assert fake.shares("shop") == {fourth: 100}

    # Instances only: cpu and memory stay as they are, and the summary says only what changes.
    summary = await shop.scale(1, 20, progress=Notes())
    assert summary.startswith("Cloud Run service shop scaled: min 2 → 1, max 20 → 20; new revision")
    assert await shop.scaling() == Scaling(1, 20, "2", "1Gi")


@pytest.mark.parametrize(
    ("low", "high", "size"),
    [
        (3, 2, {}),
        (-1, 5, {}),
        (0, 0, {}),
        (0, 1001, {}),
        (0, 5, {"cpu": "lots"}),
        (0, 5, {"cpu": "1; rm -rf /"}),
        (0, 5, {"cpu": "16"}),
        (0, 5, {"cpu": "0"}),
        (0, 5, {"memory": "1Ti"}),
        (0, 5, {"memory": "64Mi"}),
        (0, 5, {"memory": "1gb"}),
        (0, 5, {"memory": "512Mi\n"}),
    ],
)
async def test_scale_refuses_bad_values_before_any_call(
    fake: FakeCloudRun, provider: Callable[..., CloudRunProvider], low: int, high: int, size: dict[str, str]
) -> None:
    with pytest.raises(DeployError):
        await provider().scale(low, high, progress=Notes(), **size)
    assert fake.requests == []


async def test_scale_names_min_above_max(provider: Callable[..., CloudRunProvider]) -> None:
    with pytest.raises(DeployError) as caught:
        await provider().scale(5, 2, progress=Notes())
    assert str(caught.value) == "min instances (5) cannot be more than max instances (2)"


# --- failures -------------------------------------------------------------------------------------


async def test_a_hung_api_is_a_deploy_error_within_the_timeout(
    fake: FakeCloudRun, provider: Callable[..., CloudRunProvider]
) -> None:
    fake.hang = True
    started = time.monotonic()
    with pytest.raises(DeployError) as caught:
        await provider(timeout=0.5).releases()
    assert time.monotonic() - started < 3
    assert str(caught.value) == "The Cloud Run Admin API did not answer within 0.5 s for service shop."


async def test_an_operation_that_never_finishes_is_given_up_on(
    fake: FakeCloudRun, provider: Callable[..., CloudRunProvider]
) -> None:
    _, second, third = three_revisions(fake)
    fake.polls_to_done = 10**6
    started = time.monotonic()
    with pytest.raises(DeployError) as caught:
        await provider(operation_timeout=0.3).rollback(second, expected_live=third, progress=Notes())
    assert time.monotonic() - started < 3
    assert "The traffic change of Cloud Run service shop did not finish within 0.3 s" in str(caught.value)
    assert len(fake.calls("GetOperation")) >= 2


async def test_a_failed_operation_is_a_deploy_error_with_its_message(
    fake: FakeCloudRun, provider: Callable[..., CloudRunProvider]
) -> None:
    _, _, third = three_revisions(fake)
    fake.polls_to_done = 1
    fake.fail_operation = "Revision is not ready and cannot serve traffic. The container failed to start."
    with pytest.raises(DeployError) as caught:
        await provider().restart(progress=Notes())
    assert str(caught.value) == (
        "The restart of Cloud Run service shop failed: "
        "Revision is not ready and cannot serve traffic. The container failed to start."
    )
    assert fake.shares("shop") == {third: 100}  # the failed revision took no traffic


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (grpc.StatusCode.PERMISSION_DENIED, "The bot's Google credentials may not update Cloud Run service shop."),
        (grpc.StatusCode.UNAUTHENTICATED, "The bot's Google credentials may not update Cloud Run service shop."),
        (grpc.StatusCode.FAILED_PRECONDITION, "Cloud Run refused to update service shop: token=ya29.secret-value"),
        (grpc.StatusCode.DEADLINE_EXCEEDED, "The Cloud Run Admin API did not answer within 5 s for service shop."),
        (
            grpc.StatusCode.UNAVAILABLE,
            "Could not reach the Cloud Run Admin API for service shop (unavailable); try again later.",
        ),
        (grpc.StatusCode.ALREADY_EXISTS, "Cloud Run refused to update service shop: token=ya29.secret-value"),
        (grpc.StatusCode.INTERNAL, "The Cloud Run Admin API failed (InternalServerError) for service shop."),
    ],
)
async def test_api_errors_are_one_plain_sentence(
    fake: FakeCloudRun, provider: Callable[..., CloudRunProvider], code: grpc.StatusCode, expected: str
) -> None:
    _, second, third = three_revisions(fake)
    fake.fail_next.append(("UpdateService", code, "token=ya29.secret-value"))
    with pytest.raises(DeployError) as caught:
        await provider().rollback(second, expected_live=third, progress=Notes())
    assert str(caught.value) == expected
    if code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.UNAVAILABLE):
        assert "ya29" not in str(caught.value)  # what the server said about credentials is not repeated
    assert fake.shares("shop") == {third: 100}


async def test_an_unreachable_api_says_so() -> None:
    port = free_port()
    shop = CloudRunProvider(
        "demo-project",
        "asia-northeast3",
        "shop",
        timeout=5.0,
        channel_factory=lambda: grpc.aio.insecure_channel(f"127.0.0.1:{port}"),
    )
    try:
        with pytest.raises(DeployError) as caught:
            await shop.rollback("shop-00002-abc", expected_live="shop-00003-abc", progress=Notes())
    finally:
        await shop.close()
    assert str(caught.value) == (
        "Could not reach the Cloud Run Admin API for service shop (connection refused); try again later."
    )


async def test_missing_default_credentials_are_a_plain_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    missing = tmp_path / "no-such-key.json"
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(missing))
    shop = CloudRunProvider("demo-project", "asia-northeast3", "shop", timeout=5.0)
    try:
        with pytest.raises(DeployError) as caught:
            await shop.releases()
    finally:
        await shop.close()
    assert str(caught.value) == (
        "The bot has no usable Google credentials for Cloud Run service shop (DefaultCredentialsError)."
    )
    assert str(missing) not in str(caught.value)


@pytest.mark.parametrize(
    ("project", "region", "service"),
    [
        ("Demo Project", "asia-northeast3", "shop"),
        ("demo-project", "asia/../x", "shop"),
        ("demo-project", "asia-northeast3", "shop/../../other"),
        ("demo-project", "asia-northeast3", "Shop"),
    ],
)
def test_the_service_coordinates_are_checked(project: str, region: str, service: str) -> None:
    with pytest.raises(DeployError):
        CloudRunProvider(project, region, service)


async def test_close_closes_the_channels_and_leaves_no_warnings(fake: FakeCloudRun) -> None:
    channels: list[grpc.aio.Channel] = []

    def factory() -> grpc.aio.Channel:
        channels.append(fake.channel())
        return channels[-1]

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        shop = CloudRunProvider(fake.project, fake.region, "shop", timeout=5.0, channel_factory=factory)
        assert channels == []  # clients are made on first use
        assert shop.describe() == "Cloud Run service shop in asia-northeast3 (demo-project)"
        assert shop.kind == "cloudrun"
        async with shop:
            assert await shop.live() is not None
            await shop.releases()
        assert len(channels) == 2
        for channel in channels:
            with pytest.raises(grpc.aio.UsageError):
                await channel.unary_unary("/google.cloud.run.v2.Services/GetService")(b"")
        await shop.close()  # closing twice is harmless
        del shop
        gc.collect()
    assert [str(item.message) for item in caught] == []
