"""The logfile backend against real files: rotated, gzipped, JSON, text and nginx, a window found by binary
search (bytes read asserted), a line being appended while read, and paths kept to the declared ones."""

from __future__ import annotations

import gzip
import json
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from services.inventory import LogfileComponent
from services.logs.base import LogError, LogQuery
from services.logs.logfile import LogfileBackend, declared_files, read_logfile

NOW = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)
FAR = time.monotonic() + 3600  # a deadline that never passes in a test


def spec(path: Path, **extra: Any) -> LogfileComponent:
    return LogfileComponent.model_validate({"type": "logfile", "path": str(path), **extra})


def json_line(at: datetime, level: str, message: str, **fields: Any) -> str:
    return json.dumps({"timestamp": at.isoformat(), "level": level, "message": message, **fields}) + "\n"


def write(path: Path, lines: list[str], *, mtime: datetime, gz: bool = False) -> None:
    data = "".join(lines).encode()
    if gz:
        with gzip.open(path, "wb") as handle:
            handle.write(data)
    else:
        path.write_bytes(data)
    os.utime(path, (mtime.timestamp(), mtime.timestamp()))


def query(**kw: Any) -> LogQuery:
    values: dict[str, Any] = {"since": NOW - timedelta(days=7), "until": NOW + timedelta(minutes=1), "limit": 1000}
    values.update(kw)
    return LogQuery(**values)


def every_page(component: LogfileComponent, q: LogQuery) -> Iterator[list[str]]:
    cursor = None
    for _ in range(100):
        page, _ = read_logfile(component, LogQuery(**{**q.__dict__, "cursor": cursor}), deadline=FAR)
        yield [line.text for line in page.lines]
        if page.cursor is None:
            return
        cursor = page.cursor
    raise AssertionError("more than 100 pages: the cursor does not move")


@pytest.fixture
def rotated(tmp_path: Path) -> Path:
    """app.log (the last hour), app.log.1 (the day before, plain), app.log.2.gz (two days ago), and files
    that are not this component's: other.log and a link named like a rotated file."""
    log = tmp_path / "log"
    log.mkdir()
    oldest = [json_line(NOW - timedelta(days=2, minutes=10 - i), "info", f"gz line {i}") for i in range(10)]
    older = [json_line(NOW - timedelta(days=1, minutes=10 - i), "error" if i % 3 == 0 else "info", f"old {i}")
             for i in range(10)]  # fmt: skip
    live = [json_line(NOW - timedelta(minutes=10 - i), "error" if i % 2 else "info", f"live {i}") for i in range(10)]
    write(log / "app.log.2.gz", oldest, mtime=NOW - timedelta(days=2), gz=True)
    write(log / "app.log.1", older, mtime=NOW - timedelta(days=1))
    write(log / "app.log", live, mtime=NOW)
    write(log / "other.log", [json_line(NOW, "error", "not ours")], mtime=NOW)
    secret = tmp_path / "secret.txt"
    secret.write_text(json_line(NOW, "error", "outside the log directory"))
    (log / "app.log.3").symlink_to(secret)
    return log / "app.log"


def test_rotated_and_gzipped_files_are_read_newest_first(rotated: Path) -> None:
    component = spec(rotated)
    assert [f.name for f in declared_files(component)] == ["app.log", "app.log.1", "app.log.2.gz"]
    page, stats = read_logfile(component, query(), deadline=FAR)
    texts = [line.text for line in page.lines]
    expected = [f"live {i}" for i in range(9, -1, -1)] + [f"old {i}" for i in range(9, -1, -1)]
    expected += [f"gz line {i}" for i in range(9, -1, -1)]
    assert texts == expected
    assert page.cursor is None and page.scanned == 30
    assert stats.files == ["app.log", "app.log.1", "app.log.2.gz"]
    assert all(line.at is not None and line.at <= NOW for line in page.lines)
    assert [line.at for line in page.lines] == sorted((line.at for line in page.lines), reverse=True)  # type: ignore[arg-type,type-var]


