"""Imports every command module so that their ``@subcommand`` declarations are registered."""

from handlers import alerts, approvals, audit, backup, cleanup, deploy, digest, health, help, jobs, queue, schedules
from handlers.registry import Registry, registry, tokenize
from services.errors import CommandError
from services.inventory import Inventory

__all__ = [
    "alerts",
    "approvals",
    "audit",
    "backup",
    "cleanup",
    "deploy",
    "digest",
    "health",
    "help",
    "jobs",
    "load_registry",
    "policy_problems",
    "queue",
    "schedules",
]


def load_registry() -> Registry:
    """The registry with every /ops command declared."""
    return registry


def policy_problems(inventory: Inventory) -> list[str]:
    """Approval rules that name a command which does not exist or does not need approval, and
    schedules whose command is not one."""
    gated = sorted(c.verb for c in registry if c.risk.needs_approval)
    problems = [
        f"approvals.commands.{name}: not a command that needs approval (those are: {', '.join(gated)})"
        for name in sorted(set(inventory.approvals.commands) - set(gated))
    ]
    for index, schedule in enumerate(inventory.schedules):
        try:
            command, _ = registry.find(tokenize(schedule.command))
        except CommandError as exc:
            problems.append(f"schedules.{index}.command: {exc.message}")
            continue
        if command is None:
            problems.append(f"schedules.{index}.command: `/ops {schedule.command[:40]}` is not an opsbot command")
    return problems
