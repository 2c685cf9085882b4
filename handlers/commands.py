"""Imports every command module so that their ``@subcommand`` declarations are registered."""

from handlers import health, help
from handlers.registry import Registry, registry

__all__ = ["health", "help", "load_registry"]


def load_registry() -> Registry:
    """The registry with every /ops command declared."""
    return registry
