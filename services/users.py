"""The app's users table (runbook 000): list users, and (de)activate exactly one row as planned.

Reads are top-N in SQL (ORDER BY + LIMIT, plus one count), never every row. Identifiers come from the
inventory and are quoted; user text (a student id, a search) is only ever a parameter. Only the declared
columns are selected, and the inventory refuses any named like a password, hash or secret. Nothing here
logs a name or a student id: ids only.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal

import asyncpg  # asyncpg ships no type information
import structlog

from services.errors import CommandError
from services.failures import network_problem
from services.inventory import PostgresComponent, UsersTable, secrets_in
from services.redaction import Redactor
from services.sql import quote_ident, relation

log = structlog.get_logger(__name__)

Sort = Literal["id", "tokens", "daily"]
MAX_LIMIT = 100

_COLUMNS_SQL = """
select a.attname::text, format_type(a.atttypid, a.atttypmod)
from pg_attribute a
where a.attrelid = to_regclass($1) and a.attnum > 0 and not a.attisdropped
"""


def like_pattern(text: str) -> str:
    """``%text%`` for ILIKE … ESCAPE '\\', with the user's own ``\\``, ``%`` and ``_`` taken literally."""
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


@dataclass(frozen=True)
class AppUser:
    """One user as the plan shows it: id, student id, name, role, active."""

    id: str
    student_id: str
    name: str
    role: str
    active: bool

    def facts(self) -> dict[str, str]:
        """What a (de)activation depends on (ids, role and state; no name)."""
        return {f"user {self.id}": f"student id {self.student_id}, role {self.role}, active {str(self.active).lower()}"}


@dataclass(frozen=True)
class UserList:
    """The first ``len(rows)`` users matching the filters, of ``total``."""

    columns: list[str]
    rows: list[list[str]]
    total: int
    sort: Sort


