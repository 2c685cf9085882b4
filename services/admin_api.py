"""Reads of an app's admin HTTP API with a JWT the bot obtains itself (runbook 000: `/api/admin/prompts`).

The bot logs in with the declared admin credentials, keeps the token until shortly before its `exp`
(read from the JWT's payload, never verified: the app verifies it), sends it as `Authorization: Bearer`
and logs in again once when the app answers 401. The token and the credentials never leave this module:
not in messages, logs, the audit or exceptions.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import time
import weakref
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import structlog
from pydantic import SecretStr

from services.clients import BODY_LIMIT
from services.errors import CommandError
from services.inventory import AdminApi, AdminEndpoint, HttpComponent, Inventory

log = structlog.get_logger(__name__)

LIMIT_DEFAULT = 20
LIMIT_MAX = 100
REFRESH_EARLY = 60.0  # seconds before `exp` at which a cached token is no longer used
MAX_CACHED = 256  # components whose token is kept; the oldest is dropped beyond
_TOKEN_FIELDS = ("access_token", "token")
_LIST_FIELDS = ("items", "data", "results")


@dataclass(frozen=True)
class AdminApiTarget:
    """The component whose admin API declares the endpoint asked for."""

    service: str
    component: str
    spec: HttpComponent
    api: AdminApi
    endpoint: str
    declared: AdminEndpoint


@dataclass(frozen=True)
class AdminTable:
    """One endpoint's answer as rows of the declared columns (values as the JSON gave them)."""

    service: str
    component: str
    endpoint: str
    path: str
    columns: tuple[str, ...]
    rows: list[tuple[Any, ...]]
    count: int  # items in the answer
    total: int | None  # what the answer says the total is, when it says
    logged_in: bool  # this read needed a fresh login

    @property
    def more(self) -> int:
        """Items not shown: the API's total (or the answer's own length) beyond the rows shown."""
        return max(self.total or 0, self.count) - len(self.rows)


# -- which endpoint ------------------------------------------------------------------------------------


def find_endpoint(inventory: Inventory, service: str, endpoint: str) -> AdminApiTarget:
    """The http component of ``service`` whose `admin_api:` declares ``endpoint``, or one sentence why not."""
    apis = [
        (name, spec, spec.admin_api)
        for name, spec in inventory.services[service].components.items()
        if isinstance(spec, HttpComponent) and spec.admin_api is not None
    ]
    if not apis:
        raise CommandError(f"`{service}` declares no admin API (an `admin_api:` section on its http component).")
    for name, spec, api in apis:
        if endpoint in api.endpoints:
            return AdminApiTarget(service, name, spec, api, endpoint, api.endpoints[endpoint])
    known = sorted({e for _, _, api in apis for e in api.endpoints})
    raise CommandError(
        f"`{service}`'s admin API has no endpoint `{endpoint}`; it has {', '.join(f'`{e}`' for e in known)}."
    )


# -- the token -----------------------------------------------------------------------------------------


def token_expiry(token: str) -> float | None:
    """The `exp` claim (epoch seconds) of a JWT, read without verifying it; None when there is none."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    payload = parts[1] + "=" * (-len(parts[1]) % 4)
    try:
        claims = json.loads(base64.urlsafe_b64decode(payload.encode("ascii")))
    except (ValueError, binascii.Error, UnicodeError):
        return None
    exp = claims.get("exp") if isinstance(claims, dict) else None
    if isinstance(exp, bool) or not isinstance(exp, int | float):
        return None
    return float(exp)


@dataclass(frozen=True)
class _Token:
    value: SecretStr
    expires: float  # epoch seconds


class TokenCache:
    """The admin JWT of each component, kept until ``REFRESH_EARLY`` seconds before its `exp`.

    One entry (and one lock) per component, at most ``MAX_CACHED`` of them: requests never grow it.
    A token without a readable `exp` is used for its one request and not kept."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.logins = 0
        self._tokens: OrderedDict[tuple[str, ...], _Token] = OrderedDict()
        self._locks: OrderedDict[tuple[str, ...], asyncio.Lock] = OrderedDict()

    def __len__(self) -> int:
        return len(self._tokens)

    def lock(self, key: tuple[str, ...]) -> asyncio.Lock:
        """Held while a component's token is fetched, so requests at once share one login."""
        found = self._locks.get(key)
        if found is None:
            found = self._locks[key] = asyncio.Lock()
            while len(self._locks) > MAX_CACHED:
                self._locks.popitem(last=False)
        return found

    def get(self, key: tuple[str, ...]) -> SecretStr | None:
        token = self._tokens.get(key)
        if token is None:
            return None
        if self.clock() >= token.expires - REFRESH_EARLY:
            del self._tokens[key]
            return None
        return token.value

    def put(self, key: tuple[str, ...], value: SecretStr) -> None:
        expires = token_expiry(value.get_secret_value())
        if expires is None or self.clock() >= expires - REFRESH_EARLY:
            self._tokens.pop(key, None)
            return
        self._tokens[key] = _Token(value, expires)
        self._tokens.move_to_end(key)
        while len(self._tokens) > MAX_CACHED:
            self._tokens.popitem(last=False)

    def drop(self, key: tuple[str, ...], value: SecretStr) -> None:
        """Forget a token the app refused (unless another request already replaced it)."""
        token = self._tokens.get(key)
        if token is not None and token.value.get_secret_value() == value.get_secret_value():
            del self._tokens[key]


