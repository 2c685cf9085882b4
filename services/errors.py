"""Exceptions that carry a message meant for the person who asked."""

from __future__ import annotations

# Every outcome a command ends with, as audited and counted in opsbot_commands_total: done; waiting
# for approval; refused for bad input; refused for a missing role; refused by a rule (channel,
# self-approval); the service busy with another run; failed.
OUTCOMES = ("ok", "pending", "rejected", "denied", "refused", "busy", "error")


class CommandError(Exception):
    """An expected failure: its message is shown to the user as one plain sentence."""

    def __init__(self, message: str, *, outcome: str = "rejected") -> None:
        super().__init__(message)
        self.message = message
        self.outcome = outcome


class PermissionDenied(CommandError):
    """The caller's role does not allow the command."""

    def __init__(self, message: str) -> None:
        super().__init__(message, outcome="denied")


class StateStoreUnavailable(CommandError):
    """The bot's own state store did not answer (down, restarting, unreachable): said plainly,
    with the technical reason kept for the log."""

    def __init__(self, reason: str) -> None:
        super().__init__("opsbot's state store is not answering just now; try again in a minute.", outcome="error")
        self.reason = reason


class AuditSpooled(StateStoreUnavailable):
    """The audit event could not reach the state store and waits in the local spool."""


class InventoryError(Exception):
    """The inventory file is invalid; ``problems`` lists each one as ``path: message``."""

    def __init__(self, source: str, problems: list[str]) -> None:
        super().__init__(f"{source}: {len(problems)} problem(s)")
        self.source = source
        self.problems = problems


class StartupError(Exception):
    """The bot cannot start (state store unreachable, bad URL): one sentence, no traceback."""
