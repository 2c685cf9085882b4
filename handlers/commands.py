"""Imports every command module so that their ``@subcommand`` declarations are registered."""

from handlers import approvals, audit, backup, deploy, health, help, jobs
from handlers.registry import Registry, registry
from services.inventory import Inventory

__all__ = ["approvals", "audit", "backup", "deploy", "health", "help", "jobs", "load_registry", "policy_problems"]


def load_registry() -> Registry:
    """The registry with every /ops command declared."""
    return registry


def policy_problems(inventory: Inventory) -> list[str]:
    """Approval rules that name a command which does not exist or does not need approval."""
    gated = sorted(c.verb for c in registry if c.risk.needs_approval)
    return [
        f"approvals.commands.{name}: not a command that needs approval (those are: {', '.join(gated)})"
        for name in sorted(set(inventory.approvals.commands) - set(gated))
    ]
