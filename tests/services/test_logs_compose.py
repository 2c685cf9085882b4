"""The compose log backend against the fake docker: `docker compose logs` streamed, newest first, paged."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from services.inventory import ComposeComponent, LambdaComponent
from services.logs.base import LogError, LogQuery
from services.logs.compose import ComposeLogs, parse_compose_line
from tests.fixtures.fake_docker import FakeDocker, fake_docker_fixture, process_gone  # noqa: F401
from tests.fixtures.wait import wait_until

T0 = datetime(2025, 3, 1, 9, 0, tzinfo=UTC)
SECRET = "postgres://app:Sup3rS3cret@db:5432/app"


@pytest.fixture
def component(fake_docker: FakeDocker, tmp_path: Path) -> ComposeComponent:
    project = tmp_path / "shop"
    project.mkdir()
    return ComposeComponent(type="compose", project_dir=project, project_name="shop", docker=str(fake_docker.path))


def window(minutes: int = 60, *, errors: bool = False, grep: str | None = None, limit: int = 50) -> LogQuery:
    return LogQuery(since=T0, until=T0 + timedelta(minutes=minutes), errors=errors, grep=grep, limit=limit)


def test_parses_docker_prefix_and_nanosecond_stamp() -> None:
    line = parse_compose_line("web-1  | 2025-03-01T09:00:01.123456789Z ERROR boom | not a prefix")
    assert line.source == "web-1"
    assert line.at == datetime(2025, 3, 1, 9, 0, 1, 123456, tzinfo=UTC)
    assert line.text == "ERROR boom | not a prefix"
    assert line.level == "error"


async def test_newest_first_and_cursor_to_older_page(fake_docker: FakeDocker, component: ComposeComponent) -> None:
    # Containers interleave: worker's line at minute 5 is printed after web's at minute 6.
    rows = [("web", T0 + timedelta(minutes=m), f"INFO request {m}") for m in (1, 2, 3, 4, 6)]
    rows.insert(4, ("worker", T0 + timedelta(minutes=7), "INFO job done"))
    rows.append(("worker", T0 + timedelta(minutes=5), "INFO late flush"))
    fake_docker.set_logs(rows)
    backend = ComposeLogs()
    first = await backend.read(component, window(limit=3), timeout=10)
    assert [line.text for line in first.lines] == ["INFO job done", "INFO request 6", "INFO late flush"]
    assert first.lines[0].source == "worker-1"
    assert first.cursor is not None
    call = fake_docker.calls()[-1]
    assert call[call.index("logs") :][:3] == ["logs", "--no-color", "--timestamps"]
    older = await backend.read(component, replace(window(limit=3), cursor=first.cursor), timeout=10)
    assert [line.text for line in older.lines] == ["INFO request 4", "INFO request 3", "INFO request 2"]
    last = await backend.read(component, replace(window(limit=3), cursor=older.cursor), timeout=10)
    assert [line.text for line in last.lines] == ["INFO request 1"]
    assert last.cursor is None


async def test_lines_at_the_same_instant_are_not_lost_or_repeated(
    fake_docker: FakeDocker, component: ComposeComponent
) -> None:
    same = T0 + timedelta(minutes=2)
    fake_docker.set_logs([("web", same, f"INFO burst {i}") for i in range(5)])
    backend = ComposeLogs()
    seen: list[str] = []
    cursor = None
    for _ in range(5):
        page = await backend.read(component, replace(window(limit=2), cursor=cursor), timeout=10)
        seen += [line.text for line in page.lines]
        cursor = page.cursor
        if cursor is None:
            break
    assert sorted(seen) == [f"INFO burst {i}" for i in range(5)]


async def test_errors_and_plain_grep(fake_docker: FakeDocker, component: ComposeComponent) -> None:
    fake_docker.set_logs(
        [
            ("web", T0 + timedelta(minutes=1), "ERROR payment failed for order [42]"),
            ("web", T0 + timedelta(minutes=2), "INFO order [42] shipped"),
            ("web", T0 + timedelta(minutes=3), "Traceback (most recent call last):"),
            ("web", T0 + timedelta(minutes=4), "INFO order 42 shipped"),
            ("web", T0 + timedelta(minutes=5), "WARNING error budget at 80%"),
        ]
    )
    backend = ComposeLogs()
    errors = await backend.read(component, window(errors=True), timeout=10)
    assert [line.text for line in errors.lines] == [
        "Traceback (most recent call last):",
        "ERROR payment failed for order [42]",
    ]
    assert errors.scanned == 5
    # `[42]` is text, not a character class: "order 42" must not match.
    grep = await backend.read(component, window(grep="order [42]"), timeout=10)
    assert [line.text for line in grep.lines] == ["INFO order [42] shipped", "ERROR payment failed for order [42]"]
    both = await backend.read(component, window(errors=True, grep="[42]"), timeout=10)
    assert [line.text for line in both.lines] == ["ERROR payment failed for order [42]"]


async def test_window_bounds_are_applied(fake_docker: FakeDocker, component: ComposeComponent) -> None:
    fake_docker.set_logs(
        [
            ("web", T0 - timedelta(seconds=1), "INFO before"),
            ("web", T0, "INFO at since"),
            ("web", T0 + timedelta(minutes=10) - timedelta(microseconds=1), "INFO last inside"),
            ("web", T0 + timedelta(minutes=10), "INFO at until"),
            ("web", T0 + timedelta(minutes=10, seconds=1), "INFO after"),
        ]
    )
    page = await ComposeLogs().read(component, window(10), timeout=10)
    assert [line.text for line in page.lines] == ["INFO last inside", "INFO at since"]
    args = fake_docker.calls()[-1]
    assert args[args.index("--since") + 1] == "2025-03-01T09:00:00.000000Z"


async def test_planted_secret_is_returned_raw(fake_docker: FakeDocker, component: ComposeComponent) -> None:
    fake_docker.set_logs([("web", T0 + timedelta(minutes=1), f"ERROR cannot connect to {SECRET}")])
    page = await ComposeLogs().read(component, window(), timeout=10)
    assert SECRET in page.lines[0].text  # redaction is the command's job, on every backend's lines


async def test_output_is_bounded_in_bytes(fake_docker: FakeDocker, component: ComposeComponent) -> None:
    fake_docker.set_logs([], flood=(T0 + timedelta(minutes=1), 20_000, 200))
    page = await ComposeLogs(max_bytes=256 * 1024).read(component, window(limit=5), timeout=10)
    assert len(page.lines) == 5
    assert page.note == (
        "Read the first 256 KiB of the window only: the newest lines may be missing; narrow the window."
    )
    assert page.scanned < 20_000


async def test_hang_is_killed_at_the_budget(fake_docker: FakeDocker, component: ComposeComponent) -> None:
    fake_docker.hang_next()
    page = await ComposeLogs().read(component, window(), timeout=2)
    assert page.lines == []
    assert "did not finish within" in page.note
    hung = fake_docker.hung()
    await wait_until(lambda: process_gone(hung.docker) and process_gone(hung.plugin), "the hung docker is killed")


async def test_docker_failure_is_one_sentence(fake_docker: FakeDocker, component: ComposeComponent) -> None:
    fake_docker.fail_next(1, "Cannot connect to the Docker daemon at unix:///var/run/docker.sock.\n")
    with pytest.raises(LogError) as caught:
        await ComposeLogs().read(component, window(), timeout=10)
    assert caught.value.message == (
        "Could not read the logs of compose project shop: `docker compose logs` failed: "
        "Cannot connect to the Docker daemon at unix:///var/run/docker.sock."
    )


async def test_bad_cursor_and_wrong_component(component: ComposeComponent) -> None:
    with pytest.raises(LogError, match="no longer valid"):
        await ComposeLogs().read(component, replace(window(), cursor="yesterday|x"), timeout=10)
    with pytest.raises(LogError, match="no logs for a lambda component"):
        await ComposeLogs().read(LambdaComponent(type="lambda", function="f"), window(), timeout=10)


async def test_missing_docker_is_one_sentence(component: ComposeComponent) -> None:
    missing = component.model_copy(update={"docker": "/nonexistent/docker"})
    with pytest.raises(LogError, match="docker is not installed on the bot's host"):
        await ComposeLogs().read(missing, window(), timeout=10)
