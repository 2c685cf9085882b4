"""/ops without Slack: a REPL (`opsbot console`) and one-shot runs (`opsbot run`)."""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import signal
import sys
from typing import TextIO

from bot.container import Container
from handlers.blocks import messages_for, plain, render_text
from handlers.context import Block, Reply
from services.health import Status
from services.inventory import Role

# Exit codes of `opsbot run`: the overall health, or 3 when the command was refused or failed.
EXIT_FOR_STATUS = {Status.HEALTHY: 0, Status.WARNING: 1, Status.CRITICAL: 2}
EXIT_REFUSED = 3


def local_user() -> str:
    """The audit actor for the CLI's own user: ``local:<login name>``."""
    try:
        return f"local:{getpass.getuser()}"
    except (KeyError, OSError):  # no passwd entry (some containers)
        return "local:unknown"


CONSOLE_CHANNEL = "console"


def render_reply(reply: Reply) -> str:
    """A reply as the console shows it: every message, thread replies indented."""
    parts: list[str] = []
    for message in messages_for(reply):
        text = render_text(message.blocks) if message.blocks else message.text
        if message.in_thread:
            text = "\n".join(f"  │ {line}" for line in ["(in thread)", *text.splitlines()])
        parts.append(text)
    return "\n\n".join(parts)


class Console:
    """Runs /ops command lines as one user and prints the replies."""

    def __init__(self, container: Container, user: str | None, out: TextIO = sys.stdout) -> None:
        self.container = container
        self.user = user or local_user()
        self.out = out
        if user is None:
            # Whoever runs the CLI on the bot's host already holds its config and secrets:
            # the local user is an admin. `--as U123` shows what that Slack user may do.
            container.deps.roles.grant(self.user, Role.ADMIN)

    async def execute(self, line: str) -> Reply:
        text = line.strip()
        text = text.removeprefix("/ops").strip() if text.startswith("/ops") else text
        return await self.container.router.dispatch(
            user_id=self.user,
            channel_id=CONSOLE_CHANNEL,
            text=text,
            deps=self.container.deps,
            interface="console",
            progress=self._progress,
            live=self._live,
        )

    async def _progress(self, text: str) -> None:
        self.out.write(plain(text) + "\n")
        self.out.flush()

    async def _live(self, text: str, blocks: list[Block]) -> None:
        self.out.write(plain(text) + "\n")
        self.out.flush()

    async def show(self, line: str, *, echo: bool = True) -> Reply:
        """Run one command line and print its reply (after the line itself, with who typed it if not the local user)."""
        if echo:
            who = "" if self.user.startswith("local:") else f"   (as {self.user})"
            self.out.write(f"\n> /ops {line.strip().removeprefix('/ops').strip()}{who}\n")
        reply = await self.execute(line)
        self.out.write(render_reply(reply) + "\n")
        self.out.flush()
        return reply

    async def run_once(self, line: str) -> int:
        """`opsbot run`: one command line and its exit code. SIGINT or SIGTERM stops the command as interrupted
        (exit 3, a message on stderr) after the bot has recorded what it was doing: an approved run it was
        running ends ``interrupted``, audited, instead of the process dying with it still ``running``."""
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("run_once must run in a task")
        stops: list[signal.Signals] = []
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):  # not the main thread, Windows
                loop.add_signal_handler(sig, task.cancel)
                stops.append(sig)
        try:
            return exit_code(await self.show(line))
        except asyncio.CancelledError:
            task.uncancel()
            sys.stderr.write(f"opsbot: interrupted: `/ops {line.strip()}` did not finish\n")
            return EXIT_REFUSED
        finally:
            for sig in stops:
                loop.remove_signal_handler(sig)

    async def loop(self, stdin: TextIO = sys.stdin) -> None:
        who = f"{self.user} (an admin on this host)" if self.user.startswith("local:") else self.user
        self.out.write(f"opsbot console as {who}. Type `/ops help`, or `quit`.\n")
        interactive = stdin.isatty()
        if interactive:
            import readline  # noqa: F401  (line editing and history for input())
        while True:
            if interactive:
                try:
                    line = await asyncio.to_thread(input, "ops> ")
                except EOFError:
                    self.out.write("\n")
                    return
            else:
                line = await asyncio.to_thread(stdin.readline)
                if not line:
                    return
            if line.strip() in ("quit", "exit", ":q"):
                return
            if line.strip():
                await self.show(line, echo=not interactive)


def exit_code(reply: Reply) -> int:
    """0 healthy, 1 warning, 2 critical; 3 when the command was refused or failed."""
    if reply.outcome != "ok":
        return EXIT_REFUSED
    return EXIT_FOR_STATUS[reply.status] if reply.status is not None else 0
