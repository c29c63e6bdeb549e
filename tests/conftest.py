"""Shared fixtures: a real PostgreSQL and a real Redis for the whole run.

``TEST_DATABASE_URL`` / ``TEST_REDIS_URL`` point the suite at servers; unset, it starts the embedded
ones (the same code path the product uses with nothing configured): PostgreSQL under
``.billing/test``, shared by runs that each get a database of their own, and a Redis per run. Each run
gets its own freshly migrated database; tests that need a clean slate use ``clean_db``.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import redis as redis_lib
from sqlalchemy.orm import sessionmaker

from billing import db as billing_db
from billing import embedded, migrate

ROOT = Path(__file__).resolve().parent.parent
TEST_DATA_DIR = ROOT / ".billing" / "test"


def _plain(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://")


@pytest.fixture(scope="session")
def database_url() -> str:
    name = f"billing_test_{uuid.uuid4().hex[:8]}"
    server = os.environ.get("TEST_DATABASE_URL")
    if server:
        admin = _plain(server)
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        url = admin.rsplit("/", 1)[0] + f"/{name}"
        url = url.replace("postgresql://", "postgresql+psycopg://")
    else:
        admin = None
        url = embedded.database_url(TEST_DATA_DIR, database=name,
                                    extra_options="-c fsync=off -c synchronous_commit=off -c full_page_writes=off")
    migrate.upgrade(url)
    yield url
    billing_db.reset_engine()
    admin = admin or _plain(url).rsplit("/", 1)[0] + "/postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory) -> str:
    """A Redis of this run's own: Celery queues are global to a Redis database, and a worker left by
    another run on the same machine would otherwise take this run's tasks."""
    if os.environ.get("TEST_REDIS_URL"):
        yield os.environ["TEST_REDIS_URL"]
        return
    data_dir = tmp_path_factory.mktemp("redis")
    yield embedded.broker_url(data_dir, db=0)
    embedded.stop(data_dir)


@pytest.fixture(scope="session")
def base_env(database_url, redis_url, tmp_path_factory) -> dict[str, str]:
    """The BILLING_* environment that the product's processes (and settings) see in tests."""
    env = {
        "BILLING_DATABASE_URL": database_url,
        "BILLING_BROKER_URL": redis_url,
        "BILLING_DATA_DIR": str(tmp_path_factory.mktemp("data")),
        "BILLING_SECRET_KEY": "test-secret-key-0123456789abcdef",
        "BILLING_PUBLIC_URL": "http://billing.test",
        "BILLING_STRIPE_API_KEY": "sk_test_suite",
    }
    return env


def reset_process_caches() -> None:
    """Forget what this process read from the environment: settings, engine, gateway."""
    from billing.settings import get_settings
    from billing.stripe_gateway import get_gateway

    get_settings.cache_clear()
    billing_db.reset_engine()
    get_gateway.cache_clear()


@contextlib.contextmanager
def environ_applied(env: dict[str, str]) -> Iterator[None]:
    """``env`` set in this process (and its caches re-read) for the block, then put back."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    reset_process_caches()
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        reset_process_caches()


@pytest.fixture(scope="session", autouse=True)
def _settings_env(base_env):
    """Point in-process settings at the test servers (subprocesses get ``base_env`` explicitly)."""
    with environ_applied(base_env):
        yield


@pytest.fixture
def engine(database_url):
    return billing_db.get_engine()


@pytest.fixture
def session_factory(engine):
    return sessionmaker(bind=engine, expire_on_commit=False)


TABLES = ["webhook_events", "notifications", "recovery_tokens", "attempts", "charges", "subscriptions",
          "card_setups", "payment_methods", "customers", "audit_log"]


@pytest.fixture
def clean_db(database_url):
    """Empty every table before the test (real worker processes must see committed rows, so no
    per-test rollback here). The audit log's append-only trigger is bypassed for this alone."""
    with psycopg.connect(_plain(database_url), autocommit=True) as conn:
        conn.execute("SET session_replication_role = replica")
        conn.execute(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE")
    yield


@pytest.fixture
def redis_client(redis_url):
    client = redis_lib.Redis.from_url(redis_url)
    client.flushdb()
    yield client
    client.close()
