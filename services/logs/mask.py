"""Masks secrets written *inside* log lines (tokens, passwords, DSNs, bearer/JWTs, AWS keys) before a
line leaves the bot. The inventory's own secrets and URL passwords are the Redactor's job; every line
goes through both (:func:`scrub`)."""

from __future__ import annotations

import re

from services.redaction import MASK, Redactor

__all__ = ["mask_secrets", "scrub"]

_KEYWORDS = (
    r"pass(?:word|wd|phrase)?|pwd|secret|token|api[_-]?key|apikey|access[_-]?key|private[_-]?key|"
    r"credentials?|session[_-]?id|cookie|signature|sig"
)
# key=value, key: value, "key": "value" — the key may carry a prefix or suffix (db_password, X-Api-Key).
_KEY_VALUE = re.compile(
    rf"(?i)(?P<key>[A-Za-z0-9_.-]*(?:{_KEYWORDS})[A-Za-z0-9_.-]*)(?P<sep>[\"']?\s*(?:=|:)\s*[\"']?)"
    r"(?P<value>(?:Bearer\s+|Basic\s+)?[^\s\"'&,;}{)\]]+)"
)
_AUTH_HEADER = re.compile(r"(?i)\b(?P<scheme>bearer|basic|token)\s+(?P<value>[A-Za-z0-9._~+/=-]{8,})")
_JWT = re.compile(r"\beyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*")
_AWS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA)[A-Z0-9]{16}\b")
_PROVIDER_KEYS = re.compile(
    r"\b(?:sk-(?:proj-|ant-)?[A-Za-z0-9_-]{16,}|gh[pousr]_[A-Za-z0-9]{20,}|github_pat_[A-Za-z0-9_]{20,}|"
    r"xox[abposr]-[A-Za-z0-9-]{8,}|AIza[0-9A-Za-z_-]{30,}|rnd_[A-Za-z0-9]{16,})"
)
_URL_PASSWORD = re.compile(r"(?P<head>[a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s]*:)(?P<pw>[^@/\s]+)@")
_PRIVATE_KEY = re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?(?:-----END [A-Z ]*PRIVATE KEY-----|$)", re.S)
# A cheap test first: most lines carry none of these, and the patterns above are not free.
_MAYBE = re.compile(
    rf"(?i)(?:{_KEYWORDS}|bearer|basic|eyJ|AKIA|ASIA|AGPA|AIDA|AROA|ANPA|sk-|gh[pousr]_|github_pat|xox|AIza|rnd_|"
    r"://|PRIVATE KEY)"
)


def _key_value(match: re.Match[str]) -> str:
    return f"{match['key']}{match['sep']}{MASK}"


def mask_secrets(text: str) -> str:
    """``text`` with every secret-looking value replaced by ``***`` (the key or scheme kept, so the line
    still reads: ``password=***``, ``Bearer ***``, ``postgres://app:***@db``)."""
    if not _MAYBE.search(text):
        return text
    text = _PRIVATE_KEY.sub(MASK, text)
    text = _URL_PASSWORD.sub(lambda m: f"{m['head']}{MASK}@", text)
    text = _JWT.sub(MASK, text)
    text = _AUTH_HEADER.sub(lambda m: f"{m['scheme']} {MASK}", text)
    text = _KEY_VALUE.sub(_key_value, text)
    text = _AWS_KEY_ID.sub(MASK, text)
    return _PROVIDER_KEYS.sub(MASK, text)


def scrub(redactor: Redactor, text: str) -> str:
    """One log line made safe to show: the inventory's secrets (the redactor) and secrets written in the
    line (:func:`mask_secrets`)."""
    return mask_secrets(redactor.redact(text))
