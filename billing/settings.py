"""One Settings object, read once from ``BILLING_*`` environment variables.

The names are the contract in SPEC.md. A missing or invalid value fails at start with one line
naming the variable (:class:`ConfigError`), which the CLI prints without a traceback.

``BILLING_DATABASE_URL`` and ``BILLING_BROKER_URL`` may be left unset: the processes then share an
embedded PostgreSQL and Redis under ``BILLING_DATA_DIR`` (see :mod:`billing.embedded`).
"""

from __future__ import annotations

import functools
from pathlib import Path
from urllib.parse import urlsplit

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "BILLING_"


class ConfigError(Exception):
    """A setting is missing or invalid; the message is one line naming the variable."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    database_url: str | None = None
    broker_url: str | None = None
    data_dir: Path = Path(".billing")

    stripe_api_key: str | None = None
    stripe_api_base: str = "https://api.stripe.com"
    stripe_publishable_key: str | None = None
    stripe_js_url: str = "https://js.stripe.com/v3/"
    stripe_webhook_secret: str | None = None
    # Stripe's documented defaults: 100 req/s per account in live mode, 25/s per endpoint.
    stripe_rate_limit_global: float = Field(default=100.0, gt=0)
    stripe_rate_limit_endpoint: float = Field(default=25.0, gt=0)
    stripe_timeout_seconds: float = Field(default=30.0, gt=0)

    public_url: str = "http://localhost:8000"
    secret_key: str | None = None
    smtp_url: str = "smtp://localhost:1025"
    mail_from: str = "billing@example.com"
    merchant_name: str = "Example Merchant"

    billing_run_interval_seconds: float = Field(default=60.0, gt=0)
    # What happens to a subscription when its last dunning step is exhausted: unpaid or canceled.
    final_subscription_status: str = "unpaid"

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, v: str | None) -> str | None:
        if v and urlsplit(v).scheme.split("+")[0] not in ("postgresql", "postgres"):
            raise ValueError("must be a postgresql:// URL")
        if v and v.startswith("postgres://"):
            v = "postgresql://" + v[len("postgres://"):]
        return v or None

    @field_validator("broker_url")
    @classmethod
    def _broker_url(cls, v: str | None) -> str | None:
        if v and urlsplit(v).scheme not in ("redis", "rediss"):
            raise ValueError("must be a redis:// URL")
        return v or None

    @field_validator("stripe_api_base", "public_url", "stripe_js_url")
    @classmethod
    def _http_url(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError("must be an http(s):// URL")
        return v.rstrip("/") if not v.endswith("/v3/") else v

    @field_validator("smtp_url")
    @classmethod
    def _smtp_url(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme not in ("smtp", "smtps") or not parts.hostname:
            raise ValueError("must look like smtp://host:port")
        return v

    @field_validator("stripe_api_key")
    @classmethod
    def _api_key(cls, v: str | None) -> str | None:
        if v and not v.startswith(("sk_", "rk_")):
            raise ValueError("must be a Stripe secret key (sk_… or rk_…)")
        return v or None

    @field_validator("final_subscription_status")
    @classmethod
    def _final_status(cls, v: str) -> str:
        if v not in ("unpaid", "canceled"):
            raise ValueError("must be unpaid or canceled")
        return v

    def require(self, *names: str) -> Settings:
        """Fail with one clear line if any of ``names`` is unset (used per command)."""
        for name in names:
            if not getattr(self, name):
                raise ConfigError(f"{ENV_PREFIX}{name.upper()} is required but not set")
        return self


def load() -> Settings:
    """Read the environment, turning pydantic's report into one line naming the variable."""
    try:
        return Settings()
    except ValidationError as exc:
        err = exc.errors()[0]
        name = ENV_PREFIX + str(err["loc"][0]).upper() if err.get("loc") else "BILLING_*"
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        raise ConfigError(f"{name} is invalid: {msg}") from None


@functools.cache
def get_settings() -> Settings:
    return load()
