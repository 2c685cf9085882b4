"""Argument parsing: positional and option values, and errors that say what was expected."""

from __future__ import annotations

import pytest
from pydantic import Field

from handlers.context import OpsContext, Reply
from handlers.registry import CommandArgs, Registry, parse_args, tokenize
from services.access import Risk
from services.errors import CommandError


class AuditArgs(CommandArgs):
    positional = ("service",)
    service: str | None = None
    user: str | None = None
    limit: int = Field(20, ge=1, le=200)
    post: bool = False


registry = Registry()


@registry.subcommand(
    "audit", help="Show audit events", usage="[service] [--user @x] [--limit N]", risk=Risk.READ, args=AuditArgs
)
async def audit(ctx: OpsContext, args: AuditArgs) -> Reply:
    return Reply("")


@registry.subcommand("backup list", help="List backups", usage="<service>", risk=Risk.READ, args=AuditArgs)
async def backup_list(ctx: OpsContext, args: AuditArgs) -> Reply:
    return Reply("")


def parse(text: str) -> CommandArgs:
    command, rest = registry.find(tokenize(text))
    assert command is not None
    return parse_args(command, rest)


def test_positional_options_flags_and_two_word_verbs() -> None:
    assert parse("audit shop --user U1 --limit=5 --post") == AuditArgs(service="shop", user="U1", limit=5, post=True)
    assert parse('audit "shop"') == AuditArgs(service="shop")
    command, rest = registry.find(["backup", "list", "shop"])
    assert command is not None and command.verb == "backup list" and rest == ["shop"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("audit --limit lots", "`--limit`: input should be a valid integer"),
        ("audit --limit 0", "`--limit`: input should be greater than or equal to 1"),
        ("audit --user", "`--user` needs a value"),
        ("audit --colour red", "has no option `--colour` (options: `--user`, `--limit`, `--post`)"),
        ("audit a b", "Unexpected `b`"),
    ],
)
def test_errors_name_the_problem_and_the_usage(text: str, message: str) -> None:
    with pytest.raises(CommandError) as caught:
        parse(text)
    assert message in caught.value.message
    assert "Usage: `/ops audit [service] [--user @x] [--limit N]`" in caught.value.message


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a 'b", "no closing quotation"),
        ("x" * 501, "the limit is 500"),
        ("a " + "y" * 201, "the limit is 200"),
        ("a \x00b", "control characters"),
    ],
)
def test_tokenize_refuses_what_it_cannot_read(text: str, message: str) -> None:
    with pytest.raises(CommandError) as caught:
        tokenize(text)
    assert message in caught.value.message


def test_smart_quotes_and_metacharacters_are_just_text() -> None:
    assert tokenize("health “my shop”") == ["health", "my shop"]
    assert tokenize("health shop;rm -rf / $(x) `y` |z") == ["health", "shop;rm", "-rf", "/", "$(x)", "`y`", "|z"]


def test_a_verb_is_declared_once() -> None:
    with pytest.raises(ValueError, match="declared twice"):
        registry.subcommand("audit", help="", risk=Risk.READ, args=AuditArgs)(audit)
