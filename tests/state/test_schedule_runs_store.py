"""Schedule runs in the state store: one claim per fire time, whoever asks and however often."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

from services.state import StateStore

FIRE = datetime(2026, 11, 22, 17, 0, tzinfo=UTC)


async def test_exactly_one_of_many_racing_claims_wins(store: StateStore) -> None:
    claims = await asyncio.gather(
        *(store.claim_schedule_run("daily-digest", FIRE, holder=f"replica-{i}", at=FIRE) for i in range(20))
    )
    assert claims.count(True) == 1
    assert await store.claim_schedule_run("daily-digest", FIRE + timedelta(days=1), holder="r", at=FIRE)
    assert await store.claim_schedule_run("backup-shop", FIRE, holder="r", at=FIRE)  # another schedule


async def test_the_newest_run_of_each_schedule_and_its_outcome(store: StateStore) -> None:
    assert await store.last_schedule_runs() == {}
    for day in range(3):
        fire = FIRE + timedelta(days=day)
        await store.claim_schedule_run("daily-digest", fire, holder="replica-1", at=fire + timedelta(seconds=2))
    await store.claim_schedule_run("keepalive", FIRE, holder="replica-2", at=FIRE)
    newest = FIRE + timedelta(days=2)
    await store.finish_schedule_run("daily-digest", newest, outcome="ok: posted", at=newest + timedelta(seconds=9))
    runs = await store.last_schedule_runs()
    assert set(runs) == {"daily-digest", "keepalive"}
    digest = runs["daily-digest"]
    assert (digest.fire_at, digest.holder, digest.outcome) == (newest, "replica-1", "ok: posted")
    assert digest.started_at == newest + timedelta(seconds=2) and digest.finished_at == newest + timedelta(seconds=9)
    assert runs["keepalive"].finished_at is None and runs["keepalive"].outcome == ""
