"""Concurrent health checks share a probe that is already running, and only while it runs."""

from __future__ import annotations

import asyncio

from services.health import InFlightProbes, ProbeResult, Status, Target, check_health
from services.inventory import Component, SqliteComponent
from services.redaction import Redactor


class CountingProbe:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.calls = 0

    async def probe(self, component: Component) -> ProbeResult:
        self.calls += 1
        await asyncio.sleep(self.seconds)
        return ProbeResult(Status.HEALTHY, "fine")


TARGET = Target("shop", "db", SqliteComponent(type="sqlite", path="/x.db", timeout=5))


async def test_ten_concurrent_checks_probe_once_and_all_get_the_result() -> None:
    probe = CountingProbe(0.2)
    shared = InFlightProbes()
    reports = await asyncio.gather(
        *(check_health([TARGET], lambda t: probe, deadline=5, redactor=Redactor(), in_flight=shared) for _ in range(10))
    )
    assert probe.calls == 1
    assert all(r.items[0].result.detail == "fine" for r in reports)
    await check_health([TARGET], lambda t: probe, deadline=5, redactor=Redactor(), in_flight=shared)
    assert probe.calls == 2  # a finished probe is not reused: the next check probes afresh


async def test_a_check_cut_at_its_deadline_does_not_cancel_the_shared_probe() -> None:
    probe = CountingProbe(0.5)
    shared = InFlightProbes()
    impatient = check_health([TARGET], lambda t: probe, deadline=0.1, redactor=Redactor(), in_flight=shared)
    patient = check_health([TARGET], lambda t: probe, deadline=5, redactor=Redactor(), in_flight=shared)
    cut, full = await asyncio.gather(impatient, patient)
    assert cut.items[0].result.status is Status.CRITICAL
    assert "overall deadline of 0.1 s" in cut.items[0].result.detail
    assert full.items[0].result.detail == "fine"
    assert probe.calls == 1
