"""The `host` component: filesystem use, bounded directory walks, memory, its health probe, thresholds,
and the memory/disk alert rules fed from it in the watcher."""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import pytest

from services.alerts.rules import TransitionKind
from services.alerts.watch import Fired, Watcher, watched
from services.errors import InventoryError
from services.figures.base import FigureError, Window
from services.figures.host import HostFigures, memory_use, walk_size
from services.health import Status
from services.inventory import HostComponent, parse_inventory
from services.probes import PROBED_TYPES, build_health_probes
from services.probes.host import HostProbe
from services.redaction import Redactor
from services.state import StateStore, open_state_store

T0 = datetime(2026, 11, 22, 3, 0, tzinfo=UTC)
WINDOW = Window(T0, timedelta(hours=1))


def host(**fields: object) -> HostComponent:
    return HostComponent.model_validate({"type": "host", **fields})


def meminfo(path: Path, total_kb: int, available_kb: int) -> Path:
    path.write_text(
        f"MemTotal:       {total_kb} kB\nMemFree:          1000 kB\nMemAvailable:   {available_kb} kB\n"
        "Buffers:          2000 kB\n",
        encoding="ascii",
    )
    return path


def tree(root: Path, dirs: int, files_each: int, size: int = 100) -> int:
    """Make ``dirs`` directories of ``files_each`` files; the number of entries made."""
    for d in range(dirs):
        sub = root / f"d{d}"
        sub.mkdir(parents=True)
        for f in range(files_each):
            (sub / f"f{f}").write_bytes(b"x" * size)
    return dirs * (files_each + 1)


async def test_disk_use_per_mount_matches_shutil_and_a_missing_mount_is_unknown(tmp_path: Path) -> None:
    found = await HostFigures().measure(host(mounts=[str(tmp_path), "/no/such/mount"], memory=False), WINDOW, timeout=5)
    disk, missing = found
    usage = shutil.disk_usage(tmp_path)
    assert disk.name == "disk_used_pct" and disk.label == f"disk {tmp_path}" and disk.unit == "%"
    assert disk.value == pytest.approx(usage.used * 100 / (usage.used + usage.free), abs=0.5)
    assert " of " in disk.note
    assert (missing.value, missing.note) == (None, "no such path on the bot's host")


async def test_directory_size_counts_what_is_under_it_and_follows_no_link(tmp_path: Path) -> None:
    uploads = tmp_path / "uploads"
    entries = tree(uploads, 3, 10, size=5000)
    elsewhere = tmp_path / "elsewhere"
    tree(elsewhere, 2, 50, size=100_000)
    (uploads / "link").symlink_to(elsewhere, target_is_directory=True)
    [size] = await HostFigures().measure(host(directories=[str(uploads)], mounts=[], memory=False), WINDOW, timeout=5)
    expected = sum(
        os.lstat(os.path.join(d, name)).st_blocks * 512
        for d, subdirs, files in os.walk(uploads)
        for name in [*subdirs, *files]
    )
    assert size.name == "dir_bytes" and size.value == expected
    assert size.note == f"{entries + 1:,} entries"  # the link itself is an entry; what it points to is not walked
    assert expected < 1_000_000  # elsewhere's 10 MB were not counted


