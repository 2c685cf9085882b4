"""The load client of bench/ack_latency.py, in a process of its own (pinned to its own core).

Light on purpose, so that what it measures is the server: plain non-blocking sockets and one
selector, kept-alive connections opened before the first burst, every request signed and encoded
before its burst starts. A burst sends one request on each connection and times each from its
send to the last byte of its answer. Reads a JSON plan on stdin, writes JSON results on stdout.
"""

from __future__ import annotations

import json
import os
import selectors
import socket
import sys
import time
import urllib.request
from typing import Any

from tests.fixtures.slack import sign, slash_body

QUIET_TIMEOUT = 60.0


class Connection:
    """One kept-alive HTTP/1.1 connection; reopened if the server closed it between bursts."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.sock = self._open()

    def _open(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        return sock

    def ensure_open(self) -> None:
        try:
            if self.sock.recv(1, socket.MSG_PEEK) == b"":
                self.sock.close()
                self.sock = self._open()
        except BlockingIOError:
            pass  # open, nothing to read: as it should be


def request_bytes(port: int, text: str, secret: str, response_url: str) -> bytes:
    body = slash_body(text, user_id="U0BENCH", response_url=response_url)
    head = {"Host": f"127.0.0.1:{port}", "Content-Type": "application/x-www-form-urlencoded",
            "Content-Length": str(len(body)), **sign(secret, body)}  # fmt: skip
    lines = "".join(f"{k}: {v}\r\n" for k, v in head.items())
    return f"POST /slack/events HTTP/1.1\r\n{lines}\r\n{body}".encode()


def burst(conns: list[Connection], requests: list[bytes]) -> list[float]:
    """Send one request on each connection at once; the seconds until each full answer."""
    selector = selectors.DefaultSelector()
    started: dict[int, float] = {}
    received: dict[int, bytearray] = {}
    done: list[float] = []
    for number, (conn, data) in enumerate(zip(conns, requests, strict=True)):
        conn.ensure_open()
        started[number] = time.perf_counter()
        conn.sock.sendall(data)  # a few hundred bytes: the socket buffer takes it at once
        received[number] = bytearray()
        selector.register(conn.sock, selectors.EVENT_READ, number)
    while len(done) < len(conns):
        for key, _ in selector.select(timeout=30):
            number = key.data
            chunk = key.fileobj.recv(65536)  # type: ignore[union-attr]
            if not chunk:
                raise RuntimeError("the server closed a connection during a burst")
            buffer = received[number]
            buffer += chunk
            if complete(buffer):
                done.append(time.perf_counter() - started[number])
                selector.unregister(key.fileobj)
                if not buffer.startswith(b"HTTP/1.1 200"):
                    raise RuntimeError(f"answer: {bytes(buffer[:200])!r}")
    selector.close()
    return done


def complete(buffer: bytearray) -> bool:
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        return False
    length = 0
    for line in bytes(buffer[:end]).split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return len(buffer) >= end + 4 + length


def commands_done(port: int) -> float:
    """opsbot's count of finished commands, from its /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("opsbot_commands_total{"))


def wait_quiet(port: int, expected: int) -> None:
    """Until opsbot has finished every command sent to it (its work no longer competes)."""
    deadline = time.monotonic() + QUIET_TIMEOUT
    while commands_done(port) < expected:
        if time.monotonic() > deadline:
            raise RuntimeError(f"opsbot did not finish {expected} commands within {QUIET_TIMEOUT:g} s")
        time.sleep(0.1)


def run(plan: dict[str, Any]) -> dict[str, Any]:
    if plan.get("core") is not None:
        os.sched_setaffinity(0, {plan["core"]})
    concurrency, bursts, pause = plan["concurrency"], plan["bursts"], plan["pause"]
    sides: dict[str, int] = plan["ports"]  # {"opsbot": port, "floor": port}
    conns = {side: [Connection(port) for _ in range(concurrency)] for side, port in sides.items()}
    sent = {side: 0 for side in sides}

    def block(side: str, record: bool) -> list[float]:
        samples: list[float] = []
        port = sides[side]
        for _ in range(bursts if record else 1):
            requests = [request_bytes(port, plan["text"], plan["secret"], plan["response_url"])
                        for _ in range(concurrency)]  # fmt: skip
            samples += burst(conns[side], requests)
            sent[side] += concurrency
            time.sleep(pause)
        if side == "opsbot":
            wait_quiet(port, sent[side])  # the next block starts with the bot at rest, as the floor does
        time.sleep(pause)
        return samples

    for side in sides:
        block(side, record=False)  # warm-up: Bolt's auth.test, first-use caches
    rounds: list[dict[str, list[float]]] = []
    for number in range(plan["rounds"]):
        order = list(sides) if number % 2 == 0 else list(reversed(sides))
        rounds.append({side: block(side, record=True) for side in order})
    for side_conns in conns.values():
        for conn in side_conns:
            conn.sock.close()
    return {"rounds": rounds}


def main() -> None:
    plan = json.loads(sys.stdin.read())
    sys.stdout.write(json.dumps(run(plan)) + "\n")


if __name__ == "__main__":
    main()
