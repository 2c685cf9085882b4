"""SQL text the bot builds itself: identifiers from the inventory, always quoted."""

from __future__ import annotations

__all__ = ["quote_ident", "relation"]


def quote_ident(identifier: str) -> str:
    """``name`` as a quoted PostgreSQL identifier (a ``"`` inside is doubled)."""
    return '"' + identifier.replace('"', '""') + '"'


def relation(table: str) -> str:
    """``schema.table`` (or ``table``) as quoted SQL; the inventory allows only plain identifiers."""
    return ".".join(quote_ident(part) for part in table.split("."))
