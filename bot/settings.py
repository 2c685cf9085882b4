"""The environment contract of the running bot, read once in ``main`` by pydantic-settings."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

LogFormat = Literal["json", "console"]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]

SLACK_API_DEFAULT = "https://slack.com/api/"


class Settings(BaseSettings):
    """Everything the bot reads from the environment; names are the documented variable names.

    The Slack secrets are optional here because ``console``, ``demo`` and ``run`` work without
    Slack; ``serve`` asks :meth:`require_slack` and refuses to start when any are missing.
    """

    # No env_file: secrets come from the real environment only, never from a stray .env default.
    # No populate_by_name either: it would also read bare PORT/HOST/CONFIG, which platforms set.
    model_config = SettingsConfigDict(
        case_sensitive=False,
        extra="ignore",
        frozen=True,
    )

    slack_bot_token: SecretStr | None = Field(default=None, validation_alias="SLACK_BOT_TOKEN")
    slack_signing_secret: SecretStr | None = Field(default=None, validation_alias="SLACK_SIGNING_SECRET")
    slack_app_token: SecretStr | None = Field(default=None, validation_alias="SLACK_APP_TOKEN")
    config: Path = Field(default=Path("opsbot.yaml"), validation_alias="OPSBOT_CONFIG")
    state_url: SecretStr | None = Field(default=None, validation_alias="OPSBOT_STATE_URL")
    state_dir: Path = Field(default=Path("./var"), validation_alias="OPSBOT_STATE_DIR")
    redis_url: SecretStr | None = Field(default=None, validation_alias="OPSBOT_REDIS_URL")
    slack_api_url: str = Field(default=SLACK_API_DEFAULT, validation_alias="OPSBOT_SLACK_API_URL")
    port: int = Field(default=3000, ge=0, le=65535, validation_alias="OPSBOT_PORT")
    host: str = Field(default="0.0.0.0", validation_alias="OPSBOT_HOST")  # noqa: S104 - a server in a container
    log_format: LogFormat = Field(default="console", validation_alias="OPSBOT_LOG_FORMAT")
    log_level: LogLevel = Field(default="INFO", validation_alias="OPSBOT_LOG_LEVEL")
    # host:port of a plaintext gRPC Cloud Monitoring API (an emulator, the tests' fake); unset: Google's
    # own endpoint with Application Default Credentials. No credentials are ever sent to it.
    monitoring_endpoint: str | None = Field(default=None, validation_alias="OPSBOT_MONITORING_ENDPOINT")

    @field_validator(
        "slack_bot_token", "slack_signing_secret", "slack_app_token", "state_url", "redis_url", mode="before"
    )
    @classmethod
    def _blank_is_unset(cls, value: Any) -> Any:
        # `SLACK_APP_TOKEN=` in a compose file means "not set", not "the empty token".
        if isinstance(value, str) and not value.strip():
            return None
        if isinstance(value, str):
            return value.strip()
        return value

    @field_validator("slack_api_url")
    @classmethod
    def _api_url_ends_with_slash(cls, value: str) -> str:
        value = value.strip()
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"must be an http(s) URL such as {SLACK_API_DEFAULT}, got {value!r}")
        return value if value.endswith("/") else value + "/"

    @field_validator("monitoring_endpoint")
    @classmethod
    def _host_and_port(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        value = value.strip()
        host, _, port = value.rpartition(":")
        if not host or not port.isdigit() or "/" in value:
            raise ValueError(f"must be host:port of a plaintext gRPC endpoint, like 127.0.0.1:8085, got {value!r}")
        return value

    @field_validator("log_format", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = value.strip().upper()
            return "WARNING" if value == "WARN" else value
        return value

    @property
    def sqlite_path(self) -> Path:
        """Where the SQLite state store lives when ``OPSBOT_STATE_URL`` is unset."""
        # Path() again: model_copy(update=...) skips validation, so state_dir may arrive as a str.
        return Path(self.state_dir) / "state.sqlite3"

    def require_slack(self, socket: bool) -> list[str]:
        """Names of variables ``serve`` lacks: HTTP needs the signing secret, Socket Mode the app token."""
        needed: list[tuple[str, SecretStr | None]] = [("SLACK_BOT_TOKEN", self.slack_bot_token)]
        if socket:
            needed.append(("SLACK_APP_TOKEN", self.slack_app_token))
        else:
            needed.append(("SLACK_SIGNING_SECRET", self.slack_signing_secret))
        return [name for name, value in needed if value is None or not value.get_secret_value()]

    def secret_values(self) -> set[str]:
        """Every secret string the bot holds (tokens, whole URLs and their passwords), for redaction."""
        found: set[str] = set()
        for secret in (self.slack_bot_token, self.slack_signing_secret, self.slack_app_token):
            if secret is not None and secret.get_secret_value():
                found.add(secret.get_secret_value())
        for url in (self.state_url, self.redis_url):
            if url is not None and url.get_secret_value():
                found |= _url_secrets(url.get_secret_value())
        # A self-hosted Slack API proxy could carry credentials too; the URL itself is not secret.
        found |= _url_secrets(self.slack_api_url) - {self.slack_api_url}
        return found


def _url_secrets(url: str) -> set[str]:
    """The URL itself and its password, both as written and percent-decoded."""
    found = {url}
    try:
        password = urlsplit(url).password
    except ValueError:  # an unparsable URL is still masked whole
        return found
    if password:
        found |= {password, unquote(password)}
    return found
