"""Alert states, silences, probe history and digest snapshots in the state store (both databases)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from services.state import ProbeSample, StateStore, StoredAlert

NOW = datetime(2026, 11, 22, 3, 0, tzinfo=UTC)


async def test_alert_state_round_trips_and_keeps_its_message(store: StateStore) -> None:
    assert await store.load_alerts() == {}
    first = StoredAlert("shop/api/ServiceDown", "shop", {"phase": "firing", "since": "x"}, NOW, "C0OPS", "111.1")
    await store.save_alert(first)
    later = StoredAlert("shop/api/ServiceDown", "shop", {"phase": "ok"}, NOW + timedelta(minutes=5))
    await store.save_alert(later)  # no message given: the one already known stays
    [(key, stored)] = (await store.load_alerts()).items()
    assert key == "shop/api/ServiceDown"
    assert (stored.state, stored.updated_at, stored.message_channel, stored.message_ts) == (
        {"phase": "ok"}, NOW + timedelta(minutes=5), "C0OPS", "111.1",
    )  # fmt: skip


async def test_silences_expire_and_can_be_ended(store: StateStore) -> None:
    one = await store.add_silence("shop/api/HighLatency", until=NOW + timedelta(hours=1), by="U1", reason="", at=NOW)
    await store.add_silence("shop/db/SizeNearLimit", until=NOW + timedelta(minutes=10), by="U2", reason="x", at=NOW)
    assert {s.key for s in await store.active_silences(NOW)} == {"shop/db/SizeNearLimit", "shop/api/HighLatency"}
    assert [s.id for s in await store.active_silences(NOW + timedelta(minutes=30))] == [one.id]
    assert await store.active_silences(NOW + timedelta(hours=2)) == []
    assert await store.end_silence("shop/api/HighLatency", at=NOW + timedelta(minutes=1)) == 1
    assert await store.end_silence("shop/api/HighLatency", at=NOW + timedelta(minutes=1)) == 0
    assert [s.key for s in await store.active_silences(NOW + timedelta(minutes=2))] == ["shop/db/SizeNearLimit"]


async def test_probe_history_is_bounded_and_digests_remember_the_last_snapshot(store: StateStore) -> None:
    old = [ProbeSample("shop", "api", NOW - timedelta(days=9), 0, 12.5)]
    await store.record_probes(old, keep_after=NOW - timedelta(days=30))
    fresh = [ProbeSample("shop", "api", NOW, 2, 3000.0), ProbeSample("shop", "db", NOW, 0, 4.0)]
    await store.record_probes(fresh, keep_after=NOW - timedelta(days=8))  # drops the 9-day-old one
    history = await store.probe_history(since=NOW - timedelta(days=30))
    assert history == fresh
    assert await store.last_digest("daily") is None
    await store.save_digest("daily", at=NOW - timedelta(days=1), snapshot={"down": ["a"]})
    await store.save_digest("daily", at=NOW, snapshot={"down": []})
    await store.save_digest("weekly", at=NOW - timedelta(days=3), snapshot={"w": 1})
    assert await store.last_digest("daily") == (NOW, {"down": []})
    assert await store.last_digest("weekly") == (NOW - timedelta(days=3), {"w": 1})