def test_pages_follow_each_other_without_gaps_or_repeats(rotated: Path) -> None:
    component = spec(rotated)
    pages = list(every_page(component, query(limit=4)))
    whole, _ = read_logfile(component, query(), deadline=FAR)
    assert [t for p in pages for t in p] == [line.text for line in whole.lines]
    assert all(len(p) <= 4 for p in pages) and len(pages) >= 8


def test_errors_window_and_grep(rotated: Path) -> None:
    component = spec(rotated)
    page, stats = read_logfile(component, query(errors=True, since=NOW - timedelta(hours=1)), deadline=FAR)
    assert [line.text for line in page.lines] == ["live 9", "live 7", "live 5", "live 3", "live 1"]
    assert {line.level for line in page.lines} == {"error"}
    assert stats.files == ["app.log"]  # the rotated files were written before the window: not opened
    page, _ = read_logfile(component, query(grep="OLD 3"), deadline=FAR)
    assert [line.text for line in page.lines] == ["old 3"]
    page, _ = read_logfile(component, query(since=NOW - timedelta(days=1, minutes=5), until=NOW - timedelta(hours=2)),
                           deadline=FAR)  # fmt: skip
    assert [line.text for line in page.lines] == ["old 9", "old 8", "old 7", "old 6", "old 5"]


def test_json_field_names_are_configurable(tmp_path: Path) -> None:
    path = tmp_path / "api.log"
    lines = [json.dumps({"ts": (NOW - timedelta(minutes=i)).isoformat(), "severity": sev, "msg": f"m{i}", "rid": i})
             + "\n" for i, sev in ((3, "WARN"), (2, "ERROR"), (1, "info"))]  # fmt: skip
    write(path, lines, mtime=NOW)
    component = spec(path, time_field="ts", level_field="severity", message_field="msg")
    page, _ = read_logfile(component, query(), deadline=FAR)
    assert [(line.text, line.level) for line in page.lines] == [("m1", "info"), ("m2", "error"), ("m3", "warning")]
    assert page.lines[0].fields == {"rid": "1"}
    assert page.lines[0].at == NOW - timedelta(minutes=1)


def test_text_lines_with_a_strptime_pattern_in_the_components_zone(tmp_path: Path) -> None:
    path = tmp_path / "worker.log"
    seoul = [
        "02/12/2026 20:50:00 [INFO] worker started\n",
        "02/12/2026 20:55:00 [ERROR] job 17 failed\n",
        "Traceback (most recent call last):\n",
        "02/12/2026 20:59:00 [WARNING] retrying job 17\n",
    ]
    write(path, seoul, mtime=NOW)
    component = spec(path, format="text", time_pattern=r"^(?P<time>\d\d/\d\d/\d{4} \d\d:\d\d:\d\d)",
                     time_format="%d/%m/%Y %H:%M:%S", timezone="Asia/Seoul")  # fmt: skip
    page, _ = read_logfile(component, query(since=NOW - timedelta(minutes=7)), deadline=FAR)
    assert [line.text for line in page.lines] == [seoul[3].strip(), seoul[2].strip(), seoul[1].strip()]
    assert page.lines[0].at == datetime(2026, 12, 2, 11, 59, tzinfo=UTC)  # 20:59 in Seoul
    assert [line.level for line in page.lines] == ["warning", None, "error"]
    page, _ = read_logfile(component, query(errors=True), deadline=FAR)
    assert [line.text for line in page.lines] == [seoul[2].strip(), seoul[1].strip()]  # the traceback counts


