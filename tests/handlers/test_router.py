"""The router on its own: roles, refusals, unexpected failures and the audit record."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from pydantic import Field

from handlers.context import Deps, OpsContext, Reply
from handlers.registry import CommandArgs, NoArgs, Registry
from handlers.router import Router
from services.access import Risk, RoleResolver
from services.approvals import ApprovalEngine
from services.inventory import parse_inventory
from services.locks import LocalLocks
from services.redaction import Redactor
from services.state import StateStore, open_state_store

ran: list[str] = []
registry = Registry()


class RestartArgs(CommandArgs):
    positional = ("service",)
    service: str = Field(max_length=64)


@registry.subcommand("restart", help="Restart a service", usage="<service>", risk=Risk.OPERATE, args=RestartArgs)
async def restart(ctx: OpsContext, args: RestartArgs) -> Reply:
    ran.append(args.service)
    return Reply(f"restarted {args.service}")


@registry.subcommand("explode", help="Fail unexpectedly", risk=Risk.READ, args=NoArgs)
async def explode(ctx: OpsContext, args: NoArgs) -> Reply:
    raise RuntimeError("connection to postgresql://app:hunter2-pw@db/app failed")


@registry.subcommand("status", help="Look", risk=Risk.READ, args=NoArgs)
async def status(ctx: OpsContext, args: NoArgs) -> Reply:
    return Reply("fine")


INVENTORY = """
roles:
  viewer: [U0VIEWER]
  operator: [U0OPERATOR]
services:
  shop:
    components:
      db: {type: postgres, dsn: "${SHOP_DB}"}
"""


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[StateStore]:
    store = await open_state_store(None, default_path=tmp_path / "state.sqlite3")
    yield store
    await store.close()


@pytest.fixture
def deps(store: StateStore) -> Deps:
    loaded = parse_inventory(INVENTORY, "t", {"SHOP_DB": "postgresql://app:hunter2-pw@db/app"})
    redactor = Redactor(loaded.secrets)
    roles = RoleResolver(loaded.inventory.roles)
    return Deps(
        loaded=loaded,
        store=store,
        probes={},
        redactor=redactor,
        roles=roles,
        approvals=ApprovalEngine(store, LocalLocks(), roles, loaded.inventory.approvals, redactor),
    )


async def run(deps: Deps, user: str, text: str) -> Reply:
    ran.clear()
    return await Router(registry).dispatch(user_id=user, channel_id="C0OPS", text=text, deps=deps, request_id="req1")


async def test_a_viewer_asking_for_an_operator_command_is_refused_and_audited(deps: Deps) -> None:
    reply = await run(deps, "U0VIEWER", "restart shop")
    assert reply.ephemeral and reply.outcome == "denied"
    assert reply.text == "`/ops restart` needs the operator role; you are a viewer."
    assert ran == []
    [event] = await deps.store.audit_events()
    assert (event.actor, event.command, event.outcome, event.channel) == ("U0VIEWER", "restart", "denied", "C0OPS")
    reply = await run(deps, "U0OPERATOR", "restart shop")
    assert reply.outcome == "ok" and ran == ["shop"]
    events = await deps.store.audit_events()
    assert (events[0].command, events[0].outcome, events[0].service) == ("restart", "ok", "shop")


async def test_help_hides_what_the_caller_may_not_run(deps: Deps) -> None:
    reply = await run(deps, "U0VIEWER", "help")
    text = str(reply.blocks)
    assert "/ops status" in text and "/ops restart" not in text
    assert "1 more command(s) need a higher role" in text


async def test_an_unexpected_failure_says_ref_and_logs_without_the_secret(
    deps: Deps, capfd: pytest.CaptureFixture[str]
) -> None:
    from bot.logging import configure_logging

    configure_logging("json", "INFO", deps.redactor)
    reply = await run(deps, "U0VIEWER", "explode")
    assert reply.outcome == "error"
    assert reply.text == "Sorry — `/ops explode` failed (ref req1). The details are in the bot's log."
    err = capfd.readouterr().err
    assert "Traceback" in err and "RuntimeError" in err and "req1" in err
    assert "hunter2-pw" not in err
    [event] = await deps.store.audit_events()
    assert event.outcome == "error" and event.detail == "failed (ref req1)"


async def test_unknown_verb_suggests_only_what_the_caller_may_run(deps: Deps) -> None:
    reply = await run(deps, "U0VIEWER", "restrat shop")
    assert "`/ops restart`" not in reply.text
    reply = await run(deps, "U0OPERATOR", "restrat shop")
    assert "Did you mean `/ops restart`" in reply.text


async def test_a_failing_audit_store_still_answers(deps: Deps, store: StateStore) -> None:
    await store.close()
    reply = await run(deps, "U0VIEWER", "status")
    assert reply.text == "fine" and reply.outcome == "ok"