async def test_a_declared_directory_that_is_a_link_or_missing_is_unknown_not_followed(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    spec = host(directories=[str(link), str(tmp_path / "gone")], mounts=[], memory=False)
    linked, gone = await HostFigures().measure(spec, WINDOW, timeout=5)
    assert (linked.value, linked.note) == (None, "a symbolic link: not followed")
    assert (gone.value, gone.note) == (None, "no such directory on the bot's host")


async def test_a_directory_outside_the_declared_ones_is_refused_in_one_sentence(tmp_path: Path) -> None:
    spec = host(directories=[str(tmp_path / "uploads")], mounts=[])
    with pytest.raises(FigureError) as refused:
        await HostFigures().directory_size(spec, Path("/etc"), timeout=5)
    assert refused.value.message == (
        f"/etc is not one of the directories declared for this host (declared: {tmp_path / 'uploads'})."
    )


def test_the_walk_stops_at_its_entry_cap_and_says_so(tmp_path: Path) -> None:
    tree(tmp_path, 4, 100)
    found = walk_size(tmp_path, deadline=float("inf"), max_entries=150)
    assert not found.complete and found.stopped == "entry cap" and found.entries == 150


def test_the_walk_stops_at_its_deadline_by_itself(tmp_path: Path) -> None:
    tree(tmp_path, 4, 300)
    readings = iter(range(1_000_000))
    # A clock that passes the deadline at its third reading: the walk looks every 256 entries.
    found = walk_size(tmp_path, deadline=2, max_entries=10_000, clock=lambda: next(readings))
    assert not found.complete and found.stopped == "deadline"
    assert found.entries == 3 * 256


async def test_a_walk_cut_off_says_at_least(tmp_path: Path) -> None:
    uploads = tmp_path / "uploads"
    tree(uploads, 2, 100)
    spec = host(directories=[str(uploads)], mounts=[], memory=False, walk_files=50)
    [size] = await HostFigures().measure(spec, WINDOW, timeout=5)
    assert size.note == "at least: the walk stopped at its cap of 50 entries after 50 entries"
    assert size.value is not None and size.value > 0


def test_memory_from_meminfo(tmp_path: Path) -> None:
    use = memory_use(meminfo(tmp_path / "meminfo", 8_000_000, 2_000_000))
    assert (use.total, use.used, use.pct) == (8_000_000 * 1024, 6_000_000 * 1024, 75.0)


def test_memory_without_meminfo_falls_back_to_sysconf(tmp_path: Path) -> None:
    use = memory_use(tmp_path / "absent")
    assert use.total == os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") and 0 <= use.pct <= 100


async def test_the_host_probe_judges_disk_and_memory_against_the_thresholds(tmp_path: Path) -> None:
    info = meminfo(tmp_path / "meminfo", 1000, 100)  # 90 % used: above the default 80 %
    probe = HostProbe(meminfo=info)
    calm = host(mounts=[str(tmp_path)], thresholds={"disk_used_pct": {"warning": 100}})
    result = await probe.probe(calm)
    assert result.status is Status.WARNING
    assert result.detail.endswith("memory 90 % (warning)") and f"disk {tmp_path} " in result.detail
    full = host(mounts=[str(tmp_path)], thresholds={"disk_used_pct": {"critical": 0}}, memory=False)
    result = await probe.probe(full)
    assert result.status is Status.CRITICAL and result.detail.endswith("(critical)")
    assert await probe.probe(host(mounts=["/no/such"], memory=False)) == result.__class__(
        Status.WARNING, "disk /no/such unknown (no such path on the bot's host)"
    )


def test_the_host_probe_is_registered_for_health() -> None:
    assert "host" in PROBED_TYPES


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ({"thresholds": {"disk_percent": {"warning": 80}}}, "'disk_percent' is not a figure opsbot knows"),
        (
            {"thresholds": {"disk_used_pct": {"warning": 120}}},
            "the warning threshold 120 % is out of range (0 to 100 %)",
        ),
        ({"thresholds": {"disk_used_pct": {"warning": 90, "critical": 80}}}, "must be above the warning one"),
        ({"thresholds": {"cert_days_left": {"warning": 7, "critical": 21}}}, "must be below the warning one"),
        ({"thresholds": {"cpu_pct": {}}}, "give a warning or a critical value"),
        ({"directories": ["uploads"]}, "uploads: must be an absolute path"),
        ({"walk_seconds": 10}, "walk_seconds (10) must be below timeout (5)"),
        ({"alerts": [{"kind": "cpu"}]}, "a cpu rule needs a component whose cpu figures opsbot reads"),
    ],
)
def test_bad_host_settings_are_refused_with_one_sentence(fields: dict[str, object], problem: str) -> None:
    import json

    text = f"services:\n  box:\n    components:\n      host: {json.dumps({'type': 'host', **fields})}\n"
    with pytest.raises(InventoryError) as refused:
        parse_inventory(text, "t", env={})
    [line] = refused.value.problems
    assert line.startswith("services.box.components.host") and problem in line
    assert "Traceback" not in line