def test_nginx_access_lines_filtered_by_status(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    stamp = (NOW - timedelta(minutes=5)).strftime("%d/%b/%Y:%H:%M:%S +0000")
    lines = [f'10.0.0.{i} - - [{stamp}] "GET /p{i} HTTP/1.1" {code} 12 "-" "curl/8"\n'
             for i, code in enumerate((200, 404, 403, 500, 502, 301))]  # fmt: skip
    write(path, lines, mtime=NOW)
    component = spec(path, format="nginx_combined")
    for wanted, ips in (("4xx", ["10.0.0.2", "10.0.0.1"]), ("5xx", ["10.0.0.4", "10.0.0.3"]), ("404", ["10.0.0.1"])):
        page, _ = read_logfile(component, query(status=wanted), deadline=FAR)
        assert [line.fields["ip"] for line in page.lines] == ips, wanted
    page, _ = read_logfile(component, query(errors=True), deadline=FAR)
    assert [line.fields["status"] for line in page.lines] == ["502", "500"]


def big_log(path: Path, *, days: int, per_minute: int) -> tuple[int, list[str]]:
    """A JSON log of ``days`` days ending at NOW; the messages of the last hour's errors, newest first."""
    start = NOW - timedelta(days=days)
    expected: list[str] = []
    with path.open("w") as handle:
        minute = 0
        while (at := start + timedelta(minutes=minute)) < NOW:
            for k in range(per_minute):
                stamp = at + timedelta(seconds=k * 60 // per_minute)
                level = "error" if k == 0 else "info"
                text = f"request {minute}-{k} took {k * 7} ms " + "x" * 80
                handle.write(json_line(stamp, level, text))
                if level == "error" and stamp >= NOW - timedelta(hours=1):
                    expected.append(text)
            minute += 1
    os.utime(path, (NOW.timestamp(), NOW.timestamp()))
    return path.stat().st_size, expected[::-1]


def test_the_last_hour_of_a_big_file_reads_only_the_last_hour(tmp_path: Path) -> None:
    path = tmp_path / "app.log"
    size, expected = big_log(path, days=10, per_minute=10)
    assert size > 20_000_000
    page, stats = read_logfile(spec(path), query(errors=True, since=NOW - timedelta(hours=1)), deadline=FAR)
    assert [line.text for line in page.lines] == expected and len(expected) == 60
    hour = size / (10 * 24)
    assert stats.bytes_read < 2 * hour, f"read {stats.bytes_read:,} bytes of {size:,} for one hour (~{hour:,.0f})"
    assert page.scanned == 600  # every line of the hour, and nothing before it
    # A window in the middle: both ends are searched.
    window = query(since=NOW - timedelta(days=5, minutes=30), until=NOW - timedelta(days=5), limit=1000)
    page, stats = read_logfile(spec(path), window, deadline=FAR)
    assert len(page.lines) == 300 and stats.bytes_read < 0.02 * size
    assert all(window.since <= line.at < window.until for line in page.lines if line.at)  # type: ignore[operator]


def test_a_line_still_being_written_is_left_for_the_next_read(tmp_path: Path) -> None:
    path = tmp_path / "app.log"
    write(path, [json_line(NOW - timedelta(minutes=2), "info", "complete")], mtime=NOW)
    with path.open("a") as handle:
        handle.write(json_line(NOW - timedelta(minutes=1), "error", "half written")[:30])
    page, _ = read_logfile(spec(path), query(), deadline=FAR)
    assert [line.text for line in page.lines] == ["complete"]
    with path.open("a") as handle:
        handle.write(json_line(NOW - timedelta(minutes=1), "error", "half written")[30:])
    page, _ = read_logfile(spec(path), query(), deadline=FAR)
    assert [line.text for line in page.lines] == ["half written", "complete"]


def test_appends_while_reading_never_give_a_torn_line(tmp_path: Path) -> None:
    path = tmp_path / "app.log"
    big_log(path, days=1, per_minute=20)
    stop = threading.Event()
    appended = 0

    def writer() -> None:
        nonlocal appended
        with path.open("a") as handle:
            while not stop.is_set():
                line = json_line(NOW - timedelta(seconds=1), "error", f"appended {appended}")
                handle.write(line[:17])
                handle.flush()
                handle.write(line[17:])
                handle.flush()
                appended += 1

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        for _ in range(5):
            page, _ = read_logfile(spec(path), query(limit=1000, since=NOW - timedelta(hours=2)), deadline=FAR)
            assert len(page.lines) == 1000
            for line in page.lines:
                assert line.at is not None and line.level is not None, line.text
                assert line.text.startswith(("appended ", "request ")), line.text
    finally:
        stop.set()
        thread.join()
    assert appended > 0


def test_a_deadline_returns_what_was_found_with_a_cursor(tmp_path: Path) -> None:
    path = tmp_path / "app.log"
    big_log(path, days=1, per_minute=10)
    page, _ = read_logfile(spec(path), query(), deadline=time.monotonic() - 1)
    assert page.lines == [] and page.cursor is not None and "time budget" in page.note
    later, _ = read_logfile(spec(path), query(limit=3, cursor=page.cursor), deadline=FAR)
    assert len(later.lines) == 3


def test_a_cursor_naming_another_file_is_refused_before_reading(rotated: Path) -> None:
    component = spec(rotated)
    for cursor in ("../../etc/passwd@0", "/etc/passwd@10", "secret.txt@0", "app.log@x", "app.log.3@0"):
        with pytest.raises(LogError) as raised:
            read_logfile(component, query(cursor=cursor), deadline=FAR)
        assert "passwd" not in raised.value.message or "not one of" in raised.value.message


def test_links_are_not_followed(rotated: Path, tmp_path: Path) -> None:
    (rotated.parent / "app.log.4").symlink_to(rotated.parent / "app.log.1")
    names = [f.name for f in declared_files(spec(rotated))]
    assert "app.log.3" not in names and "app.log.4" not in names
    page, _ = read_logfile(spec(rotated), query(grep="outside"), deadline=FAR)
    assert page.lines == []


async def test_the_async_backend_reads_in_a_thread(rotated: Path) -> None:
    page = await LogfileBackend().read(spec(rotated), query(limit=2), timeout=5)
    assert [line.text for line in page.lines] == ["live 9", "live 8"] and page.cursor is not None


@pytest.mark.parametrize(
    ("path", "problem"),
    [("log/app.log", "absolute"), ("/srv/../etc/passwd", "absolute"), ("/srv/*/app.log", "glob"), ("/", "absolute")],
)
def test_declared_paths_are_absolute_without_dotdot_or_glob_directories(path: str, problem: str) -> None:
    with pytest.raises(ValidationError) as raised:
        spec(Path(path))
    assert problem in str(raised.value)


def test_patterns_need_their_group() -> None:
    with pytest.raises(ValidationError, match="named group"):
        spec(Path("/srv/app.log"), format="text", level_pattern=r"(ERROR|INFO)")


def test_roles_read_must_name_services() -> None:
    from services.errors import InventoryError
    from services.inventory import parse_inventory

    text = """
roles:
  read: {nowhere: [U0READER]}
services:
  shop:
    components:
      app: {type: logfile, path: /srv/shop/log/app.log}
"""
    with pytest.raises(InventoryError) as raised:
        parse_inventory(text, "t", {})
    assert raised.value.problems == ["roles.read.nowhere: there is no service called 'nowhere'"]
    loaded = parse_inventory(text.replace("nowhere", "shop"), "t", {})
    assert loaded.inventory.roles.read == {"shop": ["U0READER"]}


def test_next_pages_stop_at_the_windows_start_without_searching_again(tmp_path: Path) -> None:
    path = tmp_path / "app.log"
    big_log(path, days=3, per_minute=10)
    window = query(since=NOW - timedelta(hours=2), until=NOW - timedelta(hours=1), limit=1000)
    whole, _ = read_logfile(spec(path), window, deadline=FAR)
    assert len(whole.lines) == 600 and whole.cursor is None
    cursor, texts, costs = None, [], []
    while True:
        page, stats = read_logfile(spec(path), replace(window, limit=70, cursor=cursor), deadline=FAR)
        texts += [line.text for line in page.lines]
        costs.append(stats.bytes_read)
        if page.cursor is None:
            break
        cursor = page.cursor
    assert texts == [line.text for line in whole.lines]
    assert max(costs[1:]) < 70 * 250 + 40_000, costs  # a next page reads its lines, not another search


def test_errors_with_numeric_or_one_letter_levels_pass_the_quick_filter(tmp_path: Path) -> None:
    path = tmp_path / "app.log"
    records = [(3, 30, "fine"), (2, 50, "numeric fatal"), (1, "E", "letter level"), (0, "info", "all good")]
    write(path, [json.dumps({"timestamp": (NOW - timedelta(minutes=m)).isoformat(), "level": lvl, "message": text})
                 + "\n" for m, lvl, text in records], mtime=NOW)  # fmt: skip
    page, _ = read_logfile(spec(path), query(errors=True), deadline=FAR)
    found = [(line.text, line.level) for line in page.lines]
    assert found == [("letter level", "error"), ("numeric fatal", "critical")]
