"""Settings shared by both programs, read from the environment and validated at start-up.

Names follow the seed's `.env.example` (DB_HOST, DB_PORT, ...). A bad or missing value is a
`ConfigError` whose message names the variable, so a misconfigured pod says exactly what to
fix instead of failing later with a stack trace. Secrets are `SecretStr`: never printed.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any, ClassVar, TypeVar

from pydantic import Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict


class ConfigError(Exception):
    """A setting is missing or invalid; the message names the environment variable."""


class EnvSettings(BaseSettings):
    """Base for settings read from upper-case environment variables named like the fields."""

    model_config = SettingsConfigDict(
        case_sensitive=True, extra="ignore", frozen=True, populate_by_name=False
    )
    #: Variables that were removed and what to set instead. Unknown variables are ignored
    #: (the environment holds much else), so a removed one that still meant something would
    #: be dropped silently: `load_settings` refuses it, naming its replacement.
    REMOVED: ClassVar[Mapping[str, str]] = {}


S = TypeVar("S", bound=EnvSettings)
#: `scheme://user:pass@host` in a rejected value must not reach a log.
_USERINFO = re.compile(r"//[^/@\s]*@")


def load_settings(cls: type[S], **overrides: Any) -> S:
    """Instantiate settings, turning validation errors into one readable `ConfigError`."""
    removed = [
        f"{name} was removed: {instead}"
        for name, instead in cls.REMOVED.items()
        if name in overrides or name in os.environ
    ]
    if removed:
        raise ConfigError("; ".join(removed))
    try:
        return cls(**overrides)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            name = ".".join(str(part) for part in err["loc"]) or "?"
            if err["type"] == "missing":
                problems.append(f"{name} is required but not set")
            else:
                secret = any(word in name for word in ("PASSWORD", "KEY", "TOKEN", "SECRET"))
                shown = "<hidden>" if secret else _USERINFO.sub("//***@", repr(err["input"]))
                problems.append(f"{name}={shown} is invalid: {err['msg']}")
        raise ConfigError("; ".join(problems)) from None


class DatabaseSettings(EnvSettings):
    """How to reach PostgreSQL (direct or session-mode connection: LISTEN needs one)."""

    DB_HOST: str = Field(min_length=1)
    DB_PORT: int = Field(default=5432, ge=1, le=65535)
    DB_NAME: str = Field(default="postgres", min_length=1)
    DB_USER: str = Field(min_length=1)
    DB_PASSWORD: SecretStr = SecretStr("")
    DB_SSLMODE: str = Field(
        default="prefer", pattern=r"^(disable|allow|prefer|require|verify-ca|verify-full)$"
    )
    DB_CONNECT_TIMEOUT: int = Field(default=10, ge=1, le=300)

    def connect_kwargs(self, application_name: str) -> dict[str, Any]:
        """Keyword arguments for `psycopg2.connect`, with TCP keepalives so a dead server is
        noticed in seconds rather than hours."""
        kwargs: dict[str, Any] = {
            "host": self.DB_HOST,
            "port": self.DB_PORT,
            "dbname": self.DB_NAME,
            "user": self.DB_USER,
            "sslmode": self.DB_SSLMODE,
            "connect_timeout": self.DB_CONNECT_TIMEOUT,
            "application_name": application_name,
            "keepalives": 1,
            "keepalives_idle": 30,
            "keepalives_interval": 10,
            "keepalives_count": 3,
        }
        password = self.DB_PASSWORD.get_secret_value()
        if password:
            kwargs["password"] = password
        return kwargs

    def describe(self) -> str:
        """Where the database is, for messages (never the password)."""
        return f"{self.DB_USER}@{self.DB_HOST}:{self.DB_PORT}/{self.DB_NAME}"