# -- the memory and disk rules in the watcher ---------------------------------------------------------


class Seen:
    def __init__(self) -> None:
        self.fired: list[Fired] = []
        self.resolved: list[Fired] = []

    async def fired_(self, alert: Fired) -> tuple[str, str] | None:
        self.fired.append(alert)
        return "C0OPS", "1.2"

    async def resolved_(self, alert: Fired) -> None:
        self.resolved.append(alert)


class Notifier:
    def __init__(self, seen: Seen) -> None:
        self.seen = seen

    async def fired(self, alert: Fired) -> tuple[str, str] | None:
        return await self.seen.fired_(alert)

    async def resolved(self, alert: Fired) -> None:
        await self.seen.resolved_(alert)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[StateStore]:
    store = await open_state_store(None, default_path=tmp_path / "state.db")
    yield store
    await store.close()


async def test_memory_and_disk_rules_fire_resolve_and_stay_quiet_when_silenced(
    tmp_path: Path, store: StateStore
) -> None:
    info = meminfo(tmp_path / "meminfo", 1000, 100)
    loaded = parse_inventory(
        f"""
services:
  box:
    components:
      host:
        type: host
        mounts: ["{tmp_path}"]
        alerts:
          - {{kind: memory, threshold_pct: 80, for_minutes: 1, resolve_for_minutes: 0}}
          - {{kind: disk, threshold_pct: 100, for_minutes: 0}}
""",
        "t",
        env={},
    )
    now = [T0]
    seen = Seen()
    async with aiohttp.ClientSession() as http:
        probes = build_health_probes(http, types={"host"})
        watcher = Watcher(
            store, loaded.inventory, lambda t: probes.get(t.type), http, Redactor(), probed_types=PROBED_TYPES,
            notifier=Notifier(seen), clock=lambda: now[0], figures={"host": HostFigures(meminfo=info)},
        )  # fmt: skip
        assert await watcher.round() == []  # breached, but not yet for a minute
        now[0] = T0 + timedelta(minutes=1)
        [fired] = await watcher.round()
        assert fired.key == "box/host/HighMemory" and fired.transition.kind is TransitionKind.FIRED
        assert fired.transition.evidence == "memory 90 %; alerts above 80 %"
        meminfo(info, 1000, 500)
        now[0] = T0 + timedelta(minutes=2)
        [resolved] = await watcher.round()
        assert resolved.transition.kind is TransitionKind.RESOLVED and seen.resolved == [resolved]
        alerts = await store.load_alerts()
        assert alerts["box/host/DiskFull"].state["phase"] == "ok"  # no disk is ever 100 % here
        # Silenced, a breach fires without a message.
        await store.add_silence("box/host/HighMemory", until=T0 + timedelta(hours=1), by="U1", reason="", at=now[0])
        meminfo(info, 1000, 10)
        for minute in (3, 4):
            now[0] = T0 + timedelta(minutes=minute)
            await watcher.round()
        assert len(seen.fired) == 1
        assert alerts is not None and (await store.load_alerts())["box/host/HighMemory"].state["phase"] == "firing"


async def test_a_host_gets_the_disk_rule_by_default_not_service_down() -> None:
    loaded = parse_inventory("services:\n  box:\n    components:\n      host: {type: host}\n", "t", env={})
    [w] = watched(loaded.inventory, PROBED_TYPES)
    assert [r.kind for r in w.rules] == ["disk"]
