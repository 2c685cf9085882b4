"""What every deploy provider offers, whatever the platform behind it.

A provider is made for one component (a Cloud Run service, a Lambda alias, a Render service, a
compose project) and knows nothing of Slack or approvals: handlers plan with ``releases()`` and
the approval engine's actions call ``rollback()`` / ``restart()`` / ``scale()`` after checking, at
run time, that the live release is still the one the plan saw.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from services.errors import CommandError

Progress = Callable[[str], Awaitable[None]]


class DeployError(CommandError):
    """A platform call failed or a precondition does not hold; one plain sentence, no secrets."""

    def __init__(self, message: str) -> None:
        super().__init__(message, outcome="error")


@dataclass(frozen=True)
class Release:
    """One deployable version: a Cloud Run revision, a Lambda version, a Render deploy.

    ``live``: serving now (Cloud Run: any traffic; Lambda: the alias's version; Render: the live
    deploy). ``ready``: usable as a rollback target (Cloud Run: Ready condition true; Lambda:
    published and Active; Render: a deploy that went live before).
    """

    id: str
    created_at: datetime | None
    description: str  # image, commit message, version description
    live: bool
    ready: bool
    traffic: int | None = None  # percent of traffic (Cloud Run)
    status: str = ""  # the platform's own word for its state


class ReleaseProvider(Protocol):
    """A platform with releases that can be listed, rolled back to, and restarted."""

    kind: str  # "cloudrun" | "lambda" | "render"

    def describe(self) -> str:
        """What this provider controls, e.g. "Cloud Run service shop in asia-northeast3 (proj)"."""
        ...

    async def releases(self, limit: int = 10) -> list[Release]:
        """Recent releases, newest first, the live one(s) marked."""
        ...

    async def rollback(self, target: str, *, expected_live: str, progress: Progress) -> str:
        """Make ``target`` the live release. First re-check the preconditions: ``target`` exists, is
        ready and belongs to this service; the live release is still ``expected_live`` (else
        DeployError "… changed since the plan …"). Wait for the platform to settle (long-running
        operation / deploy status) within the provider's timeout. Return a one-line summary."""
        ...

    async def restart(self, *, progress: Progress) -> str:
        """Cloud Run: a new revision with the same spec; Render: a redeploy of the live commit;
        Lambda: DeployError (nothing to restart). Waits until settled; returns a summary."""
        ...
