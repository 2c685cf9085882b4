"""Figures of a ``compose`` project (runbook 001's `docker stats`, `df -h`): per container CPU %, memory
used against its limit and restarts, from ``docker stats --no-stream --format json`` and ``docker
inspect``; and for each declared disk, ``docker compose exec -T <service> df -P <path>`` (a stack on
another machine, where the bot's ``host`` component cannot look).

docker runs as the deploy code runs it (services/deploy/compose.py): an argument list, never a
shell, in its own process group, bounded output, killed with its group on timeout or cancel.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from services.deploy.base import DeployError
from services.deploy.compose import ComposeProject, ServiceState
from services.figures.base import FigureError, Measurement, Window
from services.inventory import Component, ComposeComponent
from services.text import human_bytes

__all__ = ["ComposeFigures", "ContainerStats", "parse_df", "parse_inspect", "parse_size", "parse_stats"]

_UNITS = {
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*$")


def parse_size(text: str) -> int | None:
    """``"12.5MiB"`` → bytes (docker's human sizes, binary or decimal); None when it is not one."""
    found = _SIZE.match(text)
    if found is None:
        return None
    factor = _UNITS.get(found.group(2).lower() or "b")
    return None if factor is None else int(float(found.group(1)) * factor)


def _pct(text: object) -> float | None:
    if not isinstance(text, str):
        return None
    try:
        return float(text.strip().rstrip("%"))
    except ValueError:
        return None


@dataclass(frozen=True)
class ContainerStats:
    """One container as ``docker stats`` and ``docker inspect`` report it."""

    name: str
    cpu_pct: float | None = None
    memory_used: int | None = None
    memory_limit: int | None = None
    restarts: int | None = None
    service: str = ""

    @property
    def memory_pct(self) -> float | None:
        if self.memory_used is None or not self.memory_limit:
            return None
        return self.memory_used * 100 / self.memory_limit


def parse_stats(text: str) -> dict[str, ContainerStats]:
    """``docker stats --no-stream --format json``: one JSON object per line (or one array), by name."""
    text = text.strip()
    if not text:
        return {}
    try:
        whole = json.loads(text)
        rows: list[Any] = whole if isinstance(whole, list) else [whole]
    except json.JSONDecodeError:
        try:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError:
            raise FigureError("`docker stats` did not print JSON (docker 23 or later is needed).") from None
    found: dict[str, ContainerStats] = {}
    for row in rows:
        if not isinstance(row, dict):
            continue
        name = str(row.get("Name") or row.get("Container") or "")
        used, _, limit = str(row.get("MemUsage", "")).partition("/")
        found[name] = ContainerStats(name, _pct(row.get("CPUPerc")), parse_size(used), parse_size(limit))
    return found


def parse_inspect(text: str) -> dict[str, tuple[int | None, str]]:
    """``docker inspect``: each container's restart count and compose service, by name (without ``/``)."""
    try:
        rows = json.loads(text or "[]")
    except json.JSONDecodeError:
        raise FigureError("`docker inspect` did not print JSON.") from None
    found: dict[str, tuple[int | None, str]] = {}
    for row in rows if isinstance(rows, list) else []:
        if not isinstance(row, dict):
            continue
        name = str(row.get("Name", "")).lstrip("/")
        count = row.get("RestartCount")
        labels = (row.get("Config") or {}).get("Labels") or {}
        service = labels.get("com.docker.compose.service", "") if isinstance(labels, dict) else ""
        found[name] = (count if isinstance(count, int) and not isinstance(count, bool) else None, str(service))
    return found


def parse_df(text: str) -> tuple[int, int]:
    """``df -P`` of one path: (used, available) bytes from its 1024-blocks line (POSIX format)."""
    lines = [line for line in text.splitlines() if line.strip()]
    if len(lines) < 2 or "blocks" not in lines[0].lower():
        raise FigureError("`df -P` printed something other than its POSIX table.")
    # A long device name may wrap onto its own line: the figures are the last five fields.
    fields = " ".join(lines[1:]).split()
    try:
        used, available = int(fields[-4]), int(fields[-3])
    except (IndexError, ValueError):
        raise FigureError("`df -P` printed a line without its used and available blocks.") from None
    unit = 512 if lines[0].split()[1].startswith("512") else 1024
    return used * unit, available * unit


class _Docker(ComposeProject):
    """The compose project plus the ``df`` of a service's disk that the figures need."""

    async def df(self, service: str, path: str) -> bytes:
        out = await self._run("exec", "-T", self._check_service(service), "df", "-P", path)
        return out.stdout


class ComposeFigures:
    """A compose project's container figures. docker keeps no history: there is no previous window."""

    async def measure(self, component: Component, window: Window, *, timeout: float) -> list[Measurement]:  # noqa: ASYNC109
        if not isinstance(component, ComposeComponent):
            raise FigureError(f"compose figures cannot be read of a {component.type} component")
        try:
            project = _Docker(
                component.project_dir,
                project_name=component.project_name,
                services=component.services,
                docker=component.docker,
                timeout=timeout,
            )
            # ps first (a daemon that does not answer fails once, not in every call), then the rest at once.
            running = [c for c in await project.ps() if c.state in ("running", "restarting", "paused")]
            containers, disks = await asyncio.gather(
                self._containers(project, running), self._disks(project, component)
            )
        except DeployError as exc:
            raise FigureError(exc.message) from None
        return [*containers, *disks]

    async def _containers(self, project: _Docker, running: Sequence[ServiceState]) -> list[Measurement]:
        if not running:
            return []
        names = [s.name for s in running]
        stats_out, inspect_out = await asyncio.gather(
            project.docker("stats", "--no-stream", "--format", "json", *names),
            project.docker("inspect", *names),
        )
        stats = parse_stats(stats_out.decode("utf-8", "replace"))
        inspected = parse_inspect(inspect_out.decode("utf-8", "replace"))
        out: list[Measurement] = []
        for state in running:
            one = stats.get(state.name, ContainerStats(state.name))
            restarts, _ = inspected.get(state.name, (None, ""))
            out += _container_figures(state.service or state.name, one, restarts)
        return out

    async def _disks(self, project: _Docker, component: ComposeComponent) -> list[Measurement]:
        async def one(service: str, path: str) -> Measurement:
            label = f"disk {service}:{path}"
            try:
                used, available = parse_df((await project.df(service, path)).decode("utf-8", "replace"))
            except (DeployError, FigureError) as exc:
                return Measurement("disk_used_pct", label, None, "%", note=exc.message)
            usable = used + available
            pct = used * 100 / usable if usable else 0.0
            return Measurement("disk_used_pct", label, pct, "%", note=f"{human_bytes(used)} of {human_bytes(usable)}")

        return list(await asyncio.gather(*(one(d.service, d.path) for d in component.disks)))


def _container_figures(who: str, stats: ContainerStats, restarts: int | None) -> Sequence[Measurement]:
    memory_note = ""
    if stats.memory_used is not None and stats.memory_limit:
        memory_note = f"{human_bytes(stats.memory_used)} of {human_bytes(stats.memory_limit)}"
    missing = "" if stats.cpu_pct is not None else "not in docker stats"
    return (
        Measurement("cpu_pct", f"{who} CPU", stats.cpu_pct, "%", note=missing),
        Measurement("memory_used_pct", f"{who} memory", stats.memory_pct, "%", note=memory_note or missing),
        Measurement("restarts", f"{who} restarts", None if restarts is None else float(restarts), "count"),
    )
