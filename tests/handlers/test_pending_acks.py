"""Acks first: a command's work waits until no ack is pending, and never longer than its bound."""

from __future__ import annotations

import asyncio
import time

from handlers.context import PendingAcks


async def test_nothing_pending_means_no_wait() -> None:
    acks = PendingAcks()
    started = time.perf_counter()
    await acks.settled()
    assert time.perf_counter() - started < 0.05


async def test_work_waits_for_every_pending_ack() -> None:
    acks = PendingAcks(most_wait=10)
    order: list[str] = []

    async def request(name: str, answered: asyncio.Event) -> None:
        with acks.answering():
            await answered.wait()
        order.append(f"{name} answered")

    first, second = asyncio.Event(), asyncio.Event()
    requests = [asyncio.create_task(request("first", first)), asyncio.create_task(request("second", second))]
    await asyncio.sleep(0)  # both are being answered now
    assert acks.count == 2

    async def work() -> None:
        await acks.settled()
        order.append("work")

    working = asyncio.create_task(work())
    first.set()
    await asyncio.sleep(0.05)
    assert order == ["first answered"]  # one ack is still pending: no work yet
    second.set()
    await asyncio.wait_for(working, 5)
    await asyncio.gather(*requests)
    assert order == ["first answered", "second answered", "work"]
    assert acks.count == 0


async def test_a_stream_of_requests_holds_work_back_no_longer_than_the_bound() -> None:
    acks = PendingAcks(most_wait=0.1)
    with acks.answering():  # an answer that never goes out
        started = time.perf_counter()
        await acks.settled()
        waited = time.perf_counter() - started
    assert 0.09 <= waited < 2
