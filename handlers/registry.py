"""The registry of /ops subcommands: each is declared once, with a decorator, next to its code."""

from __future__ import annotations

import difflib
import shlex
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from handlers.context import Block, OpsContext, Reply
from services.access import Risk
from services.approvals import Plan
from services.errors import CommandError
from services.inventory import Inventory, Role
from services.state import Approval
from services.text import escape

MAX_TEXT = 500
_SMART_QUOTES: dict[int, str] = {0x201C: '"', 0x201D: '"', 0x2018: "'", 0x2019: "'"}
MAX_TOKEN = 200


class CommandArgs(BaseModel):
    """Arguments of a subcommand. ``positional`` names the fields filled by bare words, in order;
    every other field is an option (``--name value``, or ``--flag`` for booleans)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    positional: ClassVar[tuple[str, ...]] = ()


class NoArgs(CommandArgs):
    pass


A = TypeVar("A", bound=CommandArgs)
R = TypeVar("R", Reply, Plan, Reply | Plan)
# A command answers with a Reply; one that needs approval answers with the Plan it would carry out.
CommandFunc = Callable[[OpsContext, Any], Awaitable[Reply | Plan]]


@dataclass(frozen=True)
class Subcommand:
    verb: str
    help: str
    usage: str
    risk: Risk
    args: type[CommandArgs]
    func: CommandFunc

    @property
    def synopsis(self) -> str:
        return f"/ops {self.verb} {self.usage}".rstrip()


def may_run(roles: frozenset[Role], command: Subcommand) -> bool:
    return command.risk.required_role in roles


class Registry:
    """Verbs to subcommands. A verb may have two words (``backup list``); the longest match wins."""

    def __init__(self) -> None:
        self._commands: dict[str, Subcommand] = {}

    def subcommand(
        self, verb: str, *, help: str, usage: str = "", risk: Risk, args: type[A]
    ) -> Callable[[Callable[[OpsContext, A], Awaitable[R]]], Callable[[OpsContext, A], Awaitable[R]]]:
        def register(func: Callable[[OpsContext, A], Awaitable[R]]) -> Callable[[OpsContext, A], Awaitable[R]]:
            if verb in self._commands:
                raise ValueError(f"/ops {verb} is declared twice")
            self._commands[verb] = Subcommand(verb, help, usage, risk, args, func)
            return func

        return register

    def __iter__(self) -> Any:
        return iter(sorted(self._commands.values(), key=lambda c: c.verb))

    def verbs(self) -> list[str]:
        return sorted(self._commands)

    def find(self, tokens: Sequence[str]) -> tuple[Subcommand | None, list[str]]:
        """The subcommand named by the first one or two tokens, and the remaining tokens."""
        if len(tokens) >= 2 and (cmd := self._commands.get(f"{tokens[0]} {tokens[1]}".lower())):
            return cmd, list(tokens[2:])
        if tokens and (cmd := self._commands.get(tokens[0].lower())):
            return cmd, list(tokens[1:])
        return None, list(tokens[1:])


# Characters that reorder or hide what is shown (bidirectional overrides and isolates, DEL).
_INVISIBLE = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\x7f")


def tokenize(text: str) -> list[str]:
    """Split command text like a shell would, but never run one; reject what we will not read."""
    text = text.strip()
    if len(text) > MAX_TEXT:
        raise CommandError(f"That command is {len(text)} characters long; the limit is {MAX_TEXT}.")
    if any((ord(ch) < 32 and ch not in "\t\n") or ch in _INVISIBLE for ch in text):
        raise CommandError("The command contains control characters; please type it again.")
    # Slack may send smart quotes from some keyboards; treat them as plain quotes.
    text = text.translate(_SMART_QUOTES)
    # With should_escape, Slack sends &, < and > as entities; mentions stay <@U123|name>.
    text = text.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")
    try:
        tokens = shlex.split(text)
    except ValueError as exc:
        raise CommandError(f"Couldn't read the arguments: {str(exc).lower()} (check your quotes).") from None
    for token in tokens:
        if len(token) > MAX_TOKEN:
            raise CommandError(f"An argument is {len(token)} characters long; the limit is {MAX_TOKEN}.")
    return tokens


def parse_args(command: Subcommand, tokens: Sequence[str]) -> CommandArgs:
    """Fill the command's argument model from tokens; errors say what was expected."""
    model = command.args
    fields = model.model_fields
    usage = f"Usage: `{command.synopsis}`"
    values: dict[str, Any] = {}
    positional: list[str] = []
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if token.startswith("--") and len(token) > 2:
            name, has_value, value = token[2:].partition("=")
            key = name.replace("-", "_")
            if key not in fields or key in model.positional:
                known = ", ".join(f"`--{f.replace('_', '-')}`" for f in fields if f not in model.positional)
                raise CommandError(
                    f"`/ops {command.verb}` has no option `--{name}`"
                    + (f" (options: {known})." if known else " (it takes no options).")
                    + f" {usage}"
                )
            if fields[key].annotation is bool:
                values[key] = value if has_value else True
            elif has_value:
                values[key] = value
            elif i + 1 < len(tokens):
                i += 1
                values[key] = tokens[i]
            else:
                raise CommandError(f"`--{name}` needs a value. {usage}")
        else:
            positional.append(token)
        i += 1
    if len(positional) > len(model.positional):
        extra = " ".join(positional[len(model.positional) :])
        raise CommandError(f"Unexpected `{clip_token(extra)}`. {usage}")
    values.update(zip(model.positional, positional, strict=False))
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        field = str(error["loc"][0]) if error["loc"] else ""
        label = field if field in model.positional else f"--{field.replace('_', '-')}"
        if error["type"] == "missing":
            raise CommandError(f"Missing `{label}`. {usage}") from None
        if error["type"] == "string_pattern_mismatch":  # the pattern itself means nothing to a user
            raise CommandError(
                f"`{label}`: `{clip_token(str(error['input']))}` is not a valid {field.replace('_', ' ')}. {usage}"
            ) from None
        message = str(error["msg"]).removeprefix("Value error, ")
        raise CommandError(f"`{label}`: {message[0].lower()}{message[1:]}. {usage}") from None


