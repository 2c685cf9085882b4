"""Imports every command module so that their ``@subcommand`` declarations are registered."""

from handlers import (
    admin_api,
    alerts,
    approvals,
    audit,
    backup,
    cleanup,
    config,
    cost,
    deploy,
    digest,
    health,
    help,
    integrity,
    jobs,
    logs,
    migrate,
    queue,
    reset,
    schedules,
    stats,
    status,
    users,
)
from handlers.registry import Registry, registry, tokenize
from services.errors import CommandError
from services.inventory import Inventory

__all__ = [
    "admin_api",
    "alerts",
    "approvals",
    "audit",
    "backup",
    "cleanup",
    "config",
    "cost",
    "deploy",
    "digest",
    "health",
    "help",
    "integrity",
    "jobs",
    "load_registry",
    "logs",
    "migrate",
    "policy_problems",
    "queue",
    "reserved_words",
    "reset",
    "schedules",
    "stats",
    "status",
    "users",
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
    verbs: dict[str, str] = {}
    for index, schedule in enumerate(inventory.schedules):
        try:
            command, _ = registry.find(tokenize(schedule.command))
        except CommandError as exc:
            problems.append(f"schedules.{index}.command: {exc.message}")
            continue
        if command is None:
            problems.append(f"schedules.{index}.command: `/ops {schedule.command[:40]}` is not an opsbot command")
        else:
            verbs[schedule.name] = command.verb
            if schedule.on_warning is not None and command.verb != "integrity":
                problems.append(
                    f"schedules.{index}.on_warning: only an `integrity <service>` schedule can fix on a warning "
                    f"(this one runs `/ops {command.verb}`)"
                )
    fixes = {s.name for s in inventory.schedules if s.on_warning == "fix" and verbs.get(s.name) == "integrity"}
    for name, pre in sorted(inventory.approvals.schedules.items()):
        where = f"approvals.schedules.{name}.command"
        if pre.command not in gated:
            problems.append(f"{where}: `{pre.command}` is not a command that needs approval")
        elif name in verbs and verbs[name] != pre.command and not (name in fixes and pre.command == "integrity fix"):
            problems.append(f"{where}: schedule `{name}` runs `/ops {verbs[name]}`, not `/ops {pre.command}`")
    reserved = reserved_words()
    problems += [
        f"services.{name}: `{name}` is a command word (`/ops … {name}` would be ambiguous); rename the service"
        for name in inventory.services
        if name in reserved
    ]
    return problems


# Words of verbs still to come (runbooks 003 and 004), reserved now so no inventory has to rename later.
_PLANNED_WORDS = frozenset({"all", "fix", "status", "set", "soft", "hard", "reset", "stats", "create-admin"})


def reserved_words() -> frozenset[str]:
    """Every word of every verb and sub-verb (`list`, `verify`, `clean`, `retry`, …): no service may be
    named like one, so that two-word verbs stay unambiguous (DESIGN: verb words are reserved)."""
    return frozenset(word for command in registry for word in command.verb.split()) | _PLANNED_WORDS
