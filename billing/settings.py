"""One Settings object, read once from ``BILLING_*`` environment variables.

The names are the contract in SPEC.md. A missing or invalid value fails at start with one line
naming the variable (:class:`ConfigError`), which the CLI prints without a traceback.

``BILLING_DATABASE_URL`` and ``BILLING_BROKER_URL`` may be left unset: the processes then share an
embedded PostgreSQL and Redis under ``BILLING_DATA_DIR`` (see :mod:`billing.embedded`).
"""

from __future__ import annotations

import functools
import ipaddress
import re
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
    # Tags every Stripe object this installation creates (``metadata.installation``), so installations
    # sharing one Stripe account never act on each other's objects. Unset: the id generated once and
    # stored in the database (billing.installation).
    installation_id: str | None = None
    # Comma-separated addresses or CIDR blocks of the reverse proxies in front of ``billing web``: only
    # from these is ``X-Forwarded-For`` believed (billing.web.client). Empty: none, the peer is the client.
    trusted_proxies: str = ""

    # /metrics: with a token, `Authorization: Bearer <token>` from anywhere; without, loopback scrapers only.
    metrics_token: str | None = None
    # /docs (Swagger UI from the swagger-ui-py package's files, never a CDN); off unless asked for.
    api_docs: bool = False

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

    @field_validator("trusted_proxies")
    @classmethod
    def _trusted_proxies(cls, v: str) -> str:
        entries = [e.strip() for e in v.split(",") if e.strip()]
        for entry in entries:
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                raise ValueError(f"{entry!r} is not an IP address or CIDR block") from None
        return ",".join(entries)

    @field_validator("stripe_api_key")
    @classmethod
    def _api_key(cls, v: str | None) -> str | None:
        if v and not v.startswith(("sk_", "rk_")):
            raise ValueError("must be a Stripe secret key (sk_… or rk_…)")
        return v or None

    @field_validator("metrics_token")
    @classmethod
    def _metrics_token(cls, v: str | None) -> str | None:
        if v and (len(v) < 16 or not v.isascii() or not v.isprintable() or " " in v):
            raise ValueError("must be at least 16 printable ASCII characters without spaces")
        return v or None

    @field_validator("installation_id")
    @classmethod
    def _installation_id(cls, v: str | None) -> str | None:
        # Short and plain: it is compared as is in Stripe metadata and shows in logs and dashboards.
        if v and not re.fullmatch(r"[A-Za-z0-9_-]{1,40}", v):
            raise ValueError("must be 1 to 40 characters among A-Z a-z 0-9 _ -")
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