def clip_token(text: str, limit: int = 40) -> str:
    """User text to show inside a code span: shortened, backticks made quotes, and Slack's control
    characters escaped (so ``<!channel>`` is shown, never acted on)."""
    text = text.replace("`", "'")
    return escape(text if len(text) <= limit else text[: limit - 1] + "…")


def resolve_service(inventory: Inventory, name: str) -> str:
    """The service called ``name``, or a clear refusal naming the closest ones."""
    key = name.lower()
    if key in inventory.services:
        return key
    known = sorted(inventory.services)
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.5)
    hint = f" Did you mean {' or '.join(f'`{c}`' for c in close)}?" if close else ""
    listed = ", ".join(f"`{k}`" for k in known[:20]) + (" …" if len(known) > 20 else "")
    raise CommandError(f"There is no service called `{clip_token(name)}`.{hint} Known services: {listed}.")


# The one registry the bot uses; command modules declare into it with ``@subcommand``.
registry = Registry()
subcommand = registry.subcommand


# Clicks that ask for a command (a release picked from a menu, a roll-forward, a silence): action_id ->
# the command text the click stands for, run as the clicker (registered by the command's module).
ClickCommand = Callable[[Any, Mapping[str, Any]], Awaitable[str]]
CLICK_COMMANDS: dict[str, ClickCommand] = {}

# Extra buttons under a finished approval of one action (a failed rollback's roll-forward),
# registered by the command's module: action -> block or None.
FOLLOWUPS: dict[str, Callable[[Approval], Block | None]] = {}