class UsersDatabase:
    """One service's users table, through its PostgreSQL component."""

    def __init__(self, service: str, spec: PostgresComponent, redactor: Redactor, *, timeout: float = 10.0) -> None:
        if spec.users is None:
            raise CommandError(f"`{service}` declares no users table (a postgres component with `users:`).")
        self.service = service
        self.table: UsersTable = spec.users
        self._dsn = spec.dsn.get_secret_value()
        self._redactor = redactor
        redactor.add(secrets_in(self._dsn))
        self._timeout = timeout

    # --- reading -------------------------------------------------------------------------------

    async def list(
        self,
        *,
        role: str | None = None,
        inactive: bool = False,
        find: str | None = None,
        sort: Sort = "id",
        limit: int = 25,
    ) -> UserList:
        """The first ``limit`` users matching the filters (ORDER BY + LIMIT in SQL) and how many match."""
        if not 1 <= limit <= MAX_LIMIT:
            raise CommandError(f"Ask for between 1 and {MAX_LIMIT} users.")
        t = self.table
        async with self._session() as (conn, types):
            shown = t.columns_shown()
            self._need(types, shown)
            where: list[str] = []
            params: list[Any] = []
            if role is not None:
                params.append(role)
                where.append(f"{quote_ident(t.role_column)}::text = ${len(params)}")
            if inactive:
                where.append(f"{quote_ident(t.active_column)} is not true")
            if find is not None:
                params.append(like_pattern(find))
                n = len(params)
                where.append(
                    f"({quote_ident(t.student_id_column)}::text ilike ${n} escape '\\' "
                    f"or {quote_ident(t.name_column)}::text ilike ${n} escape '\\')"
                )
            condition = f" where {' and '.join(where)}" if where else ""
            order = self._order(sort)
            columns = ", ".join(f"{quote_ident(c)}::text" for c in shown)
            params.append(limit)
            rows = await conn.fetch(
                f"select {columns} from {relation(t.table)} as u{condition} order by {order} limit ${len(params)}",  # noqa: S608
                *params,
            )
            counting = f"select count(*) from {relation(t.table)}{condition}"  # noqa: S608 (quoted identifiers)
            total = await conn.fetchval(counting, *params[:-1])
        return UserList(shown, [["" if v is None else str(v) for v in row] for row in rows], int(total), sort)

    def _order(self, sort: Sort) -> str:
        t = self.table
        column = {"id": None, "tokens": t.total_tokens_column, "daily": t.daily_tokens_column}[sort]
        if sort != "id" and column is None:
            raise CommandError(f"`{self.service}` declares no {'total' if sort == 'tokens' else 'daily'} token column.")
        # Qualified: a bare name would sort by the selected ::text column of the same name.
        if column is None:
            return f"u.{quote_ident(t.id_column)}"
        return f"u.{quote_ident(column)} desc nulls last, u.{quote_ident(t.id_column)}"

    async def find(self, student_id: str) -> AppUser | None:
        """The one user with this student id, or None (several: refused in one sentence)."""
        async with self._session() as (conn, types):
            return await self._find(conn, types, student_id)

    async def by_id(self, user_id: str) -> AppUser | None:
        """The user with this id, as it is now."""
        t = self.table
        async with self._session() as (conn, types):
            rows = await conn.fetch(
                f"{self._select()} where {quote_ident(t.id_column)} = $1::text::{types[t.id_column]} limit 1", user_id
            )
        return _user(rows[0]) if rows else None

    # --- changing ------------------------------------------------------------------------------

    async def set_active(self, user: AppUser, active: bool) -> AppUser:
        """Set exactly that row's active flag, only if it is still as planned (same id, student id and
        state); otherwise nothing is changed and the sentence says so."""
        t = self.table
        async with self._session() as (conn, types):
            rows = await conn.fetch(
                f"update {relation(t.table)} set {quote_ident(t.active_column)} = $3 "  # noqa: S608
                f"where {quote_ident(t.id_column)} = $1::text::{types[t.id_column]} "
                f"and {quote_ident(t.active_column)} is not distinct from $2 "
                f"and {quote_ident(t.student_id_column)}::text = $4 "
                f"returning {self._returned()}",
                user.id, user.active, active, user.student_id,
            )  # fmt: skip
        if len(rows) != 1:
            raise CommandError(
                f"User id {user.id} of `{self.service}` changed before the update (its student id or active state "
                "is no longer as planned); nothing was changed."
            )
        log.info("app_user_updated", service=self.service, user_id=user.id, active=active)
        return _user(rows[0])

    # --- helpers -------------------------------------------------------------------------------

    def _returned(self) -> str:
        t = self.table
        return (
            f"{quote_ident(t.id_column)}::text, {quote_ident(t.student_id_column)}::text, "
            f"{quote_ident(t.name_column)}::text, {quote_ident(t.role_column)}::text, "
            f"{quote_ident(t.active_column)} is true"
        )

    def _select(self) -> str:
        return f"select {self._returned()} from {relation(self.table.table)}"  # noqa: S608 (quoted identifiers)

    async def _find(self, conn: Any, types: dict[str, str], student_id: str) -> AppUser | None:
        t = self.table
        try:
            rows = await conn.fetch(
                f"{self._select()} where {quote_ident(t.student_id_column)} = $1::text::{types[t.student_id_column]} "
                "limit 2",
                student_id,
            )
        except asyncpg.DataError:  # not even of the column's type (letters for a numeric student id)
            return None
        if len(rows) > 1:
            raise CommandError(f"Several users of `{self.service}` have that student id; nothing was done.")
        return _user(rows[0]) if rows else None

    def _need(self, types: dict[str, str], columns: Sequence[str]) -> None:
        missing = [c for c in columns if c not in types]
        if missing:
            raise CommandError(
                f"The users table `{self.table.table}` of `{self.service}` has no column "
                f"{', '.join(f'`{c}`' for c in missing)}; check `users:` in the inventory."
            )

    @asynccontextmanager
    async def _session(self) -> AsyncIterator[tuple[Any, dict[str, str]]]:
        """One connection and the table's column types; every failure one plain sentence."""
        where = f"the users table `{self.table.table}` of `{self.service}`"
        try:
            conn: Any = await asyncpg.connect(
                self._dsn,
                timeout=self._timeout,
                command_timeout=self._timeout,
                server_settings={
                    "statement_timeout": str(max(1, int(self._timeout * 1000))),
                    "application_name": "opsbot",
                },
            )
        except Exception as exc:
            problem = network_problem(exc) or type(exc).__name__
            raise CommandError(f"Cannot connect to the database of {where}: {problem}.") from None
        try:
            found = await conn.fetch(_COLUMNS_SQL, self.table.table)
            if not found:
                raise CommandError(f"There is no table `{self.table.table}` in the database of `{self.service}`.")
            types = {str(r[0]): str(r[1]) for r in found}
            t = self.table
            self._need(types, [t.id_column, t.student_id_column, t.name_column, t.role_column, t.active_column])
            yield conn, types
        except CommandError:
            conn.terminate()
            raise
        except (TimeoutError, asyncpg.QueryCanceledError):
            conn.terminate()
            raise CommandError(f"{where[0].upper()}{where[1:]} did not answer within {self._timeout:g} s.") from None
        except asyncpg.DataError:
            conn.terminate()
            raise CommandError(f"That value does not fit the column type of {where}.") from None
        except asyncpg.PostgresError as exc:
            conn.terminate()
            reason = self._redactor.redact(" ".join(str(exc).split())[:200])
            raise CommandError(f"The query on {where} failed: {reason}.") from None
        except BaseException:
            conn.terminate()
            raise
        try:
            await conn.close(timeout=self._timeout)
        except Exception:
            conn.terminate()


def _user(row: Any) -> AppUser:
    return AppUser(
        id=str(row[0]),
        student_id=str(row[1]),
        name="" if row[2] is None else str(row[2]),
        role="" if row[3] is None else str(row[3]),
        active=bool(row[4]),
    )