# One cache per running bot: keyed by its state store, so it lives exactly as long as the bot does.
_CACHES: weakref.WeakKeyDictionary[object, TokenCache] = weakref.WeakKeyDictionary()


def token_cache_for(owner: object) -> TokenCache:
    """The token cache of the bot that owns ``owner`` (its state store), made on first use."""
    try:
        cache = _CACHES.get(owner)
        if cache is None:
            cache = _CACHES[owner] = TokenCache()
    except TypeError:  # cannot be weakly referenced: a cache for this request only
        return TokenCache()
    return cache


# -- HTTP ----------------------------------------------------------------------------------------------


class _TooBig(Exception):
    pass


async def _read_json(response: aiohttp.ClientResponse) -> tuple[bool, Any]:
    """(is JSON, value) of an answer read in bounded chunks; over BODY_LIMIT raises _TooBig."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > BODY_LIMIT:
            raise _TooBig
        chunks.append(chunk)
    try:
        return True, json.loads(b"".join(chunks))
    except ValueError:
        return False, None


def _dig(value: Any, path: str) -> Any:
    for part in path.split("."):
        if not isinstance(value, Mapping):
            return None
        value = value.get(part)
    return value


@contextlib.asynccontextmanager
async def _session(session: aiohttp.ClientSession | None) -> AsyncIterator[aiohttp.ClientSession]:
    if session is not None:
        yield session
        return
    async with aiohttp.ClientSession() as own:
        yield own


class AdminApiReader:
    """Reads one declared endpoint of one component's admin API."""

    def __init__(self, session: aiohttp.ClientSession, cache: TokenCache, target: AdminApiTarget) -> None:
        self.session = session
        self.cache = cache
        self.target = target
        self.where = f"{target.service}/{target.component}"
        self.base = str(target.spec.url).rstrip("/")
        self.key = (target.service, target.component, self.base)
        self.timeout = aiohttp.ClientTimeout(total=target.spec.timeout)

    def _failed(self, what: str) -> CommandError:
        return CommandError(f"The admin API of `{self.where}` {what}.", outcome="error")

    async def _login(self) -> SecretStr:
        login = self.target.api.login
        credentials = self.target.api.credentials
        user, password = credentials.user, credentials.password.get_secret_value()
        if not user or not password:
            raise CommandError(
                f"The admin user or password of `{self.where}` is not set: give the variables its "
                "`admin_api.credentials` names to the bot's environment.",
                outcome="error",
            )
        body = {login.user_field: user, login.password_field: password}
        self.cache.logins += 1
        log.info("admin_api_login", service=self.target.service, component=self.target.component)
        async with self.session.post(
            self.base + login.path, json=body, timeout=self.timeout, allow_redirects=False
        ) as response:
            if response.status in (400, 401, 403, 422):
                raise CommandError(
                    f"The admin credentials were refused at login by `{self.where}` (HTTP {response.status}).",
                    outcome="error",
                )
            if response.status >= 300:
                raise self._failed(f"login answered HTTP {response.status}{_kind(response.status)}")
            is_json, answer = await _read_json(response)
        if not is_json:
            raise self._failed(f"login answered {_not_json(response)} instead of JSON")
        fields = (login.token_field,) if login.token_field else _TOKEN_FIELDS
        for field in fields:
            token = _dig(answer, field)
            if isinstance(token, str) and token:
                return SecretStr(token)
        names = " or ".join(f"`{f}`" for f in fields)
        raise self._failed(f"login answer has no token in {names} (set `admin_api.login.token_field`)")

    async def _token(self, refused: SecretStr | None = None) -> tuple[SecretStr, bool]:
        """A usable token (a cached one unless ``refused`` is it) and whether a login was needed."""
        async with self.cache.lock(self.key):
            if refused is not None:
                self.cache.drop(self.key, refused)
            cached = self.cache.get(self.key)
            if cached is not None:
                return cached, False
            token = await self._login()
            self.cache.put(self.key, token)
            return token, True

    async def _get(self, token: SecretStr) -> tuple[int, Any]:
        path = self.target.declared.path
        headers = {"Authorization": f"Bearer {token.get_secret_value()}", "Accept": "application/json"}
        async with self.session.get(
            self.base + path, headers=headers, timeout=self.timeout, allow_redirects=False
        ) as response:
            if response.status in (401, 403):
                return response.status, None
            if response.status >= 300:
                raise self._failed(f"answered HTTP {response.status} to `GET {path}`{_kind(response.status)}")
            is_json, answer = await _read_json(response)
            if not is_json:
                raise self._failed(f"answered {_not_json(response)} instead of JSON to `GET {path}`")
            return response.status, answer

    async def read(self, limit: int) -> AdminTable:
        """The endpoint's items (at most ``limit`` as rows), logging in again once on a 401."""
        path = self.target.declared.path
        try:
            token, logged_in = await self._token()
            status, answer = await self._get(token)
            if status == 401:
                token, _ = await self._token(refused=token)
                logged_in = True
                status, answer = await self._get(token)
        except _TooBig:
            raise self._failed(
                f"sent more than {BODY_LIMIT // 1024 // 1024} MiB; the bot reads no more (does the endpoint page?)"
            ) from None
        except TimeoutError:
            raise self._failed(f"did not answer within {self.target.spec.timeout:g} s") from None
        except aiohttp.ClientError as exc:
            raise self._failed(f"could not be reached ({type(exc).__name__})") from None
        if status in (401, 403):
            reason = "even after a fresh login" if status == 401 else "the admin user may not read it"
            raise CommandError(
                f"The admin credentials were refused by `{self.where}` for `GET {path}` (HTTP {status}, {reason}).",
                outcome="error",
            )
        return self._table(answer, limit, logged_in)

    def _table(self, answer: Any, limit: int, logged_in: bool) -> AdminTable:
        declared = self.target.declared
        items = _items(answer, declared.list_field, self.target.endpoint)
        if items is None:
            where = f"`{declared.list_field}`" if declared.list_field else "the answer"
            raise self._failed(f"answered without a list in {where} (set `list_field` to where the list is)")
        total = _dig(answer, declared.total_field or "total") if isinstance(answer, Mapping) else None
        total = total if isinstance(total, int) and not isinstance(total, bool) and total >= 0 else None
        rows = [
            tuple(_dig(item, column) if isinstance(item, Mapping) else None for column in declared.columns)
            for item in items[:limit]
        ]
        log.info(
            "admin_api_read",
            service=self.target.service,
            component=self.target.component,
            endpoint=self.target.endpoint,
            items=len(items),
            logged_in=logged_in,
        )
        return AdminTable(
            service=self.target.service,
            component=self.target.component,
            endpoint=self.target.endpoint,
            path=declared.path,
            columns=tuple(declared.columns),
            rows=rows,
            count=len(items),
            total=total,
            logged_in=logged_in,
        )


