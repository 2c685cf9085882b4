"""Admin API reads against a loopback fake of the app: the JWT obtained by the bot and cached until
shortly before its `exp`, one re-login on a 401, every failure one sentence, no secret anywhere."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from pydantic import SecretStr

from bot.logging import configure_logging
from services.admin_api import (
    MAX_CACHED,
    REFRESH_EARLY,
    AdminTable,
    TokenCache,
    read_admin_endpoint,
    token_cache_for,
    token_expiry,
)
from services.errors import CommandError, InventoryError
from services.inventory import LoadedInventory, parse_inventory
from services.redaction import Redactor
from tests.fixtures.admin_app import (
    ADMIN_ENV,
    ADMIN_PASSWORD,
    ADMIN_USER,
    FakeAdminApp,
    admin_api_yaml,
    make_jwt,
    serve_admin_app,
)


@pytest.fixture
async def fake() -> AsyncIterator[FakeAdminApp]:
    async with serve_admin_app() as app:
        yield app


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def load(url: str, env: dict[str, str] | None = None, *, timeout: float = 2) -> LoadedInventory:
    text = f"services:\n  shop:\n    components:{admin_api_yaml(url, timeout=timeout)}"
    return parse_inventory(text, "t", ADMIN_ENV if env is None else env)


async def read(
    http: aiohttp.ClientSession, cache: TokenCache, url: str, endpoint: str = "videos", **kwargs: Any
) -> AdminTable:
    timeout = kwargs.pop("timeout", 2)
    return await read_admin_endpoint(http, cache, load(url, timeout=timeout).inventory, "shop", endpoint, **kwargs)


async def refusal(http: aiohttp.ClientSession, fake: FakeAdminApp, endpoint: str = "videos", **kwargs: Any) -> str:
    with pytest.raises(CommandError) as caught:
        await read(http, TokenCache(), fake.url, endpoint, **kwargs)
    message = caught.value.message
    assert "\n" not in message and message.endswith("."), message
    return message


# -- the token -----------------------------------------------------------------------------------------


async def test_the_token_is_cached_until_its_exp(fake: FakeAdminApp, http: aiohttp.ClientSession) -> None:
    cache = TokenCache()
    first = await read(http, cache, fake.url)
    for _ in range(4):
        again = await read(http, cache, fake.url)
        assert not again.logged_in
    assert first.logged_in
    assert fake.logins == 1 and cache.logins == 1
    assert len(set(fake.gets)) == 1 and fake.gets[0] == f"Bearer {fake.issued[0]}"
    assert first.columns == ("id", "title", "youtube_id")
    assert first.rows[0] == (1, "Lecture 1", "yt00001") and len(first.rows) == 20
    assert (first.count, first.total, first.more) == (30, 135, 115)
    assert len(cache) == 1  # one entry per component, whatever the number of requests


async def test_a_token_is_refreshed_60_s_before_its_exp(fake: FakeAdminApp, http: aiohttp.ClientSession) -> None:
    now = [1_000.0]
    cache = TokenCache(clock=lambda: now[0])
    await read(http, cache, fake.url)
    exp = token_expiry(fake.issued[0])
    assert exp is not None
    now[0] = exp - REFRESH_EARLY - 1
    await read(http, cache, fake.url)
    assert fake.logins == 1
    now[0] = exp - REFRESH_EARLY + 1
    table = await read(http, cache, fake.url)
    assert table.logged_in and fake.logins == 2
    assert fake.gets[-1] == f"Bearer {fake.issued[1]}"


async def test_a_token_without_exp_is_not_kept(fake: FakeAdminApp, http: aiohttp.ClientSession) -> None:
    fake.ttl = None
    cache = TokenCache()
    await read(http, cache, fake.url)
    await read(http, cache, fake.url)
    assert fake.logins == 2 and len(cache) == 0


async def test_an_already_expired_token_is_refused_after_one_relogin(
    fake: FakeAdminApp, http: aiohttp.ClientSession
) -> None:
    fake.ttl = -30  # the app issues tokens already past their exp
    message = await refusal(http, fake)
    assert message == (
        "The admin credentials were refused by `shop/app` for `GET /api/videos` (HTTP 401, even after a fresh login)."
    )
    assert fake.logins == 2


async def test_a_401_logs_in_again_once(fake: FakeAdminApp, http: aiohttp.ClientSession) -> None:
    cache = TokenCache()
    await read(http, cache, fake.url)
    fake.expire_tokens()  # the cached token is no longer accepted
    table = await read(http, cache, fake.url, "prompts")
    assert table.logged_in and fake.logins == 2
    assert [r[1] for r in table.rows] == ["기본 프롬프트", "<!channel> & co"]
    assert table.rows[0][3] is True and table.total is None and table.more == 0
    fake.mode = "401_once"
    await read(http, cache, fake.url)
    assert fake.logins == 3


async def test_401_always_is_refused_without_looping(fake: FakeAdminApp, http: aiohttp.ClientSession) -> None:
    fake.mode = "401_always"
    message = await refusal(http, fake)
    assert "admin credentials were refused" in message and "HTTP 401" in message
    assert fake.logins == 2 and len(fake.gets) == 2


async def test_concurrent_reads_share_one_login(fake: FakeAdminApp, http: aiohttp.ClientSession) -> None:
    cache = TokenCache()
    tables = await asyncio.gather(*(read(http, cache, fake.url) for _ in range(6)))
    assert fake.logins == 1 and all(len(t.rows) == 20 for t in tables)


def test_the_cache_is_bounded() -> None:
    cache = TokenCache(clock=lambda: 0.0)
    token = SecretStr(make_jwt({"exp": 10_000}))
    for i in range(MAX_CACHED + 50):
        cache.put(("svc", f"c{i}"), token)
        cache.lock(("svc", f"c{i}"))
    assert len(cache) == MAX_CACHED
    assert cache.get(("svc", "c0")) is None and cache.get(("svc", f"c{MAX_CACHED + 49}")) is not None


def test_one_cache_per_bot() -> None:
    class Owner:
        pass

    owner = Owner()
    assert token_cache_for(owner) is token_cache_for(owner)
    assert token_cache_for(Owner()) is not token_cache_for(owner)


@pytest.mark.parametrize(
    ("token", "expected"),
    [
        (make_jwt({"exp": 1_900_000_000}), 1_900_000_000.0),
        (make_jwt({"sub": "1"}), None),
        (make_jwt({"exp": True}), None),
        (make_jwt({"exp": "soon"}), None),
        ("not-a-jwt", None),
        ("a.!!!.c", None),
        ("a.bm90IGpzb24.c", None),
    ],
)
def test_token_expiry_reads_exp_without_verifying(token: str, expected: float | None) -> None:
    assert token_expiry(token) == expected


# -- failures, one sentence each --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("403", "The admin credentials were refused by `shop/app` for `GET /api/videos` (HTTP 403, the admin user"),
        ("500", "The admin API of `shop/app` answered HTTP 500 to `GET /api/videos` (a server error in the app)."),
        ("html", "The admin API of `shop/app` answered HTML instead of JSON to `GET /api/videos`."),
        ("big", "The admin API of `shop/app` sent more than 4 MiB; the bot reads no more"),
    ],
)
async def test_a_failed_read_is_one_sentence(
    fake: FakeAdminApp, http: aiohttp.ClientSession, mode: str, expected: str
) -> None:
    fake.mode = mode
    assert (await refusal(http, fake)).startswith(expected)
    assert fake.logins == 1


async def test_a_hung_app_is_given_up_after_the_components_timeout(
    fake: FakeAdminApp, http: aiohttp.ClientSession
) -> None:
    fake.mode = "hang"
    message = await refusal(http, fake, timeout=0.5)
    assert message == "The admin API of `shop/app` did not answer within 0.5 s."


@pytest.mark.parametrize(
    ("login_mode", "expected"),
    [
        ("500", "The admin API of `shop/app` login answered HTTP 500 (a server error in the app)."),
        ("html", "The admin API of `shop/app` login answered HTML instead of JSON."),
        ("no_token", "The admin API of `shop/app` login answer has no token in `access_token` or `token`"),
    ],
)
async def test_a_failed_login_is_one_sentence(
    fake: FakeAdminApp, http: aiohttp.ClientSession, login_mode: str, expected: str
) -> None:
    fake.login_mode = login_mode
    assert (await refusal(http, fake)).startswith(expected)
    assert fake.gets == []


async def test_wrong_credentials_are_refused_at_login(fake: FakeAdminApp, http: aiohttp.ClientSession) -> None:
    env = {**ADMIN_ENV, "APP_ADMIN_PASSWORD": "wrong-password-1"}
    with pytest.raises(CommandError) as caught:
        await read_admin_endpoint(http, TokenCache(), load(fake.url, env).inventory, "shop", "videos")
    assert caught.value.message == "The admin credentials were refused at login by `shop/app` (HTTP 401)."
    assert fake.gets == []


async def test_unset_credentials_are_said_and_nothing_is_sent(fake: FakeAdminApp, http: aiohttp.ClientSession) -> None:
    text = f"services:\n  shop:\n    components:{admin_api_yaml(fake.url, user_var='UNSET_USER:-')}"
    inventory = parse_inventory(text, "t", {"APP_ADMIN_PASSWORD": ADMIN_PASSWORD}).inventory
    with pytest.raises(CommandError) as caught:
        await read_admin_endpoint(http, TokenCache(), inventory, "shop", "videos")
    assert caught.value.message.startswith("The admin user or password of `shop/app` is not set")
    assert fake.logins == 0


async def test_an_unreachable_app(http: aiohttp.ClientSession) -> None:
    with pytest.raises(CommandError) as caught:
        await read(http, TokenCache(), "http://127.0.0.1:9")
    assert caught.value.message.startswith("The admin API of `shop/app` could not be reached")


async def test_an_answer_without_the_list(fake: FakeAdminApp, http: aiohttp.ClientSession) -> None:
    text = admin_api_yaml(fake.url).replace("list_field: videos", "list_field: items")
    inventory = parse_inventory(f"services:\n  shop:\n    components:{text}", "t", ADMIN_ENV).inventory
    with pytest.raises(CommandError) as caught:
        await read_admin_endpoint(http, TokenCache(), inventory, "shop", "videos")
    assert caught.value.message == (
        "The admin API of `shop/app` answered without a list in `items` (set `list_field` to where the list is)."
    )


async def test_unknown_endpoints_and_services_without_an_admin_api(fake: FakeAdminApp) -> None:
    inventory = parse_inventory(
        f"services:\n  shop:\n    components:{admin_api_yaml(fake.url)}\n"
        "  plain:\n    components:\n      web: {type: http, url: 'http://127.0.0.1:1'}\n",
        "t",
        ADMIN_ENV,
    ).inventory
    with pytest.raises(CommandError) as caught:
        await read_admin_endpoint(None, TokenCache(), inventory, "shop", "users")
    assert caught.value.message == "`shop`'s admin API has no endpoint `users`; it has `prompts`, `videos`."
    with pytest.raises(CommandError) as caught:
        await read_admin_endpoint(None, TokenCache(), inventory, "plain", "videos")
    assert caught.value.message == "`plain` declares no admin API (an `admin_api:` section on its http component)."
    assert fake.logins == 0


# -- the inventory ---------------------------------------------------------------------------------------


def test_admin_credentials_are_secrets_known_to_the_redactor(fake: FakeAdminApp) -> None:
    loaded = load(fake.url)
    assert {ADMIN_USER, ADMIN_PASSWORD} <= loaded.secrets
    api = loaded.inventory.services["shop"].components["app"].admin_api  # type: ignore[union-attr]
    assert api is not None and ADMIN_PASSWORD not in repr(api)


def test_bad_admin_api_declarations_are_listed_by_path() -> None:
    text = """
