"""services/users.py against a real PostgreSQL: declared columns only, filters, LIKE escaping, top-N with a
count, and (de)activation of exactly the planned row."""

from __future__ import annotations

import pytest

from services.errors import CommandError, InventoryError
from services.inventory import PostgresComponent, parse_inventory
from services.redaction import Redactor
from services.users import AppUser, UserList, UsersDatabase, like_pattern
from tests.fixtures.servers import PostgresServer, run_sql

HASH = "pbkdf2:sha256:600000$SeCrEtHaSh$abcdef"

SCHEMA = f"""
create table users (
    id serial primary key,
    student_id varchar(20) unique not null,
    name text not null,
    role text not null default 'user',
    is_active boolean not null default true,
    daily_token_usage integer not null default 0,
    total_token_usage integer not null default 0,
    password_hash text not null default '{HASH}'
);
insert into users (student_id, name, role, is_active, daily_token_usage, total_token_usage) values
    ('2024000001', 'Kim Admin', 'admin', true, 10, 900),
    ('2024000002', '100% real', 'user', true, 500, 100),
    ('2024000003', '100 real', 'user', false, 20, 5000),
    ('2024000004', 'a_b', 'user', true, 0, 0),
    ('2024000005', 'axb', 'admin', false, 0, 7),
    ('2024000006', 'back\\slash', 'user', true, 0, 1);
"""


def component(dsn: str, users: str = "{}") -> PostgresComponent:
    loaded = parse_inventory(
        f"services:\n  vcbl:\n    components:\n      db: {{type: postgres, dsn: '{dsn}', users: {users}}}\n",
        "test",
        env={},
    )
    spec = loaded.inventory.services["vcbl"].components["db"]
    assert isinstance(spec, PostgresComponent)
    return spec


@pytest.fixture
async def dsn(postgres_server: PostgresServer) -> str:
    return await postgres_server.database_with(SCHEMA)


@pytest.fixture
def db(dsn: str) -> UsersDatabase:
    return UsersDatabase("vcbl", component(dsn), Redactor())


def names(found: UserList) -> list[str]:
    return [row[2] for row in found.rows]


async def test_lists_declared_columns_in_id_order_with_the_total_and_never_the_hash(db: UsersDatabase) -> None:
    found = await db.list(limit=2)
    assert found.columns == [
        "id", "student_id", "name", "role", "is_active", "daily_token_usage", "total_token_usage",
    ]  # fmt: skip
    assert found.total == 6
    assert found.rows == [
        ["1", "2024000001", "Kim Admin", "admin", "true", "10", "900"],
        ["2", "2024000002", "100% real", "user", "true", "500", "100"],
    ]
    everything = await db.list(limit=100)
    assert all(HASH not in value for row in everything.rows for value in row)
    assert "password_hash" not in everything.columns


async def test_filters_by_role_inactive_and_sorts_by_tokens(db: UsersDatabase) -> None:
    admins = await db.list(role="admin")
    assert names(admins) == ["Kim Admin", "axb"] and admins.total == 2
    inactive = await db.list(inactive=True)
    assert names(inactive) == ["100 real", "axb"] and inactive.total == 2
    both = await db.list(role="admin", inactive=True)
    assert names(both) == ["axb"] and both.total == 1
    by_tokens = await db.list(sort="tokens", limit=2)
    assert names(by_tokens) == ["100 real", "Kim Admin"] and by_tokens.total == 6
    by_daily = await db.list(sort="daily", limit=1)
    assert names(by_daily) == ["100% real"]


async def test_find_takes_like_wildcards_literally(db: UsersDatabase) -> None:
    assert like_pattern("a%b_c\\") == "%a\\%b\\_c\\\\%"
    percent = await db.list(find="%")
    assert names(percent) == ["100% real"] and percent.total == 1
    underscore = await db.list(find="_")
    assert names(underscore) == ["a_b"]
    backslash = await db.list(find="\\")
    assert names(backslash) == ["back\\slash"]
    assert names(await db.list(find="REAL")) == ["100% real", "100 real"]  # case-insensitive
    assert names(await db.list(find="2024000004")) == ["a_b"]  # student ids too
    none = await db.list(find="nobody'; drop table users; --")
    assert none.rows == [] and none.total == 0
    assert (await db.list()).total == 6  # the table is still there


async def test_shown_columns_are_declared_and_a_secret_column_is_refused(dsn: str) -> None:
    narrow = UsersDatabase("vcbl", component(dsn, "{shown: [student_id, role]}"), Redactor())
    found = await narrow.list(limit=1)
    assert found.columns == ["student_id", "role"] and found.rows == [["2024000001", "admin"]]
    with pytest.raises(InventoryError) as refused:
        component(dsn, "{shown: [student_id, password_hash]}")
    assert "'password_hash' looks like a password, hash or secret" in str(refused.value.problems)
    with pytest.raises(InventoryError) as templated:
        component(dsn, "{create_admin_args: [create-admin, '{student_id}', '{password}']}")
    assert "only {student_id} and {name} may be used" in str(templated.value.problems)


async def test_a_missing_column_or_table_is_one_sentence(dsn: str) -> None:
    missing = UsersDatabase("vcbl", component(dsn, "{shown: [student_id, email]}"), Redactor())
    with pytest.raises(CommandError, match=r"has no column `email`; check `users:` in the inventory\.$"):
        await missing.list()
    no_table = UsersDatabase("vcbl", component(dsn, "{table: members}"), Redactor())
    with pytest.raises(CommandError, match=r"^There is no table `members` in the database of `vcbl`\.$"):
        await no_table.list()


async def test_find_by_student_id_and_unknown_ones(db: UsersDatabase, postgres_server: PostgresServer) -> None:
    found = await db.find("2024000002")
    assert found == AppUser("2", "2024000002", "100% real", "user", True)
    assert await db.find("2099999999") is None
    numeric = await postgres_server.database_with(
        "create table users (id bigint primary key, student_id bigint, name text, role text, is_active boolean)",
        "insert into users values (7, 2024000009, 'N', 'user', true)",
    )
    by_number = UsersDatabase("vcbl", component(numeric), Redactor())
    assert (await by_number.find("2024000009")) == AppUser("7", "2024000009", "N", "user", True)
    assert await by_number.find("not-a-number") is None  # not a student id of that type: no such user


async def test_set_active_changes_exactly_the_planned_row(db: UsersDatabase, dsn: str) -> None:
    user = await db.find("2024000002")
    assert user is not None
    done = await db.set_active(user, False)
    assert done.active is False and done.id == "2"
    assert [u.active for u in [await db.by_id(str(i)) for i in range(1, 7)] if u] == [
        True, False, False, True, False, True,
    ]  # fmt: skip


async def test_set_active_refuses_a_row_no_longer_as_planned(db: UsersDatabase, dsn: str) -> None:
    user = await db.find("2024000004")
    assert user is not None and user.active
    await run_sql(dsn, "update users set is_active = false where id = 4")  # someone else got there first
    with pytest.raises(CommandError, match=r"^User id 4 of `vcbl` changed before the update .*nothing was changed\.$"):
        await db.set_active(user, False)
    await run_sql(dsn, "update users set is_active = true, student_id = '2030000000' where id = 4")
    with pytest.raises(CommandError, match="nothing was changed"):
        await db.set_active(user, False)
    assert await db.by_id("4") == AppUser("4", "2030000000", "a_b", "user", True)
