"""The import grain of DESIGN.md: bot -> handlers -> services; services know nothing of Slack."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]

FORBIDDEN = {
    "services": ("bot", "handlers", "slack_bolt", "slack_sdk"),
    "handlers": ("bot", "asyncpg", "aiosqlite", "pymongo", "redis", "qdrant_client", "boto3", "google", "aiohttp"),
}


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_follow_the_grain(package: str) -> None:
    offenders = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for name in imports_of(path):
            if name.split(".")[0] in FORBIDDEN[package]:
                offenders.append(f"{path.relative_to(ROOT)} imports {name}")
    assert offenders == []


# -- the house: who may import whom inside the layers ----------------------------------------------

LAYERS = ("bot", "handlers", "services")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for layer in LAYERS for path in sorted((ROOT / layer).rglob("*.py"))}


def local_imports(path: Path) -> set[str]:
    """The project modules ``path`` imports, wherever the import sits (a function's too): for
    ``from package import name`` the submodule when ``name`` is one, else the package."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name in MODULES}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                if f"{node.module}.{alias.name}" in MODULES:
                    found.add(f"{node.module}.{alias.name}")
                elif node.module in MODULES:
                    found.add(node.module)
    return found


GRAPH = {name: local_imports(path) for name, path in MODULES.items()}


def reachable(start: str) -> set[str]:
    """Every project module ``start`` imports, directly or through others."""
    seen: set[str] = set()
    todo = [start]
    while todo:
        for name in GRAPH[todo.pop()] - seen:
            seen.add(name)
            todo.append(name)
    return seen


# The shared base of handlers/: what a command module may import from handlers/. Rendering shared by
# several commands lives in blocks.py (and wording in services/text.py), argument lookups and the
# hooks commands register into (buttons, follow-ups) in registry.py, what a command gets and returns
# in context.py. They import no command module.
SHARED_BASE = {"handlers.blocks", "handlers.context", "handlers.registry"}
# The wiring: it finds, runs and answers the commands, so it may import command modules.
WIRING = {"handlers", "handlers.commands", "handlers.router", "handlers.slack"}
COMMAND_MODULES = {name for name in MODULES if name.startswith("handlers.")} - SHARED_BASE - WIRING


@pytest.mark.parametrize("module", sorted(COMMAND_MODULES | SHARED_BASE))
def test_handlers_do_not_import_each_other(module: str) -> None:
    """A command module (and the shared base) imports from handlers/ only the shared base."""
    others = {name for name in GRAPH[module] if name.startswith("handlers")} - SHARED_BASE
    assert others == set(), f"{module} imports {sorted(others)}: shared code goes to the shared base"


def test_every_command_is_declared_in_a_command_module() -> None:
    """The base and the wiring declare no command, so the split above stays true as commands grow."""
    declaring = {
        name
        for name, path in MODULES.items()
        if name.startswith("handlers")
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "subcommand"
    }
    assert declaring <= COMMAND_MODULES


# What the digest shows is gathered by services/digest.py as plain data; the handler only renders it.
CLIENTS = {"store", "backups", "probes", "probe_for", "redactor", "deploys"}  # what Deps carries to read with
GATHERING = {"services.backup.runner", "services.alerts.watch", "services.charts", "services.jobs"}


def test_the_digest_handler_renders_and_gathers_nothing() -> None:
    tree = ast.parse((ROOT / "handlers" / "digest.py").read_text(encoding="utf-8"))
    reached = {
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and (
            (isinstance(node.value, ast.Name) and node.value.id == "deps")
            or (isinstance(node.value, ast.Attribute) and node.value.attr == "deps")
        )
    }
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) for alias in node.names}
    assert reached & CLIENTS == set(), "the digest handler reads through Deps itself"
    assert "check_health" not in imported
    assert GRAPH["handlers.digest"] & GATHERING == set()
    assert "services.digest" in GRAPH["handlers.digest"]


def test_the_inventory_models_do_not_depend_on_the_alerts_engine() -> None:
    """The inventory parses alert rules; the engine that evaluates them reads the inventory, not
    the other way round."""
    engine = {name for name in reachable("services.inventory") if name.startswith("services.alerts.")}
    assert engine <= {"services.alerts.models"}


def test_there_is_no_import_circle() -> None:
    """Not even through a function-level import (services.state.base's factory once imported its
    own implementations)."""
    circles = sorted(name for name in MODULES if name in reachable(name))
    assert circles == []
