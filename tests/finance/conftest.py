"""Fixtures for the finance console: a clean database with two staff accounts, and the console over
HTTP in this process (``console``), whose follow-up jobs are recorded instead of sent to Celery."""

from __future__ import annotations

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from billing.web.finance import create_finance_app
from tests.finance import support
from tests.finance.support import RecordingJobs


@pytest.fixture
def accounts(database_url, clean_db):
    support.truncate_staff(database_url)
    support.add_accounts()


@pytest.fixture
def jobs() -> RecordingJobs:
    return RecordingJobs()


@pytest.fixture
def console(accounts, jobs):
    app = FastAPI()
    app.mount("/finance", create_finance_app(jobs))
    with TestClient(app) as client:
        yield client


# The real moving parts (sandbox, SMTP sink, Celery worker), shared with the integration tests.
from tests.integration.conftest import (  # noqa: E402, F401
    _sandbox_server,
    _smtp_sink,
    app_env,
    sandbox,
    smtp_server,
    worker,
    worker_factory,
)
