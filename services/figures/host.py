"""Figures of the machine the bot runs on (runbook 001): filesystem use, directory sizes and memory.

Measured with Python's own calls, never by parsing `df` or `du`: ``shutil.disk_usage`` per declared
mount, a bounded ``os.scandir`` walk per declared directory, and /proc/meminfo (``os.sysconf`` where
there is none). Every call that touches a filesystem runs in a thread, so a hung NFS mount never
blocks the event loop; the walk carries its own deadline and entry cap into the thread, so it stops
by itself even when the caller has given up on it.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from services.figures.base import FigureError, Measurement, Window
from services.inventory import Component, HostComponent
from services.text import human_bytes

__all__ = [
    "DirectorySize",
    "HostFigures",
    "MemoryUse",
    "disk_figure",
    "memory_figure",
    "memory_use",
    "mounts_and_memory",
    "walk_size",
]

_CHECK_EVERY = 256  # entries between two looks at the clock


@dataclass(frozen=True)
class DirectorySize:
    """What one bounded walk found: bytes on disk (like ``du``) and entries, and whether it saw them all."""

    bytes: int
    entries: int
    complete: bool = True
    stopped: str = ""
    """Why the walk stopped early (its deadline, its entry cap)."""
    unreadable: int = 0
    """Directories it could not list (permission denied, removed while walking)."""


def walk_size(
    root: Path, *, deadline: float, max_entries: int, clock: Callable[[], float] = time.monotonic
) -> DirectorySize:
    """Sum the disk use of everything under ``root`` without following links; stop at ``deadline`` (a
    ``clock`` reading) or after ``max_entries`` entries. Blocking: run it in a thread."""
    total = 0
    entries = 0
    unreadable = 0
    stack = [os.fspath(root)]
    while stack:
        path = stack.pop()
        try:
            with os.scandir(path) as found:
                for entry in found:
                    entries += 1
                    if entries % _CHECK_EVERY == 0 and clock() >= deadline:
                        return DirectorySize(total, entries, False, "deadline", unreadable)
                    if entries > max_entries:
                        return DirectorySize(total, entries - 1, False, "entry cap", unreadable)
                    try:
                        info = entry.stat(follow_symlinks=False)
                    except OSError:
                        continue  # removed while walking
                    total += _on_disk(info)
                    if stat.S_ISDIR(info.st_mode):
                        stack.append(entry.path)
        except OSError:
            unreadable += 1
    return DirectorySize(total, entries, True, "", unreadable)


def _on_disk(info: os.stat_result) -> int:
    blocks = getattr(info, "st_blocks", None)
    return blocks * 512 if isinstance(blocks, int) else info.st_size


@dataclass(frozen=True)
class MemoryUse:
    total: int
    available: int

    @property
    def used(self) -> int:
        return max(self.total - self.available, 0)

    @property
    def pct(self) -> float:
        return self.used * 100 / self.total if self.total else 0.0


def memory_use(meminfo: Path = Path("/proc/meminfo")) -> MemoryUse:
    """MemTotal and MemAvailable from /proc/meminfo; without it, os.sysconf (free pages only)."""
    try:
        text = meminfo.read_text(encoding="ascii", errors="replace")
    except OSError:
        text = ""
    fields: dict[str, int] = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        parts = rest.split()
        if name in ("MemTotal", "MemAvailable", "MemFree") and parts and parts[0].isdigit():
            fields[name] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    if "MemTotal" in fields:
        return MemoryUse(fields["MemTotal"], fields.get("MemAvailable", fields.get("MemFree", 0)))
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        return MemoryUse(os.sysconf("SC_PHYS_PAGES") * page, os.sysconf("SC_AVPHYS_PAGES") * page)
    except (ValueError, OSError, AttributeError):
        raise FigureError("The host's memory could not be read (no /proc/meminfo, no sysconf).") from None


def memory_figure(meminfo: Path = Path("/proc/meminfo")) -> Measurement:
    """The host's memory use as a figure, or the line marked unknown with why."""
    try:
        use = memory_use(meminfo)
    except FigureError as exc:
        return Measurement("memory_used_pct", "memory", None, "%", note=exc.message)
    return Measurement(
        "memory_used_pct", "memory", use.pct, "%", note=f"{human_bytes(use.used)} of {human_bytes(use.total)}"
    )


