"""The menus opsbot posts stay within Block Kit's limits at the longest names the inventory allows.

Slack refuses an option value over 150 characters; a rollback menu used to carry
``"<service> <release> <component>"`` in each option (up to 191 characters with 63-character names)
and an alert's Silence menu ``"<service>/<component>/<Alert> <duration>"``: Slack would have refused
the whole message. The names now ride in the block_id (255), the options carry only the choice.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from handlers.alerts import SILENCE_PICK, fired_blocks, silence_pick
from handlers.deploy import ROLLBACK_PICK, _choices, pick_command
from services.alerts.rules import DownRule, Transition, TransitionKind
from services.alerts.watch import Fired
from services.deploy.base import Release
from services.errors import CommandError
from tests.fixtures.slack_checks import MESSAGE_BLOCKS, check_blocks

SERVICE = "s" * 63
COMPONENT = "c" * 63
REVISION = f"{'r' * 47}-00042-abc"  # a Cloud Run revision name at its longest (63)


def chosen(block: dict[str, Any], index: int) -> dict[str, Any]:
    """The action Slack sends when option ``index`` of the block's first menu is chosen."""
    menu = block["elements"][0]
    return {
        "action_id": menu["action_id"],
        "block_id": block["block_id"],
        "type": "static_select",
        "selected_option": menu["options"][index],
    }


async def test_the_rollback_menu_fits_with_the_longest_names_and_its_choice_is_the_release() -> None:
    releases = [
        Release(f"{REVISION[:-1]}{i}", datetime(2026, 1, i + 1, tzinfo=UTC), "x" * 200, False, True) for i in range(5)
    ]
    block = _choices(SERVICE, COMPONENT, releases)
    assert check_blocks([block], MESSAGE_BLOCKS) is None
    assert block["elements"][0]["action_id"] == ROLLBACK_PICK
    command = await pick_command(None, chosen(block, 2))  # type: ignore[arg-type]
    assert command == f"rollback {SERVICE} {REVISION[:-1]}2 {COMPONENT}"


async def test_the_silence_menu_fits_with_the_longest_key_and_its_choice_is_the_duration() -> None:
    rule = DownRule(kind="down", name="A" * 64)
    key = rule.key(SERVICE, COMPONENT)
    now = datetime(2026, 1, 1, tzinfo=UTC)
    transition = Transition(TransitionKind.FIRED, key, now, "not answering: " + "x" * 5000, now)
    blocks = fired_blocks(Fired(key, SERVICE, COMPONENT, rule, transition, None))
    assert check_blocks(blocks, MESSAGE_BLOCKS) is None
    assert blocks[-1]["elements"][0]["action_id"] == SILENCE_PICK
    assert await silence_pick(None, chosen(blocks[-1], 1)) == f"silence {key} 4h"  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("block_id", "value"),
    [
        ("rollback:shop:api", "1;reboot"),
        ("rollback:shop", "1"),
        ("rollback:shop:api:extra", "1"),
        ("alert:shop/api/ServiceDown", "1"),
        ("", "1"),
    ],
)
async def test_a_forged_rollback_choice_is_refused(block_id: str, value: str) -> None:
    action = {"block_id": block_id, "selected_option": {"value": value}}
    with pytest.raises(CommandError, match="not a release opsbot offered"):
        await pick_command(None, action)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("block_id", "value"),
    [
        ("alert:shop/api/ServiceDown", "9y"),
        ("alert:shop/api", "1h"),
        ("rollback:shop:api", "1h"),
        ("alert:shop/api/ServiceDown 1h", "1h"),
    ],
)
async def test_a_forged_silence_choice_is_refused(block_id: str, value: str) -> None:
    action = {"block_id": block_id, "selected_option": {"value": value}}
    with pytest.raises(CommandError, match="not a silence opsbot offered"):
        await silence_pick(None, action)  # type: ignore[arg-type]