services:
  shop:
    components:
      app:
        type: http
        url: http://127.0.0.1:1
        admin_api:
          login: {path: api/login, user_field: "user name"}
          credentials: {user: u}
          endpoints:
            Bad Name: {path: /x, columns: [id]}
            videos: {path: /api/videos, columns: []}
"""
    with pytest.raises(InventoryError) as caught:
        parse_inventory(text, "t", {})
    problems = "\n".join(caught.value.problems)
    where = "services.shop.components.app.admin_api"
    for expected in (
        f"{where}.login.path:",
        f"{where}.login.user_field:",
        f"{where}.credentials.password:",
        f"{where}.endpoints.Bad Name",
        f"{where}.endpoints.videos.columns:",
    ):
        assert expected in problems, problems


# -- secrets -----------------------------------------------------------------------------------------------


async def test_no_secret_in_logs_or_messages(
    fake: FakeAdminApp, http: aiohttp.ClientSession, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging("json", "DEBUG", Redactor())  # no redactor help: the module itself must not log them
    capsys.readouterr()
    said: list[str] = []
    cache = TokenCache()
    table = await read(http, cache, fake.url)
    said.append(repr(table))
    said.append(repr(cache.__dict__))
    for mode in ("401_always", "403", "500", "html"):
        fake.mode = mode
        with pytest.raises(CommandError) as caught:
            await read(http, cache, fake.url)
        said += [caught.value.message, repr(caught.value)]
    fake.mode, fake.login_mode = "ok", "no_token"
    with pytest.raises(CommandError) as caught:
        await read(http, TokenCache(), fake.url)
    said.append(caught.value.message)
    captured = capsys.readouterr()
    everything = "\n".join(said) + captured.out + captured.err
    assert "admin_api_login" in everything  # the logs were captured
    assert fake.bodies[0] == {"username": ADMIN_USER, "password": ADMIN_PASSWORD}  # they did go to the app
    planted = [ADMIN_USER, ADMIN_PASSWORD, *fake.issued]
    assert len(planted) >= 4
    for secret in planted:
        assert secret not in everything
        assert json.dumps(secret)[1:-1] not in everything
