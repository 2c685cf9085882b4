"""The `opsbot` command line: serve, console, run, demo, config check|schema, audit verify|export."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from pydantic import ValidationError

from bot.logging import configure_logging
from bot.settings import Settings
from services.errors import InventoryError, StartupError
from services.inventory import Role, inventory_schema, load_inventory
from services.redaction import Redactor


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="opsbot", description="ChatOps for the team's runbooks.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="serve Slack over HTTP (or Socket Mode with --socket)")
    serve.add_argument("--socket", action="store_true", help="use Socket Mode (needs SLACK_APP_TOKEN)")
    serve.add_argument("--port", type=int, help="listen port (default OPSBOT_PORT or 3000)")

    console = sub.add_parser("console", help="type /ops commands without Slack")
    console.add_argument("--as", dest="user", help="act as this Slack user ID (default: local admin)")

    run = sub.add_parser(
        "run", help='run one command, e.g. opsbot run "health all"; exit 0/1/2 = healthy/warning/critical'
    )
    run.add_argument("text", help="the command text after /ops")
    run.add_argument("--as", dest="user", help="act as this Slack user ID (default: local admin)")

    sub.add_parser("demo", help="zero-setup demo: a sample app, SQLite state, /ops health all")

    config = sub.add_parser("config", help="check the inventory or print its JSON Schema")
    config_sub = config.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    check = config_sub.add_parser("check", help="validate an inventory file; exit 1 listing every problem")
    check.add_argument("file", type=Path)
    config_sub.add_parser("schema", help="print the inventory JSON Schema")

    audit = sub.add_parser("audit", help="check the audit log's hash chain or export it")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True, metavar="ACTION")
    audit_sub.add_parser("verify", help="check the hash chain; exit 1 naming the first broken event")
    export = audit_sub.add_parser("export", help="write the audit log as JSON lines, oldest first")
    export.add_argument(
        "--output", "-o", type=Path, metavar="FILE", help="write to FILE, complete or not at all (default: stdout)"
    )
    export.add_argument(
        "--since-seq",
        type=_seq,
        default=0,
        metavar="N",
        help="only events after #N, e.g. the last seq of an earlier export (default: 0, everything)",
    )
    return parser


def _seq(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {value}")
    return value


def config_check(path: Path) -> int:
    from handlers.commands import policy_problems

    try:
        loaded = load_inventory(path)
        if problems := policy_problems(loaded.inventory):
            raise InventoryError(str(path), problems)
    except InventoryError as exc:
        print(f"{path}: {len(exc.problems)} problem(s)", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return 1
    inventory = loaded.inventory
    types: dict[str, int] = {}
    for _, _, component in inventory.components():
        types[component.type] = types.get(component.type, 0) + 1
    members = sum(len(inventory.roles.members(role)) for role in Role)
    print(f"{path}: OK")
    print(f"  {len(inventory.services)} service(s): {', '.join(inventory.services)}")
    print(f"  {sum(types.values())} component(s): " + ", ".join(f"{n} {t}" for t, n in sorted(types.items())))
    print(
        f"  {members} role member(s); ops channel: {inventory.ops_channel or 'not set'}; timezone {inventory.timezone}"
    )
    return 0


def _settings() -> Settings:
    try:
        return Settings()
    except ValidationError as exc:
        for error in exc.errors(include_url=False):
            name = ".".join(str(p) for p in error["loc"]).upper()
            print(f"environment: {name}: {error['msg']}", file=sys.stderr)
        raise SystemExit(2) from None


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "config":
        if args.config_command == "schema":
            print(json.dumps(inventory_schema(), indent=2))
            return 0
        return config_check(args.file)

    settings = _settings()
    redactor = Redactor(settings.secret_values())
    # Console, run and demo print reports on stdout; their logs stay quiet unless asked for.
    quiet = args.command != "serve" and "OPSBOT_LOG_LEVEL" not in os.environ
    configure_logging(settings.log_format, "WARNING" if quiet else settings.log_level, redactor)
    try:
        return asyncio.run(_async_main(args, settings, redactor))
    except InventoryError as exc:
        print(f"{exc.source}: {len(exc.problems)} problem(s) in the inventory", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return 1
    except StartupError as exc:
        print(f"opsbot: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


async def _async_main(args: argparse.Namespace, settings: Settings, redactor: Redactor) -> int:
    if args.command == "audit":
        from bot.audit_cli import run_audit

        return await run_audit(
            args.audit_command,
            settings,
            redactor,
            output=getattr(args, "output", None),
            since_seq=getattr(args, "since_seq", 0),
        )
    from bot.console import Console
    from bot.container import build_container

    if args.command == "demo":
        from bot.demo import run_demo

        return await run_demo(settings, interactive=sys.stdin.isatty())
    if args.command == "serve":
        from bot.serve import serve

        return await serve(settings, redactor, socket_mode=args.socket, port=args.port)
    async with build_container(settings, redactor=redactor) as container:
        if container.deps.backups is not None:  # without `serve`, nothing else fails what a killed backup left
            await container.deps.backups.sweep_quietly()
        console = Console(container, args.user)
        if args.command == "run":
            return await console.run_once(args.text)
        await console.loop()
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
