"""Settings from the environment, the redacting log pipeline, metrics, and the fake Slack used by app tests."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs

import prometheus_client
import pytest
import structlog
from pydantic import ValidationError
from slack_sdk.errors import SlackApiError
from slack_sdk.http_retry.builtin_async_handlers import AsyncRateLimitErrorRetryHandler
from slack_sdk.signature import Clock, SignatureVerifier
from slack_sdk.web.async_client import AsyncWebClient
from slack_sdk.webhook.async_client import AsyncWebhookClient

from bot.logging import bind_request, clear_request, configure_logging
from bot.metrics import Metrics
from bot.settings import Settings
from services.health import Status
from services.redaction import Redactor
from tests.fixtures.slack import FakeSlack, block_actions_body, sign, slash_body

ENV_NAMES = (
    "SLACK_BOT_TOKEN",
    "SLACK_SIGNING_SECRET",
    "SLACK_APP_TOKEN",
    "OPSBOT_CONFIG",
    "OPSBOT_STATE_URL",
    "OPSBOT_STATE_DIR",
    "OPSBOT_REDIS_URL",
    "OPSBOT_SLACK_API_URL",
    "OPSBOT_PORT",
    "OPSBOT_HOST",
    "OPSBOT_LOG_FORMAT",
    "OPSBOT_LOG_LEVEL",
)
SIGNING_SECRET = "sig-5ecret-4f9c2e"
DB_PASSWORD = "pg-pa55-8d1e"
DSN = f"postgresql://opsbot:{DB_PASSWORD}@db.internal:5432/opsbot"


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ENV_NAMES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(Path(__file__).parent)  # no stray .env can matter either
    return monkeypatch


# -- settings --------------------------------------------------------------------------------


def test_settings_defaults(clean_env: pytest.MonkeyPatch) -> None:
    s = Settings()
    assert s.slack_bot_token is None
    assert s.slack_signing_secret is None
    assert s.slack_app_token is None
    assert s.config == Path("opsbot.yaml")
    assert s.state_url is None
    assert s.state_dir == Path("var")
    assert s.sqlite_path == Path("var/state.sqlite3")
    assert s.redis_url is None
    assert s.slack_api_url == "https://slack.com/api/"
    assert s.port == 3000
    assert s.host == "0.0.0.0"  # noqa: S104 - the default under test
    assert s.log_format == "console"
    assert s.log_level == "INFO"
    assert s.secret_values() == set()
    assert s.model_copy(update={"state_dir": "/srv/x"}).sqlite_path == Path("/srv/x/state.sqlite3")


def test_settings_read_the_documented_env_names(clean_env: pytest.MonkeyPatch) -> None:
    env = {
        "SLACK_BOT_TOKEN": "xoxb-1-2-abc",
        "SLACK_SIGNING_SECRET": SIGNING_SECRET,
        "SLACK_APP_TOKEN": "xapp-1-A-2-def",
        "OPSBOT_CONFIG": "/etc/opsbot/inventory.yaml",
        "OPSBOT_STATE_URL": DSN,
        "OPSBOT_STATE_DIR": "/var/lib/opsbot",
        "OPSBOT_REDIS_URL": "redis://:r3dis-pw@cache:6379/2",
        "OPSBOT_SLACK_API_URL": "http://127.0.0.1:8123/api",
        "OPSBOT_PORT": "8080",
        "OPSBOT_HOST": "127.0.0.1",
        "OPSBOT_LOG_FORMAT": "JSON",
        "OPSBOT_LOG_LEVEL": "debug",
    }
    for name, value in env.items():
        clean_env.setenv(name, value)
    s = Settings()
    assert s.slack_bot_token is not None and s.slack_bot_token.get_secret_value() == "xoxb-1-2-abc"
    assert s.slack_signing_secret is not None and s.slack_signing_secret.get_secret_value() == SIGNING_SECRET
    assert s.slack_app_token is not None and s.slack_app_token.get_secret_value() == "xapp-1-A-2-def"
    assert s.config == Path("/etc/opsbot/inventory.yaml")
    assert s.state_url is not None and s.state_url.get_secret_value() == DSN
    assert s.state_dir == Path("/var/lib/opsbot")
    assert s.redis_url is not None and s.redis_url.get_secret_value() == "redis://:r3dis-pw@cache:6379/2"
    assert s.slack_api_url == "http://127.0.0.1:8123/api/"  # normalised to end with /
    assert s.port == 8080
    assert s.host == "127.0.0.1"
    assert s.log_format == "json"
    assert s.log_level == "DEBUG"
    # Secrets stay out of repr (and so out of tracebacks and logs).
    assert SIGNING_SECRET not in repr(s) and DB_PASSWORD not in repr(s)


def test_settings_field_names_are_not_env_names(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("PORT", "1")
    clean_env.setenv("STATE_URL", "postgresql://x:y@h/d")
    s = Settings()
    assert s.port == 3000 and s.state_url is None


def test_blank_secrets_are_unset(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("SLACK_APP_TOKEN", "")
    clean_env.setenv("OPSBOT_STATE_URL", "  ")
    s = Settings()
    assert s.slack_app_token is None and s.state_url is None


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("OPSBOT_LOG_FORMAT", "xml"),
        ("OPSBOT_LOG_LEVEL", "loud"),
        ("OPSBOT_PORT", "http"),
        ("OPSBOT_PORT", "70000"),
        ("OPSBOT_SLACK_API_URL", "slack.com/api"),
    ],
)
def test_bad_values_fail_naming_the_variable(clean_env: pytest.MonkeyPatch, name: str, value: str) -> None:
    clean_env.setenv(name, value)
    with pytest.raises(ValidationError) as info:
        Settings()
    assert name in str(info.value)


def test_require_slack(clean_env: pytest.MonkeyPatch) -> None:
    s = Settings()
    assert s.require_slack(socket=False) == ["SLACK_BOT_TOKEN", "SLACK_SIGNING_SECRET"]
    assert s.require_slack(socket=True) == ["SLACK_BOT_TOKEN", "SLACK_APP_TOKEN"]
    clean_env.setenv("SLACK_BOT_TOKEN", "xoxb-1")
    clean_env.setenv("SLACK_SIGNING_SECRET", SIGNING_SECRET)
    s = Settings()
    assert s.require_slack(socket=False) == []
    assert s.require_slack(socket=True) == ["SLACK_APP_TOKEN"]
    clean_env.setenv("SLACK_APP_TOKEN", "xapp-1")
    assert Settings().require_slack(socket=True) == []


def test_secret_values_include_urls_and_their_passwords(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("SLACK_BOT_TOKEN", "xoxb-1-2-abc")
    clean_env.setenv("SLACK_SIGNING_SECRET", SIGNING_SECRET)
    clean_env.setenv("OPSBOT_STATE_URL", "postgresql://opsbot:p%40ss%2Fword@db/opsbot")
    clean_env.setenv("OPSBOT_REDIS_URL", "redis://:r3dis-pw@cache:6379/2")
    assert Settings().secret_values() == {
        "xoxb-1-2-abc",
        SIGNING_SECRET,
        "postgresql://opsbot:p%40ss%2Fword@db/opsbot",
        "p%40ss%2Fword",
        "p@ss/word",
        "redis://:r3dis-pw@cache:6379/2",
        "r3dis-pw",
    }


# -- logging ---------------------------------------------------------------------------------


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    levels = {name: lg.level for name, lg in logging.root.manager.loggerDict.items() if isinstance(lg, logging.Logger)}
    yield
    for name, lg in list(logging.root.manager.loggerDict.items()):
        if isinstance(lg, logging.Logger):
            lg.setLevel(levels.get(name, logging.NOTSET))
    for handler in root.handlers:
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    root.setLevel(level)
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()


def _json_lines(err: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in err.splitlines() if line.startswith("{")]


def _redactor() -> Redactor:
    settings = Settings(SLACK_SIGNING_SECRET=SIGNING_SECRET, OPSBOT_STATE_URL=DSN)
    return Redactor(settings.secret_values())


def test_json_lines_carry_the_bound_request(
    restore_logging: None, clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging("json", "INFO", _redactor())
    configure_logging("json", "INFO", _redactor())  # twice: still one line per event
    log = structlog.get_logger("opsbot.test")
    bind_request("req-42", user="U0OPS1", verb="health")
    log.info("probing", service="shop")
    clear_request()
    log.info("idle")
    log.debug("hidden at INFO")

    lines = _json_lines(capsys.readouterr().err)
    assert len(lines) == 2
    first, second = lines
    assert first["event"] == "probing" and first["service"] == "shop" and first["level"] == "info"
    assert (first["request_id"], first["user"], first["verb"]) == ("req-42", "U0OPS1", "health")
    assert first["logger"] == "opsbot.test" and "timestamp" in first
    assert second["event"] == "idle" and "request_id" not in second


def test_secrets_are_masked_in_messages_kwargs_and_tracebacks(
    restore_logging: None, clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging("json", "INFO", _redactor())
    log = structlog.get_logger("opsbot.test")
    log.info(f"connecting with {SIGNING_SECRET} and password {DB_PASSWORD}")
    log.info(
        "connecting", dsn=DSN, secret=SIGNING_SECRET, nested={"pw": [DB_PASSWORD], "p": (Path(DSN),)}, obj=Path(DSN)
    )
    try:
        raise ConnectionError(f"could not connect to {DSN} (password {DB_PASSWORD}, key {SIGNING_SECRET})")
    except ConnectionError:
        log.exception("state store unreachable")

    err = capsys.readouterr().err
    assert SIGNING_SECRET not in err
    assert DB_PASSWORD not in err
    message, kwargs, failure = _json_lines(err)
    assert message["event"] == "connecting with *** and password ***"
    assert kwargs["secret"] == "***" and kwargs["nested"]["pw"] == ["***"]
    assert kwargs["dsn"] == "***"
    assert "***" in str(kwargs["obj"])
    assert "Traceback (most recent call last)" in str(failure["exception"])
    assert "ConnectionError: could not connect to *** (password ***, key ***)" in str(failure["exception"])


def test_stdlib_loggers_go_through_the_same_pipeline(
    restore_logging: None, clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging("json", "INFO", _redactor())
    bind_request("req-7", user="U0OPS2", verb="backup")
    logging.getLogger("slack_bolt.App").warning("token %s rejected", SIGNING_SECRET, extra={"component": "db"})
    try:
        raise ValueError(f"bad dsn {DSN}")
    except ValueError:
        logging.getLogger("aiohttp.server").exception("Error handling request")
    clear_request()

    err = capsys.readouterr().err
    assert SIGNING_SECRET not in err and DB_PASSWORD not in err
    warning, error = _json_lines(err)
    assert warning["event"] == "token *** rejected"
    assert warning["logger"] == "slack_bolt.App" and warning["level"] == "warning"
    assert warning["request_id"] == "req-7" and warning["verb"] == "backup"
    assert warning["component"] == "db" and "message" not in warning  # extras yes, formatter leftovers no
    assert error["level"] == "error" and "ValueError: bad dsn ***" in str(error["exception"])


def test_console_format_is_plain_and_redacted(
    restore_logging: None, clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging("console", "debug", _redactor())
    bind_request("req-9", user="U0OPS3")
    structlog.get_logger("opsbot.test").debug("hello", secret=SIGNING_SECRET)
    logging.getLogger("aiosqlite").debug("executing SELECT 1")  # chatty libraries stay at INFO
    try:
        raise RuntimeError(DB_PASSWORD)
    except RuntimeError:
        logging.getLogger("asyncio").exception("task failed")
    err = capsys.readouterr().err
    assert "\x1b[" not in err  # no colours when stderr is not a terminal
    assert "hello" in err and "request_id=req-9" in err and "secret=***" in err
    assert "RuntimeError: ***" in err
    assert "SELECT 1" not in err
    assert SIGNING_SECRET not in err and DB_PASSWORD not in err


def test_configure_logging_rejects_unknown_format_and_level(restore_logging: None) -> None:
    with pytest.raises(ValueError, match="format"):
        configure_logging("xml", "INFO", Redactor())
    with pytest.raises(ValueError, match="level"):
        configure_logging("json", "LOUD", Redactor())


# -- metrics ---------------------------------------------------------------------------------


def test_metrics_render_on_a_private_registry() -> None:
    before = set(prometheus_client.REGISTRY._names_to_collectors)
    metrics, other = Metrics(), Metrics()  # a second instance must not collide
    metrics.observe_command("health", "ok", 0.2)
    metrics.observe_probe("http", 0.05, Status.WARNING)
    metrics.count_slack_request("command")
    other.observe_command("backup", "error", 1.0)

    body, content_type = metrics.render()
    text = body.decode()
    assert content_type.startswith("text/plain")
    assert 'opsbot_commands_total{outcome="ok",verb="health"} 1.0' in text
    assert 'opsbot_command_seconds_count{verb="health"} 1.0' in text
    assert 'opsbot_probe_seconds_count{component_type="http",status="warning"} 1.0' in text
    assert 'opsbot_slack_requests_total{kind="command"} 1.0' in text
    assert "process_cpu_seconds_total" in text or "python_info" in text
    assert "backup" not in text
    assert set(prometheus_client.REGISTRY._names_to_collectors) == before


# -- signing and the fake Slack --------------------------------------------------------------

SLACK_EXAMPLE_BODY = (
    "token=xyzz0WbapA4vBCDEFasx0q6G&team_id=T1DC2JH3J&team_domain=testteamnow&channel_id=G8PSS9T3V"
    "&channel_name=foobar&user_id=U2CERLKJA&user_name=roadrunner&command=%2Fwebhook-collect&text="
    "&response_url=https%3A%2F%2Fhooks.slack.com%2Fcommands%2FT1DC2JH3J%2F397700885554%2F96rGlfmibIGlgcZRskXaIFfN"
    "&trigger_id=398738663015.47445629121.803a0bc887a14d10d2c447fce8b6703c"
)


class _FixedClock(Clock):
    def __init__(self, now: float) -> None:
        self._now = now

    def now(self) -> float:
        return self._now


def test_sign_reproduces_slacks_documented_example() -> None:
    secret, ts = "8f742231b10e8888abcd99yyyzzz85a5", 1531420618
    headers = sign(secret, SLACK_EXAMPLE_BODY, ts)
    assert headers == {
        "X-Slack-Request-Timestamp": "1531420618",
        "X-Slack-Signature": "v0=a2114d57b48eac39b9ad189dd8316235a7b4a8d21a10bd27519666489c69b503",
    }
    verifier = SignatureVerifier(secret, clock=_FixedClock(ts + 10))
    assert verifier.is_valid_request(SLACK_EXAMPLE_BODY, headers)
    assert not verifier.is_valid_request(SLACK_EXAMPLE_BODY + "x", headers)
    stale = SignatureVerifier(secret, clock=_FixedClock(ts + 301))
    assert not stale.is_valid_request(SLACK_EXAMPLE_BODY, headers)


def test_payload_builders() -> None:
    body = slash_body("health all", user_id="U1", channel_id="C1", response_url="http://127.0.0.1:1/response_url/x")
    fields = {k: v[0] for k, v in parse_qs(body, keep_blank_values=True).items()}
    assert fields["command"] == "/ops" and fields["text"] == "health all"
    assert fields["user_id"] == "U1" and fields["channel_id"] == "C1"
    assert fields["response_url"] == "http://127.0.0.1:1/response_url/x"
    assert {"token", "team_id", "trigger_id"} <= fields.keys()
    assert SignatureVerifier("s3cret!").is_valid_request(body, sign("s3cret!", body))

    body = block_actions_body("approve", "apr_123", user_id="U2", message_ts="1.000002")
    assert body.startswith("payload=")
    payload = json.loads(parse_qs(body)["payload"][0])
    assert payload["type"] == "block_actions"
    assert payload["user"]["id"] == "U2"
    assert payload["actions"][0]["action_id"] == "approve" and payload["actions"][0]["value"] == "apr_123"
    assert payload["container"]["message_ts"] == "1.000002"


async def test_fake_slack_answers_and_records(fake_slack: FakeSlack) -> None:
    client = AsyncWebClient(token="xoxb-fake-token", base_url=fake_slack.base_url)
    auth = await client.auth_test()
    assert (auth["user_id"], auth["bot_id"], auth["team_id"]) == ("U0BOT", "B0BOT", "T0TEST")

    first = await client.chat_postMessage(channel="C9", text="one", blocks=[{"type": "divider"}])
    second = await client.chat_postMessage(channel="C9", text="two")
    assert first["channel"] == "C9" and float(second["ts"]) > float(first["ts"])
    assert first["message"]["blocks"] == [{"type": "divider"}]
    updated = await client.chat_update(channel="C9", ts=first["ts"], text="edited")
    assert updated["ts"] == first["ts"]
    assert (await client.chat_postEphemeral(channel="C9", user="U1", text="psst"))["message_ts"]

    fake_slack.set_usergroup("S0APPROVERS", ["U1", "U2"])
    assert (await client.usergroups_users_list(usergroup="S0APPROVERS"))["users"] == ["U1", "U2"]
    assert (await client.usergroups_users_list(usergroup="S0OTHER"))["users"] == []

    posts = await fake_slack.wait_for("chat.postMessage", count=2)
    assert [c.params["text"] for c in posts] == ["one", "two"]
    assert posts[0].token == "xoxb-fake-token"
    assert fake_slack.calls_to("chat.update")[0].params["text"] == "edited"
    assert [c.method for c in fake_slack.calls][:2] == ["auth.test", "chat.postMessage"]


async def test_fake_slack_knobs(fake_slack: FakeSlack) -> None:
    client = AsyncWebClient(token="xoxb-fake-token", base_url=fake_slack.base_url)
    fake_slack.fail("chat.postMessage", "not_in_channel", times=1)
    with pytest.raises(SlackApiError) as info:
        await client.chat_postMessage(channel="C1", text="x")
    assert info.value.response["error"] == "not_in_channel"
    assert (await client.chat_postMessage(channel="C1", text="x"))["ok"]

    fake_slack.rate_limit_once("chat.postMessage")
    retrying = AsyncWebClient(
        token="xoxb-fake-token",
        base_url=fake_slack.base_url,
        retry_handlers=[AsyncRateLimitErrorRetryHandler(max_retry_count=1)],
    )
    assert (await retrying.chat_postMessage(channel="C1", text="after 429"))["ok"]
    statuses = [c.status for c in fake_slack.calls_to("chat.postMessage")]
    assert statuses == [200, 200, 429, 200]

    with pytest.raises(AssertionError, match=r"chat\.delete"):
        await fake_slack.wait_for("chat.delete", timeout=0.05)
    fake_slack.reset()
    assert fake_slack.calls == []


async def test_fake_slack_response_url_and_upload(fake_slack: FakeSlack) -> None:
    webhook = AsyncWebhookClient(fake_slack.response_url("r1"))
    response = await webhook.send(text="done", response_type="in_channel", replace_original=False)
    assert response.status_code == 200
    (call,) = await fake_slack.wait_for("response_url/r1")
    assert call.params["text"] == "done" and call.params["response_type"] == "in_channel"

    client = AsyncWebClient(token="xoxb-fake-token", base_url=fake_slack.base_url)
    result = await client.files_upload_v2(channel="C1", content="a,b\n1,2\n", filename="report.csv", title="report")
    assert result["file"]["title"] == "report"
    (upload,) = [c for c in fake_slack.calls if c.method.startswith("upload/")]
    assert upload.raw == b"a,b\n1,2\n"
    body = fake_slack.slash_body("help")
    assert parse_qs(body)["response_url"] == [fake_slack.response_url("default")]
    payload = json.loads(parse_qs(fake_slack.block_actions_body("deny", "apr_1"))["payload"][0])
    assert payload["response_url"] == fake_slack.response_url()


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("config set vcbl OPENAI_API_KEY=sk-live-1234 app", "config set vcbl OPENAI_API_KEY=*** app"),
        ("db_password=hunter2 and TOKEN=abc", "db_password=*** and TOKEN=***"),
        ("AWS_SECRET_ACCESS_KEY=wJalr/K7MDENG", "AWS_SECRET_ACCESS_KEY=***"),
        # Names that only contain a secret's word, and the usage text itself, are left as they are.
        ("DAILY_TOKEN_LIMIT=50000", "DAILY_TOKEN_LIMIT=50000"),
        ("Write the setting as `KEY=VALUE`.", "Write the setting as `KEY=VALUE`."),
    ],
)
def test_a_secret_looking_assignment_is_masked_wherever_it_is_written(text: str, shown: str) -> None:
    assert Redactor().redact(text) == shown