def disk_figure(mount: Path) -> Measurement:
    """The use of the filesystem holding ``mount``, or the line marked unknown with why. Blocking."""
    label = f"disk {mount}"
    try:
        usage = shutil.disk_usage(mount)
    except FileNotFoundError:
        return Measurement("disk_used_pct", label, None, "%", note="no such path on the bot's host")
    except OSError as exc:
        return Measurement("disk_used_pct", label, None, "%", note=f"cannot read: {exc.strerror or type(exc).__name__}")
    # As df computes Use%: used over what non-root users may fill (used + available).
    usable = usage.used + usage.free
    pct = usage.used * 100 / usable if usable else 0.0
    return Measurement("disk_used_pct", label, pct, "%", note=f"{human_bytes(usage.used)} of {human_bytes(usable)}")


class HostFigures:
    """The ``host`` component's figures. No history is kept, so there is no previous window to compare."""

    def __init__(self, *, meminfo: Path = Path("/proc/meminfo")) -> None:
        self._meminfo = meminfo

    async def measure(self, component: Component, window: Window, *, timeout: float) -> list[Measurement]:  # noqa: ASYNC109
        if not isinstance(component, HostComponent):
            raise FigureError(f"host figures cannot be read of a {component.type} component")
        walk_budget = min(component.walk_seconds, max(timeout - 0.2, 0.05))
        parts = [asyncio.to_thread(disk_figure, mount) for mount in component.mounts]
        parts += [self._directory(directory, walk_budget, component.walk_files) for directory in component.directories]
        found: list[Measurement] = list(await asyncio.gather(*parts))
        if component.memory:
            found.append(await asyncio.to_thread(memory_figure, self._meminfo))
        return found

    async def directory_size(
        self,
        component: HostComponent,
        directory: Path,
        *,
        timeout: float,  # noqa: ASYNC109
    ) -> Measurement:
        """The size of one of the component's declared directories; any other path is refused."""
        if directory not in component.directories:
            declared = ", ".join(str(d) for d in component.directories) or "none"
            raise FigureError(
                f"{str(directory)[:120]} is not one of the directories declared for this host (declared: {declared})."
            )
        return await self._directory(directory, min(component.walk_seconds, timeout), component.walk_files)

    async def _directory(self, directory: Path, budget: float, max_entries: int) -> Measurement:
        label = f"size of {directory}"
        problem = await asyncio.to_thread(_directory_problem, directory)
        if problem:
            return Measurement("dir_bytes", label, None, "bytes", note=problem)
        deadline = time.monotonic() + budget
        size = await asyncio.to_thread(walk_size, directory, deadline=deadline, max_entries=max_entries)
        notes: list[str] = []
        if not size.complete:
            why = f"its {budget:g} s deadline" if size.stopped == "deadline" else f"its cap of {max_entries:,} entries"
            notes.append(f"at least: the walk stopped at {why} after {size.entries:,} entries")
        else:
            notes.append(f"{size.entries:,} entries")
        if size.unreadable:
            notes.append(f"{size.unreadable:,} unreadable directories left out")
        return Measurement("dir_bytes", label, float(size.bytes), "bytes", note="; ".join(notes))


def _directory_problem(directory: Path) -> str:
    """Why a declared directory cannot be walked, or "" (a link is not followed, even at the top)."""
    try:
        info = directory.lstat()
    except FileNotFoundError:
        return "no such directory on the bot's host"
    except OSError as exc:
        return f"cannot read: {exc.strerror or type(exc).__name__}"
    if stat.S_ISLNK(info.st_mode):
        return "a symbolic link: not followed"
    if not stat.S_ISDIR(info.st_mode):
        return "not a directory"
    return ""


def mounts_and_memory(component: HostComponent, meminfo: Path = Path("/proc/meminfo")) -> Sequence[Measurement]:
    """The quick figures (no directory walk) the health probe judges. Blocking: run it in a thread."""
    found = [disk_figure(mount) for mount in component.mounts]
    if component.memory:
        found.append(memory_figure(meminfo))
    return found
