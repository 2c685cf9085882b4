"""Health of the machine the bot runs on (runbook 001): each declared filesystem and memory against
the component's thresholds (disk ≥ 80 % warning, ≥ 90 % critical by default). No directory walk:
health answers quickly; `/ops status` shows directory sizes."""

from __future__ import annotations

import asyncio
from pathlib import Path

from services.figures.host import mounts_and_memory
from services.figures.thresholds import judge
from services.health import ProbeResult, Status
from services.inventory import Component, HostComponent

__all__ = ["HostProbe"]


class HostProbe:
    """Reads ``shutil.disk_usage`` per mount and /proc/meminfo in a thread; never raises for a full disk."""

    def __init__(self, *, meminfo: Path = Path("/proc/meminfo")) -> None:
        self._meminfo = meminfo

    async def probe(self, component: Component) -> ProbeResult:
        if not isinstance(component, HostComponent):
            raise TypeError(f"HostProbe cannot probe a {component.type} component")
        found = await asyncio.to_thread(mounts_and_memory, component, self._meminfo)
        parts: list[str] = []
        facts: dict[str, str | int | float] = {}
        worst = Status.HEALTHY
        for m in found:
            if m.value is None:
                parts.append(f"{m.label} unknown ({m.note})")
                worst = max(worst, Status.WARNING)
                continue
            level, _ = judge(m.name, m.value, component.thresholds)
            status = Status(int(level))
            parts.append(f"{m.label} {m.value:.0f} %" + (f" ({status.label})" if status else ""))
            worst = max(worst, status)
            facts[f"{m.name}:{m.label}"] = round(m.value, 1)
        return ProbeResult(worst, " · ".join(parts) or "nothing declared to check", facts=facts)
