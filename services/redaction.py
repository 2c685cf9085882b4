"""Keeps secrets out of everything the bot says or writes: Slack, logs, audit events, errors."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

# user:password@ in any URL-like string, whether or not we know the password.
_URL_CREDENTIALS = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^:/@\s]*):(?P<pw>[^@/\s]+)@")
_TOKENS = re.compile(r"\b(xox[abposr]-[A-Za-z0-9-]{8,}|xapp-[A-Za-z0-9-]{8,})")
# NAME=value where the name ends like a secret's (OPENAI_API_KEY=sk-…, DB_PASSWORD=…): a value typed by
# mistake, e.g. in `/ops config set`, is masked before the command text is logged or audited.
_SECRET_ASSIGNMENT = re.compile(
    r"(?i)\b(?P<name>[A-Z0-9_]+KEY|[A-Z0-9_]*(?:SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIALS?))=(?P<value>\S+)"
)
MASK = "***"


class Redactor:
    """Replaces known secret values, URL passwords and Slack tokens with ``***``."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._secrets: list[str] = []
        self.add(secrets)

    def add(self, secrets: Iterable[str]) -> None:
        # Very short values would mask innocent text; they are still caught inside URLs by the pattern.
        merged = set(self._secrets) | {s for s in secrets if s and len(s) >= 4}
        self._secrets = sorted(merged, key=len, reverse=True)

    def redact(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, MASK)
        text = _URL_CREDENTIALS.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@", text)
        text = _SECRET_ASSIGNMENT.sub(lambda m: f"{m['name']}={MASK}", text)
        return _TOKENS.sub(MASK, text)

    def redact_value(self, value: Any) -> Any:
        """Redact strings anywhere inside dicts, lists and tuples."""
        if isinstance(value, str):
            return self.redact(value)
        if isinstance(value, dict):
            return {k: self.redact_value(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return type(value)(self.redact_value(v) for v in value)
        return value
