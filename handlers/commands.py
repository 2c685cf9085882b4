"""Imports every command module so that their ``@subcommand`` declarations are registered."""

from handlers import approvals, audit, health, help, jobs
from handlers.registry import Registry, registry

__all__ = ["approvals", "audit", "health", "help", "jobs", "load_registry"]


def load_registry() -> Registry:
    """The registry with every /ops command declared."""
    return registry