def _items(answer: Any, list_field: str | None, endpoint: str) -> list[Any] | None:
    if list_field:
        found = _dig(answer, list_field)
        return found if isinstance(found, list) else None
    if isinstance(answer, list):
        return answer
    if not isinstance(answer, Mapping):
        return None
    for field in (endpoint, *_LIST_FIELDS):
        if isinstance(answer.get(field), list):
            return list(answer[field])
    lists = [value for value in answer.values() if isinstance(value, list)]
    return lists[0] if len(lists) == 1 else None


def _kind(status: int) -> str:
    return " (a server error in the app)" if status >= 500 else ""


def _not_json(response: aiohttp.ClientResponse) -> str:
    return "HTML" if "html" in (response.content_type or "") else f"`{response.content_type or 'no content type'}`"


async def read_admin_endpoint(
    session: aiohttp.ClientSession | None,
    cache: TokenCache,
    inventory: Inventory,
    service: str,
    endpoint: str,
    *,
    limit: int = LIMIT_DEFAULT,
) -> AdminTable:
    """GET one declared admin endpoint of ``service`` (through the bot's shared session when given)."""
    target = find_endpoint(inventory, service, endpoint)
    async with _session(session) as http:
        return await AdminApiReader(http, cache, target).read(limit)


__all__ = [
    "LIMIT_DEFAULT",
    "LIMIT_MAX",
    "AdminApiReader",
    "AdminApiTarget",
    "AdminTable",
    "TokenCache",
    "find_endpoint",
    "read_admin_endpoint",
    "token_cache_for",
    "token_expiry",
]
